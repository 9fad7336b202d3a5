"""Flows aggregated for the store and the map: one row per (day, source group/role, destination
group/role, proto/port, decision) with first/last seen and counts.

An end is named by its full label set (``app=ordering,env=prod,loc=eu,role=web``: the app group
and the role), ``internet`` or ``unknown`` (:func:`ringfence.flows.classify.outside_name`).
Rows are bucketed by UTC day so that retention is a TTL on whole rows; :func:`merge` folds the
days back together for reading.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field

from pydantic import BaseModel, Field

from ringfence.engine.explain import Endpoint
from ringfence.flows.classify import Classifier, Outcome, outside_name
from ringfence.flows.records import Flow
from ringfence.flows.vpclogs import Record

log = logging.getLogger(__name__)

DEFAULT_RETENTION_DAYS = 30
MAX_REPORTERS = 8  # reporting workloads a row names at most (a row folds a whole label group's)
_SIDES = {"outbound": "src", "inbound": "dst"}  # an agent record's direction: the end it reported


class FlowRow(BaseModel):
    """One aggregate row (as the store keeps it)."""

    day: str = Field(description="UTC day of the flows' start, YYYY-MM-DD (the retention bucket)")
    src: str
    dst: str
    proto: str
    port: int | None = None
    decision: Outcome
    rule: str = Field("", description="the rule that decided (file:line), or why it is blocked/unknown")
    flows: int = 0
    packets: int = 0
    bytes: int = 0
    first_seen: float = 0.0
    last_seen: float = 0.0
    sample_src: str = Field("", description="one source address seen (for re-deciding under a draft)")
    sample_dst: str = ""
    origins: list[str] = Field(default_factory=list, description="agent, vpc")
    reported_by: list[str] = Field(
        default_factory=list,
        description="who saw these flows: src (the source's agent), dst (the destination's), vpc (flow logs); "
        "empty for a row stored before it was recorded",
    )
    reporters: list[str] = Field(
        default_factory=list, description=f"the agents' workloads that reported them (at most {MAX_REPORTERS} named)"
    )

    @property
    def key(self) -> str:
        return f"{self.src}|{self.dst}|{self.proto}/{self.port if self.port is not None else '*'}|{self.decision}"

    def add(self, other: FlowRow) -> None:
        self.flows += other.flows
        self.packets += other.packets
        self.bytes += other.bytes
        self.first_seen = min(self.first_seen, other.first_seen)
        self.last_seen = max(self.last_seen, other.last_seen)
        self.origins = sorted(set(self.origins) | set(other.origins))
        self.reported_by = sorted(set(self.reported_by) | set(other.reported_by))
        if len(self.reporters) < MAX_REPORTERS:  # the first named stay named (as DynamoDB keeps them)
            new = sorted(set(other.reporters) - set(self.reporters))
            self.reporters = sorted([*self.reporters, *new[: MAX_REPORTERS - len(self.reporters)]])
        self.rule = self.rule or other.rule


def end_name(ep: Endpoint) -> str:
    if ep.labels is None:
        return outside_name(ep.name)
    return group_name(ep.labels)


def group_name(labels: Mapping[str, str]) -> str:
    """A workload end's name in rows: its full label set."""
    return ",".join(f"{k}={v}" for k, v in sorted(labels.items())) or "(no labels)"


def day_of(t: float) -> str:
    return time.strftime("%Y-%m-%d", time.gmtime(t))


@dataclass(slots=True)
class _Acc:
    rule: str
    sample_src: str
    sample_dst: str
    flows: int = 0
    packets: int = 0
    bytes: int = 0
    first: float = float("inf")
    last: float = 0.0
    origins: set[str] = field(default_factory=set)
    sides: set[str] = field(default_factory=set)
    reporters: set[str] = field(default_factory=set)


@dataclass(slots=True)
class Aggregator:
    """Folds flows into rows; plain accumulators per key while folding (a pydantic row per flow
    would cost more than classifying it), rows built once at the end (:attr:`rows`)."""

    classifier: Classifier
    seen: int = 0
    failed: int = 0  # records that could not be resolved or classified: counted, never the batch's end
    max_rows: int | None = None  # distinct rows kept at most; flows of any further row are dropped
    overflow: int = 0  # flows dropped because they would have made a row past max_rows
    _acc: dict[tuple[str, str, str, str, int | None, Outcome], _Acc] = field(default_factory=dict)
    _names: dict[tuple[str, object], str] = field(default_factory=dict)

    def _failed(self, what: object) -> None:
        """A record the parser or the report model should have refused (a backstop: one record
        never loses the others of its object or batch)."""
        if not self.failed:
            log.exception("a flow record could not be classified, not counted: %r", what)
        self.failed += 1

    def trim(self, most: int) -> None:
        """Forget memos past ``most`` entries (:meth:`Classifier.trim`, and the end names, one per
        address for an end no workload holds)."""
        self.classifier.trim(most)
        if len(self._names) > most:
            self._names.clear()

    def _end(self, ep: Endpoint) -> str:
        # the classifier hands out one labels mapping per (workload, interval): its identity is
        # the interval's (held by the classifier as long as this aggregator lives)
        key = (ep.name, id(ep.labels) if ep.labels is not None else None)
        name = self._names.get(key)
        if name is None:
            name = self._names[key] = end_name(ep)
        return name

    def add(self, flows: Iterable[Flow]) -> None:
        c = self.classifier
        acc = self._acc
        days: dict[int, str] = {}
        for f in flows:
            try:
                s, d, why = c.classify(f.src, f.dst, f.proto, f.dport, f.start)
                day_n = int(f.start // 86400)
                day = days.get(day_n)
                if day is None:
                    day = days[day_n] = day_of(f.start)
                k = (day, self._end(s), self._end(d), f.proto, f.dport, why.outcome)
            except Exception:
                self._failed(f)
                continue
            a = acc.get(k)
            if a is None:
                if self.max_rows is not None and len(acc) >= self.max_rows:
                    self.overflow += 1
                    continue
                a = acc[k] = _Acc(why.rule, f.src, f.dst)
            a.flows += f.count
            a.packets += f.packets
            a.bytes += f.bytes
            if f.start < a.first:
                a.first = f.start
            if f.end > a.last:
                a.last = f.end
            a.origins.add(f.origin)
            if f.origin == "agent":
                side = _SIDES.get(f.direction)
                if side is not None:
                    a.sides.add(side)
                if f.reporter and len(a.reporters) < MAX_REPORTERS:
                    a.reporters.add(f.reporter)
            else:
                a.sides.add(f.origin)
            self.seen += 1

    def add_records(self, records: Iterable[Record], origin: str = "vpc") -> None:
        """:meth:`add` for parsed VPC records (:data:`~ringfence.flows.vpclogs.Record`). For
        addresses whose owner cannot change with time (one interval recorded, or none) the row a
        flow folds into is cached per (source, destination, proto, port, day): one look-up per
        line, no resolution and no classifier call. An address with several intervals goes
        through :meth:`Classifier.classify` with the flow's time on every line, as in :meth:`add`."""
        c = self.classifier
        history = c.book.history
        acc = self._acc
        days: dict[int, str] = {}
        direct: dict[tuple[str, str, str, int | None, int], _Acc] = {}
        moved: dict[str, bool] = {}
        seen = 0
        for rec in records:
            start, end, src, dst, proto, dport, packets, nbytes, _, _ = rec
            try:
                day_n = int(start // 86400)
            except (ValueError, OverflowError):
                self._failed(rec)
                continue
            k5 = (src, dst, proto, dport, day_n)
            a = direct.get(k5)
            if a is None:
                try:
                    s, d, why = c.classify(src, dst, proto, dport, start)
                    day = days.get(day_n)
                    if day is None:
                        day = days[day_n] = day_of(start)
                    k = (day, self._end(s), self._end(d), proto, dport, why.outcome)
                except Exception:
                    self._failed(rec)
                    continue
                a = acc.get(k)
                if a is None:
                    if self.max_rows is not None and len(acc) >= self.max_rows:
                        self.overflow += 1
                        continue
                    a = acc[k] = _Acc(why.rule, src, dst)
                a.origins.add(origin)
                a.sides.add(origin)  # flow logs: what the network saw, no end's word
                ms = moved.get(src)
                if ms is None:
                    ms = moved[src] = len(history.get(src) or ()) > 1
                md = moved.get(dst)
                if md is None:
                    md = moved[dst] = len(history.get(dst) or ()) > 1
                if not ms and not md:
                    direct[k5] = a
            a.flows += 1
            a.packets += packets
            a.bytes += nbytes
            if start < a.first:
                a.first = start
            if end > a.last:
                a.last = end
            seen += 1
        self.seen += seen

    @property
    def rows(self) -> dict[tuple[str, str], FlowRow]:
        out = {}
        for (day, src, dst, proto, port, outcome), a in self._acc.items():
            row = FlowRow(
                day=day, src=src, dst=dst, proto=proto, port=port, decision=outcome,
                rule=a.rule, flows=a.flows, packets=a.packets, bytes=a.bytes, first_seen=a.first, last_seen=a.last,
                sample_src=a.sample_src, sample_dst=a.sample_dst, origins=sorted(a.origins),
                reported_by=sorted(a.sides), reporters=sorted(a.reporters),
            )  # fmt: skip
            out[(day, row.key)] = row
        return out


def merge(rows: Iterable[FlowRow]) -> list[FlowRow]:
    """The rows of all days folded per key (``day``: the latest)."""
    out: dict[str, FlowRow] = {}
    for r in rows:
        have = out.get(r.key)
        if have is None:
            out[r.key] = r.model_copy()  # shallow: add() assigns new lists, never changes the row's
        else:
            have.add(r)
            have.day = max(have.day, r.day)
    return sorted(out.values(), key=lambda r: r.key)
