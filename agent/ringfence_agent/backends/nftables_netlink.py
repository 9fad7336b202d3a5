"""One nf_tables question asked of the kernel over netlink: a table's flags (``NFT_MSG_GETTABLE``).

Why not libnftables: version 1.0.6 (Debian 12's) frees the name of a table's flag before it
prints it as JSON, whenever the table carries exactly one flag (``nft -j list tables`` or ``nft
-j list table``): a use-after-free that, in-process, corrupts the agent's heap until glibc aborts
it ("corrupted double-linked list"). Another process's table made with ``flags owner`` (a daemon
that owns its table, or one holding ``inet ringfence`` against the agent) or a table made
``dormant`` is enough. The agent therefore never lists a table object through libnftables; the
flags are the one thing it needs from one, and the kernel answers that in one small message. A
netlink library (pyroute2) would be a dependency for this single request, so it is written here.
"""

from __future__ import annotations

import errno
import itertools
import os
import socket
import struct
from dataclasses import dataclass

NETLINK_NETFILTER = 12
NFNL_SUBSYS_NFTABLES = 10
NFT_MSG_NEWTABLE = 0
NFT_MSG_GETTABLE = 1
NLMSG_ERROR = 2
NLM_F_REQUEST = 0x1
NFTA_TABLE_NAME = 1
NFTA_TABLE_FLAGS = 2
NFTA_TABLE_OWNER = 7
NLA_TYPE_MASK = 0x3FFF  # without NLA_F_NESTED / NLA_F_NET_BYTEORDER
FAMILIES = {"inet": 1, "ip": 2, "arp": 3, "netdev": 5, "bridge": 7, "ip6": 10}

DORMANT = 0x1  # NFT_TABLE_F_DORMANT: the table's chains are unhooked, its rules see no packet
OWNER = 0x2  # NFT_TABLE_F_OWNER: only the process holding the netlink socket may change it
FLAG_NAMES = {DORMANT: "dormant", OWNER: "owner"}

_HEADER = struct.Struct("=IHHII")  # struct nlmsghdr
_seq = itertools.count(1)


@dataclass(frozen=True, slots=True)
class TableInfo:
    flags: int
    owner: int | None  # the owning process's netlink port id (with OWNER)

    def flag_names(self) -> list[str]:
        return [FLAG_NAMES.get(bit, hex(bit)) for bit in (1 << i for i in range(32)) if self.flags & bit]


def _attr(kind: int, payload: bytes) -> bytes:
    raw = struct.pack("=HH", 4 + len(payload), kind) + payload
    return raw + b"\0" * (-len(raw) % 4)


def table_info(family: str, name: str, timeout: float = 2.0) -> TableInfo | None:
    """The flags of table ``family name`` as the kernel holds it (this process's network
    namespace); None when it holds no such table. OSError when the kernel cannot be asked
    (no netlink, no CAP_NET_ADMIN) or answers with another error."""
    seq = next(_seq)
    body = struct.pack("=BBH", FAMILIES[family], 0, 0) + _attr(NFTA_TABLE_NAME, name.encode() + b"\0")
    kind = (NFNL_SUBSYS_NFTABLES << 8) | NFT_MSG_GETTABLE
    request = _HEADER.pack(_HEADER.size + len(body), kind, NLM_F_REQUEST, seq, 0) + body
    with socket.socket(socket.AF_NETLINK, socket.SOCK_RAW, NETLINK_NETFILTER) as sock:
        sock.settimeout(timeout)
        sock.bind((0, 0))
        sock.send(request)
        while True:
            data = sock.recv(65536)
            at = 0
            while at + _HEADER.size <= len(data):
                length, msg_type, _, msg_seq, _ = _HEADER.unpack_from(data, at)
                if length < _HEADER.size:
                    raise OSError(errno.EPROTO, "malformed netlink message")
                payload = data[at + _HEADER.size : at + length]
                at += (length + 3) & ~3
                if msg_seq != seq:
                    continue
                if msg_type == NLMSG_ERROR:
                    (code,) = struct.unpack_from("=i", payload)
                    if code == -errno.ENOENT:
                        return None
                    raise OSError(-code, os.strerror(-code))
                if msg_type == (NFNL_SUBSYS_NFTABLES << 8) | NFT_MSG_NEWTABLE:
                    return _parse(payload[4:])  # after struct nfgenmsg


def _parse(attrs: bytes) -> TableInfo:
    flags, owner, at = 0, None, 0
    while at + 4 <= len(attrs):
        length, kind = struct.unpack_from("=HH", attrs, at)
        if length < 4:
            break
        value = attrs[at + 4 : at + length]
        kind &= NLA_TYPE_MASK
        if kind == NFTA_TABLE_FLAGS and len(value) == 4:
            (flags,) = struct.unpack(">I", value)
        elif kind == NFTA_TABLE_OWNER and len(value) == 4:
            (owner,) = struct.unpack(">I", value)
        at += (length + 3) & ~3
    return TableInfo(flags, owner)
