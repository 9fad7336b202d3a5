"""Revocation cuts what is open: the connections a newly applied plan would not admit are deleted
from the kernel's connection tracking table.

Every backend accepts ``ct state established,related`` first (a packet of an admitted connection
costs one lookup), so a rule change alone leaves an open connection open: a reverse shell opened
before a quarantine would keep working. After a change that can revoke access the agent lists
this host's conntrack entries, judges each one's first packet with the plan's own order
(:class:`~ringfence_agent.plan.Admitter`: fail-safes, rules, default) and deletes the entries it
would drop. The next packet of a deleted connection is a new connection to the firewall (TCP
mid-stream pickup included) and meets the rules: dropped. Entries the plan admits, fail-safes
(SSH from the admin ranges, control plane, DNS, DHCP, metadata) and the host's traffic to itself
are left alone; so are forwarded connections, which the agent's input/output hooks never see.

Listing reads ``/proc/net/nf_conntrack`` (one read, no process), else ``conntrack -L``.
Deleting talks ctnetlink directly: one ``IPCTNL_MSG_CT_DELETE`` per entry by its original tuple,
many per send. ``conntrack -D`` walks the whole table for every entry it deletes (measured: 16.6 s
for 1,000 deletions among 3,000 entries); pyroute2 would add an asyncio-based dependency to an
agent that has none, for the ~60 lines below (kernel UAPI, ``linux/netfilter/nfnetlink_conntrack.h``).
"""

from __future__ import annotations

import errno
import os
import re
import shutil
import socket
import struct
import subprocess
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from pathlib import Path

from ringfence_agent import netlink
from ringfence_agent.plan import Admission, Admitter, Flow, Plan, _Prefixes

PROC_CONNTRACK = Path("/proc/net/nf_conntrack")
_PORTS = {"tcp": 6, "udp": 17, "udplite": 136, "sctp": 132, "dccp": 33}
_CLOSED = {"TIME_WAIT", "CLOSE"}  # a TCP entry in these states is no open connection
SHOWN = 10  # cut connections named in the apply's output (all are counted)


class CutError(RuntimeError):
    """Listing or deleting conntrack entries failed (the firewall change itself is in force)."""


@dataclass(frozen=True, slots=True)
class Session:
    """One conntrack entry: its original tuple, and the reply tuple's source (the destination
    after DNAT, which is what the filter hooks see)."""

    family: int  # 4 or 6
    proto: str  # tcp, udp, icmp, icmpv6, ... (conntrack's name)
    protonum: int
    src: str
    dst: str
    sport: int | None
    dport: int | None
    reply_src: str
    reply_sport: int | None
    icmp: tuple[int, int, int] | None = None  # type, code, id (original direction)
    zone: int = 0
    state: str | None = None

    def describe(self) -> str:
        if self.icmp is not None:
            return f"{self.proto} {self.src} -> {self.dst} type {self.icmp[0]}"
        if self.sport is None:
            return f"{self.proto} {self.src} -> {self.dst}"
        fmt = "[{}]:{}" if self.family == 6 else "{}:{}"
        return f"{self.proto} {fmt.format(self.src, self.sport)} -> {fmt.format(self.dst, self.dport)}"


def _canonical(text: str) -> str:
    if ":" in text:  # /proc spells IPv6 in full
        return socket.inet_ntop(socket.AF_INET6, socket.inet_pton(socket.AF_INET6, text))
    socket.inet_pton(socket.AF_INET, text)  # OSError on anything else
    return text


_TUPLE = re.compile(r"src=(\S+) dst=(\S+)(?: sport=(\d+) dport=(\d+)| type=(\d+) code=(\d+) id=(\d+))?")
_ZONE = re.compile(r"\bzone=(\d+)")


def parse_sessions(lines: Iterable[str]) -> list[Session]:
    """``/proc/net/nf_conntrack`` or ``conntrack -L [-o extended]`` lines; others are skipped."""
    out: list[Session] = []
    for line in lines:
        orig = _TUPLE.search(line)
        reply = _TUPLE.search(line, orig.end()) if orig is not None else None
        if orig is None or reply is None:
            continue
        head = line[: orig.start()].split()
        if head and head[0] in ("ipv4", "ipv6"):
            head = head[2:]
        if len(head) < 2 or not head[1].isdigit():
            continue
        try:
            src, dst, reply_src = _canonical(orig[1]), _canonical(orig[2]), _canonical(reply[1])
        except (ValueError, OSError):
            continue
        proto = head[0]
        zone = _ZONE.search(line, reply.end())
        out.append(
            Session(
                family=6 if ":" in src else 4,
                proto="icmpv6" if proto == "ipv6-icmp" else proto,
                protonum=int(head[1]),
                src=src,
                dst=dst,
                sport=int(orig[3]) if orig[3] else None,
                dport=int(orig[4]) if orig[4] else None,
                reply_src=reply_src,
                reply_sport=int(reply[3]) if reply[3] else None,
                icmp=(int(orig[5]), int(orig[6]), int(orig[7])) if orig[5] else None,
                zone=int(zone[1]) if zone else 0,
                state=head[3] if len(head) > 3 and head[3].replace("_", "").isalpha() else None,
            )
        )
    return out


def list_sessions(proc_path: Path = PROC_CONNTRACK) -> list[Session]:
    """This network namespace's conntrack entries."""
    try:
        return parse_sessions(proc_path.read_text().splitlines())
    except OSError:
        pass
    if shutil.which("conntrack") is None:
        raise CutError(f"cannot list connections: no {proc_path} and no conntrack tool (package conntrack)")
    try:
        proc = subprocess.run(["conntrack", "-L", "-o", "extended"], capture_output=True, text=True, timeout=30)
    except (OSError, subprocess.TimeoutExpired) as exc:
        raise CutError(f"conntrack -L failed: {exc}") from None
    if proc.returncode != 0:
        raise CutError(f"conntrack -L failed: {proc.stderr.strip()[:300]}")
    return parse_sessions(proc.stdout.splitlines())


def flow_of(s: Session, local: set[str]) -> Flow | None:
    """The connection's first packet as the input or output hook saw it; None when neither hook
    judges it (traffic to the host itself, forwarded traffic)."""
    here_src = s.src in local or s.src.startswith("127.") or s.src == "::1"
    here_dst = s.reply_src in local or s.reply_src.startswith("127.") or s.reply_src == "::1"
    icmp_type = s.icmp[0] if s.icmp is not None else None
    if here_src and here_dst:
        return None
    if here_src:
        return Flow("outbound", s.reply_src, s.proto, s.sport, s.reply_sport, icmp_type)
    if here_dst:
        return Flow("inbound", s.src, s.proto, s.sport, s.reply_sport, icmp_type)
    return None


# --- ctnetlink ------------------------------------------------------------------------------------

NETLINK_NETFILTER = 12
_MSG_CT_DELETE = (1 << 8) | 2  # NFNL_SUBSYS_CTNETLINK << 8 | IPCTNL_MSG_CT_DELETE
_NLM_F_REQUEST, _NLM_F_ACK = netlink.NLM_F_REQUEST, netlink.NLM_F_ACK
_NESTED = 0x8000
_CTA_TUPLE_ORIG, _CTA_ZONE = 1, 18
_CTA_TUPLE_IP, _CTA_TUPLE_PROTO = 1, 2
_CTA_PROTO_NUM, _CTA_PROTO_SRC_PORT, _CTA_PROTO_DST_PORT = 1, 2, 3


def _attr(kind: int, payload: bytes) -> bytes:
    size = 4 + len(payload)
    return struct.pack("=HH", size, kind) + payload + b"\0" * (-size % 4)


def delete_message(s: Session, seq: int) -> bytes | None:
    """One IPCTNL_MSG_CT_DELETE by original tuple; None for a protocol whose tuple has more than
    ports or ICMP ids (GRE keys): left alone."""
    fam = socket.AF_INET6 if s.family == 6 else socket.AF_INET
    first = 3 if s.family == 6 else 1  # CTA_IP_V6_SRC / CTA_IP_V4_SRC, DST is the next one
    ip = _attr(first, socket.inet_pton(fam, s.src)) + _attr(first + 1, socket.inet_pton(fam, s.dst))
    proto = _attr(_CTA_PROTO_NUM, struct.pack("B", s.protonum))
    if s.icmp is not None:
        base = 7 if s.family == 6 else 4  # CTA_PROTO_ICMP(V6)_ID, _TYPE, _CODE
        kind, code, ident = s.icmp
        proto += _attr(base, struct.pack("!H", ident)) + _attr(base + 1, bytes([kind])) + _attr(base + 2, bytes([code]))
    elif s.sport is not None and s.dport is not None and s.proto in _PORTS:
        proto += _attr(_CTA_PROTO_SRC_PORT, struct.pack("!H", s.sport))
        proto += _attr(_CTA_PROTO_DST_PORT, struct.pack("!H", s.dport))
    elif s.sport is not None or s.proto in _PORTS or s.protonum == 47:
        return None  # ports missing, or GRE (its tuple holds keys)
    tup = _attr(
        _CTA_TUPLE_ORIG | _NESTED, _attr(_CTA_TUPLE_IP | _NESTED, ip) + _attr(_CTA_TUPLE_PROTO | _NESTED, proto)
    )
    body = struct.pack("=BBH", fam, 0, 0) + tup
    if s.zone:
        body += _attr(_CTA_ZONE, struct.pack("!H", s.zone))
    return struct.pack("=IHHII", 16 + len(body), _MSG_CT_DELETE, _NLM_F_REQUEST | _NLM_F_ACK, seq, 0) + body


@dataclass(slots=True)
class Deleted:
    deleted: int = 0
    gone: int = 0  # ended on its own between listing and deleting
    failed: list[str] = field(default_factory=list)


_CHUNK = 256  # requests per send: their answers fit the receive buffer with room to spare
_DEADLINE = 5.0  # seconds for the kernel to answer one chunk


def _open(protocol: int, what: str) -> socket.socket:
    try:
        return netlink.open_socket(protocol)
    except OSError as exc:
        raise CutError(f"cannot open a {what} socket: {exc.strerror or exc}") from None


def _exchange(sock: socket.socket, requests: list[bytes], seq: int) -> list[netlink.Message]:
    """Send ``requests`` (each answered by exactly one message: an answer, an error or an ack),
    ``_CHUNK`` per send, numbered from ``seq`` on; their answers in the same order, matched by
    sequence number (:func:`ringfence_agent.netlink.answers`: the kernel's only). OSError when
    the kernel does not answer them all within ``_DEADLINE`` seconds a chunk."""
    out: list[netlink.Message] = []
    for i in range(0, len(requests), _CHUNK):
        chunk = requests[i : i + _CHUNK]
        first = seq + i
        batch = b"".join(msg[:8] + struct.pack("=I", first + n) + msg[12:] for n, msg in enumerate(chunk))
        pending = set(range(first, first + len(chunk)))
        sock.send(batch)
        got = {m.seq: m for m in netlink.answers(sock, pending, time.monotonic() + _DEADLINE)}
        out.extend(got[first + n] for n in range(len(chunk)))
    return out


def _acknowledged(result: Deleted, sessions: list[Session], acks: list[netlink.Message]) -> None:
    """Count acknowledgements: 0 done, ENOENT gone already, anything else failed."""
    for s, ack in zip(sessions, acks, strict=True):
        if ack.kind != netlink.NLMSG_ERROR:
            result.failed.append(f"{s.describe()}: unexpected answer (netlink type {ack.kind})")
        elif ack.error == 0:
            result.deleted += 1
        elif ack.error == errno.ENOENT:
            result.gone += 1
        else:
            result.failed.append(f"{s.describe()}: {os.strerror(ack.error)}")


def _requests(protocol: int, what: str, messages: list[tuple[Session, bytes | None]]) -> Deleted:
    """Send netlink requests (each with NLM_F_ACK and its own sequence number, ``_CHUNK`` per
    send) and count the acknowledgements (:func:`_acknowledged`)."""
    result = Deleted()
    sent: list[tuple[Session, bytes]] = []
    for s, msg in messages:
        if msg is None:
            result.failed.append(f"{s.describe()}: protocol {s.proto} not handled")
        else:
            sent.append((s, msg))
    if not sent:
        return result
    with _open(protocol, what) as sock:
        try:
            acks = _exchange(sock, [m for _, m in sent], netlink.first_seq())
        except OSError as exc:
            raise CutError(f"{what} request failed: {exc.strerror or exc}") from None
    _acknowledged(result, [s for s, _ in sent], acks)
    return result


def netlink_delete(sessions: list[Session]) -> Deleted:
    """Delete conntrack entries by original tuple."""
    return _requests(NETLINK_NETFILTER, "ctnetlink", [(s, delete_message(s, 0)) for s in sessions])


NETLINK_SOCK_DIAG = 4
_SOCK_DESTROY = 21
_NOCOOKIE = 0xFFFFFFFF


def destroy_message(s: Session, flow: Flow, seq: int) -> bytes | None:
    """SOCK_DESTROY of this host's end of a cut TCP connection: an ``inet_diag_req_v2`` naming
    the socket exactly (local address and port, remote address and port, any interface, no
    cookie). None for anything else (UDP and ICMP have no connection to abort)."""
    if s.proto != "tcp" or s.sport is None or s.dport is None or s.reply_sport is None:
        return None
    fam = socket.AF_INET6 if s.family == 6 else socket.AF_INET
    # inbound: the local end is the destination after DNAT; outbound: the source, connected
    # to the destination it asked for (before DNAT)
    if flow.direction == "inbound":
        local, lport, remote, rport = s.reply_src, s.reply_sport, s.src, s.sport
    else:
        local, lport, remote, rport = s.src, s.sport, s.dst, s.dport

    def addr(a: str) -> bytes:
        return socket.inet_pton(fam, a).ljust(16, b"\0")

    sockid = struct.pack("!HH", lport, rport) + addr(local) + addr(remote)
    sockid += struct.pack("=III", 0, _NOCOOKIE, _NOCOOKIE)  # any interface, no cookie
    body = struct.pack("=BBBBI", fam, socket.IPPROTO_TCP, 0, 0, 0xFFFFFFFF) + sockid
    return struct.pack("=IHHII", 16 + len(body), _SOCK_DESTROY, _NLM_F_REQUEST | _NLM_F_ACK, seq, 0) + body


_SOCK_DIAG_BY_FAMILY = 20
# TCP states of a socket a process holds with its peer, the ones aborted: not TIME_WAIT or CLOSE
# (no process holds those: nothing to abort), never LISTEN
_CONNECTED = {1, 2, 3, 4, 5, 8, 9, 11}  # ESTABLISHED SYN_SENT SYN_RECV FIN_WAIT1/2 CLOSE_WAIT LAST_ACK CLOSING
_REQ_ID = 16 + 8  # inet_diag_sockid in a request (after the header and inet_diag_req_v2's head)
_MSG_ID = 16 + 4  # and in an answer (after the header and inet_diag_msg's head)
_PAIR = slice(0, 36)  # the sockid's ports and addresses
_COOKIE = slice(40, 48)  # the sockid's cookie
_V4_MAPPED = b"\0" * 10 + b"\xff\xff"


def _pair_of(answer: bytes) -> bytes:
    """The ports and addresses of an answer's inet_diag_msg, an IPv6 socket's IPv4-mapped
    addresses as the IPv4 request names them (a dual-stack listener's accepted IPv4 connection
    is an AF_INET6 socket)."""
    pair = answer[_MSG_ID + _PAIR.start : _MSG_ID + _PAIR.stop]
    if answer[16] == socket.AF_INET6 and pair[4:16] == _V4_MAPPED and pair[20:32] == _V4_MAPPED:
        zero = b"\0" * 12
        return pair[:4] + pair[16:20] + zero + pair[32:36] + zero
    return pair


def _pinned(msg: bytes, answer: netlink.Message) -> bytes | None:
    """The destroy request ``msg`` bound, by its cookie, to the socket the kernel's lookup
    (``answer``) found for its address pair; None unless that is a connected socket with exactly
    this pair. For a connection that has just ended the kernel's lookup falls back to the port's
    listener, and SOCK_DESTROY of a listener closes it: the service then refuses every connection
    (a cut raced with a client's close did that to a lab server). By cookie, the abort reaches
    that one socket or, gone meanwhile, nothing (ENOENT): never the listener."""
    if answer.kind != _SOCK_DIAG_BY_FAMILY or len(answer.payload) + 16 < _MSG_ID + _COOKIE.stop:
        return None
    reply = bytes(16) + answer.payload  # offsets as in the datagram
    family, state = reply[16], reply[17]
    if family not in (msg[16], socket.AF_INET6) or state not in _CONNECTED:
        return None
    if _pair_of(reply) != msg[_REQ_ID + _PAIR.start : _REQ_ID + _PAIR.stop]:
        return None
    cookie = reply[_MSG_ID + _COOKIE.start : _MSG_ID + _COOKIE.stop]
    return msg[: _REQ_ID + _COOKIE.start] + cookie + msg[_REQ_ID + _COOKIE.stop :]


def destroy_sockets(cut: list[tuple[Session, Flow]]) -> Deleted:
    """Abort this host's sockets of cut TCP connections: the process holding one (a reverse
    shell) gets an error now instead of retransmitting into a drop for minutes. All are looked
    up first (SOCK_DIAG_BY_FAMILY with the exact address pair, ``_CHUNK`` per send), then the
    connected ones destroyed by their cookies, on one socket; never a listener (:func:`_pinned`).
    A lookup answered "no such socket", or by another socket than the connection's, counts as
    gone; any other error as failed: neither is destroyed."""
    mine = [(s, m) for s, m in ((s, destroy_message(s, f, 0)) for s, f in cut) if m is not None]
    result = Deleted()
    if not mine:
        return result
    seq = netlink.first_seq()
    with _open(NETLINK_SOCK_DIAG, "sock_diag") as sock:
        lookups = [netlink.header(_SOCK_DIAG_BY_FAMILY, _NLM_F_REQUEST, 0, m[16:]) for _, m in mine]
        try:
            answers = _exchange(sock, lookups, seq)
        except OSError as exc:
            raise CutError(f"sock_diag lookup failed: {exc.strerror or exc}") from None
        pinned: list[tuple[Session, bytes]] = []
        for (s, m), answer in zip(mine, answers, strict=True):
            exact = _pinned(m, answer)
            if exact is not None:
                pinned.append((s, exact))
            elif answer.kind != netlink.NLMSG_ERROR or answer.error == errno.ENOENT:
                result.gone += 1  # none, or the listener (or TIME_WAIT) the lookup fell back to
            else:
                result.failed.append(f"{s.describe()}: lookup: {os.strerror(answer.error)}")
        try:
            acks = _exchange(sock, [m for _, m in pinned], seq + len(lookups))
        except OSError as exc:
            raise CutError(f"sock_diag request failed: {exc.strerror or exc}") from None
    _acknowledged(result, [s for s, _ in pinned], acks)
    return result


# --- the cut --------------------------------------------------------------------------------------


@dataclass(slots=True)
class CutReport:
    listed: int = 0
    cut: list[tuple[Session, Flow, Admission]] = field(default_factory=list)
    deleted: Deleted = field(default_factory=Deleted)
    aborted: Deleted = field(default_factory=Deleted)  # this host's sockets of cut TCP connections
    seconds: float = 0.0

    def lines(self) -> list[str]:
        if not self.cut:
            return []
        out = [
            f"cut {self.deleted.deleted} open connection(s) the new rules do not admit "
            f"({len(self.cut)} of {self.listed} tracked; {self.seconds * 1000:.0f} ms)"
        ]
        for s, f, why in self.cut[:SHOWN]:
            out.append(f"  cut {f.direction} {s.describe()} ({why.by})")
        if len(self.cut) > SHOWN:
            out.append(f"  ... and {len(self.cut) - SHOWN} more")
        if self.deleted.gone:
            out.append(f"  {self.deleted.gone} had ended already")
        if self.aborted.deleted:
            out.append(f"  aborted {self.aborted.deleted} local socket(s) of them (their processes see an error now)")
        for msg in self.aborted.failed[:1]:
            out.append(f"  local sockets not aborted: {msg}")
        for msg in self.deleted.failed[:SHOWN]:
            out.append(f"  not cut: {msg}")
        return out


def local_addresses() -> set[str]:
    from ringfence_agent.reports import local_addresses as addrs

    return addrs()


class SessionCutter:
    """Finds and deletes the conntrack entries a plan would not admit (this network namespace)."""

    def __init__(
        self,
        lister: Callable[[], list[Session]] = list_sessions,
        local: Callable[[], set[str]] = local_addresses,
        delete: Callable[[list[Session]], Deleted] = netlink_delete,
        abort: Callable[[list[tuple[Session, Flow]]], Deleted] | None = destroy_sockets,
    ) -> None:
        self.lister = lister
        self.local = local
        self.delete = delete
        self.abort = abort

    @staticmethod
    def candidates(
        sessions: list[Session], local: set[str], peers: Iterable[str] | None = None
    ) -> list[tuple[Session, Flow]]:
        """The open connections the input/output hooks judge; ``peers`` (CIDRs): only those with
        these peers (a set delta changes nothing for anyone else)."""
        only = _Prefixes(peers) if peers is not None else None
        out: list[tuple[Session, Flow]] = []
        for s in sessions:
            if s.proto == "tcp" and s.state in _CLOSED:
                continue
            flow = flow_of(s, local)
            if flow is None:
                continue
            if only is not None:
                packed = socket.inet_pton(socket.AF_INET6 if ":" in flow.peer else socket.AF_INET, flow.peer)
                if (len(packed) * 8, int.from_bytes(packed, "big")) not in only:
                    continue
            out.append((s, flow))
        return out

    @staticmethod
    def judge(plan: Plan, candidates: list[tuple[Session, Flow]]) -> list[tuple[Session, Flow, Admission]]:
        """The candidates ``plan`` would drop."""
        if plan.mode != "enforce":
            return []  # observe accepts everything, idle programs nothing
        admitter = Admitter(plan)
        out: list[tuple[Session, Flow, Admission]] = []
        for s, flow in candidates:
            verdict = admitter.admits(flow)
            if not verdict.admitted:
                out.append((s, flow, verdict))
        return out

    def doomed(
        self, plan: Plan, sessions: list[Session], local: set[str], peers: Iterable[str] | None = None
    ) -> list[tuple[Session, Flow, Admission]]:
        """The entries ``plan`` would drop (``peers``: only connections with these peers)."""
        return self.judge(plan, self.candidates(sessions, local, peers))

    def cut(self, plan: Plan | Callable[[], Plan | None], peers: Iterable[str] | None = None) -> CutReport:
        """``plan`` may be a function: called only when there is a connection to judge (a set
        delta brings the plan's copy of a large set up to date only then)."""
        start = time.perf_counter()
        report = CutReport()
        if isinstance(plan, Plan) and plan.mode != "enforce":
            return report
        sessions = self.lister()
        report.listed = len(sessions)
        found = self.candidates(sessions, self.local(), peers)
        if found:
            current = plan if isinstance(plan, Plan) else plan()
            if current is not None:
                report.cut = self.judge(current, found)
        if report.cut:
            report.deleted = self.delete([s for s, _, _ in report.cut])
            if self.abort is not None:
                try:
                    report.aborted = self.abort([(s, f) for s, f, _ in report.cut])
                except CutError as exc:  # the entries are gone: the connections are cut anyway
                    report.aborted = Deleted(failed=[str(exc)])
        report.seconds = time.perf_counter() - start
        return report


def session_cutter(backend: str, enabled: bool = True) -> SessionCutter | None:
    """A cutter for the backends that program this host's kernel; None for the others."""
    return SessionCutter() if enabled and backend in ("nftables", "iptables") else None
