"""GCP events (API Gateway REST ``POST /gcp/events``): Pub/Sub push or Eventarc audit-log events,
the pusher's OIDC token verified, into the governed inventory (docs/deploy-gcp.md)."""

from __future__ import annotations

from typing import Any

from aws_lambda_powertools import Logger, Metrics, Tracer
from aws_lambda_powertools.metrics import MetricUnit

from ringfence.clouds.aws.wiring import Wiring
from ringfence.clouds.gcp.config import GcpConfig
from ringfence.clouds.gcp.ingest import GcpIngest
from ringfence.control.wiring import Config
from ringfence.routes.gcp import gcp_event_routes
from ringfence.textsafe import json_line

logger = Logger(json_serializer=json_line)  # escaped: ringfence.textsafe
tracer = Tracer()
metrics = Metrics()
# read at cold start: a configuration that would fail open (secure tags trusted under any parent)
# fails the function's initialization, before any event is taken
_gcp = GcpConfig.from_env()
_svc: dict[str, GcpIngest] = {}


def metric(name: str, value: float) -> None:
    metrics.add_metric(name=name, unit=MetricUnit.Count, value=value)


def ingest() -> GcpIngest:
    if "ingest" not in _svc:
        _svc["ingest"] = GcpIngest(Wiring(Config.from_env(owed_writer="gcpevents")), _gcp, metric=metric)
    return _svc["ingest"]


app = gcp_event_routes(ingest)


@logger.inject_lambda_context
@tracer.capture_lambda_handler(capture_response=False, capture_error=False)  # answers hold tokens
@metrics.log_metrics
def handler(event: dict[str, Any], context: Any) -> dict[str, Any]:
    out = app.resolve(event, context)
    status = int(out["statusCode"])
    if status == 401:
        metric("GcpEventsRefused", 1)
    elif status >= 400:
        metric("GcpEventsFailed", 1)
    return out
