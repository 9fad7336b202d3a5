"""Reconcile: scheduled full sync of the configured accounts/regions; converges lost events.
Then the effective-policy findings not announced yet go to the SIEM (``RINGFENCE_SIEM``)."""

from __future__ import annotations

from dataclasses import asdict
from typing import Any

from aws_lambda_powertools import Logger, Metrics, Tracer
from aws_lambda_powertools.metrics import MetricUnit
from aws_lambda_powertools.utilities.data_classes import EventBridgeEvent, event_source

from ringfence.clouds.aws.reconcile import Reconcile
from ringfence.clouds.aws.wiring import Wiring
from ringfence.control.findings import announce
from ringfence.control.wiring import Config
from ringfence.textsafe import json_line

logger = Logger(json_serializer=json_line)  # escaped: ringfence.textsafe
tracer = Tracer()
metrics = Metrics()


@logger.inject_lambda_context
@tracer.capture_lambda_handler(capture_response=False, capture_error=False)  # answers hold tokens
@metrics.log_metrics
@event_source(data_class=EventBridgeEvent)
def handler(event: EventBridgeEvent, context: Any) -> dict[str, Any]:
    w = Wiring(Config.from_env(owed_writer="reconcile"))
    svc = Reconcile(w, lambda n, v: metrics.add_metric(name=n, unit=MetricUnit.Count, value=v))
    result = asdict(svc.run())
    logger.info("reconciled", extra={"seen": result["seen"], "changed": len(result["changed"])})
    # effective-policy findings (agents silent, behind or holding other rules) to the SIEM, once each
    announced = announce(w)
    if announced:
        metrics.add_metric(name="FindingsAnnounced", unit=MetricUnit.Count, value=len(announced))
        logger.warning("effective-policy findings", extra={"findings": [f.model_dump() for f in announced]})
    return result | {"findings_announced": len(announced)}
