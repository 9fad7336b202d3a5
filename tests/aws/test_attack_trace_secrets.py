"""No secret in X-Ray traces. Every function runs with ``Tracing: Active`` (SAM) /
``tracing_config { mode = "Active" }`` (Terraform), and Powertools' ``capture_lambda_handler``
records a handler's whole answer in the trace by default: the bearer token of an enrollment or a
renewal and an operator's pairing key went to X-Ray, kept 30 days and readable by anyone allowed
``xray:BatchGetTraces`` (in AWS's ``ReadOnlyAccess``), who could then act as the workload or enroll
as the on-premise host.

The real agent-API and admin handlers over the moto server, traced as Lambda traces them (the
X-Ray SDK's Lambda context, a trace id, its UDP emitter aimed at a socket this test reads)."""

from __future__ import annotations

import socket
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.aws.conftest import ROOT, Env
from tests.aws.test_agent_api import register_onprem
from tests.aws.test_attack_token_renewal import renew
from tests.aws.test_pipeline import agent_key, boot, enroll_iid
from tests.aws.test_static import hcl, template
from tests.tokenage import age


@pytest.fixture
def xray(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> Iterator[socket.socket]:
    """The X-Ray SDK sending as in Lambda, to a UDP socket standing in for the X-Ray daemon (what
    the functions' tracer sends is read, nothing answers it)."""
    import aws_xray_sdk
    from aws_lambda_powertools import Tracer
    from aws_xray_sdk.core import xray_recorder
    from aws_xray_sdk.core.lambda_launcher import LambdaContext as XRayLambdaContext

    sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    sock.bind(("127.0.0.1", 0))
    sock.settimeout(0.5)
    port = sock.getsockname()[1]
    monkeypatch.delenv("POWERTOOLS_TRACE_DISABLED", raising=False)  # as deployed: tracing on
    monkeypatch.setenv("LAMBDA_TASK_ROOT", str(tmp_path))  # Powertools traces only in Lambda
    monkeypatch.setenv("_X_AMZN_TRACE_ID", "Root=1-5759e988-bd862e3fe1be46a994272793;Parent=53995c3f42cd8ad8;Sampled=1")
    monkeypatch.setenv("AWS_XRAY_CONTEXT_MISSING", "IGNORE_ERROR")
    saved = (xray_recorder.context, xray_recorder._emitter, aws_xray_sdk.global_sdk_config.sdk_enabled())
    Tracer._reset_config()
    aws_xray_sdk.global_sdk_config.set_sdk_enabled(True)
    xray_recorder.configure(context=XRayLambdaContext(), daemon_address=f"127.0.0.1:{port}")
    try:
        yield sock
    finally:
        xray_recorder.context, xray_recorder._emitter = saved[0], saved[1]
        aws_xray_sdk.global_sdk_config.set_sdk_enabled(saved[2])
        Tracer._reset_config()
        sock.close()


def _sent(sock: socket.socket) -> bytes:
    out = b""
    while True:
        try:
            out += sock.recv(65535) + b"\n"
        except TimeoutError:
            return out


def test_attack_no_token_or_pairing_key_reaches_the_traces(env: Env, xray: socket.socket) -> None:
    """A trace reader looks for an enrolled workload's token, its renewed token and a pairing key
    in what the functions sent to X-Ray: none is there (before: each one, in the "handler response"
    metadata), while the functions are traced all the same."""
    from ringfence.local.lambdas import load_functions

    est = boot(env)
    web = est["ids"]["web"][0]
    register_onprem(env, "dc1-db-1", "10.9.0.5")
    env.fn.update(load_functions(["agentapi", "admin"], ROOT / "functions"))  # traced, as deployed
    _sent(xray)
    status, body = enroll_iid(env, web)
    assert status == 200, body
    age(env.store, web, body["token"])  # renewable by token (half its lifetime gone)
    status, _, renewed = renew(env, web, agent_key(web), body["token"])
    assert status == 200, renewed
    status, _, pk = env.rest("admin", "POST", "/admin/pairing-keys", {"workload_id": "dc1-db-1", "uses": 1, "ttl": 600})
    assert status == 201, pk
    sent = _sent(xray)
    assert b'"trace_id"' in sent and b"## handler" in sent, "the handlers were traced"
    for name, secret in (
        ("token", body["token"]),
        ("renewed token", renewed["token"]),
        ("pairing key", pk["pairing_key"]),
    ):
        assert secret.encode() not in sent, f"the {name} was sent to X-Ray"


def test_no_function_records_its_answers_or_errors_in_traces_in_either_deployment() -> None:
    """Every function, in code and in both deployments' environment, keeps answers and error
    messages out of its traces (an answer can hold a token, an error message a request's input)."""
    for app in sorted((ROOT / "functions").glob("*/app.py")):
        text = app.read_text()
        if "capture_lambda_handler" in text:
            assert "capture_lambda_handler(capture_response=False, capture_error=False)" in text, app
            assert text.count("capture_lambda_handler") == text.count("capture_response=False"), app
    sam = template()["Globals"]["Function"]["Environment"]["Variables"]
    (common,) = [
        b["common_env"] for b in hcl(ROOT / "infra/modules/ringfence/lambda.tf")["locals"] if "common_env" in b
    ]
    for env in (sam, common):
        assert env["POWERTOOLS_TRACER_CAPTURE_RESPONSE"] == "false"
        assert env["POWERTOOLS_TRACER_CAPTURE_ERROR"] == "false"
