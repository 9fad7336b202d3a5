"""Reconcile: scheduled full sync of the configured accounts/regions; converges lost events."""

from __future__ import annotations

from dataclasses import asdict
from typing import Any

from aws_lambda_powertools import Logger, Metrics, Tracer
from aws_lambda_powertools.metrics import MetricUnit
from aws_lambda_powertools.utilities.data_classes import EventBridgeEvent, event_source

from ringfence.clouds.aws.reconcile import Reconcile
from ringfence.clouds.aws.wiring import Wiring
from ringfence.control.wiring import Config

logger = Logger()
tracer = Tracer()
metrics = Metrics()


@logger.inject_lambda_context
@tracer.capture_lambda_handler
@metrics.log_metrics
@event_source(data_class=EventBridgeEvent)
def handler(event: EventBridgeEvent, context: Any) -> dict[str, Any]:
    svc = Reconcile(Wiring(Config.from_env()), lambda n, v: metrics.add_metric(name=n, unit=MetricUnit.Count, value=v))
    result = asdict(svc.run())
    logger.info("reconciled", extra={"seen": result["seen"], "changed": len(result["changed"])})
    return result
