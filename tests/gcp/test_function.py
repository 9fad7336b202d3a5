"""The gcpevents Lambda function (SAM: POST /gcp/events on the agent API) over the moto stack: a
pushed insert lands in the DynamoDB inventory and is queued for compute; no token, nothing read."""

from __future__ import annotations

from typing import Any

import pytest

from ringfence.local.gcp_api import GcpApi
from ringfence.local.gcp_events import audit_entry, push_body, push_token
from ringfence.local.gcp_project import gcp_environment
from ringfence.local.lambdas import load_functions
from tests.aws.conftest import ROOT, Env, LambdaContext, rest_answer
from tests.aws.conftest import env as env  # the fixture
from tests.aws.test_function_iam import Recorder, refusals
from tests.gcp.conftest import web_vm


def test_the_gcpevents_function_ingests_a_pushed_insert_into_the_aws_inventory(
    gcp: GcpApi, env: Env, monkeypatch: pytest.MonkeyPatch
) -> None:
    from ringfence.serve import proxy_event

    for k, v in gcp_environment(gcp).items():
        monkeypatch.setenv(k, v)
    env.provision_example_policy()
    env.fn["gcpevents"] = load_functions(["gcpevents"], ROOT / "functions")["gcpevents"]
    rec = Recorder(env)  # every AWS call it makes, judged against its role below
    fn = env.fn["gcpevents"]
    inst = web_vm(gcp, "10.50.0.5")
    body = push_body(audit_entry("v1.compute.instances.insert", inst))

    def call(headers: list[tuple[str, str]]) -> tuple[int, object]:
        status, _, answer = rest_answer(
            fn.handler(proxy_event("POST", "/gcp/events", headers, [], body, "10.0.0.1"), LambdaContext())
        )
        return status, answer

    assert call([])[0] == 401
    assert env.store.get(inst["id"]) is None
    status, answer = call([("Authorization", f"Bearer {push_token(gcp)}")])
    assert status == 200, answer
    got = env.store.get(inst["id"])
    assert got is not None and got.workload.cloud == "gcp" and got.labels["role"] == "web"
    assert any(inst["id"] in m["Body"] for m in env.receive("compute"))
    assert rec.calls["gcpevents"] and not refusals(rec, ["gcpevents"])


def test_the_aws_agent_api_function_enrolls_a_gcp_vm_with_gcp_jwt(
    gcp: GcpApi, env: Env, monkeypatch: pytest.MonkeyPatch
) -> None:
    """gcp-jwt on the AWS agent API (SAM/Terraform attach the GCP layer when configured): the token
    verified, the VM read live from the local compute API, the key bound."""
    from ringfence.local.gcp_api import identity_claims
    from ringfence.local.gcp_project import IDENTITY_AUDIENCE, NUMBER, PROJECT
    from tests.aws.conftest import rest_event
    from tests.aws.test_pipeline import AgentKey

    for k, v in gcp_environment(gcp).items():
        monkeypatch.setenv(k, v)
    env.provision_example_policy()
    inst = web_vm(gcp, "10.50.0.9")
    wid = inst["id"]

    def enroll(fn: Any, key: AgentKey, iat_shift: int = 0) -> tuple[int, Any]:
        claims = identity_claims(inst, PROJECT, NUMBER, IDENTITY_AUDIENCE)
        document = gcp.key.sign({**claims, "iat": claims["iat"] - iat_shift})  # a fresh token: another iat
        _, _, got = rest_answer(fn.handler(rest_event("GET", "/v1/nonce"), LambdaContext()))
        nonce = got["nonce"]
        body = {
            "method": "gcp-jwt",
            "nonce": nonce,
            "document": document,
            "agent_key": key.pem,
            "agent_signature": key.prove("enroll", wid, nonce),
        }
        status, _, answer = rest_answer(fn.handler(rest_event("POST", "/v1/enroll", body), LambdaContext()))
        return status, answer

    monkeypatch.setenv("RINGFENCE_ENROLL_METHODS", "aws-iid,aws-sts")
    off = load_functions(["agentapi"], ROOT / "functions")["agentapi"]
    status, answer = enroll(off, AgentKey())
    assert status == 400 and "gcp-jwt" in answer["detail"]  # not enabled: refused, nothing read
    assert env.store.get(wid) is None

    monkeypatch.setenv("RINGFENCE_ENROLL_METHODS", "aws-iid,aws-sts,gcp-jwt")
    fn = load_functions(["agentapi"], ROOT / "functions")["agentapi"]
    key = AgentKey()
    status, answer = enroll(fn, key)
    assert status == 200 and answer["workload_id"] == wid, answer
    assert env.store.agent_key(wid) == key.pem
    # the AWS agent API writes no inventory record (its role may not): the VM is recorded by the
    # GCP side (here the scheduled cloudreconcile; a push in production), and its agent, retrying,
    # is then enrolled in it
    assert env.store.get(wid) is None
    from tests.aws.test_pipeline import _scheduled

    load_functions(["cloudreconcile"], ROOT / "functions")["cloudreconcile"].handler(_scheduled(), LambdaContext())
    status, answer = enroll(fn, key, iat_shift=5)
    assert status == 200, answer
    rec = env.store.get(wid)
    assert rec is not None and rec.workload.cloud == "gcp" and rec.enrolled


def test_the_scheduled_cloudreconcile_function_inventories_a_missed_vm_and_converges_the_firewall_policy(
    gcp: GcpApi, env: Env, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The schedule (SAM/Terraform: CloudReconcileFunction) over moto and the local compute API: a VM
    no push announced lands in DynamoDB and is queued; the firewall policy follows its env; the
    second run writes nothing."""
    import json

    from ringfence.clouds.gcp.firewall import policy_name
    from ringfence.local.gcp_project import PROJECT
    from tests.aws.test_pipeline import _scheduled

    for k, v in gcp_environment(gcp).items():
        monkeypatch.setenv(k, v)
    monkeypatch.delenv("RINGFENCE_AZURE_SUBSCRIPTIONS", raising=False)
    monkeypatch.setenv("RINGFENCE_PERIMETER_CONFIG", json.dumps({"admin_cidrs": ["10.255.0.0/24"]}))
    monkeypatch.setenv("RINGFENCE_GCP_PERIMETER", json.dumps({"env_tags": {"prod": "tagValues/401"}}))
    env.provision_example_policy()
    env.fn["cloudreconcile"] = load_functions(["cloudreconcile"], ROOT / "functions")["cloudreconcile"]
    recorded = Recorder(env)  # every AWS call it makes, judged against its role below
    fn = env.fn["cloudreconcile"]
    inst = web_vm(gcp, "10.50.0.20")
    out = fn.handler(_scheduled(), LambdaContext())
    assert out["gcp"]["failed"] == {} and inst["id"] in out["gcp"]["changed"], out
    rec = env.store.get(inst["id"])
    assert rec is not None and rec.workload.cloud == "gcp" and rec.labels["env"] == "prod"
    assert any(inst["id"] in m["Body"] for m in env.receive("compute"))
    policy = gcp.firewall_policies[PROJECT][policy_name("default")]
    assert out["gcp"]["perimeter_writes"] > 0 and policy["rules"]
    assert any([t["name"] for t in r.get("targetSecureTags", [])] == ["tagValues/401"] for r in policy["rules"])
    again = fn.handler(_scheduled(), LambdaContext())
    assert again["gcp"] == {"changed": [], "failed": {}, "perimeter_writes": 0}, again
    assert recorded.calls["cloudreconcile"] and not refusals(recorded, ["cloudreconcile"])
