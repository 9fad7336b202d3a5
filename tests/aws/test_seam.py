"""The seam: the real ``ringfence-agent`` process against the real agent-API routes, served over
HTTP by the real ``ringfence serve`` over the moto-backed AWS wiring, while events travel the real
path (EventBridge → SQS → ingest → compute). Enrollment with the instance's signed identity
document (aws-iid, from an IMDS stand-in), the first bundle, a set delta after a tag change and a whole bundle after a
quarantine — each reaching the agent through the ``wait`` long-poll, long before its slow poll."""

from __future__ import annotations

import os
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest

from ringfence import serve
from tests.agentproc import BIN, POLL_INTERVAL, agent_status, wait_until
from tests.aws.conftest import Env, ip_of
from tests.aws.imds import running_imds
from tests.aws.test_pipeline import boot

ADMIN_TOKEN = "seam-admin-token-0123456789abcdef"


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


@pytest.fixture
def imds(env: Env) -> Iterator[tuple[str, dict[str, str]]]:
    """An IMDS stand-in on loopback (its URL) and who asks it: caller address → instance id."""
    instance_at: dict[str, str] = {}
    with running_imds(env, instance_at.get) as url:
        yield url, instance_at


def seam_agent(
    env: Env,
    agent_process: Any,
    tmp_path: Path,
    url: str,
    imds: tuple[str, dict[str, str]],
    instance: str,
    **overrides: Any,
) -> Any:
    """The real agent of ``instance`` (its IMDS stand-in says so to loopback callers), pinning the
    stack's signing key, enrolling with aws-iid against ``url``."""
    imds_url, instance_at = imds
    instance_at["127.0.0.1"] = instance
    pub = tmp_path / "signing.pub.pem"
    pub.write_bytes(env.signing_key.public_pem())
    return agent_process(
        tmp_path,
        workload_id=instance,
        public_key=pub,
        api_url=url,
        enroll={"method": "aws-iid", "imds_url": imds_url},
        clean_env=True,
        report_interval=60,
        **overrides,
    )


def test_agent_enrolls_follows_a_tag_change_by_delta_and_a_quarantine_by_push(
    env: Env, control_plane: str, imds: tuple[str, dict[str, str]], tmp_path: Path, agent_process: Any
) -> None:
    url, admin = control_plane, {"Authorization": f"Bearer {ADMIN_TOKEN}"}
    est = boot(env)
    proc = est["ids"]["proc"][0]
    # a web server launched with a typo'd tag: not (yet) one of the processing tier's peers
    typo = est["run"]("web", est["subnets"]["web"], 1, env="prdo")[0]
    env.put(env.state_event(typo, "running"))
    env.pump()
    assert not _allowed_in(env.bundle(proc).model_dump(mode="json"), ip_of(env, typo))

    agent = seam_agent(env, agent_process, tmp_path, url, imds, proc)
    state, log = agent.state, agent.log
    try:
        # enrollment and the first bundle
        first = env.bundle(proc).version
        st = wait_until(lambda: agent_status(state).get("applied_revision") == first, 30, "first bundle", log)
        assert agent_status(state)["workload_id"] == proc and st
        wait_until(lambda: env.store.get(proc).last_heartbeat, 15, "a heartbeat recorded", log)
        time.sleep(1)  # the agent is in its long-poll now
        # (the whole bundle it holds: boot may have moved it on by deltas already)
        whole = agent_status(state)["bundle_version"]

        # the tag is fixed: event → ingest → compute; the agent learns by the wait route and bridges by delta
        env.ec2.create_tags(Resources=[typo], Tags=[{"Key": "ringfence:env", "Value": "prod"}])
        env.put(
            env.tag_event(
                typo, {"ringfence:role": "web", "ringfence:app": "ordering", "ringfence:env": "prod"}, version=2
            )
        )
        env.pump()
        target = env.fn["agentapi"].api().latest_version(proc)
        assert target > first
        changed = time.monotonic()
        wait_until(lambda: agent_status(state).get("applied_revision") == target, 15, "the delta", log)
        took = time.monotonic() - changed
        assert took < 10 < POLL_INTERVAL, took
        text = log.read_text()
        # deltas, not a whole bundle: the web server joins the allow set (the dev-prod boundary's
        # deny set is not in this bundle: no allow of it overlaps the boundary)
        assert f" → {target}, +1 -0 elements" in text, text
        st = agent_status(state)
        assert st["bundle_version"] == whole and st["deltas_applied"] >= 1
        assert st.get("last_sync", {}).get("fetches") == 0, st  # the deltas came with the wait's answer

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
        agent.stop()


def _allowed_in(doc: dict[str, Any], ip: str) -> bool:
    """``ip`` is a peer of an inbound allow rule (a workload without an env is in the dev-prod
    boundary's deny sets: a missing value counts as both)."""
    rules = [r for r in doc["inbound"] if r["action"] == "allow"]
    names = {r["set"] for r in rules} | {m["set"] for r in rules for m in r.get("members") or []}
    return any(f"{ip}/32" in s["v4"] for n, s in doc["sets"].items() if n in names)


def test_an_agent_enrolling_before_its_launch_is_ingested_enforces_once_ingest_records_it(
    env: Env, control_plane: str, imds: tuple[str, dict[str, str]], tmp_path: Path, agent_process: Any
) -> None:
    """The AWS agent API writes no inventory record (its role may not): an agent whose instance's
    launch event has not reached ingest yet is enrolled, but its token opens nothing, so it keeps
    retrying (fail-safe posture, no bundle). Once the event is ingested it gets its bundle."""
    est = boot(env)
    new = est["run"]("processing", est["subnets"]["app"], 1)[0]  # running in EC2, its event not yet sent
    assert env.store.get(new) is None
    agent = seam_agent(env, agent_process, tmp_path, control_plane, imds, new, backoff_max=2)
    state, log = agent.state, agent.log
    try:
        wait_until(lambda: env.store.agent_key(new), 20, "the agent enrolled (its key bound)", log)
        time.sleep(2)
        assert agent_status(state).get("applied_revision") is None, "no bundle before it is recorded"
        assert env.store.get(new) is None, "the agent API recorded nothing"
        env.put(env.state_event(new, "running"))
        env.pump()
        version = env.bundle(new).version
        wait_until(lambda: agent_status(state).get("applied_revision") == version, 30, "its bundle", log)
        assert agent.poll() is None, log.read_text()
    finally:
        agent.stop()
