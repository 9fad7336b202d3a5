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
it is held without a finding, and the call's own CloudTrail event decides.

Pure functions over :mod:`ringfence.labels` and :mod:`ringfence.model`; the cloud glue calls them.
"""

from __future__ import annotations

import fnmatch
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any

from ringfence.labels import LabelMapper
from ringfence.model import Workload

FINDING_SCHEMA = "ringfence.finding/v1"
UNATTRIBUTED = "unattributed"
NOT_A_TAGGER = "principal is not an allowed tagger"
NOT_SET_BY_CALL = "the call did not set this value"


@dataclass(frozen=True, slots=True)
class TagChange:
    """What an event says about the change: who made it and which tags it set (None: not said)."""

    principal: str | None = None
    requested: Mapping[str, str] | None = None


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
    """moves this change approved (an allowed tagger set them)"""
    reason: str = ""
    """why a move is held ("" when nothing is)"""
    principal: str | None = None

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


def govern(
    mapper: LabelMapper, previous: Workload | None, current: Workload, change: TagChange | None = None
) -> Verdict:
    """Decide the labels in force for ``current`` (a fresh observation) after ``previous`` (the
    stored workload, or None for a new one)."""
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
    if principal is None:
        reason = UNATTRIBUTED
    elif not is_tagger(mapper.config.taggers, principal):
        # a non-tagger answers for the moves their call made, where the event says what it set
        # (CloudTrail's CreateTags, a GCP setLabels): a colleague's unrelated tag on a workload
        # whose move is held names nobody. An event that says who only (a DeleteTags, Azure's)
        # still names its caller.
        mine = change is None or change.requested is None or any(_set_by_call(mapper, m, change) for m in moves)
        reason = NOT_A_TAGGER if mine else NOT_SET_BY_CALL
    else:
        reason = NOT_SET_BY_CALL
    held = current.model_copy(update={"held_labels": dict(before)})
    return Verdict(held, mapper.resolve(held).labels, moves, (), reason, principal)


def _set_by_tagger(mapper: LabelMapper, move: Move, change: TagChange | None) -> bool:
    """An allowed tagger's call set the dimension's key to exactly this value (the event attests
    only to what its own request set: a later change by someone else is not approved by it)."""
    return (
        change is not None and is_tagger(mapper.config.taggers, change.principal) and _set_by_call(mapper, move, change)
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
