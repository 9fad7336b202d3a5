"""How the real ``ringfence`` CLI opens a ``sqlite:`` store it only reads: a mistyped path is an
error (no empty database made and reported as "0 findings"), the file is opened read-only (no
schema statement, no journal-mode change), and a refusal is an ``error: <path>: …`` line."""

from __future__ import annotations

import os
import shutil
import sqlite3
import subprocess
import tempfile
import time
from pathlib import Path

import pytest

from ringfence.store.base import AuditRecord
from ringfence.store.sqlite import SqliteStore
from tests.conftest import EXAMPLE
from tests.test_cli import BIN, rf

POLICY, INVENTORY = str(EXAMPLE / "policy"), str(EXAMPLE / "inventory.yaml")


def _state(tmp_path: Path) -> Path:
    db = tmp_path / "state" / "state.db"
    store = SqliteStore(db)
    store.audit(AuditRecord(principal="alice", action="policy.provision", target="policy/1"))
    store.close()
    return db


def test_commands_that_only_read_refuse_a_store_that_is_not_there(tmp_path: Path) -> None:
    typo = tmp_path / "nope" / "stat.db"
    spec = f"sqlite:{typo}"
    for args in (
        ("findings", "--store", spec),
        ("map", "--policy", POLICY, "--inventory", INVENTORY, "--flows", spec),
        ("suggest", "--policy", POLICY, "--app", "ordering", "--env", "prod", "--flows", spec),
        ("labels", "check", "--policy", POLICY, "--flows", spec),
        ("audit", "verify", "--store", spec),
        ("flows", "ingest", "--store", spec, "--policy", POLICY, str(tmp_path / "x.log")),
    ):
        proc = rf(*args, ok=False)
        assert proc.returncode == 1 and "Traceback" not in proc.stderr, (args, proc.stderr)
        assert "no such database file" in proc.stderr, (args, proc.stderr)
        assert not typo.parent.exists(), args  # nothing created


def test_a_store_of_a_newer_release_is_refused_untouched(tmp_path: Path) -> None:
    db = _state(tmp_path)
    with sqlite3.connect(db) as c:
        c.execute("PRAGMA user_version = 9")
        c.execute("PRAGMA journal_mode = DELETE")
    for args in (("audit", "verify", "--store", f"sqlite:{db}"), ("findings", "--store", f"sqlite:{db}")):
        proc = rf(*args, ok=False)
        assert proc.returncode == 1 and "Traceback" not in proc.stderr
        assert f"error: {db}: schema version 9 is newer than this ringfence knows" in proc.stderr
    with sqlite3.connect(db) as c:
        assert c.execute("PRAGMA journal_mode").fetchone()[0] == "delete"


def test_a_reader_does_not_wait_for_a_writer(tmp_path: Path) -> None:
    db = _state(tmp_path)
    writer = sqlite3.connect(db, isolation_level=None)
    writer.execute("BEGIN IMMEDIATE")
    writer.execute("INSERT INTO meta VALUES ('x', 'y')")
    try:
        t = time.monotonic()
        proc = rf("audit", "verify", "--store", f"sqlite:{db}")
        assert time.monotonic() - t < 15
        assert proc.stdout.startswith("ok: 1 record(s) chained")
    finally:
        writer.execute("ROLLBACK")
        writer.close()


@pytest.mark.skipif(os.geteuid() != 0 or shutil.which("setpriv") is None, reason="needs root and setpriv")
def test_an_auditor_verifies_a_read_only_copy(tmp_path: Path) -> None:
    db = _state(tmp_path)
    copy = Path(tempfile.mkdtemp(prefix="rf-ro-"))  # root's, 0700 until opened to read below
    shutil.copy(db, copy / "state.db")  # WAL mode, no -wal or -shm beside it
    os.chmod(copy, 0o755)
    os.chmod(copy / "state.db", 0o444)
    before = sorted(p.name for p in copy.iterdir())
    proc = subprocess.run(
        ["setpriv", "--reuid=65534", "--regid=65534", "--clear-groups",
         str(BIN), "audit", "verify", "--store", f"sqlite:{copy / 'state.db'}"],
        capture_output=True, text=True, timeout=120, cwd="/",
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.startswith("ok: 1 record(s) chained")
    assert sorted(p.name for p in copy.iterdir()) == before
    shutil.rmtree(copy)
