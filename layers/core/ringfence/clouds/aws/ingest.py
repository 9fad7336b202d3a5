"""Ingest: cloud events → normalized domain events → inventory (idempotent, newest wins)."""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import Any

from ringfence.events import DomainEvent, Kind, MalformedEvent, normalize

from . import credentials, ec2
from .wiring import BaseWiring, Metric, log, no_metric

# --- ingest ---------------------------------------------------------------------------------------


@dataclass
class IngestResult:
    event_id: str
    kind: str = "ignored"
    changed: list[str] = field(default_factory=list)
    stale: list[str] = field(default_factory=list)


class Ingest:
    def __init__(self, w: BaseWiring, metric: Metric = no_metric) -> None:
        self.w = w
        self.metric = metric

    def prefetch(self, raws: list[dict[str, Any]]) -> int:
        """:meth:`prefetch_events` of raw events (malformed ones are left to :meth:`handle`)."""
        events = []
        for raw in raws:
            try:
                ev = normalize(raw)
            except MalformedEvent:
                continue
            if ev is not None:
                events.append(ev)
        return self.prefetch_events(events)

    def prefetch_events(self, events: Iterable[DomainEvent]) -> int:
        """Describe every instance a batch of events names with one call per account/region
        (DescribeInstances is rate-limited: a storm must not cost one call per event).
        Best effort: whatever fails here is described again per event. Returns ids described."""
        self.w.prefetched.clear()
        groups: dict[tuple[str, str], set[str]] = {}
        for ev in events:
            groups.setdefault((ev.account, ev.region), set()).update(ev.instance_ids)
        n = 0
        for (account, region), ids in sorted(groups.items()):
            try:
                live = ec2.describe(self.w.ec2_for(account, region), sorted(ids))
            except Exception as exc:
                log.warning("prefetch describe for %s/%s failed (%s): describing per event", account, region, exc)
                continue
            t = ec2.now()
            for i in ids:
                self.w.prefetched[(account, region, i)] = (t, live.get(i))
            n += len(ids)
        return n

    def done(self) -> None:
        self.w.prefetched.clear()

    def handle(self, raw: dict[str, Any]) -> IngestResult:
        ev = normalize(raw)  # MalformedEvent propagates: the handler sends it to the DLQ
        if ev is None:
            self.ignored()
            return IngestResult(str(raw.get("id", "")))
        return self.apply(ev)

    def ignored(self) -> None:
        """A valid event that is not about instances (a tag on a volume, a failed API call)."""
        self.metric("EventsIgnored", 1)

    def apply(self, ev: DomainEvent) -> IngestResult:
        res = IngestResult(ev.event_id, kind=ev.kind.value)
        ids = list(ev.instance_ids)
        if ev.tag_version is not None:
            fresh = []
            for iid in ids:
                rec = self.w.store.get(iid)
                if rec is not None and rec.tag_version is not None and ev.tag_version < rec.tag_version:
                    log.info(
                        "stale tag event %s for %s: version %s < %s", ev.event_id, iid, ev.tag_version, rec.tag_version
                    )
                    res.stale.append(iid)
                    self.metric("StaleEvents", 1)
                else:
                    fresh.append(iid)
            ids = fresh
        if not ids:
            return res
        changed = observe_instances(self.w, ev.account, ev.region, ids, tag_version=ev.tag_version)
        if ev.kind is Kind.LIFECYCLE_TERMINATE:
            changed |= mark_leaving(self.w, ev.account, ev.region, ids)
        res.changed = sorted(changed)
        if changed:
            self.w.enqueue_compute(res.changed)
            self.w.enqueue_perimeter(res.changed)
        self.metric("InventoryChanges", len(changed))
        return res


def observe_instances(
    w: BaseWiring, account: str, region: str, ids: list[str], *, tag_version: int | None = None
) -> set[str]:
    """Describe the live instances and store what they are now; returns the ids that changed.
    Instances the batch prefetched (:meth:`Ingest.prefetch`) are not described again."""
    seen = {i: w.prefetched[(account, region, i)] for i in ids if (account, region, i) in w.prefetched}
    missing = [i for i in ids if i not in seen]
    if missing:
        live = ec2.describe(w.ec2_for(account, region), missing)
        t0 = ec2.now()
        seen.update({i: (t0, live.get(i)) for i in missing})
    mapper = w.mapper()
    changed: set[str] = set()
    for iid in ids:
        t, inst = seen[iid]
        rec = ec2.to_record(inst, account, region, t, mapper) if inst else ec2.tombstone(iid, account, region, t)
        if tag_version is not None:
            rec.tag_version = tag_version
        if w.store.observe(rec):
            changed.add(iid)
            if rec.state == "terminated":
                credentials.retire(w, iid, "instance terminated")
    return changed


def mark_leaving(w: BaseWiring, account: str, region: str, ids: list[str]) -> set[str]:
    """A terminate lifecycle action: the instance is still running but must leave peers' sets."""
    changed = set()
    t = ec2.now() + 0.001  # after the describe that just ran
    for iid in ids:
        old = w.store.get(iid)
        if old is None or old.state == "terminating":
            continue
        rec = old.model_copy(update={"state": "terminating", "observed_at": t})
        if w.store.observe(rec):
            changed.add(iid)
    return changed
