"""Policy versions: draft files in git, numbered immutable active versions in a store.

``provision`` turns the draft into version N+1 with author, message and time; versions are
never rewritten (a revert provisions an old version's files as a new version). Every change is
appended to an audit log. :class:`PolicyVersion` is the one model of a version for every store:
the CLI's :class:`FileVersionStore` keeps the files inline (one JSON file per version), the
control-plane stores (:mod:`ringfence.store`) keep the files as published objects and the version
names their keys.
"""

from __future__ import annotations

import contextlib
import datetime as dt
import fcntl
import hashlib
import os
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

from pydantic import BaseModel, ConfigDict, Field, model_validator

from ringfence.audit import AuditHead, AuditRecord, seal


def now() -> str:
    return dt.datetime.now(dt.UTC).isoformat(timespec="seconds")


class PolicyVersion(BaseModel):
    """One provisioned, immutable policy version. The policy's files are either inline
    (``files``) or published objects (``keys``: the control plane's stores hold an index, the
    texts live with the bundles); :meth:`texts` gives them either way."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    number: int = Field(ge=1)
    author: str
    message: str = ""
    created_at: str = Field(default_factory=now)
    digest: str = Field(description="sha256 over the policy files (see digest_of)")
    files: dict[str, str] = Field(default_factory=dict, description="relative file name → YAML text")
    keys: dict[str, str] = Field(default_factory=dict, description="relative file name → published object key")

    @model_validator(mode="before")
    @classmethod
    def _earlier_control_plane_documents(cls, data: Any) -> Any:
        # the AWS control plane stored {version, keys, digest, created_by, comment} before the two
        # models became one: read those documents as the versions they are
        if isinstance(data, dict) and "version" in data and "number" not in data:
            data = dict(data)
            data["number"] = data.pop("version")
            data["author"] = data.pop("created_by", "") or "unknown"
            data["message"] = data.pop("comment", "")
            data.setdefault("created_at", "")
        return data

    @model_validator(mode="after")
    def _files_or_keys(self) -> PolicyVersion:
        if self.files and self.keys:
            raise ValueError("a policy version has its files inline or as published keys, not both")
        return self

    def texts(self, read: Callable[[str], bytes] | None = None) -> dict[str, str]:
        """File name → YAML text; ``read`` fetches a published object by key."""
        if not self.keys:
            return dict(self.files)
        if read is None:
            raise ValueError(f"policy version {self.number} is published: its files need a reader")
        return {name: read(key).decode() for name, key in self.keys.items()}


class VersionConflict(RuntimeError):
    """Someone else provisioned that number first; nothing was written."""


class VersionUnreadable(ValueError):
    """A version file that is no version (empty or torn: written by a release before versions were
    written atomically, or damaged on disk). The message names the file."""


class VersionStore(Protocol):
    def latest(self) -> PolicyVersion | None: ...

    def get(self, number: int) -> PolicyVersion: ...

    def versions(self) -> list[PolicyVersion]: ...

    def highest_number(self) -> int:
        """The highest number a version holds, readable or not (never given out again); 0: none."""
        ...

    def put(self, version: PolicyVersion) -> None:
        """Store a new version; raise :class:`VersionConflict` if the number exists."""
        ...

    def audit(self, record: AuditRecord) -> AuditRecord: ...

    def audit_log(self) -> list[AuditRecord]: ...

    def audit_head(self) -> AuditHead | None: ...


@dataclass(frozen=True)
class VersionScan:
    """Every version file of a :class:`FileVersionStore` read once (:meth:`FileVersionStore.scan`):
    a command reads the store once and passes this on instead of reading it again per question."""

    versions: list[PolicyVersion]  # the readable ones, oldest first
    unreadable: list[str]  # one message per file that does not read as a version, naming it

    @property
    def latest(self) -> PolicyVersion | None:
        """The newest readable version (:meth:`FileVersionStore.latest`)."""
        return self.versions[-1] if self.versions else None


def default_actor() -> str:
    return os.environ.get("RINGFENCE_ACTOR") or os.environ.get("USER") or "unknown"


class FileVersionStore:
    """``<dir>/versions/000001.json`` (created exclusively, read-only), ``<dir>/audit.jsonl`` (the
    hash chain, one record a line) and ``<dir>/audit.head`` (its head).

    A version is written to a temporary file, fsynced, and then linked to its number (a link never
    replaces: two provisioners of one number, one wins), and the directory is fsynced: a version
    file is there whole or not at all, whatever the disk or a kill does meanwhile. A file that does
    not read as a version (an empty or torn one left by an earlier release, or damage) is skipped
    and named by :meth:`scan`, never taken for the active version; its number is not reused.

    Writers of the chain take an exclusive ``flock`` on ``<dir>/audit.lock``, continue the chain
    from the file's last line, append (fsynced) and then replace the head file atomically. A crash
    between the two leaves the head one record behind, which ``audit verify`` reports; the next
    write continues from the file and brings the head up to date."""

    def __init__(self, root: Path) -> None:
        self.root = root
        self.dir = root / "versions"

    def _path(self, number: int) -> Path:
        return self.dir / f"{number:06d}.json"

    def _paths(self) -> list[Path]:
        if not self.dir.exists():
            return []
        return sorted(p for p in self.dir.glob("[0-9]*.json") if p.stem.isdigit())

    def _read(self, path: Path) -> PolicyVersion:
        from pydantic import ValidationError

        try:
            return PolicyVersion.model_validate_json(path.read_bytes())
        except ValidationError as exc:
            why = exc.errors()[0]["msg"] if exc.errors() else str(exc)
            empty = " (empty)" if path.stat().st_size == 0 else ""
            raise VersionUnreadable(f"{path}: not a policy version{empty}: {why}") from None

    def scan(self) -> VersionScan:
        """Every version file read once: the readable versions and the unreadable files named."""
        good, bad = [], []
        for p in self._paths():
            try:
                good.append(self._read(p))
            except VersionUnreadable as exc:
                bad.append(str(exc))
        return VersionScan(good, bad)

    def versions(self) -> list[PolicyVersion]:
        """Every readable version, oldest first (:meth:`scan` names the others)."""
        return self.scan().versions

    def highest_number(self) -> int:
        """The highest number a version file holds, readable or not (never given out again)."""
        paths = self._paths()
        return int(paths[-1].stem) if paths else 0

    def latest(self) -> PolicyVersion | None:
        """The newest readable version: an unreadable file is never the active version."""
        for p in reversed(self._paths()):
            try:
                return self._read(p)
            except VersionUnreadable:
                continue
        return None

    def get(self, number: int) -> PolicyVersion:
        path = self._path(number)
        if not path.exists():
            raise KeyError(f"no policy version {number} in {self.dir}")
        return self._read(path)

    def put(self, version: PolicyVersion) -> None:
        """Write ``version`` whole or not at all; :class:`VersionConflict` if its number exists.
        An ``OSError`` (a full disk) leaves nothing behind."""
        self.dir.mkdir(parents=True, exist_ok=True)
        path = self._path(version.number)
        if path.exists():
            raise VersionConflict(f"policy version {version.number} already exists")
        tmp = self.dir / f".{path.name}.{os.getpid()}.{os.urandom(4).hex()}.tmp"
        try:
            fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o444)
            with os.fdopen(fd, "wb") as f:
                f.write(version.model_dump_json(indent=1).encode())
                f.flush()
                os.fsync(f.fileno())
            try:
                os.link(tmp, path)  # exclusive: never replaces a version someone else wrote
            except FileExistsError:
                raise VersionConflict(f"policy version {version.number} already exists") from None
        finally:
            with contextlib.suppress(FileNotFoundError):
                os.unlink(tmp)
        dfd = os.open(self.dir, os.O_RDONLY | os.O_DIRECTORY)
        try:
            os.fsync(dfd)
        finally:
            os.close(dfd)

    @contextlib.contextmanager
    def _audit_lock(self) -> Iterator[None]:
        self.root.mkdir(parents=True, exist_ok=True)
        with (self.root / "audit.lock").open("a") as lock:
            fcntl.flock(lock, fcntl.LOCK_EX)
            try:
                yield
            finally:
                fcntl.flock(lock, fcntl.LOCK_UN)

    def _last_record(self, path: Path) -> AuditRecord | None:
        """The file's last line as a record, read from its end (the log is not read whole)."""
        if not path.exists():
            return None
        with path.open("rb") as f:
            size = f.seek(0, os.SEEK_END)
            step = 4096
            while True:
                start = max(0, size - step)
                f.seek(start)
                lines = f.read().splitlines()
                if start == 0 or len(lines) > 1:
                    break
                step *= 4
        last = next((ln for ln in reversed(lines) if ln.strip()), None)
        return AuditRecord.model_validate_json(last) if last else None

    def audit(self, record: AuditRecord) -> AuditRecord:
        """Append ``record`` (sealed) whole or not at all: should the append or the head's update
        fail (a full disk), the log is cut back to its length before and the error raised, so no
        torn line breaks the chain and the head still matches it."""
        path = self.root / "audit.jsonl"
        with self._audit_lock():
            last = self._last_record(path)
            sealed = seal(record, AuditHead(seq=last.seq, hash=last.hash) if last and last.hash else AuditHead())
            tmp = self.root / "audit.head.tmp"
            fd = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
            try:
                size = os.lseek(fd, 0, os.SEEK_END)
                try:
                    data = (sealed.model_dump_json() + "\n").encode()
                    while data:
                        data = data[os.write(fd, data) :]
                    os.fsync(fd)
                    tmp.write_text(AuditHead(seq=sealed.seq, hash=sealed.hash).model_dump_json())
                    os.replace(tmp, self.root / "audit.head")
                except BaseException:
                    with contextlib.suppress(OSError):
                        tmp.unlink(missing_ok=True)
                    with contextlib.suppress(OSError):
                        os.ftruncate(fd, size)
                        os.fsync(fd)
                    raise
            finally:
                os.close(fd)
        return sealed

    def audit_log(self) -> list[AuditRecord]:
        path = self.root / "audit.jsonl"
        if not path.exists():
            return []
        return [AuditRecord.model_validate_json(line) for line in path.read_text().splitlines() if line.strip()]

    def audit_head(self) -> AuditHead | None:
        path = self.root / "audit.head"
        return AuditHead.model_validate_json(path.read_text()) if path.exists() else None


def relative_files(sources: dict[str, str], base: Path) -> dict[str, str]:
    out = {}
    for name, text in sources.items():
        p = Path(name)
        try:
            out[str(p.resolve().relative_to(base.resolve()))] = text
        except ValueError:
            out[p.name] = text
    return out


def digest_of(files: dict[str, str]) -> str:
    """Content digest over relative file names and texts: the same policy anywhere, the same digest."""
    h = hashlib.sha256()
    for name in sorted(files):
        h.update(name.encode() + b"\0" + files[name].encode() + b"\0")
    return h.hexdigest()


def next_version(store: VersionStore, files: dict[str, str], author: str, message: str) -> PolicyVersion:
    return PolicyVersion(
        number=store.highest_number() + 1,  # past an unreadable version too: a number is never reused
        author=author,
        message=message,
        created_at=now(),
        digest=digest_of(files),
        files=files,
    )


def record_version(
    store: VersionStore,
    files: dict[str, str],
    author: str,
    message: str,
    action: str,
    detail: dict[str, object],
    warn: Callable[[str], None] | None = None,
    scan: VersionScan | None = None,
) -> PolicyVersion:
    """Append the audit record naming the next version (its number and digest), then store
    ``files`` as that version: a version is never written without its record (as the control
    plane's provision does).

    - the record cannot be appended (``OSError``): :class:`AuditNotWritten`, nothing written;
    - the version then cannot be written: :class:`VersionNotWritten`, after a second record,
      ``<action>.failed`` where the store shows the version file absent, ``<action>.abandoned``
      where someone else's version holds the number (a lost race, :class:`VersionConflict`),
      ``<action>.unconfirmed`` where the store cannot say; each names the first record's id;
    - the write raised but the store holds this very version: it stands with its record (true);
      ``warn`` is told why.

    ``scan``: the caller's read of the store (its active version is the record's ``before``),
    so that the store's versions are not read again."""
    before = scan.latest if scan is not None else store.latest()
    version = next_version(store, files, author, message)
    target = f"policy/{version.number}"
    record = AuditRecord(
        principal=author,
        action=action,
        target=target,
        reason=message,
        detail={"digest": version.digest, **detail},
        before=before.digest if before else "",
        after=version.digest,
    )
    try:
        store.audit(record)
    except OSError as exc:
        raise AuditNotWritten(version, exc) from exc
    try:
        store.put(version)
        return version
    except Exception as exc:
        why = f"{type(exc).__name__}: {exc}"
        cause = exc
    outcome = "abandoned" if isinstance(cause, VersionConflict) else _outcome(store, version)
    if outcome == "written":
        if warn is not None:
            warn(f"writing policy version {version.number} raised ({why}), but the store holds it: it is active")
        return version
    try:
        store.audit(
            AuditRecord(
                principal=author,
                action=f"{action}.{outcome}",
                target=target,
                reason=message,
                detail={"audit_id": record.id, "digest": version.digest, "why": why},
            )
        )
        followed = True
    except OSError:
        followed = False
    raise VersionNotWritten(version, record.id, outcome, followed, cause) from cause


def _outcome(store: VersionStore, version: PolicyVersion) -> str:
    """After ``put`` raised: ``written`` (the store holds this version), ``abandoned`` (another
    version holds its number), ``failed`` (no version holds it) or ``unconfirmed`` (cannot say)."""
    try:
        there = store.get(version.number)
    except KeyError:
        return "failed"
    except Exception:
        return "unconfirmed"
    return "written" if there == version else "abandoned"


class AuditNotWritten(RuntimeError):
    """The audit record of a version could not be appended: neither it nor the version was written."""

    def __init__(self, version: PolicyVersion, cause: OSError) -> None:
        super().__init__(f"the audit record of policy version {version.number} could not be written: {cause}")
        self.version = version
        self.cause = cause


class VersionNotWritten(RuntimeError):
    """The audit record naming a version was written, the version was not (or not surely:
    ``outcome`` ``unconfirmed``); ``followed`` says whether the ``<action>.<outcome>`` record
    saying so was written too."""

    def __init__(
        self, version: PolicyVersion, audit_id: str, outcome: str, followed: bool, cause: BaseException
    ) -> None:
        super().__init__(f"policy version {version.number} {outcome}: {cause}")
        self.version = version
        self.audit_id = audit_id
        self.outcome = outcome
        self.followed = followed
        self.cause = cause
