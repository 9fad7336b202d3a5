"""Ingest: cloud events → normalized domain events → inventory (idempotent, newest wins)."""

from __future__ import annotations

from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any, TypeVar

from botocore.exceptions import BotoCoreError, ClientError

from ringfence.audit import AuditRecord
from ringfence.control import credentials
from ringfence.control.governance import rewrite_governed, store_governed
from ringfence.control.wiring import (
    COMPUTE_NOT_QUEUED,
    BaseWiring,
    BatchDeadline,
    Metric,
    hand_on_stored,
    log,
    no_metric,
    owe_compute,
)
from ringfence.events import DomainEvent, Kind, MalformedEvent, normalize
from ringfence.governance import TagChange
from ringfence.store.base import ACTIVE_STATES, InventoryRecord, concerns_compute, releases_addresses

from . import clients, ec2

# --- ingest ---------------------------------------------------------------------------------------


class PlaceUnavailable(Exception):
    """EC2 (or Auto Scaling) in an account and Region failed the batch in a way asking again
    within it would not fix: throttled (whoever administers that account can throttle it at
    will: the limit is per account and Region, our assumed role's calls included), the role
    refused, the endpoint unreachable. The batch's events there fail at once, for their queue
    to retry, never holding up the other accounts' events of the batch."""

    def __init__(self, account: str, region: str, why: str) -> None:
        super().__init__(f"{account}/{region} unavailable in this batch: {why}")
        self.account, self.region, self.why = account, region, why


def unavailable_because(exc: BaseException) -> str | None:
    """Why ``exc`` makes its account and Region unavailable for the batch, or None: an error of
    the request itself (an instance id EC2 does not take), which other events' own ids do not
    share, is left to the per-event describes."""
    if isinstance(exc, ClientError):
        code = str(exc.response.get("Error", {}).get("Code", ""))
        if code.startswith(("InvalidInstanceID.", "InvalidParameter")):
            return None
        return code or str(exc)
    if isinstance(exc, BotoCoreError):  # unreachable, timed out, no credentials
        return type(exc).__name__
    return None


_T = TypeVar("_T")


def read_in(w: BaseWiring, account: str, region: str, read: Callable[[], _T], metric: Metric = no_metric) -> _T:
    """``read`` (a call to ``account``/``region``) inside a batch's limits: refused at once when
    the place already failed the batch (:class:`PlaceUnavailable`) or its time is up
    (:class:`BatchDeadline`); its calls retry as the batch allows (:meth:`BaseWiring.begin_batch`'s
    ``read_attempts``), never backing off into the batch's reserve; a failure that makes the place
    unavailable marks it so."""
    why = w.unavailable.get((account, region))
    if why is not None:
        raise PlaceUnavailable(account, region, why)
    w.check_deadline()
    try:
        with clients.retry_window(w.read_attempts or clients.BATCH_READ_ATTEMPTS, w.seconds_to_deadline):
            return read()
    except (ClientError, BotoCoreError) as exc:
        why = unavailable_because(exc)
        if why is None or not w.in_batch():
            raise
        w.unavailable[(account, region)] = why
        log.warning(
            "%s/%s unavailable for the rest of this batch (%s): its events fail, to be retried", account, region, exc
        )
        metric("PlacesUnavailable", 1)
        raise PlaceUnavailable(account, region, why) from exc


@dataclass
class IngestResult:
    event_id: str
    kind: str = "ignored"
    changed: list[str] = field(default_factory=list)
    stale: list[str] = field(default_factory=list)
    # of ``changed``, those that gave their addresses up (kept with the result: a replay's too)
    removed: list[str] = field(default_factory=list)


class Ingest:
    def __init__(self, w: BaseWiring, metric: Metric = no_metric) -> None:
        self.w = w
        self.metric = metric
        # a batch's changed workloads, handed on once when it ends (None: no batch open, each
        # event hands its own on): a 50-instance scale-out's ~150 events were ~150 compute and
        # ~150 perimeter messages, and the perimeter ran one small batch after another
        self._changed: dict[str, None] | None = None
        # of those, the workloads that gave their addresses up (:func:`releases_addresses`): computed in
        # the priority lane, so a terminated address does not stay allowed behind a tag storm
        self._removed: set[str] = set()

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

    def prefetch_events(
        self,
        events: Iterable[DomainEvent],
        time_left: Callable[[], float] | None = None,
        read_attempts: int | None = None,
    ) -> int:
        """Describe every instance a batch of events names with one call per account/region
        (DescribeInstances is rate-limited: a storm must not cost one call per event).
        Best effort: an id EC2 refuses is described again per event; a place that is throttled,
        refuses us or cannot be reached is unavailable for the batch (:class:`PlaceUnavailable`:
        its events fail at once). Returns ids described. Opens the batch
        (:meth:`BaseWiring.begin_batch`, ``time_left``: the seconds the invocation has left,
        ``read_attempts``: the calls each read may make, by default :data:`clients.BATCH_READ_ATTEMPTS`);
        :meth:`done` closes it and hands the workloads its events changed to compute and the
        perimeter, once."""
        self.w.begin_batch(time_left, read_attempts)
        self._changed = {}
        self._removed = set()
        groups: dict[tuple[str, str], set[str]] = {}
        for ev in events:
            groups.setdefault((ev.account, ev.region), set()).update(ev.instance_ids)
        n = 0
        for (account, region), ids in sorted(groups.items()):
            try:
                live = describe_in(self.w, account, region, sorted(ids), self.metric)
            except (PlaceUnavailable, BatchDeadline) as exc:
                log.warning("prefetch describe for %s/%s: %s", account, region, exc)
                continue
            except Exception as exc:
                log.warning("prefetch describe for %s/%s failed (%s): describing per event", account, region, exc)
                continue
            t = ec2.now()
            for i in ids:
                self.w.prefetched[(account, region, i)] = (t, live.get(i))
            n += len(ids)
        return n

    def done(self) -> None:
        """The batch is over: what its events changed to compute and the perimeter, once. A
        failure to queue it is logged and counted (``ComputeNotQueued``), as every hand-off's,
        and raised: it fails the invocation, whose whole batch is delivered again and handed on
        again (replays included: :meth:`hand_on`)."""
        changed, self._changed = self._changed, None
        removed, self._removed = self._removed, set()
        try:
            if changed:
                self._hand_on(list(changed), removed)
        except Exception:
            log.exception(
                "ingest batch: %s stored but compute or the perimeter could not be queued",
                ", ".join(sorted(changed or ())),
            )
            self.metric(COMPUTE_NOT_QUEUED, 1)
            # the batch's redelivery hands it on again; marked as well, for a queue refusing
            # longer than the redeliveries last (the scheduled passes hand marks on)
            owe_compute(self.w, changed or (), "ingest batch", self.metric, urgent=removed)
            raise
        finally:
            self.w.end_batch()

    def hand_on(self, ids: Iterable[str], removed: Iterable[str] = ()) -> None:
        """Compute and the perimeter are to look at these workloads (``removed``: those of them that
        gave their addresses up, computed in the priority lane): when the batch ends, or now
        outside one. The handler hands on a replayed event's changes too (its result kept by
        idempotency), so a batch whose hand-off failed after its events were recorded as done
        still reaches compute when it is retried."""
        if self._changed is not None:
            self._changed.update(dict.fromkeys(ids))
            self._removed.update(removed)
        else:
            self._hand_on(list(ids), set(removed))

    def _hand_on(self, ids: list[str], removed: set[str]) -> None:
        urgent = [i for i in ids if i in removed]
        if urgent:
            # removals first, in the priority lane: they only shrink access, and a developer causes
            # at most one per instance state change (docs/threat-model.md)
            self.w.enqueue_compute(urgent, urgent=True)
        self.w.enqueue_compute([i for i in ids if i not in removed])
        self.w.enqueue_perimeter(ids)

    def handle(self, raw: dict[str, Any]) -> IngestResult:
        ev = normalize(raw)  # MalformedEvent propagates: the handler sends it to the DLQ
        if ev is None:
            self.ignored()
            return IngestResult(str(raw.get("id", "")))
        return self.apply(ev)

    def admit(self, ev: DomainEvent) -> None:
        """Raise if ``ev`` is not to be applied in this batch, before anything is done for it: its
        account and Region failed the batch (:class:`PlaceUnavailable`), or the batch's time is up
        (:class:`BatchDeadline`). Either way it fails alone, and its queue retries it."""
        try:
            why = self.w.unavailable.get((ev.account, ev.region))
            if why is not None:
                raise PlaceUnavailable(ev.account, ev.region, why)
            self.w.check_deadline()
        except (PlaceUnavailable, BatchDeadline) as exc:
            log.warning("event %s not applied in this batch, left to the queue's retry: %s", ev.event_id, exc)
            self.metric("EventsDeferred", 1)
            raise

    def ignored(self) -> None:
        """A valid event that is not about instances (a tag on a volume, a failed API call)."""
        self.metric("EventsIgnored", 1)

    def apply(self, ev: DomainEvent) -> IngestResult:
        res = IngestResult(ev.event_id, kind=ev.kind.value)
        ids = list(ev.instance_ids)
        if ev.tag_version is not None:
            for iid in ids:
                rec = self.w.store.get(iid)
                if rec is not None and rec.tag_version is not None and ev.tag_version < rec.tag_version:
                    # a hint only, never a reason to skip: whoever can put a message on the queue
                    # could claim a huge version and lock out every real change; the live
                    # instance is described anyway and the newest observation wins
                    log.info(
                        "tag event %s for %s: version %s < %s; described anyway",
                        ev.event_id,
                        iid,
                        ev.tag_version,
                        rec.tag_version,
                    )
                    res.stale.append(iid)
                    self.metric("StaleEvents", 1)
        if not ids:
            return res
        # the call's own time: a late or redriven event is placed among the writes it came between
        change = TagChange(ev.principal, ev.tag_request, ev.observed_at if ev.principal is not None else None)
        removed: set[str] = set()
        changed = observe_instances(
            self.w,
            ev.account,
            ev.region,
            ids,
            tag_version=ev.tag_version,
            tags=ev.tags,
            change=change,
            event_id=ev.event_id,
            metric=self.metric,
            removed=removed,
        )
        if ev.kind is Kind.LIFECYCLE_TERMINATE:
            group = ev.lifecycle.group_name if ev.lifecycle else None
            try:
                leaving, _ = mark_leaving(
                    self.w, ev.account, ev.region, ids, group=group, event_id=ev.event_id, metric=self.metric
                )
            except BaseException:
                # the observation is stored: its redelivery finds nothing more to store and would
                # not hand it on (in a batch, done() hands it on with the batch's)
                if changed:
                    self.hand_on(sorted(changed), sorted(removed & changed))
                raise
            changed |= leaving
            removed |= leaving
        res.changed = sorted(changed)
        res.removed = sorted(removed & changed)
        if changed:
            self.hand_on(res.changed, res.removed)
        self.metric("InventoryChanges", len(changed))
        return res


def observe_instances(
    w: BaseWiring,
    account: str,
    region: str,
    ids: list[str],
    *,
    tag_version: int | None = None,
    tags: dict[str, str] | None = None,
    change: TagChange | None = None,
    event_id: str = "",
    metric: Metric = no_metric,
    described: Mapping[str, dict[str, Any]] | None = None,
    removed: set[str] | None = None,
) -> set[str]:
    """Describe the live instances and store what they are now; returns the ids that changed
    (``removed``, when given, gets those of them that gave their addresses up: :func:`releases_addresses`).
    Instances the batch prefetched (:meth:`Ingest.prefetch`), or the caller has just described
    (``described``: DescribeInstances items by id), are not described again. A tag
    event's ``tag_version`` is recorded only where the live instance carries the event's tags.
    Every observation is governed (:func:`store_governed`) against the stored record: ``change``
    says who made the change and what it set, when the event knows."""
    seen = {i: w.prefetched[(account, region, i)] for i in ids if (account, region, i) in w.prefetched}
    if described:
        t_given = ec2.now()
        seen.update({i: (t_given, described[i]) for i in ids if i in described and i not in seen})
    missing = [i for i in ids if i not in seen]
    if missing:
        live = describe_in(w, account, region, missing, metric)
        t0 = ec2.now()
        seen.update({i: (t0, live.get(i)) for i in missing})
    mapper = w.mapper()
    # governance compares with the stored record (also to lift a hold a new policy no longer asks for)
    stored = w.store.get_many(ids)
    observed: list[InventoryRecord] = []
    for iid in ids:
        t, inst = seen[iid]
        rec = ec2.to_record(inst, account, region, t, mapper) if inst else ec2.tombstone(iid, account, region, t)
        if tag_version is not None and inst is not None and (tags is None or ec2.instance_tags(inst) == tags):
            rec.tag_version = tag_version
        observed.append(rec)
    # each record's conditional write is its own item's: side by side (a scale-out's batch of ten
    # launches was ten round trips one after another, each waiting on a busy store)
    results = store_governed(w, observed, stored, change, event_id=event_id, metric=metric, parallel=True)
    changed: set[str] = set()
    gave_back: set[str] = set()
    try:
        for rec, moved, governed, replaced in results:
            if governed or (moved and _matters(w, replaced, rec)):
                changed.add(rec.id)
                if moved and releases_addresses(replaced, rec):
                    gave_back.add(rec.id)
            if rec.state == "terminated" and _left_before(replaced):
                # a deletion observed again (its redelivery) is computed again: the first
                # delivery's hand-off may have failed too, and a terminated record is cheap
                changed.add(rec.id)
            if rec.state == "terminated" and (moved or governed or _left_before(replaced)):
                # again where it was stored terminated already: a retire that failed after the
                # write is redone by the event's redelivery, which stores nothing (revoking is idempotent)
                credentials.retire(w, rec.id, "instance terminated")
    except BaseException:
        # what was stored is handed on: the redelivery finds it stored and would not
        hand_on_stored(w, [r.record.id for r in results], f"event {event_id or '-'}", metric, urgent=gave_back)
        raise
    if removed is not None:
        removed |= gave_back
    return changed


def _left_before(replaced: InventoryRecord | None) -> bool:
    return replaced is not None and replaced.state == "terminated"


def describe_in(
    w: BaseWiring, account: str, region: str, ids: list[str], metric: Metric = no_metric
) -> dict[str, dict[str, Any]]:
    """:func:`ec2.describe` in the batch's limits (:func:`read_in`), with the batch's short retries."""
    return read_in(
        w,
        account,
        region,
        lambda: ec2.describe(w.ec2_for(account, region, batch=True), ids, w.check_deadline),
        metric,
    )


def _store_leaving(w: BaseWiring, rec: InventoryRecord, t: float) -> bool:
    """Store ``rec`` as terminating at ``t``, as it is stored now: a binding or an approval that
    lands in between is kept, and a record that meanwhile left (terminated, terminating) is left."""

    def leaving(now: InventoryRecord) -> InventoryRecord | None:
        if now.state not in ACTIVE_STATES:
            return None
        return now.model_copy(update={"state": "terminating", "observed_at": t})

    return rewrite_governed(w, rec, leaving)


def _matters(w: BaseWiring, before: InventoryRecord | None, after: InventoryRecord) -> bool:
    """Whether a stored change concerns compute or the perimeter (:func:`concerns_compute`): the
    workload's addresses, label tags, labels or place, or whether it is in peers' sets at all. An
    instance going from pending to running changes neither (both are active): a 50-instance
    scale-out's state changes put a compute message per ingest batch on the one serialized queue,
    for nothing; nor does a tag outside the labels' prefix, which the guard rail lets a developer
    flip as often as they like (each flip was a compute message ahead of an admin's quarantine).
    The prefix is the governing policy's, read once per batch (a policy read per event outside
    one, only for a change that may not matter)."""
    if before is None or (before.state in ACTIVE_STATES) != (after.state in ACTIVE_STATES):
        return True
    active = w.governing_policy()
    return concerns_compute(before, after, active[1].labels.key_prefix if active is not None else None)


def mark_leaving(
    w: BaseWiring,
    account: str,
    region: str,
    ids: list[str],
    *,
    group: str | None = None,
    event_id: str = "",
    metric: Metric = no_metric,
) -> tuple[set[str], dict[str, str]]:
    """A terminate lifecycle action: the instance still runs but must leave peers' sets — once
    Auto Scaling confirms it is terminating it (in ``group``, when the action names one). Whoever
    can put a message on a queue must not be able to drop a running database from every peer set:
    an unconfirmed action changes nothing, is audited and counted (``UnconfirmedTerminations``).
    Returns (ids that left, id → why refused)."""
    known = {iid: rec for iid in ids if (rec := w.store.get(iid)) is not None and rec.state != "terminating"}
    # gone already (EC2 said so in the describe that just ran): nothing to confirm
    candidates = sorted(iid for iid, rec in known.items() if rec.state in ACTIVE_STATES)
    if not candidates:
        return set(), {}
    confirmed = read_in(
        w,
        account,
        region,
        lambda: ec2.leaving_groups(w.autoscaling_for(account, region, batch=True), candidates),
        metric,
    )
    changed: set[str] = set()
    refused: dict[str, str] = {}
    t = ec2.now() + 0.001  # after the describe that just ran
    for iid in candidates:
        asg_group = confirmed.get(iid)
        if asg_group is None or (group is not None and asg_group != group):
            why = (
                "Auto Scaling is not terminating it"
                if asg_group is None
                else f"Auto Scaling terminates it in {asg_group}, not {group}"
            )
            refused[iid] = why
            log.warning("terminate action %s for running %s refused: %s", event_id, iid, why)
            metric("UnconfirmedTerminations", 1)
            w.audit(
                AuditRecord(
                    principal="ringfence:lifecycle",
                    action="workload.terminate-refused",
                    target=iid,
                    detail={"event_id": event_id, "group": group, "account": account, "region": region},
                    reason=why,
                )
            )
            continue
        if _store_leaving(w, known[iid], t):
            changed.add(iid)
    return changed, refused
