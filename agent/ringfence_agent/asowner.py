"""Root never does file work in a directory another user owns.

A state directory is its owner's: the unit runs the agent as ``ringfence-agent``, which owns
``/var/lib/ringfence-agent``. Root's file calls there (open, rename, chmod, mkdir) follow what that
user planted: a symlinked ``.lock``, spool or ``rejected/`` made root chown, truncate or move
root's own files (security review r14). So ``ringfence-agent`` run as root on such a directory
runs the same command as a child as its owner, exactly as the unit starts the agent
(``setpriv``: the owner's uid and gid, no supplementary groups, ``CAP_NET_ADMIN CAP_NET_RAW``
bounded and ambient, no new privileges), with nothing else of root's: no terminal, descriptor or
environment (r15). Without ``setpriv`` it refuses; it never goes on as root. Input files only
root may read (a bundle, a delta, the config) are opened first and passed open, as
``/dev/fd/N`` (:func:`read_input` reads them from the descriptor).
"""

from __future__ import annotations

import contextlib
import fcntl
import os
import re
import shutil
import signal
import stat
import subprocess
import sys
import threading
from collections.abc import Sequence
from pathlib import Path
from typing import IO, Any

from ringfence_agent.state import owner_name

# The unit's CapabilityBoundingSet= and AmbientCapabilities= (agent/packaging/ringfence-agent.service;
# tests/agent/test_agent_unit_caps.py holds them equal)
UNIT_CAPABILITIES = ("CAP_NET_ADMIN", "CAP_NET_RAW")

_FD_PATH = re.compile(r"/dev/fd/([0-9]+)")


class Refused(Exception):
    """Root will not work in this state directory, and cannot become its owner."""


def setpriv_command(
    capabilities: Sequence[str] = UNIT_CAPABILITIES, user: tuple[int, int] | None = None, program: str = "setpriv"
) -> list[str]:
    """A command prefix starting a program as systemd starts the unit: bounded to ``capabilities``
    (``CAP_…`` names), with no new privileges; as root, or with ``user`` (uid, gid) as that user
    with no supplementary groups and ``capabilities`` raised as ambient ones (``User=`` with
    ``AmbientCapabilities=``). The one definition (tests/systemdunit.py uses it)."""
    caps = ",".join(["-all", *(f"+{c.removeprefix('CAP_').lower()}" for c in capabilities)])
    cmd = [program]
    if user is not None:
        cmd += [f"--reuid={user[0]}", f"--regid={user[1]}", "--clear-groups"]
    cmd.append(f"--bounding-set={caps}")
    if user is not None:
        cmd += [f"--inh-caps={caps}", f"--ambient-caps={caps}"]
    cmd.append("--no-new-privs")
    return cmd


def owner_to_become(state_dir: Path) -> tuple[int, int] | None:
    """The (uid, gid) root must become to work in ``state_dir``: its owner's when another user's.
    None when this process is not root, or the directory is root's or not there yet (root makes
    it, root's), and only when no other user can put something else at that name in the meantime
    (:func:`check_ancestors`, security review r15 F3). A symlink is refused: whose directory it
    names is not the link's owner's to say."""
    if os.geteuid() != 0:
        return None
    state_dir = Path(os.path.abspath(state_dir))
    try:
        st = os.lstat(state_dir)
    except FileNotFoundError:
        check_ancestors(state_dir)
        return None
    if stat.S_ISLNK(st.st_mode):
        raise Refused(
            f"the state directory {state_dir} is a symbolic link: refused as root (name the directory itself)"
        )
    if st.st_uid != 0:
        return (st.st_uid, st.st_gid)
    check_ancestors(state_dir)
    if st.st_mode & 0o022:
        raise Refused(_unsafe(state_dir, st, "root's, but other users may write in it"))
    return None


def check_ancestors(path: Path) -> None:
    """:class:`Refused` unless every existing directory on the way to ``path`` (absolute) is
    root's and no other user may write in it: otherwise whoever may could put a link or a
    directory of theirs at the next name after root looked (r15 F3). A sticky directory other
    users may write in (``/tmp``) holds only when the next name is already there and root's:
    the sticky bit keeps others from renaming or removing it. The user who ran ``sudo``
    (``SUDO_UID``/``SUDO_GID``: root's environment, which no other user sets) counts as root: a
    checkout in their home (``sudo make demo``) is theirs, and they are root already."""
    uids, gids = _trusted()
    parts = path.parts
    current = Path(parts[0])
    for i, name in enumerate(parts[1:], start=1):
        st = os.lstat(current)
        if stat.S_ISLNK(st.st_mode):
            if st.st_uid != 0:
                raise Refused(_unsafe(current, st, "a symbolic link not root's"))
            check_ancestors(Path(os.path.realpath(current)) / "_")  # the directory it names, and its way
            st = os.stat(current)
        if st.st_uid not in uids:
            raise Refused(_unsafe(current, st, "not root's"))
        if _others_may_write(st, gids):
            nxt = current / name
            try:
                held = os.lstat(nxt).st_uid in uids and st.st_mode & stat.S_ISVTX and i < len(parts) - 1
            except FileNotFoundError:
                held = False
            if not held:
                raise Refused(_unsafe(current, st, f"writable by other users, who could put their own {nxt}"))
        current = current / name
        if not os.path.lexists(current):
            return


def _trusted() -> tuple[set[int], set[int]]:
    """The uids and gids whose directories root may work under: root's, and those of the user
    who ran ``sudo`` (``SUDO_UID``, ``SUDO_GID``)."""
    uids, gids = {0}, {0}
    for name, into in (("SUDO_UID", uids), ("SUDO_GID", gids)):
        value = os.environ.get(name, "")
        if value.isdigit():
            into.add(int(value))
    return uids, gids


def _others_may_write(st: os.stat_result, gids: set[int]) -> bool:
    return bool(st.st_mode & 0o002) or bool(st.st_mode & 0o020 and st.st_gid not in gids)


def _unsafe(path: Path, st: os.stat_result, why: str) -> str:
    return (
        f"refused as root: {path} (owner uid {st.st_uid}, gid {st.st_gid}, mode {stat.S_IMODE(st.st_mode):04o}) "
        f"is {why}: name a state directory only root can reach, or the directory of its owner"
    )


def can_read(path: Path, user: tuple[int, int]) -> bool:
    """Whether ``user`` (uid, gid, no supplementary groups) may open ``path`` for reading: asked
    of the kernel by a child that becomes that user, so modes, ACLs and every directory on the
    way count as they will after the exec."""
    pid = os.fork()
    if pid == 0:  # pragma: no cover - the child
        ok = False
        with contextlib.suppress(BaseException):
            os.setgroups([])
            os.setresgid(user[1], user[1], user[1])
            os.setresuid(user[0], user[0], user[0])
            os.close(os.open(path, os.O_RDONLY | os.O_NONBLOCK | os.O_CLOEXEC))
            ok = True
        os._exit(0 if ok else 1)
    _, status = os.waitpid(pid, 0)
    return os.waitstatus_to_exitcode(status) == 0


def pass_open(path: str, passed: list[int]) -> str:
    """``path`` opened (as root, who may read it) for the owner's process: ``/dev/fd/N``, N
    added to ``passed`` (the only descriptors it gets)."""
    fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
    passed.append(fd)
    return f"/dev/fd/{fd}"


def pass_bytes(data: bytes, passed: list[int]) -> str:
    """``data`` in a sealed memory file for the owner's process: ``/dev/fd/N`` (what root read
    once, e.g. a config on a pipe, r15 F4)."""
    fd = os.memfd_create("ringfence-input", os.MFD_CLOEXEC | os.MFD_ALLOW_SEALING)
    view = memoryview(data)
    while view:
        view = view[os.write(fd, view) :]
    fcntl.fcntl(fd, fcntl.F_ADD_SEALS, fcntl.F_SEAL_SHRINK | fcntl.F_SEAL_GROW | fcntl.F_SEAL_WRITE | fcntl.F_SEAL_SEAL)
    os.lseek(fd, 0, os.SEEK_SET)
    passed.append(fd)
    return f"/dev/fd/{fd}"


def read_input(path: Path) -> bytes:
    """An input file's bytes. ``/dev/fd/N`` is read from descriptor N itself (a duplicate, from its
    start: the config is read again on a retry), not by opening the path again: that re-checks
    permissions, and the file passed open may be one only root may open."""
    m = _FD_PATH.fullmatch(str(path))
    if m is None:
        return path.read_bytes()
    fd = os.dup(int(m.group(1)))
    with contextlib.suppress(OSError):  # a pipe cannot seek: read on from where it is
        os.lseek(fd, 0, os.SEEK_SET)
    with os.fdopen(fd, "rb") as f:
        return f.read()


def interpreter_argv(argv: list[str] | None) -> list[str]:
    """This program's interpreter and its options (``python [-X …] script`` or ``python -m mod``):
    sys.orig_argv less the arguments the program got. Called with its own ``argv`` (a test, a
    wrapper), the CLI module itself."""
    if argv is not None and argv != sys.argv[1:]:
        return [sys.executable, "-m", "ringfence_agent.cli"]
    tail = len(sys.argv) - 1
    head = sys.orig_argv[1 : len(sys.orig_argv) - tail]
    # a script named relative to root's cwd: the owner's process runs in / (r15 F5)
    return [sys.executable, *(os.path.abspath(a) if a == sys.argv[0] and a != "-c" else a for a in head)]


# what the owner's process gets of root's environment: nothing but these and root's PATH (r15 F2:
# root's environment may hold secrets, and the owner reads /proc/PID/environ of its own processes)
_ENV = {"PATH": "/usr/sbin:/usr/bin:/sbin:/bin", "LANG": "C.UTF-8"}
# the variables the agent reads (backends/nft.py, backends/iptables.py, ringfence/bundlewire.py)
_AGENT_ENV = ("RINGFENCE_NFT_CLI", "RINGFENCE_NFT_GROUP_BOUND", "RINGFENCE_IPSET_CLI", "RINGFENCE_ED25519")
_FORWARDED = (signal.SIGINT, signal.SIGTERM, signal.SIGHUP)


def child_env() -> dict[str, str]:
    # root's PATH is kept: it chooses the tools the backends run (legacy or nft iptables), as it
    # chose setpriv; they run with the owner's rights, which the owner has anyway
    keep = {k: os.environ[k] for k in ("PATH", *_AGENT_ENV) if os.environ.get(k)}
    return {**_ENV, **keep}


def become(
    state_dir: Path, user: tuple[int, int], command: list[str], argv: list[str] | None, passed: Sequence[int] = ()
) -> int:
    """Run ``command`` (the CLI's arguments) as ``user``, the owner of ``state_dir``, as the unit
    starts the agent, and return its exit status (128+N: killed by signal N). :class:`Refused`
    when ``setpriv`` is missing. A child, not this process executed again (r15 F1, F2): in a
    session of its own (no controlling terminal to push input into), stdin /dev/null, its
    output relayed with control characters escaped, cwd /, a fixed environment, and of root's
    descriptors only ``passed`` (the inputs root opened for it)."""
    program = shutil.which("setpriv")
    if program is None:
        who = f"{owner_name(*user)} ({user[0]}:{user[1]})"
        raise Refused(
            f"the state directory {state_dir} is owned by {who}, not root: root does no file work there "
            f"and setpriv (util-linux) is not installed to run this as {who}. Install util-linux, or run it "
            f"as {who} with CAP_NET_ADMIN and CAP_NET_RAW, e.g. systemd-run --pipe --wait -p User={user[0]} "
            f"-p Group={user[1]} -p AmbientCapabilities='CAP_NET_ADMIN CAP_NET_RAW' ringfence-agent …"
        )
    sys.stdout.flush()
    sys.stderr.flush()
    cmd = [*setpriv_command(UNIT_CAPABILITIES, user, program), "--", *interpreter_argv(argv), *command]
    proc = subprocess.Popen(  # this very command, as the directory's owner
        cmd,
        executable=program,
        stdin=subprocess.DEVNULL,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        close_fds=True,
        pass_fds=tuple(passed),
        cwd="/",
        env=child_env(),
        start_new_session=True,
    )
    for fd in passed:
        os.close(fd)
    if proc.stdout is None or proc.stderr is None:  # pragma: no cover - both are pipes
        raise OSError("no pipes to the owner's process")
    relays = [
        threading.Thread(target=_relay, args=(proc.stdout, sys.stdout), daemon=True),
        threading.Thread(target=_relay, args=(proc.stderr, sys.stderr), daemon=True),
    ]
    for t in relays:
        t.start()
    before: dict[int, Any] = {}
    if threading.current_thread() is threading.main_thread():
        for sig in _FORWARDED:
            before[sig] = signal.signal(sig, lambda signum, _frame: proc.send_signal(signum))
    try:
        rc = proc.wait()
    finally:
        for num, handler in before.items():
            signal.signal(num, handler)
    for t in relays:
        t.join()
    return 128 - rc if rc < 0 else rc


def _relay(source: IO[bytes], to: IO[str]) -> None:
    """The owner's output, line by line, with every character that could drive root's terminal
    shown escaped (as status text: :func:`ringfence_agent.cli.terminal_line`), tabs and line
    ends kept."""
    from ringfence_agent.cli import terminal_line

    with source:
        for raw in iter(lambda: source.readline(65536), b""):
            text = raw.decode("utf-8", errors="backslashreplace")
            end = "\n" if text.endswith("\n") else ""
            line = "\t".join(terminal_line(part) for part in text.removesuffix("\n").split("\t"))
            with contextlib.suppress(OSError, ValueError):
                to.write(line + end)
                to.flush()
