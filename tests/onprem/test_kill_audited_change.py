"""``ringfence serve`` killed with SIGKILL between an admin change's audit record and the change
itself (a provisioning's activation, a quarantine or release): the audit log must never claim a
change that did not happen. Another process opens ``state.db`` as any CLI would and takes SQLite's
write lock after each commit of serve's: the moment it finds a record whose change is not there
(the record committed before its change), it kills serve right there, as a crash, an OOM kill or
a power loss would. With the record and the change in one transaction there is no such moment;
serve is then killed with a provisioning waiting on that lock. After a restart: every record's
change is in the store (or a follow-up record says it failed), and ``ringfence audit verify``
passes."""

from __future__ import annotations

import contextlib
import json
import signal
import sqlite3
import subprocess
import threading
import time
from typing import Any

import httpx
import pytest

from tests.agentproc import BIN
from tests.onprem.conftest import policy_files, provision_estate
from tests.onprem.serveproc import Server

WID = "dc1-web-1"


def claimed_not_done(db: sqlite3.Connection, seen: int) -> str | None:
    """A record after ``seen`` whose change the store does not hold (and no follow-up names)."""
    recs = [json.loads(r[0]) for r in db.execute("SELECT doc FROM audit WHERE seq > ? ORDER BY seq", (seen,))]
    followed = {r["detail"].get("audit_id") for r in recs if r["action"].count(".") == 2}
    history = {r[0] for r in db.execute("SELECT number FROM policy")}
    quarantined = db.execute("SELECT 1 FROM quarantine WHERE workload_id = ?", (WID,)).fetchone() is not None
    last_op = None
    for r in recs:
        if r["id"] in followed:
            continue
        if r["action"] == "policy.provision" and int(r["target"].split("v")[-1]) not in history:
            return f"{r['action']} {r['target']}"
        if r["action"] in ("workload.quarantine", "workload.release") and r["target"] == WID:
            last_op = r["action"]
    if last_op is not None and (last_op == "workload.quarantine") != quarantined:
        return f"{last_op} {WID} (quarantined: {quarantined})"
    return None


@pytest.mark.slow
def test_kill_9_between_an_admin_change_and_its_record_leaves_no_false_record(server: Server) -> None:
    provision_estate(server)
    assert server.proc is not None
    proc = server.proc
    start = sqlite3.connect(server.db).execute("SELECT MAX(seq) FROM audit").fetchone()[0]

    caught: list[str] = []
    stop = threading.Event()

    def watch() -> None:
        db = sqlite3.connect(server.db, timeout=30, isolation_level=None)
        while not stop.is_set():
            db.execute("BEGIN IMMEDIATE")  # serve's next write waits on this
            what = claimed_not_done(db, start)
            if what is not None:
                proc.send_signal(signal.SIGKILL)
                proc.wait(10)
                caught.append(what)
                db.execute("ROLLBACK")
                break
            db.execute("COMMIT")
            time.sleep(0.0005)
        db.close()

    watcher = threading.Thread(target=watch, daemon=True)
    watcher.start()
    files = policy_files()
    try:
        for n in range(30):
            if caught:
                break
            edited = {**files, "tests.yaml": files["tests.yaml"] + f"\n# edit {n}\n"}
            server.admin("POST", "/admin/policies", {"files": edited, "reason": f"change {n}"})
            server.admin("POST", f"/admin/workloads/{WID}/quarantine", {"reason": f"drill {n}"})
            server.admin("DELETE", f"/admin/workloads/{WID}/quarantine", {"reason": f"drill {n} over"})
    except httpx.TransportError:
        pass  # killed under a request
    stop.set()
    watcher.join(30)
    assert not caught, f"a record committed before its change: {caught[0]}"

    # no such moment: serve killed with a provisioning (and a quarantine) waiting on the write lock
    db = sqlite3.connect(server.db, timeout=30, isolation_level=None)
    db.execute("BEGIN IMMEDIATE")
    edited = {**files, "tests.yaml": files["tests.yaml"] + "\n# the last edit\n"}
    sent = [
        threading.Thread(target=lambda: _quietly(server.admin, "POST", "/admin/policies", {"files": edited})),
        threading.Thread(target=lambda: _quietly(server.admin, "POST", f"/admin/workloads/{WID}/quarantine", {})),
    ]
    for t in sent:
        t.start()
    time.sleep(1.5)
    proc.send_signal(signal.SIGKILL)
    proc.wait(10)
    db.execute("ROLLBACK")
    db.close()
    for t in sent:
        t.join(30)

    server.start()  # on the same state
    server.stop()
    ro = sqlite3.connect(f"file:{server.db}?mode=ro", uri=True)
    assert claimed_not_done(ro, start) is None
    ro.close()
    verify = subprocess.run(
        [str(BIN / "ringfence"), "audit", "verify", "--store", f"sqlite:{server.db}"],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert verify.returncode == 0 and "ok" in verify.stdout, verify.stdout + verify.stderr


def _quietly(call: Any, *args: Any) -> None:
    with contextlib.suppress(httpx.TransportError):  # serve killed under it
        call(*args)
