"""A fresh, empty network namespace nobody else can write, for a whole apply's seal check: a
forked child unshares one (``CLONE_NEWNET``: needs ``CAP_SYS_ADMIN``), loads the same rules there
and reads them back with the same readers; the parent seals the live read-back only when it is
the same (nftables and iptables ``apply``). The namespace goes with the child.

Without ``CAP_SYS_ADMIN`` (the shipped unit bounds the agent to ``CAP_NET_ADMIN CAP_NET_RAW``) a
bare network namespace cannot be made; a user namespace holding one can, where the kernel allows
unprivileged ones (and the unit's ``RestrictNamespaces=user net``: ``yes`` refuses both). There
the child has every capability over its namespace, in its own process only; for the programs it
executes (iptables-restore, ipset, nft) it maps its own uid and gid to themselves and raises
``CAP_NET_ADMIN CAP_NET_RAW`` as ambient capabilities, which they keep. Its own uid mapped, the
control-plane fail-safe's ``-m owner --uid-owner <uid>`` (the agent's user) loads there; uid 0
cannot be mapped so (that needs ``CAP_SETFCAP``), so an agent run as root without
``CAP_SYS_ADMIN`` has no namespace for programs (``programs``: :class:`Unavailable`)."""

from __future__ import annotations

import ctypes
import os
import select
import signal
import time
from collections.abc import Callable

CLONE_NEWNET = 0x40000000
CLONE_NEWUSER = 0x10000000
_UNAVAILABLE = 71  # the child's exit code when no namespace could be made (the reason on the pipe)
CAP_SYS_ADMIN = 21
AMBIENT = (12, 13)  # CAP_NET_ADMIN, CAP_NET_RAW
_PR_CAP_AMBIENT, _PR_CAP_AMBIENT_RAISE = 47, 2
_CAP_V3 = 0x20080522


class Unavailable(OSError):
    """No network namespace of its own could be made (no CAP_SYS_ADMIN, and no user namespace
    where ``user_ns`` allows one, or none in which ``programs`` keep CAP_NET_ADMIN): the check
    cannot be done here at all. Its text says why."""


class _CapHeader(ctypes.Structure):
    _fields_ = [("version", ctypes.c_uint32), ("pid", ctypes.c_int)]


class _CapData(ctypes.Structure):
    _fields_ = [("effective", ctypes.c_uint32), ("permitted", ctypes.c_uint32), ("inheritable", ctypes.c_uint32)]


def _write(path: str, text: str) -> None:
    fd = os.open(path, os.O_WRONLY)
    try:
        os.write(fd, text.encode())
    finally:
        os.close(fd)


def _has(cap: int) -> bool:
    """Whether this process holds ``cap`` in its effective set."""
    try:  # os calls only: the forked child of a threaded parent takes no lock
        fd = os.open("/proc/self/status", os.O_RDONLY)
        try:
            text = os.read(fd, 1 << 16).decode()
        finally:
            os.close(fd)
        line = next((x for x in text.splitlines() if x.startswith("CapEff:")), "CapEff: 0")
        return bool(int(line.split()[1], 16) >> cap & 1)
    except (OSError, ValueError):
        return False


def _ids_and_ambient(libc: ctypes.CDLL, uid: int, gid: int) -> str | None:
    """In a user namespace just made: this process's own uid and gid mapped to themselves and
    CAP_NET_ADMIN CAP_NET_RAW raised as ambient capabilities, which executed programs keep. None,
    or why not."""
    try:
        _write("/proc/self/uid_map", f"{uid} {uid} 1\n")
    except OSError as exc:
        why = " (mapping uid 0 needs CAP_SETFCAP)" if uid == 0 else ""
        return f"uid {uid} could not be mapped into a user namespace: {exc.strerror}{why}"
    try:
        _write("/proc/self/setgroups", "deny")
        _write("/proc/self/gid_map", f"{gid} {gid} 1\n")
    except OSError as exc:
        return f"gid {gid} could not be mapped into a user namespace: {exc.strerror}"
    header, data = _CapHeader(_CAP_V3, 0), (_CapData * 2)()
    if libc.capget(ctypes.byref(header), data) != 0:
        return f"capget: {os.strerror(ctypes.get_errno())}"
    for cap in AMBIENT:
        data[0].inheritable |= 1 << cap
    if libc.capset(ctypes.byref(header), data) != 0:
        return f"capset: {os.strerror(ctypes.get_errno())}"
    for cap in AMBIENT:
        if libc.prctl(_PR_CAP_AMBIENT, _PR_CAP_AMBIENT_RAISE, cap, 0, 0) != 0:
            return f"an ambient capability could not be raised in a user namespace: {os.strerror(ctypes.get_errno())}"
    return None


def _namespace(libc: ctypes.CDLL, user_ns: bool, programs: bool) -> str | None:
    """Move this (child) process into a network namespace of its own: None, or why it cannot."""
    uid, gid = os.geteuid(), os.getegid()  # before a user namespace shows them unmapped
    if libc.unshare(CLONE_NEWNET) == 0:
        return None
    bare = os.strerror(ctypes.get_errno())
    why = f"unshare(CLONE_NEWNET): {bare}" + ("" if _has(CAP_SYS_ADMIN) else " (no CAP_SYS_ADMIN)")
    if not user_ns:
        return why
    if libc.unshare(CLONE_NEWUSER | CLONE_NEWNET) != 0:
        return (
            f"{why}; unshare(CLONE_NEWUSER|CLONE_NEWNET): {os.strerror(ctypes.get_errno())} (user namespaces "
            "refused: a seccomp filter such as systemd's RestrictNamespaces=, or the kernel's or an LSM's limit)"
        )
    problem = _ids_and_ambient(libc, uid, gid)
    return f"{why}; in a user namespace: {problem}" if problem is not None and programs else None


def isolated(
    work: Callable[[], bytes],
    timeout: float,
    pids: set[int] | None = None,
    user_ns: bool = False,
    programs: bool = False,
) -> bytes | None:
    """What ``work`` returns when run in a forked child in a network namespace of its own; None
    when ``work`` raises, the child dies or is not done within ``timeout`` seconds (then it is
    killed). ``pids``: where the child's pid is kept while it runs (the daemon's stop watchdog
    kills those rather than wait on them). ``user_ns``: a user namespace may hold the network
    namespace when a bare one cannot be made. ``programs``: ``work`` executes programs, which
    need the ids mapped and the ambient capabilities there. :class:`Unavailable` (saying why)
    when no such namespace can be made."""
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
            why = _namespace(libc, user_ns, programs)
            view = memoryview(work() if why is None else why.encode())
            while view:
                view = view[os.write(wfd, view) :]
            code = 0 if why is None else _UNAVAILABLE
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
        why = b"".join(chunks).decode(errors="replace") or "unknown"
        raise Unavailable(f"no network namespace of its own could be made: {why}")
    if not os.WIFEXITED(status) or os.WEXITSTATUS(status) != 0:
        return None
    return b"".join(chunks)
