"""Compute: inventory changes → engine (warm in this container) → signed deltas/bundles → nudges.

Triggered by a FIFO queue with a single message group (and reserved concurrency 1), so
computations are serialized; a whole batch is applied at once and its bundles rendered once.

A failed computation is logged, counted (``ComputeFailures``, alarmed) and its whole batch handed
back for a retry: the function itself does not fail, so Lambda's ``Errors`` counts only crashes
and timeouts. A stuck queue shows in its ``ApproximateAgeOfOldestMessage`` (alarmed too).
"""

from __future__ import annotations

from dataclasses import asdict
from typing import Any

from aws_lambda_powertools import Logger, Metrics, Tracer
from aws_lambda_powertools.metrics import MetricUnit
from aws_lambda_powertools.utilities.parser import parse
from aws_lambda_powertools.utilities.parser.models import SqsModel, SqsRecordModel
from pydantic import Json

from ringfence.clouds.aws.wiring import Wiring
from ringfence.control.compute import Compute
from ringfence.control.wiring import Config
from ringfence.textsafe import json_line

logger = Logger(json_serializer=json_line)  # escaped: ringfence.textsafe
tracer = Tracer()
metrics = Metrics()
_svc: dict[str, Compute] = {}


class ComputeRecord(SqsRecordModel):
    body: Json[dict[str, Any]]  # the message enqueue_compute wrote, parsed with the record


class ComputeBatch(SqsModel):
    Records: list[ComputeRecord]  # type: ignore[assignment]  # narrowed from SqsRecordModel


def service() -> Compute:
    if "compute" not in _svc:
        _svc["compute"] = Compute(
            Wiring(Config.from_env()), lambda n, v: metrics.add_metric(name=n, unit=MetricUnit.Count, value=v)
        )
    return _svc["compute"]


@logger.inject_lambda_context
@tracer.capture_lambda_handler(capture_response=False, capture_error=False)  # answers hold tokens
@metrics.log_metrics
def handler(event: dict[str, Any], context: Any) -> dict[str, Any]:
    batch = parse(event=event, model=ComputeBatch)
    try:
        stats = service().run([r.body for r in batch.Records])
    except Exception:
        logger.exception("compute failed; the batch will be retried (the engine rebuilds on retry)")
        metrics.add_metric(name="ComputeFailures", unit=MetricUnit.Count, value=1)
        return {"batchItemFailures": [{"itemIdentifier": r.messageId} for r in batch.Records]}
    logger.info("computed", extra=asdict(stats))
    return {"batchItemFailures": []}
