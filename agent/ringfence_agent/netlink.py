"""The one walker of netlink replies the agent's requests share (conntrack deletions and socket
lookups and aborts in :mod:`ringfence_agent.sessions`, the nf_tables reads in
:mod:`ringfence_agent.backends.nftables_netlink`).

Every datagram is checked the same way: only the kernel's (port 0) are read, another process's
is dropped unread (any local process may send to a netlink socket's port, so a forged answer
with a guessed sequence number must not count); every message's length must fit its datagram
(else :class:`OSError` EPROTO); ``NLMSG_ERROR`` and ``NLMSG_DONE`` carry the kernel's error code,
read for both (a dump the kernel ended with an error is not a whole dump); and the walk ends at
one deadline, however many datagrams keep arriving (:class:`OSError` ETIMEDOUT).
"""

from __future__ import annotations

import errno
import secrets
import select
import socket
import struct
import time
from collections.abc import Iterator
from typing import NamedTuple

NLMSG_ERROR = 2
NLMSG_DONE = 3
NLM_F_REQUEST = 0x1
NLM_F_MULTI = 0x2
NLM_F_ACK = 0x4
NLM_F_DUMP_INTR = 0x10  # the kernel's data changed while it dumped it: ask again
HEADER = struct.Struct("=IHHII")  # struct nlmsghdr: length, type, flags, seq, port
_CODE = struct.Struct("=i")


class Message(NamedTuple):
    """One netlink message of a reply. ``error``: for ``NLMSG_ERROR`` and ``NLMSG_DONE`` the
    errno the kernel answered (0: acknowledged / the dump ended whole), else 0. (A tuple: a
    cut of thousands of sockets makes as many.)"""

    kind: int
    flags: int
    seq: int
    payload: bytes
    error: int = 0

    @property
    def final(self) -> bool:
        """The kernel's last word on its request (an acknowledgement, an error, a dump's end)."""
        return self.kind in (NLMSG_ERROR, NLMSG_DONE)


def header(kind: int, flags: int, seq: int, body: bytes) -> bytes:
    """A request: its nlmsghdr (port 0: addressed to the kernel) and ``body``."""
    return HEADER.pack(HEADER.size + len(body), kind, flags, seq, 0) + body


def first_seq() -> int:
    """A random first sequence number for a socket's requests (leaving room for a million
    more): another process cannot guess which answer to forge, on top of the port check."""
    return secrets.randbits(31) + 1


def messages(data: bytes) -> list[Message]:
    """The messages of one datagram. OSError (EPROTO) when a length is short or runs past the
    datagram, or an ``NLMSG_ERROR``/``NLMSG_DONE`` is too short to hold its code."""
    out: list[Message] = []
    at = 0
    while at < len(data):
        if at + HEADER.size > len(data):
            raise OSError(errno.EPROTO, "truncated netlink message")
        length, kind, flags, seq, _ = HEADER.unpack_from(data, at)
        if length < HEADER.size or at + length > len(data):
            raise OSError(errno.EPROTO, "malformed netlink message")
        payload = data[at + HEADER.size : at + length]
        code = 0
        if kind in (NLMSG_ERROR, NLMSG_DONE):
            if len(payload) < _CODE.size:
                raise OSError(errno.EPROTO, "short netlink error message")
            (code,) = _CODE.unpack_from(payload)
        out.append(Message(kind, flags, seq, payload, -code))
        at += (length + 3) & ~3
    return out


def replies(sock: socket.socket, deadline: float, bufsize: int = 1 << 20) -> Iterator[Message]:
    """Each message the kernel sends on ``sock``, datagram by datagram, until the caller stops
    or ``deadline`` (time.monotonic()) passes: then OSError (ETIMEDOUT). Datagrams from any other
    sender than the kernel are dropped unread. Leaves ``sock`` non-blocking: a datagram already
    queued (the answers to a batch are, once its send returns) costs one system call, where a
    socket timeout would poll before every read."""
    buf = bytearray(bufsize)  # once: recvfrom(bufsize) would allocate (and map) that much per datagram
    view = memoryview(buf)
    sock.setblocking(False)
    waiter: select.poll | None = None
    while True:
        left = deadline - time.monotonic()
        if left <= 0:
            raise OSError(errno.ETIMEDOUT, "the kernel did not answer in time")
        try:
            size, sender = sock.recvfrom_into(buf)
        except BlockingIOError:
            if waiter is None:
                waiter = select.poll()  # not select(): a descriptor above 1023 is refused there
                waiter.register(sock, select.POLLIN)
            waiter.poll(max(1, int(left * 1000)))  # readable, or the deadline: checked above
            continue
        if sender[0] != 0:
            continue  # another process's datagram: only the kernel answers these requests
        yield from messages(view[:size].tobytes())


def answers(sock: socket.socket, pending: set[int], deadline: float) -> Iterator[Message]:
    """The first message the kernel sends for each sequence number in ``pending`` (requests
    answered by one message or one error: lookups, requests with ``NLM_F_ACK``), removing it from
    ``pending``; others are skipped. Ends when every one is answered; ETIMEDOUT at ``deadline``."""
    if not pending:
        return
    for m in replies(sock, deadline):
        if m.seq in pending:
            pending.discard(m.seq)
            yield m
            if not pending:
                return


def open_socket(protocol: int, rcvbuf: int = 8 << 20) -> socket.socket:
    """A netlink socket bound to a port of its own, with a receive buffer the answers of a batch
    fit in (the kernel drops an answer that does not fit: ENOBUFS); root may exceed rmem_max."""
    sock = socket.socket(socket.AF_NETLINK, socket.SOCK_RAW, protocol)
    try:
        for option in (getattr(socket, "SO_RCVBUFFORCE", 33), socket.SO_RCVBUF):
            try:
                sock.setsockopt(socket.SOL_SOCKET, option, rcvbuf)
                break
            except OSError:
                continue  # no CAP_NET_ADMIN: the plain option, capped at rmem_max
        sock.bind((0, 0))
    except OSError:
        sock.close()
        raise
    return sock
