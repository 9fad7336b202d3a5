"""Anchor: on a schedule, the audit chain's head written to the anchor bucket (Object Lock,
compliance mode), outside the audit table's trust domain. Its role reads the head item and writes
that bucket's ``anchors/`` prefix, nothing else; no other function may write the bucket.
``ringfence audit verify --anchor s3://BUCKET/anchors/`` then requires the chain to hold every
anchored head (docs/visibility.md)."""

from __future__ import annotations

import os
from typing import Any

from aws_lambda_powertools import Logger, Metrics, Tracer
from aws_lambda_powertools.metrics import MetricUnit

from ringfence.clouds.aws import clients
from ringfence.clouds.aws.anchor import Anchorer
from ringfence.control.wiring import Config
from ringfence.store.dynamodb import DynamoStore
from ringfence.textsafe import json_line

logger = Logger(json_serializer=json_line)  # escaped: ringfence.textsafe
tracer = Tracer()
metrics = Metrics()
_svc: dict[str, Anchorer] = {}
# seconds of the invocation's time kept back from checking records (a last Query page, the put)
RESERVE_S = 15.0


@logger.inject_lambda_context
@tracer.capture_lambda_handler(capture_response=False, capture_error=False)  # answers hold tokens
@metrics.log_metrics
def handler(event: dict[str, Any], context: Any) -> dict[str, Any]:
    if "anchor" not in _svc:
        cfg = Config.from_env()
        store = DynamoStore(
            cfg.inventory_table, cfg.state_table, cfg.audit_table, resource=clients.resource("dynamodb")
        )
        _svc["anchor"] = Anchorer(store, clients.client("s3"), os.environ["RINGFENCE_ANCHOR_BUCKET"])
    # the time left, less what the last page read and the put need: a chain too long for one run
    # (the first anchor of a deployment that audited for months) is anchored as far as verified,
    # and the next run continues from there
    budget = max(context.get_remaining_time_in_millis() / 1000 - RESERVE_S, 0.0)
    done = _svc["anchor"].run(budget)
    if done.key:
        metrics.add_metric(name="AuditHeadAnchored", unit=MetricUnit.Count, value=1)
        logger.info("audit head anchored", extra={"seq": done.head and done.head.seq, "key": done.key})
    if not done.complete:
        metrics.add_metric(name="AuditAnchorBehind", unit=MetricUnit.Count, value=done.behind)
        logger.warning(
            "the chain was verified and anchored up to seq %s in this run's time; %s record(s) to the head "
            "are left for the next scheduled run",
            done.head and done.head.seq,
            done.behind,
        )
    out: dict[str, Any] = {"seq": done.head.seq if done.head else 0, "key": done.key}
    if not done.complete:
        out["behind"] = done.behind
    return out
