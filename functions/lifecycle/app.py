"""Lifecycle: ASG launch/terminate lifecycle actions. Updates the inventory and hands the
action to compute, which completes it with CONTINUE only after publication (or leaves the hook
to time out into its default result, and logs that)."""

from __future__ import annotations

from typing import Any

from aws_lambda_powertools import Logger, Metrics, Tracer
from aws_lambda_powertools.metrics import MetricUnit
from aws_lambda_powertools.utilities.batch import BatchProcessor, EventType, process_partial_response
from aws_lambda_powertools.utilities.data_classes.sqs_event import SQSRecord

from ringfence.clouds.aws.lifecycle import Lifecycle
from ringfence.clouds.aws.wiring import Wiring
from ringfence.control.wiring import Config
from ringfence.events import normalize_json
from ringfence.textsafe import json_line

logger = Logger(json_serializer=json_line)  # escaped: ringfence.textsafe
tracer = Tracer()
metrics = Metrics()
processor = BatchProcessor(event_type=EventType.SQS)
_svc: dict[str, Lifecycle] = {}


def _count(name: str, value: float) -> None:
    metrics.add_metric(name=name, unit=MetricUnit.Count, value=value)


def _service() -> Lifecycle:
    if "lifecycle" not in _svc:
        _svc["lifecycle"] = Lifecycle(Wiring(Config.from_env(owed_writer="lifecycle")), _count)
    return _svc["lifecycle"]


def record_handler(record: SQSRecord) -> dict[str, Any]:
    _service()
    try:
        # the body is parsed once, envelope and detail together; a malformed action is retried
        # and then redriven to the lifecycle DLQ (alarmed)
        out = _svc["lifecycle"].apply(normalize_json(record.body))
    except Exception:
        _count("LifecycleActionsFailed", 1)
        raise
    if "not_ours" not in out:  # another hook's action was logged (once) where it was ignored
        logger.info("lifecycle action queued for compute", extra=out)
    return out


@logger.inject_lambda_context
@tracer.capture_lambda_handler(capture_response=False, capture_error=False)  # answers hold tokens
@metrics.log_metrics
def handler(event: dict[str, Any], context: Any) -> dict[str, Any]:
    lifecycle = _service()
    # one DescribeInstances per account/region for the whole batch (a scale-out's actions arrive
    # together); its reads retry until the batch's deadline at most, which keeps time for done()
    lifecycle.prefetch(
        [r["body"] for r in event.get("Records", []) if isinstance(r, dict) and "body" in r],
        lambda: float(context.get_remaining_time_in_millis()) / 1000,
    )
    try:
        return process_partial_response(
            event=event, record_handler=record_handler, processor=processor, context=context
        )
    finally:
        lifecycle.done()
