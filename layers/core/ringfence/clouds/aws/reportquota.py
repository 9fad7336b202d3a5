"""What one workload's token may report on AWS: report bytes per workload per fixed window, counted
in the state table. ``ringfence serve`` keeps a token bucket in memory
(:class:`ringfence.local.retention.ReportQuota`); the agent API runs in as many Lambda environments
as there are concurrent requests, so its count is one item per workload and window
(``rquota#<workload>`` / ``<window start>``), grown by a conditional ADD that fails once the batch
would take it past the quota, and expired by the table's TTL."""

from __future__ import annotations

import logging
import math
import os
import time
from collections.abc import Callable, Mapping
from typing import Any

from botocore.exceptions import ClientError

from ringfence.local.retention import REPORT_BURST_BYTES, REPORT_BYTES_PER_SECOND

log = logging.getLogger(__name__)

PREFIX = "rquota#"  # the agent-API role's only grant for these items (template.yaml, infra/)


class TableReportQuota:
    """``burst`` report bytes per workload in each window of ``burst / rate`` seconds (serve's
    settings: the same bytes on average, at most twice ``burst`` across a window's end)."""

    def __init__(
        self,
        table: Any,
        rate: float = REPORT_BYTES_PER_SECOND,
        burst: float = REPORT_BURST_BYTES,
        clock: Callable[[], float] = time.time,
    ) -> None:
        if rate <= 0 or burst <= 0:
            raise ValueError("RINGFENCE_REPORT_BYTES_PER_SECOND and RINGFENCE_REPORT_BURST_BYTES must be positive")
        self.table = table
        self.quota = int(burst)
        self.window = max(1, math.ceil(burst / rate))
        self.clock = clock

    @classmethod
    def from_env(cls, table: Any, env: Mapping[str, str] | None = None) -> TableReportQuota:
        """``RINGFENCE_REPORT_BYTES_PER_SECOND`` and ``RINGFENCE_REPORT_BURST_BYTES``, as serve reads them."""
        e = os.environ if env is None else env
        rate = float(e.get("RINGFENCE_REPORT_BYTES_PER_SECOND") or REPORT_BYTES_PER_SECOND)
        burst = float(e.get("RINGFENCE_REPORT_BURST_BYTES") or REPORT_BURST_BYTES)
        return cls(table, rate, burst)

    def take(self, workload_id: str, size: int) -> int | None:
        """Count ``size`` bytes against ``workload_id``'s window: None if they fit, else the whole
        seconds until the next window (nothing is counted then). A batch alone larger than the
        quota fits only as a window's first."""
        now = self.clock()
        start = int(now // self.window) * self.window
        try:
            self.table.update_item(
                Key={"pk": f"{PREFIX}{workload_id}", "sk": f"{start:012d}"},
                UpdateExpression="SET #ttl = :ttl ADD #bytes :size",
                ConditionExpression="attribute_not_exists(#bytes) OR #bytes <= :room",
                ExpressionAttributeNames={"#bytes": "bytes", "#ttl": "ttl"},
                # kept a window past its end: TTL deletion lags, and the item is never read again
                ExpressionAttributeValues={":size": size, ":room": self.quota - size, ":ttl": start + 2 * self.window},
            )
        except ClientError as exc:
            if exc.response.get("Error", {}).get("Code") != "ConditionalCheckFailedException":
                raise  # the batch is answered 5xx: the agent keeps it and sends it again later
            return max(1, math.ceil(start + self.window - now))
        return None

    def give_back(self, workload_id: str, size: int) -> None:
        """Take ``size`` bytes back off the current window's count: :meth:`take` counted them for
        a batch then refused with nothing archived (a failed S3 write). Only a window holding at
        least ``size`` bytes gives them back (the count never goes below zero); a refusal that
        straddles a window's end gives them back to the next window, if it holds as much already
        (the earlier one no longer limits anything). A failure here is logged, not raised over the
        route's own: the sender then pays for that batch."""
        start = int(self.clock() // self.window) * self.window
        try:
            self.table.update_item(
                Key={"pk": f"{PREFIX}{workload_id}", "sk": f"{start:012d}"},
                UpdateExpression="ADD #bytes :less",
                ConditionExpression="#bytes >= :size",
                ExpressionAttributeNames={"#bytes": "bytes"},
                ExpressionAttributeValues={":less": -size, ":size": size},
            )
        except ClientError as exc:
            if exc.response.get("Error", {}).get("Code") != "ConditionalCheckFailedException":
                log.warning("report quota of %s: %d bytes not given back (%s)", workload_id, size, exc)
