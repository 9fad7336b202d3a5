"""The state directory: last known good bundle, applied deltas, status, spool. Atomic writes only.

Layout::

    bundle.json     the last applied signed bundle (last known good)
    deltas.jsonl    journal of the signed set deltas applied on top of it, in order: a header line
                    naming the bundle, then one delta per line, appended and fsynced one by one
    status.json     applied revision, mode, last contact, counters, last error
    identity.json   the workload id this state belongs to
    token.json      enrollment token (0600)
    rejected/       an unusable last known good, set aside at start (with the reason)
    spool.jsonl     report records waiting for the control plane (bounded)
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import os
import stat
import tempfile
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

from ringfence.bundlewire import Bundle, BundleError, SetDelta, delta_from_json, load_bundle, load_delta, to_json

JOURNAL_FORMAT = "ringfence.delta-journal/v1"
DEFAULT_MAX_BUNDLE_BYTES = 16 * 1024 * 1024  # the configuration's max_bundle_bytes default
SMALL_DOC_BYTES = 1024 * 1024  # status.json, identity.json, token.json and the like


def read_regular(path: Path, limit: int, owner: int | None = None) -> bytes:
    """The bytes of a regular file of at most ``limit`` bytes, read without following a symlink
    and without blocking: a FIFO would hang the reader for good, a symlink to /dev/zero would
    grow it without bound. With ``owner``, only a file that uid owns. FileNotFoundError when
    absent; OSError or ValueError otherwise."""
    fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_CLOEXEC)
    try:
        st = os.fstat(fd)
        if not stat.S_ISREG(st.st_mode):
            raise ValueError(f"{path} is not a regular file (mode {stat.filemode(st.st_mode)})")
        if owner is not None and st.st_uid != owner:
            raise ValueError(f"{path} is owned by uid {st.st_uid}, not {owner}: not read")
        if st.st_size > limit:
            raise ValueError(f"{path} holds {st.st_size} bytes, more than the {limit} allowed")
        chunks: list[bytes] = []
        left = limit + 1
        while left > 0 and (chunk := os.read(fd, min(left, 1 << 20))):
            chunks.append(chunk)
            left -= len(chunk)
        data = b"".join(chunks)
        if len(data) > limit:
            raise ValueError(f"{path} grew past the {limit} bytes allowed while read")
        return data
    finally:
        os.close(fd)


def regular_fd(path: Path, flags: int, mode: int = 0o600) -> int:
    """``path`` opened with ``flags``, never through a symlink nor blocking on a FIFO, and only a
    regular file (OSError otherwise): what the state directory's writers open by name."""
    fd = os.open(path, flags | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_CLOEXEC, mode)
    st = os.fstat(fd)
    if not stat.S_ISREG(st.st_mode):
        os.close(fd)
        raise OSError(f"{path} is not a regular file (mode {stat.filemode(st.st_mode)})")
    return fd


def atomic_write(path: Path, data: str | bytes, mode: int = 0o600, durable: bool = True) -> None:
    """Write to a temporary file in the same directory, fsync, rename over, fsync the directory.
    ``durable=False`` skips the fsyncs (still atomic; may be lost in a power cut): for status."""
    with _staged(path, data, mode, durable) as tmp:
        os.replace(tmp, path)
    if durable:
        _fsync_directory(path.parent)


def atomic_create(path: Path, data: str | bytes, mode: int = 0o600) -> bool:
    """As :func:`atomic_write` (durable), but only where no file is: linked, not renamed, so it
    never replaces one. False, and nothing written, when ``path`` exists (whoever made it)."""
    with _staged(path, data, mode, True) as tmp:
        try:
            os.link(tmp, path)
        except FileExistsError:
            return False
    _fsync_directory(path.parent)
    return True


@contextlib.contextmanager
def _staged(path: Path, data: str | bytes, mode: int, durable: bool) -> Iterator[str]:
    """A temporary file beside ``path`` holding ``data`` (fsynced if ``durable``), removed on
    leaving unless it was renamed into place."""
    path.parent.mkdir(parents=True, exist_ok=True)
    raw = data.encode() if isinstance(data, str) else data
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as f:
            # the file this process made, by its descriptor: the name may be another file by now
            os.fchmod(f.fileno(), mode)
            f.write(raw)
            f.flush()
            if durable:
                os.fsync(f.fileno())
        yield tmp
    finally:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)


def _fsync_directory(directory: Path) -> None:
    """The directory's entries (a rename, a link) survive a power cut once this returns."""
    dfd = os.open(directory, os.O_RDONLY)
    try:
        os.fsync(dfd)
    finally:
        os.close(dfd)


def _delta_line(d: SetDelta) -> bytes:
    return json.dumps(to_json(d), sort_keys=True, separators=(",", ":")).encode() + b"\n"


_HELD: dict[str, int] = {}  # state directories this process holds the lock of


class StateLocked(RuntimeError):
    """Another ringfence-agent process owns this state directory."""


class RootRefused(PermissionError):
    """Root in a state directory another user owns (or a link): refused."""


class StateUnreadable(PermissionError):
    """Files in the state directory the agent may not read because of their owner or mode (root's
    0600, left by ``ringfence-agent`` run as root on a non-root agent's state): not corruption.
    Nothing is set aside or replaced; the agent refuses to start, the kernel keeps its rules."""


def owner_name(uid: int, gid: int) -> str:
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
    return f"{user}:{group}"


class StateDir:
    def __init__(self, path: Path, max_bundle_bytes: int = DEFAULT_MAX_BUNDLE_BYTES) -> None:
        self.path = path
        self.max_bundle_bytes = max_bundle_bytes
        # what this process knows the journal on disk holds: (header, deltas, valid bytes)
        self._journal: tuple[bytes, int, int] | None = None
        # status.json is best effort (a full or read-only filesystem must not stop enforcement):
        # failed writes are counted here, and the first of a run is told to ``on_status_error``
        self.status_write_failures = 0
        self._status_failing = False
        self.on_status_error: Callable[[str], None] | None = None

    def ensure(self) -> None:
        try:
            self.path.mkdir(parents=True, exist_ok=True, mode=0o700)
        except OSError:
            if not self.path.is_dir():
                raise  # a read-only filesystem still holds the directory: reading it goes on
        self.not_as_root_in_anothers()

    def not_as_root_in_anothers(self) -> None:
        """The last guard (security review r15): root does no work in a directory another user
        owns, whatever path led here (the CLI runs such commands as the owner: asowner.py)."""
        if os.geteuid() != 0:
            return
        try:
            st = os.lstat(self.path)
        except FileNotFoundError:
            return  # nothing there to work in
        if stat.S_ISLNK(st.st_mode) or st.st_uid != 0:
            raise RootRefused(
                f"refused as root: the state directory {self.path} is "
                + ("a symbolic link" if stat.S_ISLNK(st.st_mode) else f"owned by uid {st.st_uid}, not root")
                + ": root does no file work there; run this as its owner"
            )

    def lock(self) -> None:
        """Exclusive, non-blocking, for the life of the process (released by the kernel on exit,
        even on SIGKILL): one daemon per state directory, and no CLI apply behind its back."""
        self.ensure()
        key = str(self.path.resolve())
        if key in _HELD:  # this process already owns it
            return
        try:
            fd = regular_fd(self.path / ".lock", os.O_RDWR | os.O_CREAT)
        except OSError:
            # a read-only (or full) filesystem: flock needs no write access, so the lock file
            # read-only, else the directory itself (the daemon must still start and enforce)
            try:
                fd = regular_fd(self.path / ".lock", os.O_RDONLY)
            except OSError:
                fd = os.open(self.path, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            os.close(fd)
            holder = self.read_json("status.json").get("daemon", {}) or {}
            raise StateLocked(
                f"{self.path} is in use by another ringfence-agent (pid {holder.get('pid', '?')}); "
                "stop it or use another --state-dir"
            ) from None
        _HELD[key] = fd

    def unreadable(self) -> str | None:
        """Why the agent could not read its state (None: it can): the files and directories in
        the state directory it may not read because of their owner or mode, with the fix, found
        by trying as this process. Root reads its own state directory whatever the modes, and
        does no work in another user's (the CLI runs as the owner there; ``not_as_root_in_anothers``)."""
        try:
            top = os.stat(self.path)
        except FileNotFoundError:
            return None
        uid, gid = os.geteuid(), os.getegid()
        if uid == 0:
            return None
        bad: list[tuple[Path, os.stat_result]] = []
        try:
            entries = list(os.scandir(self.path))
        except PermissionError:
            entries = []
            bad.append((self.path, top))
        for entry in entries:
            path = Path(entry.path)
            try:
                st = entry.stat(follow_symlinks=False)
                if stat.S_ISDIR(st.st_mode):
                    want = os.R_OK | os.X_OK
                elif stat.S_ISREG(st.st_mode):
                    want = os.R_OK
                else:
                    continue  # a link or a FIFO is no file of the agent's: reading it refuses it anyway
                if want == os.R_OK:
                    with contextlib.suppress(FileNotFoundError):
                        os.close(os.open(path, os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_CLOEXEC))
                    ok = True
                else:
                    ok = os.access(path, want, effective_ids=True)
            except PermissionError:
                ok = False
            except FileNotFoundError:
                continue
            if not ok:
                bad.append((path, st))
        if not bad:
            return None
        who = owner_name(uid, gid)
        files = "; ".join(
            f"{p} (owner {owner_name(st.st_uid, st.st_gid)}, mode {stat.filemode(st.st_mode)})" for p, st in bad
        )
        return (
            f"the agent (running as {who}) cannot read its state: {files}. Left by ringfence-agent run as root? "
            f"Not corruption: nothing was set aside and the kernel's rules are left as they are. "
            f"Fix: chown -R {who} {self.path}"
        )

    def check_access(self) -> None:
        """Raise :class:`StateUnreadable` when :meth:`unreadable` says why."""
        why = self.unreadable()
        if why is not None:
            raise StateUnreadable(why)

    # --- last known good ---------------------------------------------------------------------

    @property
    def bundle_path(self) -> Path:
        return self.path / "bundle.json"

    def load_bundle(self) -> Bundle | None:
        try:
            raw = read_regular(self.bundle_path, self.max_bundle_bytes)
        except FileNotFoundError:
            return None
        return load_bundle(raw)

    @property
    def max_journal_bytes(self) -> int:
        # deltas pile up until the next whole bundle: room for several bundles' worth of them
        return 4 * self.max_bundle_bytes

    @property
    def journal_path(self) -> Path:
        return self.path / "deltas.jsonl"

    @staticmethod
    def _journal_header(bundle: Bundle) -> bytes:
        # the signature names the bundle: a journal left behind by an earlier bundle is never
        # replayed onto a newer one (save_applied writes the bundle first, then the journal)
        sig = bundle.signature.value if bundle.signature is not None else None
        head = {"format": JOURNAL_FORMAT, "bundle_version": bundle.version, "bundle_signature": sig}
        return json.dumps(head, sort_keys=True, separators=(",", ":")).encode() + b"\n"

    def load_deltas(self, bundle: Bundle | None = None) -> list[SetDelta]:
        """The deltas applied on top of ``bundle`` (default: the saved one), in order.

        A journal that names another bundle is ignored; a torn last line (crash while appending)
        ends the chain there and is overwritten by the next append."""
        bundle = bundle if bundle is not None else self.load_bundle()
        self._journal = None
        try:
            raw = read_regular(self.journal_path, self.max_journal_bytes)
        except FileNotFoundError:
            return self._load_legacy_deltas()
        if bundle is None:
            return []
        head = self._journal_header(bundle)
        if not raw.startswith(head):
            return []
        deltas: list[SetDelta] = []
        end = len(head)
        while (nl := raw.find(b"\n", end)) != -1:
            try:
                deltas.append(load_delta(raw[end:nl]))
            except BundleError:
                break
            end = nl + 1
        self._journal = (head, len(deltas), end)
        return deltas

    def _load_legacy_deltas(self) -> list[SetDelta]:
        """``deltas.json`` (a JSON list), written by agents before the journal; replaced on the next write."""
        try:
            raw = json.loads(read_regular(self.path / "deltas.json", self.max_journal_bytes))
        except FileNotFoundError:
            return []
        return [delta_from_json(d) for d in raw]

    def save_applied(self, bundle: Bundle, deltas: list[SetDelta]) -> None:
        """The bundle first, then its journal: a crash in between leaves the new bundle with a
        journal naming the old one, which is ignored — exactly the firewall just applied."""
        self.ensure()
        # compact JSON (the C encoder): a 100,000-element bundle saves in ~50 ms, not ~200 ms indented
        atomic_write(self.bundle_path, json.dumps(to_json(bundle), sort_keys=True))
        self.save_deltas(bundle, deltas)

    def save_deltas(self, bundle: Bundle, deltas: list[SetDelta]) -> None:
        """Rewrite the journal of ``bundle`` with exactly ``deltas`` (atomic, durable)."""
        self.ensure()
        head = self._journal_header(bundle)
        data = head + b"".join(_delta_line(d) for d in deltas)
        atomic_write(self.journal_path, data)
        self._journal = (head, len(deltas), len(data))
        with contextlib.suppress(FileNotFoundError):
            (self.path / "deltas.json").unlink()

    def append_delta(self, bundle: Bundle, deltas: list[SetDelta]) -> None:
        """Record that ``deltas[-1]`` was applied on top of ``bundle`` and ``deltas[:-1]``.

        One positioned write and one fdatasync of the journal when it already holds
        ``deltas[:-1]``; otherwise (first delta after a legacy state) the journal is rewritten."""
        head = self._journal_header(bundle)
        if self._journal is None or self._journal[:2] != (head, len(deltas) - 1):
            self.save_deltas(bundle, deltas)
            return
        line = _delta_line(deltas[-1])
        end = self._journal[2]
        fd = regular_fd(self.journal_path, os.O_WRONLY)
        try:
            if os.fstat(fd).st_size > end:  # a torn tail left by a crash while appending
                os.ftruncate(fd, end)
            written = os.pwrite(fd, line, end)
            if written != len(line):
                raise OSError(f"short write to {self.journal_path} ({written} of {len(line)} bytes)")
            os.fdatasync(fd)  # the file exists: its directory entry is already durable
        except BaseException:
            # the caller takes the change back out of the firewall: take it out of the journal too
            with contextlib.suppress(OSError):
                os.ftruncate(fd, end)
            self._journal = None  # unsure what is on disk: the next write rewrites the whole journal
            raise
        finally:
            os.close(fd)
        self._journal = (head, len(deltas), end + len(line))

    def set_aside(self, reason: str) -> Path | None:
        """Move an unusable last known good (bundle and journals) to ``rejected/<time>-…`` with the
        reason next to it: kept for inspection, never read again. None when there was nothing."""
        names = [n for n in ("bundle.json", "deltas.jsonl", "deltas.json") if os.path.lexists(self.path / n)]
        self._journal = None
        if not names:
            return None
        stamp = time.strftime("%Y%m%dT%H%M%SZ", time.gmtime()) + f"-{os.getpid()}"
        where = self.path / "rejected"
        where.mkdir(mode=0o700, exist_ok=True)
        # moved into rejected/ itself, never where a link of that name points
        dfd = os.open(where, os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC)
        try:
            for n in names:
                os.replace(self.path / n, f"{stamp}-{n}", dst_dir_fd=dfd)
        finally:
            os.close(dfd)
        atomic_write(where / f"{stamp}-reason.txt", reason + "\n", mode=0o644)
        return where / f"{stamp}-bundle.json"

    def clear_applied(self) -> None:
        self._journal = None
        for name in ("bundle.json", "deltas.jsonl", "deltas.json"):
            with contextlib.suppress(FileNotFoundError):
                (self.path / name).unlink()

    # --- small JSON documents ----------------------------------------------------------------

    def read_json(self, name: str) -> dict[str, Any]:
        """A small JSON document; {} when absent or unusable (not JSON, not a regular file, too large)."""
        try:
            data = json.loads(read_regular(self.path / name, SMALL_DOC_BYTES))
        except FileNotFoundError:
            return {}
        except (OSError, ValueError):  # json.JSONDecodeError and UnicodeDecodeError are ValueErrors
            return {}
        return data if isinstance(data, dict) else {}

    def write_json(self, name: str, data: dict[str, Any], durable: bool = True) -> None:
        self.ensure()
        atomic_write(self.path / name, json.dumps(data, indent=1, sort_keys=True) + "\n", durable=durable)

    def identity(self) -> str | None:
        wid = self.read_json("identity.json").get("workload_id")
        return wid if isinstance(wid, str) else None

    def set_identity(self, workload_id: str) -> None:
        self.write_json("identity.json", {"workload_id": workload_id})

    def update_status(self, **fields: Any) -> dict[str, Any]:
        """Best effort: status.json describes the agent, it is not the firewall. A write that fails
        (a full or read-only filesystem) is counted in ``status_write_failures`` and the first
        of a series told to ``on_status_error``; it never raises."""
        status = self.read_json("status.json")
        counters = status.setdefault("counters", {})
        for key, value in fields.items():
            if key == "incr":
                for name, n in value.items():
                    counters[name] = int(counters.get(name, 0)) + int(n)
            else:
                status[key] = value
        try:
            self.write_json("status.json", status, durable=False)
        except OSError as exc:
            self.status_write_failures += 1
            if not self._status_failing and self.on_status_error is not None:
                self.on_status_error(f"status not written to {self.path / 'status.json'} (still enforcing): {exc}")
            self._status_failing = True
        else:
            self._status_failing = False
        return status
