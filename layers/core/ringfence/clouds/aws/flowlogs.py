"""Flows in, on AWS: S3 object-created events for agents' report batches (``reports/``
in the bundle bucket, written by the agent API) and for VPC Flow Logs delivered to S3 (any key
in the flow-log bucket), each read, resolved, classified under the active policy and folded into
the store's flow rows (:class:`ringfence.flows.ingest.FlowIngest`)."""

from __future__ import annotations

import json
import logging
import urllib.parse
from dataclasses import dataclass, field
from typing import Any

from ringfence.control.wiring import BaseWiring, Metric, no_metric
from ringfence.flows.ingest import FlowIngest, agent_flows
from ringfence.flows.records import Flow
from ringfence.flows.vpclogs import parse_gzip

log = logging.getLogger(__name__)

REPORTS_PREFIX = "reports/"


@dataclass(slots=True)
class FlowsResult:
    objects: int = 0
    flows: int = 0
    rows: int = 0
    capped: int = 0  # rows not stored: past their reporter's rows of the day (FlowIngest.rows_per_reporter)
    malformed: int = 0
    malformed_lines: list[str] = field(default_factory=list)  # file:line: reason (first ones)
    skipped: list[str] = field(default_factory=list)  # objects not read, and why


class FlowObjects:
    def __init__(self, w: BaseWiring, s3: Any, metric: Metric = no_metric, retention_days: int = 30) -> None:
        self.w = w
        self.s3 = s3
        self.metric = metric
        self.retention_days = retention_days

    def handle_event(self, event: dict[str, Any]) -> FlowsResult:
        """An S3 notification (``Records``) or an EventBridge ``Object Created`` event (how the
        stacks deliver it: S3 → EventBridge → this function)."""
        if "Records" in event:
            return self.handle(event["Records"])
        if event.get("source") == "aws.s3" and event.get("detail-type") == "Object Created":
            d = event["detail"]
            return self.handle(
                [{"s3": {"bucket": {"name": d["bucket"]["name"]}, "object": {"key": d["object"]["key"]}}}]
            )
        raise ValueError(f"not an S3 object-created event: {sorted(event)}")

    def handle(self, records: list[dict[str, Any]]) -> FlowsResult:
        out = FlowsResult()
        active = self.w.active_policy()
        if active is None:
            out.skipped = [self._name(r) for r in records]
            log.warning("no active policy: %d flow objects not classified", len(records))
            return out
        ingest = FlowIngest(self.w.store, active[1], self.retention_days)
        ingest.sync()
        flows: list[Flow] = []
        for r in records:
            bucket = r["s3"]["bucket"]["name"]
            key = urllib.parse.unquote_plus(r["s3"]["object"]["key"])
            body = self.s3.get_object(Bucket=bucket, Key=key)["Body"].read()
            if key.startswith(REPORTS_PREFIX) and key.endswith(".json"):
                parts = key.split("/")
                flows += agent_flows(parts[1] if len(parts) > 2 else "", json.loads(body))
            else:
                got, report = parse_gzip(f"s3://{bucket}/{key}", body)
                flows += got
                out.malformed += report.malformed
                out.malformed_lines.extend(str(e) for e in report.errors[: max(0, 20 - len(out.malformed_lines))])
            out.objects += 1
        # all the objects' flows in one pass: one address look-up and one write per row, not per object
        res = ingest.flows(flows)
        out.flows, out.rows, out.capped = res.flows, res.rows, res.capped
        self.metric("FlowsIngested", out.flows)
        if out.capped:
            self.metric("FlowRowsCapped", out.capped)
        if out.malformed:
            self.metric("FlowLogLinesMalformed", out.malformed)
        return out

    @staticmethod
    def _name(r: dict[str, Any]) -> str:
        return f"s3://{r['s3']['bucket']['name']}/{r['s3']['object']['key']}"
