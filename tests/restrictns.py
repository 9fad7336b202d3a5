"""``python restrictns.py SETTING -- PROGRAM ARGS...``: run PROGRAM under the seccomp filter systemd
loads for ``RestrictNamespaces=SETTING`` (``yes``, ``no``, or namespace type names, ``~`` inverting
them), through libseccomp as systemd does (src/shared/seccomp-util.c, seccomp_restrict_namespaces):
``unshare`` and ``clone`` with a flag of a namespace type not allowed fail with EPERM, so does
``setns`` into one (and ``setns`` with no type named, unless all are allowed), and ``clone3`` fails
with ENOSYS (its flags are behind a pointer; the C library falls back to ``clone``).

Standard library only: the tests run it between ``setpriv`` and the agent, as the unit's user."""

from __future__ import annotations

import ctypes
import ctypes.util
import errno
import os
import sys

NAMESPACES = {
    "cgroup": 0x02000000,
    "ipc": 0x08000000,
    "net": 0x40000000,
    "mnt": 0x00020000,
    "pid": 0x20000000,
    "user": 0x10000000,
    "uts": 0x04000000,
}
ALLOW = 0x7FFF0000  # SCMP_ACT_ALLOW
MASKED_EQ = 7  # SCMP_CMP_MASKED_EQ
EQ = 4  # SCMP_CMP_EQ


def errno_action(err: int) -> int:
    return 0x00050000 | (err & 0xFFFF)  # SCMP_ACT_ERRNO(err)


class ArgCmp(ctypes.Structure):
    _fields_ = [("arg", ctypes.c_uint), ("op", ctypes.c_int), ("a", ctypes.c_uint64), ("b", ctypes.c_uint64)]


def allowed(setting: str) -> set[str]:
    """The namespace types ``RestrictNamespaces=setting`` allows."""
    setting = setting.strip()
    if setting in ("yes", "true", "1"):
        return set()
    if setting in ("no", "false", "0", ""):
        return set(NAMESPACES)
    names = set(setting.lstrip("~").split())
    if unknown := names - set(NAMESPACES):
        raise ValueError(f"unknown namespace types {sorted(unknown)}")
    return set(NAMESPACES) - names if setting.startswith("~") else names


def load(setting: str) -> None:
    """Load the filter into this process (inherited by what it executes)."""
    name = ctypes.util.find_library("seccomp")
    if name is None:
        raise OSError("libseccomp is not installed")
    lib = ctypes.CDLL(name, use_errno=True)
    lib.seccomp_init.restype = ctypes.c_void_p
    lib.seccomp_init.argtypes = [ctypes.c_uint32]
    lib.seccomp_syscall_resolve_name.argtypes = [ctypes.c_char_p]
    lib.seccomp_rule_add_array.argtypes = [
        ctypes.c_void_p,
        ctypes.c_uint32,
        ctypes.c_int,
        ctypes.c_uint,
        ctypes.POINTER(ArgCmp),
    ]
    lib.seccomp_load.argtypes = [ctypes.c_void_p]
    lib.seccomp_release.argtypes = [ctypes.c_void_p]
    ctx = lib.seccomp_init(ALLOW)
    if not ctx:
        raise OSError("seccomp_init failed")

    def rule(action: int, call: str, *cmp: tuple[int, int, int]) -> None:
        nr = lib.seccomp_syscall_resolve_name(call.encode())
        args = (ArgCmp * max(1, len(cmp)))(*(ArgCmp(a, op, v, v) for a, op, v in cmp))
        if (rc := lib.seccomp_rule_add_array(ctx, action, nr, len(cmp), args)) != 0:
            raise OSError(-rc, f"seccomp_rule_add {call}: {os.strerror(-rc)}")

    try:
        ok = allowed(setting)
        eperm = errno_action(errno.EPERM)
        if ok != set(NAMESPACES):
            rule(errno_action(errno.ENOSYS), "clone3")
            rule(eperm, "setns", (1, EQ, 0))
            for ns, flag in NAMESPACES.items():
                if ns in ok:
                    continue
                rule(eperm, "unshare", (0, MASKED_EQ, flag))
                rule(eperm, "clone", (0, MASKED_EQ, flag))  # x86-64, arm64: flags come first
                rule(eperm, "setns", (1, MASKED_EQ, flag))
        if (rc := lib.seccomp_load(ctx)) != 0:
            raise OSError(-rc, f"seccomp_load: {os.strerror(-rc)}")
    finally:
        lib.seccomp_release(ctx)


def main(argv: list[str]) -> None:
    if len(argv) < 4 or argv[2] != "--":
        sys.exit("usage: restrictns.py SETTING -- PROGRAM [ARGS...]")
    load(argv[1])
    os.execvp(argv[3], argv[3:])


if __name__ == "__main__":
    main(sys.argv)
