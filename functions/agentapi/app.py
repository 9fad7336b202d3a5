"""Agent API (API Gateway REST, docs/agent-api.md): the library's routes over this container's service."""

from __future__ import annotations

from typing import Any

from aws_lambda_powertools import Logger, Tracer

from ringfence.clouds.aws.agents import AgentApi
from ringfence.clouds.aws.wiring import Config, Wiring
from ringfence.routes.agent import agent_routes

logger = Logger()
tracer = Tracer()
_svc: dict[str, AgentApi] = {}


def api() -> AgentApi:
    if "api" not in _svc:
        _svc["api"] = AgentApi(Wiring(Config.from_env()))
    return _svc["api"]


app = agent_routes(api)


@logger.inject_lambda_context
@tracer.capture_lambda_handler
def handler(event: dict[str, Any], context: Any) -> dict[str, Any]:
    return app.resolve(event, context)
