"""Published documents as files: the on-premise counterpart of the S3 publisher.

Keys are relative paths under one directory (``<state>/objects``). Every file is written to a
temporary name, fsynced and renamed into place, so a reader (or a restart after ``kill -9``)
sees a whole document or none; bundle and delta keys are content-addressed, so a file is never
replaced by different bytes.

Any write that fails (any ``OSError``: a disk full, a directory restored as another user's, an
immutable one) is raised as :class:`~ringfence.store.failure.ObjectsUnwritable`, which ``serve``
counts as the state directory unavailable and answers 503, whatever its errno.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from pathlib import Path, PurePosixPath

from ringfence import durable
from ringfence.control.publish import Publisher
from ringfence.store.failure import ObjectsUnwritable


class BadKey(ValueError):
    """A key that cannot name a file under the publisher's directory."""


@contextlib.contextmanager
def _writing() -> Iterator[None]:
    """A failed write as ObjectsUnwritable: its errno and the system's text, not the path."""
    try:
        yield
    except ObjectsUnwritable:
        raise
    except OSError as exc:
        raise ObjectsUnwritable(exc.errno, exc.strerror or "cannot be written") from exc


class FilePublisher(Publisher):
    def __init__(self, root: Path, *, fsync: bool = True) -> None:
        super().__init__()
        self.root = root
        self.fsync = fsync
        root.mkdir(parents=True, exist_ok=True)

    def path(self, key: str) -> Path:
        """The file of ``key``; keys never leave the directory (ids come from agents and CMDBs)."""
        parts = PurePosixPath(key).parts
        if (
            not parts
            or key.startswith("/")
            or "\\" in key
            or "\0" in key
            or any(p in (".", "..") or p.startswith(".") for p in parts)
            or str(PurePosixPath(key)) != key  # `a//b`, `a/`: one file under two keys
        ):
            raise BadKey(f"{key!r} cannot be used as a published key")
        return self.root.joinpath(*parts)

    def _store(self, key: str, body: bytes, content_type: str) -> None:
        path = self.path(key)
        with _writing():
            path.parent.mkdir(parents=True, exist_ok=True)
            durable.replace(path, body, 0o600, sync=self.fsync)

    def _create(self, key: str, body: bytes, content_type: str) -> bool:
        path = self.path(key)
        with _writing():
            path.parent.mkdir(parents=True, exist_ok=True)
            return durable.create(path, body, 0o600)  # always synced: a link never replaces a file

    def get(self, key: str) -> bytes:
        return self.path(key).read_bytes()

    def delete(self, key: str) -> None:
        with _writing():
            self.path(key).unlink(missing_ok=True)
