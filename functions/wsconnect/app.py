"""WebSocket nudge channel: $connect (bearer token in the Authorization header) and $disconnect.

A token in the query string is refused, valid or not: URLs end up in access logs, proxies and
shell histories, where a bearer token must never be."""

from __future__ import annotations

import json
from typing import Any

from aws_lambda_powertools import Logger, Metrics
from aws_lambda_powertools.metrics import MetricUnit
from aws_lambda_powertools.utilities.data_classes import APIGatewayWebSocketEvent, event_source

from ringfence.clouds.aws.wiring import Wiring
from ringfence.control.agents import AgentApi
from ringfence.control.api import error
from ringfence.control.wiring import Config
from ringfence.textsafe import json_line

logger = Logger(json_serializer=json_line)  # escaped: ringfence.textsafe
metrics = Metrics()
_svc: dict[str, AgentApi] = {}


@logger.inject_lambda_context
@metrics.log_metrics
@event_source(data_class=APIGatewayWebSocketEvent)
def handler(event: APIGatewayWebSocketEvent, context: Any) -> dict[str, Any]:
    if "api" not in _svc:
        _svc["api"] = AgentApi(Wiring(Config.from_env()))
    ctx = event.request_context
    if ctx.route_key == "$connect":
        if "token" in (event.query_string_parameters or {}):
            r = error(400, "a token in the URL is refused", "send it as Authorization: Bearer <token>")
        else:
            r = _svc["api"].connect(_bearer(event.headers or {}), ctx.connection_id)
        # refusals are unknown or expired tokens: a rise means agents hold stale tokens (or probing)
        metrics.add_metric(
            name="NudgeConnections" if r.status == 200 else "NudgeConnectionsRefused", unit=MetricUnit.Count, value=1
        )
        return {"statusCode": r.status, "body": json.dumps(r.body)}
    if ctx.route_key == "$disconnect":
        metrics.add_metric(name="NudgeDisconnects", unit=MetricUnit.Count, value=1)
    return {"statusCode": 200, "body": ""}


def _bearer(headers: dict[str, str]) -> str | None:
    value = next((v for k, v in headers.items() if k.lower() == "authorization"), "")
    scheme, _, token = value.partition(" ")
    return token.strip() or None if scheme.lower() == "bearer" else None
