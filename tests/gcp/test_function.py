"""The gcpevents Lambda function (SAM: POST /gcp/events on the agent API) over the moto stack: a
pushed insert lands in the DynamoDB inventory and is queued for compute; no token, nothing read."""

from __future__ import annotations

import pytest

from ringfence.local.gcp_api import GcpApi
from ringfence.local.lambdas import load_functions
from tests.aws.conftest import ROOT, Env, LambdaContext, rest_answer
from tests.aws.conftest import env as env  # the fixture
from tests.gcp.conftest import (
    audit_entry,
    gcp_environment,
    push_body,
    push_token,
    web_vm,
)


def test_the_gcpevents_function_ingests_a_pushed_insert_into_the_aws_inventory(
    gcp: GcpApi, env: Env, monkeypatch: pytest.MonkeyPatch
) -> None:
    from ringfence.serve import proxy_event

    for k, v in gcp_environment(gcp).items():
        monkeypatch.setenv(k, v)
    env.provision_example_policy()
    fn = load_functions(["gcpevents"], ROOT / "functions")["gcpevents"]
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
    rec = env.store.get(inst["id"])
    assert rec is not None and rec.workload.cloud == "gcp" and rec.labels["role"] == "web"
    assert any(inst["id"] in m["Body"] for m in env.receive("compute"))
