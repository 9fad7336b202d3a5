"""SQLite implementation of :class:`ringfence.store.base.Store`: the control plane's state in one
file, for ``ringfence serve`` on premise.

The semantics are DynamoStore's, held to the same contract test (``tests/aws/test_store.py``):
cloud fields never overwritten by an older observation, an optimistic-concurrency engine head,
bundle pointers that never go backwards, single-use nonces and claims, expiring tokens, pairing
keys bound to one workload with a use limit and an expiry, and an append-only audit log (enforced
by triggers, not only by this code).

Durability and concurrency:

* WAL journal: readers never block the writer and a crash (``kill -9``) leaves the last committed
  transaction intact; the file is consistent at every commit.
* ``synchronous=FULL`` by default: every commit is fsynced to the WAL before it is acknowledged,
  so an acknowledged single-use (a burnt nonce, a spent pairing key), a token or an audit record
  also survives power loss or an OS crash. ``NORMAL`` would survive process crashes only and may
  roll back the last commits on power loss, which could make a spent key usable again. The cost is
  one fsync per write at control-plane write rates (enrollments, operator actions, compute
  batches), which is small.
* One connection per thread (sqlite3 connections are not shared between threads) and every
  read-modify-write in a ``BEGIN IMMEDIATE`` transaction, which takes SQLite's write lock first:
  conditions are checked and written atomically across threads *and* processes sharing the file.
  ``busy_timeout`` makes a writer of another process wait instead of failing; writers of this
  process queue on a lock first (SQLite's busy handler sleeps in growing steps, which lets one busy
  thread starve another).
"""

from __future__ import annotations

import contextlib
import json
import os
import sqlite3
import threading
import time
import uuid
import weakref
from collections.abc import Callable, Iterator, Mapping
from pathlib import Path
from typing import Any, Literal, cast

from ringfence.audit import seal
from ringfence.flows.aggregate import FlowRow, day_of
from ringfence.flows.resolve import AddressOwner
from ringfence.model import Mode, Workload
from ringfence.store.base import (
    ACTIVE_STATES,
    COMPLETING,
    HOLD_CLAIM_STALE,
    HOLD_FIRST_WINS,
    HOLD_TTL,
    MOVED_TTL,
    OWED_NONCE_MAX,
    UNREAD,
    AddressTaken,
    AgentKeyReset,
    AuditedChange,
    AuditHead,
    AuditRecord,
    AuditRecordExists,
    BundlePointer,
    ChangeFailed,
    ConflictError,
    DeltaPointer,
    EnforcementReport,
    EngineHead,
    GovernanceMoved,
    Grant,
    InventoryRecord,
    LaunchHold,
    MovedRecord,
    NotTheNamedKey,
    OldHostRetirement,
    OtherAccount,
    OwedMark,
    PolicyVersion,
    Unread,
    agent_key_fingerprint_of,
    check_as_read,
    check_hold_fields,
    check_names_its_key,
    check_read,
    check_registration_as_read,
    check_tombstone,
    names_its_key,
    next_governed_rev,
    no_metric,
    other_account,
    owed_key,
    token_key_holds,
)

_UNSET: Any = object()
DELTA_TTL = 14 * 86400
CONNECTION_TTL = 2 * 3600
# how often a store clears the claims of every key that expired (claim_once): the table holds one
# row per finding counted, refresh and GCP identity token spent, so a scan at most this often
CLAIM_PRUNE_EVERY = 3600.0
# 2: inventory.governed_rev; 3: token.agent_key; 4: inventory.label_writes; 5: quarantine (an older
# release, which would not read it, refuses the file); 6: owed_compute.okey (an older release would
# write marks without it)
SCHEMA_VERSION = 6
# the engine head, with EngineHead.rebuilt_from kept in meta (put_head)
_HEAD = (
    "SELECT revision, policy_version, clean, (SELECT value FROM meta WHERE key = 'head.rebuilt_from') "
    "FROM head WHERE id = 1"
)

_SCHEMA = """
CREATE TABLE IF NOT EXISTS inventory (
    id TEXT PRIMARY KEY,
    workload TEXT NOT NULL,
    state TEXT NOT NULL,
    observed_at REAL NOT NULL,
    tag_version INTEGER,
    labels TEXT NOT NULL DEFAULT '{}',
    problems TEXT NOT NULL DEFAULT '[]',
    op_mode TEXT,
    op_quarantined INTEGER NOT NULL DEFAULT 0,
    enrolled INTEGER NOT NULL DEFAULT 0,
    last_heartbeat REAL,
    offline INTEGER NOT NULL DEFAULT 0,
    governed_rev INTEGER NOT NULL DEFAULT 0,
    label_writes TEXT
);
-- inventory_generation(): moved by triggers, so that every write path counts, in its own
-- transaction (additive: version-2 readers without it are unaffected)
CREATE TABLE IF NOT EXISTS inventory_gen (id INTEGER PRIMARY KEY CHECK (id = 1), gen INTEGER NOT NULL);
INSERT OR IGNORE INTO inventory_gen VALUES (1, 0);
CREATE TRIGGER IF NOT EXISTS inventory_gen_insert AFTER INSERT ON inventory
BEGIN UPDATE inventory_gen SET gen = gen + 1; END;
CREATE TRIGGER IF NOT EXISTS inventory_gen_delete AFTER DELETE ON inventory
BEGIN UPDATE inventory_gen SET gen = gen + 1; END;
-- offline counts (it decides InventoryRecord.active); heartbeats and enrollment do not. Dropped
-- and made again at every open, so a file whose trigger an earlier release made gets this one
-- (only a trigger changed: no schema version, and older readers are unaffected)
DROP TRIGGER IF EXISTS inventory_gen_update;
CREATE TRIGGER inventory_gen_update AFTER UPDATE OF workload, state, op_mode, op_quarantined, offline ON inventory
WHEN OLD.workload IS NOT NEW.workload OR OLD.state IS NOT NEW.state
  OR OLD.op_mode IS NOT NEW.op_mode OR OLD.op_quarantined IS NOT NEW.op_quarantined
  OR OLD.offline IS NOT NEW.offline
BEGIN UPDATE inventory_gen SET gen = gen + 1; END;
-- a workload's quarantine (SqliteStore.set_operator), as DynamoStore's quarantine item: a record is
-- quarantined while its row is here or its op_quarantined says so (set before the table existed)
CREATE TABLE IF NOT EXISTS quarantine (workload_id TEXT PRIMARY KEY);
CREATE TRIGGER IF NOT EXISTS quarantine_gen_insert AFTER INSERT ON quarantine
BEGIN UPDATE inventory_gen SET gen = gen + 1; END;
CREATE TRIGGER IF NOT EXISTS quarantine_gen_delete AFTER DELETE ON quarantine
BEGIN UPDATE inventory_gen SET gen = gen + 1; END;
CREATE TABLE IF NOT EXISTS head (
    id INTEGER PRIMARY KEY CHECK (id = 1),
    revision INTEGER NOT NULL,
    policy_version INTEGER NOT NULL,
    clean INTEGER NOT NULL
);
CREATE TABLE IF NOT EXISTS policy (number INTEGER PRIMARY KEY, doc TEXT NOT NULL);
CREATE TABLE IF NOT EXISTS meta (key TEXT PRIMARY KEY, value TEXT NOT NULL);
CREATE TABLE IF NOT EXISTS bundle (workload_id TEXT PRIMARY KEY, version INTEGER NOT NULL, doc TEXT NOT NULL);
-- compute's mark: the highest bundle version it handed on for publication (Store.mark_bundle_pending);
-- a table of its own, so that a file of an earlier release gains it without a schema version
CREATE TABLE IF NOT EXISTS bundle_pending (workload_id TEXT PRIMARY KEY, version INTEGER NOT NULL);
CREATE TABLE IF NOT EXISTS set_head (name TEXT PRIMARY KEY, version INTEGER NOT NULL);
CREATE TABLE IF NOT EXISTS set_digest (name TEXT PRIMARY KEY, version INTEGER NOT NULL, digest TEXT NOT NULL);
CREATE TABLE IF NOT EXISTS published (count INTEGER PRIMARY KEY, doc TEXT NOT NULL, expires REAL NOT NULL);
CREATE TABLE IF NOT EXISTS delta (
    set_name TEXT NOT NULL,
    to_version INTEGER NOT NULL,
    doc TEXT NOT NULL,
    expires REAL NOT NULL,
    PRIMARY KEY (set_name, to_version)
);
CREATE TABLE IF NOT EXISTS moved (revision INTEGER PRIMARY KEY, doc TEXT NOT NULL, expires REAL NOT NULL);
CREATE TABLE IF NOT EXISTS nonce (nonce TEXT PRIMARY KEY, expires REAL NOT NULL);
CREATE INDEX IF NOT EXISTS nonce_expires ON nonce (expires);
CREATE TABLE IF NOT EXISTS claim (key TEXT PRIMARY KEY, expires REAL NOT NULL);
-- workloads compute is owed (owe_compute): a hand-off that failed after its change was stored; the
-- scheduled passes drain them (additive: readers without it are unaffected). okey: the mark's
-- owed_key (a slot hashed from the id, then the id), in whose order a drain reads a bounded part
-- from a random slot round, through its index (schema 6; '' a mark written without it: read first
-- of the keys before any start)
CREATE TABLE IF NOT EXISTS owed_compute (
    workload_id TEXT PRIMARY KEY, urgent INTEGER NOT NULL, nonce TEXT NOT NULL, okey TEXT NOT NULL DEFAULT ''
);
CREATE INDEX IF NOT EXISTS owed_compute_okey ON owed_compute (okey);
-- agent_key: the id of the agent key the token was issued under ('' none; NULL before version 3)
CREATE TABLE IF NOT EXISTS token (
    hash TEXT PRIMARY KEY, workload_id TEXT NOT NULL, expires REAL NOT NULL, agent_key TEXT
);
CREATE INDEX IF NOT EXISTS token_workload ON token (workload_id);
CREATE TABLE IF NOT EXISTS agent_key (workload_id TEXT PRIMARY KEY, public_key TEXT NOT NULL);
-- the only agent key (its id) an operator's reset lets bind next (additive: older readers ignore it)
CREATE TABLE IF NOT EXISTS next_agent_key (workload_id TEXT PRIMARY KEY, key_id TEXT NOT NULL);
CREATE TABLE IF NOT EXISTS pairing (
    hash TEXT PRIMARY KEY,
    workload_id TEXT NOT NULL,
    uses INTEGER NOT NULL,
    expires REAL NOT NULL
);
CREATE INDEX IF NOT EXISTS pairing_workload ON pairing (workload_id);
CREATE TABLE IF NOT EXISTS connection (workload_id TEXT PRIMARY KEY, connection_id TEXT NOT NULL, expires REAL NOT NULL);
CREATE TABLE IF NOT EXISTS enforcement (workload_id TEXT PRIMARY KEY, doc TEXT NOT NULL);
CREATE TABLE IF NOT EXISTS launch_hold (instance_id TEXT PRIMARY KEY, doc TEXT NOT NULL, expires REAL NOT NULL);
CREATE TABLE IF NOT EXISTS audit (
    seq INTEGER PRIMARY KEY AUTOINCREMENT,
    id TEXT NOT NULL UNIQUE,
    time REAL NOT NULL,
    doc TEXT NOT NULL
);
CREATE TABLE IF NOT EXISTS audit_head (
    id INTEGER PRIMARY KEY CHECK (id = 1),
    seq INTEGER NOT NULL,
    hash TEXT NOT NULL
);
CREATE TABLE IF NOT EXISTS flow_row (
    day TEXT NOT NULL,
    key TEXT NOT NULL,
    doc TEXT NOT NULL,
    expires REAL NOT NULL,
    PRIMARY KEY (day, key)
);
CREATE INDEX IF NOT EXISTS flow_row_expires ON flow_row (expires);
CREATE TABLE IF NOT EXISTS flow_reporter_key (
    reporter TEXT NOT NULL,
    period TEXT NOT NULL,
    key TEXT NOT NULL,
    expires REAL NOT NULL,
    PRIMARY KEY (reporter, period, key)
);
CREATE TABLE IF NOT EXISTS address_owner (
    address TEXT NOT NULL,
    since REAL NOT NULL,
    doc TEXT NOT NULL,
    PRIMARY KEY (address, since)
);
CREATE TRIGGER IF NOT EXISTS audit_no_update BEFORE UPDATE ON audit
BEGIN SELECT RAISE(ABORT, 'the audit log is append-only'); END;
CREATE TRIGGER IF NOT EXISTS audit_no_delete BEFORE DELETE ON audit
BEGIN SELECT RAISE(ABORT, 'the audit log is append-only'); END;
"""


def _statements(script: str) -> list[str]:
    """``script``'s statements, one each (a trigger's body with its own semicolons is one; two
    statements on one line are two)."""
    out: list[str] = []
    pending = ""
    parts = script.split(";")
    for i, part in enumerate(parts):
        pending += part if i == len(parts) - 1 else part + ";"
        if sqlite3.complete_statement(pending):
            out.append(pending.strip())
            pending = ""
    if pending.strip() and not all(ln.strip().startswith("--") for ln in pending.splitlines() if ln.strip()):
        raise ValueError(f"an incomplete statement at the end of the schema: {pending.strip()[:80]!r}")
    return out


# executed one by one in _make_schema's transaction (executescript would commit it first)
_SCHEMA_STATEMENTS = _statements(_SCHEMA)

# quarantined: the quarantine row, or the record's own mark (a file quarantined before the table)
_SELECT_ONE = (
    "SELECT id, workload, state, observed_at, tag_version, labels, problems, op_mode, "
    "op_quarantined OR EXISTS (SELECT 1 FROM quarantine q WHERE q.workload_id = inventory.id), "
    "enrolled, last_heartbeat, offline, governed_rev, label_writes FROM inventory WHERE id = ?"
)
_SELECT_MANY = (
    "SELECT id, workload, state, observed_at, tag_version, labels, problems, op_mode, "
    "op_quarantined OR EXISTS (SELECT 1 FROM quarantine q WHERE q.workload_id = inventory.id), "
    "enrolled, last_heartbeat, offline, governed_rev, label_writes FROM inventory "
    "WHERE id IN (SELECT value FROM json_each(?))"
)
_SELECT_ALL = (
    "SELECT id, workload, state, observed_at, tag_version, labels, problems, op_mode, "
    "op_quarantined OR EXISTS (SELECT 1 FROM quarantine q WHERE q.workload_id = inventory.id), "
    "enrolled, last_heartbeat, offline, governed_rev, label_writes FROM inventory ORDER BY id"
)
# what check_as_read compares: the governance version, the state and the registration's observation
_SELECT_AS_READ = "SELECT governed_rev, state, observed_at FROM inventory WHERE id = ?"


def _as_read_row(row: tuple[Any, ...]) -> tuple[int, str, float]:
    return int(row[0]), str(row[1]), float(row[2])


# one statement per operator/liveness field: no statement is assembled from parts
_UPDATES = {
    "op_mode": "UPDATE inventory SET op_mode = ? WHERE id = ?",
    "enrolled": "UPDATE inventory SET enrolled = ? WHERE id = ?",
    "last_heartbeat": "UPDATE inventory SET last_heartbeat = ? WHERE id = ?",
    "offline": "UPDATE inventory SET offline = ? WHERE id = ?",
}

# a drain's two reads of owed_compute (owed_compute): from its start to the end of the key order,
# then round from the beginning to the keys before it, each through the okey index. As on
# DynamoDB, a nonce longer than any owe_compute writes is read malformed (""). The id is read as
# its bytes (_owed_mark): one written by hand that is no text (NULL, a BLOB) or no UTF-8 is read
# as a mark naming no workload, never a failure of the read
_OWED_MARK = (
    "SELECT rowid, typeof(workload_id), CAST(workload_id AS BLOB), urgent, "
    "CASE WHEN length(nonce) <= ? THEN nonce ELSE '' END FROM owed_compute"
)
_OWED_FROM = f"{_OWED_MARK} WHERE okey >= ? ORDER BY okey LIMIT ?"
_OWED_BEFORE = f"{_OWED_MARK} WHERE okey < ? ORDER BY okey LIMIT ?"

BUSY_TIMEOUT_S = 30.0  # how long a writer waits on another process's lock before the call fails


def busy_timeout(env: Mapping[str, str] | None = None) -> float:
    """``RINGFENCE_STORE_BUSY_TIMEOUT`` (seconds, default 30): how long ``serve`` waits on a lock
    another process holds (a backup tool, a script) before it answers 503."""
    raw = (os.environ if env is None else env).get("RINGFENCE_STORE_BUSY_TIMEOUT", "")
    if not raw:
        return BUSY_TIMEOUT_S
    try:
        seconds = float(raw)
    except ValueError:
        seconds = -1.0
    # at least 1 ms: SQLite counts the wait in whole milliseconds, and 0 would be no wait at all
    if not 0.001 <= seconds <= 3600:
        raise ValueError(f"RINGFENCE_STORE_BUSY_TIMEOUT={raw!r}: must be a number of seconds from 0.001 to 3600")
    return seconds


class StoreOpenError(RuntimeError):
    """The file cannot be opened as this release's store (the message starts with its path)."""


class SqliteStore:
    """The :class:`~ringfence.store.base.Store` in one SQLite file (created if missing).

    ``read_only``: for those who only read (the CLI's ``audit``, ``findings``, ``map``,
    ``suggest``): the file must exist and be of this release's schema; it is opened ``mode=ro``,
    with no schema statement and no journal-mode change, so a read-only copy, a file of another
    release or one a writer holds are read (or refused) without being touched."""

    def __init__(
        self,
        path: str | Path,
        *,
        synchronous: Literal["FULL", "NORMAL"] = "FULL",
        busy_timeout: float = BUSY_TIMEOUT_S,
        read_only: bool = False,
    ) -> None:
        self.path = Path(path)
        if str(path) == ":memory:" or str(path).startswith("file:"):
            raise ValueError("SqliteStore needs a file path (every thread opens its own connection to it)")
        self.synchronous = synchronous
        self.busy_timeout = busy_timeout
        self.read_only = read_only
        self._local = threading.local()
        self._all: list[tuple[weakref.ref[threading.Thread], sqlite3.Connection]] = []
        self._lock = threading.Lock()
        self._writer = threading.Lock()
        self._claims_pruned = 0.0  # when claim_once last cleared every expired claim
        self.metric: Callable[[str, float], None] = no_metric
        if read_only and not self.path.is_file():
            raise StoreOpenError(f"{self.path}: no such database file")
        # the version before anything writes (a journal-mode change is a write): a file of a newer
        # release is refused untouched
        version = self._schema_version() if self.path.is_file() else 0
        if version > SCHEMA_VERSION:
            raise self._newer(version)
        if read_only:
            if version < SCHEMA_VERSION:
                what = (
                    "not a ringfence store"
                    if version == 0
                    else f"schema version {version}, older than {SCHEMA_VERSION}"
                )
                raise StoreOpenError(f"{self.path}: {what} (`ringfence serve` on it migrates a ringfence store)")
            return
        self.path.parent.mkdir(parents=True, exist_ok=True)
        try:
            self._make_schema()
        except BaseException:
            self.close()
            raise

    def _newer(self, version: int) -> StoreOpenError:
        return StoreOpenError(
            f"{self.path}: schema version {version} is newer than this ringfence knows ({SCHEMA_VERSION})"
        )

    def _make_schema(self) -> None:
        """Migrate the file from the version it has and make this release's schema, in one write
        transaction whose first read is the version: if a newer release's process migrated the
        file since this one read its version (this one waited for that migration's write lock),
        the open is refused (:class:`StoreOpenError`, both versions named) and the file left as
        that release made it, its version never set back. Idempotent (IF NOT EXISTS, the one
        trigger dropped and made again in the same transaction): processes opening the same file
        at once all succeed, and each migration is done once."""
        with self._tx() as db:
            version = db.execute("PRAGMA user_version").fetchone()[0]
            if version > SCHEMA_VERSION:
                raise self._newer(version)
            # each joins this transaction and reads the version again
            if version == 1:
                self._migrate_to_2()
            if version in (1, 2):
                self._migrate_to_3()
            if version in (1, 2, 3):
                self._migrate_to_4()
            if version in (1, 2, 3, 4, 5):
                self._migrate_to_6()
            for statement in _SCHEMA_STATEMENTS:
                db.execute(statement)
            db.execute(f"PRAGMA user_version = {SCHEMA_VERSION}")

    def _connect_ro(self) -> sqlite3.Connection:
        uri = f"{self.path.resolve().as_uri()}?mode=ro"
        db = sqlite3.connect(uri, uri=True, timeout=self.busy_timeout, isolation_level=None, check_same_thread=False)
        try:
            db.execute("SELECT count(*) FROM sqlite_master").fetchone()
        except sqlite3.OperationalError:
            # A WAL file read by one who may not write its directory (an auditor's read-only
            # copy): SQLite cannot make the -shm index. With no -wal file every commit is in the
            # file itself, which is then read as it is (immutable); otherwise the error stands.
            wal = self.path.with_name(self.path.name + "-wal")
            if wal.exists() or os.access(self.path.parent, os.W_OK):
                db.close()
                raise
            db.close()
            db = sqlite3.connect(
                uri + "&immutable=1", uri=True, timeout=self.busy_timeout, isolation_level=None, check_same_thread=False
            )
        return db

    def _schema_version(self) -> int:
        try:
            db = self._connect_ro()
            try:
                return int(db.execute("PRAGMA user_version").fetchone()[0])
            finally:
                db.close()
        except sqlite3.Error as exc:
            raise StoreOpenError(f"{self.path}: {exc}") from None

    def _migrate_to_2(self) -> None:
        """A version-1 file gains ``inventory.governed_rev`` (every record at version 0), once even
        when several processes open it at the same moment: the version is read again under the
        write lock."""
        with self._tx() as db:
            if db.execute("PRAGMA user_version").fetchone()[0] == 1:
                db.execute("ALTER TABLE inventory ADD COLUMN governed_rev INTEGER NOT NULL DEFAULT 0")
                db.execute("PRAGMA user_version = 2")

    def _migrate_to_3(self) -> None:
        """``token.agent_key`` (the tokens already issued keep NULL: good until they expire)."""
        with self._tx() as db:
            if db.execute("PRAGMA user_version").fetchone()[0] == 2:
                if "agent_key" not in {r[1] for r in db.execute("PRAGMA table_info(token)")}:
                    db.execute("ALTER TABLE token ADD COLUMN agent_key TEXT")
                db.execute("PRAGMA user_version = 3")

    def _migrate_to_4(self) -> None:
        """``inventory.label_writes`` (NULL: not recorded yet; governance carries what is in force)."""
        with self._tx() as db:
            if db.execute("PRAGMA user_version").fetchone()[0] == 3:
                if "label_writes" not in {r[1] for r in db.execute("PRAGMA table_info(inventory)")}:
                    db.execute("ALTER TABLE inventory ADD COLUMN label_writes TEXT")
                db.execute("PRAGMA user_version = 4")

    def _migrate_to_6(self) -> None:
        """``owed_compute.okey``, each mark's :func:`owed_key` written in (a file may have no such
        table yet: the schema makes it). The version is set in the same transaction: a release
        that would write marks without the key refuses the file from then on."""
        with self._tx() as db:
            if not 1 <= db.execute("PRAGMA user_version").fetchone()[0] <= 5:
                return
            tables = {r[0] for r in db.execute("SELECT name FROM sqlite_master WHERE type = 'table'")}
            if "owed_compute" in tables:
                if "okey" not in {r[1] for r in db.execute("PRAGMA table_info(owed_compute)")}:
                    db.execute("ALTER TABLE owed_compute ADD COLUMN okey TEXT NOT NULL DEFAULT ''")
                # a mark whose id is no text (written by hand: NULL, a BLOB, no UTF-8) keeps ''
                # (read first): the drain reads it as naming no workload, deletes it and counts it
                rows = db.execute(
                    "SELECT typeof(workload_id), CAST(workload_id AS BLOB) FROM owed_compute WHERE okey = ''"
                )
                ids = [i for i in (_text_id(kind, raw) for kind, raw in rows) if i is not None]
                db.executemany(
                    "UPDATE owed_compute SET okey = ? WHERE workload_id = ?", [(owed_key(i), i) for i in ids]
                )
            db.execute("PRAGMA user_version = 6")

    # --- connections and transactions -----------------------------------------------------------

    def _db(self) -> sqlite3.Connection:
        db: sqlite3.Connection | None = getattr(self._local, "db", None)
        if db is None:
            # isolation_level=None: no implicit transactions; every write path says BEGIN IMMEDIATE.
            # Only this thread uses the connection; check_same_thread=False lets _reap close it
            # once the thread has ended (a server's worker threads come and go).
            if self.read_only:  # no journal-mode change, no write of any kind
                db = self._connect_ro()
                db.execute(f"PRAGMA busy_timeout = {int(self.busy_timeout * 1000)}")
                db.execute("PRAGMA query_only = 1")
            else:
                db = sqlite3.connect(
                    self.path, timeout=self.busy_timeout, isolation_level=None, check_same_thread=False
                )
                db.execute(f"PRAGMA busy_timeout = {int(self.busy_timeout * 1000)}")
                db.execute("PRAGMA journal_mode = WAL")
                db.execute(f"PRAGMA synchronous = {self.synchronous}")
            self._local.db = db
            with self._lock:
                self._reap()
                self._all.append((weakref.ref(threading.current_thread()), db))
        return db

    def _reap(self) -> None:
        """Close the connections of threads that have ended (called holding ``_lock``)."""
        alive = []
        for ref, db in self._all:
            thread = ref()
            if thread is not None and thread.is_alive():
                alive.append((ref, db))
            else:
                with contextlib.suppress(sqlite3.Error):
                    db.close()
        self._all = alive

    def open_connections(self) -> int:
        """Connections held for live threads (and for ended ones not reaped yet)."""
        with self._lock:
            return len(self._all)

    @contextlib.contextmanager
    def _tx(self) -> Iterator[sqlite3.Connection]:
        """A write transaction holding the database's write lock from its first statement."""
        db = self._db()
        if getattr(self._local, "in_tx", False):
            # within audit_with's transaction: these writes join it (one commit, or one rollback)
            yield db
            return
        # Threads of this process queue here, woken as soon as the writer before them commits;
        # SQLite's own busy handler (which sleeps in growing steps) is left to other processes.
        with self._writer:
            db.execute("BEGIN IMMEDIATE")
            self._local.in_tx = True
            try:
                yield db
            except BaseException:
                db.execute("ROLLBACK")
                raise
            finally:
                self._local.in_tx = False
            db.execute("COMMIT")

    def close(self) -> None:
        """Close every thread's connection (call once no thread uses the store any more)."""
        with self._lock:
            for _, db in self._all:
                with contextlib.suppress(sqlite3.Error):
                    db.close()
            self._all.clear()
        self._local = threading.local()

    def integrity_check(self) -> str:
        """SQLite's own consistency check of the file: ``"ok"`` when sound."""
        return str(self._db().execute("PRAGMA integrity_check").fetchone()[0])

    # --- inventory ------------------------------------------------------------------------------

    @staticmethod
    def _to_record(row: tuple[Any, ...]) -> InventoryRecord:
        (
            wid,
            workload,
            state,
            observed_at,
            tag_version,
            labels,
            problems,
            op_mode,
            op_q,
            enrolled,
            hb,
            offline,
            gov,
            label_writes,
        ) = row
        return InventoryRecord(
            id=wid,
            workload=Workload.model_validate_json(workload),
            state=state,
            observed_at=observed_at,
            tag_version=tag_version,
            labels=json.loads(labels),
            problems=json.loads(problems),
            op_mode=Mode(op_mode) if op_mode else None,
            op_quarantined=bool(op_q),
            enrolled=bool(enrolled),
            last_heartbeat=hb,
            offline=bool(offline),
            governed_rev=gov,
            label_writes=json.loads(label_writes) if label_writes else None,
        )

    def _record(self, row: tuple[Any, ...] | None) -> InventoryRecord | None:
        """The record of a row; None (logged, counted) when its workload is another than its
        key's (:func:`names_its_key`): what no read hands on."""
        rec = self._to_record(row) if row else None
        return rec if rec is not None and names_its_key(rec.id, rec.workload.id, self.metric) else None

    def get(self, workload_id: str) -> InventoryRecord | None:
        return self._record(self._db().execute(_SELECT_ONE, (workload_id,)).fetchone())

    def get_many(self, workload_ids: list[str]) -> dict[str, InventoryRecord]:
        rows = self._db().execute(_SELECT_MANY, (json.dumps(sorted(set(workload_ids))),))
        return {rec.id: rec for rec in map(self._record, rows) if rec is not None}

    def observe(
        self,
        rec: InventoryRecord,
        *,
        release_terminating: bool = False,
        previous: InventoryRecord | Unread | None = UNREAD,
    ) -> bool:
        # the stored record is read in the write's own transaction (``previous``: only to check
        # that it is the one the caller decided from)
        with self._tx() as db:
            return self._observe(db, rec, release_terminating, previous)

    def observe_many(self, recs: list[InventoryRecord]) -> set[str]:
        with self._tx() as db:
            return {rec.id for rec in recs if self._observe(db, rec)}

    def unclaimed(self, recs: list[InventoryRecord]) -> set[str]:
        return set()  # the address check reads the inventory in the write's transaction: no claims

    def observe_addressed(
        self,
        recs: list[InventoryRecord],
        *,
        anew: dict[str, InventoryRecord] | None = None,
        as_read: dict[str, InventoryRecord] | None = None,
    ) -> set[str]:
        # the check reads the inventory under the write lock it writes in: no writer of this
        # process or another can land an owner in between
        anew, as_read = anew or {}, as_read or {}
        with self._tx() as db:
            taken = _held_elsewhere(db, recs)
            if taken:
                raise AddressTaken(taken)  # rolls back: nothing written
            changed: set[str] = set()
            for rec in recs:
                read = anew.get(rec.id)
                if read is not None:
                    # over exactly the tombstone read, or GovernanceMoved (rolls back: nothing written)
                    check_tombstone(self._record(db.execute(_SELECT_ONE, (rec.id,)).fetchone()), read)
                stored = self._record(db.execute(_SELECT_ONE, (rec.id,)).fetchone())
                if rec.id in as_read:  # over exactly the registration read, or WorkloadChanged (rolls back)
                    check_registration_as_read(rec.id, stored, as_read[rec.id])
                if stored is not None and stored.observed_at > rec.observed_at:
                    # never dropped as older while its caller answers it as made (rolls back)
                    raise GovernanceMoved(f"{rec.id}: a newer registration was stored meanwhile")
                if self._observe(db, rec):
                    changed.add(rec.id)
                if read is not None:  # the old host's mode and quarantine go with this write
                    db.execute("UPDATE inventory SET op_mode = NULL, op_quarantined = 0 WHERE id = ?", (rec.id,))
                    db.execute("DELETE FROM quarantine WHERE workload_id = ?", (rec.id,))
            return changed

    def _observe(
        self,
        db: sqlite3.Connection,
        rec: InventoryRecord,
        release_terminating: bool = False,
        previous: InventoryRecord | Unread | None = UNREAD,
    ) -> bool:
        check_names_its_key(rec)
        # a row holding another workload is no record: this write replaces it
        old = self._record(db.execute(_SELECT_ONE, (rec.id,)).fetchone())
        if old is not None and other_account(old, rec):
            raise OtherAccount(rec, old.workload.account)  # rolls back: nothing written
        if old is not None and old.observed_at > rec.observed_at:
            return False
        check_read(old, rec, previous)
        if old is not None and old.state == "terminating" and rec.state in ACTIVE_STATES and not release_terminating:
            # as DynamoStore: once a terminate lifecycle action is seen, termination is final
            rec = rec.model_copy(update={"state": "terminating"})
        tag_version = rec.tag_version
        if old is not None and old.tag_version is not None:
            tag_version = max(old.tag_version, tag_version or 0)
        # decided from the stored version of the record, or GovernanceMoved: the check and the
        # write are in one transaction
        governed_rev = next_governed_rev(old, rec)
        db.execute(
            "INSERT INTO inventory (id, workload, state, observed_at, tag_version, labels, problems, governed_rev, "
            "label_writes) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?) ON CONFLICT (id) DO UPDATE SET "
            "workload = excluded.workload, state = excluded.state, observed_at = excluded.observed_at, "
            "tag_version = excluded.tag_version, labels = excluded.labels, problems = excluded.problems, "
            "governed_rev = excluded.governed_rev, label_writes = CASE WHEN excluded.state = 'terminated' THEN NULL "
            "ELSE coalesce(excluded.label_writes, label_writes) END",
            (
                rec.id,
                rec.workload.model_dump_json(exclude={"mode", "quarantined"}),
                rec.state,
                rec.observed_at,
                tag_version,
                json.dumps(rec.labels, sort_keys=True),
                json.dumps(rec.problems),
                governed_rev,
                _label_writes(rec),
            ),
        )
        return old is None or old.cloud_view() != rec.cloud_view()

    def all_records(self) -> list[InventoryRecord]:
        return [rec for rec in map(self._record, self._db().execute(_SELECT_ALL)) if rec is not None]

    def set_operator(
        self,
        workload_id: str,
        *,
        mode: Mode | None = _UNSET,
        quarantined: bool | None = None,
        as_read: InventoryRecord | None = None,
    ) -> None:
        """As DynamoStore's: a quarantine is a row of its own (never the record's column); a
        release deletes it and clears the record's ``op_quarantined`` (a file's from before the
        table), in one transaction, which checks ``as_read`` too (:func:`check_as_read`, the
        write lock held: no deregistration or registration lands in between)."""
        if mode is _UNSET and quarantined is None:
            return
        with self._tx() as db:
            row = db.execute(_SELECT_AS_READ, (workload_id,)).fetchone()
            if row is None:
                raise KeyError(workload_id)
            check_as_read(workload_id, _as_read_row(row), as_read)
            if mode is not _UNSET:
                db.execute(_UPDATES["op_mode"], (mode.value if mode is not None else None, workload_id))
            if quarantined:
                db.execute("INSERT OR IGNORE INTO quarantine (workload_id) VALUES (?)", (workload_id,))
            elif quarantined is not None:
                db.execute("DELETE FROM quarantine WHERE workload_id = ?", (workload_id,))
                db.execute("UPDATE inventory SET op_quarantined = 0 WHERE id = ?", (workload_id,))

    def set_liveness(
        self,
        workload_id: str,
        *,
        enrolled: bool | None = None,
        heartbeat: float | None = None,
        offline: bool | None = None,
    ) -> None:
        sets: dict[str, Any] = {}
        if enrolled is not None:
            sets["enrolled"] = int(enrolled)
        if heartbeat is not None:
            sets["last_heartbeat"] = heartbeat
        if offline is not None:
            sets["offline"] = int(offline)
        self._update(workload_id, sets)

    def _update(self, workload_id: str, sets: dict[str, Any]) -> None:
        if not sets:
            return
        with self._tx() as db:
            for col, value in sets.items():
                if db.execute(_UPDATES[col], (value, workload_id)).rowcount == 0:
                    raise KeyError(workload_id)  # rolls back: nothing written

    # --- engine head and policy -----------------------------------------------------------------

    def inventory_generation(self) -> int | None:
        return int(self._db().execute("SELECT gen FROM inventory_gen").fetchone()[0])

    def head(self) -> EngineHead:
        row = self._db().execute(_HEAD).fetchone()
        if row is None:
            return EngineHead()
        count = self._db().execute("SELECT MAX(count) FROM published").fetchone()
        return EngineHead(
            revision=row[0],
            policy_version=row[1],
            clean=bool(row[2]),
            published=int(count[0] or 0) if count else 0,
            rebuilt_from=int(row[3] or 0),
        )

    def put_head(self, new: EngineHead, expected_revision: int) -> None:
        with self._tx() as db:
            row = db.execute("SELECT revision FROM head WHERE id = 1").fetchone()
            if row is not None and row[0] != expected_revision:
                raise ConflictError(f"engine head moved past revision {expected_revision}")
            db.execute(
                "INSERT OR REPLACE INTO head (id, revision, policy_version, clean) VALUES (1, ?, ?, ?)",
                (new.revision, new.policy_version, int(new.clean)),
            )
            # in meta, not a column of head: no schema change (the head table predates it)
            db.execute(
                "INSERT OR REPLACE INTO meta (key, value) VALUES ('head.rebuilt_from', ?)", (str(new.rebuilt_from),)
            )

    def active_policy(self) -> PolicyVersion | None:
        row = self._db().execute("SELECT value FROM meta WHERE key = 'policy.active'").fetchone()
        return PolicyVersion.model_validate_json(row[0]) if row else None

    def next_policy_version(self) -> int:
        with self._tx() as db:
            row = db.execute(
                "INSERT INTO meta (key, value) VALUES ('policy.counter', '1') ON CONFLICT (key) "
                "DO UPDATE SET value = CAST(value AS INTEGER) + 1 RETURNING value"
            ).fetchone()
        return int(row[0])

    def activate_policy(self, pv: PolicyVersion, expected_active: int | Unread | None = UNREAD) -> None:
        doc = pv.model_dump_json()
        with self._tx() as db:
            if expected_active is not UNREAD:
                row = db.execute("SELECT value FROM meta WHERE key = 'policy.active'").fetchone()
                now = PolicyVersion.model_validate_json(row[0]).number if row else None
                if now != expected_active:
                    raise ConflictError(f"policy version {now} became active meanwhile (read: {expected_active})")
            db.execute("INSERT OR REPLACE INTO policy (number, doc) VALUES (?, ?)", (pv.number, doc))
            db.execute("INSERT OR REPLACE INTO meta (key, value) VALUES ('policy.active', ?)", (doc,))

    def policy_versions(self) -> list[PolicyVersion]:
        """Every activated version, oldest first (the history the admin API may list)."""
        rows = self._db().execute("SELECT doc FROM policy ORDER BY number")
        return [PolicyVersion.model_validate_json(r[0]) for r in rows]

    # --- published artifacts --------------------------------------------------------------------

    def bundle_pointer(self, workload_id: str) -> BundlePointer | None:
        row = (
            self._db()
            .execute(
                "SELECT b.doc, p.version FROM bundle b LEFT JOIN bundle_pending p USING (workload_id) "
                "WHERE b.workload_id = ?",
                (workload_id,),
            )
            .fetchone()
        )
        return _pointer_of(row) if row else None

    def put_bundle_pointer(self, ptr: BundlePointer, expected_version: int | None = None) -> bool:
        with self._tx() as db:
            row = db.execute("SELECT version FROM bundle WHERE workload_id = ?", (ptr.workload_id,)).fetchone()
            if expected_version is None:
                if row is not None and row[0] > ptr.version:
                    return False  # never backwards
            elif row is None or row[0] != expected_version:
                return False  # compare-and-swap: only over the pointer the new one was derived from
            db.execute(
                "INSERT OR REPLACE INTO bundle (workload_id, version, doc) VALUES (?, ?, ?)",
                (ptr.workload_id, ptr.version, ptr.model_dump_json()),
            )
        return True

    def put_delta(self, ptr: DeltaPointer) -> None:
        with self._tx() as db:
            db.execute(
                "INSERT OR REPLACE INTO delta (set_name, to_version, doc, expires) VALUES (?, ?, ?, ?)",
                (ptr.set, ptr.to_version, ptr.model_dump_json(), time.time() + DELTA_TTL),
            )

    def put_set_head(self, set_name: str, version: int, digest: str | None = None) -> None:
        with self._tx() as db:
            db.execute(
                "INSERT INTO set_head (name, version) VALUES (?, ?) ON CONFLICT (name) "
                "DO UPDATE SET version = excluded.version WHERE excluded.version > set_head.version",
                (set_name, version),
            )
            if digest is not None:
                db.execute(
                    "INSERT INTO set_digest (name, version, digest) VALUES (?, ?, ?) ON CONFLICT (name) "
                    "DO UPDATE SET version = excluded.version, digest = excluded.digest "
                    "WHERE excluded.version > set_digest.version",
                    (set_name, version, digest),
                )

    def set_states(self, set_names: list[str]) -> dict[str, tuple[int, str | None]]:
        names = json.dumps(sorted(set(set_names)))
        db = self._db()
        out: dict[str, tuple[int, str | None]] = {
            str(n): (int(v), None)
            for n, v in db.execute(
                "SELECT name, version FROM set_head WHERE name IN (SELECT value FROM json_each(?))", (names,)
            )
        }
        for n, v, d in db.execute(
            "SELECT name, version, digest FROM set_digest WHERE name IN (SELECT value FROM json_each(?))", (names,)
        ):
            if out.get(str(n), (None,))[0] == int(v):
                out[str(n)] = (int(v), str(d))
        return out

    def bundle_pointers(self, workload_ids: list[str]) -> dict[str, BundlePointer]:
        rows = self._db().execute(
            "SELECT b.doc, p.version FROM bundle b LEFT JOIN bundle_pending p USING (workload_id) "
            "WHERE b.workload_id IN (SELECT value FROM json_each(?))",
            (json.dumps(sorted(set(workload_ids))),),
        )
        ptrs = (_pointer_of(r) for r in rows)
        return {p.workload_id: p for p in ptrs}

    def mark_bundle_pending(self, workload_id: str, version: int) -> None:
        with self._tx() as db:
            db.execute(
                "INSERT INTO bundle_pending (workload_id, version) VALUES (?, ?) ON CONFLICT (workload_id) "
                "DO UPDATE SET version = excluded.version WHERE excluded.version > bundle_pending.version",
                (workload_id, version),
            )

    def bundle_pending(self, workload_id: str) -> tuple[int, float | None] | None:
        # published in process: no time kept (no job can be lost on a queue)
        row = self._db().execute("SELECT version FROM bundle_pending WHERE workload_id = ?", (workload_id,)).fetchone()
        return (int(row[0]), None) if row else None

    def bump_published(self, workloads: list[str] | None) -> int:
        now = time.time()
        with self._tx() as db:
            db.execute("DELETE FROM published WHERE expires < ? AND count < (SELECT MAX(count) FROM published)", (now,))
            row = db.execute("SELECT COALESCE(MAX(count), 0) + 1 FROM published").fetchone()
            db.execute(
                "INSERT INTO published (count, doc, expires) VALUES (?, ?, ?)",
                (int(row[0]), json.dumps(workloads), now + MOVED_TTL),
            )
        return int(row[0])

    def published_after(self, count: int) -> list[tuple[int, list[str] | None]]:
        rows = self._db().execute("SELECT count, doc FROM published WHERE count > ? ORDER BY count", (count,))
        return [(int(c), json.loads(d)) for c, d in rows]

    def set_heads(self, set_names: list[str]) -> dict[str, int]:
        rows = self._db().execute(
            "SELECT name, version FROM set_head WHERE name IN (SELECT value FROM json_each(?))",
            (json.dumps(sorted(set(set_names))),),
        )
        return {str(name): int(version) for name, version in rows}

    def deltas_after(self, set_name: str, revision: int) -> list[DeltaPointer]:
        rows = self._db().execute(
            "SELECT doc FROM delta WHERE set_name = ? AND to_version > ? AND expires >= ? ORDER BY to_version",
            (set_name, revision, time.time()),
        )
        return [DeltaPointer.model_validate_json(r[0]) for r in rows]

    def put_moved(self, rec: MovedRecord) -> None:
        now = time.time()
        with self._tx() as db:
            db.execute("DELETE FROM moved WHERE expires < ?", (now,))
            db.execute(
                "INSERT OR REPLACE INTO moved (revision, doc, expires) VALUES (?, ?, ?)",
                (rec.revision, rec.model_dump_json(), now + MOVED_TTL),
            )

    def moved_after(self, revision: int) -> list[MovedRecord]:
        rows = self._db().execute("SELECT doc FROM moved WHERE revision > ? ORDER BY revision", (revision,))
        return [MovedRecord.model_validate_json(r[0]) for r in rows]

    # --- agent auth -----------------------------------------------------------------------------

    def put_nonce(self, nonce: str, ttl: int) -> None:
        now = time.time()
        with self._tx() as db:
            db.execute("DELETE FROM nonce WHERE expires < ?", (now,))  # expiry is ours to enforce here
            db.execute("INSERT OR REPLACE INTO nonce (nonce, expires) VALUES (?, ?)", (nonce, now + ttl))

    def burn_nonce(self, nonce: str) -> bool:
        with self._tx() as db:
            cur = db.execute("DELETE FROM nonce WHERE nonce = ? AND expires >= ?", (nonce, time.time()))
            return cur.rowcount == 1

    def claimed(self, key: str) -> bool:
        row = self._db().execute("SELECT 1 FROM claim WHERE key = ? AND expires >= ?", (key, time.time())).fetchone()
        return row is not None

    def claim_once(self, key: str, ttl: int) -> bool:
        now = time.time()
        prune = now - self._claims_pruned >= CLAIM_PRUNE_EVERY
        with self._tx() as db:
            if prune:  # a claim never made again would stay for good
                db.execute("DELETE FROM claim WHERE expires < ?", (now,))
                self._claims_pruned = now
            else:
                db.execute("DELETE FROM claim WHERE key = ? AND expires < ?", (key, now))
            cur = db.execute("INSERT OR IGNORE INTO claim (key, expires) VALUES (?, ?)", (key, now + ttl))
            return cur.rowcount == 1

    def owe_compute(self, workload_ids: list[str], urgent: bool = False) -> None:
        ids = sorted(set(workload_ids))
        if not ids:
            return
        with self._tx() as db:
            db.executemany(
                "INSERT INTO owed_compute (workload_id, urgent, nonce, okey) VALUES (?, ?, ?, ?) "
                "ON CONFLICT (workload_id) DO UPDATE SET urgent = max(urgent, excluded.urgent), "
                "nonce = excluded.nonce, okey = excluded.okey",
                [(i, int(urgent), uuid.uuid4().hex, owed_key(i)) for i in ids],
            )

    def owed_compute(self, limit: int | None = None, start: str = "") -> list[OwedMark]:
        # one table (its writers are this process), in DynamoDB's order of a writer's partition:
        # by owed_key (okey, indexed), from ``start`` to the end, then round from the beginning
        # to the keys before it; at most ``limit`` rows read in all, never the whole table
        # (two statements: a mark's key is its id's, so none is read in both halves)
        out: list[OwedMark] = []
        db = self._db()
        for half in (_OWED_FROM, _OWED_BEFORE):
            room = -1 if limit is None else limit - len(out)  # LIMIT -1: no limit
            if room <= 0 and limit is not None:
                break
            rows = db.execute(half, (OWED_NONCE_MAX, start, room)).fetchall()
            out += [_owed_mark(*row) for row in rows]
        return out

    def settle_owed(self, marks: list[OwedMark]) -> list[str]:
        settled: list[str] = []
        if not marks:
            return settled
        with self._tx() as db:
            for m in marks:
                if m.key:  # an id that is no text (_owed_mark): that row, while it still holds it
                    rowid, kind, raw = m.key.split(":", 2)
                    cur = db.execute(
                        "DELETE FROM owed_compute WHERE rowid = ? AND typeof(workload_id) = ? AND hex(workload_id) = ?",
                        (int(rowid), kind, raw),
                    )
                elif m.nonce:
                    cur = db.execute(
                        "DELETE FROM owed_compute WHERE workload_id = ? AND nonce = ?", (m.workload_id, m.nonce)
                    )
                else:  # read malformed: deleted only while still so
                    cur = db.execute(
                        "DELETE FROM owed_compute WHERE workload_id = ? AND (nonce = '' OR length(nonce) > ?)",
                        (m.workload_id, OWED_NONCE_MAX),
                    )
                if cur.rowcount == 1:
                    settled.append(m.workload_id)
        return settled

    def put_token(self, token_hash: str, workload_id: str, ttl: int, agent_key: str = "") -> None:
        now = time.time()
        with self._tx() as db:
            db.execute("DELETE FROM token WHERE expires < ? OR workload_id = ?", (now, workload_id))
            db.execute(
                "INSERT OR REPLACE INTO token (hash, workload_id, expires, agent_key) VALUES (?, ?, ?, ?)",
                (token_hash, workload_id, now + ttl, agent_key),
            )

    def token_workload(self, token_hash: str) -> str | None:
        row = (
            self._db()
            .execute(
                "SELECT t.workload_id, t.agent_key, k.public_key FROM token t"
                " LEFT JOIN agent_key k ON k.workload_id = t.workload_id WHERE t.hash = ? AND t.expires >= ?",
                (token_hash, time.time()),
            )
            .fetchone()
        )
        return str(row[0]) if row and token_key_holds(row[1], row[2]) else None

    def token_expires(self, token_hash: str) -> float | None:
        row = (
            self._db()
            .execute("SELECT expires FROM token WHERE hash = ? AND expires >= ?", (token_hash, time.time()))
            .fetchone()
        )
        return float(row[0]) if row else None

    def token_grant(self, token_hash: str, workload_id: str, with_enforcement: bool = False) -> Grant:
        owner = self.token_workload(token_hash)
        if owner != workload_id:
            return Grant(owner)
        if with_enforcement:
            return Grant(owner, self.get(workload_id), self.bundle_pointer(workload_id), self.enforcement(owner), True)
        return Grant(owner, self.get(workload_id), self.bundle_pointer(workload_id))

    def revoke_tokens(self, workload_id: str) -> bool:
        with self._tx() as db:
            cur = db.execute("DELETE FROM token WHERE workload_id = ?", (workload_id,))
            return cur.rowcount > 0

    def active_token(self, workload_id: str) -> str | None:
        # put_token keeps one row per workload; read within audit_with's transaction when a
        # TokenRevocation checks it (the same connection: what that transaction sees)
        row = (
            self._db()
            .execute("SELECT hash FROM token WHERE workload_id = ? AND expires >= ?", (workload_id, time.time()))
            .fetchone()
        )
        return str(row[0]) if row else None

    def bind_agent_key(self, workload_id: str, public_key: str, *, replace: bool = False) -> str:
        with self._tx() as db:
            return self._bind_agent_key(db, workload_id, public_key, replace)

    @staticmethod
    def _bind_agent_key(db: sqlite3.Connection, workload_id: str, public_key: str, replace: bool) -> str:
        """bind_agent_key inside the caller's transaction (the named-key check included)."""
        named = db.execute("SELECT key_id FROM next_agent_key WHERE workload_id = ?", (workload_id,)).fetchone()
        if named is not None and named[0] != agent_key_fingerprint_of(public_key):
            raise NotTheNamedKey(str(named[0]))
        verb = "INSERT OR REPLACE" if replace else "INSERT OR IGNORE"
        db.execute(f"{verb} INTO agent_key (workload_id, public_key) VALUES (?, ?)", (workload_id, public_key))
        bound = str(db.execute("SELECT public_key FROM agent_key WHERE workload_id = ?", (workload_id,)).fetchone()[0])
        if named is not None and bound == public_key:  # the named key is bound: the expectation is met
            db.execute("DELETE FROM next_agent_key WHERE workload_id = ?", (workload_id,))
        return bound

    def agent_key(self, workload_id: str) -> str | None:
        row = self._db().execute("SELECT public_key FROM agent_key WHERE workload_id = ?", (workload_id,)).fetchone()
        return str(row[0]) if row else None

    def drop_agent_key(self, workload_id: str) -> None:
        with self._tx() as db:
            db.execute("DELETE FROM agent_key WHERE workload_id = ?", (workload_id,))

    def expect_agent_key(self, workload_id: str, fingerprint: str | None) -> None:
        # the column keeps its name: it held a 64-bit key id before, which now matches no key
        with self._tx() as db:
            if fingerprint is None:
                db.execute("DELETE FROM next_agent_key WHERE workload_id = ?", (workload_id,))
            else:
                db.execute(
                    "INSERT OR REPLACE INTO next_agent_key (workload_id, key_id) VALUES (?, ?)",
                    (workload_id, fingerprint),
                )

    def expected_agent_key(self, workload_id: str) -> str | None:
        row = self._db().execute("SELECT key_id FROM next_agent_key WHERE workload_id = ?", (workload_id,)).fetchone()
        return str(row[0]) if row else None

    def put_pairing(
        self, key_hash: str, workload_id: str, uses: int, ttl: int, as_read: InventoryRecord | None = None
    ) -> None:
        if not workload_id:
            raise ValueError("a pairing key is issued for one workload")
        with self._tx() as db:
            self._check_as_read(db, workload_id, as_read)  # the write lock held: nothing lands in between
            db.execute(
                "INSERT OR REPLACE INTO pairing (hash, workload_id, uses, expires) VALUES (?, ?, ?, ?)",
                (key_hash, workload_id, uses, time.time() + ttl),
            )

    def use_pairing(self, key_hash: str, workload_id: str, agent_key: str) -> bool:
        with self._tx() as db:
            cur = db.execute(
                "UPDATE pairing SET uses = uses - 1 WHERE hash = ? AND workload_id = ? AND uses > 0 AND expires >= ?",
                (key_hash, workload_id, time.time()),
            )
            if cur.rowcount != 1:
                return False
            self._bind_agent_key(db, workload_id, agent_key, replace=True)  # NotTheNamedKey rolls the use back
            return True

    def drop_pairings(self, workload_id: str, as_read: InventoryRecord | None = None) -> int:
        with self._tx() as db:
            self._check_as_read(db, workload_id, as_read)
            live = db.execute(
                "SELECT COUNT(*) FROM pairing WHERE workload_id = ? AND uses > 0 AND expires >= ?",
                (workload_id, time.time()),
            ).fetchone()[0]
            db.execute("DELETE FROM pairing WHERE workload_id = ?", (workload_id,))
            return int(live)

    def reset_agent_key(self, change: AgentKeyReset) -> tuple[int, bool]:
        wid = change.workload_id
        with self._tx() as db:  # the check and every step under one write lock
            self._check_as_read(db, wid, change.as_read)
            self.expect_agent_key(wid, change.next_agent_key)
            pairings = self.drop_pairings(wid)
            self.drop_agent_key(wid)
            revoked = self.revoke_tokens(wid)
            self.drop_connection(wid)
            return pairings, revoked

    @staticmethod
    def _check_as_read(db: sqlite3.Connection, workload_id: str, as_read: InventoryRecord | None) -> None:
        if as_read is not None:
            row = db.execute(_SELECT_AS_READ, (workload_id,)).fetchone()
            check_as_read(workload_id, _as_read_row(row) if row is not None else None, as_read)

    def retire_old_host(self, change: OldHostRetirement) -> None:
        # the check and every drop under one write lock: no registration lands in between
        with self._tx():
            change.apply(self)

    def put_connection(self, workload_id: str, connection_id: str, token_hash: str) -> bool:
        # in the transaction that checks the token is still the workload's (as over DynamoDB): a
        # refresh or retirement revokes it before it drops the connection
        now = time.time()
        with self._tx() as db:
            cur = db.execute(
                "INSERT OR REPLACE INTO connection (workload_id, connection_id, expires) SELECT ?, ?, ?"
                " WHERE EXISTS (SELECT 1 FROM token WHERE hash = ? AND workload_id = ? AND expires >= ?)",
                (workload_id, connection_id, now + CONNECTION_TTL, token_hash, workload_id, now),
            )
            return cur.rowcount == 1

    def connection(self, workload_id: str) -> str | None:
        row = (
            self._db()
            .execute(
                "SELECT connection_id FROM connection WHERE workload_id = ? AND expires >= ?",
                (workload_id, time.time()),
            )
            .fetchone()
        )
        return str(row[0]) if row else None

    def drop_connection(self, workload_id: str, connection_id: str | None = None) -> None:
        with self._tx() as db:
            if connection_id is None:
                db.execute("DELETE FROM connection WHERE workload_id = ?", (workload_id,))
            else:
                db.execute(
                    "DELETE FROM connection WHERE workload_id = ? AND connection_id = ?", (workload_id, connection_id)
                )

    # --- launch holds -----------------------------------------------------------------------------

    def put_enforcement(self, rep: EnforcementReport) -> None:
        with self._tx() as db:
            db.execute(
                "INSERT OR REPLACE INTO enforcement (workload_id, doc) VALUES (?, ?)",
                (rep.workload_id, rep.model_dump_json()),
            )

    def enforcement(self, workload_id: str) -> EnforcementReport | None:
        row = self._db().execute("SELECT doc FROM enforcement WHERE workload_id = ?", (workload_id,)).fetchone()
        return EnforcementReport.model_validate_json(row[0]) if row else None

    def enforcement_reports(self) -> list[EnforcementReport]:
        rows = self._db().execute("SELECT doc FROM enforcement ORDER BY workload_id").fetchall()
        return [EnforcementReport.model_validate_json(r[0]) for r in rows]

    def hold_launch(self, instance_id: str, **fields: Any) -> LaunchHold:
        check_hold_fields(fields)
        now = time.time()
        with self._tx() as db:
            doc = _hold_doc(db, instance_id, now) or {}
            for k, v in fields.items():
                if k not in HOLD_FIRST_WINS or doc.get(k) is None:
                    doc[k] = v
            db.execute(
                "INSERT OR REPLACE INTO launch_hold (instance_id, doc, expires) VALUES (?, ?, ?)",
                (instance_id, json.dumps(doc), now + HOLD_TTL),
            )
        return LaunchHold.model_validate({**doc, "instance_id": instance_id})

    def launch_hold(self, instance_id: str) -> LaunchHold | None:
        doc = _hold_doc(self._db(), instance_id, time.time())
        return LaunchHold.model_validate({**doc, "instance_id": instance_id}) if doc is not None else None

    def hold_launch_action(self, instance_id: str, lifecycle: dict[str, Any], **fields: Any) -> LaunchHold:
        check_hold_fields(fields)
        if set(fields) - {"perimeter_at", "perimeter"}:
            raise ValueError(f"launch hold: an action is recorded with its hand-off fields only, not {sorted(fields)}")
        token = str(lifecycle["token"])
        now = time.time()
        with self._tx() as db:
            doc = _hold_doc(db, instance_id, now) or {}
            actions = doc.setdefault("actions", {})
            if token not in actions:  # a new action, beside the others; the same token again is a duplicate
                actions[token] = {**fields, "lifecycle": lifecycle, "recorded_at": now}
                db.execute(
                    "INSERT OR REPLACE INTO launch_hold (instance_id, doc, expires) VALUES (?, ?, ?)",
                    (instance_id, json.dumps(doc), now + HOLD_TTL),
                )
        return LaunchHold.model_validate({**doc, "instance_id": instance_id})

    def claim_launch_release(self, instance_id: str, token: str) -> bool:
        def claimable(action: dict[str, Any], now: float) -> bool:
            if action.get("released_at") is None:
                return True
            return action.get("outcome") == COMPLETING and float(action.get("claimed_at", now)) < now - HOLD_CLAIM_STALE

        return self._hold_write(instance_id, token, COMPLETING, claimable, claim=True)

    def settle_launch_release(self, instance_id: str, token: str, outcome: str) -> bool:
        return self._hold_write(instance_id, token, outcome, lambda action, _: action.get("outcome") == COMPLETING)

    def _hold_write(
        self,
        instance_id: str,
        token: str,
        outcome: str,
        condition: Callable[[dict[str, Any], float], bool],
        claim: bool = False,
    ) -> bool:
        now = time.time()
        with self._tx() as db:
            doc = _hold_doc(db, instance_id, now) or {}
            action = (doc.get("actions") or {}).get(token)
            if action is None or not condition(action, now):
                return False
            action.update(released_at=now, outcome=outcome, **({"claimed_at": now} if claim else {}))
            db.execute("UPDATE launch_hold SET doc = ? WHERE instance_id = ?", (json.dumps(doc), instance_id))
        return True

    # --- flows (ringfence.flows) ----------------------------------------------------------------

    def add_flows(self, rows: list[FlowRow], ttl: int) -> None:
        """Fold ``rows`` into the stored rows of their day and key; a row expires ``ttl`` s after
        its last update."""
        expires = time.time() + ttl
        with self._tx() as db:
            for row in rows:
                old = db.execute("SELECT doc FROM flow_row WHERE day = ? AND key = ?", (row.day, row.key)).fetchone()
                new = row
                if old is not None:
                    new = FlowRow.model_validate_json(old[0])
                    new.add(row)
                db.execute(
                    "INSERT OR REPLACE INTO flow_row (day, key, doc, expires) VALUES (?, ?, ?, ?)",
                    (row.day, row.key, new.model_dump_json(), expires),
                )
            db.execute("DELETE FROM flow_row WHERE expires < ?", (time.time(),))

    def flow_rows(self, days: int = 0) -> list[FlowRow]:
        """Every unexpired row (of the last ``days`` days), per day (:func:`ringfence.flows.aggregate.merge` folds the days)."""
        since = day_of(time.time() - (days - 1) * 86400) if days else ""
        rows = self._db().execute(
            "SELECT doc FROM flow_row WHERE expires >= ? AND day >= ? ORDER BY day, key", (time.time(), since)
        )
        return [FlowRow.model_validate_json(r[0]) for r in rows]

    def admit_flow_keys(
        self, reporter: str, period: str, keys: list[str], most: int, ttl: int
    ) -> tuple[set[str], bool]:
        """Of ``keys`` (row keys one reporter's flows make), those it may write in ``period``: the
        ones it wrote in it already, and new ones while it has written fewer than ``most``; and
        whether this is the period's first refusal (logged once). Kept ``ttl`` s."""
        want = list(dict.fromkeys(keys))
        with self._tx() as db:
            have = {
                k
                for (k,) in db.execute(
                    "SELECT key FROM flow_reporter_key WHERE reporter = ? AND period = ?", (reporter, period)
                )
            }
            refused_before = "" in have  # the period's refusal mark (never a key: keys are digests)
            have.discard("")
            new = [k for k in want if k not in have]
            grant = new[: max(0, most - len(have))]
            first = len(grant) < len(new) and not refused_before
            rows = [(reporter, period, k, time.time() + ttl) for k in grant + ([""] if first else [])]
            db.executemany(
                "INSERT OR IGNORE INTO flow_reporter_key (reporter, period, key, expires) VALUES (?, ?, ?, ?)", rows
            )
            db.execute("DELETE FROM flow_reporter_key WHERE expires < ?", (time.time(),))
        return {k for k in want if k in have} | set(grant), first

    def note_addresses(self, owners: list[AddressOwner]) -> None:
        with self._tx() as db:
            db.executemany(
                "INSERT OR REPLACE INTO address_owner (address, since, doc) VALUES (?, ?, ?)",
                [(o.address, o.since, o.model_dump_json()) for o in owners],
            )

    def address_history(self, addresses: list[str]) -> dict[str, list[AddressOwner]]:
        out: dict[str, list[AddressOwner]] = {}
        rows = self._db().execute(
            "SELECT doc FROM address_owner WHERE address IN (SELECT value FROM json_each(?)) ORDER BY address, since",
            (json.dumps(addresses),),
        )
        for (doc,) in rows:
            o = AddressOwner.model_validate_json(doc)
            out.setdefault(o.address, []).append(o)
        return out

    # --- audit ----------------------------------------------------------------------------------

    def audit(self, rec: AuditRecord) -> AuditRecord:
        # BEGIN IMMEDIATE holds the write lock from the head's read to the commit: the record and
        # the head it becomes are one transaction, and no other writer (thread or process) can
        # read the same head in between
        try:
            with self._tx() as db:
                row = db.execute("SELECT seq, hash FROM audit_head WHERE id = 1").fetchone()
                sealed = seal(rec, AuditHead(seq=row[0], hash=row[1]) if row else AuditHead())
                db.execute(
                    "INSERT INTO audit (id, time, doc) VALUES (?, ?, ?)",
                    (sealed.id, sealed.time, sealed.model_dump_json()),
                )
                db.execute(
                    "INSERT INTO audit_head (id, seq, hash) VALUES (1, ?, ?) "
                    "ON CONFLICT (id) DO UPDATE SET seq = excluded.seq, hash = excluded.hash",
                    (sealed.seq, sealed.hash),
                )
        except sqlite3.IntegrityError:
            raise AuditRecordExists(f"audit record {rec.id} exists: the audit log is append-only") from None
        return sealed

    def audit_with(self, rec: AuditRecord, change: AuditedChange) -> AuditRecord:
        # one BEGIN IMMEDIATE: the record and the change commit together or not at all, so a
        # process killed between them leaves no record of a change that never happened
        with self._tx():
            sealed = self.audit(rec)
            try:
                change.apply(self)
            except Exception as exc:
                raise ChangeFailed(exc) from exc  # rolls the record back with it
        return sealed

    def audit_log(self) -> list[AuditRecord]:
        # insertion order (the autoincrement column), not the documents' own seq: verify must see
        # a reordering
        rows = self._db().execute("SELECT doc FROM audit ORDER BY seq")
        return [AuditRecord.model_validate_json(r[0]) for r in rows]

    def audit_record(self, record_id: str) -> AuditRecord | None:
        row = self._db().execute("SELECT doc FROM audit WHERE id = ?", (record_id,)).fetchone()
        return AuditRecord.model_validate_json(row[0]) if row else None

    def audit_head(self) -> AuditHead | None:
        row = self._db().execute("SELECT seq, hash FROM audit_head WHERE id = 1").fetchone()
        return AuditHead(seq=row[0], hash=row[1]) if row else None


def _text_id(kind: str, raw: bytes | None) -> str | None:
    """A stored mark's id (``typeof`` and bytes), None if it is no text (NULL, a BLOB) or no UTF-8."""
    if kind != "text" or raw is None:
        return None
    try:
        return raw.decode()
    except UnicodeDecodeError:
        return None


def _owed_mark(rowid: int, kind: str, raw: bytes | None, urgent: int, nonce: str) -> OwedMark:
    """A row of owed_compute as read (:data:`_OWED_MARK`). One whose id is no text is read as
    naming no workload (``<null>``, ``<blob 00FF>``, ``<text C3>``: never a workload id, so a
    drain deletes it unsent and counts it, as any other such mark), its ``key`` the row and what
    it held (``rowid:typeof:hex``), by which :meth:`SqliteStore.settle_owed` deletes it."""
    wid = _text_id(kind, raw)
    if wid is not None:
        return OwedMark(wid, bool(urgent), nonce)
    shown = (raw or b"").hex().upper()
    return OwedMark(f"<{kind} {shown}>" if shown else f"<{kind}>", bool(urgent), nonce, key=f"{rowid}:{kind}:{shown}")


def _label_writes(rec: InventoryRecord) -> str | None:
    """The record's known writes as stored (None: none recorded, the stored ones stay; a tombstone
    clears them: a grant or approval must not outlive the workload, an id registered again starts
    from none)."""
    if rec.state == "terminated" or rec.label_writes is None:
        return None
    return json.dumps({d: w.model_dump() for d, w in sorted(rec.label_writes.items())})


def _pointer_of(row: tuple[str, int | None]) -> BundlePointer:
    """A bundle pointer row with compute's pending mark beside it (NULL: never marked)."""
    ptr = BundlePointer.model_validate_json(row[0])
    if row[1] is not None:
        ptr.pending = int(row[1])
    return ptr


# the addresses among those asked for of the records holding theirs (holds_addresses: active, or
# a cloud instance not terminated: a stopped one keeps its address), and any stored with a zone
# index (before addresses were read without one: normalised here as Workload normalises them on
# read); a row holding another workload is no record (names_its_key)
_ADDRESS_HOLDERS = (
    "SELECT i.id, j.value FROM inventory i, json_each(i.workload, '$.ips') j "
    "WHERE (i.state IN ('pending', 'running') OR (i.state != 'terminated' "
    "AND coalesce(json_extract(i.workload, '$.cloud'), 'onprem') != 'onprem')) "
    "AND json_extract(i.workload, '$.id') = i.id "
    "AND (j.value IN (SELECT value FROM json_each(?)) OR instr(j.value, '%') > 0) ORDER BY i.id"
)


def _held_elsewhere(db: sqlite3.Connection, recs: list[InventoryRecord]) -> dict[str, str]:
    """Address → the workload outside ``recs`` that holds it (or the first of ``recs``
    giving it, for one given twice), for the addresses of ``recs``' active records."""
    wanted: dict[str, str] = {}
    taken: dict[str, str] = {}
    for rec in recs:
        if rec.state in ACTIVE_STATES:
            for ip in rec.workload.ips:
                first = wanted.setdefault(ip, rec.id)
                if first != rec.id:
                    taken.setdefault(ip, first)
    if not wanted:
        return taken
    ids = {rec.id for rec in recs}  # their stored addresses are replaced by this write
    for wid, raw in db.execute(_ADDRESS_HOLDERS, (json.dumps(sorted(wanted)),)):
        ip = str(raw).split("%", 1)[0]
        if ip in wanted and wid not in ids:
            taken.setdefault(ip, wid)
    return taken


def _hold_doc(db: sqlite3.Connection, instance_id: str, now: float) -> dict[str, Any] | None:
    """The instance's launch hold document while it has not expired (None: no hold)."""
    row = db.execute(
        "SELECT doc FROM launch_hold WHERE instance_id = ? AND expires >= ?", (instance_id, now)
    ).fetchone()
    return cast(dict[str, Any], json.loads(row[0])) if row else None
