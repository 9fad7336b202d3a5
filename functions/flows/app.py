"""Flows: S3 object-created events, through EventBridge (agents' report batches under reports/ of
the bundle bucket, VPC Flow Logs in the flow-log bucket) → resolved, classified, aggregated flow rows in the store."""

from __future__ import annotations

from dataclasses import asdict
from typing import Any

from aws_lambda_powertools import Logger, Metrics, Tracer
from aws_lambda_powertools.metrics import MetricUnit

from ringfence.clouds.aws import clients
from ringfence.clouds.aws.flowlogs import FlowObjects
from ringfence.clouds.aws.wiring import Config, Wiring

logger = Logger()
tracer = Tracer()
metrics = Metrics()
_wiring: Wiring | None = None


@logger.inject_lambda_context
@tracer.capture_lambda_handler
@metrics.log_metrics
def handler(event: dict[str, Any], context: Any) -> dict[str, Any]:
    global _wiring
    if _wiring is None:
        _wiring = Wiring(Config.from_env())
    svc = FlowObjects(
        _wiring,
        clients.client("s3"),
        lambda n, v: metrics.add_metric(name=n, unit=MetricUnit.Count, value=v),
    )
    result = svc.handle_event(event)
    if result.malformed:
        # counted and named, never fatal: the rest of each file was read
        logger.warning("malformed flow log lines", extra={"count": result.malformed, "lines": result.malformed_lines})
    return asdict(result)
