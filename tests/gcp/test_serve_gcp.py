"""``ringfence serve`` with GCP configured: the same route code answers POST /gcp/events, and the
agent API enrolls gcp-jwt — over HTTP, the SDK clients reading the local Google API stand-in."""

from __future__ import annotations

import httpx
import pytest

from ringfence import serve
from ringfence.local.gcp_api import GcpApi, identity_claims
from ringfence.local.gcp_events import audit_entry, push_body, push_token
from ringfence.local.gcp_project import IDENTITY_AUDIENCE, NUMBER, PROJECT, gcp_environment
from ringfence.local.wiring import LocalWiring
from tests.aws.test_pipeline import AgentKey
from tests.gcp.conftest import web_vm


def test_serve_takes_gcp_events_and_enrolls_gcp_agents(
    gcp: GcpApi, wiring: LocalWiring, monkeypatch: pytest.MonkeyPatch
) -> None:
    for k, v in gcp_environment(gcp).items():
        monkeypatch.setenv(k, v)
    inst = web_vm(gcp, "10.40.0.5")
    with serve.serving(serve.ServeApp.over(wiring, None)) as running, httpx.Client(timeout=60) as client:
        # httpx's default 5 s timeout is what a starved CI machine exceeded (an event verifies a
        # token and reads the VM through the Google SDK before it answers)
        url = running.url
        body = push_body(audit_entry("v1.compute.instances.insert", inst))
        r = client.post(url + "/gcp/events", content=body)
        assert r.status_code == 401
        r = client.post(url + "/gcp/events", content=body, headers={"Authorization": f"Bearer {push_token(gcp)}"})
        assert r.status_code == 200 and r.json()["changed"] == [inst["id"]], r.text
        assert wiring.store.get(inst["id"]).labels["role"] == "web"  # type: ignore[union-attr]

        key = AgentKey()
        nonce = client.get(url + "/v1/nonce").json()["nonce"]
        jwt = gcp.sign_token(identity_claims(inst, PROJECT, NUMBER, IDENTITY_AUDIENCE))
        req = {
            "method": "gcp-jwt",
            "nonce": nonce,
            "document": jwt,
            "agent_key": key.pem,
            "agent_signature": key.prove("enroll", inst["id"], nonce),
        }
        r = client.post(url + "/v1/enroll", json=req)
        assert r.status_code == 200, r.text
        assert r.json()["workload_id"] == inst["id"]


def test_serve_reconciles_gcp_on_its_interval_and_converges_the_firewall_policy(
    gcp: GcpApi, wiring: LocalWiring, monkeypatch: pytest.MonkeyPatch
) -> None:
    """What ``ringfence serve`` starts with GCP configured: a thread that lists the projects (a VM no
    event announced is inventoried) and converges the firewall policy, now and every interval."""
    import json
    import threading

    from ringfence.clouds.gcp.firewall import policy_name

    env = {
        **gcp_environment(gcp),
        "RINGFENCE_GCP_RECONCILE_INTERVAL": "3600",
        "RINGFENCE_GCP_PERIMETER": json.dumps({"env_tags": {"prod": "tagValues/501"}}),
    }
    for k, v in env.items():
        monkeypatch.setenv(k, v)
    inst = web_vm(gcp, "10.40.0.9")
    stop = threading.Event()
    threads = serve.reconciles(serve.ServeApp.over(wiring, None), wiring, stop, env)
    try:
        assert [t.name for t in threads] == ["gcp-reconcile"]
        stop.set()  # the first pass runs at once; the set stop ends the loop after it
        threads[0].join(timeout=60)
        assert not threads[0].is_alive()
    finally:
        stop.set()
    rec = wiring.store.get(inst["id"])
    assert rec is not None and rec.labels["env"] == "prod"
    rules = gcp.firewall_policies[PROJECT][policy_name("default")]["rules"]
    assert any([t["name"] for t in r.get("targetSecureTags", [])] == ["tagValues/501"] for r in rules)
