"""The bundle signing key in a process of its own: ``ringfence serve --user USER``.

``serve`` started as root spawns this signer first, then drops to USER for everything else: the
process that answers agents and admins never loads the key. The signer stays root, loads the key
(a root-owned file of mode 600 in, and under, directories that only root may change: USER can
neither read it nor swap it) and does one thing: sign a bundle or delta manifest
(:func:`ringfence.bundlewire.manifest`) that names its own key, logging what it signed. So the
internet-facing process, even taken over, can neither copy the key (not the file, nor the
signer's memory, another user's process) nor have anything but a Ringfence manifest signed with
it; it can still ask for manifests while it runs, as on AWS a compromised compute function could
call KMS Sign.

The protocol, over the child's stdin/stdout: the signer's first line is JSON (``key_id``,
``public_pem``, or ``error``); then each request is a 4-byte big-endian length and a manifest,
each answer a 4-byte length and a signature (empty: refused, with the reason on the signer's
stderr). Hand-written because it is this small: a library for a pipe between two processes we
start ourselves would be more code to read than the protocol.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import pwd
import signal
import stat
import struct
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import IO

from ringfence.bundlewire import BUNDLE_FORMAT, DELTA_FORMAT, MANIFEST_FORMAT, MAX_MANIFEST_BYTES
from ringfence.textsafe import escape_logs

DEFAULT_BUNDLE_TTL = 7 * 86400  # the control plane's default bundle_ttl (RINGFENCE_BUNDLE_TTL)
TTL_SLACK = 300  # between serve computing an expiry and the signer reading its clock

log = logging.getLogger("ringfence.signer")

_LEN = struct.Struct(">I")


class SignerError(RuntimeError):
    """The signer refused a request, would not start, or is gone."""


def unsafe_directory(
    d: Path, st: os.stat_result, *, sticky_ok: bool, owners: tuple[int, ...] = (0,), what: str = "the key"
) -> str | None:
    """Why another user could swap what ``d`` holds (``what``), or None: ``d`` must be owned by
    one of ``owners`` and writable by its owner only (or sticky, where ``sticky_ok``)."""
    if not stat.S_ISDIR(st.st_mode):
        return f"{d} is not a directory"
    writable = st.st_mode & (stat.S_IWGRP | stat.S_IWOTH)
    if st.st_uid not in owners or (writable and not (sticky_ok and st.st_mode & stat.S_ISVTX)):
        who, only = ("root", "root") if owners == (0,) else (" or ".join(f"uid {u}" for u in owners), "its owner")
        return (
            f"{d} must be owned by {who} and writable by {only} only "
            f"(owner uid {st.st_uid}, mode {stat.S_IMODE(st.st_mode):o}): another user could replace {what}"
        )
    return None


def path_problem(
    path: Path,
    owners: tuple[int, ...] = (0,),
    *,
    label: str = "signing key",
    what: str = "the key",
    check_self: bool = False,
    missing_ok: bool = False,
    follow_last: bool = True,
    sticky_parent_ok: bool = False,
) -> str | None:
    """Why a user other than ``owners`` could change what ``path`` names, or None: every directory
    above it, along the path as given and along the path it resolves to, must be owned by one of
    ``owners`` and writable by its owner only (or, above ``path``'s own directory, sticky as /tmp
    is: there another user cannot rename an entry not theirs; ``sticky_parent_ok``: its own
    directory too), and a link on the way must be one of ``owners``'. ``check_self``: a link at
    ``path`` itself must be theirs too (missing is fine where ``missing_ok``); ``follow_last=False``:
    a link at ``path`` is not followed for the resolved path (it is replaced, never written
    through). The one walk behind the signing key, ``--admin-tokens`` and ``--out`` paths."""
    given = Path(os.path.abspath(path))
    names = "root" if owners == (0,) else " or ".join(f"uid {u}" for u in owners)
    resolved = Path(os.path.realpath(given)) if follow_last else Path(os.path.realpath(given.parent)) / given.name
    for chain in (given, resolved):
        for d in [*reversed(chain.parents), *([chain] if check_self else [])]:
            try:
                ds = d.lstat()
            except FileNotFoundError:
                if d == chain and missing_ok:
                    continue
                return f"{label} {'' if d == chain else 'directory '}{d}: no such file or directory"
            except OSError as exc:
                return f"{label} {'' if d == chain else 'directory '}{d}: {exc.strerror}"
            if stat.S_ISLNK(ds.st_mode) and ds.st_uid in owners:
                continue  # theirs, in a directory already found safe; its target is on the resolved chain
            if stat.S_ISLNK(ds.st_mode):  # in a sticky directory: its owner may point it elsewhere
                return f"{label} path {d} is a link owned by uid {ds.st_uid}: it must be {names}'s"
            if d == chain:
                continue  # the file itself: checked on the descriptor it is opened as
            why = unsafe_directory(d, ds, sticky_ok=sticky_parent_ok or d != chain.parent, owners=owners, what=what)
            if why is not None:
                return f"{label} directory {why}"
    return None


def check_key_directories(path: Path, owners: tuple[int, ...] = (0,)) -> Path:
    """``path`` made absolute, once :func:`path_problem` finds nothing: every directory above it,
    along the path as given and along the path it resolves to, is owned by one of ``owners`` and
    writable by its owner only (or, above the key's own directory, sticky); a link on the way is
    one of ``owners``'. Else :class:`SignerError`: another user could swap the key, or point its
    name at another file."""
    why = path_problem(path, owners)
    if why is not None:
        raise SignerError(why)
    return Path(os.path.abspath(path))


def read_key_file(path: Path) -> bytes:
    """The key's bytes, refused if anyone but root could read or replace it: the file a regular
    file of mode 600 (or stricter) owned by root, its directory writable by root only, and every
    directory above owned by root and writable by root only, or sticky (as /tmp is: there another
    user cannot rename root's entry). Checked along the path as given (a symbolic link on the way
    is fine where root alone could change it) and along the path it resolves to, so a directory
    another user controls can redirect neither. The file is opened without following a symbolic
    link and checked on the descriptor it is read from, so nothing can be swapped in between."""
    given = check_key_directories(path)
    try:
        fd = os.open(given, os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC | os.O_NONBLOCK)
    except FileNotFoundError:
        raise SignerError(
            f"signing key {given}: no such file (make one with `ringfence keygen --out {given.parent}`)"
        ) from None
    except OSError as exc:  # ELOOP: the last component is a symbolic link
        raise SignerError(f"signing key {given}: {exc.strerror} (give the key file itself, not a link)") from None
    with os.fdopen(fd, "rb") as f:
        fs = os.fstat(f.fileno())
        if not stat.S_ISREG(fs.st_mode) or fs.st_uid != 0 or fs.st_mode & 0o077:
            raise SignerError(
                f"signing key {given} must be a regular file owned by root, mode 600 "
                f"(owner uid {fs.st_uid}, mode {stat.S_IMODE(fs.st_mode):o})"
            )
        return f.read()


# --- the signer (child) ----------------------------------------------------------------------------


def _read_exact(stream: IO[bytes], n: int) -> bytes | None:
    data = stream.read(n)
    return data if data is not None and len(data) == n else None


def _skip(stream: IO[bytes], n: int) -> bytes | None:
    """Read past ``n`` bytes in pieces, never holding them whole, so the next request is read from
    its start: b"" once done, None if the stream ended first."""
    while n and (piece := stream.read(min(n, 1 << 16))):
        n -= len(piece)
    return None if n else b""


def _refusal(message: bytes, key_id: str, max_ttl: int, now: float) -> str | None:
    """Why ``message`` is not a manifest of this key for a bundle or delta, or (a bundle) expires
    later than ``max_ttl`` seconds from ``now``; None: it may be signed."""
    head, sep, body = message.partition(b"\n")
    if not sep or head != MANIFEST_FORMAT.encode():
        return f"not a {MANIFEST_FORMAT} manifest"
    try:
        doc = json.loads(body)
    except (ValueError, RecursionError):  # nested past the recursion limit: refused, not fatal
        return "manifest body is not JSON"
    if not isinstance(doc, dict) or doc.get("key_id") != key_id:
        return f"manifest does not name this key ({key_id})"
    if doc.get("format") not in (BUNDLE_FORMAT, DELTA_FORMAT):
        return f"manifest of {doc.get('format')!r}: only bundles and deltas are signed"
    expires = doc.get("expires_at")
    if doc["format"] == BUNDLE_FORMAT and not (isinstance(expires, int) and expires <= now + max_ttl + TTL_SLACK):
        # a taken-over serving process must not stock up bundles valid for years
        return f"bundle expiry {expires!r} is more than {max_ttl} s (RINGFENCE_BUNDLE_TTL) away"
    return None


def serve_signatures(key_path: Path, stdin: IO[bytes], stdout: IO[bytes]) -> int:
    """The signer's loop (``python -m ringfence.local.signer_process KEY``): until stdin closes."""
    from ringfence.bundle import SigningKey

    try:
        key = SigningKey.from_pem_file(read_key_file(key_path), key_path)
    except Exception as exc:  # the parent shows it: this process has no one else to tell
        stdout.write(json.dumps({"error": str(exc)}).encode() + b"\n")
        stdout.flush()
        return 2
    stdout.write(json.dumps({"key_id": key.key_id, "public_pem": key.public_pem().decode()}).encode() + b"\n")
    stdout.flush()
    signed = 0
    max_ttl = int(os.environ.get("RINGFENCE_BUNDLE_TTL", str(DEFAULT_BUNDLE_TTL)))
    while (head := _read_exact(stdin, _LEN.size)) is not None:
        (n,) = _LEN.unpack(head)
        message = _read_exact(stdin, n) if n <= MAX_MANIFEST_BYTES else _skip(stdin, n)
        if message is None:
            break
        if n > MAX_MANIFEST_BYTES:
            why: str | None = f"a request of {n} bytes: manifests are at most {MAX_MANIFEST_BYTES}"
        else:
            why = _refusal(message, key.key_id, max_ttl, time.time())
        if why is not None:
            log.warning("signer: refused to sign: %s", why)
            stdout.write(_LEN.pack(0))
        else:
            signature = key.sign(message)
            signed += 1
            # %a: ids are the serving process's words; escaped, they cannot forge a log line
            log.info("signer: signed %a", message.partition(b"\n")[2].decode("utf-8", "replace"))
            stdout.write(_LEN.pack(len(signature)) + signature)
        stdout.flush()
    log.info("signer: the serving process closed the pipe after %s signature(s): exiting", signed)
    return 0


# --- the client (serve) ----------------------------------------------------------------------------


class SignerProcess:
    """A :class:`ringfence.bundlewire.Signer` whose key is held by a child process (the signer)."""

    alg = "ed25519"

    def __init__(self, proc: subprocess.Popen[bytes]) -> None:
        assert proc.stdin is not None and proc.stdout is not None
        self._proc = proc
        self._in, self._out = proc.stdin, proc.stdout
        self._lock = threading.Lock()
        hello = self._out.readline()
        try:
            info = json.loads(hello)
        except ValueError:
            info = {"error": f"the signer exited ({proc.wait(10)}) before it said which key it holds"}
        if "error" in info:
            self.close()
            raise SignerError(str(info["error"]))
        self._key_id: str = info["key_id"]
        self._public_pem: bytes = info["public_pem"].encode()

    @classmethod
    def spawn(cls, key_path: Path) -> SignerProcess:
        """Start the signer on ``key_path`` (it checks the file, then loads it): this process
        never reads the key."""
        # -I and cwd "/": root's Python must not import from where serve was started (the state
        # directory, a home, /tmp: places the user may write), nor from PYTHONPATH
        proc = subprocess.Popen(
            [sys.executable, "-I", "-m", "ringfence.local.signer_process", os.path.abspath(key_path)],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            close_fds=True,
            cwd="/",
        )
        return cls(proc)

    @property
    def key_id(self) -> str:
        return self._key_id

    def public_pem(self) -> bytes:
        return self._public_pem

    def sign(self, message: bytes) -> bytes:
        with self._lock:
            try:
                self._in.write(_LEN.pack(len(message)) + message)
                self._in.flush()
                head = _read_exact(self._out, _LEN.size)
                (n,) = _LEN.unpack(head) if head is not None else (None,)
                signature = _read_exact(self._out, n) if n else None
            except (BrokenPipeError, ValueError):
                head, signature = None, None
        if head is None:
            raise SignerError(f"the signer (pid {self._proc.pid}) is gone: nothing can be signed")
        if not signature:
            raise SignerError("the signer refused to sign (its log on serve's standard error says why)")
        return signature

    def close(self) -> None:
        """Close the pipe: the signer exits (this process may not signal it: it is root's)."""
        for stream in (self._in, self._out):
            with contextlib.suppress(OSError):  # already broken: the signer is gone
                stream.close()
        try:
            self._proc.wait(10)
        except subprocess.TimeoutExpired:
            log.warning("the signer (pid %s) did not exit after its pipe closed", self._proc.pid)


def service_user(name: str) -> pwd.struct_passwd:
    """The unprivileged user ``--user`` names."""
    try:
        pw = pwd.getpwnam(name)
    except KeyError:
        raise SignerError(f"--user {name}: no such user") from None
    if pw.pw_uid == 0:
        raise SignerError(f"--user {name}: is root; name the unprivileged user to answer requests as")
    return pw


def drop_privileges(pw: pwd.struct_passwd) -> None:
    """Become ``pw``'s user (its groups too) for good: root's uid, gids and capabilities are gone."""
    try:
        os.initgroups(pw.pw_name, pw.pw_gid)
        os.setgid(pw.pw_gid)
        os.setuid(pw.pw_uid)
    except PermissionError as exc:  # a capability bounding set without them (a unit's, a container's)
        raise SignerError(
            f"--user {pw.pw_name}: cannot switch to that user ({exc.strerror}): "
            "serve needs CAP_SETUID and CAP_SETGID for it"
        ) from None
    try:
        os.setuid(0)
    except PermissionError:
        return
    raise SignerError(f"--user {pw.pw_name}: root privileges could not be dropped")


def main(argv: list[str] | None = None) -> int:
    args = sys.argv[1:] if argv is None else argv
    if len(args) != 1:
        print("usage: python -m ringfence.local.signer_process KEY.pem", file=sys.stderr)
        return 2
    # Ctrl-C in serve's terminal reaches the whole process group: the signer outlives serve's own
    # shutdown (compute may still sign) and leaves when its pipe closes
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    escape_logs()  # what it signed names workloads: never a raw control character in the log
    return serve_signatures(Path(args[0]), sys.stdin.buffer, sys.stdout.buffer)


if __name__ == "__main__":
    raise SystemExit(main())
