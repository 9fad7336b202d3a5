"""Publish: signed bundles stored, pointed at and announced, for the jobs compute fanned out.

Triggered by the standard publish queue (no reserved concurrency: workers run in parallel). Each
record is one :class:`ringfence.control.fanout.PublishJob`; jobs are independent — a bundle
pointer never moves backwards, so a job taken late cannot undo a later one. This function and
compute are the only ones with the signing key; neither faces the internet.

A failed batch is logged, counted (``PublishFailures``) and handed back for a retry (the
documents are content-addressed: a retry rewrites the same keys); a poison job ends in the
publish DLQ (alarmed).
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
from ringfence.control.fanout import PublishJob, PublishWorker
from ringfence.control.wiring import Config
from ringfence.textsafe import json_line

logger = Logger(json_serializer=json_line)  # escaped: ringfence.textsafe
tracer = Tracer()
metrics = Metrics()
_svc: dict[str, PublishWorker] = {}


class PublishRecord(SqsRecordModel):
    body: Json[PublishJob]  # type: ignore[assignment]  # the job compute wrote, parsed with the record


class PublishBatch(SqsModel):
    Records: list[PublishRecord]  # type: ignore[assignment]  # narrowed from SqsRecordModel


def service() -> PublishWorker:
    if "publish" not in _svc:
        _svc["publish"] = PublishWorker(
            Wiring(Config.from_env()), lambda n, v: metrics.add_metric(name=n, unit=MetricUnit.Count, value=v)
        )
    return _svc["publish"]


@logger.inject_lambda_context
@tracer.capture_lambda_handler(capture_response=False, capture_error=False)  # answers hold tokens
@metrics.log_metrics
def handler(event: dict[str, Any], context: Any) -> dict[str, Any]:
    batch = parse(event=event, model=PublishBatch)
    try:
        # the whole batch at once: its uploads in parallel, and one count on the engine head (a
        # single hot item every worker updates) instead of one per job
        stats, _ = service().run([r.body for r in batch.Records])
        logger.info("published", extra=asdict(stats))
        return {"batchItemFailures": []}
    except Exception:
        if len(batch.Records) == 1:
            return _failed(batch.Records)
        logger.warning("publish of a batch failed: its jobs one by one", exc_info=True)
    failed: list[PublishRecord] = []
    for r in batch.Records:  # isolate the failing job (documents are content-addressed: redoing is safe)
        try:
            stats, _ = service().run([r.body])
        except Exception:
            logger.exception("publish job failed", extra={"message_id": r.messageId})
            failed.append(r)
            continue
        logger.info("published", extra=asdict(stats))
    return _failed(failed)


def _failed(records: list[PublishRecord]) -> dict[str, Any]:
    for r in records:
        logger.error("publish failed; the job will be retried", extra={"message_id": r.messageId})
        metrics.add_metric(name="PublishFailures", unit=MetricUnit.Count, value=1)
    return {"batchItemFailures": [{"itemIdentifier": r.messageId} for r in records]}
