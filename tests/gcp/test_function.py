"""The gcpevents Lambda function (SAM: POST /gcp/events on the agent API) over the moto stack: a
pushed insert lands in the DynamoDB inventory and is queued for compute; no token, nothing read."""

from __future__ import annotations

import pytest

from ringfence.local.gcp_api import GcpApi
from ringfence.local.lambdas import load_functions
from tests.aws.conftest import ROOT, Env, LambdaContext, rest_answer
from tests.aws.conftest import env as env  # the fixture
from tests.gcp.conftest import (
    EVENTS_AUDIENCE,
    NUMBER,
    ORG,
    PROJECT,
    PUSHER,
    ZONE,
    audit_entry,
    push_body,
    push_token,
    vm_name,
)


def test_the_gcpevents_function_ingests_a_pushed_insert_into_the_aws_inventory(
    gcp: GcpApi, env: Env, monkeypatch: pytest.MonkeyPatch
) -> None:
    from ringfence.serve import proxy_event

    for k, v in {
        "RINGFENCE_GCP_PROJECTS": f"{PROJECT}={NUMBER}",
        "RINGFENCE_GCP_TAG_PARENTS": f"organizations/{ORG}",
        "RINGFENCE_GCP_EVENTS_AUDIENCE": EVENTS_AUDIENCE,
        "RINGFENCE_GCP_PUSH_SERVICE_ACCOUNTS": PUSHER,
        "RINGFENCE_GCP_JWKS_URL": gcp.jwks_url,
        "RINGFENCE_GCP_COMPUTE_ENDPOINT": gcp.url,
        "RINGFENCE_GCP_RESOURCE_MANAGER_ENDPOINT": gcp.url,
        "RINGFENCE_GCP_ANONYMOUS": "1",
    }.items():
        monkeypatch.setenv(k, v)
    env.provision_example_policy()
    fn = load_functions(["gcpevents"], ROOT / "functions")["gcpevents"]
    inst = gcp.add_instance(PROJECT, ZONE, vm_name(), ["10.50.0.5"])
    for k, v in {"ringfence-role": "web", "ringfence-app": "ordering", "ringfence-env": "prod"}.items():
        gcp.bind_tag(PROJECT, ZONE, inst["id"], ORG, k, v)
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
