"""Lifecycle hooks: an instance is segmented (bundle and perimeter) before it serves and leaves peers' sets
before it goes."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from ringfence.control.wiring import COMPUTE_NOT_QUEUED, Metric, hand_on_stored, log, no_metric, owe_compute
from ringfence.events import DomainEvent, Kind, MalformedEvent, normalize, normalize_json

from .ingest import Ingest, mark_leaving, observe_instances
from .wiring import Wiring

# --- lifecycle --------------------------------------------------------------------------------------

# The calls each of a lifecycle batch's reads may make (ingest's make 3): a failed action comes back
# only after the lifecycle queue's 360 s visibility timeout, past the hooks' heartbeat timeouts
# (120 s launch → ABANDON, 60 s terminate → CONTINUE), so a failed read costs its actions
# outright. Five calls ride out a throttle of a few seconds (backoff up to 1 + 2 + 4 + 8 s); the
# batch's deadline still ends the retries in time for done(), and a place throttled past them
# (its administrator's doing) holds another account's actions of the batch up by 15 s at most.
LIFECYCLE_READ_ATTEMPTS = 5


@dataclass(slots=True)
class _Batch:
    compute_ids: dict[str, None] = field(default_factory=dict)
    compute_actions: list[dict[str, Any]] = field(default_factory=list)
    perimeter_ids: dict[str, None] = field(default_factory=dict)
    perimeter_actions: list[dict[str, Any]] = field(default_factory=list)
    # the workloads that gave their addresses up and their actions: compute's priority lane
    urgent_ids: dict[str, None] = field(default_factory=dict)
    urgent_actions: list[dict[str, Any]] = field(default_factory=list)
    # (account, region, instance) → whether the batch's observation changed its inventory record
    observed: dict[tuple[str, str, str], bool] = field(default_factory=dict)
    # those whose change gave their addresses up (:func:`releases_addresses`)
    removed: set[tuple[str, str, str]] = field(default_factory=set)


class Lifecycle:
    """ASG lifecycle actions: update the inventory now, let compute publish, then complete."""

    def __init__(self, w: Wiring, metric: Metric = no_metric) -> None:
        self.w = w
        self.metric = metric
        # a batch's hand-offs, sent once when it ends (None: no batch open, each action sends its
        # own): to compute, the instances and the actions compute completes; to the perimeter,
        # the launching instances and their actions (one message, not one per action)
        self._batch: _Batch | None = None

    def prefetch(self, bodies: list[str], time_left: Callable[[], float] | None = None) -> int:
        """Describe every instance a batch's actions name at once (:meth:`Ingest.prefetch_events`,
        ``time_left``: the seconds the invocation has left); malformed bodies are left to
        :meth:`apply`. Call :meth:`done` after the batch."""
        events = []
        for body in bodies:
            try:
                ev = normalize_json(body)
            except MalformedEvent:
                continue
            if ev is not None and ev.lifecycle is not None and self._ours(ev.lifecycle.hook_name):
                events.append(ev)
        n = Ingest(self.w).prefetch_events(events, time_left, LIFECYCLE_READ_ATTEMPTS)
        self._batch = _Batch()
        # and record them in the inventory together: one read of the stored records for the batch
        # instead of one per action (each action's own observation finds nothing new after this)
        places: dict[tuple[str, str], dict[str, None]] = {}
        for ev in events:
            places.setdefault((ev.account, ev.region), {}).update(dict.fromkeys(ev.instance_ids))
        for (account, region), ids in sorted(places.items()):
            removed: set[str] = set()
            try:
                changed = observe_instances(self.w, account, region, list(ids), removed=removed)
            except Exception as exc:  # best effort, as the describe: each action observes for itself
                log.warning(
                    "lifecycle batch observation in %s/%s failed (%s): observing per action", account, region, exc
                )
                continue
            self._batch.observed.update({(account, region, i): i in changed for i in ids})
            self._batch.removed.update((account, region, i) for i in removed)
        return n

    def done(self) -> None:
        """The batch is over: its launches go to the perimeter in one message, then its instances
        and actions to compute in one, those that gave their addresses up (and their terminate
        actions) first in one of the priority lane (a failure here fails the batch, whose actions
        are then applied again and handed on again; it is logged and counted, ``ComputeNotQueued``,
        as every hand-off's)."""
        batch, self._batch = self._batch, None
        try:
            if batch is not None:
                if batch.perimeter_ids:
                    self.w.enqueue_perimeter(list(batch.perimeter_ids), lifecycles=batch.perimeter_actions)
                if batch.urgent_ids or batch.urgent_actions:
                    self.w.enqueue_compute(list(batch.urgent_ids), lifecycles=batch.urgent_actions, urgent=True)
                normal = [i for i in batch.compute_ids if i not in batch.urgent_ids]
                if normal or batch.compute_actions:
                    self.w.enqueue_compute(normal, lifecycles=batch.compute_actions)
        except Exception:
            ids = sorted({*batch.perimeter_ids, *batch.urgent_ids, *batch.compute_ids}) if batch is not None else []
            log.exception("lifecycle batch: %s stored but compute or the perimeter could not be queued", ", ".join(ids))
            self.metric(COMPUTE_NOT_QUEUED, 1)
            if batch is not None:  # the instances (not their actions) owed, as ingest's
                owe_compute(self.w, ids, "lifecycle batch", self.metric, urgent=batch.urgent_ids)
            raise
        finally:
            self.w.end_batch()

    def _to_compute(self, ids: list[str], lifecycle: dict[str, Any] | None = None, *, urgent: bool = False) -> None:
        """``urgent``: ``ids`` gave their addresses up (a terminating instance): the priority lane,
        so its address does not stay allowed behind a tag storm's backlog; at most one per
        instance state change, whoever sends the actions."""
        if self._batch is None:
            self.w.enqueue_compute(ids, lifecycle=lifecycle, urgent=urgent)
            return
        (self._batch.urgent_ids if urgent else self._batch.compute_ids).update(dict.fromkeys(ids))
        if lifecycle is not None:
            (self._batch.urgent_actions if urgent else self._batch.compute_actions).append(lifecycle)

    def _hand_on(self, changed: set[str], removed: set[str], what: str) -> None:
        """Compute for what an action that then failed stored (``removed``: those of them that
        gave their addresses up): with the batch's when it ends (done() runs whatever the
        actions did), else now, a failure to queue logged and counted, never raised over the
        action's own (:func:`hand_on_stored`)."""
        if not changed:
            return
        if self._batch is None:
            hand_on_stored(self.w, changed, what, self.metric, urgent=removed & changed)
            return
        self._to_compute(sorted(changed - removed))
        self._to_compute(sorted(changed & removed), urgent=True)

    def _observe(self, account: str, region: str, ids: list[str]) -> tuple[set[str], set[str]]:
        """:func:`observe_instances`, or what the batch's observation of these instances found:
        the ids that changed, and those of them that gave their addresses up."""
        batch = self._batch
        if batch is not None and ids and all((account, region, i) in batch.observed for i in ids):
            return (
                {i for i in ids if batch.observed[(account, region, i)]},
                {i for i in ids if (account, region, i) in batch.removed},
            )
        removed: set[str] = set()
        return observe_instances(self.w, account, region, ids, removed=removed), removed

    def _to_perimeter(self, ids: list[str], lifecycle: dict[str, Any]) -> bool:
        """Hand a launch to the perimeter (which hands it on to compute); False if there is none."""
        if self._batch is None:
            return self.w.enqueue_perimeter(ids, lifecycle=lifecycle)
        if not self.w.has_perimeter:
            return False
        self._batch.perimeter_ids.update(dict.fromkeys(ids))
        self._batch.perimeter_actions.append(lifecycle)
        return True

    def _ours(self, hook_name: str) -> bool:
        names = self.w.cfg.lifecycle_hook_names
        # no names at all (refused by both deployments): observed and handed on as ever, only
        # completion stops — compute completes none and counts each (LifecycleLeftToTimeout)
        return not names or hook_name in names

    def handle(self, raw: dict[str, Any]) -> dict[str, Any]:
        return self.apply(normalize(raw))

    def apply(self, ev: DomainEvent | None) -> dict[str, Any]:
        """A normalized lifecycle action (:func:`ringfence.events.normalize_json`): inventory now,
        then compute publishes and completes it."""
        if ev is None or ev.lifecycle is None:
            what = "an event that is not ours" if ev is None else f"{ev.kind.value} event {ev.event_id}"
            raise MalformedEvent(f"not a lifecycle action event: {what}")
        if not self._ours(ev.lifecycle.hook_name):
            # another hook's action on a gated group (an older rule, a redrive): its owner completes
            # it, not Ringfence; nothing is observed, held or handed on
            log.warning(
                "lifecycle %s for %s: hook %s of %s is not Ringfence's (RINGFENCE_LIFECYCLE_HOOK_NAMES); ignored",
                ev.lifecycle.transition,
                ev.lifecycle.instance_id,
                ev.lifecycle.hook_name,
                ev.lifecycle.group_name,
            )
            self.metric("LifecycleActionsNotOurs", 1)
            return {
                "instance": ev.lifecycle.instance_id,
                "transition": ev.lifecycle.transition,
                "not_ours": ev.lifecycle.hook_name,
            }
        ids = list(ev.instance_ids)
        changed, removed = self._observe(ev.account, ev.region, ids)
        if ev.kind is Kind.LIFECYCLE_TERMINATE:
            try:
                leaving, refused = mark_leaving(
                    self.w,
                    ev.account,
                    ev.region,
                    ids,
                    group=ev.lifecycle.group_name,
                    event_id=ev.event_id,
                    metric=self.metric,
                )
            except BaseException:
                # the observation is stored: the redelivered action finds nothing more to store
                # and would not hand it on (refused, it hands on nothing else)
                self._hand_on(changed, removed, f"lifecycle action {ev.event_id}")
                raise
            changed |= leaving
            removed |= leaving
            if refused:
                # not Auto Scaling's action (or not this group's): nothing to complete either
                self._to_compute(sorted(changed - removed))
                self._to_compute(sorted(removed), urgent=True)
                return {
                    "instance": ev.lifecycle.instance_id,
                    "transition": ev.lifecycle.transition,
                    "refused": refused,
                }
        lc = ev.lifecycle.model_dump()
        lc["hook_name"], lc["group_name"] = ev.lifecycle.hook_name, ev.lifecycle.group_name
        # where compute completes it: the instance's own account and Region
        lc["account"], lc["region"] = ev.account, ev.region
        if ev.kind is Kind.LIFECYCLE_LAUNCH and self._to_perimeter(ids, lc):
            # the perimeter hands the action on to compute once the instance's ENIs carry their
            # groups; compute publishes meanwhile and completes it
            self._to_compute(sorted(changed) or ids)
        elif removed:
            # a removal (the terminate action that took the instance out, or an observation of it
            # gone) and its action in the priority lane: compute drops its address, then completes
            self._to_compute(sorted(changed - removed))
            self._to_compute(sorted(removed), lc, urgent=True)
        else:
            self._to_compute(sorted(changed) or ids, lc)
        self.metric("LifecycleActions", 1)
        self.metric("InventoryChanges", len(changed))
        return {"instance": ev.lifecycle.instance_id, "transition": ev.lifecycle.transition}
