"""Agents' report batches on one machine: how fast one agent may send them, and how long they are
kept. On AWS the bucket's lifecycle rule expires ``reports/`` after 90 days (``template.yaml``);
here :func:`sweep_reports` does, and :class:`ReportQuota` bounds what one workload's token can
write meanwhile (``ringfence serve`` archives every batch under ``<state>/objects/reports/``)."""

from __future__ import annotations

import contextlib
import logging
import math
import os
import shutil
import threading
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path

log = logging.getLogger("ringfence.local")

REPORT_RETENTION_DAYS = 90.0  # as the AWS bucket's lifecycle rule on reports/
# An agent sends what it buffered every report_interval (30 s): at most max_buffered_records
# (10,000) drops and as many flows, ~270 and ~215 bytes each as JSON, i.e. ~4.9 MB per 30 s
# (~160 KB/s) at its defaults with both buffers full; after an outage, its spool (4 MiB) on top.
REPORT_BYTES_PER_SECOND = 256 * 1024  # sustained, per workload: above that worst honest rate
REPORT_BURST_BYTES = 32 * 1024 * 1024  # a spool flush and a full interval at once fit


@dataclass
class ReportQuota:
    """A token bucket of report bytes per workload: ``rate`` bytes a second, at most ``burst``
    saved up. Kept in memory (one process serves the state directory)."""

    rate: float = REPORT_BYTES_PER_SECOND
    burst: float = REPORT_BURST_BYTES
    clock: Callable[[], float] = time.monotonic
    _buckets: dict[str, tuple[float, float]] = field(default_factory=dict)  # workload → (tokens, when)
    _lock: threading.Lock = field(default_factory=threading.Lock)

    @classmethod
    def from_env(cls, env: Mapping[str, str] | None = None) -> ReportQuota:
        """``RINGFENCE_REPORT_BYTES_PER_SECOND`` and ``RINGFENCE_REPORT_BURST_BYTES``."""
        e = os.environ if env is None else env
        rate = float(e.get("RINGFENCE_REPORT_BYTES_PER_SECOND", REPORT_BYTES_PER_SECOND))
        burst = float(e.get("RINGFENCE_REPORT_BURST_BYTES", REPORT_BURST_BYTES))
        if rate <= 0 or burst <= 0:
            raise ValueError("RINGFENCE_REPORT_BYTES_PER_SECOND and RINGFENCE_REPORT_BURST_BYTES must be positive")
        return cls(rate, burst)

    def take(self, workload_id: str, size: int) -> int | None:
        """Spend ``size`` bytes of ``workload_id``'s quota: None if it had them, else the whole
        seconds until it will (nothing is spent then). A batch larger than ``burst`` is taken
        once the bucket is full, leaving it in debt (as on AWS, where it fits as a window's
        first): else it would be refused forever and the agent's spool would never drain."""
        now = self.clock()
        need = min(size, self.burst)
        with self._lock:
            tokens, when = self._buckets.get(workload_id, (self.burst, now))
            tokens = min(self.burst, tokens + (now - when) * self.rate)
            if tokens >= need:
                self._buckets[workload_id] = (tokens - size, now)
                return None
            self._buckets[workload_id] = (tokens, now)
            return max(1, math.ceil((need - tokens) / self.rate))

    def give_back(self, workload_id: str, size: int) -> None:
        """Return ``size`` bytes :meth:`take` spent on a batch that was then refused with nothing
        written (a failed store): the sender is not charged for the control plane's failure."""
        now = self.clock()
        with self._lock:
            tokens, when = self._buckets.get(workload_id, (self.burst, now))
            tokens = min(self.burst, tokens + (now - when) * self.rate + size)
            self._buckets[workload_id] = (tokens, now)


def retention_days(env: Mapping[str, str] | None = None) -> float:
    """``RINGFENCE_REPORT_RETENTION_DAYS`` (default 90)."""
    e = os.environ if env is None else env
    days = float(e.get("RINGFENCE_REPORT_RETENTION_DAYS", REPORT_RETENTION_DAYS))
    if days <= 0:
        raise ValueError("RINGFENCE_REPORT_RETENTION_DAYS must be positive")
    return days


def sweep_reports(objects: Path, days: float = REPORT_RETENTION_DAYS, now: float | None = None) -> int:
    """Delete the report batches under ``objects/reports/<workload>/<YYYY>/<MM>/<DD>/`` of days
    that ended more than ``days`` days ago (the day in the path is the day the batch arrived,
    UTC), and the month and year directories left empty once no batch can arrive in them (a
    workload's own directory stays: a batch may be on its way into it); the number deleted."""
    root = objects / "reports"
    if not root.is_dir():
        return 0
    cutoff = time.strftime("%Y/%m/%d", time.gmtime((time.time() if now is None else now) - days * 86400))
    removed = 0
    for wdir in _dirs(root):
        for ydir in _dirs(wdir):
            for mdir in _dirs(ydir):
                for ddir in _dirs(mdir):
                    day = f"{ydir.name}/{mdir.name}/{ddir.name}"
                    if len(day) == 10 and day < cutoff:
                        removed += sum(1 for p in ddir.rglob("*") if p.is_file())
                        shutil.rmtree(ddir, ignore_errors=True)
                if f"{ydir.name}/{mdir.name}" < cutoff[:7]:  # a month no batch arrives in any more
                    _rmdir_if_empty(mdir)
            if ydir.name < cutoff[:4]:
                _rmdir_if_empty(ydir)
    if removed:
        log.info("report retention: %d batches older than %g days deleted", removed, days)
    return removed


def _dirs(p: Path) -> list[Path]:
    try:
        return sorted(c for c in p.iterdir() if c.is_dir() and not c.is_symlink())
    except OSError:
        return []


def _rmdir_if_empty(p: Path) -> None:
    with contextlib.suppress(OSError):
        p.rmdir()
