"""A real agent process on a short-lived token: ``ringfence serve`` issues 3-second access tokens,
the agent renews its token by signing a nonce with its own key (its pairing key is used up after
the first enrollment, so it could not enroll again) and keeps following changes long past the
first token's expiry."""

from __future__ import annotations

import json
import stat
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest

from ringfence.control.api import secret_hash
from ringfence.local.tls import lab_tls
from ringfence.store.sqlite import SqliteStore
from tests.agentproc import BIN, POLL_INTERVAL, wait_until
from tests.agentproc import agent_status as status
from tests.onprem.conftest import provision_estate
from tests.onprem.serveproc import Server

TOKEN_TTL = 3


@pytest.fixture(params=["http", "https"])
def short_token_server(
    request: pytest.FixtureRequest, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> Iterator[Server]:
    """Plain HTTP, and HTTPS with a certificate of a private CA the agent is given (tls_ca_file):
    every request the agent makes, the token renewal included, must verify against that CA (the
    renewal once went out with the system's trust store and failed forever)."""
    monkeypatch.setenv("RINGFENCE_TOKEN_TTL", str(TOKEN_TTL))  # the serve process inherits it
    s = Server(tmp_path, lab_tls(tmp_path / "tls", "127.0.0.1") if request.param == "https" else None)
    s.start()
    yield s
    s.stop()


@pytest.mark.slow
def test_a_real_agent_renews_its_token_past_expiry_and_keeps_fetching(
    short_token_server: Server, tmp_path: Path
) -> None:
    server = short_token_server
    provision_estate(server)
    proc = "dc1-proc-1"
    key = server.admin("POST", "/admin/pairing-keys", {"workload_id": proc, "uses": 1, "ttl": 600}).json()
    (tmp_path / "pairing-key").write_text(key["pairing_key"])
    state = tmp_path / "agent-state"
    cfg = {
        "workload_id": proc,
        "public_key": str(server.db.parent / "signing-key.pub.pem"),
        "state_dir": str(state),
        "backend": "dry-run",
        "api_url": server.url,
        "enroll": {"method": "pairing", "pairing_key_file": str(tmp_path / "pairing-key")},
        "poll_interval": POLL_INTERVAL,
        "wait_timeout": 2,
        "heartbeat_interval": 1,
        "backoff_max": 1,
        "request_timeout": 5,
        **({"tls_ca_file": str(server.tls.ca)} if server.tls is not None else {}),
    }
    (tmp_path / "agent.json").write_text(json.dumps(cfg))
    log = tmp_path / "agent.log"
    agent = subprocess.Popen(
        [str(BIN / "ringfence-agent"), "run", "--config", str(tmp_path / "agent.json")],
        stdout=subprocess.DEVNULL,
        stderr=log.open("w"),
    )
    try:
        wait_until(lambda: status(state).get("applied_revision"), 30, "the first bundle", log)
        first_token = json.loads((state / "token.json").read_text())["token"]
        key_file = state / "agent-key.pem"
        assert stat.S_IMODE(key_file.stat().st_mode) == 0o600 and b"PRIVATE KEY" in key_file.read_bytes()
        store = SqliteStore(server.db)
        assert store.agent_key(proc) is not None, "the first enrollment bound the agent's key"

        time.sleep(3 * TOKEN_TTL)  # several lifetimes of the first token
        assert store.token_workload(secret_hash(first_token)) is None, "the first token is long gone"
        r = httpx.get(
            f"{server.url}/v1/agents/{proc}/bundle",
            headers={"Authorization": f"Bearer {first_token}"},
            verify=server.verify,
        )
        assert r.status_code == 401

        # a change after the first token expired still reaches the agent
        before = status(state)["applied_revision"]
        # a second web server of the same app group: it joins the processing tier's allow set
        tags = {"ringfence:role": "web", "ringfence:app": "ordering", "ringfence:env": "prod", "ringfence:loc": "ca"}
        web2 = {"id": "dc1-web-2", "ips": ["192.168.10.12"], "tags": tags}
        assert server.admin("POST", "/admin/workloads", web2).status_code == 201
        wait_until(lambda: (status(state).get("applied_revision") or 0) > before, 20, "the change", log)
        assert agent.poll() is None, log.read_text()
        # it signed through the libcrypto it already had: cryptography's extension was never loaded
        assert "cryptography" not in Path(f"/proc/{agent.pid}/maps").read_text()
    finally:
        agent.terminate()
        try:
            agent.wait(30)
        except subprocess.TimeoutExpired:
            agent.kill()
            agent.wait(5)
    actions = [(a.action, a.target) for a in SqliteStore(server.db).audit_log()]
    assert actions.count(("agent.enroll", proc)) == 1, "enrolled once (its pairing key had one use)"
    assert actions.count(("token.refresh", proc)) >= 2, "renewed by signature, again and again"
    assert "enroll refused" not in log.read_text()
