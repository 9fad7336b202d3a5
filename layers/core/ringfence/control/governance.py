"""Governed labels, whatever the cloud: every observation of an instance passes :func:`ringfence.governance.govern`
before it is stored, and held moves are reported (metric, audit record, SIEM-ready JSON log line,
optional quarantine). Admin bindings (:func:`bind_labels`) are audited grants of privileged values.
"""

from __future__ import annotations

import dataclasses
import functools
import json
import logging
import time
import uuid
from collections.abc import Callable, Mapping
from typing import Any, NamedTuple

from ringfence.audit import AuditRecord, derived_record_id, state_digest
from ringfence.control import credentials
from ringfence.control.fanout import in_parallel
from ringfence.control.wiring import BaseWiring, Metric, hand_on_stored, log, no_metric, queue_stored
from ringfence.governance import (
    UNATTRIBUTED,
    Finding,
    Move,
    NotGranted,
    TagChange,
    Verdict,
    answers_for,
    bind,
    govern,
    unbind,
)
from ringfence.labels import LabelMapper, any_account_taggers
from ringfence.model import Mode
from ringfence.siem import ocsf
from ringfence.store.base import (
    OBSERVATIONS_OTHER_ACCOUNT,
    AuditRecordExists,
    ConflictError,
    GovernanceMoved,
    InventoryRecord,
    OperatorChange,
    OtherAccount,
    check_registration_as_read,
    concerns_compute,
    other_account,
    registration_as_read,
    releases_addresses,
)

findings_log = logging.getLogger("ringfence.findings")
"""One JSON document per finding (schema ``ringfence.finding/v1``): subscribe the SIEM to it."""

GOVERNANCE_PRINCIPAL = "ringfence:governance"
BIND_ATTEMPTS = 3  # a binding re-read and re-applied when an observation landed in between
GOVERN_ATTEMPTS = 5  # an observation decided again when another decision landed in between
# a finding counted (PrivilegedLabelFindings) is not counted again for this long: longer than any
# redelivery of its event (SQS keeps a message 14 days at most, Event Grid and Pub/Sub retry less)
COUNTED_TTL = 30 * 24 * 3600


def _governing_mapper(w: BaseWiring) -> LabelMapper | None:
    """The active policy's labels, read now or for this batch (:meth:`BaseWiring.governing_policy`):
    not ``w.mapper()``, whose cache (for the hygiene view) could still say "no policy" — or an
    older one — for its TTL after a provision, and a move observed then would go ungoverned."""
    active = w.governing_policy()
    if active is None:
        return None
    _warn_any_account(tuple(active[1].labels.config.taggers))
    return active[1].labels


@functools.lru_cache(maxsize=16)
def _warn_any_account(taggers: tuple[str, ...]) -> None:
    """Once per process and allow-list: a tagger pattern whose account is a wildcard."""
    wide = any_account_taggers(taggers)
    if wide:
        log.warning(
            "labels.taggers %s match a role of that name in any account: a member account's administrator "
            "who creates it may approve privileged labels; pin the account id",
            ", ".join(wide),
        )


class Stored(NamedTuple):
    """One observation as :func:`store_governed` decided and wrote it."""

    record: InventoryRecord
    """as decided (held labels, grants, labels in force) and written, unless a newer one was stored"""
    written: bool
    """the store's answer (:meth:`Store.observe`): the cloud view changed"""
    governed: bool
    """the decision changed what is in force without the tags changing (an approval arriving after
    the tag change it approves, a grant, a hold lifted), or quarantined the workload"""
    replaced: InventoryRecord | None
    """the stored record it was last decided from, and written over when ``written``: the caller's
    read, or the record read again after another write landed in between (a tombstone is written
    whatever is stored). What a caller compares ``record`` with (:func:`~ringfence.store.base.concerns_compute`),
    never its own earlier read: a write back over another ingest's newer record would equal that
    read, and compute would keep what that record gave"""


def store_governed(
    w: BaseWiring,
    recs: list[InventoryRecord],
    stored: Mapping[str, InventoryRecord],
    change: TagChange | None = None,
    *,
    event_id: str = "",
    metric: Metric = no_metric,
    release: frozenset[str] = frozenset(),
    parallel: bool = False,
    fresh: bool = False,
) -> list[Stored]:
    """Decide each fresh observation's held labels and grants against its stored record (``stored``,
    as the caller read it) and write it (``release``: ids whose stored ``terminating`` to lift;
    ``parallel``: the writes side by side; ``fresh``: ``stored`` may be old, e.g. a reconcile
    pass's snapshot, so the records are read again just before deciding). Each write is
    conditional on the stored record being exactly the one decided from; where a binding, an
    approval or another observation lands between that read and the write
    (:class:`GovernanceMoved`), the record is read again and decided again, so no decision is
    lost. An attributed call's write (or a call of unknown content's, which may end a grant) that
    comes with an observation older than the stored one is decided again on top of the stored
    one (:func:`_on_newer`), not dropped with it. Held moves are reported once, for the decision
    that was stored. A record stored under another account than its observation's is not written
    (:class:`~ringfence.store.base.OtherAccount`): logged, counted (``ObservationsOtherAccount``),
    answered neither written nor governed, so nothing retires the stored workload's token. Raises
    ConflictError when decisions kept landing in between."""
    mapper = _governing_mapper(w)
    if fresh:
        # decided from the records as stored now, never from an old snapshot: one decided from a
        # record another writer has since replaced would put back what that writer took away
        again = w.store.get_many([r.id for r in recs])
        base: dict[str, InventoryRecord | None] = {r.id: again.get(r.id) for r in recs}
    else:
        base = {r.id: stored.get(r.id) for r in recs}
    done: dict[str, tuple[InventoryRecord, Verdict | None, bool]] = {}
    refused: set[str] = set()  # ids stored under another account (Store.observe: OtherAccount)
    # a call's write (what an attributed call set, or a call of unknown content ending a grant)
    # must not be dropped with an observation older than the stored one
    attributed = change is not None and (
        change.unknown_content or (change.principal is not None and change.requested is not None)
    )

    def write(item: tuple[InventoryRecord, Verdict | None]) -> bool | None:
        rec = item[0]
        try:
            written = w.store.observe(rec, previous=base[rec.id], release_terminating=rec.id in release)
        except GovernanceMoved:
            return None
        except OtherAccount as exc:
            # an event of one account naming another's instance: that workload is not the one seen
            log.warning("event %s: %s; not written", event_id or "-", exc)
            metric(OBSERVATIONS_OTHER_ACCOUNT, 1)
            refused.add(rec.id)
            return False
        if not written and attributed and rec.state != "terminated":
            # a newer observation was stored meanwhile: the call's write is recorded on top of it,
            # not dropped with this older observation (a take-back or an approval would be lost)
            now = w.store.get(rec.id)
            if now is not None and now.observed_at > rec.observed_at:
                return None
        return written

    pending = recs
    try:
        for _ in range(GOVERN_ATTEMPTS):
            pending = [_on_newer(raw, base[raw.id]) if attributed else raw for raw in pending]
            decided = [_decide(mapper, raw, base[raw.id], change) for raw in pending]
            results = in_parallel(write, decided) if parallel else [write(d) for d in decided]
            retry: list[InventoryRecord] = []
            for raw, (rec, verdict), written in zip(pending, decided, results, strict=True):
                if written is None:
                    retry.append(raw)
                    base[raw.id] = w.store.get(raw.id)
                else:
                    done[raw.id] = (rec, verdict, written)
            if not retry:
                break
            pending = retry
        else:
            raise ConflictError(
                f"{', '.join(r.id for r in pending)}: governance changed under {GOVERN_ATTEMPTS} writes"
            )
    except BaseException:
        # one write failed (throttled) after others landed: the caller never learns which, and
        # the redelivery or the next pass finds them stored and hands nothing on. Every one that
        # may have been written is handed on (one too many is harmless)
        maybe = [r.id for r in recs if r.id not in refused]
        gave_back = [r.id for r in recs if releases_addresses(base.get(r.id), r)]
        hand_on_stored(w, maybe, f"event {event_id or '-'}: a write failed", metric, urgent=gave_back)
        raise
    out: list[Stored] = []
    try:
        for raw in recs:
            rec, verdict, written = done[raw.id]
            governed = False
            if verdict is not None and mapper is not None and raw.id not in refused:
                old = base[raw.id]
                previous = old.workload if old is not None and old.state != "terminated" else None
                changed = previous is not None and previous.held_labels != verdict.workload.held_labels
                quarantine = mapper.config.on_privileged_change == "quarantine"
                governed = _report(w, rec, verdict, event_id, metric, quarantine, answers(mapper, verdict, change))
                governed = governed or changed
            out.append(Stored(rec, written, governed, base[raw.id]))
    except BaseException:
        # a report (an audit write, a quarantine) failed after the writes: the caller never learns
        # what was stored, and the redelivery finds it stored and hands nothing on. Every record
        # written is handed on, also where only the decision changed (an approval: the store
        # answers "not written" when the cloud view is the same)
        owed = [i for i in done if i not in refused]
        gave_back = [i for i, (r, _, written) in done.items() if written and releases_addresses(base[i], r)]
        hand_on_stored(w, owed, f"event {event_id or '-'}: a report failed", metric, urgent=gave_back)
        raise
    return out


def store_deletable(
    w: BaseWiring,
    observed: list[InventoryRecord],
    stored: Mapping[str, InventoryRecord],
    change: TagChange | None,
    *,
    event_id: str,
    metric: Metric,
    gave_back: set[str] | None,
    what: str,
    gone: str,
) -> set[str]:
    """:func:`store_governed` for a cloud whose records a deletion tombstones (Azure, GCP); the
    ids that changed in what compute reads (:func:`concerns_compute`: a tag outside the labels'
    prefix, which any tag writer may flip as often as they like, is stored and not handed on).
    ``gave_back`` gets the ids whose write gave their addresses back (deleted), for the priority
    lane. A deleted workload's token is retired (``gone``: the audit reason), also where it was
    stored deleted already: a retire that failed after the write is redone by the redelivery,
    which stores nothing (revoking is idempotent). If a step after the writes fails, what was
    stored is handed on (``what`` names the event in the log) before the failure goes up."""
    results = store_governed(w, observed, stored, change, event_id=event_id, metric=metric)
    released = {r.record.id for r in results if r.written and releases_addresses(r.replaced, r.record)}
    if gave_back is not None:
        gave_back |= released
    changed: set[str] = set()
    prefix: list[str | None] = []  # the governing policy's key prefix, read once if needed
    try:
        for rec, written, governed, replaced in results:
            if written and not governed and not prefix:
                active = w.governing_policy()
                prefix.append(active[1].labels.key_prefix if active is not None else None)
            if governed or (written and concerns_compute(replaced, rec, prefix[0])):
                changed.add(rec.id)
            left_before = replaced is not None and replaced.state == "terminated"
            if rec.state == "terminated" and left_before:
                # a deletion observed again (its redelivery) is computed again: the first
                # delivery's hand-off may have failed too, and a terminated record is cheap
                changed.add(rec.id)
            if rec.state == "terminated" and (written or governed or left_before):
                credentials.retire(w, rec.id, gone)
    except BaseException:
        # what was stored is handed on: the redelivery finds it stored and would not
        hand_on_stored(w, [r.record.id for r in results], what, metric, urgent=released)
        raise
    return changed


def rewrite_governed(
    w: BaseWiring, rec: InventoryRecord, change: Callable[[InventoryRecord], InventoryRecord | None]
) -> bool:
    """Write ``change(rec)`` (``rec``: the record as the caller read it). Where another decision
    lands in between (:class:`GovernanceMoved`), the record is read again and changed again, so
    that decision is kept; ``change`` returning None (the record is no longer one to change) or
    the record gone ends it with nothing written. What :meth:`Store.observe` returns; raises
    ConflictError when decisions kept landing in between. One record's write, for the changes
    that decide nothing themselves (a terminate): :func:`store_governed` decides, in batches."""
    current: InventoryRecord | None = rec
    for _ in range(GOVERN_ATTEMPTS):
        new = change(current) if current is not None else None
        if new is None:
            return False
        try:
            return w.store.observe(new)  # the store reads what it decides itself: no stale `previous`
        except GovernanceMoved:
            current = w.store.get(rec.id)
    raise ConflictError(f"{rec.id}: governance changed under {GOVERN_ATTEMPTS} writes")


def _on_newer(raw: InventoryRecord, old: InventoryRecord | None) -> InventoryRecord:
    """``raw`` (an observation made for an attributed call), or, when a newer observation is stored,
    that one observed again: the call's write is decided on top of it (what the cloud says now)."""
    if old is None or old.observed_at <= raw.observed_at or old.state == "terminated" or raw.state == "terminated":
        return raw
    if other_account(old, raw):
        return raw  # never another account's workload in its place: the store refuses this one
    seen = old.workload.model_copy(update={"held_labels": None, "label_grants": {}})
    return old.model_copy(update={"workload": seen})


def _decide(
    mapper: LabelMapper | None, rec: InventoryRecord, old: InventoryRecord | None, change: TagChange | None
) -> tuple[InventoryRecord, Verdict | None]:
    """``rec`` (a fresh observation) with its held labels and grants decided against ``old`` (the
    stored record), and the verdict (None: a tombstone, or no policy to decide with)."""
    if rec.state == "terminated":
        return rec, None
    previous = old.workload if old is not None and old.state != "terminated" else None
    update: dict[str, object] = {"governed_rev": old.governed_rev if old is not None else 0}
    if mapper is None:
        # no active policy: keep whatever was decided until there is one to decide with
        if previous is not None:
            carried = {"held_labels": previous.held_labels, "label_grants": previous.label_grants}
            update["workload"] = rec.workload.model_copy(update=carried)
            update["label_writes"] = old.label_writes if old is not None else None
        return rec.model_copy(update=update), None
    verdict = govern(
        mapper,
        previous,
        rec.workload,
        change,
        writes=old.label_writes if old is not None else None,
        previous_at=old.observed_at if old is not None else 0.0,
    )
    res = mapper.resolve(verdict.workload)
    update |= {
        "workload": verdict.workload,
        "labels": res.labels,
        "problems": [p.message for p in res.problems],
        "label_writes": verdict.writes,
    }
    return rec.model_copy(update=update), verdict


def _operator_state(mode: Mode | None, quarantined: bool) -> str:
    # the same digest as the admin API's for a workload's operator state
    return state_digest({"mode": mode.value if mode else None, "quarantined": quarantined})


def _report_id(action: str, target: str, event_id: str, what: object) -> str:
    """The id of a report's audit record: one per event, workload and decision, so that the
    event's redelivery, which decides the same again, writes none twice (:func:`_audit_once`);
    a random one where no event names it."""
    if not event_id:
        return uuid.uuid4().hex
    key = json.dumps([action, target, event_id, what], sort_keys=True)
    return derived_record_id(f"report:{key}")


def _audit_once(w: BaseWiring, rec: AuditRecord, change: OperatorChange | None = None) -> bool:
    """``rec`` written (with ``change``, in one transaction), unless an earlier delivery of its
    event wrote it (and made the change) already: False then."""
    try:
        if change is None:
            w.audit(rec)
        else:
            w.audit_with(rec, change)
    except AuditRecordExists:
        log.info("%s of %s: recorded by an earlier delivery of the event already", rec.action, rec.target)
        return False
    return True


def _claim_count(w: BaseWiring, held_id: str, wrote: bool) -> bool:
    """Whether this delivery counts the finding ``held_id`` (its ``counted#`` claim). A claim that
    cannot be written (throttled, refused) never blocks the quarantine or the finding's log line,
    which a metric must not: logged, and counted by the delivery that wrote the record (at most
    once still; one whose write raised though it landed goes uncounted)."""
    try:
        return w.store.claim_once(f"counted#{held_id}", COUNTED_TTL)
    except Exception as exc:
        log.warning(
            "finding %s: its counted claim failed (%s): counted only if this delivery recorded it", held_id, exc
        )
        return wrote


def _moves(held: dict[str, Any], now: tuple[Move, ...]) -> tuple[Move, ...]:
    """The moves a ``label.held`` record's detail reports (``requested``; each move's old value as
    decided now, else the label then in force)."""
    requested: dict[str, str] = held.get("requested") or {}
    then: dict[str, str] = held.get("labels_in_force") or {}
    decided = {(m.dimension, m.new): m for m in now}
    return tuple(decided.get((d, v)) or Move(d, then.get(d), v) for d, v in sorted(requested.items()))


def answers(mapper: LabelMapper, verdict: Verdict, change: TagChange | None) -> tuple[Move, ...]:
    """The held moves this decision's call answers for (:func:`~ringfence.governance.answers_for`):
    what its finding reports, never a move held from another call."""
    held = tuple(m for m in verdict.moves if verdict.labels.get(m.dimension) != m.new)
    return answers_for(mapper, held, change, verdict.ended)


def _report(
    w: BaseWiring,
    rec: InventoryRecord,
    verdict: Verdict,
    event_id: str,
    metric: Metric,
    quarantine: bool,
    mine: tuple[Move, ...],
) -> bool:
    """Metrics, audit and the finding's log line; True if the workload was quarantined. ``mine``:
    the held moves this event's call answers for (:func:`answers`).

    A report that failed part-way is made again by the event's redelivery, which decides the same
    (a held move held again; an approval stored already is the call's own write again,
    :attr:`Verdict.approved`): each record is written once per event (:func:`_report_id`) and the
    quarantine with its record, in one transaction, so neither is ever in force without the other.
    A finding reports only what this event decided (``mine``); its record and its quarantine are
    one per event and workload, whatever is held or granted by a redelivery, so that redelivery
    names its caller for no other move and an operator's release stands against it; one completing
    a report reports what the finding's record says; its log line and SIEM finding are sent by the
    delivery that wrote a record only."""
    if verdict.ended:
        # a call of unknown content ended an approval (or is the earlier call that did): audited
        # whoever made it, an allowed tagger's or an unnamed call's too, which raise no finding
        metric("PrivilegedLabelApprovalsEnded", len(verdict.ended))
        ended_at = {d: e.at for d, e in sorted(verdict.ended.items())}
        _audit_once(
            w,
            AuditRecord(
                id=_report_id("label.grant.ended", rec.id, event_id, ended_at),
                principal=verdict.principal or "unknown",
                action="label.grant.ended",
                target=rec.id,
                detail={
                    "ended": {
                        d: {"value": e.ended.value, "approval": e.ended.by, "approved_at": e.ended.at}
                        for d, e in sorted(verdict.ended.items())
                        if e.ended is not None
                    },
                    "end_at": ended_at,
                    "event_id": event_id,
                },
                reason="a write of the workload whose event does not say what it set, made after the approval",
            ),
        )
    if verdict.approved:
        metric("PrivilegedLabelApproved", len(verdict.approved))
        approved = {m.dimension: m.new for m in verdict.approved}
        _audit_once(
            w,
            AuditRecord(
                id=_report_id("label.approve", rec.id, event_id, approved),
                principal=verdict.principal or "unknown",
                action="label.approve",
                target=rec.id,
                detail={"labels": approved, "event_id": event_id},
                reason="set by an allowed tagger",
            ),
        )
    if not verdict.held or not verdict.moves:
        return False
    metric("PrivilegedLabelHeld", 1)
    if not verdict.finding or not mine:
        # no named principal to blame (or an allowed tagger's call that set something else): the
        # call's own CloudTrail event, when it arrives, decides and raises the finding
        log.info(
            "%s: move into %s held (%s)",
            rec.id,
            ", ".join(f"{m.dimension}={m.new}" for m in verdict.moves),
            verdict.reason or UNATTRIBUTED,
        )
        return False
    # one finding per event and workload, like its quarantine: what the call answers for (a who-only
    # call's, every move held now) changes with what is held or granted since, so a redelivery
    # deciding afresh must not write (and log) another
    requested = {m.dimension: m.new for m in mine}
    held_id = _report_id("label.held", rec.id, event_id, None)
    wrote = _audit_once(
        w,
        AuditRecord(
            id=held_id,
            principal=verdict.principal or "unknown",
            action="label.held",
            target=rec.id,
            detail={"requested": requested, "labels_in_force": verdict.labels, "event_id": event_id},
            reason=verdict.reason,
        ),
    )
    # counted once per finding, not again on each redelivery: by the first delivery to find its
    # record written, by itself or by an earlier one whose write raised though it landed (an
    # answer lost), which counted nothing; a store claim marks it counted
    if _claim_count(w, held_id, wrote):
        metric("PrivilegedLabelFindings", 1)
    quarantined = quarantine and _audit_once(
        w,
        # with its record, once per event and workload whatever is held by then: a redelivery
        # after an operator's release since does not quarantine again
        AuditRecord(
            id=_report_id("workload.quarantine", rec.id, event_id, None),
            principal=GOVERNANCE_PRINCIPAL,
            action="workload.quarantine",
            target=rec.id,
            detail={"quarantined": True, "event_id": event_id},
            reason=f"unapproved move into a privileged label value by {verdict.principal}",
            before=_operator_state(rec.op_mode, rec.op_quarantined),
            after=_operator_state(rec.op_mode, True),
        ),
        OperatorChange(rec.id, quarantined=True),
    )
    if not wrote and not quarantined:
        # both recorded by an earlier delivery of this event, which logged the finding: a released
        # workload is not reported quarantined again on every redelivery
        return quarantine
    if not wrote:
        # completing a report that failed after its finding's record: the finding says what that
        # record says, not what the event answers for now
        earlier = w.store.audit_record(held_id)
        if earlier is not None:
            mine = _moves(earlier.detail, verdict.moves)
    verdict = dataclasses.replace(verdict, moves=mine)
    finding = Finding(
        rec.id,
        verdict,
        account=rec.workload.account,
        region=rec.workload.region,
        event_id=event_id,
        action="quarantined" if quarantine else "held",
        time=rec.observed_at,
    )
    event = finding.event()
    findings_log.warning(json.dumps(event, sort_keys=True))
    if w.siem is not None:
        w.siem.finding(
            ocsf.detection_finding(
                f"{event['type']}:{rec.id}:{event_id}",
                title="Unapproved move into a privileged label value",
                time=finding.time or time.time(),
                severity_id=ocsf.HIGH,
                resource=rec.id,
                analytic=event["type"],
                message=f"{rec.id}: {verdict.principal} moved it into "
                + ", ".join(f"{m.dimension}={m.new}" for m in mine)
                + f" ({event['action']})",
                detail=event,
            )
        )
    return quarantine


class Binding(NamedTuple):
    """What :func:`bind_labels` wrote: the workload's record and the binding's audit record id."""

    record: InventoryRecord
    audit_id: str


def _privileged_hint(mapper: LabelMapper) -> str:
    values = "; ".join(
        f"{dim}: {', '.join(sorted(mapper.privileged_values(dim)))}"
        for dim in mapper.dimensions
        if mapper.privileged_values(dim)
    )
    return f"the policy's privileged values: {values}" if values else "the policy declares no privileged values"


def bind_labels(w: BaseWiring, workload_id: str, labels: dict[str, str], principal: str, reason: str) -> Binding:
    """An audited admin binding: grant privileged label values to one workload, lift a hold they
    clear, and queue the change for compute. Raises KeyError (an unknown or terminated workload)
    or ValueError (no active policy, a blank reason, a dimension or value that cannot be granted)
    before changing anything, and ConflictError when newer observations kept landing in between
    (nothing is answered as bound then, and its record is followed by ``label.bind.failed``).
    The record is written before the binding: a failed audit write binds nothing. A binding
    stored whose compute message fails raises :class:`~ringfence.control.wiring.NotQueued`
    (binding again queues it)."""

    def decide(mapper: LabelMapper, old: InventoryRecord) -> tuple[InventoryRecord, dict[str, object]]:
        try:
            granted = bind(mapper, old.workload, labels)
        except ValueError as exc:
            raise ValueError(f"{exc} ({_privileged_hint(mapper)})") from None
        # the grant is a write of each dimension by an administrator, now: it stands until the
        # dimension moves off the value (a later write or observation of another value)
        verdict = govern(
            mapper,
            old.workload,
            granted.model_copy(update={"held_labels": None}),
            writes=old.label_writes,
            previous_at=old.observed_at,
        )
        rec = _decided(mapper, old, verdict)
        return rec, {"labels": dict(verdict.workload.label_grants), "in_force": rec.labels, **_approved_with(verdict)}

    def stands(now: InventoryRecord, detail: dict[str, object]) -> bool:
        grants = detail["labels"]
        assert isinstance(grants, dict)
        return all(now.workload.label_grants.get(d) == v for d, v in grants.items())

    rec, audit = _change_grants(w, workload_id, principal, reason, "label.bind", decide, stands)
    return Binding(rec, audit.id)


class Revocation(NamedTuple):
    """What :func:`unbind_labels` wrote: the workload's record, the audit record id, the grants taken back."""

    record: InventoryRecord
    audit_id: str
    revoked: dict[str, str]


def unbind_labels(w: BaseWiring, workload_id: str, dimensions: list[str], principal: str, reason: str) -> Revocation:
    """An audited admin revocation: take back the workload's grants of these dimensions (all or
    none; :func:`ringfence.governance.unbind`) and queue the change for compute, so its bundle and
    its peers' sets lose what the grant gave. Raises KeyError (an unknown or terminated workload),
    ValueError (no active policy, a blank reason, an unknown dimension) or
    :class:`~ringfence.governance.NotGranted` (a dimension with no grant) before changing
    anything, and ConflictError as :func:`bind_labels` does (``label.unbind.failed``). Audited
    as ``label.unbind`` before it is written: a failed audit write revokes nothing. A revocation
    stored whose compute message fails raises :class:`~ringfence.control.wiring.NotQueued`;
    NotGranted queues compute all the same, so the same request again (its grants gone) gets
    the revocation enforced."""

    def decide(mapper: LabelMapper, old: InventoryRecord) -> tuple[InventoryRecord, dict[str, object]]:
        revoked = {d: old.workload.label_grants[d] for d in dimensions if d in old.workload.label_grants}
        verdict = unbind(mapper, old.workload, dimensions, writes=old.label_writes, previous_at=old.observed_at)
        rec = _decided(mapper, old, verdict)
        detail = {"revoked": revoked, "labels": dict(verdict.workload.label_grants), "in_force": rec.labels}
        return rec, {**detail, **_approved_with(verdict)}

    def stands(now: InventoryRecord, detail: dict[str, object]) -> bool:
        revoked = detail["revoked"]
        assert isinstance(revoked, dict)
        return all(now.workload.label_grants.get(d) != v for d, v in revoked.items())

    try:
        rec, audit = _change_grants(w, workload_id, principal, reason, "label.unbind", decide, stands)
    except NotGranted:
        # the grant may be gone by this request's first try, stored before its compute message
        # failed: a warm compute still holds the record with the grant, so the retry must queue
        # it (idempotent: compute takes the record as stored), or the revoked box stays admitted
        queue_stored(w, [workload_id], "no such grant to take back", workload_id, None, urgent=True)
        raise
    return Revocation(rec, audit.id, dict(audit.detail["revoked"]))


def _approved_with(verdict: Verdict) -> dict[str, object]:
    """The privileged values an allowed tagger's call set that come in force with this change (a
    tagger's write of one dimension while another was held is stored but not in force, nor
    audited as approved, until the hold is lifted): ``{"approved": {dimension: {"value",
    "approved_at", "event_id" where kept}}}`` for the change's record, so every privileged value
    in force is explained by a record."""
    if not verdict.approved:
        return {}
    writes = verdict.writes or {}
    approved: dict[str, object] = {}
    for m in sorted(verdict.approved, key=lambda m: m.dimension):
        w = writes.get(m.dimension)
        said: dict[str, object] = {"value": m.new}
        if w is not None:
            said["approved_at"] = w.at  # the call's time: its CloudTrail record / audit log entry
            if w.event is not None:
                said["event_id"] = w.event
        approved[m.dimension] = said
    return {"approved": approved}


def _decided(mapper: LabelMapper, old: InventoryRecord, verdict: Verdict) -> InventoryRecord:
    res = mapper.resolve(verdict.workload)
    return old.model_copy(
        update={
            "workload": verdict.workload,
            "labels": res.labels,
            "problems": [p.message for p in res.problems],
            "label_writes": verdict.writes,
        }
    )


def _change_grants(
    w: BaseWiring,
    workload_id: str,
    principal: str,
    reason: str,
    action: str,
    decide: Callable[[LabelMapper, InventoryRecord], tuple[InventoryRecord, dict[str, object]]],
    stands: Callable[[InventoryRecord, dict[str, object]], bool],
) -> tuple[InventoryRecord, AuditRecord]:
    """An administrator's change of one workload's grants (``action``: ``label.bind`` or
    ``label.unbind``), audited first and answered only once stored. ``decide``: the record to
    write over the stored one and the audit detail (raises to refuse); ``stands``: that detail's
    change is in force in a stored record."""
    mapper = _governing_mapper(w)
    if mapper is None:
        raise ValueError("no active policy: nothing declares privileged values (provision a policy version first)")
    if not reason.strip():
        raise ValueError(f"a {'binding' if action == 'label.bind' else 'revocation'} needs a reason (it is audited)")
    # the record is written before the change is (as a provision's): a grant is never in force, or
    # taken back, without its record. An attempt whose write is then refused keeps its record unless
    # the next attempt would record something else; a record whose change did not happen
    # (superseded, refused, failed) is followed by <action>.failed naming it and why
    audit: AuditRecord | None = None
    stored = False  # an attempt's write returned: the change may be in force although a later step raised

    def failed(why: str, outcome: str = "failed") -> None:
        if audit is None:
            return
        try:
            w.audit(
                AuditRecord(
                    principal=principal,
                    action=f"{action}.{outcome}",
                    target=workload_id,
                    detail={"audit_id": audit.id, "why": why},
                    reason=reason,
                )
            )
        except Exception:
            log.exception(
                "%s of %s (audit record %s) failed; that could not be recorded", action, workload_id, audit.id
            )

    first: InventoryRecord | None = None  # the workload as this request first read it
    try:
        for _ in range(BIND_ATTEMPTS):
            old = w.store.get(workload_id)
            if first is not None and registration_as_read(first) is not None:
                # an on-premise id is decided again only over the registration first read (its
                # version, state and observation: check_registration_as_read): a deregistration
                # moves the version (never back) and a registration in place (a new box under the
                # name) the observation, so another host registered under the id meanwhile never
                # takes a grant meant for this one (nor loses one); an administrator's registration
                # or binding landing in between is refused alike, as nothing stored tells it from
                # another host's. A cloud id is never reused: decided again over whatever landed
                # (a tag write, an approval)
                check_registration_as_read(workload_id, old, first)
            if old is None or old.state == "terminated":
                raise KeyError(workload_id)
            first = first or old
            rec, detail = decide(mapper, old)
            if audit is None or audit.detail != detail:
                nxt = AuditRecord(principal=principal, action=action, target=workload_id, detail=detail, reason=reason)
                w.audit(nxt)  # fails: nothing (more) written, the call fails
                failed(f"changed meanwhile: done as recorded in {nxt.id}")
                audit = nxt
            # same observed_at: written unless a newer observation landed meanwhile; observe() cannot
            # tell that from "nothing changed", so the record is read back: a change is answered only
            # once it is stored. Another decision landing meanwhile (a binding, an approval) refuses
            # the write instead of being overwritten: decide again on top of it.
            try:
                w.store.observe(rec, previous=old)
            except GovernanceMoved:
                continue
            stored = True
            now = w.store.get(workload_id)
            if now is not None and stands(now, detail):
                rec = now
                break
        else:
            raise ConflictError(f"{workload_id} changed under {BIND_ATTEMPTS} attempts to change its grants: try again")
    except Exception as exc:
        why = f"{type(exc).__name__}: {exc}"
        if not stored:
            failed(why)
            raise
        # a write landed before the error: .failed only where the store shows the change is not in force
        try:
            now = w.store.get(workload_id)
            done = now is not None and audit is not None and stands(now, audit.detail)
        except Exception:
            failed(why, outcome="unconfirmed")
            raise
        if done:
            log.warning("%s of %s is in force although the call raised: %s", action, workload_id, why)
            w.enqueue_compute([workload_id], urgent=True)
        else:
            failed(why)
        raise
    assert audit is not None
    # urgent: an administrator's binding (a revocation shrinks access) is not queued behind a storm
    queue_stored(w, [workload_id], "bound" if action == "label.bind" else "revoked", workload_id, audit.id, urgent=True)
    return rec, audit
