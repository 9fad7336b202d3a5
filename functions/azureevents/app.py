"""Azure events (API Gateway REST ``POST /azure/events``): Event Grid deliveries, checked by their
delivery secret (read from Secrets Manager) and/or Entra ID token, read back from ARM into the
governed inventory (docs/deploy-azure.md)."""

from __future__ import annotations

from typing import Any

from aws_lambda_powertools import Logger, Metrics, Tracer
from aws_lambda_powertools.metrics import MetricUnit

from ringfence.clouds.aws.othercloud import azure_from_env
from ringfence.clouds.aws.wiring import Wiring
from ringfence.clouds.azure.ingest import AzureEvents
from ringfence.control.wiring import Config
from ringfence.routes.azure import azure_event_routes
from ringfence.textsafe import json_line

logger = Logger(json_serializer=json_line)  # escaped: ringfence.textsafe
tracer = Tracer()
metrics = Metrics()
_svc: dict[str, AzureEvents] = {}


def metric(name: str, value: float) -> None:
    metrics.add_metric(name=name, unit=MetricUnit.Count, value=value)


def ingest() -> AzureEvents:
    if "ingest" not in _svc:
        _svc["ingest"] = AzureEvents(
            Wiring(Config.from_env(owed_writer="azureevents")), azure_from_env(), metric=metric
        )
    return _svc["ingest"]


app = azure_event_routes(ingest)


@logger.inject_lambda_context
@tracer.capture_lambda_handler(capture_response=False, capture_error=False)  # answers hold tokens
@metrics.log_metrics
def handler(event: dict[str, Any], context: Any) -> dict[str, Any]:
    out = app.resolve(event, context)
    if int(out["statusCode"]) >= 500:
        metric("AzureEventsFailed", 1)
    return out
