"""Compute: inventory changes → engine (warm in this container) → signed deltas/bundles → nudges.

Triggered by a FIFO queue with a single message group (and reserved concurrency 1), so
computations are serialized; a whole batch is applied at once and its bundles rendered once.
"""

from __future__ import annotations

import json
from dataclasses import asdict
from typing import Any

from aws_lambda_powertools import Logger, Metrics, Tracer
from aws_lambda_powertools.metrics import MetricUnit
from aws_lambda_powertools.utilities.parser import parse
from aws_lambda_powertools.utilities.parser.models import SqsModel

from ringfence.clouds.aws.compute import Compute
from ringfence.clouds.aws.wiring import Config, Wiring

logger = Logger()
tracer = Tracer()
metrics = Metrics()
_svc: dict[str, Compute] = {}


def service() -> Compute:
    if "compute" not in _svc:
        _svc["compute"] = Compute(
            Wiring(Config.from_env()), lambda n, v: metrics.add_metric(name=n, unit=MetricUnit.Count, value=v)
        )
    return _svc["compute"]


@logger.inject_lambda_context
@tracer.capture_lambda_handler
@metrics.log_metrics
def handler(event: dict[str, Any], context: Any) -> dict[str, Any]:
    batch = parse(event=event, model=SqsModel)
    messages = [json.loads(r.body) for r in batch.Records]
    try:
        stats = service().run(messages)
    except Exception:
        logger.exception("compute failed; the batch will be retried (the engine rebuilds on retry)")
        return {"batchItemFailures": [{"itemIdentifier": r.messageId} for r in batch.Records]}
    logger.info("computed", extra=asdict(stats))
    return {"batchItemFailures": []}
