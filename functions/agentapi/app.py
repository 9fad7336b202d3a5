"""Agent API (API Gateway REST, docs/agent-api.md): nonce, enroll, bundle, deltas, heartbeat, reports."""

from __future__ import annotations

import json
from typing import Any

from aws_lambda_powertools import Logger, Tracer
from aws_lambda_powertools.event_handler import APIGatewayRestResolver
from aws_lambda_powertools.event_handler import Response as HttpResponse

from ringfence.clouds.aws.agents import AgentApi
from ringfence.clouds.aws.api import Response
from ringfence.clouds.aws.wiring import Config, Wiring

logger = Logger()
tracer = Tracer()
app = APIGatewayRestResolver()
_svc: dict[str, AgentApi] = {}


def api() -> AgentApi:
    if "api" not in _svc:
        _svc["api"] = AgentApi(Wiring(Config.from_env()))
    return _svc["api"]


def _http(r: Response) -> HttpResponse[str]:
    return HttpResponse(
        status_code=r.status,
        content_type="application/json",
        body=json.dumps(r.body) if r.body is not None else "",
        headers=r.headers,
    )


def _auth(wid: str) -> Response | None:
    return api().authorize(app.current_event.headers.get("Authorization"), wid)


@app.get("/v1/nonce")
def nonce() -> HttpResponse[str]:
    return _http(api().nonce())


@app.post("/v1/enroll")
def enroll() -> HttpResponse[str]:
    return _http(api().enroll(app.current_event.body))


@app.get("/v1/agents/<wid>/bundle")
def get_bundle(wid: str) -> HttpResponse[str]:
    denied = _auth(wid)
    inm = app.current_event.headers.get("If-None-Match")
    return _http(denied or api().bundle(wid, inm))


@app.get("/v1/agents/<wid>/deltas")
def get_deltas(wid: str) -> HttpResponse[str]:
    denied = _auth(wid)
    if denied:
        return _http(denied)
    raw = app.current_event.get_query_string_value("since", "0") or "0"
    if not raw.isdigit():
        return _http(Response(400, {"error": "since must be a non-negative integer", "detail": raw}))
    return _http(api().deltas(wid, int(raw)))


@app.post("/v1/agents/<wid>/heartbeat")
def heartbeat(wid: str) -> HttpResponse[str]:
    return _http(_auth(wid) or api().heartbeat(wid, app.current_event.body))


@app.post("/v1/agents/<wid>/reports")
def reports(wid: str) -> HttpResponse[str]:
    return _http(_auth(wid) or api().reports(wid, app.current_event.body))


@logger.inject_lambda_context
@tracer.capture_lambda_handler
def handler(event: dict[str, Any], context: Any) -> dict[str, Any]:
    return app.resolve(event, context)
