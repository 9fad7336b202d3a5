"""The seam: the real ``ringfence-agent`` process against the real agent-API routes, served over
HTTP by the real ``ringfence serve`` over the moto-backed AWS wiring, while events travel the real
path (EventBridge → SQS → ingest → compute). Enrollment with the instance's signed identity
document (aws-iid, from an IMDS stand-in), the first bundle, a set delta after a tag change and a whole bundle after a
quarantine — each reaching the agent through the ``wait`` long-poll, long before its slow poll."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest

from ringfence import serve
from tests.aws.conftest import Env, ip_of
from tests.aws.imds import running_imds
from tests.aws.test_pipeline import boot

BIN = Path(sys.executable).parent
POLL_INTERVAL = 300.0  # the agent's slow poll: anything sooner came by the long-poll
ADMIN_TOKEN = "seam-admin-token-0123456789abcdef"


def wait_until(check: Callable[[], Any], timeout: float, what: str, log: Path | None = None) -> Any:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        got = check()
        if got:
            return got
        time.sleep(0.1)
    raise AssertionError(f"{what} within {timeout}s" + (f"\n--- agent log:\n{log.read_text()}" if log else ""))


@pytest.fixture
def control_plane(env: Env, tmp_path: Path) -> Iterator[str]:
    """``ringfence serve --store aws`` in its own process (moto through AWS_ENDPOINT_URL)."""
    tokens = tmp_path / "admin-tokens"
    tokens.write_text(f"secops:{serve.token_hash(ADMIN_TOKEN)}:policy-author,incident-responder,onboarding\n")
    environ = {**os.environ, "RINGFENCE_WAIT_POLL_INTERVAL": "0.2"}
    log = (tmp_path / "serve.log").open("w")
    proc = subprocess.Popen(
        [str(BIN / "ringfence"), "serve", "--port", "0", "--store", "aws", "--admin-tokens", str(tokens)],
        stdout=subprocess.PIPE,
        stderr=log,
        text=True,
        env=environ,
    )
    try:
        assert proc.stdout is not None
        line = proc.stdout.readline()
        assert "listening on" in line, (tmp_path / "serve.log").read_text()
        yield line.split("listening on ")[1].split()[0]
    finally:
        proc.terminate()
        proc.wait(15)


def agent_status(state: Path) -> dict[str, Any]:
    out = subprocess.run(
        [str(BIN / "ringfence-agent"), "status", "--state-dir", str(state), "--json"],
        capture_output=True,
        text=True,
        check=False,
    )
    return json.loads(out.stdout) if out.returncode == 0 else {}


@pytest.fixture
def imds(env: Env) -> Iterator[tuple[str, dict[str, str]]]:
    """An IMDS stand-in on loopback (its URL) and who asks it: caller address → instance id."""
    instance_at: dict[str, str] = {}
    with running_imds(env, instance_at.get) as url:
        yield url, instance_at


def test_agent_enrolls_follows_a_tag_change_by_delta_and_a_quarantine_by_push(
    env: Env, control_plane: str, imds: tuple[str, dict[str, str]], tmp_path: Path
) -> None:
    url, admin = control_plane, {"Authorization": f"Bearer {ADMIN_TOKEN}"}
    est = boot(env)
    proc = est["ids"]["proc"][0]
    # a web server launched with a typo'd tag: not (yet) one of the processing tier's peers
    typo = est["run"]("web", est["subnets"]["web"], 1, env="prdo")[0]
    env.put(env.state_event(typo, "running"))
    env.pump()
    assert not _in_sets(env.bundle(proc).model_dump(mode="json"), ip_of(env, typo))

    imds_url, instance_at = imds
    instance_at["127.0.0.1"] = proc  # the agent below is this instance: its IMDS tells it so
    pub = tmp_path / "signing.pub.pem"
    pub.write_bytes(env.signing_key.public_pem())
    state = tmp_path / "state"
    cfg = {
        "workload_id": proc,
        "public_key": str(pub),
        "state_dir": str(state),
        "backend": "dry-run",
        "api_url": url,
        "enroll": {"method": "aws-iid", "imds_url": imds_url},
        "poll_interval": POLL_INTERVAL,
        "wait_timeout": 8,
        "heartbeat_interval": 2,
        "report_interval": 60,
        "request_timeout": 10,
    }
    (tmp_path / "agent.json").write_text(json.dumps(cfg))
    log = tmp_path / "agent.log"
    agent = subprocess.Popen(
        [str(BIN / "ringfence-agent"), "run", "--config", str(tmp_path / "agent.json")],
        stdout=subprocess.DEVNULL,
        stderr=log.open("w"),
        env={k: v for k, v in os.environ.items() if not k.startswith(("AWS_", "RINGFENCE_"))},
    )
    try:
        # enrollment and the first bundle
        first = env.bundle(proc).version
        st = wait_until(lambda: agent_status(state).get("applied_revision") == first, 30, "first bundle", log)
        assert agent_status(state)["workload_id"] == proc and st
        wait_until(lambda: env.store.get(proc).last_heartbeat, 15, "a heartbeat recorded", log)
        time.sleep(1)  # the agent is in its long-poll now

        # the tag is fixed: event → ingest → compute; the agent learns by the wait route and bridges by delta
        env.ec2.create_tags(Resources=[typo], Tags=[{"Key": "env", "Value": "prod"}])
        env.put(env.tag_event(typo, {"role": "web", "app": "ordering", "env": "prod"}, version=2))
        env.pump()
        target = env.fn["agentapi"].api().latest_version(proc)
        assert target > first
        changed = time.monotonic()
        wait_until(lambda: agent_status(state).get("applied_revision") == target, 15, "the delta", log)
        took = time.monotonic() - changed
        assert took < 10 < POLL_INTERVAL, took
        text = log.read_text()
        assert f"version {first} → {target}, +1 -0 elements" in text, text  # a delta, not a whole bundle
        st = agent_status(state)
        assert st["bundle_version"] == first and st["deltas_applied"] >= 1

        # quarantine through the admin API: the rules change, a whole bundle, pushed the same way
        r = httpx.post(f"{url}/admin/workloads/{proc}/quarantine", json={"reason": "seam test"}, headers=admin)
        assert r.status_code == 200, r.text
        env.pump()
        changed = time.monotonic()
        wait_until(lambda: agent_status(state).get("quarantined") is True, 15, "the quarantine bundle", log)
        assert time.monotonic() - changed < 10
        audit = [(a.action, a.principal, a.target) for a in env.store.audit_log()]
        assert ("workload.quarantine", "secops", proc) in audit
        assert agent.poll() is None, log.read_text()
    finally:
        agent.terminate()  # the agent finishes its open long-poll first (≤ wait_timeout + request_timeout)
        try:
            agent.wait(40)
        except subprocess.TimeoutExpired:
            agent.kill()
            agent.wait(5)


def _in_sets(doc: dict[str, Any], ip: str) -> bool:
    return any(f"{ip}/32" in s["v4"] for s in doc["sets"].values())
