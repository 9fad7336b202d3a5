"""The azureevents Lambda function (SAM/Terraform: POST /azure/events on the agent API) over the moto
stack and the local ARM server: the delivery secret read from Secrets Manager by reference, a VM
write read back from ARM into the DynamoDB inventory and queued for compute; the agent API offers
azure-attested only where configured."""

from __future__ import annotations

import json
from typing import Any

import boto3
import pytest

from ringfence.clouds.aws import othercloud
from ringfence.clouds.azure.events import WRITE
from ringfence.clouds.azure.ingest import SECRET_HEADER
from ringfence.clouds.azure.wiring import Azure
from ringfence.local.azure_arm import ArmServer
from ringfence.local.azure_estate import SUB, seed_vm, vm_id
from ringfence.local.eventgrid import arm_event
from ringfence.local.lambdas import load_functions
from tests.aws.conftest import ROOT, Env, LambdaContext, rest_answer
from tests.aws.conftest import env as env  # the fixture
from tests.aws.test_function_iam import Recorder, refusals

from .conftest import OTHER_SUB, PROD_WEB, SECRET

WEB = "6a000000-0000-4000-8000-00000000f001"


def _secret(env: Env, name: str, value: str) -> str:
    sm = boto3.client("secretsmanager")
    return str(sm.create_secret(Name=name, SecretString=value)["ARN"])


@pytest.fixture
def azure_env(arm: ArmServer, azure: Azure, env: Env, monkeypatch: pytest.MonkeyPatch) -> Env:
    monkeypatch.setenv("RINGFENCE_AZURE_SUBSCRIPTIONS", SUB)
    monkeypatch.setenv("RINGFENCE_AZURE_ARM_URL", arm.url)
    monkeypatch.setenv(othercloud.EVENTGRID_SECRET_ARN, _secret(env, "ringfence/eventgrid", SECRET))
    monkeypatch.delenv("RINGFENCE_EVENTGRID_SECRET", raising=False)
    # no Entra ID in the lab: a loopback ARM URL gets a fixed token (default_credential; in Azure,
    # the credentials secret or azure-identity's chain: test_credentials_secret_* below)
    return env


def _call(fn: Any, body: list[dict[str, Any]], headers: list[tuple[str, str]]) -> tuple[int, dict[str, str], Any]:
    from ringfence.serve import proxy_event

    event = proxy_event("POST", "/azure/events", headers, [], json.dumps(body).encode(), "10.0.0.1")
    return rest_answer(fn.handler(event, LambdaContext()))


def test_the_azureevents_function_ingests_a_vm_write_into_the_aws_inventory(arm: ArmServer, azure_env: Env) -> None:
    env = azure_env
    env.provision_example_policy()
    env.fn["azureevents"] = load_functions(["azureevents"], ROOT / "functions")["azureevents"]
    recorded = Recorder(env)  # every AWS call it makes, judged against its role below
    fn = env.fn["azureevents"]
    seed_vm(arm, "web-1", WEB, "10.20.1.4", PROD_WEB)
    write = arm_event(WRITE, vm_id("web-1"), "Microsoft.Compute/virtualMachines/write")
    notif = [("aeg-event-type", "Notification")]

    # the secret is the one stored in Secrets Manager; the environment holds only its ARN
    assert _call(fn, [write], notif)[0] == 401
    assert _call(fn, [write], [*notif, (SECRET_HEADER, "guess")])[0] == 401
    foreign = arm_event(WRITE, vm_id("web-1", sub=OTHER_SUB), "Microsoft.Compute/virtualMachines/write")
    status, _, answer = _call(fn, [write, foreign], [*notif, (SECRET_HEADER, SECRET)])
    assert status == 403 and OTHER_SUB in answer["detail"]
    assert env.store.get(WEB) is None

    status, _, answer = _call(fn, [write], [*notif, (SECRET_HEADER, SECRET)])
    assert status == 200, answer
    assert answer["changed"] == [WEB]
    rec = env.store.get(WEB)
    assert rec is not None and rec.workload.cloud == "azure" and rec.labels["role"] == "web"
    assert any(WEB in m["Body"] for m in env.receive("compute"))
    assert recorded.calls["azureevents"] and not refusals(recorded, ["azureevents"])


def test_the_validation_handshake_answers_through_the_function(azure_env: Env) -> None:
    fn = load_functions(["azureevents"], ROOT / "functions")["azureevents"]
    validation = {
        "id": "v1",
        "topic": f"/subscriptions/{SUB}",
        "subject": "",
        "eventType": "Microsoft.EventGrid.SubscriptionValidationEvent",
        "eventTime": "2026-12-02T14:00:00Z",
        "data": {"validationCode": "512d38b6-c7b8-40c8-89fe-f46f9e9622b6"},
        "dataVersion": "1",
    }
    headers = [("aeg-event-type", "SubscriptionValidation"), (SECRET_HEADER, SECRET)]
    status, _, answer = _call(fn, [validation], headers)
    assert status == 200 and answer == {"validationResponse": "512d38b6-c7b8-40c8-89fe-f46f9e9622b6"}


def test_credentials_secret_makes_a_client_secret_credential_and_a_bad_one_is_named(env: Env) -> None:
    from azure.identity import ClientSecretCredential

    good = _secret(env, "ringfence/azure-sp", json.dumps({"tenant_id": "t", "client_id": "c", "client_secret": "x"}))
    az = othercloud.azure_from_env({"RINGFENCE_AZURE_SUBSCRIPTIONS": SUB, othercloud.AZURE_CREDENTIALS_ARN: good})
    assert isinstance(az.credential, ClientSecretCredential) and az.cfg.subscriptions == [SUB]
    bad = _secret(env, "ringfence/azure-sp-bad", json.dumps({"tenant_id": "t", "client_secret": "hunter2"}))
    with pytest.raises(othercloud.SecretConfigError) as exc:
        othercloud.azure_from_env({"RINGFENCE_AZURE_SUBSCRIPTIONS": SUB, othercloud.AZURE_CREDENTIALS_ARN: bad})
    assert bad in str(exc.value) and "client_id" in str(exc.value) and "hunter2" not in str(exc.value)


def test_without_a_credential_a_loopback_arm_gets_a_fixed_token_and_azure_the_identity_chain() -> None:
    """``ringfence serve`` against the lab's ARM (the demo) needs no Entra ID, and a real token is
    never fetched for a plain-http URL; any other ARM gets azure-identity's chain."""
    from azure.identity import DefaultAzureCredential

    from ringfence.clouds.azure.arm import LOCAL_ARM_TOKEN, StaticTokenCredential, default_credential

    local = default_credential("http://127.0.0.1:8123")
    assert isinstance(local, StaticTokenCredential) and local.get_token("x").token == LOCAL_ARM_TOKEN
    assert isinstance(default_credential("http://arm.example.com:80"), DefaultAzureCredential)
    assert isinstance(default_credential(None), DefaultAzureCredential)


def test_the_agent_api_offers_azure_attested_only_when_configured(azure_env: Env) -> None:
    from ringfence.clouds.aws.wiring import Wiring
    from ringfence.control.wiring import Config

    w = Wiring(Config(enroll_methods=["aws-iid", "azure-attested"]))
    othercloud.cloud_enrollers(w, {"RINGFENCE_AZURE_SUBSCRIPTIONS": SUB})
    # the AWS agent API reads no ARM (it holds no Azure credentials): unseen VMs wait for their event
    assert getattr(w.enrollers["azure-attested"], "read_unseen", None) is False
    off = Wiring(Config(enroll_methods=["aws-iid"]))
    assert othercloud.cloud_enrollers(off, {"RINGFENCE_AZURE_SUBSCRIPTIONS": SUB}) == {}
    assert "azure-attested" not in off.enrollers


def test_the_agent_api_offers_gcp_jwt_only_with_an_identity_audience(monkeypatch: pytest.MonkeyPatch) -> None:
    from ringfence.clouds.aws.wiring import Wiring
    from ringfence.clouds.gcp.enroll import GcpEnroller
    from ringfence.control.wiring import Config

    # the AWS wiring builds its boto3 clients (no call made): a region, as Lambda always has one,
    # whatever test ran before this one
    monkeypatch.setenv("AWS_DEFAULT_REGION", "us-east-1")
    w = Wiring(Config(enroll_methods=["aws-iid", "gcp-jwt"]))
    gcp = {"RINGFENCE_GCP_PROJECTS": "ordering-prod=123456789012", "RINGFENCE_GCP_TAG_PARENTS": "organizations/1"}
    assert othercloud.cloud_enrollers(w, gcp) == {}  # no identity audience: gcp-jwt stays off
    given = othercloud.cloud_enrollers(w, {**gcp, "RINGFENCE_GCP_IDENTITY_AUDIENCE": "https://rf.example/v1/enroll"})
    assert isinstance(given["gcp-jwt"], GcpEnroller)


def test_the_scheduled_cloudreconcile_function_reads_a_vm_missed_by_events_and_converges_the_nsgs(
    arm: ArmServer, azure_env: Env, monkeypatch: pytest.MonkeyPatch
) -> None:
    """SAM/Terraform's CloudReconcileFunction on the reconcile schedule: a VM no Event Grid delivery
    announced lands in DynamoDB and is queued; with the Azure perimeter on, the NSGs/ASGs follow and
    the second run only reads."""
    from tests.aws.test_pipeline import _scheduled

    env = azure_env
    monkeypatch.delenv("RINGFENCE_GCP_PROJECTS", raising=False)
    monkeypatch.setenv("RINGFENCE_AZURE_PERIMETER", "true")
    monkeypatch.setenv("RINGFENCE_PERIMETER_CONFIG", json.dumps({"admin_cidrs": ["10.250.0.0/24"]}))
    env.provision_example_policy()
    fn = load_functions(["cloudreconcile"], ROOT / "functions")["cloudreconcile"]
    missed = "6a000000-0000-4000-8000-00000000f0aa"
    seed_vm(arm, "web-missed", missed, "10.20.1.40", PROD_WEB)
    assert env.store.get(missed) is None
    out = fn.handler(_scheduled(), LambdaContext())
    assert out["azure"]["failed"] == {} and missed in out["azure"]["changed"], out
    rec = env.store.get(missed)
    assert rec is not None and rec.workload.cloud == "azure" and rec.labels["role"] == "web"
    assert any(missed in m["Body"] for m in env.receive("compute"))
    assert out["azure"]["perimeter_writes"] > 0
    with arm.recording() as calls:
        again = fn.handler(_scheduled(), LambdaContext())
    assert again["azure"]["changed"] == [] and again["azure"]["perimeter_writes"] == 0, again
    assert calls and all(method == "GET" for method, _ in calls), calls  # converged: only read
