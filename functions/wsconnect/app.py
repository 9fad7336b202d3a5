"""WebSocket nudge channel: $connect (token in the query string) and $disconnect."""

from __future__ import annotations

import json
from typing import Any

from aws_lambda_powertools import Logger
from aws_lambda_powertools.utilities.data_classes import APIGatewayProxyEvent, event_source

from ringfence.clouds.aws.agents import AgentApi
from ringfence.clouds.aws.wiring import Config, Wiring

logger = Logger()
_svc: dict[str, AgentApi] = {}


@logger.inject_lambda_context
@event_source(data_class=APIGatewayProxyEvent)
def handler(event: APIGatewayProxyEvent, context: Any) -> dict[str, Any]:
    if "api" not in _svc:
        _svc["api"] = AgentApi(Wiring(Config.from_env()))
    ctx = event.request_context
    if ctx.route_key == "$connect":
        r = _svc["api"].connect(event.get_query_string_value("token"), str(ctx.connection_id))
        return {"statusCode": r.status, "body": json.dumps(r.body)}
    return {"statusCode": 200, "body": ""}
