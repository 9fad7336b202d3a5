"""Flows: S3 object-created events, through EventBridge (agents' report batches under reports/ of
the bundle bucket, VPC Flow Logs in the flow-log bucket) → resolved, classified, aggregated flow rows in the store.

What an object is read as follows from its bucket, not its key alone: ``reports/<workload>/…json``
of the bundle bucket is an agent's batch (the agent API writes it there); in any other bucket (the
flow-log bucket) only ``[prefix/]AWSLogs/<account>/vpcflowlogs/…`` is a VPC Flow Log, as AWS
delivers them, and only for an account allowed (``FLOW_LOG_ACCOUNTS``: account ids, comma
separated, or ``*`` for any; unset, the function's own account, from its ARN). Anything else is
skipped and counted (``FlowObjectsSkipped``): a ``reports/`` key written into the flow-log bucket
is no agent's batch, an unrelated upload no flow log, another account's logs (a bucket policy
that lets another account's log delivery write there) none of this deployment's."""

from __future__ import annotations

import os
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
from ringfence.flows.ingest import FlowIngest
from ringfence.textsafe import json_line

logger = Logger(json_serializer=json_line)  # escaped: ringfence.textsafe
tracer = Tracer()
metrics = Metrics()
_wiring: Wiring | None = None

REPORT_KEY = re.compile(r"reports/[^/]+/.+\.json")
VPC_LOG_KEY = re.compile(r"(?:.+/)?AWSLogs/(\d{12})/vpcflowlogs/.+")


def allowed_accounts(context: Any) -> frozenset[str] | None:
    """The accounts whose VPC Flow Logs are read (None: any): ``FLOW_LOG_ACCOUNTS``, else the
    function's own account (none known: none)."""
    raw = os.environ.get("FLOW_LOG_ACCOUNTS", "").strip()
    if raw == "*":
        return None
    if raw:
        return frozenset(a.strip() for a in raw.split(",") if a.strip())
    arn = str(getattr(context, "invoked_function_arn", "") or "").split(":")
    return frozenset(arn[4:5]) if len(arn) > 4 and re.fullmatch(r"\d{12}", arn[4]) else frozenset()


def _records(event: dict[str, Any]) -> list[dict[str, Any]]:
    """The objects of an S3 notification (``Records``) or an EventBridge ``Object Created`` event."""
    if "Records" in event:
        return list(event["Records"])
    if event.get("source") == "aws.s3" and event.get("detail-type") == "Object Created":
        d = event["detail"]
        return [{"s3": {"bucket": {"name": d["bucket"]["name"]}, "object": {"key": d["object"]["key"]}}}]
    raise ValueError(f"not an S3 object-created event: {sorted(event)}")


def admitted(
    records: list[dict[str, Any]], bundle_bucket: str, accounts: frozenset[str] | None = None
) -> tuple[list[dict[str, Any]], list[str]]:
    """The records to read, and the ``s3://`` names of those skipped (by bucket and key; a flow
    log's account in ``accounts``, None: any)."""
    keep: list[dict[str, Any]] = []
    skipped: list[str] = []
    for r in records:
        bucket = r["s3"]["bucket"]["name"]
        key = urllib.parse.unquote_plus(r["s3"]["object"]["key"])
        if bucket == bundle_bucket:
            ok = REPORT_KEY.fullmatch(key) is not None
        else:
            m = VPC_LOG_KEY.fullmatch(key)
            ok = m is not None and (accounts is None or m.group(1) in accounts)
        if ok:
            keep.append(r)
        else:
            skipped.append(f"s3://{bucket}/{key}")
    return keep, skipped


def _vpc_objects(w: Wiring, records: list[dict[str, Any]], out: FlowsResult) -> int:
    """VPC Flow Log objects, each read and folded a chunk of lines at a time
    (:meth:`FlowIngest.vpc_object`: memory bounded whatever the object's size, not a list of
    every flow of it)."""
    active = w.active_policy()
    if active is None:
        out.skipped.extend(f"s3://{r['s3']['bucket']['name']}/{r['s3']['object']['key']}" for r in records)
        logger.warning("no active policy: flow log objects not classified", extra={"objects": len(records)})
        return 0
    ingest = FlowIngest(w.store, active[1])
    ingest.sync()
    s3 = clients.client("s3")
    flows = malformed = overflow = 0
    for r in records:
        bucket = r["s3"]["bucket"]["name"]
        key = urllib.parse.unquote_plus(r["s3"]["object"]["key"])
        body = s3.get_object(Bucket=bucket, Key=key)["Body"].read()
        res = ingest.vpc_object(f"s3://{bucket}/{key}", body)
        del body
        out.objects += 1
        out.flows += res.flows
        out.rows += res.rows
        flows += res.flows
        malformed += res.malformed
        overflow += res.overflow
        out.malformed += res.malformed
        room = max(0, 20 - len(out.malformed_lines))
        out.malformed_lines.extend(str(e) for e in res.files[0].errors[:room])
    metrics.add_metric(name="FlowsIngested", unit=MetricUnit.Count, value=flows)
    if malformed:
        metrics.add_metric(name="FlowLogLinesMalformed", unit=MetricUnit.Count, value=malformed)
    if overflow:
        metrics.add_metric(name="FlowsOverRowLimit", unit=MetricUnit.Count, value=overflow)
    return overflow


@logger.inject_lambda_context
@tracer.capture_lambda_handler(capture_response=False, capture_error=False)  # answers hold tokens
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
    records, skipped = admitted(_records(event), _wiring.cfg.bucket, allowed_accounts(context))
    if skipped:
        logger.warning("objects neither agents' batches nor VPC Flow Logs: not read", extra={"objects": skipped})
        metrics.add_metric(name="FlowObjectsSkipped", unit=MetricUnit.Count, value=len(skipped))
    bundle = _wiring.cfg.bucket
    reports = [r for r in records if r["s3"]["bucket"]["name"] == bundle]
    result = svc.handle(reports) if reports else FlowsResult()
    result.skipped.extend(skipped)
    logs = [r for r in records if r["s3"]["bucket"]["name"] != bundle]
    over = _vpc_objects(_wiring, logs, result) if logs else 0
    if result.malformed:
        # counted and named, never fatal: the rest of each file was read
        logger.warning("malformed flow log lines", extra={"count": result.malformed, "lines": result.malformed_lines})
    return {**asdict(result), "flows_over_row_limit": over}
