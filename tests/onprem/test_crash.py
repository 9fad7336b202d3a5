"""State survives ``kill -9``: a real process writes through LocalWiring (registrations, pairing
enrollments, quarantines, compute publishing bundles) and is SIGKILLed mid-work, three times;
then the control plane restarts on the same state directory.

Nothing acknowledged is lost (every acknowledged registration, token and quarantine is in the
store and audited), the SQLite file is sound, no bundle pointer went backwards, the engine head is
clean again after the restart's rebuild, and what is published says what was acknowledged.
"""

from __future__ import annotations

import ipaddress
import os
import queue
import signal
import sqlite3
import subprocess
import sys
import threading
import time
from pathlib import Path

from ringfence.bundle import Bundle, SigningKey, Verifier, load_bundle
from ringfence.clouds.aws.api import secret_hash
from ringfence.local.wiring import LocalWiring
from ringfence.store.sqlite import SqliteStore

ROOT = Path(__file__).resolve().parents[2]


def read_pointers(db: Path) -> dict[str, int]:
    """Bundle pointer versions as another process sees them (read-only, while the writer runs)."""
    con = sqlite3.connect(f"file:{db}?mode=ro", uri=True, timeout=30)
    try:
        return {wid: v for wid, v in con.execute("SELECT workload_id, version FROM bundle")}
    finally:
        con.close()


class Writer:
    def __init__(self, state: Path, key: Path, first: int) -> None:
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "tests.onprem.crash_writer", str(state), str(key), str(first)],
            cwd=ROOT,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        self.lines: queue.Queue[str] = queue.Queue()
        threading.Thread(target=self._pump, daemon=True).start()

    def _pump(self) -> None:
        assert self.proc.stdout is not None
        for line in self.proc.stdout:
            self.lines.put(line.strip())

    def acks_until(self, registrations: int, timeout: float = 120) -> list[list[str]]:
        out: list[list[str]] = []
        deadline = time.monotonic() + timeout
        while sum(a[1] == "register" for a in out) < registrations:
            try:
                out.append(self.lines.get(timeout=max(0.1, deadline - time.monotonic())).split())
            except queue.Empty:
                self.proc.kill()
                raise AssertionError(f"writer stalled: {self.proc.stderr.read() if self.proc.stderr else ''}") from None
        return out

    def kill9(self) -> list[list[str]]:
        os.kill(self.proc.pid, signal.SIGKILL)
        self.proc.wait(30)
        assert self.proc.returncode == -signal.SIGKILL
        # acknowledgements already written to the pipe before the kill count too
        out = []
        while True:
            try:
                out.append(self.lines.get(timeout=1).split())
            except queue.Empty:
                return [a for a in out if a and a[0] == "ack"]


def test_state_survives_kill_9(tmp_path: Path) -> None:
    state, keyfile = tmp_path / "state", tmp_path / "signing.pem"
    key = SigningKey.generate()
    key.write(keyfile, tmp_path / "signing.pub.pem")
    acks: list[list[str]] = []
    before: dict[str, int] = {}
    first = 0
    for n in (12, 20, 9):  # three lives, each killed mid-work
        writer = Writer(state, keyfile, first)
        acks += writer.acks_until(n)
        before = read_pointers(state / "state.db")  # the last versions another process saw
        acks += writer.kill9()
        first = max(int(a[2][1:]) for a in acks if a[1] == "register") + 1

    registered = {a[2]: a[3] for a in acks if a[1] == "register"}
    tokens = {a[2]: a[3] for a in acks if a[1] == "token"}
    quarantined = {a[2] for a in acks if a[1] == "quarantine"}
    assert len(registered) >= 41 and tokens and quarantined

    head_after_kill = SqliteStore(state / "state.db").head()
    print(f"after the last kill: head {head_after_kill}, {len(registered)} registrations acknowledged")
    with LocalWiring(state / "state.db", signing_key=keyfile) as w:  # the restart
        assert w.settle(120)
        store = w.store
        assert isinstance(store, SqliteStore) and store.integrity_check() == "ok"
        # nothing acknowledged was lost
        for wid, ip in registered.items():
            rec = store.get(wid)
            assert rec is not None and rec.workload.ips == [ip], wid
        for wid, token in tokens.items():
            assert store.token_workload(secret_hash(token)) == wid, "an enrolled agent reconnects with its token"
            assert store.get(wid).enrolled  # type: ignore[union-attr]
        for wid in quarantined:
            assert store.get(wid).op_quarantined  # type: ignore[union-attr]
        audit = store.audit_log()
        assert len({a.id for a in audit}) == len(audit)
        assert {a.target for a in audit if a.action == "workload.register"} >= set(registered)
        assert {a.target for a in audit if a.action == "workload.quarantine"} >= quarantined
        # the head is clean (rebuilt if the kill left it reserved) and never went backwards
        head = store.head()
        assert head.clean and head.revision >= head_after_kill.revision and head.policy_version == 1
        # pointers intact: never backwards, each names a stored, signed bundle
        verifier = Verifier.from_pem(key.public_pem())
        for wid, version in before.items():
            ptr = store.bundle_pointer(wid)
            assert ptr is not None and ptr.version >= version, wid
        web_ips = {ip for wid, ip in registered.items() if int(wid[1:]) % 2 and wid not in quarantined}
        for wid in registered:
            ptr = store.bundle_pointer(wid)
            assert ptr is not None, f"{wid} has a bundle after the restart"
            doc: Bundle = load_bundle(w.publisher.get(ptr.key))
            verifier.verify(doc)
            assert doc.version == ptr.version
        # what is published says what was acknowledged: a processing host admits every web host
        proc = next(wid for wid in registered if int(wid[1:]) % 2 == 0 and wid not in quarantined)
        from ringfence.clouds.aws.agents import AgentApi

        cur = AgentApi(w).current(proc)
        assert isinstance(cur, tuple)
        published = [ipaddress.ip_network(e) for s in Bundle.model_validate(cur[1]).sets.values() for e in s.v4]
        assert all(any(ipaddress.ip_address(ip) in net for net in published) for ip in web_ips)
