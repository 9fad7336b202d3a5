"""Lifecycle: ASG launch/terminate lifecycle actions. Updates the inventory and hands the
action to compute, which completes it with CONTINUE only after publication (or leaves the hook
to time out into its default result, and logs that)."""

from __future__ import annotations

import json
from typing import Any

from aws_lambda_powertools import Logger, Tracer
from aws_lambda_powertools.utilities.batch import BatchProcessor, EventType, process_partial_response
from aws_lambda_powertools.utilities.data_classes.sqs_event import SQSRecord
from aws_lambda_powertools.utilities.parser import parse
from aws_lambda_powertools.utilities.parser.models import EventBridgeModel

from ringfence.clouds.aws.lifecycle import Lifecycle
from ringfence.clouds.aws.wiring import Config, Wiring

logger = Logger()
tracer = Tracer()
processor = BatchProcessor(event_type=EventType.SQS)
_svc: dict[str, Lifecycle] = {}


def record_handler(record: SQSRecord) -> dict[str, Any]:
    if "lifecycle" not in _svc:
        _svc["lifecycle"] = Lifecycle(Wiring(Config.from_env()))
    event = json.loads(record.body)
    parse(event=event, model=EventBridgeModel)
    out = _svc["lifecycle"].handle(event)
    logger.info("lifecycle action queued for compute", extra=out)
    return out


@logger.inject_lambda_context
@tracer.capture_lambda_handler
def handler(event: dict[str, Any], context: Any) -> dict[str, Any]:
    return process_partial_response(event=event, record_handler=record_handler, processor=processor, context=context)
