"""Ingest: SQS batch of EventBridge events → normalized, described, inventory upserted.

Each record's body is parsed once (``ringfence.events.normalize_json``: envelope and detail);
the batch's instances are described together, then each event is applied. Idempotent on the
EventBridge event id (Powertools idempotency on DynamoDB); partial batch failures are reported;
a malformed event goes straight to the DLQ with a log line and a metric.
"""

from __future__ import annotations

import os
from dataclasses import asdict
from typing import Any

from aws_lambda_powertools import Logger, Metrics, Tracer
from aws_lambda_powertools.metrics import MetricUnit
from aws_lambda_powertools.utilities.batch import BatchProcessor, EventType, process_partial_response
from aws_lambda_powertools.utilities.data_classes.sqs_event import SQSRecord
from aws_lambda_powertools.utilities.idempotency import (
    DynamoDBPersistenceLayer,
    IdempotencyConfig,
    idempotent_function,
)

from ringfence.clouds.aws import clients
from ringfence.clouds.aws.ingest import Ingest
from ringfence.clouds.aws.wiring import Wiring
from ringfence.control.wiring import Config
from ringfence.events import DomainEvent, MalformedEvent, UnservedAccount, normalize_json
from ringfence.textsafe import json_line

logger = Logger(json_serializer=json_line)  # escaped: ringfence.textsafe
tracer = Tracer()
metrics = Metrics()
processor = BatchProcessor(event_type=EventType.SQS)
_svc: dict[str, Any] = {}
_idem = IdempotencyConfig(event_key_jmespath="event_id", expires_after_seconds=24 * 3600)
# this invocation's records, parsed once by the handler: message id → event, None (valid, not
# ours) or the reason it is malformed
_batch: dict[str, DomainEvent | MalformedEvent | None] = {}


def _setup() -> dict[str, Any]:
    if not _svc:
        w = Wiring(Config.from_env(owed_writer="ingest"))
        _svc["wiring"] = w
        _svc["ingest"] = Ingest(w, lambda n, v: metrics.add_metric(name=n, unit=MetricUnit.Count, value=v))
        store = DynamoDBPersistenceLayer(
            table_name=os.environ["RINGFENCE_IDEMPOTENCY_TABLE"], boto3_client=clients.client("dynamodb")
        )
        _svc["process"] = idempotent_function(data_keyword_argument="event", config=_idem, persistence_store=store)(
            _process
        )
    return _svc


def _process(event: DomainEvent) -> dict[str, Any]:
    return asdict(_svc["ingest"].apply(event))


def _parse(body: str) -> DomainEvent | MalformedEvent | None:
    try:
        return normalize_json(body)
    except MalformedEvent as exc:
        return exc


def _dead_letter(record: SQSRecord, reason: str) -> None:
    logger.error("malformed event sent to DLQ", extra={"message_id": record.message_id, "reason": reason})
    metrics.add_metric(name="MalformedEvents", unit=MetricUnit.Count, value=1)
    _svc["wiring"].sqs.send_message(
        QueueUrl=_svc["wiring"].cfg.dlq_url,
        MessageBody=record.body,
        MessageAttributes={"reason": {"DataType": "String", "StringValue": reason[:1000]}},
    )


def record_handler(record: SQSRecord) -> dict[str, Any] | None:
    svc = _setup()
    event = _batch.pop(record.message_id) if record.message_id in _batch else _parse(record.body)
    if isinstance(event, MalformedEvent):
        _dead_letter(record, str(event))
        return None
    if event is None:
        svc["ingest"].ignored()
        return {"kind": "ignored"}
    # an event whose account and Region failed the batch, or one the batch has no time left for,
    # fails alone here (to be retried), before its idempotency record is written
    svc["ingest"].admit(event)
    try:
        result: dict[str, Any] = svc["process"](event=event)
    except UnservedAccount as exc:  # kept for a redrive once the account is listed
        _dead_letter(record, str(exc))
        return None
    # once per batch, replays included (their removals to the priority lane too)
    svc["ingest"].hand_on(result.get("changed") or [], result.get("removed") or [])
    logger.info("ingested", extra=result)
    return result


@logger.inject_lambda_context
@tracer.capture_lambda_handler(capture_response=False, capture_error=False)  # answers hold tokens
@metrics.log_metrics
def handler(event: dict[str, Any], context: Any) -> dict[str, Any]:
    _idem.register_lambda_context(context)
    ingest = _setup()["ingest"]
    _batch.clear()
    for r in event.get("Records", []):
        if isinstance(r, dict) and isinstance(r.get("messageId"), str) and isinstance(r.get("body"), str):
            _batch[r["messageId"]] = _parse(r["body"])
    # one DescribeInstances per account/region for the whole batch; the batch stops taking on
    # events in time for done() to hand on what it did (a timed-out invocation fails them all)
    ingest.prefetch_events(
        (e for e in _batch.values() if isinstance(e, DomainEvent)),
        lambda: float(context.get_remaining_time_in_millis()) / 1000,
    )
    try:
        return process_partial_response(
            event=event, record_handler=record_handler, processor=processor, context=context
        )
    finally:
        ingest.done()
        _batch.clear()
