"""``ringfence serve --store sqlite:PATH`` as a process, with a real (dry-run) agent: workloads
registered and a pairing key minted through the admin API, the agent enrolled with it, the keys
it must refuse refused, a policy change pushed through the wait long-poll, and — after the server
is killed with SIGKILL and started again on the same state — the agent carries on with the token
it holds and follows the next change."""

from __future__ import annotations

import signal
import ssl
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest

from ringfence import serve
from ringfence.local.tls import LabTls
from tests.agentproc import BIN, POLL_INTERVAL, wait_until
from tests.agentproc import agent_status as status
from tests.aws.test_pipeline import AgentKey
from tests.onprem.conftest import ESTATE, policy_files

TOKEN = "onprem-admin-token-0123456789abcdef"


class Server:
    """``ringfence serve`` on a fixed loopback port (the agent's api_url survives a restart)."""

    def __init__(
        self, tmp_path: Path, tls: LabTls | None = None, db: Path | None = None, extra: list[str] | None = None
    ) -> None:
        self.tls = tls  # HTTPS with a certificate of a private CA (tls.ca), as agents meet it
        self.db = db or tmp_path / "state" / "state.db"
        self.extra = extra or []  # more `ringfence serve` arguments
        self.launcher: list[str] = []  # what starts the command (e.g. in a namespace of its own)
        self.tokens = tmp_path / "admin-tokens"
        self.tokens.write_text(f"carol:{serve.token_hash(TOKEN)}:policy-author,incident-responder,onboarding\n")
        sock = serve.listen("127.0.0.1", 0)
        self.port = sock.getsockname()[1]
        sock.close()
        self.url = f"{'https' if tls else 'http'}://127.0.0.1:{self.port}"
        self.log = tmp_path / "serve.log"
        self.proc: subprocess.Popen[str] | None = None

    def start(self) -> None:
        cmd = [str(BIN / "ringfence"), "serve", "--port", str(self.port), "--store", f"sqlite:{self.db}"]
        if self.tls is not None:
            cmd += ["--tls-cert", str(self.tls.cert), "--tls-key", str(self.tls.key)]
        cmd += self.extra
        self.proc = subprocess.Popen(
            [*self.launcher, *cmd, "--admin-tokens", str(self.tokens)],
            stdout=subprocess.PIPE,
            stderr=self.log.open("a"),
            text=True,
        )
        assert self.proc.stdout is not None
        line = self.proc.stdout.readline()
        assert f"listening on {self.url}" in line, self.log.read_text()

    def kill9(self) -> None:
        assert self.proc is not None
        self.proc.send_signal(signal.SIGKILL)
        self.proc.wait(10)

    def admin(self, method: str, path: str, body: Any = None) -> httpx.Response:
        headers = {"Authorization": f"Bearer {TOKEN}"}
        return httpx.request(method, f"{self.url}{path}", json=body, headers=headers, timeout=60, verify=self.verify)

    @property
    def verify(self) -> Any:
        return ssl.create_default_context(cafile=str(self.tls.ca)) if self.tls is not None else True

    def enroll(self, wid: str, key: str) -> httpx.Response:
        nonce = httpx.get(f"{self.url}/v1/nonce").json()["nonce"]
        req = {"method": "pairing", "nonce": nonce, "workload_id": wid, "pairing_key": key}
        req.update(AgentKey().enroll_fields(wid, nonce))
        return httpx.post(f"{self.url}/v1/enroll", json=req)


@pytest.fixture
def server(tmp_path: Path) -> Iterator[Server]:
    s = Server(tmp_path)
    s.start()
    yield s
    if s.proc is not None and s.proc.poll() is None:
        s.proc.terminate()
        s.proc.wait(15)


def test_pairing_push_and_a_restart_after_kill_9(server: Server, tmp_path: Path, agent_process: Any) -> None:
    for spec in ESTATE:
        assert server.admin("POST", "/admin/workloads", {**spec, "reason": "rack 1"}).status_code == 201
    r = server.admin("POST", "/admin/policies", {"files": policy_files(), "reason": "initial"})
    assert r.status_code == 201, r.text
    proc = "dc1-proc-1"

    # keys the server must refuse: used up, expired, issued for another workload
    once = server.admin("POST", "/admin/pairing-keys", {"workload_id": "dc1-db-1", "uses": 1, "ttl": 600}).json()
    assert server.enroll("dc1-db-1", once["pairing_key"]).status_code == 200
    used = server.enroll("dc1-db-1", once["pairing_key"])
    assert used.status_code == 401 and "used up" in used.json()["detail"], used.text
    foreign = server.enroll(proc, once["pairing_key"])
    assert foreign.status_code == 401, foreign.text
    # an expired key: the admin API's shortest ttl is a minute, so this one is written to the
    # server's store directly with one second (SQLite: another connection, as a second process)
    from ringfence.control.api import secret_hash
    from ringfence.store.sqlite import SqliteStore

    side = SqliteStore(server.db)
    side.put_pairing(secret_hash("short-lived-key"), proc, uses=5, ttl=1)
    time.sleep(1.5)
    expired = server.enroll(proc, "short-lived-key")
    assert expired.status_code == 401 and "expired" in expired.json()["detail"], expired.text

    key = server.admin("POST", "/admin/pairing-keys", {"workload_id": proc, "uses": 1, "ttl": 600}).json()
    (tmp_path / "pairing-key").write_text(key["pairing_key"])
    workdir = tmp_path / "agent"
    workdir.mkdir()
    agent = agent_process(
        workdir,
        workload_id=proc,
        public_key=server.db.parent / "signing-key.pub.pem",
        api_url=server.url,
        enroll={"method": "pairing", "pairing_key_file": str(tmp_path / "pairing-key")},
        backoff_max=2,
        request_timeout=5,
        wait_timeout=25,  # the server's longest: a SIGTERM must not wait it out
    )
    state, log = agent.state, agent.log
    try:
        wait_until(lambda: status(state).get("applied_revision"), 30, "the first bundle", log)
        first = status(state)["applied_revision"]
        assert status(state)["workload_id"] == proc
        # the agent's status names the key the control plane bound (what a reset's next_agent_key names)
        from ringfence.control.credentials import agent_key_fingerprint, agent_key_id

        bound = side.agent_key(proc)
        assert bound is not None and status(state)["agent_key"] == agent_key_id(bound)
        assert status(state)["agent_key_fingerprint"] == agent_key_fingerprint(bound)
        time.sleep(1)  # in its long-poll now

        # a change (a new web server registered: a peer of the processing tier) is pushed
        web2 = {
            "id": "dc1-web-2",
            "ips": ["192.168.10.12"],
            "tags": {
                "ringfence:role": "web",
                "ringfence:app": "ordering",
                "ringfence:env": "prod",
                "ringfence:loc": "ca",
            },
        }
        changed = time.monotonic()
        assert server.admin("POST", "/admin/workloads", web2).status_code == 201
        wait_until(lambda: (status(state).get("applied_revision") or 0) > first, 15, "the pushed change", log)
        assert time.monotonic() - changed < 10 < POLL_INTERVAL
        second = status(state)["applied_revision"]

        # kill -9, restart on the same state: the agent's token still works (its key is used up, so
        # it could not enroll again), and the next change arrives
        server.kill9()
        time.sleep(1)
        server.start()
        changed = time.monotonic()
        r = server.admin("POST", f"/admin/workloads/{proc}/quarantine", {"reason": "after the restart"})
        assert r.status_code == 200, r.text
        wait_until(lambda: status(state).get("quarantined") is True, 30, "the change after the restart", log)
        assert status(state)["applied_revision"] > second
        assert time.monotonic() - changed < 20 < POLL_INTERVAL
        assert agent.poll() is None, log.read_text()

        # SIGTERM in the middle of a long-poll: it stops now (it used to answer the signal only
        # when the server answered the poll, up to wait_timeout later), saying what it enforces
        time.sleep(1)
        signalled = time.monotonic()
        agent.proc.send_signal(signal.SIGTERM)
        assert agent.proc.wait(30) == 0
        assert time.monotonic() - signalled < 3, log.read_text()
        assert "stopped; the firewall keeps enforcing revision" in log.read_text()
        assert status(state)["daemon"]["pid"] is None
    finally:
        agent.stop()
    # everything acknowledged before the SIGKILL is still there
    store = SqliteStore(server.db)
    actions = [(a.action, a.principal, a.target) for a in store.audit_log()]
    assert ("workload.quarantine", "carol", proc) in actions and store.get("dc1-web-2") is not None
    assert ("agent.enroll", f"agent:{proc}", proc) in actions, "the enrollment is audited"
    admin = {p for a, p, _ in actions if not a.startswith(("agent.", "token."))}
    assert admin == {"carol"}, "every change audited with the admin token's principal"
