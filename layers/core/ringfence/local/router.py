"""The local event router: what EventBridge and Lambda do for the control plane in AWS.

It turns what happens in the embedded AWS into the events AWS would emit, sends them through
moto EventBridge (whose rules route them to the SQS queues), and runs the real handlers in
``functions/`` on those queues as Lambda's SQS event-source mapping does. Interface::

    from ringfence.local.aws import EmbeddedAws
    from ringfence.local.router import EventRouter

    with EmbeddedAws() as aws, EventRouter(aws) as router:
        ...                                   # change moto through boto3 (aws.client("ec2"), …)
        router.wait_idle(timeout=10)          # True once nothing is left to watch, route or run
        router.timeline.entries()             # [TimelineEntry]: per event, its timestamps
        router.timeline.wait(pred, timeout)   # the first entry with pred(entry), or None
        router.subscribe(fn)                  # fn(stage, entry): "put", "ingested", "computed", "unchanged", "failed"
        router.fn["agentapi"]                 # the loaded handler modules (one warm "container" each)
        router.run_scheduled("reconcile")     # run a scheduled handler now
        router.watch_stats()                  # how long a watch tick takes (count, mean, p95, max in s)
        router.pending()                      # messages per queue (visible + in flight), DLQs included
        router.deliveries, router.errors      # every handler invocation; failures the router survived

``EventRouter(aws, watch_interval=0.05, watch_fallback=1.0, poll_interval=0.05, schedule=None,
retry_after=1.0, batch_size=10, functions=None, announce_existing=False, cloudtrail=True, long_poll=1,
pollers=POLLERS)``:

- **watching** (a thread): the instances and Auto Scaling groups moto holds
  (:meth:`ringfence.local.aws.EmbeddedAws.instances`, read from moto's models) on the moto
  server, compared with the previous look, whenever moto's change count moves (a call that
  changed instances, their tags or Auto Scaling groups: :mod:`moto_changes`; looks at least
  ``watch_interval`` s apart, so a burst of calls costs one look) and every ``watch_fallback`` s
  without news (a lifecycle hook timing out is moto's own doing). Looking on a timer every 0.15 s
  was a third of moto's CPU during a scale-out, and every handler's call waited behind it. A new or
  changed instance state → ``EC2 Instance State-change Notification``; changed tags → ``Tag Change
  on Resource`` (full tag set after the change, ``changed-tag-keys``, a per-instance ``version``);
  a new lifecycle action → ``EC2 Instance-launch/-terminate Lifecycle Action`` with its
  ``LifecycleActionToken`` (read from the moto extension, as AWS puts it only in this event);
  an ASG instance reaching ``InService`` → ``EC2 Instance Launch Successful``; one leaving its
  group terminated → ``EC2 Instance Terminate Successful``. With ``cloudtrail`` (default), each
  ``CreateTags`` / ``DeleteTags`` / ``RunInstances`` call moto served (Auto Scaling's launches
  included) → ``AWS API Call via CloudTrail`` with the caller's ``userIdentity``, as a trail feeds
  the stack's ``CloudTrailEc2`` rule (:mod:`ringfence.local.moto_trail`); the other events carry
  no ``userIdentity`` in AWS either. Instances that exist when the router starts are not
  announced unless ``announce_existing`` (in AWS, the scheduled reconcile finds them).
- **delivering** (pollers per queue, as each function has its own event-source mapping
  in AWS): the lifecycle, ingest, perimeter and compute queues are each drained by their own
  pollers (``POLLERS``: several batches at once where AWS runs several invocations), concurrently
  with each other, each batch (``batch_size``) to ``functions/<name>/app.py``'s
  handler (:func:`ringfence.local.lambdas.deliver_batch`): successes deleted, reported failures
  visible again after ``retry_after`` s (AWS: the queue's visibility timeout, 360 s / 960 s), so the
  queue's redrive policy moves a poison message to its DLQ after its receive count. The compute
  queue is FIFO with one message group: its one thread takes batches in order, one at a time; the
  perimeter's one thread too (reserved concurrency 1). The
  handlers' boto3 clients are created up front in one thread (a session is not meant to create
  clients from many threads; made clients are thread-safe). Each poller long-polls its queue
  (``long_poll`` s, as Lambda's pollers do): moto answers the moment a message arrives, and an
  idle lab does not send moto a ``ReceiveMessage`` per queue every ``poll_interval`` (a
  10-instance scale-out made 1,454 of them, 37 % of the lab's AWS calls). AWS's batching window (2 s for
  ingest) is not waited for: delivery is immediate. ``RINGFENCE_ROUTER_PROFILE=<dir>`` profiles
  every invocation (cProfile, per function) and writes ``<dir>/<function>.prof``,
  ``deliveries.json`` and ``timeline.json`` on ``stop()``.
- **schedule** (a thread of its own): ``{"reconcile": 300.0, "perimeter": 1800.0}`` runs those
  handlers with a ``Scheduled Event`` every so many seconds, first after one period (off when
  ``None``, the default; ``AWS_SCHEDULE`` is the stack's own).

:class:`Timeline` records, per event put: ``changed`` (the watcher saw the change in moto),
``put`` (``PutEvents`` returned), ``ingested`` (the ingest or lifecycle handler finished the batch
holding it), ``computed`` (the compute handler finished a batch naming its instance with a message
sent after that ingest began, or received after it finished), ``published`` (a publish batch
holding its instance's bundle finished after that) — all ``time.time()`` seconds; ``unchanged`` when the pipeline went idle after
its ingest with nothing to compute for it (ingest found the inventory already as the event says:
the same change often arrives as several events, e.g. CloudTrail ``RunInstances`` and the state
change). Lifecycle actions are completed by compute
through ``CompleteLifecycleAction`` on the moto server; the watcher then sees ``InService``.
"""

from __future__ import annotations

import copy
import cProfile
import datetime as dt
import functools
import json
import logging
import os
import pstats
import statistics
import threading
import time
import uuid
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field, replace
from types import ModuleType
from typing import Any

from ringfence.control.fanout import in_parallel

from . import moto_lifecycle
from .aws import EmbeddedAws
from .lambdas import FUNCTIONS, Delivery, LambdaContext, deliver_batch, load_functions, retire_functions

log = logging.getLogger("ringfence.local.router")

STATE_CHANGE = "EC2 Instance State-change Notification"
TAG_CHANGE = "Tag Change on Resource"
LAUNCH_ACTION = "EC2 Instance-launch Lifecycle Action"
TERMINATE_ACTION = "EC2 Instance-terminate Lifecycle Action"
LAUNCH_OK = "EC2 Instance Launch Successful"
TERMINATE_OK = "EC2 Instance Terminate Successful"
API_CALL = "AWS API Call via CloudTrail"

# delivery order per pass: lifecycle actions first (an instance waits on them), then ingest, the
# perimeter (which hands launch actions on to compute), compute, and the publish workers that
# sign, store and announce what compute rendered
QUEUES = (
    ("lifecycle", "lifecycle"),
    ("ingest", "ingest"),
    ("perimeter", "perimeter"),
    # compute's priority lane: a poller of its own on the same compute container (two event
    # source mappings on one function in AWS), one invocation at a time across both (_compute_turn)
    ("compute_priority", "compute"),
    ("compute", "compute"),
    ("publish", "publish"),
)
COMPUTE_QUEUES = ("compute", "compute_priority")
STAGES = ("put", "ingested", "computed", "unchanged", "failed")
SETTLE_EVERY = 1.0  # s between the schedule thread's checks that the queues went idle
LEAVING_LOOKS = 20  # looks to wait for an instance that left its group to be seen terminated

# template.yaml's schedules (ReconcileSchedule's default, the perimeter's rate), for schedule=
AWS_SCHEDULE = {"reconcile": 15 * 60.0, "perimeter": 30 * 60.0}
# batches taken at once per queue (``pollers=``): AWS runs ingest at up to 20 concurrent
# invocations, lifecycle 10 and publish 50 (template.yaml), the perimeter one (it writes an
# interface's whole group list) and compute one (its FIFO queue has a single message group). The
# lab takes a few ingest and lifecycle batches at once (one thread was a queue of its own behind a
# scale-out: three lifecycle batches at once took a 50-instance scale-out from 16.2 to 14.9 s).
POLLERS = {"lifecycle": 3, "ingest": 3, "perimeter": 1, "compute": 1, "compute_priority": 1, "publish": 3}


# --- the timeline ----------------------------------------------------------------------------------


@dataclass(frozen=True)
class TimelineEntry:
    """One event the router put, and when it got where (wall-clock seconds, ``time.time()``)."""

    event_id: str
    detail_type: str
    instance_ids: tuple[str, ...]
    summary: str  # e.g. "i-0abc running", "i-0abc tags env=prod", "i-0abc launch hook rf-hook"
    changed: float  # the watcher saw the change in moto
    put: float | None = None
    ingested: float | None = None
    perimeter: float | None = None  # the perimeter handler finished a batch naming its instance
    computed: float | None = None
    # a publish worker pointed at its instance's new bundle (compute fans bundles out to them)
    published: float | None = None
    failed: str | None = None  # last handler failure for it (it stays queued and is retried)
    attempts: int = 0
    unchanged: bool = False  # ingested, and the pipeline went idle with nothing to compute for it
    detail: dict[str, Any] = field(default_factory=dict, compare=False)  # the event's detail, as put

    @property
    def to_ingested(self) -> float | None:
        return None if self.ingested is None else self.ingested - self.changed

    @property
    def to_computed(self) -> float | None:
        return None if self.computed is None else self.computed - self.changed


class Timeline:
    """Thread-safe record of every event the router put (readers get immutable copies)."""

    def __init__(self) -> None:
        self._cond = threading.Condition()
        self._entries: dict[str, TimelineEntry] = {}  # insertion order = put order
        self._awaiting: dict[str, list[str]] = {}  # instance → event ids ingested, not yet computed
        self._ingest_began: dict[str, float] = {}  # event id → when the ingest batch holding it was received
        self._began_early: dict[str, float] = {}  # began before its put was recorded (see put)
        self._listeners: list[Callable[[str, TimelineEntry], None]] = []

    def entries(self) -> list[TimelineEntry]:
        with self._cond:
            return list(self._entries.values())

    def get(self, event_id: str) -> TimelineEntry | None:
        with self._cond:
            return self._entries.get(event_id)

    def for_instance(self, instance_id: str) -> list[TimelineEntry]:
        with self._cond:
            return [e for e in self._entries.values() if instance_id in e.instance_ids]

    def wait(self, pred: Callable[[TimelineEntry], bool], timeout: float) -> TimelineEntry | None:
        """The first entry satisfying ``pred``, waiting up to ``timeout`` s for one."""
        deadline = time.monotonic() + timeout
        with self._cond:
            while True:
                for e in self._entries.values():
                    if pred(e):
                        return e
                left = deadline - time.monotonic()
                if left <= 0:
                    return None
                self._cond.wait(left)

    def subscribe(self, fn: Callable[[str, TimelineEntry], None]) -> None:
        with self._cond:
            self._listeners.append(fn)

    # --- recording (the router) ---

    def _notify(self, stage: str, entries: list[TimelineEntry]) -> None:
        self._cond.notify_all()
        listeners = list(self._listeners)
        for e in entries:
            for fn in listeners:
                try:
                    fn(stage, e)
                except Exception:
                    log.exception("timeline listener failed at %s", stage)

    def put(self, entries: list[TimelineEntry]) -> None:
        with self._cond:
            for e in entries:
                self._entries[e.event_id] = e
            # a handler that received an event before its put was recorded here (SQS delivers
            # while PutEvents is still answering) began it all the same
            early = {e.event_id: at for e in entries if (at := self._began_early.pop(e.event_id, None)) is not None}
            for eid, at in early.items():
                self._begin(eid, at)
            self._notify("put", entries)

    def began(self, event_ids: Iterable[str], at: float) -> None:
        """An ingest (or lifecycle) handler received a batch holding these events at ``at``.
        From now on, a perimeter or compute batch may answer them before that batch finishes
        (the handlers run concurrently, and a batch's first record is sent on before its last)."""
        with self._cond:
            for eid in event_ids:
                if eid not in self._entries:
                    self._began_early[eid] = at
                    continue
                self._begin(eid, at)

    def _begin(self, eid: str, at: float) -> None:
        e = self._entries[eid]
        if e.ingested is not None:
            return
        self._ingest_began[eid] = at
        for iid in e.instance_ids:
            waiting = self._awaiting.setdefault(iid, [])
            if eid not in waiting:
                waiting.append(eid)

    def ingested(self, event_ids: Iterable[str], at: float, began: float | None = None) -> None:
        """The ingest (or lifecycle) batch holding these events, received at ``began``, finished at
        ``at`` (events a later handler already answered keep the ingest time that answer gave)."""
        with self._cond:
            done = []
            for eid in event_ids:
                e = self._entries.get(eid)
                if e is None:
                    continue
                if e.ingested is not None:
                    if e.failed is not None:
                        self._entries[eid] = replace(e, failed=None)
                    continue
                e = replace(e, ingested=at, failed=None, attempts=e.attempts + 1)
                self._entries[eid] = e
                self._ingest_began[eid] = self._ingest_began.get(eid, at) if began is None else began
                done.append(e)
                for iid in e.instance_ids:
                    waiting = self._awaiting.setdefault(iid, [])
                    if eid not in waiting:
                        waiting.append(eid)
            if done:
                self._notify("ingested", done)

    def failed(self, event_ids: Iterable[str], reason: str) -> None:
        with self._cond:
            out = []
            for eid in event_ids:
                e = self._entries.get(eid)
                if e is None:
                    continue
                e = replace(e, failed=reason, attempts=e.attempts + 1)
                self._entries[eid] = e
                out.append(e)
            if out:
                self._notify("failed", out)

    def perimeter(self, instance_ids: Iterable[str], at: float, sent: dict[str, float] | None = None) -> None:
        """The perimeter handler finished a batch naming these instances at ``at``: their events
        ingested and awaiting compute are stamped (the first time only; not a stage listeners
        see). ``sent`` as for :meth:`computed`."""
        sent = sent or {}
        with self._cond:
            for iid in instance_ids:
                for eid in list(self._awaiting.get(iid, [])):
                    e = self._answered(eid, sent.get(iid), at, at)
                    if e is not None and e.perimeter is None:
                        self._entries[eid] = replace(e, perimeter=at)
            self._cond.notify_all()

    def published(self, instance_ids: Iterable[str], at: float) -> None:
        """A publish batch finished at ``at`` with these instances' bundles: each computed event
        for them without a publish stamp gets one (not a stage listeners see)."""
        ids = set(instance_ids)
        if not ids:
            return
        with self._cond:
            for eid, e in self._entries.items():
                if e.computed is not None and e.published is None and ids.intersection(e.instance_ids):
                    self._entries[eid] = replace(e, published=at)
            self._cond.notify_all()

    def computed(
        self,
        instance_ids: Iterable[str],
        received_at: float,
        at: float,
        sent: dict[str, float] | None = None,
        lifecycles: Iterable[str] | None = None,
    ) -> None:
        """A compute batch received at ``received_at`` finished at ``at`` naming these instances:
        every event for them ingested before that batch was received is now computed, and so is
        one whose ingest began before the batch's message for its instance was sent (``sent``:
        instance → its latest message's ``SentTimestamp``, s): that message came from this
        ingest (or a later one), which had seen the event. Such an event still being ingested
        is stamped ingested when that message was sent (its record was done then). A lifecycle
        action is answered only by a batch carrying it (``lifecycles``: the instances whose
        action the batch held, when given): a batch computing the same instance's other events
        did not complete it, and the action's perimeter hand-off comes later."""
        sent = sent or {}
        carried = None if lifecycles is None else set(lifecycles)
        with self._cond:
            done = []
            for iid in instance_ids:
                keep = []
                for eid in self._awaiting.get(iid, []):
                    if (
                        carried is not None
                        and iid not in carried
                        and self._entries[eid].detail_type in (LAUNCH_ACTION, TERMINATE_ACTION)
                    ):
                        keep.append(eid)
                        continue
                    e = self._answered(eid, sent.get(iid), received_at, at)
                    if e is not None and e.computed is None:
                        e = replace(e, computed=at)
                        self._entries[eid] = e
                        done.append(e)
                    elif self._entries[eid].computed is None:
                        keep.append(eid)
                self._awaiting[iid] = keep
            if done:
                self._notify("computed", done)

    def _answered(self, eid: str, sent: float | None, received_at: float, at: float) -> TimelineEntry | None:
        """The entry, if a downstream batch received at ``received_at`` (its message for the
        instance sent at ``sent``) answered it; an answered entry still being ingested, or whose
        ingest batch finished after that message was sent, gets that time as its ingest time (and
        is announced ingested the first time). ``None`` if the batch does not answer it."""
        e = self._entries[eid]
        began = self._ingest_began.get(eid)
        if e.ingested is not None and e.ingested <= received_at:
            return e
        # SentTimestamp is whole milliseconds: a message sent in the ingest's first ms counts
        if began is None or sent is None or sent < began - 0.001:
            return None
        # its record was done by the time the downstream message was sent, whenever the ingest
        # batch holding it finished (a lifecycle batch returns after the perimeter handed it on)
        done = min(max(sent, began), at)
        if e.ingested is None:
            e = replace(e, ingested=done, failed=None, attempts=e.attempts + 1)
            self._entries[eid] = e
            self._notify("ingested", [e])
        elif e.ingested > done:
            e = replace(e, ingested=done)
            self._entries[eid] = e
        return e

    def settle(self, before: float) -> None:
        """The pipeline is idle: events ingested before ``before`` still waiting for compute
        changed nothing (ingest found the inventory as it was), so none will come."""
        with self._cond:
            done = []
            for iid in list(self._awaiting):
                keep = []
                for eid in self._awaiting[iid]:
                    e = self._entries[eid]
                    if e.computed is not None:
                        continue
                    if e.ingested is not None and e.ingested < before:
                        e = replace(e, unchanged=True)
                        self._entries[eid] = e
                        done.append(e)
                    else:
                        keep.append(eid)
                self._awaiting[iid] = keep
            if done:
                self._notify("unchanged", done)

    def _has_awaiting(self) -> bool:
        with self._cond:
            return any(
                self._entries[eid].ingested is not None for waiting in self._awaiting.values() for eid in waiting
            )


# --- what the watcher sees -----------------------------------------------------------------------


@dataclass
class _Instance:
    state: str
    tags: dict[str, str]
    tag_version: int = 1


@dataclass
class _Member:
    group: str
    group_arn: str
    lifecycle_state: str


@dataclass
class _Look:
    instances: dict[str, _Instance] = field(default_factory=dict)
    members: dict[str, _Member] = field(default_factory=dict)  # instance → its ASG membership
    tokens: set[str] = field(default_factory=set)  # lifecycle actions already announced
    # instances that left their group but were still running when looked at (the two describes
    # are not one snapshot): their "Terminate Successful" waits for them to be seen terminated
    # (a detached instance keeps running: it is forgotten after LEAVING_LOOKS looks)
    leaving: dict[str, tuple[_Member, int]] = field(default_factory=dict)


@dataclass
class _Event:
    """An event to put, with what the timeline needs to know about it."""

    entry: dict[str, Any]  # PutEvents entry (Detail is JSON text)
    instance_ids: tuple[str, ...]
    summary: str
    changed: float


def _warm_clients(region: str) -> None:
    """Create the handlers' shared boto3 clients now, in one thread: a boto3 session is not meant
    to create clients from several threads at once (the runtime thread and a caller reading
    through another handler module would, on their first calls)."""
    from ringfence.clouds.aws import clients

    for service in ("ec2", "sqs", "s3", "dynamodb", "autoscaling", "secretsmanager", "sts"):
        clients.client(service)
        clients.client(service, region=region)


def _event_ids(event: dict[str, Any]) -> list[str]:
    """The EventBridge event ids in an SQS event's records (bodies that are not events skipped)."""
    out = []
    for rec in event.get("Records", []):
        try:
            eid = json.loads(rec["body"]).get("id")
        except (ValueError, AttributeError, KeyError):
            continue
        if eid:
            out.append(str(eid))
    return out


class EventRouter:
    """Watches the embedded AWS and runs the handlers on its queues. See the module doc."""

    def __init__(
        self,
        aws: EmbeddedAws,
        *,
        watch_interval: float = 0.05,
        watch_fallback: float = 1.0,
        poll_interval: float = 0.05,
        schedule: dict[str, float] | None = None,
        retry_after: float = 1.0,
        batch_size: int = 10,
        functions: dict[str, ModuleType] | None = None,
        announce_existing: bool = False,
        cloudtrail: bool = True,
        long_poll: int = 1,
        pollers: dict[str, int] | None = None,
    ) -> None:
        self.aws = aws
        self.pollers = {**POLLERS, **(pollers or {})}
        self.long_poll = long_poll
        self.watch_interval = watch_interval
        self.watch_fallback = watch_fallback
        self.poll_interval = poll_interval
        self.schedule = dict(schedule or {})
        self.retry_after = retry_after
        self.batch_size = batch_size
        self.announce_existing = announce_existing
        self.cloudtrail = cloudtrail
        self._trail_seq = 0
        self._own_functions = functions is None  # loaded here: retired by stop()
        self.fn = functions if functions is not None else load_functions(FUNCTIONS)
        _warm_clients(aws.region)
        self.timeline = Timeline()
        self.deliveries: list[Delivery] = []  # every handler invocation (read under self._lock)
        self.errors: list[str] = []  # watcher/runtime failures the router survived
        # clients made here, in the caller's thread (creating clients is not thread-safe)
        self._events = aws.client("events")
        self._sqs = aws.client("sqs")
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._threads: list[threading.Thread] = []
        self._look = _Look()
        self._ticks: list[float] = []
        self._looks = 0  # watch ticks completed
        self._looked_at = -1  # moto's change count when the last completed look began
        self._next_settle = 0.0  # monotonic: when the schedule thread may next ask the queues
        self._busy: dict[str, int] = {}  # poller → handler invocations running (read under self._lock)
        # compute's reserved concurrency 1: its two queues' pollers take turns at the one container
        self._compute_turn = threading.Lock()
        self._invocations = 0  # handler invocations recorded (under self._lock)
        self._profile_dir = os.environ.get("RINGFENCE_ROUTER_PROFILE") or None
        self._profiles: dict[str, pstats.Stats] = {}  # function → its invocations' profiles merged
        self._next_run = {name: time.monotonic() + every for name, every in self.schedule.items()}

    # --- lifecycle -------------------------------------------------------------------------------

    def __enter__(self) -> EventRouter:
        self.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()

    def start(self) -> None:
        """Take the first look (synchronously: later changes are changes) and start both threads."""
        if self._threads:
            return
        self._stop.clear()
        if self.cloudtrail:  # calls made before the router started are history
            done = self.aws.trail_since(0)
            self._trail_seq = done[-1].seq if done else 0
        self._looked_at = self.aws.changes_after(-1)
        first = self._observe()
        # not announcing what exists: the first look is its own "before" (lifecycle actions
        # already waiting are announced all the same: nothing else would release them)
        base = _Look() if self.announce_existing else _Look(dict(first.instances), dict(first.members))
        self._put(self._diff(base, first))
        self._look = first
        loops: list[tuple[str, Callable[[], None]]] = [("watch", self._watch_loop), ("schedule", self._schedule_loop)]
        loops += [(queue, functools.partial(self._poller_loop, queue, name)) for queue, name in QUEUES]
        # standard queues: Lambda runs several batches of each at once (FIFO compute: one), each
        # extra poller in a container of its own where there can be one
        loops += [
            (f"{queue}-{i}", functools.partial(self._poller_loop, queue, name, container))
            for queue, name in QUEUES
            if queue not in COMPUTE_QUEUES
            for i in range(1, self.pollers.get(queue, 1))
            if (container := self._container(name, i)) is not None
        ]
        for name, target in loops:
            t = threading.Thread(target=target, name=f"ringfence-router-{name}", daemon=True)
            t.start()
            self._threads.append(t)

    def stop(self, timeout: float = 10.0) -> None:
        """Stop the router's threads (a handler already running finishes first)."""
        self._stop.set()
        for t in self._threads:
            t.join(timeout)
            if t.is_alive():
                log.error("router thread %s did not stop within %.0f s", t.name, timeout)
        self._threads = []
        if self._own_functions:
            retire_functions(self.fn.values())
        self._write_profiles()

    def subscribe(self, fn: Callable[[str, TimelineEntry], None]) -> None:
        self.timeline.subscribe(fn)

    # --- watching --------------------------------------------------------------------------------

    def _watch_loop(self) -> None:
        seen = self._looked_at
        while not self._stop.is_set():
            try:
                # a change since the last look began, or the fallback's time without news
                seq = self.aws.changes_after(seen, self.watch_fallback)
            except Exception as exc:  # moto going away: the next look tells
                log.warning("waiting for moto's changes failed: %s", exc)
                seq = seen
                self._stop.wait(self.watch_fallback)
            if self._stop.is_set():
                return
            t0 = time.monotonic()
            try:
                self.tick()
            except Exception as exc:  # moto hiccup: log, keep watching
                log.exception("watch tick failed")
                with self._lock:
                    self.errors.append(f"watch: {type(exc).__name__}: {exc}")
            elapsed = time.monotonic() - t0
            with self._lock:
                self._ticks.append(elapsed)
                del self._ticks[:-1000]
                self._looks += 1
                self._looked_at = seq
            seen = seq
            self._stop.wait(max(self.watch_interval - elapsed, 0.0))  # a burst of calls: one look

    def tick(self) -> int:
        """One look at moto; emits an event per change. Returns how many it put. The watcher
        thread calls it; call it yourself only on a router that is not started."""
        look = self._observe()
        events = self._diff(self._look, look)
        if self.cloudtrail:
            events.extend(self._trail_events())
        self._look = look
        self._put(events)
        return len(events)

    def _trail_events(self) -> list[_Event]:
        now = time.time()
        out = []
        for rec in self.aws.trail_since(self._trail_seq):
            self._trail_seq = rec.seq
            d = rec.detail
            if d["eventName"] == "RunInstances":
                items = (d.get("responseElements") or {}).get("instancesSet", {}).get("items", [])
                ids = tuple(i["instanceId"] for i in items)
            else:
                items = d["requestParameters"]["resourcesSet"]["items"]
                ids = tuple(i["resourceId"] for i in items if i["resourceId"].startswith("i-"))
            entry = {"Source": "aws.ec2", "DetailType": API_CALL, "Resources": [], "Detail": json.dumps(d)}
            who = d["userIdentity"].get("arn") or d["userIdentity"].get("invokedBy", "?")
            fail = f" failed ({d['errorCode']})" if d.get("errorCode") else ""
            out.append(_Event(entry, ids, f"{d['eventName']} {' '.join(ids)} by {who}{fail}", now))
        return out

    def watch_stats(self) -> dict[str, float]:
        with self._lock:
            ticks = sorted(self._ticks)
        if not ticks:
            return {"count": 0, "mean": 0.0, "p95": 0.0, "max": 0.0, "interval": self.watch_interval}
        return {
            "count": len(ticks),
            "mean": statistics.fmean(ticks),
            "p95": ticks[min(int(len(ticks) * 0.95), len(ticks) - 1)],
            "max": ticks[-1],
            "interval": self.watch_interval,
        }

    def _observe(self) -> _Look:
        look = _Look()
        estate = self.aws.instances()
        for iid, inst in estate.instances.items():
            look.instances[iid] = _Instance(inst.state, dict(inst.tags))
        for name, g in estate.groups.items():
            for iid, lifecycle_state in g.members.items():
                look.members[iid] = _Member(name, g.arn, lifecycle_state)
        return look

    def _diff(self, old: _Look, new: _Look) -> list[_Event]:
        now = time.time()
        out: list[_Event] = []
        for iid, inst in new.instances.items():
            before = old.instances.get(iid)
            if before is None or before.state != inst.state:
                out.append(self._state_event(iid, inst.state, now))
            if before is not None:
                inst.tag_version = before.tag_version
                if before.tags != inst.tags:
                    inst.tag_version += 1
                    out.append(self._tag_event(iid, before.tags, inst.tags, inst.tag_version, now))
        # lifecycle actions: each waiting one, once
        actions = self.aws.lifecycle_actions()
        new.tokens = {a.token for a in actions if a.token in old.tokens}
        for action in actions:
            if action.token not in new.tokens:
                new.tokens.add(action.token)
                member = new.members.get(action.instance_id)
                arn = member.group_arn if member else self._group_arn(action.group_name)
                out.append(self._lifecycle_event(action, arn, now))
        for iid, m in new.members.items():
            before_m = old.members.get(iid)
            if m.lifecycle_state == "InService" and (before_m is None or before_m.lifecycle_state != "InService"):
                out.append(self._asg_event(LAUNCH_OK, iid, m, now))
        left = {**old.leaving, **{i: (m, LEAVING_LOOKS) for i, m in old.members.items() if i not in new.members}}
        for iid, (m, looks) in left.items():
            if iid in new.members:
                continue  # back in a group
            gone = new.instances.get(iid)
            if gone is None or gone.state in ("shutting-down", "terminated"):
                out.append(self._asg_event(TERMINATE_OK, iid, m, now))
            elif looks > 1:
                new.leaving[iid] = (m, looks - 1)
        return out

    def _group_arn(self, group: str) -> str:
        return (
            f"arn:aws:autoscaling:{self.aws.region}:{self.aws.account}:autoScalingGroup:*:autoScalingGroupName/{group}"
        )

    def _instance_arn(self, iid: str) -> str:
        return f"arn:aws:ec2:{self.aws.region}:{self.aws.account}:instance/{iid}"

    def _state_event(self, iid: str, state: str, now: float) -> _Event:
        entry = {
            "Source": "aws.ec2",
            "DetailType": STATE_CHANGE,
            "Resources": [self._instance_arn(iid)],
            "Detail": json.dumps({"instance-id": iid, "state": state}),
        }
        return _Event(entry, (iid,), f"{iid} {state}", now)

    def _tag_event(self, iid: str, old: dict[str, str], new: dict[str, str], version: int, now: float) -> _Event:
        changed = sorted(k for k in set(old) | set(new) if old.get(k) != new.get(k))
        detail = {
            "changed-tag-keys": changed,
            "service": "ec2",
            "resource-type": "instance",
            "version": version,
            "tags": new,
        }
        entry = {
            "Source": "aws.tag",
            "DetailType": TAG_CHANGE,
            "Resources": [self._instance_arn(iid)],
            "Detail": json.dumps(detail),
        }
        what = ", ".join(f"{k}={new[k]}" if k in new else f"-{k}" for k in changed)
        return _Event(entry, (iid,), f"{iid} tags {what}", now)

    def _lifecycle_event(self, action: moto_lifecycle.PendingAction, group_arn: str, now: float) -> _Event:
        launching = action.launching
        detail: dict[str, Any] = {
            "LifecycleActionToken": action.token,
            "AutoScalingGroupName": action.group_name,
            "LifecycleHookName": action.hook_name,
            "EC2InstanceId": action.instance_id,
            "LifecycleTransition": action.transition,
            "Origin": "EC2" if launching else "AutoScalingGroup",
            "Destination": "AutoScalingGroup" if launching else "EC2",
        }
        if action.notification_metadata:
            detail["NotificationMetadata"] = action.notification_metadata
        entry = {
            "Source": "aws.autoscaling",
            "DetailType": LAUNCH_ACTION if launching else TERMINATE_ACTION,
            "Resources": [group_arn],
            "Detail": json.dumps(detail),
        }
        verb = "launch" if launching else "terminate"
        return _Event(entry, (action.instance_id,), f"{action.instance_id} {verb} hook {action.hook_name}", now)

    def _asg_event(self, kind: str, iid: str, m: _Member, now: float) -> _Event:
        stamp = dt.datetime.fromtimestamp(now, dt.UTC).strftime("%Y-%m-%dT%H:%M:%S.%fZ")
        launching = kind == LAUNCH_OK
        detail = {
            "StatusCode": "InProgress",
            "Description": f"Launching a new EC2 instance: {iid}" if launching else f"Terminating EC2 instance: {iid}",
            "AutoScalingGroupName": m.group,
            "ActivityId": str(uuid.uuid4()),
            "Details": {"Availability Zone": f"{self.aws.region}a", "Subnet ID": ""},
            "RequestId": str(uuid.uuid4()),
            "StatusMessage": "",
            "EndTime": stamp,
            "EC2InstanceId": iid,
            "StartTime": stamp,
            "Cause": "the embedded AWS observed the change",
        }
        entry = {
            "Source": "aws.autoscaling",
            "DetailType": kind,
            "Resources": [m.group_arn, self._instance_arn(iid)],
            "Detail": json.dumps(detail),
        }
        return _Event(entry, (iid,), f"{iid} {'in service' if launching else 'terminated'} ({m.group})", now)

    def _put(self, events: list[_Event]) -> None:
        """Put a look's events, each kind in its own PutEvents calls (at most 10 entries each), the
        calls side by side: on AWS each service emits its own events, and none waits behind
        another's (one after another, a 50-instance scale-out's launch actions were put 1–2.5 s
        after the change, behind a hundred state changes)."""
        kinds: dict[str, list[_Event]] = {}
        for e in events:
            kinds.setdefault(e.entry["DetailType"], []).append(e)
        chunks = [same[i : i + 10] for same in kinds.values() for i in range(0, len(same), 10)]
        in_parallel(self._put_chunk, chunks)

    def _put_chunk(self, chunk: list[_Event]) -> None:
        now = dt.datetime.now(dt.UTC)
        out = self._events.put_events(Entries=[{**e.entry, "Time": now} for e in chunk])
        put_at = time.time()
        entries = []
        for e, res in zip(chunk, out["Entries"], strict=True):
            if "EventId" not in res:
                log.error("PutEvents refused %s: %s", e.summary, res)
                with self._lock:
                    self.errors.append(f"put: {e.summary}: {res.get('ErrorMessage')}")
                continue
            entries.append(
                TimelineEntry(
                    event_id=res["EventId"],
                    detail_type=e.entry["DetailType"],
                    instance_ids=e.instance_ids,
                    summary=e.summary,
                    changed=e.changed,
                    put=put_at,
                    detail=json.loads(e.entry["Detail"]),
                )
            )
        self.timeline.put(entries)

    # --- the Lambda runtime ------------------------------------------------------------------------

    def _container(self, name: str, i: int) -> str | None:
        """The key in ``self.fn`` of the ``i``-th concurrent container of function ``name``: a
        fresh module of its own (Lambda runs concurrent invocations in separate environments, and
        ingest and lifecycle keep a batch's state at module level); the one module, shared, for
        publish, whose batches share nothing; ``None`` (no such poller) when the functions were
        handed in (their owner loaded one module each)."""
        if name == "publish":
            return name
        if not self._own_functions:
            return None
        key = f"{name}#{i}"
        if key not in self.fn:
            self.fn[key] = load_functions([name], keep_clients=True)[name]
        return key

    def _poller_loop(self, queue: str, name: str, container: str | None = None) -> None:
        """One queue's event-source mapping: a batch at a time, as soon as there is one."""
        while not self._stop.is_set():
            worked = False
            try:
                worked = self.deliver_from(queue, name, wait_seconds=self.long_poll, container=container)
            except Exception as exc:
                log.exception("router poller for %s failed", queue)
                with self._lock:
                    self.errors.append(f"runtime: {queue}: {type(exc).__name__}: {exc}")
            if not worked and not self.long_poll:  # a long poll has waited already
                self._stop.wait(self.poll_interval)

    def _schedule_loop(self) -> None:
        while not self._stop.is_set():
            try:
                self._settle_if_idle()
                self._run_due()
            except Exception as exc:
                log.exception("router schedule pass failed")
                with self._lock:
                    self.errors.append(f"runtime: {type(exc).__name__}: {exc}")
            self._stop.wait(self.poll_interval)

    def _settle_if_idle(self) -> None:
        """Events ingested before a moment when no handler ran and every queue was empty, still
        awaiting compute, changed nothing: their compute message (if any) was handled already."""
        if not self.timeline._has_awaiting():
            return
        # asking every queue costs moto a call each: once a second is soon enough to call
        # events "unchanged" (nothing measured waits for it)
        now = time.monotonic()
        if now < self._next_settle:
            return
        self._next_settle = now + SETTLE_EVERY
        with self._lock:
            seen = self._invocations
        started = time.time()
        if not self._queues_empty():
            return
        with self._lock:
            # a handler that ran (or runs) meanwhile may have taken one of their messages off the queue
            if self._invocations != seen or any(self._busy.values()):
                return
        self.timeline.settle(started)

    def deliver_once(self) -> bool:
        """One pass over the queues (a batch each, in order); ``True`` if any handler ran. For a
        router that is not started (its pollers do this on their own)."""
        worked = False
        for queue, name in QUEUES:
            worked = self.deliver_from(queue, name) or worked
        return worked

    def deliver_from(self, queue: str, name: str, wait_seconds: int = 0, container: str | None = None) -> bool:
        """Receive one batch from ``queue`` (waiting up to ``wait_seconds`` for one) and run
        ``name``'s handler on it (in ``container``, a key of ``self.fn``); ``True`` if it ran."""
        container = container or name
        handler = self._invoker(queue, name, container)
        try:
            d = deliver_batch(
                self._sqs,
                self.aws.queues[queue],
                self.aws.queue_arn(queue),
                handler,
                region=self.aws.region,
                batch_size=self.batch_size,
                retry_after=self.retry_after,
                name=name,
                wait_seconds=wait_seconds,
            )
            if d is not None:
                with self._lock:
                    self.deliveries.append(d)
                    del self.deliveries[:-10000]
                self._record(queue, d)
        finally:
            self._drop_disabled_metrics(container)
            with self._lock:
                if self._busy.get(queue):
                    self._busy[queue] -= 1
                    self._invocations += 1
        return d is not None

    def _invoker(self, queue: str, name: str, container: str) -> Callable[[dict[str, Any], Any], Any]:
        """The handler, marked busy from its call until its delivery is recorded (so that
        ``wait_idle`` and settling never see its messages gone and the timeline not yet told)."""
        fn = self.fn[container].handler

        def invoke(event: dict[str, Any], context: Any) -> Any:
            with self._lock:
                self._busy[queue] = self._busy.get(queue, 0) + 1
            if queue not in (*COMPUTE_QUEUES, "perimeter", "publish"):
                self.timeline.began(_event_ids(event), time.time())
            if queue in COMPUTE_QUEUES:
                with self._compute_turn:
                    return self._profiled(name, fn, event, context)
            return self._profiled(name, fn, event, context)

        return invoke

    def _profiled(self, name: str, fn: Callable[..., Any], *args: Any) -> Any:
        if self._profile_dir is None:
            return fn(*args)
        prof = cProfile.Profile()
        try:
            return prof.runcall(fn, *args)
        finally:
            with self._lock:
                if name in self._profiles:
                    self._profiles[name].add(prof)
                else:
                    self._profiles[name] = pstats.Stats(prof)

    def _write_profiles(self) -> None:
        """Each function's merged profile, every invocation's queue, size and times
        (``deliveries.json``: where a run's time went, queue by queue) and every event's stamps
        (``timeline.json``)."""
        if self._profile_dir is None:
            return
        os.makedirs(self._profile_dir, exist_ok=True)
        with self._lock:
            for name, stats in self._profiles.items():
                stats.dump_stats(os.path.join(self._profile_dir, f"{name}.prof"))
            rows = [
                {"queue": d.queue, "messages": len(d.messages), "received_at": d.received_at, "done_at": d.done_at}
                for d in self.deliveries
            ]
        with open(os.path.join(self._profile_dir, "deliveries.json"), "w", encoding="utf-8") as f:
            json.dump(rows, f)
        stamps = ("changed", "put", "ingested", "perimeter", "computed", "published")
        events = [
            {"type": e.detail_type, "ids": list(e.instance_ids), **{k: getattr(e, k) for k in stamps}}
            for e in self.timeline.entries()
        ]
        with open(os.path.join(self._profile_dir, "timeline.json"), "w", encoding="utf-8") as f:
            json.dump(events, f)

    def _record(self, queue: str, d: Delivery) -> None:
        if queue == "publish":
            if not d.failed:
                self.timeline.published(self._published_ids(d), d.done_at)
            return
        if queue in (*COMPUTE_QUEUES, "perimeter"):
            if d.failed:
                return
            ids: list[str] = []
            sent: dict[str, float] = {}  # instance → its latest message's SentTimestamp (s)
            handed_on: dict[str, float] = {}  # instance → when the perimeter handed its launch on
            carried: list[str] = []  # instances whose lifecycle action the batch held
            for m in d.messages:
                try:
                    body = json.loads(m["Body"])
                except ValueError:
                    continue
                named = list(body.get("ids") or [])
                for lc in [body.get("lifecycle") or {}, *(body.get("lifecycles") or [])]:
                    if lc.get("instance_id"):
                        named.append(lc["instance_id"])
                        carried.append(lc["instance_id"])
                        if isinstance(lc.get("perimeter_at"), (int, float)):
                            handed_on[lc["instance_id"]] = float(lc["perimeter_at"])
                ids.extend(named)
                stamp = (m.get("Attributes") or {}).get("SentTimestamp")
                if stamp:
                    for iid in named:
                        sent[iid] = max(sent.get(iid, 0.0), int(stamp) / 1000)
            if queue == "perimeter":
                self.timeline.perimeter(dict.fromkeys(ids), d.done_at, sent)
            else:
                # the perimeter's own delivery may be recorded after this one (compute's poller can
                # take the hand-off before the perimeter's poller has recorded its batch): the
                # hand-off's time is in the message
                for iid, at in handed_on.items():
                    self.timeline.perimeter([iid], at, sent)
                self.timeline.computed(dict.fromkeys(ids), d.received_at, d.done_at, sent, lifecycles=carried)
            return
        ok: list[str] = []
        bad: list[str] = []
        for m in d.messages:
            try:
                eid = str(json.loads(m["Body"]).get("id", ""))
            except (ValueError, AttributeError):
                continue
            (bad if m["MessageId"] in d.failed else ok).append(eid)
        self.timeline.ingested(ok, d.done_at, began=d.received_at)
        if bad:
            self.timeline.failed(bad, d.error or f"{queue} handler reported the record as failed")

    @staticmethod
    def _published_ids(d: Delivery) -> list[str]:
        """The workloads whose bundles a publish batch published."""
        out: list[str] = []
        for m in d.messages:
            try:
                body = json.loads(m["Body"])
            except ValueError:
                continue
            out.extend(str(b.get("workload_id")) for b in body.get("bundles") or [])
        return out

    def run_scheduled(self, name: str) -> dict[str, Any]:
        """Invoke a scheduled handler (``reconcile``, ``perimeter``) with a ``Scheduled Event`` now.
        The router's schedule thread calls it when due; calling it yourself runs it alongside the
        pollers (as a scheduled invocation runs alongside the queues' in AWS)."""
        event = {
            "version": "0",
            "id": str(uuid.uuid4()),
            "detail-type": "Scheduled Event",
            "source": "aws.events",
            "account": self.aws.account,
            "time": dt.datetime.now(dt.UTC).strftime("%Y-%m-%dT%H:%M:%SZ"),
            "region": self.aws.region,
            "resources": [f"arn:aws:events:{self.aws.region}:{self.aws.account}:rule/{name}-schedule"],
            "detail": {},
        }
        key = f"schedule:{name}"
        with self._lock:
            self._busy[key] = self._busy.get(key, 0) + 1
        try:
            out: dict[str, Any] = self._profiled(
                name, self.fn[name].handler, copy.deepcopy(event), LambdaContext(function_name=name)
            )
        finally:
            self._drop_disabled_metrics(name)
            with self._lock:
                self._busy[key] -= 1
        return out

    def _drop_disabled_metrics(self, name: str) -> None:
        # with POWERTOOLS_METRICS_DISABLED, Powertools keeps the metrics in memory and still
        # prints them whenever one reaches 100 values; drop them as log_metrics would after a flush
        from aws_lambda_powertools.metrics.functions import is_metrics_disabled

        metrics = getattr(self.fn.get(name), "metrics", None)
        if metrics is not None and is_metrics_disabled():
            metrics.clear_metrics()

    def _run_due(self) -> None:
        now = time.monotonic()
        for name, when in list(self._next_run.items()):
            if now >= when:
                self._next_run[name] = now + self.schedule[name]
                try:
                    self.run_scheduled(name)
                except Exception as exc:
                    log.exception("scheduled %s failed", name)
                    with self._lock:
                        self.errors.append(f"{name}: {type(exc).__name__}: {exc}")

    # --- waiting -----------------------------------------------------------------------------------

    def _queues_empty(self) -> bool:
        counts = self.pending(keys=[q for q, _ in QUEUES])
        return not any(counts.values())

    def pending(self, keys: Iterable[str] | None = None) -> dict[str, int]:
        """Messages on each queue now (visible + in flight), DLQs included."""
        out = {}
        for key in keys or self.aws.queues:
            url = self.aws.queues[key]
            a = self._sqs.get_queue_attributes(
                QueueUrl=url, AttributeNames=["ApproximateNumberOfMessages", "ApproximateNumberOfMessagesNotVisible"]
            )["Attributes"]
            out[key] = int(a["ApproximateNumberOfMessages"]) + int(a["ApproximateNumberOfMessagesNotVisible"])
        return out

    def wait_idle(self, timeout: float = 10.0, settle: float | None = None) -> bool:
        """Wait until the work queues are empty, no handler runs, and that has held while the
        watcher has looked at moto since its last change (so nothing is left there to announce)
        and for at least ``settle`` s. ``False`` on timeout."""
        settle = settle if settle is not None else max(self.watch_interval, 0.15)
        deadline = time.monotonic() + timeout
        quiet: tuple[float, float, int] | None = None  # since when (monotonic, wall clock), invocations then
        while time.monotonic() < deadline:
            counts = self.pending(keys=[q for q, _ in QUEUES])
            watching = any(t.name.endswith("watch") and t.is_alive() for t in self._threads)
            changes = self.aws.changes_after(-1) if watching else -1
            now, wall = time.monotonic(), time.time()
            with self._lock:
                # a look that began before moto's last change may have missed it
                unseen = changes > self._looked_at
                busy = any(self._busy.values()) or any(counts.values()) or unseen
                invocations = self._invocations
            if busy or (quiet is not None and invocations != quiet[2]):
                quiet = None
            elif quiet is None:
                quiet = (now, wall, invocations)
            elif now - quiet[0] >= settle:
                # idle all along: what was ingested before the quiet began and still awaits
                # compute changed nothing (the schedule thread would say so within SETTLE_EVERY)
                self.timeline.settle(quiet[1])
                return True
            time.sleep(min(self.poll_interval, 0.05))
        return False
