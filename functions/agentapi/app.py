"""Agent API (API Gateway REST, docs/agent-api.md): the library's routes over this container's service."""

from __future__ import annotations

from typing import Any

from aws_lambda_powertools import Logger, Metrics, Tracer
from aws_lambda_powertools.metrics import MetricUnit

from ringfence.clouds.aws.othercloud import cloud_enrollers
from ringfence.clouds.aws.wiring import Wiring
from ringfence.control.agents import AgentApi
from ringfence.control.wiring import Config
from ringfence.routes.agent import agent_routes, outcome
from ringfence.textsafe import json_line

logger = Logger(json_serializer=json_line)  # escaped: ringfence.textsafe
tracer = Tracer()
metrics = Metrics()
_svc: dict[str, AgentApi] = {}


def metric(name: str, value: float) -> None:
    metrics.add_metric(name=name, unit=MetricUnit.Count, value=value)


def api() -> AgentApi:
    if "api" not in _svc:
        w = Wiring(Config.from_env())
        w.metric = metric  # what the routes count (reports over quota)
        # azure-attested / gcp-jwt where the stack configures them (their SDK layers are attached then)
        _svc["api"] = AgentApi(w, cloud_enrollers(w))
    return _svc["api"]


app = agent_routes(api)


@logger.inject_lambda_context
@tracer.capture_lambda_handler(capture_response=False, capture_error=False)  # answers hold tokens
@metrics.log_metrics
def handler(event: dict[str, Any], context: Any) -> dict[str, Any]:
    out = app.resolve(event, context)
    name = outcome(str(event.get("path", "")), int(out["statusCode"]))
    if name:
        metrics.add_metric(name=name, unit=MetricUnit.Count, value=1)
    return out
