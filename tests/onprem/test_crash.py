"""State survives ``kill -9``: the real ``ringfence serve --store sqlite:PATH`` process takes
registrations, pairing enrollments and quarantines over HTTP while compute publishes bundles, and
is SIGKILLed mid-work, three times; then it restarts on the same file.

Nothing acknowledged is lost (every registration, token and quarantine answered 2xx is in the
store and audited; enrolled agents reach their bundles with their tokens), the SQLite file is
sound, no bundle pointer went backwards, the engine head is clean again after the restart's
rebuild, and what is published says what was acknowledged.
"""

from __future__ import annotations

import ipaddress
import os
import signal
import sqlite3
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import httpx

from ringfence import serve
from ringfence.bundle import Bundle, SetDelta, Verifier
from ringfence.control.api import secret_hash
from ringfence.enforced import with_deltas
from ringfence.store.sqlite import SqliteStore
from tests.aws.test_pipeline import AgentKey
from tests.onprem.conftest import policy_files

BIN = Path(sys.executable).parent
TOKEN = "crash-admin-token-0123456789abcdef"
ADMIN = {"Authorization": f"Bearer {TOKEN}"}


def read_pointers(db: Path) -> dict[str, int]:
    """Bundle pointer versions as another process sees them (read-only, while serve runs)."""
    con = sqlite3.connect(f"file:{db}?mode=ro", uri=True, timeout=30)
    try:
        return {wid: v for wid, v in con.execute("SELECT workload_id, version FROM bundle")}
    finally:
        con.close()


@contextmanager
def serving(db: Path, tokens: Path, log: Path) -> Iterator[tuple[subprocess.Popen[str], str]]:
    proc = subprocess.Popen(
        [str(BIN / "ringfence"), "serve", "--port", "0", "--store", f"sqlite:{db}", "--admin-tokens", str(tokens)],
        stdout=subprocess.PIPE,
        stderr=log.open("a"),
        text=True,
    )
    try:
        assert proc.stdout is not None
        line = proc.stdout.readline()
        assert "listening on" in line, log.read_text()
        yield proc, line.split("listening on ")[1].split()[0]
    finally:
        if proc.poll() is None:
            proc.kill()
        proc.wait(15)


def ip(i: int) -> str:
    return f"10.50.{i // 250}.{i % 250 + 1}"


def work(url: str, ids: Iterator[int], acks: list[tuple[str, ...]], stop: threading.Event) -> None:
    """Registrations of ``h<i>`` (a pairing enrollment every 5th, a quarantine every 7th) until
    stopped or the server is gone; each answered 2xx is an acknowledgement."""
    c = httpx.Client(base_url=url, timeout=30)
    try:
        for i in ids:
            if stop.is_set():
                return
            wid = f"h{i}"
            role = "web" if i % 2 else "processing"
            spec = {
                "id": wid,
                "ips": [ip(i)],
                "tags": {
                    "ringfence:role": role,
                    "ringfence:app": "ordering",
                    "ringfence:env": "prod",
                    "ringfence:loc": "ca",
                },
            }
            r = c.post("/admin/workloads", json=spec, headers=ADMIN)
            assert r.status_code == 201, r.text
            acks.append(("register", wid, ip(i)))
            if i % 5 == 0:
                key = c.post("/admin/pairing-keys", json={"workload_id": wid, "uses": 1, "ttl": 3600}, headers=ADMIN)
                nonce = c.get("/v1/nonce").json()["nonce"]
                body = {
                    "method": "pairing",
                    "nonce": nonce,
                    "workload_id": wid,
                    "pairing_key": key.json()["pairing_key"],
                    **AgentKey().enroll_fields(wid, nonce),
                }
                r = c.post("/v1/enroll", json=body)
                assert r.status_code == 200, r.text
                acks.append(("token", wid, r.json()["token"]))
            if i % 7 == 0:
                assert c.post(f"/admin/workloads/{wid}/quarantine", json={"reason": "drill"}, headers=ADMIN).is_success
                acks.append(("quarantine", wid))
    except httpx.TransportError:
        return  # killed: whatever was in flight was never acknowledged


def until(check: Any, timeout: float, what: str) -> Any:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        got = check()
        if got:
            return got
        time.sleep(0.2)
    raise AssertionError(what)


def test_state_survives_kill_9(tmp_path: Path) -> None:
    db, log = tmp_path / "state" / "state.db", tmp_path / "serve.log"
    tokens = tmp_path / "admin-tokens"
    tokens.write_text(f"ops:{serve.token_hash(TOKEN)}:policy-author,incident-responder,onboarding\n")
    acks: list[tuple[str, ...]] = []
    before: dict[str, int] = {}
    for life, n in enumerate((12, 20, 9)):  # three lives, each killed mid-work
        with serving(db, tokens, log) as (proc, url):
            if life == 0:
                assert httpx.post(f"{url}/admin/policies", json={"files": policy_files()}, headers=ADMIN, timeout=60)
            # two clients at once, requests in flight when the kill comes
            stop = threading.Event()
            workers = [
                threading.Thread(
                    target=work, args=(url, iter(range(1000 * life + k, 1000 * (life + 1), 2)), acks, stop)
                )
                for k in (0, 1)
            ]
            registered_before = sum(a[0] == "register" for a in acks)
            for t in workers:
                t.start()
            want = registered_before + n
            until(lambda w=want: sum(a[0] == "register" for a in acks) >= w, 120, "acknowledgements")
            before = read_pointers(db)  # the last versions another process saw
            os.kill(proc.pid, signal.SIGKILL)
            stop.set()
            for t in workers:
                t.join(60)
            proc.wait(15)
            assert proc.returncode == -signal.SIGKILL

    registered = {a[1]: a[2] for a in acks if a[0] == "register"}
    tokens_of = {a[1]: a[2] for a in acks if a[0] == "token"}
    quarantined = {a[1] for a in acks if a[0] == "quarantine"}
    assert len(registered) >= 41 and tokens_of and quarantined
    head_after_kill = SqliteStore(db).head()
    print(f"after the last kill: head {head_after_kill}")

    with serving(db, tokens, log) as (_, url):  # the restart
        store = SqliteStore(db)  # a second reader of the same file (WAL)
        until(lambda: store.head().clean and store.head().revision > head_after_kill.revision, 120, "a clean head")
        assert store.integrity_check() == "ok"
        # nothing acknowledged was lost
        for wid, addr in registered.items():
            rec = store.get(wid)
            assert rec is not None and rec.workload.ips == [addr], wid
        for wid in quarantined:
            assert store.get(wid).op_quarantined  # type: ignore[union-attr]
        audit = store.audit_log()
        assert len({a.id for a in audit}) == len(audit)
        # (a request in flight at the kill may have been committed without its answer: ⊇)
        assert {a.target for a in audit if a.action == "workload.register"} >= set(registered)
        assert {a.target for a in audit if a.action == "workload.quarantine"} >= quarantined
        # pointers intact: never backwards
        for wid, version in before.items():
            ptr = store.bundle_pointer(wid)
            assert ptr is not None and ptr.version >= version, wid
        # enrolled agents reconnect with their tokens and get signed bundles
        enroll = httpx.post(f"{url}/v1/enroll", json={"method": "pairing", "nonce": "x"})  # (a bad one: refused)
        assert enroll.status_code in (401, 422)
        verify = None
        for wid, token in tokens_of.items():
            assert store.token_workload(secret_hash(token)) == wid
            r = until(
                lambda w=wid, t=token: (
                    (
                        x := httpx.get(
                            f"{url}/v1/agents/{w}/bundle", headers={"Authorization": f"Bearer {t}"}, timeout=30
                        )
                    ).status_code
                    == 200
                    and x
                ),
                60,
                f"{wid}'s bundle",
            )
            doc = Bundle.model_validate(r.json())
            verify = verify or Verifier.from_pem((db.parent / "signing-key.pub.pem").read_bytes())
            verify.verify(doc)
            assert doc.workload_id == wid
        # every acknowledged host has a bundle; a processing host admits every web host
        for wid in registered:
            assert store.bundle_pointer(wid) is not None, wid
        proc_wid, proc_token = next(
            (w, t)
            for w, t in tokens_of.items()
            if int(w[1:]) % 2 == 0 and not store.get(w).op_quarantined  # type: ignore[union-attr]
        )
        doc = Bundle.model_validate(
            httpx.get(f"{url}/v1/agents/{proc_wid}/bundle", headers={"Authorization": f"Bearer {proc_token}"}).json()
        )
        # what the agent enforces: the bundle moved on by the set deltas after it (a rebuild adopts
        # a published bundle whose rules are unchanged; its sets then catch up by deltas)
        got = httpx.get(
            f"{url}/v1/agents/{proc_wid}/deltas",
            params={"since": doc.version},
            headers={"Authorization": f"Bearer {proc_token}"},
        )
        assert got.status_code == 200, got.text
        deltas = [SetDelta.model_validate(d) for d in got.json()["deltas"]]
        published = [ipaddress.ip_network(e) for v in with_deltas(doc, deltas).values() for e in v if ":" not in e]
        # (the store's quarantine, not only the acknowledged ones: one in flight at a kill may be committed)
        web = {a for w, a in registered.items() if int(w[1:]) % 2 and not store.get(w).op_quarantined}  # type: ignore[union-attr]
        missing = sorted(a for a in web if not any(ipaddress.ip_address(a) in net for net in published))
        assert not missing, (proc_wid, missing, [store.get(w) for w, a in registered.items() if a in missing])
        store.close()
