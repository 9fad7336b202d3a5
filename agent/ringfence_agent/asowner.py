"""Root never does file work in a directory another user owns.

A state directory is its owner's: the unit runs the agent as ``ringfence-agent``, which owns
``/var/lib/ringfence-agent``. Root's file calls there (open, rename, chmod, mkdir) follow what that
user planted: a symlinked ``.lock``, spool or ``rejected/`` made root chown, truncate or move
root's own files (security review r14). So ``ringfence-agent`` run as root on such a directory
executes itself again as its owner, exactly as the unit starts the agent (``setpriv``: the owner's
uid and gid, no supplementary groups, ``CAP_NET_ADMIN CAP_NET_RAW`` bounded and ambient, no new
privileges), same process, same interpreter and arguments. Without ``setpriv`` it refuses; it never
goes on as root. Input files only root may read (a bundle, a delta, the config) are opened first
and passed open, as ``/dev/fd/N`` (:func:`read_input` reads them from the descriptor).
"""

from __future__ import annotations

import contextlib
import os
import re
import shutil
import stat
import sys
from collections.abc import Sequence
from pathlib import Path

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
    it, root's). A symlink is refused: whose directory it names is not the link's owner's to say."""
    if os.geteuid() != 0:
        return None
    try:
        st = os.lstat(state_dir)
    except FileNotFoundError:
        return None
    if stat.S_ISLNK(st.st_mode):
        raise Refused(
            f"the state directory {state_dir} is a symbolic link: refused as root (name the directory itself)"
        )
    return (st.st_uid, st.st_gid) if st.st_uid != 0 else None


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


def pass_open(path: str) -> str:
    """``path`` opened (as root, who may read it) and left open across the exec: ``/dev/fd/N``."""
    fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
    os.set_inheritable(fd, True)
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
    return [sys.executable, *sys.orig_argv[1 : len(sys.orig_argv) - tail]]


def become(state_dir: Path, user: tuple[int, int], command: list[str], argv: list[str] | None) -> None:
    """Execute ``command`` (the CLI's arguments) again as ``user``, the owner of ``state_dir``, as
    the unit starts the agent. Never returns; :class:`Refused` when ``setpriv`` is missing."""
    program = shutil.which("setpriv")
    if program is None:
        who = _name(*user)
        raise Refused(
            f"the state directory {state_dir} is owned by {who}, not root: root does no file work there "
            f"and setpriv (util-linux) is not installed to run this as {who}. Install util-linux, or run it "
            f"as {who} with CAP_NET_ADMIN and CAP_NET_RAW, e.g. systemd-run --pipe --wait -p User={user[0]} "
            f"-p Group={user[1]} -p AmbientCapabilities='CAP_NET_ADMIN CAP_NET_RAW' ringfence-agent …"
        )
    sys.stdout.flush()
    sys.stderr.flush()
    cmd = [*setpriv_command(UNIT_CAPABILITIES, user, program), "--", *interpreter_argv(argv), *command]
    os.execv(program, cmd)  # noqa: S606 - this very command again, as the directory's owner


def _name(uid: int, gid: int) -> str:
    import grp
    import pwd

    try:
        user = pwd.getpwuid(uid).pw_name
    except KeyError:
        user = str(uid)
    try:
        group = grp.getgrgid(gid).gr_name
    except KeyError:
        group = str(gid)
    return f"{user}:{group} ({uid}:{gid})"
