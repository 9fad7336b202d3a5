"""The real ``ringfence serve --store sqlite:PATH`` process on a store that is gone, empty,
damaged, full or locked, and on a signing key or state directory it cannot use.

* A missing or 0-byte ``state.db`` beside the published objects and the signing key of an earlier
  run is refused (``error: PATH: …``), never made into a new empty store that forgets every
  registration, token, quarantine and audit record; ``--new-store`` makes one on purpose, and
  never over a file that holds data. A first start on an empty directory is unchanged.
* A damaged store is refused at start (``PRAGMA quick_check``), untouched; damage met while
  serving is answered 503 naming the file, counted (``ringfence_store_damaged_total``), and
  from then on every request is 503 and ``/healthz`` too, rather than acknowledging writes
  that never reach a bundle.
* A full disk or a lock held past the busy timeout is answered 503 ``state.db: <reason>`` with
  ``Retry-After``, counted (``ringfence_store_unavailable_total``): no bare 500, no dropped
  connection; the body names the file, never its directory.
* A signing key that does not load and a read-only state directory stop the start with
  ``error: PATH: reason``, no traceback; the key is written whole (temporary file, renamed).
"""

from __future__ import annotations

import contextlib
import hashlib
import os
import sqlite3
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest

from ringfence import serve
from ringfence.bundle import SigningKey
from tests.agentproc import wait_until
from tests.onprem.conftest import ESTATE, policy_files, sqlite_backup
from tests.onprem.test_serve_metrics import counts

BIN = Path(sys.executable).parent
TOKEN = "store-failures-admin-token-0123456789abcdef"
ADMIN = {"Authorization": f"Bearer {TOKEN}"}
ROOT = os.geteuid() == 0


class Serve:
    """One ``ringfence serve`` process on ``db`` (stopped at the end of the test)."""

    def __init__(self, tmp: Path, db: Path) -> None:
        self.db = db
        self.tokens = tmp / "admin-tokens"
        self.tokens.write_text(f"ops:{serve.token_hash(TOKEN)}:policy-author,incident-responder,onboarding\n")
        self.log = tmp / "serve.log"
        self.proc: subprocess.Popen[str] | None = None
        self.url = ""
        self.env: dict[str, str] = {}

    def start(self, *extra: str) -> int | None:
        """The URL is set once it listens; otherwise the exit code (the refusal is the log's last line)."""
        self.log.write_text("")
        self.proc = subprocess.Popen(
            [
                str(BIN / "ringfence"),
                "serve",
                "--port",
                "0",
                "--store",
                f"sqlite:{self.db}",
                "--admin-tokens",
                str(self.tokens),
                *extra,
            ],
            stdout=subprocess.PIPE,
            stderr=self.log.open("a"),
            text=True,
            env={**os.environ, **self.env},
        )
        assert self.proc.stdout is not None
        line = self.proc.stdout.readline()
        if "listening on" not in line:
            return self.proc.wait(30)
        self.url = line.split("listening on ")[1].split()[0]
        return None

    def refusal(self) -> str:
        text = self.log.read_text()
        assert "Traceback" not in text, text
        return text.strip().splitlines()[-1]

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.terminate()
            self.proc.wait(30)

    def call(self, method: str, path: str, body: Any = None, timeout: float = 60) -> httpx.Response:
        return httpx.request(method, self.url + path, json=body, headers=ADMIN, timeout=timeout)

    def metrics(self) -> dict[str, float]:
        return counts(httpx.get(f"{self.url}/metrics", headers=ADMIN, timeout=30).text)


@pytest.fixture
def served(tmp_path: Path) -> Iterator[Serve]:
    s = Serve(tmp_path, tmp_path / "state" / "state.db")
    yield s
    s.stop()


def boot(s: Serve) -> None:
    """A first start on an empty directory: an estate registered, a policy provisioned, bundles published."""
    assert s.start() is None, s.log.read_text()
    for spec in ESTATE:
        assert s.call("POST", "/admin/workloads", spec).status_code == 201
    assert s.call("POST", "/admin/policies", {"files": policy_files(), "reason": "initial"}).status_code == 201
    bundles = s.db.parent / "objects" / "bundles"
    wait_until(lambda: bundles.is_dir() and len(list(bundles.rglob("*.json"))) >= len(ESTATE), 60, "bundles published")


def drop_wal(db: Path) -> None:
    for suffix in ("-wal", "-shm"):
        with contextlib.suppress(FileNotFoundError):
            db.with_name(db.name + suffix).unlink()


def rows(db: Path, table: str) -> int:
    con = sqlite3.connect(f"file:{db}?mode=ro", uri=True, timeout=30)
    try:
        return int(con.execute(f"SELECT count(*) FROM {table}").fetchone()[0])
    finally:
        con.close()


# --- 1: a store that is gone or empty ------------------------------------------------------------


def test_attack_emptied_state_db_is_refused_not_started_afresh(served: Serve) -> None:
    """state.db truncated to 0 bytes (a failed restore, a full disk, a hand that wipes the audit
    log and the quarantines): serve refuses it, untouched, instead of a new empty store; only
    --new-store makes one, and never over a store that holds data."""
    boot(served)
    served.stop()
    drop_wal(served.db)
    served.db.write_bytes(b"")
    assert served.start() == 1
    assert served.refusal() == (
        f"error: {served.db}: an empty file (0 bytes), not a ringfence store: restore it from its backup "
        "(docs/onprem.md#backup-and-restore), or start a new, empty store in its place with --new-store"
    )
    assert served.db.stat().st_size == 0  # nothing written to it

    assert served.start("--new-store") is None, served.log.read_text()
    served.stop()
    assert rows(served.db, "inventory") == rows(served.db, "audit") == 0  # asked for: a new, empty store
    assert served.start("--new-store") == 1  # left in a unit file: refused, the new store is kept
    assert f"error: {served.db}: --new-store, but the file holds" in served.refusal()
    assert served.start() is None


def test_attack_an_empty_sqlite_backup_restored_is_refused_not_started_afresh(served: Serve) -> None:
    """The documented backup of a mistyped path (`sqlite3 state.db ".backup …"` in the wrong
    directory) exits 0 and writes a valid but empty SQLite file; restored as state.db it passed
    the start-up checks (not 0 bytes, quick_check ok) and serve started a new, empty store beside
    the signing key and published objects. Now refused like an empty file; --new-store makes the
    new store in it (it holds no table), and a database of something else is never started over."""
    boot(served)
    served.stop()
    drop_wal(served.db)
    wrong = served.db.parent.parent / "state.db"  # `sqlite3 state.db` run one directory too high
    backup = served.db.parent.parent / "backup.db"
    sqlite_backup(wrong, backup)
    served.db.unlink()
    backup.rename(served.db)  # restored as documented
    size = served.db.stat().st_size
    assert size > 0
    assert served.start() == 1
    assert served.refusal() == (
        f"error: {served.db}: an SQLite database without ringfence's schema (user_version 0, no table), not a "
        "ringfence store (a backup of a wrong path?): restore it from its backup "
        "(docs/onprem.md#backup-and-restore), or start a new, empty store in its place with --new-store"
    )
    assert served.db.stat().st_size == size and rows_of(served.db) == []  # nothing written to it

    other = sqlite3.connect(served.db)  # another program's database: never started over
    other.execute("CREATE TABLE t (x)")
    other.commit()
    other.close()
    assert served.start() == 1
    assert "(user_version 0, 1 table(s) of something else)" in served.refusal()
    assert served.refusal().endswith("or move it aside")
    assert served.start("--new-store") == 1
    assert f"error: {served.db}: --new-store, but the file holds" in served.refusal()

    other = sqlite3.connect(served.db)
    other.execute("DROP TABLE t")
    other.commit()
    other.close()
    assert served.start("--new-store") is None, served.log.read_text()  # asked for: a new store in it
    served.stop()
    assert rows(served.db, "inventory") == 0
    assert served.start() is None


def rows_of(db: Path) -> list[str]:
    con = sqlite3.connect(db)
    try:
        return [r[0] for r in con.execute("SELECT name FROM sqlite_master")]
    finally:
        con.close()


def test_attack_missing_state_db_is_refused_where_the_directory_was_used(served: Serve) -> None:
    """state.db gone (a wrong path, a lost file) beside the signing key and the published
    bundles and policies: refused naming what shows the earlier run; no file is created."""
    boot(served)
    served.stop()
    drop_wal(served.db)
    served.db.unlink()
    assert served.start() == 1
    refusal = served.refusal()
    assert refusal.startswith(f"error: {served.db}: no such file, but {served.db.parent} was used before (")
    for found in ("signing-key.pem", "objects/bundles/", "objects/policies/"):
        assert found in refusal
    assert "--new-store" in refusal and "docs/onprem.md#backup-and-restore" in refusal
    assert not served.db.exists()


def test_a_first_start_on_an_empty_directory_is_unchanged(tmp_path: Path) -> None:
    """No earlier run (the agent artifact `publish-agent` put there may be): serve starts and makes
    the store. An empty file is refused there too: it is no store."""
    s = Serve(tmp_path, tmp_path / "fresh" / "state.db")
    (s.db.parent / "objects" / "agent").mkdir(parents=True)
    (s.db.parent / "objects" / "agent" / "install.sh").write_text("#!/bin/sh\n")
    try:
        assert s.start() is None, s.log.read_text()
        c = s.metrics()  # alerted on: there at zero from the start
        assert c["ringfence_store_unavailable_total"] == c["ringfence_store_damaged_total"] == 0
        s.stop()
        assert rows(s.db, "inventory") == 0
        other = Serve(tmp_path, tmp_path / "touched" / "state.db")
        other.db.parent.mkdir()
        other.db.touch()
        assert other.start() == 1
        assert "an empty file (0 bytes), not a ringfence store" in other.refusal()
    finally:
        s.stop()


# --- 3: a damaged store --------------------------------------------------------------------------


def _checkpoint(db: Path) -> None:
    con = sqlite3.connect(db, timeout=30)
    try:
        assert con.execute("PRAGMA wal_checkpoint(TRUNCATE)").fetchone()[0] == 0
    finally:
        con.close()


def _checkpoint_when_quiet(db: Path) -> None:
    """Every page in the file itself, and compute done writing: a page still in the WAL (compute
    writing the boot's last pointers) is read from there, and its checkpoint would undo the damage."""
    wal = db.with_name(db.name + "-wal")

    def quiet() -> bool:
        _checkpoint(db)
        time.sleep(1)
        return not wal.exists() or wal.stat().st_size == 0

    wait_until(quiet, 60, "no write for a second after a checkpoint")


def _scribble_table(db: Path, table: str) -> None:
    """Overwrite the cells of ``table``'s root page in the file, as a bad sector or a stray write would."""
    con = sqlite3.connect(f"file:{db}?mode=ro", uri=True)
    try:
        root = con.execute("SELECT rootpage FROM sqlite_master WHERE name = ?", (table,)).fetchone()[0]
        size = con.execute("PRAGMA page_size").fetchone()[0]
    finally:
        con.close()
    with db.open("r+b") as f:
        f.seek((root - 1) * size + 8)
        f.write(os.urandom(size - 8))
        f.flush()
        os.fsync(f.fileno())


def test_a_damaged_store_is_refused_at_start_untouched(served: Serve) -> None:
    boot(served)
    served.stop()
    _checkpoint(served.db)
    _scribble_table(served.db, "bundle")
    before = hashlib.sha256(served.db.read_bytes()).hexdigest()
    assert served.start() == 1
    refusal = served.refusal()
    # what quick_check lists, or its own refusal of a page it cannot read at all (the scribble is random)
    assert refusal.startswith(f"error: {served.db}: damaged (SQLite"), refusal
    assert "serve does not start on a damaged store" in refusal
    assert "restore state.db from its backup (docs/onprem.md#backup-and-restore)" in refusal
    assert hashlib.sha256(served.db.read_bytes()).hexdigest() == before


def test_damage_met_while_serving_is_answered_503_and_stops_the_store(served: Serve) -> None:
    """The bundle table's root page damaged under a running serve: the quarantine is stored (its
    table is sound), compute meets the damage once, counts it and stops; from then on every
    request is 503 naming the file (never a 201 for a change no bundle will carry) and /healthz
    says so. Before: compute failed every batch in the log only, writes kept being acknowledged."""
    boot(served)
    _checkpoint_when_quiet(served.db)
    _scribble_table(served.db, "bundle")
    wid = ESTATE[0]["id"]
    served.call("POST", f"/admin/workloads/{wid}/quarantine", {"reason": "IR-7"})
    wait_until(lambda: httpx.get(f"{served.url}/healthz", timeout=30).status_code == 503, 60, "healthz 503")
    health = httpx.get(f"{served.url}/healthz", headers=ADMIN, timeout=30).json()  # why: to an admin token only
    assert health == {"ok": False, "error": "state.db: database disk image is malformed"}
    r = served.call("POST", "/admin/workloads", {**ESTATE[0], "id": "dc1-web-9", "ips": ["192.168.10.19"]})
    assert r.status_code == 503, r.text
    assert r.json()["error"] == "state.db: database disk image is malformed"
    assert "restores it from a backup" in r.json()["detail"]
    assert str(served.db.parent) not in r.text
    assert httpx.get(f"{served.url}/v1/nonce", timeout=30).status_code == 503
    assert served.metrics()["ringfence_store_damaged_total"] >= 1
    assert "state.db: database disk image is malformed (compute): the store is damaged" in served.log.read_text()


# --- 5: a store unavailable for now --------------------------------------------------------------


@pytest.fixture
def small_fs(tmp_path: Path) -> Iterator[Path]:
    if not ROOT:
        pytest.skip("mounting a tmpfs needs root")
    mnt = tmp_path / "mnt"
    mnt.mkdir()
    subprocess.run(["mount", "-t", "tmpfs", "-o", "size=1536k", "tmpfs", str(mnt)], check=True)
    try:
        yield mnt
    finally:
        subprocess.run(["umount", "-l", str(mnt)], check=False)


def test_a_full_disk_is_answered_503_with_retry_after(tmp_path: Path, small_fs: Path) -> None:
    s = Serve(tmp_path, small_fs / "state" / "state.db")
    try:
        boot(s)
        filler = small_fs / "filler"
        subprocess.run(["dd", "if=/dev/zero", f"of={filler}", "bs=4k"], capture_output=True, check=False)
        answers = []
        for i in range(12):  # every one answered (no reset connection), each 503 or done
            spec = {**ESTATE[0], "id": f"dc1-web-{10 + i}", "ips": [f"192.168.11.{10 + i}"]}
            answers.append(s.call("POST", "/admin/workloads", spec))
        full = [r for r in answers if r.status_code == 503]
        assert full and {r.status_code for r in answers} <= {201, 503}, [(r.status_code, r.text) for r in answers]
        for r in full:
            assert r.status_code == 503, r.text
            assert r.headers["retry-after"] == "5"
            assert r.json() == {
                "error": "state.db: database or disk is full",
                "detail": "the control plane's store could not complete this request (it may be partly done): "
                "send it again after Retry-After seconds",
            }
        r = httpx.get(f"{s.url}/v1/nonce", timeout=30)  # the agent API's caller is told no reason
        assert (r.status_code, r.headers["retry-after"]) == (503, "5"), r.text
        assert r.json() == {
            "error": "the control plane is unavailable",
            "detail": "send the request again after Retry-After seconds",
        }
        assert s.metrics()["ringfence_store_unavailable_total"] >= len(full) + 1
        assert "state.db: database or disk is full (POST /admin/workloads, answered 503)" in s.log.read_text()
        assert httpx.get(f"{s.url}/healthz", timeout=30).status_code == 200  # full is not damaged
        filler.unlink()
        spec = {**ESTATE[0], "id": "dc1-web-99", "ips": ["192.168.11.99"]}
        assert s.call("POST", "/admin/workloads", spec).status_code == 201
    finally:
        s.stop()


def test_a_lock_held_past_the_busy_timeout_is_answered_503(served: Serve) -> None:
    """Another process holds the write lock (a backup tool, a stuck script) longer than serve's
    busy timeout (``RINGFENCE_STORE_BUSY_TIMEOUT``, 30 s by default; 3 s here): the registration
    is answered 503 ``state.db: database is locked``."""
    served.env["RINGFENCE_STORE_BUSY_TIMEOUT"] = "3"
    boot(served)
    other = sqlite3.connect(served.db, timeout=120, isolation_level=None)  # compute may still be writing
    other.execute("BEGIN IMMEDIATE")
    try:
        spec = {**ESTATE[0], "id": "dc1-web-7", "ips": ["192.168.10.17"]}
        r = served.call("POST", "/admin/workloads", spec, timeout=120)
    finally:
        other.execute("ROLLBACK")
        other.close()
    assert r.status_code == 503, r.text
    assert r.json()["error"] == "state.db: database is locked"
    assert r.headers["retry-after"] == "5"
    r = served.call("POST", "/admin/workloads", spec, timeout=120)
    assert r.status_code in (200, 201), r.text


@pytest.mark.parametrize("value", ["30s", "0", "0.0004", "nan", "3601"])
def test_a_busy_timeout_setting_that_is_not_seconds_stops_the_start_naming_it(served: Serve, value: str) -> None:
    served.env["RINGFENCE_STORE_BUSY_TIMEOUT"] = value
    assert served.start() == 1
    assert served.refusal() == (
        f"error: RINGFENCE_STORE_BUSY_TIMEOUT={value!r}: must be a number of seconds from 0.001 to 3600"
    )
    assert not served.db.exists()  # refused before the store is touched


# --- 6: the signing key and the state directory --------------------------------------------------


@pytest.mark.parametrize(
    ("content", "reason"),
    [
        (b"", "an empty file (0 bytes), not a signing key"),
        (b"-----BEGIN PRIVATE KEY-----\nnot base64\n", "not an unencrypted Ed25519 private key (PKCS#8 PEM)"),
    ],
)
def test_a_signing_key_that_does_not_load_stops_the_start_naming_it(served: Serve, content: bytes, reason: str) -> None:
    assert served.start() is None
    served.stop()
    key = served.db.parent / "signing-key.pem"
    key.write_bytes(content)
    assert served.start() == 1
    assert served.refusal() == f"error: {key}: {reason}"


def test_a_read_only_state_directory_stops_the_start_naming_it(tmp_path: Path, small_fs: Path) -> None:
    s = Serve(tmp_path, small_fs / "state" / "state.db")
    try:
        assert s.start() is None
        s.stop()
        subprocess.run(["mount", "-o", "remount,ro", str(small_fs)], check=True)
        assert s.start() == 1
        assert s.refusal() == f"error: {s.db.parent / 'lock'}: Read-only file system"
    finally:
        s.stop()


def test_the_signing_key_is_written_whole_by_a_rename(tmp_path: Path) -> None:
    """Written to a temporary file (mode 600 from its creation), fsynced and renamed: an existing
    file is replaced, not rewritten in place, and nothing else is left in the directory."""
    private, public = tmp_path / "signing-key.pem", tmp_path / "signing-key.pub.pem"
    private.write_bytes(b"")  # an empty key left by an earlier crash
    inode = private.stat().st_ino
    key = SigningKey.generate()
    key.write(private, public)
    assert private.stat().st_ino != inode
    assert private.stat().st_mode & 0o777 == 0o600
    assert SigningKey.from_file(private).key_id == key.key_id
    assert sorted(p.name for p in tmp_path.iterdir()) == ["signing-key.pem", "signing-key.pub.pem"]
