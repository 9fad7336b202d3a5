"""Governed labels: who may move a workload into a privileged label value.

Labels are the identity policy is written against, and tags are whatever anyone with
``ec2:CreateTags`` says. So a policy can declare *privileged* values (``role: [jumpbox]``,
``app: [admin]``) and *taggers* (principals allowed to set them). A workload moves into a
privileged value only when

* an allowed tagger's call (its CloudTrail ``userIdentity``) set exactly that value, or
* an audited admin binding granted it (``Workload.label_grants``).

Until then the move is *held*: the workload keeps the labels it had (``Workload.held_labels``),
or, new and with nothing to keep, gets none (the policy's ``unlabeled_mode``). A held move by a
named principal who is not a tagger is a *finding* (metric, audit record, one JSON event in the
log; optionally the workload is quarantined). A tag change that names no principal (the
``aws.tag`` "Tag Change on Resource" event, a state change, reconcile) can never approve a move:
it is held without a finding, and the call's own CloudTrail event decides. A call whose event does
not say what it set (Azure's, ``TagChange.unknown_content``) approves nothing and ends a grant
made before it.

Pure functions over :mod:`ringfence.labels` and :mod:`ringfence.model`; the cloud glue calls them.
"""

from __future__ import annotations

import fnmatch
import time
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict

from ringfence.labels import LabelMapper
from ringfence.model import Workload

FINDING_SCHEMA = "ringfence.finding/v1"
UNATTRIBUTED = "unattributed"
NOT_A_TAGGER = "principal is not an allowed tagger"
NOT_SET_BY_CALL = "the call did not set this value"


@dataclass(frozen=True, slots=True)
class TagChange:
    """What an event says about the change: who made it, which tags it set (None: not said) and
    when (the call's own time, unix seconds; None: not said, taken as the observation's)."""

    principal: str | None = None
    requested: Mapping[str, str] | None = None
    time: float | None = None
    unknown_content: bool = False
    """The event names a call that may have set any of the workload's tags but does not say which
    (an Azure write of the VM): the call approves nothing and ends an approval (a grant, a value
    kept) made before it (:func:`govern_writes`). ``requested`` is then not what the call set but
    the held values its caller is to answer for (the cloud glue decides which)."""
    called_at: float | None = None
    """A call of unknown content: its own time (the event's), which decides the approvals it ends
    where ``time`` is left to the observation's (it places the writes ``requested`` names). None:
    ``time`` decides both."""
    event: str | None = None
    """The id of the event that reported the call (None: not kept). A write or an end stored with
    it is this call's own when the event is delivered again: decided and reported again, the same
    (a report that failed part-way is made whole; each record once per event)."""
    stored_as: str | None = None
    """Another id a write or an end of this call's may have been stored under by an earlier
    delivery (an Azure event's bare id, stored before its key had a digest): matched as its own,
    never written. New writes carry :attr:`event`, so they do not extend how long that id matches."""


SKEW = 5.0
"""Seconds an attributed write may predate the last observation of another value and still be
the write that observation missed: CloudTrail's ``eventTime`` is truncated to the second, and
clocks and DescribeInstances lag a little. Between two attributed writes (one clock) there is none."""

APPROVED_BY = frozenset({"tagger", "grant", "kept"})


class LabelWrite(BaseModel):
    """The last write of a governed dimension that governance knows of: when, which value, by whom.

    ``by``: ``tagger`` (an allowed tagger's call), ``other`` (anyone else's call), ``grant`` (an
    admin binding; it stands while the dimension stays at its value), ``unseen`` (an observation saw
    the value change and no call has said who changed it yet; ``at`` is the last observation of the
    value before), ``kept`` (in force before writes were recorded: an upgrade)."""

    model_config = ConfigDict(frozen=True, extra="ignore")

    at: float
    value: str | None
    by: Literal["tagger", "other", "grant", "unseen", "kept"]
    seen: float | None = None
    """``unseen`` only: when an observation first saw the value (None: not recorded). A cloud whose
    events name a caller but not what the call set (Azure's) names a caller for a held move only
    for a call made by then (:mod:`ringfence.clouds.azure.ingest`)."""
    ended: LabelWrite | None = None
    """``other`` only: this write is a call of unknown content's that ended this approving write
    (a grant, a value kept, a tagger's). An earlier such call processed later (its event came
    later) takes the end over: the calls' times decide who ended it, not the order of events."""
    event: str | None = None
    """A call's write or end: the event of that call (:attr:`TagChange.event`;
    None: not kept, as in records stored before it was). That event delivered again finds the
    write its own call's and decides (and reports) the same again."""

    @property
    def approves(self) -> bool:
        return self.by in APPROVED_BY


@dataclass(frozen=True, slots=True)
class Move:
    """A workload's tags ask for a privileged value it does not hold."""

    dimension: str
    old: str | None
    new: str


@dataclass(slots=True)
class Verdict:
    workload: Workload
    """the observed workload with ``held_labels`` and ``label_grants`` decided"""
    labels: dict[str, str]
    """the labels in force"""
    moves: tuple[Move, ...] = ()
    """privileged moves the tags ask for"""
    approved: tuple[Move, ...] = ()
    """moves this change approved (an allowed tagger set them), also where its approval is stored
    already (its event delivered again: reported again, each record once per event)"""
    reason: str = ""
    """why a move is held ("" when nothing is)"""
    principal: str | None = None
    writes: dict[str, LabelWrite] | None = None
    """the governed dimensions' last known writes after this decision (None: not tracked)"""
    ended: dict[str, LabelWrite] = field(default_factory=dict)
    """approvals a call of unknown content ended, or whose end it took over as the earlier call
    (dimension → the end, whose ``ended`` is the approving write): audited whoever made the call"""

    @property
    def held(self) -> bool:
        return self.workload.held_labels is not None

    @property
    def finding(self) -> bool:
        """A named principal who is not a tagger tried to move the workload into a privileged value."""
        return self.held and self.reason == NOT_A_TAGGER


def is_tagger(patterns: Iterable[str], principal: str | None) -> bool:
    """``principal`` matches one of the allow-list's patterns (``*`` matches any run of characters)."""
    return principal is not None and any(fnmatch.fnmatchcase(principal, p) for p in patterns)


class _Untracked:
    pass


UNTRACKED: Any = _Untracked()
"""``govern(writes=UNTRACKED)``: the caller keeps no record of writes (the rule by state alone)."""


def _held_reason(
    mapper: LabelMapper,
    principal: str | None,
    change: TagChange | None,
    held: Iterable[Move],
    ended: frozenset[str] = frozenset(),
) -> str:
    """Why ``held`` moves are held. A non-tagger answers for the moves their call made, where the
    event says what it set (CloudTrail's CreateTags, a GCP setLabels): a colleague's unrelated tag
    on a workload whose move is held names nobody. An event that says who only (a DeleteTags)
    still names its caller. A call of unknown content answers for the values the glue says it
    may have set (``requested``) and for those held again because it ended their grant
    (``ended``)."""
    if principal is None:
        return UNATTRIBUTED
    if is_tagger(mapper.config.taggers, principal):
        return NOT_SET_BY_CALL
    return NOT_A_TAGGER if answers_for(mapper, held, change, ended) else NOT_SET_BY_CALL


def answers_for(
    mapper: LabelMapper, moves: Iterable[Move], change: TagChange | None, ended: Iterable[str] = ()
) -> tuple[Move, ...]:
    """The ``moves`` a named non-tagger's call answers for (:func:`_held_reason`): those its request
    set, those held again because it ended their approval (``ended``), or all where its event says
    who only (no change, or no ``requested`` on a call of known content). What a finding reports
    and its records are derived from: never a move held from another call (a tagger's held move,
    another caller's), so the same event delivered again reports the same, whatever else is held."""
    moves = tuple(moves)
    if change is not None and change.unknown_content:
        gone = frozenset(ended)
        return tuple(m for m in moves if m.dimension in gone or _set_by_call(mapper, m, change))
    if change is None or change.requested is None:
        return moves
    return tuple(m for m in moves if _set_by_call(mapper, m, change))


def govern(
    mapper: LabelMapper,
    previous: Workload | None,
    current: Workload,
    change: TagChange | None = None,
    *,
    writes: Mapping[str, LabelWrite] | None = UNTRACKED,
    previous_at: float = 0.0,
    now: float | None = None,
) -> Verdict:
    """Decide the labels in force for ``current`` (a fresh observation) after ``previous`` (the
    stored workload, or None for a new one).

    ``writes``: the stored record's last known writes of the governed dimensions (None: none were
    recorded yet, an upgrade: what was in force is kept), observed last at ``previous_at``; the
    decision then follows :func:`govern_writes` (by the time of each write). Left out, the older
    rule by state alone (the call's request set the value that is live now; grants stand, even
    against a call of unknown content, which approves nothing)."""
    if writes is not UNTRACKED:
        return govern_writes(mapper, previous, current, change, writes=writes, previous_at=previous_at, now=now)
    # grants stand across observations (a fresh observation carries none); a binding adds to them
    grants = {**(previous.label_grants if previous is not None else {}), **current.label_grants}
    current = current.model_copy(update={"label_grants": grants, "held_labels": None})
    principal = change.principal if change is not None else None
    if not mapper.governed:
        return Verdict(current, mapper.resolve(current).labels, principal=principal)
    wanted = mapper.resolve_tags(current).labels
    before = mapper.resolve(previous).labels if previous is not None else {}
    moves = tuple(
        Move(dim, before.get(dim), value)
        for dim, value in sorted(wanted.items())
        if mapper.is_privileged(dim, value) and before.get(dim) != value and grants.get(dim) != value
    )
    if not moves:
        return Verdict(current, wanted, principal=principal)
    approved = tuple(m for m in moves if _set_by_tagger(mapper, m, change))
    if len(approved) == len(moves):
        return Verdict(current, wanted, moves, approved, principal=principal)
    reason = _held_reason(mapper, principal, change, moves)
    held = current.model_copy(update={"held_labels": dict(before)})
    return Verdict(held, mapper.resolve(held).labels, moves, (), reason, principal)


def govern_writes(
    mapper: LabelMapper,
    previous: Workload | None,
    current: Workload,
    change: TagChange | None = None,
    *,
    writes: Mapping[str, LabelWrite] | None,
    previous_at: float = 0.0,
    now: float | None = None,
) -> Verdict:
    """The rule by time: a privileged value is in force only while the *last* write of its
    dimension that governance knows of set exactly that value and was an allowed tagger's call or
    an admin grant that still stands.

    * An observation that sees a dimension's value change records an ``unseen`` write (after
      ``previous_at``, the last observation of the value before): nobody is known to have made it.
    * A call (``change``, with its time) that set a dimension's key is that dimension's last write
      unless a later write is known: an attributed write at or after it (one clock: CloudTrail's),
      or an observation of another value more than :data:`SKEW` seconds after it. A stale call (a
      late or redriven event) approves nothing and takes nothing back.
    * A grant (a value in ``current.label_grants`` not granted before; ``bind``) is a write at
      ``now``; it stands until a later write or an observation moves the dimension off its value
      (a write of the granted value by anyone keeps it).
    * A call whose content is unknown (``change.unknown_content``) made after an approval (a
      grant, a value kept, a tagger's) ends it on every governed dimension: the approval held for
      the tags as they stood when it was made, and the call may have moved them off and back
      between two observations. The call's time (``called_at``, else ``time``: the cloud's clock)
      counts as after the approval (ours) unless it is more than :data:`SKEW` seconds earlier:
      within that margin a write made before it and delivered late ends it too (fail closed).
      Such a call approves nothing; its caller answers for the values held again. Such a call
      made after the approval but before the call recorded as ending it (whose event was
      processed first) takes the end over, and its caller answers for it too.

    So a non-tagger's call setting a privileged value after an approval takes the approval back
    even when the stored value does not change, and a tagger's approval delayed past a revocation
    and someone else's re-escalation approves nothing."""
    t_now = time.time() if now is None else now
    before = mapper.resolve(previous).labels if previous is not None else {}
    if not mapper.governed:
        grants = {**(previous.label_grants if previous is not None else {}), **current.label_grants}
        current = current.model_copy(update={"label_grants": grants, "held_labels": None})
        principal = change.principal if change is not None else None
        return Verdict(current, mapper.resolve(current).labels, principal=principal, writes=dict(writes or {}))
    dims = [d for d in mapper.dimensions if mapper.privileged_values(d)]
    wanted = mapper.resolve_tags(current).labels
    known: dict[str, LabelWrite]
    if previous is None:
        known = {}
    elif writes is None:
        known = _carried(mapper, previous, previous_at)
    else:
        known = {d: w for d, w in writes.items() if d in dims}
        known.update(_newly_privileged(mapper, previous, known, previous_at))
    # grants a binding adds: writes by an administrator, now
    old_grants = previous.label_grants if previous is not None else {}
    for d, v in current.label_grants.items():
        w = known.get(d)
        if d in dims and (old_grants.get(d) != v or w is None or w.by != "grant" or w.value != v):
            known[d] = LabelWrite(at=max(t_now, w.at if w is not None else 0.0), value=v, by="grant")
    # what the observation saw change
    prior = mapper.resolve_tags(previous).labels if previous is not None else None
    for d in dims:
        seen = wanted.get(d)
        if prior is not None and prior.get(d) == seen:
            continue
        w = known.get(d)
        if w is not None and w.value == seen and (w.by == "grant" or (w.by != "unseen" and w.at >= previous_at)):
            continue  # a known write explains it (or a grant made for this value)
        if w is None and seen is None:
            continue
        known[d] = LabelWrite(
            at=previous_at if prior is not None else 0.0, value=seen, by="unseen", seen=current.observed_at or t_now
        )
    # what the call set, when
    principal = change.principal if change is not None else None
    # the call's time, never later than now: a message claiming a future time would outrank every real call
    said = change.time if change is not None else None
    t = min(said if said is not None else (current.observed_at or t_now), t_now + SKEW)
    # the dimensions whose stored write is exactly this call's: the call decided before (its event
    # delivered again), its approval stored already; reported again, as the report may have failed
    again: set[str] = set()
    if change is not None and change.principal is not None and change.requested is not None:
        tagger = is_tagger(mapper.config.taggers, change.principal) and not change.unknown_content
        by: Literal["tagger", "other"] = "tagger" if tagger else "other"
        for d in dims:
            r = _requested(mapper, d, change)
            if r is None:
                continue
            w = known.get(d)
            if w is not None and _own(w, change) and w.value == r and w.by == by and w.ended is None:
                again.add(d)  # this call's write, stored by an earlier delivery of its event: kept as it is
                continue
            if w is not None:
                if w.by == "unseen":
                    stale = t < w.at - SKEW
                else:
                    # the same second: a tagger's call never outranks another principal's (fail closed)
                    stale = t < w.at or (t == w.at and by == "tagger" and w.by != "tagger")
                if stale or (w.by == "grant" and w.value == r):
                    continue
            # at the call's own time (CloudTrail's second), even where it predates the observation
            # it follows (within SKEW): a later call in that second must not look older than it
            mine = LabelWrite(at=t, value=r, by=by, event=change.event)
            if w == mine:
                again.add(d)
            known[d] = mine
    # a call that may have set any tag ends the approvals made before it: recorded as its write
    # of what the observation shows (its caller answers for it once). Where a later call's event
    # ended one first, this earlier call takes the end over (its caller answers for it too)
    ended: dict[str, LabelWrite] = {}
    if change is not None and change.unknown_content:
        t_call = min(change.called_at, t_now + SKEW) if change.called_at is not None else t
        for d in dims:
            w = known.get(d)
            if w is None:
                continue
            if w.ended is not None and _own(w, change):
                # this call's end, stored by an earlier delivery of its event: reported again (its
                # report may have failed; each record is written once per event)
                end = w
            elif w.approves and t_call >= w.at - SKEW:
                end = LabelWrite(at=max(t_call, w.at), value=wanted.get(d), by="other", ended=w, event=change.event)
            elif w.ended is not None and w.ended.at - SKEW <= t_call and max(t_call, w.ended.at) < w.at:
                # strictly earlier than the end recorded (the same call again takes nothing over)
                end = w.model_copy(update={"at": max(t_call, w.ended.at), "event": change.event})
            else:
                continue
            known[d] = ended[d] = end

    def in_force(d: str, v: str) -> bool:
        w = known.get(d)
        return w is not None and w.value == v and w.approves

    grants = {d: w.value for d, w in known.items() if w.by == "grant" and w.value is not None}
    current = current.model_copy(update={"label_grants": grants, "held_labels": None})
    held_moves: list[Move] = []
    approved: list[Move] = []
    for d, v in sorted(wanted.items()):
        if not mapper.is_privileged(d, v):
            continue
        if not in_force(d, v):
            held_moves.append(Move(d, before.get(d), v))
        elif known[d].by == "tagger" and (before.get(d) != v or d in again):
            approved.append(Move(d, before.get(d), v))
    if not held_moves:
        return Verdict(
            current, wanted, tuple(approved), tuple(approved), principal=principal, writes=known, ended=ended
        )
    moves = tuple(sorted(held_moves + approved, key=lambda m: m.dimension))
    reason = _held_reason(mapper, principal, change, held_moves, frozenset(ended))
    # the labels it had, less a privileged value no longer approved (an approval taken back)
    kept = {d: v for d, v in before.items() if not mapper.is_privileged(d, v) or in_force(d, v)}
    held = current.model_copy(update={"held_labels": kept})
    return Verdict(held, mapper.resolve(held).labels, moves, (), reason, principal, writes=known, ended=ended)


def _own(write: LabelWrite | None, change: TagChange) -> bool:
    """``write`` was stored for this call by an earlier delivery of its event."""
    if write is None or write.event is None:
        return False
    return write.event == change.event or write.event == change.stored_as


def _carried(mapper: LabelMapper, previous: Workload, previous_at: float) -> dict[str, LabelWrite]:
    """Writes for a record stored before they were recorded: a grant stands, a privileged value in
    force stays so (``kept``), a held move waits for its call (which may be older than the record)."""
    in_force = mapper.resolve(previous).labels
    tags = mapper.resolve_tags(previous).labels
    out: dict[str, LabelWrite] = {}
    for d in mapper.dimensions:
        if not mapper.privileged_values(d):
            continue
        v = tags.get(d)
        if d in previous.label_grants:
            out[d] = LabelWrite(at=previous_at, value=previous.label_grants[d], by="grant")
        elif mapper.is_privileged(d, v) and in_force.get(d) == v:
            out[d] = LabelWrite(at=previous_at, value=v, by="kept")
        elif mapper.is_privileged(d, v):
            out[d] = LabelWrite(at=0.0, value=v, by="unseen")
        elif v is not None:
            out[d] = LabelWrite(at=previous_at, value=v, by="unseen")
    return out


def _newly_privileged(
    mapper: LabelMapper, previous: Workload, stored: Mapping[str, LabelWrite], previous_at: float
) -> dict[str, LabelWrite]:
    """``kept`` writes for values in force in ``previous`` that were not privileged when it was
    decided (a policy version made them so, or turned governance on): a workload already holding a
    value when it becomes privileged keeps it. Decided from the *stored* writes, before this
    decision's observation and call (a non-tagger's call after ``previous_at`` still takes it back).

    Only a value in force (the stored labels, ``held_labels`` when held) that is also the one the
    tags set: a held move is never kept. And only where the stored writes do not already decide the
    dimension: none known, one of this value that does not approve it (it was not privileged then),
    or one of another value that the observation at ``previous_at`` overtook (older by more than
    :data:`SKEW`); a later write of another value (a call the observations have not caught up
    with) stays the last write."""
    in_force = mapper.resolve(previous).labels
    tags = mapper.resolve_tags(previous).labels
    out: dict[str, LabelWrite] = {}
    for d, v in in_force.items():
        if not mapper.is_privileged(d, v) or tags.get(d) != v:
            continue
        w = stored.get(d)
        if w is None or (w.value == v and not w.approves) or (w.value != v and w.at + SKEW < previous_at):
            out[d] = LabelWrite(at=previous_at, value=v, by="kept")
    return out


def _requested(mapper: LabelMapper, dim: str, change: TagChange) -> str | None:
    """The value the call's request set the dimension's key to (None: it set no key of it)."""
    for key in mapper.keys[dim]:
        raw = (change.requested or {}).get(key)
        if raw is not None:
            return mapper.canonical_value(dim, raw)
    return None


def _set_by_tagger(mapper: LabelMapper, move: Move, change: TagChange | None) -> bool:
    """An allowed tagger's call set the dimension's key to exactly this value (the event attests
    only to what its own request set: a later change by someone else is not approved by it)."""
    return (
        change is not None
        and not change.unknown_content
        and is_tagger(mapper.config.taggers, change.principal)
        and _set_by_call(mapper, move, change)
    )


def _set_by_call(mapper: LabelMapper, move: Move, change: TagChange) -> bool:
    """The call's request set the dimension's key to exactly this value."""
    if change.requested is None:
        return False
    for key in mapper.keys[move.dimension]:
        raw = change.requested.get(key)
        if raw is not None and mapper.canonical_value(move.dimension, raw) == move.new:
            return True
    return False


def bind(mapper: LabelMapper, workload: Workload, labels: Mapping[str, str]) -> Workload:
    """An admin binding: grant these privileged values (dimension → value) to the workload.

    The grant stands (a later move into it needs no tagger) until replaced; the caller audits it.
    Raises ValueError naming the dimension or value that cannot be granted.
    """
    grants = dict(workload.label_grants)
    for dim, raw in labels.items():
        if dim not in mapper.dimensions:
            raise ValueError(f"unknown label dimension {dim!r}")
        value = mapper.canonical_value(dim, raw)
        if not mapper.is_privileged(dim, value):
            raise ValueError(f"{dim}={value!r} is not a privileged value: it needs no binding")
        grants[dim] = value
    return workload.model_copy(update={"label_grants": grants})


@dataclass(frozen=True, slots=True)
class Finding:
    """A SIEM-ready record of a held move into a privileged value."""

    workload_id: str
    verdict: Verdict
    account: str | None = None
    region: str | None = None
    event_id: str = ""
    action: str = "held"  # held | quarantined
    time: float = 0.0
    extra: dict[str, Any] = field(default_factory=dict)

    def event(self) -> dict[str, Any]:
        v = self.verdict
        when = datetime.fromtimestamp(self.time, UTC) if self.time else datetime.now(UTC)
        return {
            "schema": FINDING_SCHEMA,
            "type": "privileged-label-change",
            "severity": "high" if v.finding else "info",
            "time": when.isoformat().replace("+00:00", "Z"),
            "workload_id": self.workload_id,
            "cloud": v.workload.cloud,
            "account": self.account or v.workload.account,
            "region": self.region or v.workload.region,
            "principal": v.principal,
            "reason": v.reason,
            "requested": {m.dimension: m.new for m in v.moves},
            "previous": {m.dimension: m.old for m in v.moves},
            "labels_in_force": dict(sorted(v.labels.items())),
            "action": self.action,
            "event_id": self.event_id,
            **self.extra,
        }


class NotGranted(LookupError):
    """A revocation names a dimension the workload holds no grant of (nothing to take back)."""


def unbind(
    mapper: LabelMapper,
    workload: Workload,
    dimensions: Iterable[str],
    *,
    writes: Mapping[str, LabelWrite] | None,
    previous_at: float = 0.0,
    now: float | None = None,
) -> Verdict:
    """An admin revocation: take back the workload's grants of these dimensions, all or none.

    Each revoked grant becomes a write of its value, now, by nobody approved (``other``): the
    value is in force only once a later write approves it again (an allowed tagger's call, a new
    binding), and no earlier approval comes back with it — a tagger's call older than the
    revocation (a late event) is stale against it. The labels are then decided as governance
    decides them after an approval is taken back (:func:`govern_writes`): a privileged value the
    tags still ask for is held and dropped from the labels in force (the dimension unset; a
    workload left with no labels gets ``unlabeled_mode``); a grant the tags no longer ask for
    changes nothing in force. ``writes``/``previous_at``: the stored record's (None: stored before
    writes were recorded, carried as :func:`govern` carries them). Raises ValueError (an unknown
    dimension) or :class:`NotGranted` before deciding anything."""
    t_now = time.time() if now is None else now
    dims = list(dict.fromkeys(dimensions))
    unknown = [d for d in dims if d not in mapper.dimensions]
    if unknown:
        raise ValueError(f"unknown label dimension {unknown[0]!r}")
    missing = [d for d in dims if d not in workload.label_grants]
    if missing:
        granted = ", ".join(f"{d}={v}" for d, v in sorted(workload.label_grants.items())) or "none"
        raise NotGranted(f"no grant of {', '.join(missing)} to take back (the workload's grants: {granted})")
    revoked = {d: workload.label_grants[d] for d in dims}
    known = dict(writes) if writes is not None else _carried(mapper, workload, previous_at)
    for d, v in revoked.items():
        w = known.get(d)
        known[d] = LabelWrite(at=max(t_now, w.at if w is not None else 0.0), value=v, by="other")
    # decided from the workload as if the revoked values had never been in force: a value in force
    # whose write does not approve it would otherwise be taken for one that became privileged
    # after it was decided, and kept (_newly_privileged)
    in_force = mapper.resolve(workload).labels
    without = {d: v for d, v in in_force.items() if revoked.get(d) != v}
    grants = {d: v for d, v in workload.label_grants.items() if d not in revoked}
    previous = workload.model_copy(update={"label_grants": grants, "held_labels": without})
    current = workload.model_copy(update={"label_grants": grants, "held_labels": None})
    return govern_writes(mapper, previous, current, writes=known, previous_at=previous_at, now=t_now)
