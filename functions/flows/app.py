"""Flows: S3 object-created events, through EventBridge (agents' report batches under reports/ of
the bundle bucket, VPC Flow Logs in the flow-log bucket) → resolved, classified, aggregated flow rows in the store.

What an object is read as follows from its bucket, not its key alone: ``reports/<workload>/…json``
of the bundle bucket is an agent's batch (the agent API writes it there); in any other bucket (the
flow-log bucket) only ``[prefix/]AWSLogs/<account>/vpcflowlogs/…`` is a VPC Flow Log, as AWS
delivers them. Anything else is skipped and counted (``FlowObjectsSkipped``): a ``reports/`` key
written into the flow-log bucket is no agent's batch, an unrelated upload no flow log."""

from __future__ import annotations

import re
import urllib.parse
from dataclasses import asdict
from typing import Any

from aws_lambda_powertools import Logger, Metrics, Tracer
from aws_lambda_powertools.metrics import MetricUnit

from ringfence.clouds.aws import clients
from ringfence.clouds.aws.flowlogs import FlowObjects, FlowsResult
from ringfence.clouds.aws.wiring import Wiring
from ringfence.control.wiring import Config

logger = Logger()
tracer = Tracer()
metrics = Metrics()
_wiring: Wiring | None = None

REPORT_KEY = re.compile(r"reports/[^/]+/.+\.json")
VPC_LOG_KEY = re.compile(r"(?:.+/)?AWSLogs/\d{12}/vpcflowlogs/.+")


def _records(event: dict[str, Any]) -> list[dict[str, Any]]:
    """The objects of an S3 notification (``Records``) or an EventBridge ``Object Created`` event."""
    if "Records" in event:
        return list(event["Records"])
    if event.get("source") == "aws.s3" and event.get("detail-type") == "Object Created":
        d = event["detail"]
        return [{"s3": {"bucket": {"name": d["bucket"]["name"]}, "object": {"key": d["object"]["key"]}}}]
    raise ValueError(f"not an S3 object-created event: {sorted(event)}")


def admitted(records: list[dict[str, Any]], bundle_bucket: str) -> tuple[list[dict[str, Any]], list[str]]:
    """The records to read, and the ``s3://`` names of those skipped (by bucket and key)."""
    keep, skipped = [], []
    for r in records:
        bucket = r["s3"]["bucket"]["name"]
        key = urllib.parse.unquote_plus(r["s3"]["object"]["key"])
        ok = REPORT_KEY.fullmatch(key) if bucket == bundle_bucket else VPC_LOG_KEY.fullmatch(key)
        (keep if ok else skipped).append(r if ok else f"s3://{bucket}/{key}")
    return keep, skipped


@logger.inject_lambda_context
@tracer.capture_lambda_handler
@metrics.log_metrics
def handler(event: dict[str, Any], context: Any) -> dict[str, Any]:
    global _wiring
    if _wiring is None:
        _wiring = Wiring(Config.from_env())
    svc = FlowObjects(
        _wiring,
        clients.client("s3"),
        lambda n, v: metrics.add_metric(name=n, unit=MetricUnit.Count, value=v),
    )
    records, skipped = admitted(_records(event), _wiring.cfg.bucket)
    if skipped:
        logger.warning("objects neither agents' batches nor VPC Flow Logs: not read", extra={"objects": skipped})
        metrics.add_metric(name="FlowObjectsSkipped", unit=MetricUnit.Count, value=len(skipped))
    result = svc.handle(records) if records else FlowsResult()
    result.skipped.extend(skipped)
    if result.malformed:
        # counted and named, never fatal: the rest of each file was read
        logger.warning("malformed flow log lines", extra={"count": result.malformed, "lines": result.malformed_lines})
    return asdict(result)
