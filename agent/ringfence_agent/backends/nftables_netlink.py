"""What the agent asks of nf_tables over netlink itself, never through libnftables: a table's
flags (``NFT_MSG_GETTABLE``), and its chains, rules and small sets as the kernel holds them
(``GETCHAIN``/``GETRULE``/``GETSET``/``GETSETELEM`` dumps), raw bytes and all.

Why not libnftables: version 1.0.6 (Debian 12's) frees the name of a table's flag before it
prints it as JSON, whenever the table carries exactly one flag (``nft -j list table``): a
use-after-free that, in-process, corrupted the agent's heap until glibc aborted it. It abort()s
on any string that is not UTF-8 (a chain name in another process's table, an ``iifname`` in a
rule of Ringfence's own). And it leaves out of every listing, silently, a rule holding an
expression it does not know (the kernel's ``inner``, say): such a rule, an ``accept`` at the head
of a chain, was invisible to every digest. The kernel's own bytes have none of these problems:
a rule nft cannot render still changes them, and nothing here prints a string.

A netlink library (pyroute2) would be a dependency for a handful of requests, so they are
written here. Every reply is checked (:mod:`ringfence_agent.netlink`, the walker the agent's
other netlink requests share): it comes from the kernel (port 0), answers this request (a
random sequence number), is whole (lengths inside the datagram; a dump the kernel ended with
an error in its NLMSG_DONE is not), and the whole exchange ends within ``timeout`` seconds;
anything else is an :class:`OSError`.
"""

from __future__ import annotations

import errno
import os
import socket
import struct
import time
from dataclasses import dataclass
from typing import Any

from ringfence_agent import netlink
from ringfence_agent.backends import ReadError

NETLINK_NETFILTER = 12
NFNL_SUBSYS_NFTABLES = 10
NFT_MSG_NEWTABLE = 0
NFT_MSG_GETTABLE = 1
NFT_MSG_NEWCHAIN = 3
NFT_MSG_GETCHAIN = 4
NFT_MSG_NEWRULE = 6
NFT_MSG_GETRULE = 7
NFT_MSG_NEWSET = 9
NFT_MSG_GETSET = 10
NFT_MSG_NEWSETELEM = 12
NFT_MSG_GETSETELEM = 13
NFT_MSG_NEWGEN = 15
NFT_MSG_GETGEN = 16
NFT_MSG_NEWOBJ = 18
NFT_MSG_GETOBJ = 19
NLMSG_ERROR = netlink.NLMSG_ERROR
NLMSG_DONE = netlink.NLMSG_DONE
NLM_F_REQUEST = netlink.NLM_F_REQUEST
NLM_F_DUMP_INTR = netlink.NLM_F_DUMP_INTR  # the ruleset changed while the kernel dumped it: dump again
NLM_F_DUMP = 0x300
NFTA_GEN_ID = 1
NFTA_TABLE_NAME = 1
NFTA_TABLE_FLAGS = 2
NFTA_TABLE_OWNER = 7
NFTA_CHAIN_TABLE = 1
NFTA_CHAIN_NAME = 3
NFTA_RULE_TABLE = 1
NFTA_RULE_CHAIN = 2
NFTA_SET_TABLE = 1
NFTA_SET_NAME = 2
NFTA_SET_ELEM_LIST_TABLE = 1
NFTA_SET_ELEM_LIST_SET = 2
NFTA_SET_ELEM_LIST_ELEMENTS = 3
NLA_TYPE_MASK = 0x3FFF  # without NLA_F_NESTED / NLA_F_NET_BYTEORDER
FAMILIES = {"inet": 1, "ip": 2, "arp": 3, "netdev": 5, "bridge": 7, "ip6": 10}

DORMANT = 0x1  # NFT_TABLE_F_DORMANT: the table's chains are unhooked, its rules see no packet
OWNER = 0x2  # NFT_TABLE_F_OWNER: only the process holding the netlink socket may change it
FLAG_NAMES = {DORMANT: "dormant", OWNER: "owner"}

_NFGEN = struct.Struct("=BBH")  # struct nfgenmsg: family, version, res_id (big endian)
_RECV = 1 << 20  # a dump message is at most this big (the kernel sizes them to the reader's buffer)
# a socket receive buffer a big dump's parts fit in, so the kernel fills it without waiting on us
# (a shorter window for a concurrent commit to interrupt it); root may exceed rmem_max (FORCE)
_RCVBUF = 8 << 20


@dataclass(frozen=True, slots=True)
class TableInfo:
    flags: int
    owner: int | None  # the owning process's netlink port id (with OWNER)

    def flag_names(self) -> list[str]:
        return [FLAG_NAMES.get(bit, hex(bit)) for bit in (1 << i for i in range(32)) if self.flags & bit]


@dataclass(frozen=True, slots=True)
class Message:
    """One nf_tables message of a reply: its type (``NFT_MSG_*``), the generation it was dumped
    at (nfgenmsg res_id, the low 16 bits) and its attributes (type → raw value, last one wins;
    ``raw``: the attribute bytes as the kernel sent them)."""

    kind: int
    generation: int
    attrs: dict[int, bytes]
    raw: bytes


def _attr(kind: int, payload: bytes) -> bytes:
    raw = struct.pack("=HH", 4 + len(payload), kind) + payload
    return raw + b"\0" * (-len(raw) % 4)


def attributes(buf: bytes) -> list[tuple[int, bytes]]:
    """The netlink attributes in ``buf`` in order, (type without its flag bits, value). OSError
    (EPROTO) when one's length is short or runs past the buffer."""
    out: list[tuple[int, bytes]] = []
    at = 0
    while at < len(buf):
        if at + 4 > len(buf):
            raise OSError(errno.EPROTO, "truncated netlink attribute")
        length, kind = struct.unpack_from("=HH", buf, at)
        if length < 4 or at + length > len(buf):
            raise OSError(errno.EPROTO, "malformed netlink attribute")
        out.append((kind & NLA_TYPE_MASK, buf[at + 4 : at + length]))
        at += (length + 3) & ~3
    return out


def text(value: bytes) -> bytes:
    """A string attribute's bytes without its NUL (never decoded: names need not be UTF-8)."""
    return value.split(b"\0", 1)[0]


def _request(kind: int, flags: int, family: str, attrs: bytes, timeout: float) -> list[Message]:
    """Send one request and collect its reply: the messages up to the kernel's ack (a plain
    request answered with one message counts as done on it) or NLMSG_DONE (a dump). OSError on
    an error answer (ENOENT included, and a dump the kernel ended with an error), a malformed or
    interrupted reply, or the deadline."""
    seq = netlink.first_seq()  # a stranger cannot guess which reply to forge (and is dropped anyway)
    body = _NFGEN.pack(FAMILIES[family], 0, 0) + attrs
    request = netlink.header((NFNL_SUBSYS_NFTABLES << 8) | kind, flags | NLM_F_REQUEST, seq, body)
    deadline = time.monotonic() + timeout
    with netlink.open_socket(NETLINK_NETFILTER, _RCVBUF) as sock:
        sock.settimeout(timeout)
        sock.sendto(request, (0, 0))
        return receive(sock, seq, flags & NLM_F_DUMP == NLM_F_DUMP, deadline)


def receive(sock: socket.socket, seq: int, dump: bool, deadline: float) -> list[Message]:
    """The kernel's reply to request ``seq`` on netlink socket ``sock``, by ``deadline``
    (time.monotonic()): see :func:`_request`. The walk is :func:`ringfence_agent.netlink.replies`
    (the kernel's datagrams only, lengths checked, one deadline); messages of another sequence
    number are skipped. A message flagged NLM_F_DUMP_INTR, the final NLMSG_DONE included (the
    kernel may flag only that one), is :class:`InterruptedError`."""
    out: list[Message] = []
    for m in netlink.replies(sock, deadline, _RECV):
        if m.seq != seq:
            continue
        if m.kind == NLMSG_ERROR:
            if m.error:
                raise OSError(m.error, os.strerror(m.error))
            return out
        if m.flags & NLM_F_DUMP_INTR:
            raise InterruptedError(errno.EINTR, "the ruleset changed during the dump")
        if m.kind == NLMSG_DONE:
            if m.error:  # the kernel stopped the dump short: what came is not the whole table
                raise OSError(m.error, f"the kernel ended the dump with an error: {os.strerror(m.error)}")
            return out
        if m.kind >> 8 != NFNL_SUBSYS_NFTABLES or len(m.payload) < _NFGEN.size:
            raise OSError(errno.EPROTO, "unexpected netlink message")
        _, _, res_id = _NFGEN.unpack_from(m.payload)
        raw = m.payload[_NFGEN.size :]
        out.append(Message(m.kind & 0xFF, socket.ntohs(res_id), dict(attributes(raw)), raw))
        if not dump:
            return out
    raise AssertionError("unreachable: replies() ends only by raising")


def table_info(family: str, name: str, timeout: float = 2.0) -> TableInfo | None:
    """The flags of table ``family name`` as the kernel holds it (this process's network
    namespace); None when it holds no such table. OSError when the kernel cannot be asked
    (no netlink, no CAP_NET_ADMIN), answers with another error or not as it should."""
    try:
        reply = _request(NFT_MSG_GETTABLE, 0, family, _attr(NFTA_TABLE_NAME, name.encode() + b"\0"), timeout)
    except OSError as exc:
        if exc.errno == errno.ENOENT:
            return None
        raise
    tables = [m for m in reply if m.kind == NFT_MSG_NEWTABLE]
    if not tables:
        raise OSError(errno.EPROTO, "no table in the kernel's answer")
    return _parse(tables[0].raw)


def generation(timeout: float = 2.0) -> int:
    """The ruleset's generation in this network namespace (``NFT_MSG_GETGEN``, all 32 bits): the
    kernel adds one at every commit that changes anything, whoever makes it, in any table, and
    before any of that commit's changes can be seen (dumps show the old generation's objects
    until then). OSError when the kernel cannot be asked or answers otherwise."""
    for m in _request(NFT_MSG_GETGEN, 0, "inet", b"", timeout):
        value = m.attrs.get(NFTA_GEN_ID, b"")
        if m.kind == NFT_MSG_NEWGEN and len(value) == 4:
            gen: int = struct.unpack(">I", value)[0]
            return gen
    raise OSError(errno.EPROTO, "no generation in the kernel's answer")


def _parse(attrs: bytes) -> TableInfo:
    flags, owner = 0, None
    for kind, value in attributes(attrs):
        if kind == NFTA_TABLE_FLAGS and len(value) == 4:
            (flags,) = struct.unpack(">I", value)
        elif kind == NFTA_TABLE_OWNER and len(value) == 4:
            (owner,) = struct.unpack(">I", value)
    return TableInfo(flags, owner)


def _dump(kind: int, family: str, attrs: bytes, timeout: float) -> list[Message]:
    """A dump's messages; none when the kernel holds no such table (or set). A dump a concurrent
    commit interrupted (NLM_F_DUMP_INTR: a neighbour changing its own table in a loop) is asked
    again until ``timeout`` has passed, not a fixed number of times. :class:`ReadError` (an
    OSError) when it cannot be read by then, or the reply is malformed or late: the agent cannot
    tell what the kernel holds, never takes that for intact (it programs its rules again). A
    refusal (no CAP_NET_ADMIN: EPERM) stays a plain OSError."""
    deadline = time.monotonic() + timeout
    pause = 0.005
    while True:
        left = deadline - time.monotonic()
        try:
            if left <= 0:
                raise OSError(errno.ETIMEDOUT, "the kernel did not answer in time")
            return _request(kind, NLM_F_DUMP, family, attrs, left)
        except InterruptedError:
            if time.monotonic() + pause >= deadline:
                raise ReadError(
                    errno.EINTR, f"every dump in {timeout:.0f} s was interrupted by a change of the ruleset"
                ) from None
            time.sleep(pause)  # let the concurrent commit finish; a little longer each time
            pause = min(pause * 2, 0.1)
        except ReadError:
            raise
        except OSError as exc:
            if exc.errno == errno.ENOENT:
                return []
            if exc.errno in (errno.EPERM, errno.EACCES):
                raise
            raise ReadError(exc.errno, f"the kernel's rules could not be read over netlink: {exc.strerror}") from None


def chains(family: str, table: str, timeout: float = 5.0) -> list[Message]:
    """The chains of table ``family table`` in the kernel's order. The kernel filters no chain
    dump by table: every table's chains of the family come back and the others are dropped here,
    unread (their names may be any bytes)."""
    name = table.encode()
    replies = _dump(NFT_MSG_GETCHAIN, family, b"", timeout)
    return [m for m in replies if m.kind == NFT_MSG_NEWCHAIN and text(m.attrs.get(NFTA_CHAIN_TABLE, b"")) == name]


def rules(family: str, table: str, timeout: float = 5.0) -> list[Message]:
    """Every rule of table ``family table``, chain by chain, in the kernel's order (the kernel
    filters the dump by table)."""
    name = table.encode()
    replies = _dump(NFT_MSG_GETRULE, family, _attr(NFTA_RULE_TABLE, name + b"\0"), timeout)
    return [m for m in replies if m.kind == NFT_MSG_NEWRULE and text(m.attrs.get(NFTA_RULE_TABLE, b"")) == name]


def sets(family: str, table: str, timeout: float = 5.0) -> list[Message]:
    """The sets of table ``family table`` (definitions, no elements), anonymous ones included."""
    name = table.encode()
    replies = _dump(NFT_MSG_GETSET, family, _attr(NFTA_SET_TABLE, name + b"\0"), timeout)
    return [m for m in replies if m.kind == NFT_MSG_NEWSET and text(m.attrs.get(NFTA_SET_TABLE, b"")) == name]


def set_elements(family: str, table: str, name: bytes, timeout: float = 5.0) -> tuple[list[bytes], set[int]]:
    """The raw attributes of each element of set ``name`` (for small sets), and the generations
    the kernel dumped them at; no element when there is no such set."""
    attrs = _attr(NFTA_SET_ELEM_LIST_TABLE, table.encode() + b"\0") + _attr(NFTA_SET_ELEM_LIST_SET, name + b"\0")
    out: list[bytes] = []
    generations: set[int] = set()
    for m in _dump(NFT_MSG_GETSETELEM, family, attrs, timeout):
        if m.kind != NFT_MSG_NEWSETELEM:
            continue
        generations.add(m.generation)
        for kind, value in attributes(m.raw):
            if kind == NFTA_SET_ELEM_LIST_ELEMENTS:
                out.extend(elem for _, elem in attributes(value))
    return out, generations


NFTA_OBJ_TABLE, NFTA_OBJ_NAME, NFTA_OBJ_TYPE, NFTA_OBJ_DATA = 1, 2, 3, 4
NFT_OBJECT_COUNTER = 1
NFTA_COUNTER_PACKETS = 2


def counters(family: str, table: str, timeout: float = 5.0) -> dict[str, int]:
    """The packet count of each named counter of table ``family table`` (name decoded with
    replacement: a name that is not UTF-8 is none of the agent's). The kernel filters the object
    dump by table and type, so no other table is read (``nft list counters table`` made
    libnftables fetch every table's set elements: seconds for a big foreign set)."""
    name = table.encode()
    attrs = _attr(NFTA_OBJ_TABLE, name + b"\0") + _attr(NFTA_OBJ_TYPE, struct.pack(">I", NFT_OBJECT_COUNTER))
    out: dict[str, int] = {}
    for m in _dump(NFT_MSG_GETOBJ, family, attrs, timeout):
        if m.kind != NFT_MSG_NEWOBJ or text(m.attrs.get(NFTA_OBJ_TABLE, b"")) != name:
            continue
        if m.attrs.get(NFTA_OBJ_TYPE) != struct.pack(">I", NFT_OBJECT_COUNTER):
            continue
        data = dict(attributes(m.attrs.get(NFTA_OBJ_DATA, b"")))
        packets = data.get(NFTA_COUNTER_PACKETS, b"")
        if len(packets) == 8:
            counter = text(m.attrs.get(NFTA_OBJ_NAME, b"")).decode("utf-8", "replace")
            (out[counter],) = struct.unpack(">Q", packets)
    return out


def expressions(raw: bytes) -> list[Any]:
    """A rule's expressions (NFTA_RULE_EXPRESSIONS: NFTA_LIST_ELEM of NFTA_EXPR_NAME,
    NFTA_EXPR_DATA) as a digest keeps them: the kernel's bytes (hex), but no packet counts (an
    anonymous ``counter``'s, including the per-element template of a dynset), which move with
    traffic."""
    return [_expression(elem) for _, elem in attributes(raw)]


def _expression(elem: bytes) -> list[Any]:
    attrs = dict(attributes(elem))
    name = text(attrs.get(1, b""))
    data = attrs.get(2, b"")
    if name == b"counter":
        return [name.hex()]
    if name != b"dynset":
        return [name.hex(), data.hex()]
    kept: list[Any] = []
    for kind, value in attributes(data):
        if kind == 7:  # NFTA_DYNSET_EXPR: one expression
            kept.append([kind, _expression(value)])
        elif kind == 10:  # NFTA_DYNSET_EXPRESSIONS: a list of them
            kept.append([kind, expressions(value)])
        else:
            kept.append([kind, value.hex()])
    return [name.hex(), kept]


NFT_JUMP = -3


def jumps_only_to(raw: bytes, chain: str) -> bool:
    """Whether a rule's expressions (NFTA_RULE_EXPRESSIONS) are a jump to ``chain`` and nothing
    else but counters (``-A INPUT -j RF-IN`` as iptables-nft writes it)."""
    jump = False
    for _, elem in attributes(raw):
        attrs = dict(attributes(elem))
        name = text(attrs.get(1, b""))
        if name == b"counter":
            continue
        if name != b"immediate" or jump:
            return False
        data = dict(attributes(attrs.get(2, b"")))  # NFTA_IMMEDIATE_DATA (2)
        verdict = dict(attributes(dict(attributes(data.get(2, b""))).get(2, b"")))  # NFTA_DATA_VERDICT (2)
        code = verdict.get(1, b"")
        if len(code) != 4 or struct.unpack(">i", code)[0] != NFT_JUMP:
            return False
        if text(verdict.get(2, b"")) != chain.encode():
            return False
        jump = True
    return jump
