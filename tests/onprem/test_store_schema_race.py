"""A newer release migrates the SQLite file while this one opens it (two processes on one real
file): this release, which read the older version before the migration took the write lock, is
refused once it gets the lock, naming the file and both versions, and never sets the version back
(nor makes its own schema over the newer one's)."""

from __future__ import annotations

import sqlite3
import subprocess
import sys
from pathlib import Path

import pytest

from ringfence.store import sqlite
from ringfence.store.sqlite import SCHEMA_VERSION, SqliteStore

# the opener, in a process of its own: says "begin" on stdout when it starts its first write
# transaction (SQLite's statement trace; the store's connections are SQLite's own), then how the
# open ended
OPENER = """
import sqlite3, sys

connect = sqlite3.connect


def traced(*args, **kwargs):
    db = connect(*args, **kwargs)
    db.set_trace_callback(lambda sql: sql.lstrip().upper().startswith("BEGIN IMMEDIATE") and print("begin", flush=True))
    return db


sqlite3.connect = traced
from ringfence.store.sqlite import SqliteStore, StoreOpenError

try:
    SqliteStore(sys.argv[1]).close()
    print("opened", flush=True)
except StoreOpenError as exc:
    print("refused:", exc, flush=True)
"""

NEWER = SCHEMA_VERSION + 1


def _version(path: Path) -> int:
    db = sqlite3.connect(path)
    try:
        return int(db.execute("PRAGMA user_version").fetchone()[0])
    finally:
        db.close()


def _back_to_version_5(path: Path) -> None:
    """The file as schema 5 left it: owed marks without their key, one mark."""
    db = sqlite3.connect(path)
    db.executescript(
        "BEGIN; DROP TABLE owed_compute; CREATE TABLE owed_compute (workload_id TEXT PRIMARY KEY,"
        " urgent INTEGER NOT NULL, nonce TEXT NOT NULL); INSERT INTO owed_compute VALUES ('i-a', 0, 'n1');"
        " PRAGMA user_version = 5; COMMIT;"
    )
    db.close()


@pytest.mark.parametrize("found", [SCHEMA_VERSION, 5])
def test_a_newer_release_migrating_the_file_meanwhile_is_never_set_back(tmp_path: Path, found: int) -> None:
    """``found``: the version the file has when this release reads it (this release's own, or
    5: one this release would migrate)."""
    path = tmp_path / "state.db"
    SqliteStore(path).close()
    if found == 5:
        _back_to_version_5(path)
    # the newer release's migration, under the write lock, not committed yet: the opener reads
    # the committed version (found) and then waits for the lock
    newer = sqlite3.connect(path, isolation_level=None)
    newer.execute("BEGIN IMMEDIATE")
    newer.execute("CREATE TABLE newer_release (x TEXT)")
    newer.execute(f"PRAGMA user_version = {NEWER}")
    opener = subprocess.Popen(
        [sys.executable, "-c", OPENER, str(path)], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True
    )
    try:
        assert opener.stdout is not None
        assert opener.stdout.readline() == "begin\n", opener.stderr.read() if opener.stderr else ""
        newer.execute("COMMIT")
        out, err = opener.communicate(timeout=60)
    finally:
        newer.close()
        if opener.poll() is None:
            opener.kill()
            opener.wait()
    assert out == (
        f"refused: {path}: schema version {NEWER} is newer than this ringfence knows ({SCHEMA_VERSION})\n"
    ), out + err
    assert _version(path) == NEWER, "the newer release's version is never set back"
    db = sqlite3.connect(path)
    try:
        if found == 5:  # nor migrated to this release's schema over the newer one's
            assert "okey" not in {r[1] for r in db.execute("PRAGMA table_info(owed_compute)")}
        assert db.execute("PRAGMA integrity_check").fetchone()[0] == "ok"
    finally:
        db.close()


def test_processes_opening_one_old_file_at_once_migrate_it_once(tmp_path: Path) -> None:
    """Several processes of this release opening a version-5 file at the same moment all open it,
    and the file ends at this release's version with its marks keyed once."""
    path = tmp_path / "state.db"
    SqliteStore(path).close()
    _back_to_version_5(path)
    holder = sqlite3.connect(path, isolation_level=None)
    holder.execute("BEGIN IMMEDIATE")  # every opener waits on the lock, then they race for it
    openers = [
        subprocess.Popen([sys.executable, "-c", OPENER, str(path)], stdout=subprocess.PIPE, text=True) for _ in range(3)
    ]
    try:
        for p in openers:
            assert p.stdout is not None and p.stdout.readline() == "begin\n"
        holder.execute("COMMIT")
        outs = [p.communicate(timeout=60)[0] for p in openers]
    finally:
        holder.close()
        for p in openers:
            if p.poll() is None:
                p.kill()
                p.wait()
    assert [o.splitlines()[-1] for o in outs] == ["opened"] * 3, outs
    assert _version(path) == SCHEMA_VERSION
    st = SqliteStore(path)
    try:
        assert [m.workload_id for m in st.owed_compute()] == ["i-a"]
        assert st.integrity_check() == "ok"
    finally:
        st.close()


def test_the_schema_splits_into_whole_statements_a_triggers_body_and_a_lines_two_alike() -> None:
    """The schema is executed statement by statement inside the opening transaction: each
    statement whole (a trigger's body keeps its semicolons), two on one line two, a semicolon in
    a comment no end, an unfinished one refused."""
    script = (
        "CREATE TABLE a(x); CREATE TABLE b(y);\n"
        "-- a comment; not an end\n"
        "CREATE TRIGGER t AFTER INSERT ON a BEGIN\n  INSERT INTO b VALUES (1);\n  DELETE FROM b;\nEND;\n"
    )
    got = sqlite._statements(script)
    assert got[:2] == ["CREATE TABLE a(x);", "CREATE TABLE b(y);"]
    assert len(got) == 3 and got[2].endswith("END;") and "DELETE FROM b;" in got[2]
    db = sqlite3.connect(":memory:")
    for stmt in got:
        db.execute(stmt)  # one statement each, else ProgrammingError
    with pytest.raises(ValueError, match="incomplete statement"):
        sqlite._statements("CREATE TABLE c(z)")
