"""Flows aggregated for the store and the map: one row per (day, source group/role, destination
group/role, proto/port, decision) with first/last seen and counts.

An end is named by its full label set (``app=ordering,env=prod,loc=eu,role=web``: the app group
and the role), ``internet`` or ``unknown`` (:func:`ringfence.flows.classify.outside_name`).
Rows are bucketed by UTC day so that retention is a TTL on whole rows; :func:`merge` folds the
days back together for reading.
"""

from __future__ import annotations

import time
from collections.abc import Iterable
from dataclasses import dataclass, field

from pydantic import BaseModel, Field

from ringfence.engine.explain import Endpoint
from ringfence.flows.classify import Classifier, Outcome, outside_name
from ringfence.flows.records import Flow

DEFAULT_RETENTION_DAYS = 30


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
        self.rule = self.rule or other.rule


def end_name(ep: Endpoint) -> str:
    if ep.labels is None:
        return outside_name(ep.name)
    return ",".join(f"{k}={v}" for k, v in sorted(ep.labels.items())) or "(no labels)"


def day_of(t: float) -> str:
    return time.strftime("%Y-%m-%d", time.gmtime(t))


@dataclass(slots=True)
class Aggregator:
    classifier: Classifier
    rows: dict[tuple[str, str], FlowRow] = field(default_factory=dict)
    seen: int = 0

    def add(self, flows: Iterable[Flow]) -> None:
        c = self.classifier
        for f in flows:
            s, d, why = c.classify(f.src, f.dst, f.proto, f.dport, f.start)
            row = FlowRow(
                day=day_of(f.start),
                src=end_name(s),
                dst=end_name(d),
                proto=f.proto,
                port=f.dport,
                decision=why.outcome,
                rule=why.rule,
                flows=f.count,
                packets=f.packets,
                bytes=f.bytes,
                first_seen=f.start,
                last_seen=f.end,
                sample_src=f.src,
                sample_dst=f.dst,
                origins=[f.origin],
            )
            k = (row.day, row.key)
            have = self.rows.get(k)
            if have is None:
                self.rows[k] = row
            else:
                have.add(row)
            self.seen += 1


def merge(rows: Iterable[FlowRow]) -> list[FlowRow]:
    """The rows of all days folded per key (``day``: the latest)."""
    out: dict[str, FlowRow] = {}
    for r in rows:
        have = out.get(r.key)
        if have is None:
            out[r.key] = r.model_copy(deep=True)
        else:
            have.add(r)
            have.day = max(have.day, r.day)
    return sorted(out.values(), key=lambda r: r.key)
