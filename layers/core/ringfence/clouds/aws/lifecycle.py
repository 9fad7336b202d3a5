"""Lifecycle hooks: an instance is segmented (bundle and perimeter) before it serves and leaves peers' sets
before it goes."""

from __future__ import annotations

from typing import Any

from ringfence.control.wiring import Metric, no_metric
from ringfence.events import DomainEvent, Kind, MalformedEvent, normalize, normalize_json

from .ingest import Ingest, mark_leaving, observe_instances
from .wiring import Wiring

# --- lifecycle --------------------------------------------------------------------------------------


class Lifecycle:
    """ASG lifecycle actions: update the inventory now, let compute publish, then complete."""

    def __init__(self, w: Wiring, metric: Metric = no_metric) -> None:
        self.w = w
        self.metric = metric

    def prefetch(self, bodies: list[str]) -> int:
        """Describe every instance a batch's actions name at once (:meth:`Ingest.prefetch_events`);
        malformed bodies are left to :meth:`apply`. Call :meth:`done` after the batch."""
        events = []
        for body in bodies:
            try:
                ev = normalize_json(body)
            except MalformedEvent:
                continue
            if ev is not None and ev.lifecycle is not None:
                events.append(ev)
        return Ingest(self.w).prefetch_events(events)

    def done(self) -> None:
        self.w.end_batch()

    def handle(self, raw: dict[str, Any]) -> dict[str, Any]:
        return self.apply(normalize(raw))

    def apply(self, ev: DomainEvent | None) -> dict[str, Any]:
        """A normalized lifecycle action (:func:`ringfence.events.normalize_json`): inventory now,
        then compute publishes and completes it."""
        if ev is None or ev.lifecycle is None:
            what = "an event that is not ours" if ev is None else f"{ev.kind.value} event {ev.event_id}"
            raise MalformedEvent(f"not a lifecycle action event: {what}")
        ids = list(ev.instance_ids)
        changed = observe_instances(self.w, ev.account, ev.region, ids)
        if ev.kind is Kind.LIFECYCLE_TERMINATE:
            leaving, refused = mark_leaving(
                self.w,
                ev.account,
                ev.region,
                ids,
                group=ev.lifecycle.group_name,
                event_id=ev.event_id,
                metric=self.metric,
            )
            changed |= leaving
            if refused:
                # not Auto Scaling's action (or not this group's): nothing to complete either
                self.w.enqueue_compute(sorted(changed))
                return {
                    "instance": ev.lifecycle.instance_id,
                    "transition": ev.lifecycle.transition,
                    "refused": refused,
                }
        lc = ev.lifecycle.model_dump()
        lc["hook_name"], lc["group_name"] = ev.lifecycle.hook_name, ev.lifecycle.group_name
        lc["region"] = ev.region
        if ev.kind is Kind.LIFECYCLE_LAUNCH and self.w.enqueue_perimeter(ids, lifecycle=lc):
            # the perimeter hands the action on to compute once the instance's ENIs carry their
            # groups; compute publishes meanwhile and completes it (FIFO: after these ids)
            self.w.enqueue_compute(sorted(changed) or ids)
        else:
            self.w.enqueue_compute(sorted(changed) or ids, lifecycle=lc)
        self.metric("LifecycleActions", 1)
        self.metric("InventoryChanges", len(changed))
        return {"instance": ev.lifecycle.instance_id, "transition": ev.lifecycle.transition}
