"""WebSocket nudge channel: $connect (token in the query string) and $disconnect."""

from __future__ import annotations

import json
from typing import Any

from aws_lambda_powertools import Logger, Metrics
from aws_lambda_powertools.metrics import MetricUnit
from aws_lambda_powertools.utilities.data_classes import APIGatewayWebSocketEvent, event_source

from ringfence.clouds.aws.agents import AgentApi
from ringfence.clouds.aws.wiring import Config, Wiring

logger = Logger()
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
        r = _svc["api"].connect(event.query_string_parameters.get("token"), ctx.connection_id)
        # refusals are unknown or expired tokens: a rise means agents hold stale tokens (or probing)
        metrics.add_metric(
            name="NudgeConnections" if r.status == 200 else "NudgeConnectionsRefused", unit=MetricUnit.Count, value=1
        )
        return {"statusCode": r.status, "body": json.dumps(r.body)}
    if ctx.route_key == "$disconnect":
        metrics.add_metric(name="NudgeDisconnects", unit=MetricUnit.Count, value=1)
    return {"statusCode": 200, "body": ""}
