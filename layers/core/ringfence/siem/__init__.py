"""SIEM output: audit records, agents' drops and findings as OCSF 1.7.0 JSON (or CEF), to a file,
syslog, EventBridge or CloudWatch Logs (docs/visibility.md).

:class:`Siem` is what the control plane holds (``BaseWiring.siem``, from ``ringfence serve --siem
SPEC`` or ``$RINGFENCE_SIEM``). Sending never fails the action that caused the event: the audit
record is already in the store (the authority, hash-chained), so a SIEM that is down costs a
logged error and a count in :attr:`Siem.failed`, not a refused provision or a lost agent report.
"""

from __future__ import annotations

import json
import logging
import threading
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from typing import Any

from ringfence.audit import AuditRecord
from ringfence.siem import ocsf
from ringfence.siem.cef import to_cef
from ringfence.siem.sinks import SiemSpecError, Sink, parse

__all__ = ["DROP_BUDGET", "DROP_WINDOW", "Siem", "SiemSpecError", "fold_drops", "ocsf", "to_cef"]

log = logging.getLogger("ringfence.siem")

# An agent's report turns into SIEM events; without a bound one 256 KiB report of distinct drops
# made ~1.5 MB of OCSF per sink. Drops are folded per batch, then at most DROP_BUDGET folded
# events per workload per DROP_WINDOW seconds are sent (0: no budget); past it, a summary says how
# many were suppressed (the archived batch keeps every record).
DROP_BUDGET = 100
DROP_WINDOW = 60.0


@dataclass
class _Suppressed:
    """Folded drop events of one action not sent in a window: how many, their drops, first/last time."""

    events: int = 0
    drops: int = 0
    first: float = float("inf")
    last: float = float("-inf")


@dataclass
class _Window:
    """One workload's drop events in its current budget window."""

    start: float
    sent: int = 0
    summaries: int = 0  # summaries sent for this window (the first at once, the rest when it ends)
    pending: dict[str, _Suppressed] = field(default_factory=dict)  # action → not yet summarized


@dataclass
class Folded:
    """Drops of one batch with the same (direction, src, dst, proto, dport, rule, action): their
    summed ``count``, the first and last ``time``, the source port when they all had the same."""

    direction: str
    src: str
    dst: str
    proto: str
    sport: int | None
    dport: int | None
    rule_id: str | None
    action: str
    count: int
    first: float
    last: float


def fold_drops(drops: Iterable[Any]) -> list[Folded]:
    """A batch's drop events (``agentapi.DropEvent``) folded per (direction, src, dst, proto,
    dport, rule, action), in the order each group first appears."""
    out: dict[tuple[Any, ...], Folded] = {}
    for d in drops:
        key = (d.direction, d.src, d.dst, d.proto, d.dport, d.rule_id, d.action)
        f = out.get(key)
        if f is None:
            out[key] = Folded(d.direction, d.src, d.dst, d.proto, d.sport, d.dport, d.rule_id, d.action, d.count,
                              d.time, d.time)  # fmt: skip
            continue
        f.count += d.count
        f.first, f.last = min(f.first, d.time), max(f.last, d.time)
        if f.sport != d.sport:
            f.sport = None  # as the agent folds retries from several source ports
    return list(out.values())


class Siem:
    def __init__(
        self,
        sinks: list[tuple[str, Sink]],
        spec: str = "",
        drop_budget: int = DROP_BUDGET,
        drop_window: float = DROP_WINDOW,
        clock: Callable[[], float] = time.time,
    ) -> None:
        if drop_budget < 0 or drop_window <= 0:
            raise ValueError("the SIEM drop budget must be 0 (none) or more, its window positive")
        self.sinks = sinks
        self.spec = spec
        self.sent = 0
        self.failed = 0
        self.drop_budget = drop_budget
        self.drop_window = drop_window
        self.clock = clock
        # in memory, per process: serve's one process; on AWS each warm agent-API environment
        self._windows: dict[str, _Window] = {}
        self._lock = threading.Lock()
        self.suppressed = 0  # folded drop events not sent past the budget (summarized instead)

    @classmethod
    def from_spec(cls, spec: str, drop_budget: int = DROP_BUDGET, drop_window: float = DROP_WINDOW) -> Siem:
        return cls(parse(spec), spec, drop_budget, drop_window)

    def emit(self, events: Iterable[dict[str, Any]]) -> None:
        batch = list(events)
        if not batch:
            return
        for fmt, sink in self.sinks:
            lines = []
            for e in batch:  # one event that cannot be written costs itself, not the batch
                try:
                    lines.append(
                        (to_cef(e) if fmt == "cef" else json.dumps(e, separators=(",", ":"), sort_keys=True), e)
                    )
                except Exception:
                    self.failed += 1
                    log.exception("SIEM sink %s: an event not formatted, not delivered", type(sink).__name__)
            if not lines:
                continue
            try:
                sink.send(lines)
                self.sent += len(lines)
            except Exception:
                self.failed += len(lines)
                log.exception("SIEM sink %s: %d event(s) not delivered", type(sink).__name__, len(lines))

    def audit(self, rec: AuditRecord) -> None:
        self.emit([ocsf.api_activity(rec)])

    def drops(self, workload_id: str, drops: Iterable[Any]) -> int:
        """An agent's reported drop events (``agentapi.DropEvent``) as Network Activity, folded per
        (direction, src, dst, proto, dport, rule, action) with their count and first/last time,
        within the workload's budget (``drop_budget`` folded events per ``drop_window`` seconds);
        past it one summary per action says how many were suppressed, at once for the window's
        first overflow, for any later one when the window has ended (at the next report of any
        workload, or :meth:`close`). One that cannot be mapped is counted in :attr:`failed`
        (this never raises: the batch is stored). The folded events held back by the budget in
        this call (also added to :attr:`suppressed`): the caller counts them
        (``SiemDropEventsSuppressed``)."""
        groups = fold_drops(drops)
        now = self.clock()
        with self._lock:
            summaries = self._ended(now)
            w = self._windows.get(workload_id)
            if w is None or now >= w.start + self.drop_window:
                w = self._windows[workload_id] = _Window(now)
            room = len(groups) if self.drop_budget == 0 else max(0, self.drop_budget - w.sent)
            keep, over = groups[:room], groups[room:]
            w.sent += len(keep)
            for g in over:
                p = w.pending.setdefault(g.action, _Suppressed())
                p.events, p.drops = p.events + 1, p.drops + g.count
                p.first, p.last = min(p.first, g.first), max(p.last, g.last)
            self.suppressed += len(over)
            if over and w.summaries == 0:
                summaries += self._summaries(workload_id, w)
        events = []
        for g in keep:
            try:
                events.append(drop_activity(workload_id, g))
            except Exception:
                self.failed += len(self.sinks)
                log.exception("SIEM: a drop event of %s not mapped, not delivered", workload_id)
        self.emit(events + summaries)
        return len(over)

    def _ended(self, now: float) -> list[dict[str, Any]]:
        """The summaries of windows that ended with drops suppressed since their first summary
        (those windows are forgotten; the lock is held)."""
        out: list[dict[str, Any]] = []
        for wid, w in list(self._windows.items()):
            if now >= w.start + self.drop_window:
                out += self._summaries(wid, w)
                del self._windows[wid]
        return out

    def _summaries(self, workload_id: str, w: _Window) -> list[dict[str, Any]]:
        out = []
        for action, p in sorted(w.pending.items()):
            w.summaries += 1
            out.append(
                ocsf.drops_suppressed(
                    workload_id,
                    action=action,
                    events=p.events,
                    count=p.drops,
                    first=p.first,
                    last=p.last,
                    window_start=w.start,
                    window=self.drop_window,
                    budget=self.drop_budget,
                    seq=w.summaries,
                )
            )
        w.pending.clear()
        return out

    def finding(self, event: dict[str, Any]) -> None:
        self.emit([event])

    def close(self) -> None:
        with self._lock:  # what was suppressed after a window's first summary, said before closing
            due = [e for wid, w in self._windows.items() for e in self._summaries(wid, w)]
        self.emit(due)
        for _, sink in self.sinks:
            sink.close()


def drop_activity(workload_id: str, d: Any) -> dict[str, Any]:
    """One of an agent's drop events (``agentapi.DropEvent``), or a batch's drops folded into one
    (:class:`Folded`: its first and last time as ``start_time``/``end_time``), as OCSF Network Activity."""
    first, last = (d.first, d.last) if isinstance(d, Folded) else (d.time, None)
    return ocsf.network_activity(
        workload_id,
        time=first,
        direction=d.direction,
        src=d.src,
        dst=d.dst,
        proto=d.proto,
        sport=d.sport,
        dport=d.dport,
        rule_id=d.rule_id,
        action=d.action,
        count=d.count,
        end_time=last,
    )
