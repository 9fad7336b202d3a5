"""A fresh, empty network namespace nobody else can write, for a whole apply's seal check: a
forked child unshares one (``CLONE_NEWNET``: needs ``CAP_SYS_ADMIN``), loads the same rules there
and reads them back with the same readers; the parent seals the live read-back only when it is
the same (nftables and iptables ``apply``). The namespace goes with the child.

Without ``CAP_SYS_ADMIN`` (the shipped unit bounds the agent to ``CAP_NET_ADMIN CAP_NET_RAW``) a
bare network namespace cannot be made; a user namespace with one can, where the unprivileged
kernel allows it (and the unit's ``RestrictNamespaces=user net``: ``yes`` refuses both), and
there the child has ``CAP_NET_ADMIN`` over its namespace, but only in its
own process: a program it executes runs as an unmapped user without it (``user_ns``). Nor would
raising it as an ambient capability do for iptables: uid 0 is unmapped there, so the fail-safe's
``-m owner --uid-owner 0`` cannot be loaded (nftables' ``meta skuid 0`` is a plain number)."""

from __future__ import annotations

import ctypes
import os
import select
import signal
import time
from collections.abc import Callable

CLONE_NEWNET = 0x40000000
CLONE_NEWUSER = 0x10000000
_UNAVAILABLE = 71  # the child's exit code when no namespace could be made


class Unavailable(OSError):
    """No network namespace of its own could be made (no CAP_SYS_ADMIN, and no user namespace
    where ``user_ns`` allows one): the check cannot be done here at all."""


def isolated(
    work: Callable[[], bytes], timeout: float, pids: set[int] | None = None, user_ns: bool = False
) -> bytes | None:
    """What ``work`` returns when run in a forked child in a network namespace of its own; None
    when the namespace cannot be made, ``work`` raises, the child dies or is not done within
    ``timeout`` seconds (then it is killed). ``pids``: where the child's pid is kept while it
    runs (the daemon's stop watchdog kills those rather than wait on them). ``user_ns``: ``work``
    runs in this process only, so a user namespace may hold the network namespace when a bare
    one cannot be made. :class:`Unavailable` when none can be made."""
    rfd, wfd = os.pipe()
    try:
        pid = os.fork()
    except OSError:
        os.close(rfd)
        os.close(wfd)
        return None
    if pid == 0:  # the child: no lock taken (another thread of the parent may hold one)
        code = 70
        try:
            os.close(rfd)
            libc = ctypes.CDLL(None, use_errno=True)
            if libc.unshare(CLONE_NEWNET) != 0 and (not user_ns or libc.unshare(CLONE_NEWUSER | CLONE_NEWNET) != 0):
                os._exit(_UNAVAILABLE)
            view = memoryview(work())
            while view:
                view = view[os.write(wfd, view) :]
            code = 0
        finally:
            os._exit(code)
    if pids is not None:
        pids.add(pid)
    os.close(wfd)
    chunks: list[bytes] = []
    deadline = time.monotonic() + timeout
    try:
        while True:
            left = deadline - time.monotonic()
            if left <= 0 or not select.select([rfd], [], [], left)[0]:
                os.kill(pid, signal.SIGKILL)
                break
            chunk = os.read(rfd, 1 << 20)
            if not chunk:
                break
            chunks.append(chunk)
    finally:
        os.close(rfd)
        _, status = os.waitpid(pid, 0)
        if pids is not None:
            pids.discard(pid)
    if os.WIFEXITED(status) and os.WEXITSTATUS(status) == _UNAVAILABLE:
        raise Unavailable("no network namespace of its own could be made (no CAP_SYS_ADMIN, no user namespace)")
    if not os.WIFEXITED(status) or os.WEXITSTATUS(status) != 0:
        return None
    return b"".join(chunks)
