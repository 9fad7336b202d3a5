"""The scheduled cloudreconcile function (moto stack, the local compute API, an Azure endpoint that
refuses connections): one cloud's outage leaves the other cloud's pass run, and is recorded and
alarmed (AzureReconcileFailed)."""

from __future__ import annotations

import json
import socket
from typing import Any

import pytest

from ringfence.local.gcp_api import GcpApi
from ringfence.local.gcp_project import gcp_environment
from ringfence.local.lambdas import load_functions
from tests.aws.conftest import ROOT, Env, LambdaContext
from tests.aws.conftest import env as env  # the fixture
from tests.aws.test_pipeline import _scheduled
from tests.gcp.conftest import gcp as gcp  # the fixture
from tests.gcp.conftest import web_vm

SUBS = ["11111111-1111-4111-8111-111111111111", "22222222-2222-4222-8222-222222222222"]


def _closed_port() -> int:
    s = socket.socket()
    s.bind(("127.0.0.1", 0))
    port = int(s.getsockname()[1])
    s.close()
    return port


@pytest.fixture
def both_clouds(gcp: GcpApi, env: Env, monkeypatch: pytest.MonkeyPatch) -> Any:
    for k, v in gcp_environment(gcp).items():
        monkeypatch.setenv(k, v)
    monkeypatch.setenv("RINGFENCE_AZURE_SUBSCRIPTIONS", ",".join(SUBS))
    monkeypatch.setenv("RINGFENCE_AZURE_ARM_URL", f"http://127.0.0.1:{_closed_port()}")  # ARM unreachable
    monkeypatch.delenv("RINGFENCE_AZURE_PERIMETER", raising=False)
    env.provision_example_policy()
    return load_functions(["cloudreconcile"], ROOT / "functions")["cloudreconcile"]


def _metrics(out: str) -> dict[str, float]:
    """The EMF lines' metrics: name → sum of its values."""
    sums: dict[str, float] = {}
    for line in out.splitlines():
        if line.startswith('{"_aws"'):
            doc = json.loads(line)
            for d in doc["_aws"]["CloudWatchMetrics"]:
                for m in d["Metrics"]:
                    v = doc[m["Name"]]
                    sums[m["Name"]] = sums.get(m["Name"], 0.0) + sum(v if isinstance(v, list) else [v])
    return sums


def test_azure_unreachable_fails_each_subscription_and_gcp_still_reconciles(
    both_clouds: Any, gcp: GcpApi, env: Env, capsys: pytest.CaptureFixture[str]
) -> None:
    """ARM refusing connections (azure-core's ServiceRequestError, not an HttpResponseError) fails
    each subscription apart, recorded and counted (the AzureReconcileFailed alarm); a GCP VM no
    push announced is still inventoried by the same run."""
    inst = web_vm(gcp, "10.50.0.31")
    out = both_clouds.handler(_scheduled(), LambdaContext())
    assert sorted(out["azure"]["failed"]) == SUBS, out
    assert all("connect" in why.lower() for why in out["azure"]["failed"].values()), out
    assert out["gcp"]["failed"] == {} and inst["id"] in out["gcp"]["changed"], out
    rec = env.store.get(inst["id"])
    assert rec is not None and rec.state == "running"
    assert _metrics(capsys.readouterr().out).get("AzureReconcileFailed") == len(SUBS)


def test_a_cloud_pass_that_raises_is_recorded_and_the_invocation_fails_after_the_other_ran(
    both_clouds: Any, gcp: GcpApi, env: Env, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    """The Azure pass cannot even start (its perimeter configuration is unreadable): GCP's pass
    runs all the same, the failure metric is emitted, and the invocation fails (Lambda's Errors,
    its retries and failure destination) once every pass ran."""
    monkeypatch.setenv("RINGFENCE_AZURE_PERIMETER", "true")
    monkeypatch.setenv("RINGFENCE_PERIMETER_CONFIG", "{not json")
    inst = web_vm(gcp, "10.50.0.32")
    with pytest.raises(both_clouds.ReconcileFailed, match="azure reconcile pass failed"):
        both_clouds.handler(_scheduled(), LambdaContext())
    rec = env.store.get(inst["id"])
    assert rec is not None and rec.state == "running" and rec.workload.cloud == "gcp"
    assert _metrics(capsys.readouterr().out).get("AzureReconcileFailed") == 1
