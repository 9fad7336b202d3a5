"""What a SQLite store's failure means to ``ringfence serve``: the store is unavailable for now
(disk full, locked past the busy timeout, an I/O error, a read-only filesystem: the request may
succeed later) or damaged (SQLite found a malformed page, or the file is no database: nothing
read from it can be trusted until it is restored from a backup).

Each failure is named by the store's file name and SQLite's fixed text for its result code, never
by the error's own message (which can quote SQL, table or column names) nor by the directory.

Compute and the agent API's reports also write the published files (``objects/``) beside the
store: any write there that fails (a disk full, a quota, an I/O error, a read-only filesystem, a
directory restored as root under ``serve --user``, an immutable one: whatever the errno), raised in
a request, in compute's thread or one of its publish threads, is :class:`ObjectsUnwritable`, the
state directory unavailable too, counted and logged as ``objects/: <the system's text>``.
"""

from __future__ import annotations

import logging
import sqlite3
import threading
from collections.abc import Callable
from typing import Literal

from ringfence.store.base import no_metric

log = logging.getLogger("ringfence.store")

# the counters (GET /metrics under serve): a request or computation that met the failure
STORE_UNAVAILABLE = "StoreUnavailable"
STORE_DAMAGED = "StoreDamaged"

# SQLite's own text for each primary result code (sqlite3_errstr), by code
_REASONS = {
    3: "access permission denied",  # SQLITE_PERM
    5: "database is locked",  # SQLITE_BUSY
    6: "database table is locked",  # SQLITE_LOCKED
    8: "attempt to write a readonly database",  # SQLITE_READONLY
    10: "disk I/O error",  # SQLITE_IOERR
    11: "database disk image is malformed",  # SQLITE_CORRUPT
    13: "database or disk is full",  # SQLITE_FULL
    14: "unable to open database file",  # SQLITE_CANTOPEN
    15: "locking protocol",  # SQLITE_PROTOCOL
    26: "file is not a database",  # SQLITE_NOTADB
}
_DAMAGED = {11, 26}
PUBLISHED = "objects/"  # how a failure of the published files is named


class ObjectsUnwritable(OSError):
    """A write of the published files failed (:class:`ringfence.local.publish.FilePublisher`
    raises it from the ``OSError``, with its errno and the system's text, without the path): told
    apart by where it was met, not by its errno, so that no errno is left uncounted."""


Kind = Literal["unavailable", "damaged"]


def classify(exc: BaseException) -> tuple[Kind, str] | None:
    """``("damaged" | "unavailable", reason)`` for a store failure, None for anything else (an
    IntegrityError, a misuse: a bug, left to surface as one)."""
    if not isinstance(exc, sqlite3.DatabaseError):
        return None
    code = getattr(exc, "sqlite_errorcode", None)
    primary = code & 0xFF if isinstance(code, int) else None
    if primary in _DAMAGED:
        return "damaged", _REASONS[primary]
    if isinstance(exc, sqlite3.OperationalError):
        # known codes by SQLite's fixed text; any other by its code's name only
        name = getattr(exc, "sqlite_errorname", None) or "unknown"
        return "unavailable", _REASONS.get(primary, f"SQLite error {name}") if primary is not None else "SQLite error"
    return None


class StoreHealth:
    """One store's failures as ``serve`` met them: counted, logged, and the first sign of damage
    kept (``damaged``), after which serve answers no request from the store and compute stops."""

    def __init__(self, file: str, metric: Callable[[str, float], None] = no_metric) -> None:
        self.file = file  # the file's name only: it appears in answers
        self.metric = metric
        self.damaged: str | None = None  # "state.db: database disk image is malformed", once seen
        self._lock = threading.Lock()

    def failed(self, exc: BaseException, where: str) -> tuple[Kind, str] | None:
        """Record ``exc`` met by ``where`` (a request and what it was answered, compute): its kind
        and ``FILE: reason``, or None when it is no store failure. ``exc`` or what it was raised
        from or while handling (a failure met again while compute cleans up, say) counts: the
        first such failure in the chain."""
        seen: BaseException | None = exc
        for _ in range(8):  # chains are short; a cycle must not hang compute
            if seen is None:
                return None
            found = classify(seen)
            name = self.file
            if found is None and isinstance(seen, ObjectsUnwritable):
                found, name = ("unavailable", seen.strerror or "cannot be written"), PUBLISHED
            if found is not None:
                break
            seen = seen.__cause__ if seen.__cause__ is not None or seen.__suppress_context__ else seen.__context__
        else:
            return None
        kind, reason = found
        said = f"{name}: {reason}"
        if kind == "damaged":
            with self._lock:
                first = self.damaged is None
                if first:
                    self.damaged = said
            if first:
                log.error(
                    "%s (%s): the store is damaged; serve answers 503 to every request and computes nothing "
                    "until it is restored from a backup and restarted (docs/onprem.md)",
                    said,
                    where,
                )
            self.metric(STORE_DAMAGED, 1)
        else:
            log.error("%s (%s)", said, where)
            self.metric(STORE_UNAVAILABLE, 1)
        return kind, said
