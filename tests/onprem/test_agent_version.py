"""Which agent version each workload runs (docs/visibility.md): a real (dry-run) agent heartbeats
its installed version to a real ``ringfence serve``; the version shows in ``GET /admin/findings``
(``agents``) and ``ringfence findings --agents``. A heartbeat without the field (an older agent)
is taken, one with a version that is not one is refused 422 naming the field, and an agent newer
than its control plane (which refuses the field) heartbeats again without it and says why."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import httpx
import pytest

from ringfence.store.sqlite import SqliteStore
from tests.agentproc import BIN, AgentProcess, wait_until
from tests.aws.test_pipeline import AgentKey
from tests.onprem.conftest import provision_estate
from tests.onprem.serveproc import Server

VERSION = "0.1.0+3f2a9c1b0d4e"  # as build_artifact.py names an artifact: <release>+<source digest>
WID = "dc1-proc-1"


def installed_as(tmp: Path, monkeypatch: pytest.MonkeyPatch, version: str = VERSION) -> None:
    """The agents started from now on find themselves installed as ``version``: the metadata pip
    writes for the artifact's wheel (importlib.metadata reads it), on their PYTHONPATH."""
    site = tmp / "site"
    info = site / f"ringfence_agent-{version}.dist-info"
    info.mkdir(parents=True)
    (info / "METADATA").write_text(f"Metadata-Version: 2.1\nName: ringfence-agent\nVersion: {version}\n")
    monkeypatch.setenv("PYTHONPATH", os.pathsep.join(p for p in (str(site), os.environ.get("PYTHONPATH")) if p))


def agents(server: Server) -> dict[str, dict[str, Any]]:
    r = server.admin("GET", "/admin/findings?agents=true")
    assert r.status_code == 200, r.text
    return {a["workload_id"]: a for a in r.json()["agents"]}


def test_the_agents_version_shows_where_operators_look(
    server: Server, paired_agent: Callable[..., AgentProcess], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    provision_estate(server)
    installed_as(tmp_path, monkeypatch)
    agent = paired_agent(WID)
    assert agent.wait_for(lambda s: s.get("agent_version"), 30, "the agent's status") == VERSION
    got = wait_until(
        lambda: agents(server).get(WID, {}).get("agent_version"), 60, "the version in GET /admin/findings", agent.log
    )  # listed once enrolled
    assert got == VERSION
    seen = agents(server)[WID]
    assert seen["last_heartbeat"] is not None and seen["enforced_version"] is not None
    assert agent.status()["agent_version_refused"] is None
    assert "older than this agent" not in agent.log.read_text()
    # the CLI on the same store, as an operator reads it
    r = subprocess.run(
        [str(BIN / "ringfence"), "findings", "--store", f"sqlite:{server.db}", "--agents"],
        capture_output=True, text=True, timeout=60,
    )  # fmt: skip
    line = next(ln for ln in r.stdout.splitlines() if ln.startswith(WID))
    assert VERSION in line, r.stdout
    assert any(ln.startswith("dc1-web-1") for ln in r.stdout.splitlines()) is False  # not enrolled: no agent
    r = subprocess.run(
        [str(BIN / "ringfence"), "findings", "--store", f"sqlite:{server.db}", "--json", "--agents"],
        capture_output=True, text=True, timeout=60,
    )  # fmt: skip
    assert {a["workload_id"]: a["agent_version"] for a in json.loads(r.stdout)["agents"]} == {WID: VERSION}


def test_an_old_agents_heartbeat_is_taken_and_a_bad_version_refused(server: Server) -> None:
    provision_estate(server)
    wid = "dc1-db-1"
    key = server.admin("POST", "/admin/pairing-keys", {"workload_id": wid, "uses": 1, "ttl": 600}).json()
    nonce = httpx.get(f"{server.url}/v1/nonce").json()["nonce"]
    req = {"method": "pairing", "nonce": nonce, "workload_id": wid, "pairing_key": key["pairing_key"]}
    req.update(AgentKey().enroll_fields(wid, nonce))
    enrolled = httpx.post(f"{server.url}/v1/enroll", json=req)
    assert enrolled.status_code == 200, enrolled.text
    auth = {"Authorization": f"Bearer {enrolled.json()['token']}"}
    url = f"{server.url}/v1/agents/{wid}/heartbeat"
    store = SqliteStore(server.db)

    # an agent older than the field: no agent_version, taken, recorded with none
    old = {"applied_version": None, "mode": None, "healthy": True, "message": "", "counters": {}}
    r = httpx.post(url, json=old, headers=auth)
    assert r.status_code == 200, r.text
    rep = store.enforcement(wid)
    assert rep is not None and rep.agent_version is None
    assert agents(server)[wid]["agent_version"] is None and agents(server)[wid]["last_heartbeat"] is not None

    r = httpx.post(url, json={**old, "agent_version": "1.2.3-rc.1+build.5"}, headers=auth)
    assert r.status_code == 200, r.text
    assert agents(server)[wid]["agent_version"] == "1.2.3-rc.1+build.5"
    before = store.enforcement(wid)

    # not a version, or too long: 422 naming the field, nothing recorded
    for bad in ("1.0; rm -rf /", "latest", "1.0\n", "1." + "1" * 70, "<script>"):
        r = httpx.post(url, json={**old, "agent_version": bad}, headers=auth)
        assert r.status_code == 422, (bad, r.text)
        assert r.json()["detail"].startswith("body.agent_version:"), r.text
    assert store.enforcement(wid) == before


@pytest.mark.slow
def test_an_agent_newer_than_its_control_plane_heartbeats_without_its_version(
    tmp_path: Path, agent_process: Callable[..., AgentProcess], monkeypatch: pytest.MonkeyPatch
) -> None:
    server = Server(tmp_path)
    server.launcher = [sys.executable, str(Path(__file__).with_name("oldcp.py"))]
    server.start()
    try:
        provision_estate(server)
        # the old control plane refuses the field, as one before it did
        key = server.admin("POST", "/admin/pairing-keys", {"workload_id": WID, "uses": 1, "ttl": 600})
        (tmp_path / "pairing-key").write_text(key.json()["pairing_key"])
        installed_as(tmp_path, monkeypatch)
        work = tmp_path / "agent"
        work.mkdir()
        agent = agent_process(
            work,
            workload_id=WID,
            public_key=server.db.parent / "signing-key.pub.pem",
            api_url=server.url,
            enroll={"method": "pairing", "pairing_key_file": str(tmp_path / "pairing-key")},
            backoff_max=2,
            request_timeout=5,
            heartbeat_interval=1,
        )
        store = SqliteStore(server.db)
        # its heartbeats arrive (without the version): the workload is not silent
        wait_until(lambda: store.enforcement(WID), 60, "a heartbeat taken by the old control plane", agent.log)
        t = time.time()

        def later() -> bool:
            rep = store.enforcement(WID)
            return rep is not None and rep.time > t + 2

        wait_until(later, 30, "heartbeats two seconds on", agent.log)
        log = agent.log.read_text()
        assert log.count("the control plane refused agent_version") == 1, log  # said once, not per heartbeat
        assert "older than this agent (upgrade the control plane before its agents)" in log
        assert "body.agent_version: Extra inputs are not permitted" in log
        refused = agent.status()["agent_version_refused"]
        assert refused is not None and "body.agent_version" in refused["detail"]
        assert agent.status()["last_error"] is None, agent.status()["last_error"]
        assert agents(server)[WID]["agent_version"] is None
        assert "heartbeat: HTTP 422" not in log
    finally:
        server.stop()
