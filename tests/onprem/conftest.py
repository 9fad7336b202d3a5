"""The local control plane on a tmp dir: in this process (LocalWiring: SQLite store, file
publisher, compute worker; ``served`` over HTTP), or ``ringfence serve`` as a process (``server``,
with a real agent paired with it: ``paired_agent``)."""

from __future__ import annotations

import sqlite3
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest

from ringfence import serve
from ringfence.bundle import SigningKey
from ringfence.clouds.onprem import OnPremAdmin
from ringfence.local.wiring import LocalWiring
from tests.agentproc import AgentProcess
from tests.aws.conftest import LABEL_TESTS, POLICY_DIR
from tests.onprem.serveproc import Server

ESTATE = [
    {
        "id": "dc1-web-1",
        "ips": ["192.168.10.11"],
        "tags": {"ringfence:role": "web", "ringfence:app": "ordering", "ringfence:env": "prod", "ringfence:loc": "ca"},
    },
    {
        "id": "dc1-proc-1",
        "ips": ["192.168.10.21"],
        "tags": {
            "ringfence:role": "processing",
            "ringfence:app": "ordering",
            "ringfence:env": "prod",
            "ringfence:loc": "ca",
        },
    },
    {
        "id": "dc1-db-1",
        "ips": ["192.168.10.31"],
        "tags": {
            "ringfence:role": "database",
            "ringfence:app": "ordering",
            "ringfence:env": "prod",
            "ringfence:loc": "ca",
        },
    },
]


def policy_files() -> dict[str, str]:
    files = {p.name: p.read_text() for p in sorted(POLICY_DIR.glob("*.yaml")) if p.name != "tests.yaml"}
    files["tests.yaml"] = LABEL_TESTS
    return files


def sqlite_backup(db: Path, to: Path) -> None:
    """SQLite's online backup of ``db`` into ``to`` (what ``sqlite3 DB ".backup TO"`` does), through
    the connections themselves: where a handler's X-Ray patching ran in this process,
    ``sqlite3.connect`` hands out a traced proxy, which ``Connection.backup`` refuses."""
    src, dst = (getattr(c, "__wrapped__", c) for c in (sqlite3.connect(db), sqlite3.connect(to)))
    try:
        src.backup(dst)
    finally:
        dst.close()
        src.close()


def signing_key_file(d: Path) -> Path:
    key = SigningKey.generate()
    key.write(d / "signing.pem", d / "signing.pub.pem")
    return d / "signing.pem"


@pytest.fixture
def wiring(tmp_path: Path) -> Iterator[LocalWiring]:
    w = LocalWiring(tmp_path / "state" / "state.db", signing_key=signing_key_file(tmp_path))
    yield w
    w.close()


def boot(w: LocalWiring) -> OnPremAdmin:
    """The example policy provisioned over a small registered on-premise estate, computed."""
    admin = OnPremAdmin(w)
    for spec in ESTATE:
        assert admin.register_workload("alice", spec).status == 201
    r = admin.provision("alice", policy_files(), "initial")
    assert r.status == 201, r.body
    assert w.settle(60)
    return admin


ROLES = {
    "paula": ["policy-author"],
    "otto": ["onboarding"],
    "rita": ["reader"],
    "pat": ["onboarding", "policy-author"],
    "ivy": ["incident-responder"],
}


class Served:
    """``ringfence serve`` (the real HTTP server, the library's routes) over a LocalWiring, with
    an admin token for each of ROLES."""

    def __init__(self, url: str, tokens: dict[str, str], wiring: LocalWiring) -> None:
        self.url, self.tokens, self.wiring = url, tokens, wiring

    def call(self, who: str, method: str, path: str, body: Any = None) -> httpx.Response:
        headers = {"Authorization": f"Bearer {self.tokens[who]}"}
        return httpx.request(method, self.url + path, json=body, headers=headers, timeout=60)

    def audit(self, action: str) -> list[Any]:
        return [r for r in self.wiring.store.audit_log() if r.action == action]


@pytest.fixture
def served(wiring: LocalWiring, tmp_path: Path) -> Iterator[Served]:
    """ESTATE registered by onboarding, then the example policy provisioned by a policy author."""
    tokens, lines = {}, []
    for who, roles in ROLES.items():
        tokens[who], line = serve.new_admin_token(who, roles)
        lines.append(line)
    path = tmp_path / "admin-tokens"
    path.write_text("\n".join(lines) + "\n")
    app = serve.ServeApp.over(wiring, serve.AdminTokens.load(path))
    with serve.serving(app) as running:
        s = Served(running.url, tokens, wiring)
        for spec in ESTATE:
            assert s.call("otto", "POST", "/admin/workloads", spec).status_code == 201
        r = s.call("paula", "POST", "/admin/policies", {"files": policy_files(), "reason": "v1"})
        assert r.status_code == 201, r.text
        yield s


@pytest.fixture
def server(tmp_path: Path) -> Iterator[Server]:
    """``ringfence serve`` started on a new SQLite store under ``tmp_path`` (nothing registered
    yet: see :func:`provision_estate`); stopped after the test if it still runs."""
    s = Server(tmp_path)
    s.start()
    yield s
    s.stop()


def provision_estate(server: Server) -> None:
    """ESTATE registered and the example policy provisioned through ``server``'s admin API."""
    for spec in ESTATE:
        assert server.admin("POST", "/admin/workloads", {**spec, "reason": "rack 1"}).status_code == 201
    r = server.admin("POST", "/admin/policies", {"files": policy_files(), "reason": "initial"})
    assert r.status_code == 201, r.text


@pytest.fixture
def paired_agent(server: Server, tmp_path: Path, agent_process: Any) -> Callable[..., AgentProcess]:
    """Starts a real (dry-run) agent of a workload in ``tmp_path / "agent"``, enrolled with
    ``server`` by a one-use pairing key minted through the admin API; keyword arguments override
    its config (:func:`tests.agentproc.start_agent`). Stopped when the test ends."""

    def start(workload_id: str, **overrides: Any) -> AgentProcess:
        key = server.admin("POST", "/admin/pairing-keys", {"workload_id": workload_id, "uses": 1, "ttl": 600})
        (tmp_path / "pairing-key").write_text(key.json()["pairing_key"])
        workdir = tmp_path / "agent"
        workdir.mkdir()
        cfg: dict[str, Any] = {"backoff_max": 2, "request_timeout": 5, **overrides}
        return agent_process(
            workdir,
            workload_id=workload_id,
            public_key=server.db.parent / "signing-key.pub.pem",
            api_url=server.url,
            enroll={"method": "pairing", "pairing_key_file": str(tmp_path / "pairing-key")},
            **cfg,
        )

    return start
