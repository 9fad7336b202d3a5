"""Perimeter: scheduled (and after policy changes) reconcile of the few coarse security groups.
Checks quotas before changing anything; over quota, nothing changes and the limit is named."""

from __future__ import annotations

import json
import os
from typing import Any

from aws_lambda_powertools import Logger, Metrics, Tracer
from aws_lambda_powertools.metrics import MetricUnit
from aws_lambda_powertools.utilities.data_classes import EventBridgeEvent, event_source

from ringfence.clouds.aws.perimeter import Perimeter
from ringfence.clouds.aws.wiring import Config, Wiring
from ringfence.perimeter import PerimeterConfig

logger = Logger()
tracer = Tracer()
metrics = Metrics()


@logger.inject_lambda_context
@tracer.capture_lambda_handler
@metrics.log_metrics
@event_source(data_class=EventBridgeEvent)
def handler(event: EventBridgeEvent, context: Any) -> dict[str, Any]:
    config = PerimeterConfig.model_validate(json.loads(os.environ.get("RINGFENCE_PERIMETER_CONFIG", "{}") or "{}"))
    svc = Perimeter(
        Wiring(Config.from_env()), config, lambda n, v: metrics.add_metric(name=n, unit=MetricUnit.Count, value=v)
    )
    results = svc.run(dry_run=os.environ.get("RINGFENCE_PERIMETER_DRY_RUN") == "true")
    for r in results:
        if r.get("violations"):
            logger.error("perimeter plan over quota: nothing changed", extra=r)
        else:
            logger.info("perimeter reconciled", extra=r)
    return {"results": results}
