"""The real ``ringfence serve --store sqlite:PATH`` process and the real CLI on what the embedded
store's start-up checks left open:

* the state directory's signing key gone, emptied or unreadable beside a store that holds data:
  refused naming the file, what the store holds and what to do, never a new key that no enrolled
  agent accepts; the key is still made for a store that holds nothing (a first start,
  ``--new-store``); the documented rotation (a new key pinned first) starts;
* ``ringfence flows ingest`` refuses an empty file, an SQLite file without ringfence's schema and,
  with ``--create``, a missing store where serve ran, as serve refuses them;
* compute failing to write the published files (``objects/``), in its publish threads too, is
  counted (``StoreUnavailable``) and logged, not only a traceback, whatever the errno (a full
  disk, an immutable directory); an agent's report that cannot be archived there is answered the
  agent API's reason-less 503 with ``Retry-After``, counted, not a bare 500;
* a failed store's reason (``state.db: …``) is told only to an authenticated caller: the admin
  API's, ``/healthz`` with an admin token; the agent API and ``/healthz`` without one answer
  without it, and a bearer route called without a token is 401 as always.
"""

from __future__ import annotations

import contextlib
import gzip
import json
import shutil
import sqlite3
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest

from ringfence import bundle
from ringfence.agentapi import ReportBatch
from tests.agentproc import wait_until
from tests.conftest import EXAMPLE
from tests.onprem.conftest import ESTATE
from tests.onprem.test_serve_store_failures import (
    ADMIN,
    ROOT,
    Serve,
    _checkpoint_when_quiet,
    _scribble_table,
    boot,
    drop_wal,
)
from tests.test_cli import rf

GENERIC = {
    "error": "the control plane is unavailable",
    "detail": "send the request again after Retry-After seconds",
}


@pytest.fixture
def served(tmp_path: Path) -> Iterator[Serve]:
    s = Serve(tmp_path, tmp_path / "state" / "state.db")
    yield s
    s.stop()


def newest_bundles(state: Path) -> dict[str, Path]:
    """Each workload's bundle file of the highest version under ``objects/bundles``."""
    out = {}
    for d in (state / "objects" / "bundles").iterdir():
        out[d.name] = max(d.glob("*.json"), key=lambda p: int(p.name.split("-")[0]))
    return out


def signed_by(path: Path, public: Path) -> bool:
    try:
        bundle.Verifier.from_file(public).verify(bundle.load_bundle(path.read_bytes()))
    except bundle.BundleError:
        return False
    return True


# --- 1: the signing key ----------------------------------------------------------------------------


@pytest.mark.slow
def test_a_lost_signing_key_beside_a_store_with_data_stops_the_start(served: Serve, tmp_path: Path) -> None:
    """signing-key.pem deleted (a restore without it, a wrong `rm`) beside a store holding an
    estate: serve generated a new key that no enrolled agent accepts, and every later bundle was
    refused on every host with no error at the control plane. Now refused naming the file, what
    the store holds and what to do; an empty or unreadable key likewise; no key is written."""
    boot(served)
    served.stop()
    state = served.db.parent
    key, pub = state / "signing-key.pem", state / "signing-key.pub.pem"
    original, pinned = key.read_bytes(), pub.read_bytes()

    key.unlink()
    assert served.start() == 1
    refusal = served.refusal()
    assert refusal.startswith(
        f"error: {key}: no such file, but state.db holds data (3 workload(s), 1 policy version(s), "
        "3 published bundle(s), "
    ), refusal
    assert "audit record(s)): a new key would sign bundles that no enrolled agent accepts" in refusal
    for told in (
        "Restore signing-key.pem from its backup (docs/onprem.md#backup-and-restore)",
        "--signing-key",
        "rotate to a new key (docs/bundle.md#keys-and-rotation): `ringfence keygen`, add its public key to every "
        "agent's key set, then put it here as signing-key.pem and start again",
    ):
        assert told in refusal
    assert not key.exists() and pub.read_bytes() == pinned  # nothing made, the pinned key left as it was

    for content, found in (
        (b"", "an empty file (0 bytes), not a signing key"),
        (b"-----BEGIN PRIVATE KEY-----\nnot base64\n", "not an unencrypted Ed25519 private key (PKCS#8 PEM)"),
    ):
        key.write_bytes(content)
        assert served.start() == 1
        assert served.refusal().startswith(f"error: {key}: {found}, but state.db holds data (3 workload(s), ")
        assert key.read_bytes() == content

    key.write_bytes(original)  # restored from its backup: starts, the published bundles stand
    key.chmod(0o600)
    assert served.start() is None, served.log.read_text()
    assert all(signed_by(p, pub) for p in newest_bundles(state).values())
    served.stop()

    # the documented rotation: a new key, its public key pinned on the agents first, then in place
    rf("keygen", "--out", str(tmp_path / "new"))
    new_pub = tmp_path / "new" / "bundle-signing.pub.pem"
    shutil.copy(tmp_path / "new" / "bundle-signing.pem", key)
    shutil.copy(new_pub, pub)
    assert served.start() is None, served.log.read_text()
    # every bundle the old key signed is signed again by the new one (the rebuild at start)
    wait_until(
        lambda: all(signed_by(p, new_pub) for p in newest_bundles(state).values()), 60, "bundles signed by the new key"
    )


@pytest.mark.slow
def test_the_key_is_still_made_for_a_store_that_holds_nothing(served: Serve) -> None:
    """Generated as before where nothing was signed yet: a store started once with nothing in it,
    and a new store asked for with --new-store in place of a lost one (its agents pair again)."""
    state = served.db.parent
    key = state / "signing-key.pem"
    assert served.start() is None  # a first start on an empty directory makes it
    served.stop()
    first = key.read_bytes()
    key.unlink()
    assert served.start() is None, served.log.read_text()  # nothing registered, nothing signed
    served.stop()
    assert key.read_bytes() != first

    boot(served)
    served.stop()
    drop_wal(served.db)
    served.db.unlink()
    key.unlink()
    assert served.start("--new-store") is None, served.log.read_text()
    served.stop()
    assert bundle.SigningKey.from_file(key).key_id


# --- 2: flows ingest --------------------------------------------------------------------------------


def _flow_log(tmp_path: Path) -> Path:
    log = tmp_path / "flows.log.gz"
    log.write_bytes(
        gzip.compress(
            b"version srcaddr dstaddr dstport protocol start end action log-status\n"
            b"2 10.1.1.10 10.1.2.10 8443 6 1764680000 1764680060 ACCEPT OK\n"
        )
    )
    return log


def _ingest(db: Path, log: Path, *extra: str) -> subprocess.CompletedProcess[str]:
    return rf(
        "flows", "ingest", *extra, "--store", f"sqlite:{db}", "--policy", str(EXAMPLE / "policy"),
        "--inventory", str(EXAMPLE / "inventory.yaml"), str(log), ok=False,
    )  # fmt: skip


def test_flows_ingest_refuses_an_empty_file_as_serve_does(tmp_path: Path) -> None:
    """`flows ingest` made a 0-byte state.db (a failed restore, a truncation) into a new store,
    with or without --create, which serve then started on as a store with a schema: every
    registration, token and audit record forgotten. Refused now as serve refuses it, untouched."""
    log = _flow_log(tmp_path)
    db = tmp_path / "state" / "state.db"
    db.parent.mkdir()
    db.touch()
    for extra in ((), ("--create",)):
        proc = _ingest(db, log, *extra)
        assert proc.returncode == 1 and "Traceback" not in proc.stderr, proc.stderr
        assert proc.stderr.strip() == (
            f"error: {db}: an empty file (0 bytes), not a ringfence store: restore it from its backup "
            "(docs/onprem.md#backup-and-restore), or start a new, empty store in its place with "
            "`ringfence serve --new-store`"
        )
        assert db.stat().st_size == 0

    db.write_bytes(_empty_sqlite(tmp_path))  # what the backup of a mistyped path restores: SQLite, no schema
    proc = _ingest(db, log, "--create")
    assert proc.returncode == 1, proc.stderr
    assert f"error: {db}: an SQLite database without ringfence's schema (user_version 0, no table)" in proc.stderr


def _empty_sqlite(tmp_path: Path) -> bytes:
    """A valid SQLite file with no table (sqlite3 writes none for a database left empty)."""
    other = tmp_path / "empty.db"
    con = sqlite3.connect(other)
    con.execute("PRAGMA user_version = 0")
    con.execute("CREATE TABLE t (x)")
    con.execute("DROP TABLE t")
    con.commit()
    con.close()
    return other.read_bytes()


def test_flows_ingest_create_starts_no_store_where_serve_ran(tmp_path: Path) -> None:
    """--create (left in a script) over a state.db gone beside serve's signing key and published
    objects: refused naming what shows the earlier run, as serve refuses it; where nothing ran it
    starts a store as before, and later runs add to it."""
    log = _flow_log(tmp_path)
    used = tmp_path / "state"
    used.mkdir()
    bundle.SigningKey.generate().write(used / "signing-key.pem", used / "signing-key.pub.pem")
    proc = _ingest(used / "state.db", log, "--create")
    assert proc.returncode == 1 and "Traceback" not in proc.stderr, proc.stderr
    assert proc.stderr.startswith(
        f"error: {used / 'state.db'}: no such file, but {used} was used before (signing-key.pem, signing-key.pub.pem)"
    )
    assert "start once with `ringfence serve --new-store`" in proc.stderr
    assert not (used / "state.db").exists()

    fresh = tmp_path / "flows" / "flows.db"
    proc = _ingest(fresh, log, "--create")
    assert proc.returncode == 0, proc.stderr
    assert "1 flows → 1 rows" in proc.stdout
    for extra in ((), ("--create",)):  # a store with data: ingested into, with or without --create
        proc = _ingest(fresh, log, *extra)
        assert proc.returncode == 0, proc.stderr


# --- 3: compute's failures to publish ----------------------------------------------------------------


@pytest.fixture
def full_objects(served: Serve) -> Iterator[Path]:
    """A full filesystem mounted over the state directory's objects/ (after boot)."""
    if not ROOT:
        pytest.skip("mounting a tmpfs needs root")
    objects = served.db.parent / "objects"
    yield objects
    with contextlib.suppress(Exception):
        subprocess.run(["umount", "-l", str(objects)], check=False)


def test_compute_failing_to_write_published_files_is_counted(served: Serve, full_objects: Path) -> None:
    """The disk under objects/ full while compute publishes (bundles and deltas, written by its
    publish threads): the failure was a traceback in the log only, StoreUnavailable stayed 0 and
    nothing told the operator the estate no longer received changes. Now each failed computation
    counts StoreUnavailable and logs `objects/: No space left on device (compute)`; once there is
    room again the change is published."""
    boot(served)
    assert served.metrics()["ringfence_store_unavailable_total"] == 0
    state = served.db.parent
    before = newest_bundles(state)[ESTATE[0]["id"]]
    subprocess.run(["mount", "-t", "tmpfs", "-o", "size=64k", "tmpfs", str(full_objects)], check=True)
    subprocess.run(["dd", "if=/dev/zero", f"of={full_objects / 'filler'}", "bs=4k"], capture_output=True, check=False)
    wid = ESTATE[0]["id"]
    r = served.call("POST", f"/admin/workloads/{wid}/quarantine", {"reason": "IR-9"})
    assert r.status_code == 200, r.text  # stored: the store itself has room
    wait_until(lambda: served.metrics()["ringfence_store_unavailable_total"] >= 1, 60, "StoreUnavailable counted")
    assert "objects/: No space left on device (compute)" in served.log.read_text()
    assert served.metrics()["ringfence_store_damaged_total"] == 0
    assert httpx.get(f"{served.url}/healthz", timeout=30).status_code == 200  # full is not damaged

    subprocess.run(["umount", "-l", str(full_objects)], check=True)  # room again (the files below it are back)
    r = served.call("DELETE", f"/admin/workloads/{wid}/quarantine", {"reason": "IR-9 closed"})
    assert r.status_code == 200, r.text
    wait_until(lambda: newest_bundles(state)[wid] != before, 60, "published again")


@pytest.fixture
def immutable_bundles(served: Serve) -> Iterator[list[Path]]:
    """objects/bundles and each workload's directory under it made immutable (chattr +i: EPERM to
    root too), as an operator or a restore can leave them; made mutable again at the end."""
    if not ROOT or shutil.which("chattr") is None:
        pytest.skip("chattr +i needs root and chattr")
    made: list[Path] = []
    yield made
    for d in made:
        subprocess.run(["chattr", "-i", str(d)], check=False)


def test_compute_failing_to_write_published_files_is_counted_whatever_the_errno(
    served: Serve, immutable_bundles: list[Path]
) -> None:
    """objects/bundles not writable for a reason that is no full disk (immutable here: EPERM; a
    directory restored as root under serve --user: EACCES): compute failed on every change with
    a traceback only, StoreUnavailable stayed 0 (only ENOSPC, EDQUOT, EIO and EROFS counted) and
    nothing told the operator that no agent received changes. Now any failed write of the
    published files counts and logs `objects/: <the system's text> (compute)`."""
    boot(served)
    state = served.db.parent
    bundles = state / "objects" / "bundles"
    wid = ESTATE[0]["id"]
    before = newest_bundles(state)[wid]
    for d in [bundles, *(p for p in bundles.iterdir() if p.is_dir())]:
        if subprocess.run(["chattr", "+i", str(d)], capture_output=True, check=False).returncode != 0:
            pytest.skip(f"this filesystem does not take chattr +i ({d})")
        immutable_bundles.append(d)
    r = served.call("POST", f"/admin/workloads/{wid}/quarantine", {"reason": "IR-9"})
    assert r.status_code == 200, r.text  # stored: the store itself is writable
    wait_until(lambda: served.metrics()["ringfence_store_unavailable_total"] >= 1, 60, "StoreUnavailable counted")
    [said, *_] = [line for line in served.log.read_text().splitlines() if "objects/: Operation not permitted" in line]
    assert "objects/: Operation not permitted (compute)" in said and str(state) not in said  # no directory
    assert served.metrics()["ringfence_store_damaged_total"] == 0
    assert httpx.get(f"{served.url}/healthz", timeout=30).status_code == 200  # not writable is not damaged

    for d in immutable_bundles:
        subprocess.run(["chattr", "-i", str(d)], check=True)
    r = served.call("DELETE", f"/admin/workloads/{wid}/quarantine", {"reason": "IR-9 closed"})
    assert r.status_code == 200, r.text
    wait_until(lambda: newest_bundles(state)[wid] != before, 60, "published again")


def test_a_report_that_cannot_be_archived_is_answered_503_and_counted(
    served: Serve, full_objects: Path, tmp_path: Path, agent_process: Any
) -> None:
    """A real agent's token, and objects/ full when its report is archived there
    (objects/reports/<wid>/…): the agent API answered a bare 500, uncounted. Now the agent API's
    answer to a failed store, 503 `the control plane is unavailable` with Retry-After (the agent
    sends it again), counted StoreUnavailable and logged naming the request; once there is room
    the same report is accepted."""
    boot(served)
    wid = ESTATE[0]["id"]
    state = served.db.parent
    key = served.call("POST", "/admin/pairing-keys", {"workload_id": wid, "uses": 1, "ttl": 600}).json()
    (tmp_path / "pairing-key").write_text(key["pairing_key"])
    (tmp_path / "agent").mkdir()
    agent = agent_process(
        tmp_path / "agent",
        workload_id=wid,
        public_key=state / "signing-key.pub.pem",
        api_url=served.url,
        enroll={"method": "pairing", "pairing_key_file": str(tmp_path / "pairing-key")},
        backoff_max=2,
        request_timeout=5,
    )
    token_file = agent.state / "token.json"
    wait_until(token_file.exists, 60, "the agent enrolled", agent.log)
    bearer = {"Authorization": f"Bearer {json.loads(token_file.read_text())['token']}"}
    drop = {
        "time": time.time() - 5,
        "direction": "inbound",
        "src": ESTATE[1]["ips"][0],
        "dst": ESTATE[0]["ips"][0],
        "proto": "tcp",
        "sport": 40000,
        "dport": 22,
        "action": "drop",
    }
    batch = {"flows": [], "drops": [drop], "dropped_records": 0}
    reports = f"{served.url}/v1/agents/{wid}/reports"

    subprocess.run(["mount", "-t", "tmpfs", "-o", "size=64k", "tmpfs", str(full_objects)], check=True)
    subprocess.run(["dd", "if=/dev/zero", f"of={full_objects / 'filler'}", "bs=4k"], capture_output=True, check=False)
    before = served.metrics()["ringfence_store_unavailable_total"]
    r = httpx.post(reports, json=batch, headers=bearer, timeout=30)
    assert r.status_code == 503, r.text
    assert r.json() == GENERIC and r.headers["retry-after"] == "5"
    assert served.metrics()["ringfence_store_unavailable_total"] == before + 1
    assert f"objects/: No space left on device (POST /v1/agents/{wid}/reports, answered 503)" in served.log.read_text()
    assert served.metrics()["ringfence_store_damaged_total"] == 0

    subprocess.run(["umount", "-l", str(full_objects)], check=True)  # room again
    r = httpx.post(reports, json=batch, headers=bearer, timeout=30)
    assert (r.status_code, r.json()) == (202, {"accepted": 1}), r.text
    assert list((state / "objects" / "reports" / wid).rglob("*.json"))


def test_a_report_refused_503_costs_the_sender_none_of_its_quota(
    served: Serve, full_objects: Path, tmp_path: Path, agent_process: Any
) -> None:
    """The report quota was spent before the batch was archived: a batch refused 503 because
    objects/ could not be written (the agent sends it again) had already cost its bytes, so the
    agent's next sending of it, once there was room, was refused 429 for the control plane's own
    failure. Now a batch refused with nothing archived is given back to the sender's bucket: here
    the bucket holds one batch and a half and refills at a byte a second, and after two 503s the
    same batch is still accepted."""
    drop = {
        "time": time.time() - 5,
        "direction": "inbound",
        "src": ESTATE[1]["ips"][0],
        "dst": ESTATE[0]["ips"][0],
        "proto": "tcp",
        "sport": 40000,
        "dport": 22,
        "action": "drop",
    }
    batch = {"flows": [], "drops": [drop], "dropped_records": 0}
    size = len(json.dumps(ReportBatch.model_validate(batch).model_dump(mode="json")))  # what the quota counts
    served.env = {"RINGFENCE_REPORT_BURST_BYTES": str(size * 3 // 2), "RINGFENCE_REPORT_BYTES_PER_SECOND": "1"}
    boot(served)
    wid = ESTATE[0]["id"]
    key = served.call("POST", "/admin/pairing-keys", {"workload_id": wid, "uses": 1, "ttl": 600}).json()
    (tmp_path / "pairing-key").write_text(key["pairing_key"])
    (tmp_path / "agent").mkdir()
    agent = agent_process(
        tmp_path / "agent",
        workload_id=wid,
        public_key=served.db.parent / "signing-key.pub.pem",
        api_url=served.url,
        enroll={"method": "pairing", "pairing_key_file": str(tmp_path / "pairing-key")},
        backoff_max=2,
        request_timeout=5,
    )
    token_file = agent.state / "token.json"
    wait_until(token_file.exists, 60, "the agent enrolled", agent.log)
    agent.stop()  # its token only: no report of its own spends the bucket
    bearer = {"Authorization": f"Bearer {json.loads(token_file.read_text())['token']}"}
    reports = f"{served.url}/v1/agents/{wid}/reports"

    subprocess.run(["mount", "-t", "tmpfs", "-o", "size=64k", "tmpfs", str(full_objects)], check=True)
    subprocess.run(["dd", "if=/dev/zero", f"of={full_objects / 'filler'}", "bs=4k"], capture_output=True, check=False)
    for _ in range(2):
        r = httpx.post(reports, json=batch, headers=bearer, timeout=30)
        assert r.status_code == 503, r.text
    subprocess.run(["umount", "-l", str(full_objects)], check=True)  # room again

    r = httpx.post(reports, json=batch, headers=bearer, timeout=30)
    assert (r.status_code, r.json()) == (202, {"accepted": 1}), r.text
    # the bucket still bounds what is written: the next batch does not fit
    r = httpx.post(reports, json=batch, headers=bearer, timeout=30)
    assert r.status_code == 429, r.text


# --- 4: a failed store's reason, to whom ------------------------------------------------------------


def test_attack_an_unauthenticated_caller_learns_nothing_of_a_damaged_store(served: Serve) -> None:
    """The store damaged under a running serve: every /v1 request was answered 503
    `state.db: database disk image is malformed` before any authentication, and /healthz said
    the same to anyone. Now a caller with no token gets 401 on a bearer route as always, the
    agent API's 503 names no reason (a forged token cannot be told from a good one without the
    store), /healthz says only that it is unhealthy; an admin token's holder reads the reason."""
    boot(served)
    _checkpoint_when_quiet(served.db)
    _scribble_table(served.db, "bundle")
    wid = ESTATE[0]["id"]
    served.call("POST", f"/admin/workloads/{wid}/quarantine", {"reason": "IR-7"})
    wait_until(lambda: httpx.get(f"{served.url}/healthz", timeout=30).status_code == 503, 60, "healthz 503")

    url = served.url
    anonymous = [
        httpx.get(f"{url}/v1/agents/{wid}/bundle", timeout=30),
        httpx.get(f"{url}/v1/agents/{wid}/wait?version=1", timeout=30),
        httpx.post(f"{url}/v1/agents/{wid}/heartbeat", json={}, timeout=30),
        httpx.post(f"{url}/v1/agents/{wid}/reports", json={}, headers={"Authorization": "Basic x"}, timeout=30),
    ]
    for r in anonymous:
        assert r.status_code == 401, (r.request.url, r.text)
        assert r.json() == {"error": "missing bearer token", "detail": ""}
    forged = {"Authorization": "Bearer not-a-token-of-this-control-plane"}
    told = [
        httpx.get(f"{url}/v1/agents/{wid}/bundle", headers=forged, timeout=30),
        httpx.get(f"{url}/v1/nonce", timeout=30),
        httpx.post(f"{url}/v1/enroll", json={"workload_id": wid}, timeout=30),
        httpx.post(f"{url}/v1/agents/{wid}/token", json={}, timeout=30),
    ]
    for r in told:
        assert r.status_code == 503, (r.request.url, r.text)
        assert r.json() == GENERIC and r.headers["retry-after"] == "5"
        assert "state.db" not in r.text and "malformed" not in r.text
    health = httpx.get(f"{url}/healthz", timeout=30)
    assert (health.status_code, health.json()) == (503, {"ok": False})
    health = httpx.get(f"{url}/healthz", headers=forged, timeout=30)
    assert (health.status_code, health.json()) == (503, {"ok": False})
    r = httpx.get(f"{url}/admin/workloads", timeout=30)
    assert r.status_code == 401 and "state.db" not in r.text

    # authenticated by the admin tokens file, not by the store: told why
    r = served.call("GET", "/admin/workloads")
    assert r.status_code == 503 and r.json()["error"] == "state.db: database disk image is malformed"
    health = httpx.get(f"{url}/healthz", headers=ADMIN, timeout=30)
    assert health.json() == {"ok": False, "error": "state.db: database disk image is malformed"}
    assert served.metrics()["ringfence_agent_requests_refused_total"] >= len(anonymous)
