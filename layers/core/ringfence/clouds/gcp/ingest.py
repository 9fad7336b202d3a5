"""GCP ingest: authenticated audit-log events → the VM described again → governed inventory.

As on AWS, an event is a trigger: the VM is read live (by its numeric id, in the zone it is stored
in, and its effective secure tags) and the newest observation wins. What an entry says of the VM's
name or zone is only what whoever published it wrote: a VM is recorded deleted only when a lookup
by its id where it is stored finds none (:meth:`GcpIngest.observations`), or the full sync's
complete listing no longer has it. What an event adds is *who* made the change and what the
call set, which decide a move into a privileged label value (:mod:`ringfence.governance`, the
same as AWS): the principal is ``protoPayload.authenticationInfo.principalEmail``.

Long-running operations log a first entry (with the request) and a last one (done): the first is
remembered by operation id, the last acts. Where a privileged move on the VM makes who called
matter, the operation's first entry as Cloud Logging has it decides (the one remembered is only
what was pushed, and another function instance may have taken it); without one, the change is
unattributed: a privileged move is held, never approved.

A pushed entry is only as good as whoever published it: the push token proves the subscription, not
the message, and anyone who may publish to the topic can put any principal in it. So an entry that
would approve a move (an allowed tagger's call setting a privileged value) is read back from Cloud
Logging (:meth:`GcpIngest.confirm`) and the caller and request *as logged* decide; an entry that
cannot be confirmed approves nothing (the move is held) and is audited (``label.unconfirmed``).
Every other entry approves nothing anyway and is not read back. Deliveries are not ordered: a
tagger's entry approves only while Cloud Logging lists no later call on the VM that may have
undone its move (:meth:`GcpIngest._changed_since`), read in the same listing as the entry.
"""

from __future__ import annotations

import hashlib
import json
import logging
import threading
import time
from collections import OrderedDict
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from datetime import datetime, timedelta
from typing import Any

from google.api_core.exceptions import Forbidden, GoogleAPICallError, NotFound, RetryError, ServiceUnavailable

from ringfence.audit import AuditRecord
from ringfence.control import credentials
from ringfence.control.governance import GOVERNANCE_PRINCIPAL, store_deletable
from ringfence.control.wiring import (
    COMPUTE_NOT_QUEUED,
    BaseWiring,
    Metric,
    hand_on_gone_again,
    hand_on_stored,
    no_metric,
    owe_compute,
)
from ringfence.events import MalformedEvent
from ringfence.governance import TagChange, govern, is_tagger
from ringfence.labels import LabelMapper
from ringfence.store.base import InventoryRecord, releases_addresses

from .auditlog import Action, GcpEvent, log_entry, parse
from .config import GcpConfig
from .instances import DEFAULT_PREFIX, SOURCE_TAG, Instances, LabelSource, SecureTag, canonical_tags, now, tombstone
from .instances import to_record as instance_record
from .logread import WINDOW, AuditLogReader, activity_log_project
from .oidc import OidcVerifier, TokenError

log = logging.getLogger("ringfence.gcp")
PENDING_KEPT = 4096  # first entries remembered, waiting for their last
# an entry logged longer ago than this approves nothing, even when Cloud Logging has it: a genuine
# tagger's entry published again later (a replay) must not approve a move made since
CONFIRM_MAX_AGE = 3600.0
# how long an entry Cloud Logging does not list yet is asked for again (the push answered 503)
# before it counts as not logged
LOGGING_LAG = 120.0
# between Google's entry timestamps and this clock: an observation closer to a call than this may
# already show what the call set
CLOCK_SKEW = 5.0
# an observation this long after a call ended shows what the call set (labels and secure tags
# applied, clocks apart): one without a value the call set then says the call was undone
SETTLED = 60.0
# how long a stored VM may go unconfirmed (its zone missing from the full sync's listing, and a
# lookup by its id in its zone failing too) before the sync fails closed and records it deleted.
# A day, not an hour: a deleted VM's reused address is caught at once (a listed VM holding it), so
# the bound is for what nothing else can see, and an hour-long Compute API outage in one zone must
# not take that zone's live VMs out of every policy (and revoke their agents' tokens)
UNCONFIRMED_MAX = 24 * 3600.0


Listing = tuple[list[dict[str, Any]], bool]  # log entries about a VM, and whether that is all of them


class UnknownProject(MalformedEvent):
    """An event or token for a project this control plane does not serve."""


@dataclass
class GcpIngestResult:
    event_id: str
    kind: str = "ignored"
    changed: list[str] = field(default_factory=list)


class GcpIngest:
    def __init__(
        self, w: BaseWiring, cfg: GcpConfig, instances: Instances | None = None, metric: Metric = no_metric
    ) -> None:
        self.w = w
        self.cfg = cfg
        self.instances = instances or Instances(cfg.endpoints, cfg.tag_parents)
        self.metric = metric
        self.pending: OrderedDict[str, GcpEvent] = OrderedDict()  # first entries by operation id
        self._pending_lock = threading.Lock()  # serve handles events on a thread pool
        self._verifier = OidcVerifier(cfg.events_audience, cfg.jwks_url) if cfg.events_audience else None
        self.logs = AuditLogReader(cfg.endpoints)

    # --- the push's caller -----------------------------------------------------------------------

    def authenticate(self, authorization: str | None) -> str:
        """The pushing service account, once its OIDC token verified (signature, issuer, our
        audience) and it is one we configured; :class:`TokenError` otherwise."""
        if self._verifier is None:
            raise TokenError("GCP events are off here (RINGFENCE_GCP_EVENTS_AUDIENCE is not set)")
        if not self.cfg.push_service_accounts:
            # any project's Pub/Sub can push to our URL with our audience: the sender must be pinned
            raise TokenError("no push service account is configured (RINGFENCE_GCP_PUSH_SERVICE_ACCOUNTS)")
        scheme, _, token = (authorization or "").partition(" ")
        if scheme.lower() != "bearer" or not token.strip():
            raise TokenError("Authorization: Bearer <OIDC token> is required")
        claims = self._verifier.verify(token.strip(), "push token")
        email = claims.get("email")
        if claims.get("email_verified") is not True or email not in self.cfg.push_service_accounts:
            raise TokenError(f"push token of {email!r}: not a configured push service account")
        return str(email)

    # --- events ----------------------------------------------------------------------------------

    def handle(self, body: bytes | str) -> GcpIngestResult:
        """One pushed event (Pub/Sub envelope or Eventarc LogEntry). Raises MalformedEvent."""
        entry = log_entry(body)
        ev = parse(entry)
        if ev is None:
            self.metric("EventsIgnored", 1)
            return GcpIngestResult(str(entry.get("insertId", "")))
        return self.apply(ev)

    def project_id(self, project: str) -> str:
        if project in self.cfg.projects:
            return project
        pid = self.cfg.project_of_number(project)
        if pid is None:
            raise UnknownProject(f"project {project!r} is not served by this control plane (RINGFENCE_GCP_PROJECTS)")
        return pid

    def apply(self, ev: GcpEvent) -> GcpIngestResult:
        res = GcpIngestResult(ev.event_id, kind=f"{ev.action.value}:{'last' if ev.last else 'first'}")
        project = self.project_id(ev.project)
        if ev.failed:
            if ev.last and ev.operation:
                with self._pending_lock:  # the call failed: its first entry approves or blames nothing
                    self.pending.pop(ev.operation, None)
            self.metric("EventsIgnored", 1)
            res.kind = "failed-call"
            return res
        if not ev.last:
            if ev.operation:
                with self._pending_lock:
                    # the first seen stays: a later "first" of the same operation (a redelivery, or
                    # a forgery by someone who listed the operation) replaces nothing
                    self.pending.setdefault(ev.operation, ev)
                    while len(self.pending) > PENDING_KEPT:
                        self.pending.popitem(last=False)
            return res
        # the entry that says who called and what the call set: this one, or its operation's first,
        # which must name the same call on the same VM (else a forged "last" entry could carry a
        # tagger's confirmed call on one VM over to another)
        said: GcpEvent | None = ev
        if ev.operation and not ev.first:
            with self._pending_lock:
                first = self.pending.get(ev.operation)
                matched = first is not None and self._same_call(first, ev)
                said = self.pending.pop(ev.operation) if matched else None
        if ev.group:
            self.metric("GroupLaunches", 1)
            log.info("%s %s/%s: made by managed instance group %s", ev.action.value, ev.zone, ev.instance, ev.group)
        owed: set[str] = set()
        gave_back: set[str] = set()
        try:
            changed = self._decide_and_observe(project, ev, said, owed, gave_back)
        except Exception:
            if said is not None and said is not ev and ev.operation:  # the redelivery finds it again
                with self._pending_lock:
                    self.pending.setdefault(ev.operation, said)
            # a change stored before a later step failed (the entry's one-time claim): handed on,
            # as the redelivery finds it stored and would not
            hand_on_stored(self.w, owed, f"gcp event {ev.event_id}", self.metric, urgent=gave_back)
            raise
        res.changed = sorted(changed)
        self._hand_on(changed, gave_back)
        self.metric("InventoryChanges", len(changed))
        return res

    def _decide_and_observe(
        self, project: str, ev: GcpEvent, said: GcpEvent | None, owed: set[str], gave_back: set[str]
    ) -> set[str]:
        """Who made the change ``ev`` ends and what it set (``said``: its first entry when held in
        this process), decided and stored: the VM observed and governed with it. ``owed`` gets
        what changed as soon as it is stored, for the caller to hand on should a later step fail
        (``gave_back``: those of them that gave their addresses back, :meth:`_store`)."""
        names = {ev.instance: ev.instance_name} if ev.instance_name else None
        observed = self.observations(project, ev.zone, [ev.instance], names)
        stored = self.w.store.get_many([r.id for r in observed])
        if not self._moves_privileged(observed, stored) and not self._may_take_back(said, stored):
            # who called decides only a move into a privileged value: with none on the VM, no
            # Cloud Logging read (a split change, a fabricated "last" entry, a tagger's setLabels
            # re-sending a privileged value in force). Should a move land between this read and
            # the write, it is decided unattributed: held, never approved.
            changed = self._store(observed, TagChange(None, None), ev.event_id, stored, gave_back)
            owed |= changed
            self._spend_unread(ev, said)
            return changed
        first_logged: dict[str, Any] | None = None
        read_log = said is not ev  # a split call's last entry
        if read_log:
            # a first entry held here is only what was pushed: whoever may publish can push a
            # "first" of their own operation (its id is what their call returned) saying it set
            # nothing privileged, or naming another caller, before Google's arrives, and the first
            # seen stays. Where a privileged move makes who called matter, the operation's first
            # entry as logged decides (one read, which lists this last entry as logged too, so a
            # forged successful end of a failed call decides nothing either)
            pushed, (said, first_logged, ended) = said, self._first_from_log(project, ev)
            if pushed is not None and said is not None and _said(pushed) != _said(said):
                claimed = TagChange(pushed.principal, self.requested_tags(pushed.action, pushed.requested))
                why = "Cloud Logging has another first entry of the operation"
                self._unconfirmed(project, pushed, claimed, f"the pushed first entry decides nothing: {why}")
        else:
            ended = ev.time  # a call logged in one entry: confirmed by its time (:meth:`confirm`)
        spend: str | None = None
        if said is None:
            change = TagChange(None, None)  # unattributed: approves nothing and blames nobody
        else:
            change = TagChange(said.principal, self.said_tags(project, said))
            before = stored.get(observed[0].id) if observed else None
            if said.action is Action.LABELS and observed:
                # setLabels sends the whole label set: a caller answers only for the values the
                # call set, not re-sent. A privileged value re-sent with an unrelated edit is not
                # their move: a non-tagger is not named for it, and a tagger does not approve it (a
                # held move re-sent by a tagger's read-modify-write stays held)
                change = TagChange(change.principal, self._set_by(change, before, said.time))
            approving = self.would_approve(change)
            if approving and (why := self._seen_undone(said, ended, change, before)):
                # no Logging read: this process saw the call undone itself (what Logging may not
                # list yet, if the value was set again since)
                self.metric("UnconfirmedApprovals", 1)
                self._unconfirmed(project, said, change, f"the pushed audit entry approves nothing: {why}")
                change, approving = TagChange(None, None), False
            if not approving and not self.would_blame(change):
                # it set no privileged value: whoever called, a move it did not make is not theirs;
                # but a call writing over a privileged value in force stays attributed (a write at
                # its time: it takes the approval back, even where no observation saw the value
                # change). It names nobody: it set no privileged value, so no move held is theirs
                # (unconfirmed, it can only hold)
                if not self._takes_back(change, before):
                    change = TagChange(None, change.requested)
            else:
                vm = observed[0].id if observed else None
                change, spend = self.confirm(
                    project, said, change, approving=approving, entry=first_logged, vm=vm, before=before
                )
                read_log = True
        if read_log:
            # Cloud Logging was read (with retries, maybe): an observation from before the read
            # could be older than one another process stored meanwhile, and be dropped as stale
            # with the decision it carries; the VM is read again for the write
            observed = self.observations(project, ev.zone, [ev.instance], names)
            stored = self.w.store.get_many([r.id for r in observed])
        # placed at the call's end (its last entry's time, as Cloud Logging has it for a split call):
        # by then the VM shows what it set, so a read after it without the value is a later write
        when = ended or (said.time if said else None)
        changed = self._store(observed, _at_call(change, when), ev.event_id, stored, gave_back)
        owed |= changed
        if spend is not None:
            # spent only once its approval or finding is stored: a delivery that failed before is
            # redelivered and decides again; a replay (the entry published again later) finds it spent
            self.w.store.claim_once(spend, int(CONFIRM_MAX_AGE) + 60)
        return changed

    def _set_by(
        self, change: TagChange, before: InventoryRecord | None, call: datetime | None
    ) -> dict[str, str] | None:
        """What of a ``setLabels`` call's request ``change`` the call set rather than re-sent, from
        the VM as stored ``before`` it (:func:`_changed`). A non-tagger's: a governed value the last
        known write of its dimension, made before the call, wrote is re-sent. An allowed tagger's
        (what approves): a value the VM was observed with more than :data:`CLOCK_SKEW` before the
        call is re-sent, held or not, and approves nothing (an administrator's binding grants it);
        so is one a held call (``other``) was the last known write of, made before the call,
        however recent the observation; any other is set."""
        mapper = self._governed_mapper()
        tagger = mapper is not None and bool(change.principal) and is_tagger(mapper.config.taggers, change.principal)
        return _changed(change.requested, before, call, mapper, tagger=tagger)

    def _spend_unread(self, ev: GcpEvent, said: GcpEvent | None) -> None:
        """An entry decided without a read (nothing privileged moved) is spent as a read-back
        would have spent it: replayed within the hour, when a move is pending, it must approve
        or name nobody. The entry that says what the call set is spent for both; a split call's
        last entry spends itself (its first entry is then not read for it again)."""
        ttl = int(CONFIRM_MAX_AGE) + 60
        if said is not None and said.principal and (said.requested or said.tag_value_ids):
            self.w.store.claim_once(_spent(said), ttl)
            self.w.store.claim_once(_blamed(said), ttl)
        if said is None and ev.operation and not ev.first:
            self.w.store.claim_once(_decided(ev), ttl)

    def _moves_privileged(self, observed: list[InventoryRecord], stored: Mapping[str, InventoryRecord]) -> bool:
        """Some VM observed moves a label into a privileged value not in force (under governed
        labels): what governance holds unless a tagger's call is shown to have made it."""
        mapper = self._governed_mapper()
        if mapper is None:
            return False
        for rec in observed:
            if rec.state == "terminated":
                continue
            old = stored.get(rec.id)
            previous = old.workload if old is not None and old.state != "terminated" else None
            if govern(mapper, previous, rec.workload).moves:
                return True
        return False

    def _may_take_back(self, said: GcpEvent | None, stored: Mapping[str, InventoryRecord]) -> bool:
        """The entry ``said`` (as pushed) names a caller whose call set a key of a dimension
        whose value in force on a stored VM is privileged: a write that takes an approval back
        (:meth:`_takes_back`), even when no read sees the value move (a revocation and a
        re-escalation made between two reads). Decided with its caller, not unattributed."""
        if said is None or not said.principal or self._governed_mapper() is None:
            return False
        change = TagChange(said.principal, self.requested_tags(said.action, said.requested))
        if said.action is Action.LABELS:
            return any(
                self._takes_back(
                    TagChange(said.principal, _changed(change.requested, old, said.time, self._governed_mapper())), old
                )
                for old in stored.values()
            )
        return any(self._takes_back(change, old) for old in stored.values())

    def _takes_back(self, change: TagChange, before: InventoryRecord | None) -> bool:
        """``change`` is a call that set a key of a governed dimension whose value in force on
        ``before`` (the VM as stored) is privileged: by someone who is not an allowed tagger, to
        any value; by a tagger, to another value (a revocation: a non-tagger setting the value
        again after it is then theirs, :func:`_changed`). A tagger re-sending the value in force
        takes nothing back (and costs no Logging read)."""
        mapper = self._governed_mapper()
        if mapper is None or not change.principal or before is None or before.state == "terminated":
            return False
        tagger = is_tagger(mapper.config.taggers, change.principal)
        for dim, keys in mapper.keys.items():
            v = before.labels.get(dim)
            if not mapper.is_privileged(dim, v):
                continue
            for k in keys:
                r = (change.requested or {}).get(k)
                if r is not None and (not tagger or mapper.canonical_value(dim, r) != v):
                    return True
        return False

    def _same_call(self, first: GcpEvent, last: GcpEvent) -> bool:
        """An operation's first and last entries name the same call on the same VM (by its id, or
        by its name where one entry logged only that)."""
        same_vm = first.instance == last.instance or (
            first.instance_name is not None and first.instance_name == last.instance_name
        )
        return (
            same_vm
            and first.action == last.action
            and first.zone == last.zone
            and self.project_id(first.project) == self.project_id(last.project)
        )

    # --- approvals confirmed with Cloud Logging ----------------------------------------------------

    def would_approve(self, change: TagChange) -> bool:
        """The change could approve a move: an allowed tagger (of the policy governing now) set a
        privileged value. The entry is then read back before it approves."""
        mapper = self._caller_governed(change, tagger=True)
        return mapper is not None and self._sets_privileged(mapper, change.requested or {})

    def would_blame(self, change: TagChange) -> bool:
        """The change could raise a finding naming its caller (and quarantine, with
        ``on_privileged_change: quarantine``): someone who is not a tagger set a privileged value.
        The entry is then read back before it names anyone, so a forged entry blames nobody. An
        entry that set no privileged value names nobody either (:meth:`apply`) and costs no read."""
        mapper = self._caller_governed(change, tagger=False)
        return mapper is not None and self._sets_privileged(mapper, change.requested or {})

    def _caller_governed(self, change: TagChange, *, tagger: bool) -> LabelMapper | None:
        """The governing mapper, when labels are governed and the change names a caller who is (or,
        ``tagger`` False, is not) an allowed tagger."""
        mapper = self._governed_mapper()
        if mapper is None or not change.principal:
            return None
        return mapper if is_tagger(mapper.config.taggers, change.principal) == tagger else None

    def _governed_mapper(self) -> LabelMapper | None:
        active = self.w.governing_policy()
        mapper = active[1].labels if active is not None else None
        return mapper if mapper is not None and mapper.governed else None

    @staticmethod
    def _sets_privileged(mapper: LabelMapper, requested: Mapping[str, str]) -> bool:
        return any(
            (raw := requested.get(key)) is not None and mapper.is_privileged(dim, mapper.canonical_value(dim, raw))
            for dim, keys in mapper.keys.items()
            for key in keys
        )

    def confirm(
        self,
        project: str,
        said: GcpEvent,
        claimed: TagChange,
        *,
        approving: bool = True,
        entry: dict[str, Any] | None = None,
        vm: str | None = None,
        before: InventoryRecord | None = None,
    ) -> tuple[TagChange, str | None]:
        """The change as Cloud Logging has it: the entry ``said`` (pushed, its principal a tagger's,
        or with ``approving`` False one :meth:`would_blame`) read back by its log, ``insertId`` and
        time, and the caller and request *as logged* returned. An entry that cannot be confirmed
        (not logged, too old, spent already) approves nothing and blames nobody: the returned change
        names no principal, and an audit record says why; one logged as another caller's call is
        returned as that (governed as theirs). With the change, the claim to take once what it
        decides is stored (:func:`_spent`, :func:`_blamed`), so that one entry approves once and
        names its caller once (replayed within the hour while the move is still held, it would
        quarantine again a VM an operator has released). A Logging API that cannot be read raises
        (the push is answered 503 and redelivered). ``entry``: ``said`` as Cloud Logging has it,
        read already (:meth:`_first_from_log`), so not read again. An approval is confirmed only
        while Cloud Logging has no later change of the VM ``vm`` (its id) that may have undone
        it (:meth:`_changed_since`). ``before``: the VM as stored before the call; a ``setLabels``
        logged otherwise than pushed is taken for what it changed from it (:func:`_changed`), as
        the pushed one was."""
        listing: Listing | None = None
        if approving and entry is None and (listing := self._about_vm(project, said, vm)) is not None:
            # one read for both: the entry itself, and what was done to the VM since
            entry = next((e for e in listing[0] if e.get("insertId") == said.event_id), None)
        logged, why = self._read_back(project, said, entry)
        if logged is not None:
            same = (logged.requested, logged.tag_value_ids) == (said.requested, said.tag_value_ids)
            requested = claimed.requested if same else self.said_tags(project, logged)
            if not same and logged.action is Action.LABELS:
                requested = self._set_by(TagChange(logged.principal, requested), before, logged.time)
            change = TagChange(logged.principal, requested)
            if logged.principal == claimed.principal and change.requested == claimed.requested:
                # one entry decides once: replayed within the hour (after its move was undone and
                # the value set again by someone else) it is what a replay is, and decides nothing
                spend = _spent(said) if approving else _blamed(said)
                if self.w.store.claimed(spend):
                    why = f"this entry has {'approved a move' if approving else 'named its caller'} already: a replay decides nothing"
                    logged = None
                elif approving and (why := self._changed_since(project, said, change, vm, listing)):
                    logged = None
                else:
                    if approving:
                        kept, why = self._not_resent(project, logged, change, vm, before)
                        if not why:
                            self._held_resent(project, said, change, kept)
                            if not self.would_approve(kept):
                                return self._resent_only(kept, before), None
                            change = kept
                    if not why:
                        self.metric("ApprovalsConfirmed" if approving else "AttributionsConfirmed", 1)
                        return change, spend
                    logged = None  # unconfirmed (below): what it re-sent cannot be told
            else:
                why = (
                    f"Cloud Logging has this entry by {logged.principal!r} setting {change.requested}, "
                    f"not by {claimed.principal!r} setting {claimed.requested}"
                )
        if logged is None:
            change = TagChange(None, None)
        self.metric("UnconfirmedApprovals" if approving else "UnconfirmedAttributions", 1)
        self._unconfirmed(
            project,
            said,
            claimed,
            f"the pushed audit entry {'approves nothing' if approving else 'names nobody'}: {why}",
        )
        if logged is None:
            return change, None
        # logged as another's call after all: it decides as logged, and only once, like any
        if self.would_approve(change):
            if self._changed_since(project, said, change, vm, listing):
                return TagChange(None, None), None
            kept, why = self._not_resent(project, logged, change, vm, before)
            if why:
                self._unconfirmed(project, said, change, f"the logged call approves nothing: {why}")
                return TagChange(None, None), None
            self._held_resent(project, said, change, kept)
            if not self.would_approve(kept):
                return self._resent_only(kept, before), None
            change = kept
            spend = _spent(said)
        elif self.would_blame(change):
            spend = _blamed(said)
        else:
            return change, None
        return (TagChange(None, None), None) if self.w.store.claimed(spend) else (change, spend)

    def _seen_undone(
        self, said: GcpEvent, ended: datetime | None, change: TagChange, before: InventoryRecord | None
    ) -> str:
        """Why the tagger's call ``said`` (ended at ``ended``: a split call's last entry as Cloud
        Logging has it, :meth:`_first_from_log`) is not what set the privileged values ``change``
        would approve, from the VM as stored (``before``): observed without one of them
        :data:`SETTLED` s or more after the call ended, so it was undone, and what the VM carries
        now was set again since. "" when that is not known. Without an end, the call's first entry
        (as logged) dates it: earlier, never later, than it ended."""
        end = ended or said.time
        mapper = self._governed_mapper()
        if end is None or mapper is None or before is None or before.state == "terminated":
            return ""
        if before.observed_at < end.timestamp() + SETTLED:
            return ""  # it may not have shown the call's values yet
        seen = before.workload.tags
        missing = {
            k: v
            for k, v in (change.requested or {}).items()
            if self._sets_privileged(mapper, {k: v}) and seen.get(k) != v
        }
        if not missing:
            return ""
        after = int(before.observed_at - end.timestamp())
        return f"the VM was seen without {missing} {after} s after the call: it was undone, and set again since"

    def _unconfirmed(self, project: str, said: GcpEvent, claimed: TagChange, reason: str) -> None:
        """Audit (``label.unconfirmed``) a pushed entry that decides nothing as pushed."""
        log.warning("%s/%s: audit entry %s not confirmed: %s", said.zone, said.instance, said.event_id, reason)
        self.w.audit(
            AuditRecord(
                principal=GOVERNANCE_PRINCIPAL,
                action="label.unconfirmed",
                target=said.instance,
                detail={
                    "claimed_principal": claimed.principal,
                    "requested": dict(claimed.requested or {}),
                    "event_id": said.event_id,
                    "log_name": said.log_name,
                    "time": said.time.isoformat() if said.time else None,
                    "project": project,
                },
                reason=reason,
            )
        )

    def _about_vm(self, project: str, said: GcpEvent, vm: str | None) -> Listing | None:
        """Cloud Logging's entries about the VM ``vm`` (its id) from ``said``'s time on, in the log
        ``said`` names (:meth:`AuditLogReader.about_vm`); None where that cannot be asked."""
        logged_in = activity_log_project(said.log_name)
        if vm is None or not vm.isdigit() or logged_in is None or logged_in not in self.cfg.projects:
            return None
        if said.time is None:
            return None
        src = self.cfg.label_source
        return self.logs.about_vm(
            logged_in,
            str(said.log_name),
            vm,
            compute=src is not LabelSource.SECURE_TAGS,
            tags=src is not LabelSource.LABELS,
            since=said.time - WINDOW,
        )

    def _last_other(
        self, said: GcpEvent, change: TagChange, before: InventoryRecord | None
    ) -> tuple[datetime | None, str]:
        """For a ``setLabels`` (which sends the whole label set) that would approve: from when
        Cloud Logging is to be asked for the calls the tagger's call may have re-sent a
        privileged value of (:meth:`_not_resent`): the VM's last sighting without that value, as
        ``before`` (the VM as stored) has it (its value's ``unseen`` write: the last observation
        of the value before; else the record's), less :data:`CLOCK_SKEW`. None: nothing to ask.
        Not seen so since more than :data:`CONFIRM_MAX_AGE` before the call: why the call approves
        nothing (a move older than an hour, its entry not delivered yet, could not be told from
        the tagger's; reading further back than that is not done)."""
        mapper = self._governed_mapper()
        if said.action is not Action.LABELS or said.time is None or mapper is None:
            return None, ""
        if before is None or before.state == "terminated":
            return None, ""
        dims = mapper.label_keys()
        writes = before.label_writes or {}
        sighting = min(before.observed_at, before.workload.observed_at)
        earliest: float | None = None
        for k, v in (change.requested or {}).items():
            if not self._sets_privileged(mapper, {k: v}):
                continue
            at = sighting
            w = writes.get(dims[k]) if k in dims else None
            if before.workload.tags.get(k) == v and w is not None and w.by == "unseen" and w.value == v:
                at = w.at  # seen with it already: since the observation before it
            earliest = at if earliest is None else min(earliest, at)
        if earliest is None:
            return None, ""
        if earliest - CLOCK_SKEW < said.time.timestamp() - CONFIRM_MAX_AGE:
            ago = int(said.time.timestamp() - earliest)
            return None, (
                f"the VM was not seen without the values it set since {ago} s before the call, more than "
                f"{int(CONFIRM_MAX_AGE)} s: whether the call re-sent someone else's move cannot be told"
            )
        return datetime.fromtimestamp(earliest - CLOCK_SKEW, tz=said.time.tzinfo), ""

    def _resent_only(self, change: TagChange, before: InventoryRecord | None) -> TagChange:
        """A tagger's ``setLabels`` that re-sent every privileged value it set (:meth:`_not_resent`):
        it approves nothing, and the move stays held (its entry, delivered later, is governed as
        that call's). Attributed only where it writes over a value in force, as a call that set
        nothing privileged (:meth:`_decide_and_observe`)."""
        return change if self._takes_back(change, before) else TagChange(None, change.requested)

    def _held_resent(self, project: str, said: GcpEvent, change: TagChange, kept: TagChange) -> None:
        """Audit (``label.unconfirmed``, counted ``ResentHeld``) the privileged values of the
        tagger's call ``change`` that :meth:`_not_resent` found re-sent (those not in ``kept``):
        they stay held, and an operator sees why the tagger's call did not approve them."""
        mapper = self._governed_mapper()
        if mapper is None:
            return
        resent = {
            k: v
            for k, v in (change.requested or {}).items()
            if k not in (kept.requested or {}) and self._sets_privileged(mapper, {k: v})
        }
        if not resent:
            return
        self.metric("ResentHeld", 1)
        self._unconfirmed(
            project,
            said,
            change,
            f"the tagger's setLabels re-sent {resent}, set before it by a call not a tagger's (or one "
            "whose request Cloud Logging does not have): held, not approved",
        )

    def _not_resent(
        self, project: str, said: GcpEvent, change: TagChange, vm: str | None, before: InventoryRecord | None
    ) -> tuple[TagChange, str]:
        """The tagger's ``setLabels`` ``said`` (confirmed) less the privileged values of ``change``
        it re-sent rather than set, as Cloud Logging lists the VM ``vm``'s label writes before it
        since its last sighting without them (:meth:`_last_other`; one read, newest first,
        :meth:`AuditLogReader.label_writes`): going back from the call, the first call that set
        the key to another value, or that may have (its request not logged, ``instances.update``),
        or a non-tagger's call setting the same value, decides; a tagger's call of the same value
        is passed over, and so is a failed call and one whose result the stored sighting (which
        showed another value) reflects already: dated :data:`CLOCK_SKEW` or more before it, or an
        insert (a VM is created before it is ever seen). A non-tagger's call (or one that may have
        set anything) found first: the value was theirs and re-sent; a held move whose entry is
        delivered after the tagger's stays held, and that entry names its caller. Nothing listed:
        ``change`` as it is. With why it approves nothing, where that is not known: the VM not
        seen since more than an hour before the call, or more label writes than one page, the
        question still open."""
        mapper = self._governed_mapper()
        if mapper is None or vm is None or not vm.isdigit() or said.time is None or not change.requested:
            return change, ""
        if said.action is not Action.LABELS:
            return change, ""  # a binding sets one value; only setLabels re-sends the whole set
        undecided = {k: v for k, v in change.requested.items() if self._sets_privileged(mapper, {k: v})}
        since, why = self._last_other(said, change, before)
        logged_in = activity_log_project(said.log_name)
        if why or since is None or not undecided or before is None or logged_in not in self.cfg.projects:
            return change, why
        src = self.cfg.label_source
        entries, complete = self.logs.label_writes(
            str(logged_in),
            str(said.log_name),
            vm,
            compute=src is not LabelSource.SECURE_TAGS,
            tags=src is not LabelSource.LABELS,
            since=since,
            until=said.time,
        )
        sighting = min(before.observed_at, before.workload.observed_at)
        shown = before.workload.tags

        def reflected(k: str, v: str, at: datetime | None, insert: bool) -> bool:
            # the stored sighting showed another value after this call: it decides nothing
            if shown.get(k) == v:
                return False
            return insert or (at is not None and at.timestamp() <= sighting - CLOCK_SKEW)

        firsts = {
            str(op.get("id")) for e in entries if isinstance(op := e.get("operation"), dict) and op.get("first") is True
        }
        resent: set[str] = set()
        for entry in entries:
            if not undecided:
                break
            if entry.get("insertId") == said.event_id or _entry_failed(entry):
                continue
            payload = entry.get("protoPayload")
            auth = payload.get("authenticationInfo") if isinstance(payload, dict) else None
            caller = auth.get("principalEmail") if isinstance(auth, dict) else None
            by_tagger = isinstance(caller, str) and is_tagger(mapper.config.taggers, caller)
            method = str(payload.get("methodName", "")) if isinstance(payload, dict) else ""
            insert = method.endswith("compute.instances.insert")
            try:
                ev = parse(entry)
            except MalformedEvent:
                ev = None
            if ev is None:
                # instances.update (which sets the whole VM) or an entry not read: it may have set
                # any label. A tagger's is passed over; anyone else's, dated before the call, may
                # have made the move: fail closed
                if by_tagger or not _before_call(entry, said.time):
                    continue
                at = _entry_time(entry)
                for k, v in list(undecided.items()):
                    if not reflected(k, v, at, insert):
                        resent.add(k)
                        undecided.pop(k)
                continue
            if (said.operation and ev.operation == said.operation) or ev.instance != vm:
                continue
            if ev.time is None or ev.time > said.time or ev.action is Action.RENAME:
                continue  # after it (_changed_since), or no label
            if (ev.action is Action.LABELS and src is LabelSource.SECURE_TAGS) or (
                ev.action is Action.TAGS and src is LabelSource.LABELS
            ):
                continue
            if ev.requested is None and not ev.tag_value_ids and not ev.first and ev.operation in firsts:
                continue  # the end of a call whose first entry (with its request) is listed too
            requested = ev.requested
            if ev.tag_value_ids:
                bound = self.bound_by_id(project, ev) if ev.action is Action.TAGS else {}
                requested = None if len(bound) < len(ev.tag_value_ids) else {**(requested or {}), **bound}
            tagger = is_tagger(mapper.config.taggers, ev.principal)
            tags = self.requested_tags(ev.action, requested)
            for k, v in list(undecided.items()):
                if reflected(k, v, ev.time, insert or ev.action is Action.INSERT):
                    continue
                if tags is None or (ev.action is Action.TAGS and k not in tags) or (tagger and tags.get(k) == v):
                    # what it set is not logged (a tagger's is passed over; anyone else's may have
                    # set the value: re-sent, below), one binding of another key, or a tagger's
                    # call of the same value: further back decides
                    if tags is not None or tagger:
                        continue
                    resent.add(k)
                elif tags.get(k) == v:
                    resent.add(k)  # a non-tagger's call set it before: re-sent
                # else set to another value since: the tagger's call (or a tagger's before) changed it
                undecided.pop(k)
        if undecided and not complete:
            return change, (
                "Cloud Logging has more calls that may have written the VM's labels since it was last seen "
                "without the values than one page: whether the call re-sent someone else's cannot be told"
            )
        if not resent:
            return change, ""
        return TagChange(change.principal, {k: v for k, v in change.requested.items() if k not in resent}), ""

    def _changed_since(
        self, project: str, said: GcpEvent, change: TagChange, vm: str | None, listing: Listing | None = None
    ) -> str:
        """Why the tagger's call ``said`` (logged, confirmed) may not be what set the privileged
        values ``change`` approves, now on the VM ``vm``: Cloud Logging lists a later call on the
        VM (not of ``said``'s own operation) that set another value of one of those keys, or that
        may have (its request not logged, a binding named by id, ``instances.update``), or more
        entries than one page. Pub/Sub does not order deliveries and a 503 while Logging lags
        delays an entry by minutes: a tagger's move, undone and made again by someone else
        meanwhile, must not be approved by the tagger's late entry. "" when there is none. A call
        Logging does not list yet (made within its own lag before this read) is not seen.
        ``listing``: :meth:`_about_vm`, read already."""
        if listing is None:
            listing = self._about_vm(project, said, vm)
        mapper = self._governed_mapper()
        if listing is None or mapper is None or vm is None:
            return "the VM, or the entry's log and time, are not known: a later change cannot be ruled out"
        # only the privileged values it approves: a later edit of another label undoes nothing
        moved = {k: v for k, v in (change.requested or {}).items() if self._sets_privileged(mapper, {k: v})}
        entries, complete = listing
        firsts = {
            str(op.get("id")) for e in entries if isinstance(op := e.get("operation"), dict) and op.get("first") is True
        }
        for entry in entries:
            if later := self._later_change(project, entry, said, moved, vm, firsts):
                return (
                    f"Cloud Logging has a later call on the VM, {later}: the tagger's call may not be what set it now"
                )
        if not complete:
            return "Cloud Logging has more calls on the VM since than one page: one may have undone this call"
        return ""

    def _later_change(
        self, project: str, entry: dict[str, Any], said: GcpEvent, moved: Mapping[str, str], vm: str, firsts: set[str]
    ) -> str:
        """What ``entry`` (listed after ``said``) did to the values ``moved`` on the VM ``vm``, when
        it may have changed one (else "")."""
        if entry.get("insertId") == said.event_id or _entry_failed(entry):
            return ""  # the call itself / one that changed nothing
        at = _entry_time(entry)
        if at is not None and said.time is not None and at < said.time:
            return ""  # before it (the listing starts a second earlier); one at the same time counts
        payload = entry.get("protoPayload")
        method = str(payload.get("methodName", "")) if isinstance(payload, dict) else ""
        try:
            ev = parse(entry)
        except MalformedEvent:
            return f"{entry.get('insertId')!r}, not an audit entry Ringfence reads"
        if ev is None:
            # instances.update replaces the whole VM, labels too; other calls (start, stop,
            # setMetadata, …) change no label
            return f"{entry.get('insertId')!r} ({method})" if method.endswith("compute.instances.update") else ""
        if ev.failed or (said.operation and ev.operation == said.operation):
            return ""  # changed nothing / the tagger's own call
        if ev.time is not None and said.time is not None and ev.time < said.time:
            return ""  # before it (the listing starts a little earlier); one at the same time counts
        if ev.instance != vm:
            return ""  # another VM, whose id has this one's in it (the listing matches a substring)
        if ev.action is Action.RENAME:
            return ""  # instances.setName changes no label
        src = self.cfg.label_source
        if (ev.action is Action.LABELS and src is LabelSource.SECURE_TAGS) or (
            ev.action is Action.TAGS and src is LabelSource.LABELS
        ):
            return ""  # not a label source here
        what = f"{ev.event_id!r} by {ev.principal!r} ({ev.method})"
        requested = ev.requested
        if ev.action is Action.TAGS and ev.tag_value_ids:
            # a binding named by id: which key and value, the VM's effective tags say, for a value
            # it still carries; one it does not is unknown (it may have been the move's undoing)
            bound = self.bound_by_id(project, ev)
            if len(bound) < len(ev.tag_value_ids):
                return what
            requested = {**(requested or {}), **bound}
        elif ev.tag_value_ids:
            return what
        if requested is None:
            if not ev.first and ev.operation in firsts:
                return ""  # the end of a call whose first entry (with its request) is listed too
            return what  # what it set is not logged here: it may have undone the move
        tags = self.requested_tags(ev.action, requested) or {}
        if ev.action is Action.TAGS:  # one binding: only its own key
            undone = any(k in tags and tags[k] != v for k, v in moved.items())
        else:  # setLabels (or insert) sends the whole label set
            undone = any(tags.get(k) != v for k, v in moved.items())
        return what if undone else ""

    def _first_from_log(
        self, project: str, last: GcpEvent
    ) -> tuple[GcpEvent | None, dict[str, Any] | None, datetime | None]:
        """The first entry of ``last``'s operation as Cloud Logging has it (parsed, and as read),
        with when the call ended (the earlier of ``last``'s pushed time and its time as logged: a
        publisher may push the genuine last entry with a later timestamp, which the read still
        finds, to date the call after an observation that saw it undone), when it went to another process (a function's concurrent instances) and what it set could
        approve or blame: a tagger's change is then approved, not held. Read only for inserts and
        for label and tag changes where they are a label source, under governed labels, and (the
        caller's check) only when the VM moves a label into a privileged value, so a scale-out
        without privileged values reads nothing; None otherwise, or when no such first entry
        names the same call on the same VM."""
        src = self.cfg.label_source
        could_matter = (
            last.action is Action.INSERT
            or (last.action is Action.LABELS and src is not LabelSource.SECURE_TAGS)
            or (last.action is Action.TAGS and src is not LabelSource.LABELS)
        )
        logged_in = activity_log_project(last.log_name)
        if not could_matter or logged_in not in self.cfg.projects or last.time is None or not last.operation:
            return None, None, None
        if self._governed_mapper() is None:
            return None, None, None
        if self.w.store.claimed(_decided(last)):
            return None, None, None  # this last entry decided already: replayed, it decides nothing
        both = self.logs.find_first(
            logged_in,
            str(last.log_name),
            last.operation,
            last.event_id,
            last.time,
            timedelta(seconds=CONFIRM_MAX_AGE),
        )
        if both is None:
            if time.time() - last.time.timestamp() < LOGGING_LAG:
                raise ServiceUnavailable(  # type: ignore[no-untyped-call]
                    f"Cloud Logging has no first entry of {last.operation!r}, or not this last one, yet: retried"
                )
            return None, None, None
        entry, last_entry = both
        try:
            first = parse(entry)
            last_logged = parse(last_entry)
        except MalformedEvent:
            return None, None, None
        if first is None or not first.first or first.failed or not self._same_call(first, last):
            return None, None, None
        self.metric("FirstEntriesReadBack", 1)
        # a logged end without a time: the first entry's (earlier) dates the call (_seen_undone)
        ended = min(last.time, last_logged.time) if last_logged is not None and last_logged.time else None
        return first, entry, ended

    def _read_back(
        self, project: str, said: GcpEvent, entry: dict[str, Any] | None = None
    ) -> tuple[GcpEvent | None, str]:
        """The entry as logged (and ""), or None and why it is not confirmed."""
        logged_in = activity_log_project(said.log_name)
        if logged_in is None or logged_in not in self.cfg.projects:
            return None, f"it names no Admin Activity audit log of a served project (logName {said.log_name!r})"
        if said.time is None:
            return None, "it has no timestamp"
        if entry is None:
            entry = self.logs.find(logged_in, str(said.log_name), said.event_id, said.time)
        if entry is None:
            if time.time() - said.time.timestamp() < LOGGING_LAG:
                # the sink may publish before entries:list shows the entry: asked again on the
                # redelivery (a 503), held only once it should have been there for a while
                raise ServiceUnavailable(f"Cloud Logging has no entry {said.event_id!r} yet: retried")  # type: ignore[no-untyped-call]
            return None, f"Cloud Logging has no entry {said.event_id!r} in {said.log_name} at {said.time.isoformat()}"
        try:
            logged = parse(entry)
        except MalformedEvent as exc:
            return None, f"the logged entry is not an audit entry: {exc}"
        if logged is None or (logged.action, logged.zone, logged.instance, logged.operation, logged.first) != (
            said.action,
            said.zone,
            said.instance,
            said.operation,
            said.first,
        ):
            return None, "the logged entry is about another call or VM"
        if logged.failed:
            return None, "the logged call failed"
        age = time.time() - logged.time.timestamp() if logged.time else float("inf")
        if age > CONFIRM_MAX_AGE:
            return (
                None,
                f"it was logged {int(age)} s ago, more than {int(CONFIRM_MAX_AGE)} s: a replay approves nothing",
            )
        return logged, ""

    def said_tags(self, project: str, ev: GcpEvent) -> dict[str, str] | None:
        """What the call set, in the policy's key form (:meth:`requested_tags`), with the secure
        tag values it names by id only resolved (:meth:`bound_by_id`)."""
        out = self.requested_tags(ev.action, ev.requested)
        if ev.tag_value_ids and self.cfg.label_source is not LabelSource.LABELS and self._governed_mapper():
            # read only where it could approve or blame: governed labels, secure tags a source
            out = {**(out or {}), **(self.requested_tags(Action.TAGS, self.bound_by_id(project, ev)) or {})}
        return out

    def bound_by_id(self, project: str, ev: GcpEvent) -> dict[str, str]:
        """The secure tags (short key → value) among ``ev.tag_value_ids`` that the VM now carries
        under a trusted parent, read from its effective tags. A value it no longer carries made no
        move that could be held now, and one under an untrusted parent is no label: neither is
        anything the call set, so neither approves or blames."""
        ids = set(ev.tag_value_ids)
        if ev.instance.isdigit():  # where the VM is stored, not where the entry says it is
            project, zone = self.locate(project, ev.zone, ev.instance)
            vm: dict[str, Any] | None = {"zone": zone, "id": ev.instance}
        else:
            vm = self.read(project, ev.zone, ev.instance)
        if vm is None:  # logged by name (tags are bound to the VM's id), and the VM is gone
            return {}
        try:
            tags = self.instances.secure_tags(self.cfg.projects[project], vm)
        except (NotFound, Forbidden):  # PermissionDenied is a Forbidden
            # Resource Manager answers a VM that is gone so: it bound nothing held now (observe
            # tombstones it); a VM still there raises (503: redelivered)
            if self.read(project, ev.zone, ev.instance, ev.instance_name) is None:
                return {}
            raise
        return {t.key: t.value for t in tags if t.value_id in ids}

    def requested_tags(self, action: Action, requested: dict[str, str] | None) -> dict[str, str] | None:
        """What the call set, in the policy's key form, from the configured label source only
        (a ``setLabels`` call sets nothing that counts when labels are not a source)."""
        if requested is None:
            return None
        mapper = self.w.mapper()
        prefix = mapper.key_prefix if mapper is not None else DEFAULT_PREFIX
        src = self.cfg.label_source
        if action is Action.TAGS:
            tags = [SecureTag(k, v, "", "") for k, v in requested.items()]
            out = canonical_tags({}, tags, src, prefix)
        elif src is LabelSource.SECURE_TAGS:
            out = {}
        else:
            out = canonical_tags(requested, [], src, prefix)
        return {k: v for k, v in out.items() if not k.startswith(SOURCE_TAG)}

    def record(self, project: str, inst: dict[str, Any], t: float, mapper: LabelMapper | None) -> InventoryRecord:
        """The VM as an inventory record, its secure tags read where they are a label source."""
        secure = []
        if self.cfg.label_source is not LabelSource.LABELS:
            secure = self.instances.secure_tags(self.cfg.projects[project], inst)
        return instance_record(inst, project, t, secure=secure, source=self.cfg.label_source, mapper=mapper)

    def locate(self, project: str, zone: str, instance_id: str) -> tuple[str, str]:
        """Where the VM ``instance_id`` is: the project and zone of its stored record (a live one,
        of a served project), else the ``project`` and ``zone`` given (an event's). A VM's id and
        zone never change; what a pushed entry says of its zone (or name) is only what whoever
        published it wrote, and a VM looked up where it is not would be taken for deleted."""
        return self._stored_at(instance_id) or (project, zone)

    def _stored_at(self, instance_id: str) -> tuple[str, str] | None:
        """The project and zone of ``instance_id``'s stored record, a live VM of a served project;
        else None."""
        stored = self.w.store.get(instance_id) if instance_id.isdigit() else None
        if stored is None or stored.state == "terminated" or stored.workload.cloud != "gcp":
            return None
        wl = stored.workload
        return (wl.account, wl.zone) if wl.account in self.cfg.projects and wl.zone else None

    def _stored_deleted(self, instance_id: str) -> tuple[str, str] | None:
        """The project and zone of ``instance_id``'s stored record, a deleted VM of a served
        project; else None."""
        stored = self.w.store.get(instance_id) if instance_id.isdigit() else None
        if stored is None or stored.state != "terminated" or stored.workload.cloud != "gcp":
            return None
        wl = stored.workload
        return (wl.account, wl.zone) if wl.account in self.cfg.projects and wl.zone else None

    def read(self, project: str, zone: str, ref: str, name: str | None = None) -> dict[str, Any] | None:
        """The VM ``ref`` names, or None when it is gone. A numeric id is looked up by id
        (:meth:`Instances.by_id`) where the VM is stored (:meth:`locate`), else in ``zone``: never
        by a name, which a rename (``instances.setName``) moves to nothing and a VM created since
        takes over. Only an entry that logged no id names the VM by name (``name``, else ``ref``),
        in ``zone``."""
        if ref.isdigit():
            project, zone = self.locate(project, zone, ref)
            return self.instances.by_id(project, zone, ref)
        return self.instances.get(project, zone, name or ref)

    def observe(
        self,
        project: str,
        zone: str,
        instances: Iterable[str],
        *,
        names: Mapping[str, str] | None = None,
        change: TagChange | None = None,
        event_id: str = "",
    ) -> set[str]:
        """Read the VMs live and store what they are now (governed); the ids that changed."""
        return self._store(self.observations(project, zone, instances, names), change, event_id)

    def observations(
        self, project: str, zone: str, instances: Iterable[str], names: Mapping[str, str] | None = None
    ) -> list[InventoryRecord]:
        """The VMs (ids or names) as read live now: a record each, a tombstone for one stored
        that is gone. A VM is gone only when looked up by its id where it is stored
        (:meth:`read`): an event's zone or name that misses says nothing about a stored VM (a
        forged or stale entry, a VM renamed since). One not stored (or stored deleted) that is
        not found is left alone: nothing of it to remove (the full sync converges a race)."""
        mapper = self.w.mapper()
        observed: list[InventoryRecord] = []
        for name_or_id in instances:
            stored_at = self._stored_at(name_or_id)
            p, z = stored_at or (project, zone)
            try:
                inst = (
                    self.instances.by_id(p, z, name_or_id)
                    if name_or_id.isdigit()
                    else self.read(p, z, name_or_id, (names or {}).get(name_or_id))
                )
            except NotFound as exc:
                if stored_at is not None or not name_or_id.isdigit():
                    raise  # where a VM is stored: Google's answer, redelivered (503)
                # the zone (or project) the entry names does not exist and no stored record says
                # where the VM is: redelivering it would never answer otherwise (400, not 503)
                raise MalformedEvent(f"zone {z!r} of project {p!r} does not exist: {exc.message}") from None
            t = now()
            if inst is None:
                left = self._stored_deleted(name_or_id) if stored_at is None else None
                if left is not None:
                    # stored deleted already (its delete redelivered): observed deleted again, so
                    # what follows the tombstone's write (its token's revocation) is done again
                    observed.append(tombstone(name_or_id, *left, t))
                    continue
                if stored_at is None:
                    log.warning("%s/%s is not found and is not stored: nothing to remove", zone, name_or_id)
                    continue
                observed.append(tombstone(name_or_id, p, z, t))
            else:
                observed.append(self.record(p, inst, t, mapper))
        return observed

    def _store(
        self,
        observed: list[InventoryRecord],
        change: TagChange | None,
        event_id: str = "",
        stored: Mapping[str, InventoryRecord] | None = None,
        gave_back: set[str] | None = None,
    ) -> set[str]:
        """Store these observations, governed against the stored records (``stored``: as read
        already); the ids that changed in what compute reads (:func:`concerns_compute`): a GCP
        label outside the policy's prefix, which whoever may set labels can flip as often as they
        like, is stored and not handed on. ``gave_back`` gets the ids whose write gave their
        addresses back (deleted: :func:`releases_addresses`), for the priority lane."""
        if stored is None:
            stored = self.w.store.get_many([r.id for r in observed])
        what = f"gcp event {event_id or '-'}"
        return store_deletable(
            self.w,
            observed,
            stored,
            change,
            event_id=event_id,
            metric=self.metric,
            gave_back=gave_back,
            what=what,
            gone="instance deleted",
        )

    def _hand_on(self, changed: set[str], gave_back: set[str]) -> None:
        """Compute for ``changed``: those that gave their addresses back (deleted) first, in the
        priority lane, as AWS's removals: a deleted VM's address may be given to a new VM, and
        must not stay allowed in its peers' sets while a label storm's backlog drains."""
        urgent = sorted(changed & gave_back)
        if urgent:
            self.w.enqueue_compute(urgent, urgent=True)
        rest = sorted(changed - gave_back)
        if rest:
            self.w.enqueue_compute(rest)

    def sync(self, project: str) -> set[str]:
        """The full inventory of a project (aggregated list): every VM stored as it is now, and
        the project's stored VMs that no longer exist tombstoned. Returns the ids that changed.
        A stored VM of a zone the list could not reach (``unreachables``, an ``UNREACHABLE``
        scope; every zone where an unreachable scope names none) is missing from a partial answer,
        not deleted: it is looked up by its id in its zone (:meth:`_unlisted`)."""
        mapper = self.w.mapper()
        # before the listing: a VM it misses because it was made later is stored by its own event
        # after this time, which the tombstone written at it does not overwrite
        listed_at = now()
        listed, unreachable = self.instances.listing(project)
        # dated when the listing began, as its tombstones: a VM's write stored by its event after
        # then (its labels changed during the pass) is newer than this listing's copy, which the
        # store drops rather than putting the old labels back
        # each workload dated when its page returned (its secure tags, where read: after that read):
        # what it shows was so by then, and no call made later set it
        observed = [
            _read_by(
                self.record(project, inst, listed_at, mapper),
                read_at if self.cfg.label_source is LabelSource.LABELS else now(),
            )
            for read_at, inst in listed
        ]
        seen = {rec.id for rec in observed}
        # GCP gives an internal address to one VM of a network at a time (a stopped VM keeps its own)
        held = {(rec.workload.vpc, ip) for rec in observed for ip in rec.workload.ips}
        gave_back: set[str] = set()
        changed = self._store(observed, None, gave_back=gave_back)
        failed: list[Exception] = []  # revocations that failed: their VMs left as stored
        try:
            records = self.w.store.all_records()
            self._sync_unlisted(
                project, records, seen, held, unreachable, mapper, changed, listed_at, gave_back, failed
            )
        except BaseException:
            # what was stored is handed on: the next pass finds nothing more to store and would not
            hand_on_stored(self.w, changed, f"gcp sync of {project}", self.metric, urgent=gave_back)
            raise
        try:
            self._hand_on(changed, gave_back)
        except Exception:
            # the pass fails, for its retry; nothing redelivers a pass, so what it stored stays
            # owed to compute until a pass hands it on (hand_on_owed), however long that takes
            log.exception("gcp sync of %s: %s stored but compute could not be queued", project, sorted(changed))
            self.metric(COMPUTE_NOT_QUEUED, 1)
            owe_compute(self.w, changed, f"gcp sync of {project}", self.metric, urgent=gave_back)
            raise
        # and the project's VMs stored gone lately, again: a pass that stored a tombstone and failed
        # to hand it on is retried with nothing more to store for it (nothing redelivers a pass)
        hand_on_gone_again(
            self.w,
            records,
            lambda r: r.workload.cloud == "gcp" and r.workload.account == project and r.id not in seen,
            changed,
            f"gcp sync of {project}",
            self.metric,
        )
        # failing for a VM whose revocation failed only now: failing on every retry, the pass must
        # not keep what was stored gone earlier from compute
        if failed:  # the pass fails, for its retry (the next pass revokes and tombstones them)
            raise failed[0]
        return changed

    def _sync_unlisted(
        self,
        project: str,
        records: list[InventoryRecord],
        seen: set[str],
        held: set[tuple[str | None, str]],
        unreachable: set[str] | None,
        mapper: LabelMapper | None,
        changed: set[str],
        listed_at: float,
        gave_back: set[str],
        failed: list[Exception],
    ) -> None:
        """:meth:`sync`'s pass over the project's stored VMs it did not list (``changed`` gets
        those it changed as each is stored, ``gave_back`` those of them deleted, ``failed`` the
        revocations that failed, their VMs left as stored; ``listed_at``: when the listing began;
        ``records``: the store's, read after the listed VMs were stored)."""
        if unreachable is None or unreachable:
            self.metric("GcpZonesUnreachable", len(unreachable) if unreachable is not None else 1)
            log.warning("gcp sync of %s: unreachable zones %s: their VMs are looked up by id", project, unreachable)
        for stored in records:
            wl = stored.workload
            if wl.cloud != "gcp" or wl.account != project or stored.id in seen or stored.state == "terminated":
                continue
            if not wl.zone:
                continue
            if unreachable is None or wl.zone in unreachable:
                changed.update(self._unlisted(project, stored, held, mapper, gave_back, failed))
                continue
            # its token revoked before its tombstone is written: a tombstone stored whose revocation
            # then failed would be skipped by every later pass (as stored deleted), token and all.
            # Only where the tombstone lands: not over a VM observed after the listing
            if not self._retire(project, stored.id, failed, listed_at):
                continue
            gone = tombstone(stored.id, project, wl.zone, listed_at)
            if self.w.store.observe(gone):
                changed.add(stored.id)
                if releases_addresses(stored, gone):
                    gave_back.add(stored.id)

    def _retire(self, project: str, wid: str, failed: list[Exception], at: float | None = None) -> bool:
        """:func:`credentials.retire` of a deleted VM (``at``: before a tombstone observed then,
        :func:`credentials.retire_before_tombstone`, False where it would not land); False (the
        error kept in ``failed``) when it fails, so that one VM's failed revocation does not keep
        the others' tombstones from the pass."""
        try:
            if at is not None:
                return credentials.retire_before_tombstone(self.w, wid, at, "instance deleted")
            credentials.retire(self.w, wid, "instance deleted")
        except Exception as exc:
            log.warning("gcp sync of %s: the token of %s could not be revoked (%s): left as stored", project, wid, exc)
            failed.append(exc)
            return False
        return True

    def _unlisted(
        self,
        project: str,
        stored: InventoryRecord,
        held: set[tuple[str | None, str]],
        mapper: LabelMapper | None,
        gave_back: set[str],
        failed: list[Exception],
    ) -> set[str]:
        """A stored VM of a zone the aggregated list could not reach: looked up by its id in its
        zone (``instances.list`` of that zone, filtered by id), which decides when it answers
        (none: deleted). Where that fails too, the VM stays as stored, unconfirmed, unless it
        fails closed and is recorded deleted (agent key and tokens retired, logged, counted
        ``GcpVmsFailedClosed``): an address of it is held by a VM of its network this listing
        has (the stored VM no longer has it), or it has not been confirmed (``observed_at``) for
        :data:`UNCONFIRMED_MAX` seconds. A VM that was alive after all is brought back as a new one
        by the first pass that reaches it: its agent enrols again, its privileged values are
        approved again."""
        wl = stored.workload
        zone = str(wl.zone)
        asked = now()  # before the read, as the listing's records: an event's write after then stands
        try:
            inst = self.instances.by_id(project, zone, stored.id)
            rec = _read_by(self.record(project, inst, asked, mapper), now()) if inst is not None else None
        except (GoogleAPICallError, RetryError) as exc:
            taken = sorted(ip for ip in wl.ips if (wl.vpc, ip) in held)
            age = now() - stored.observed_at
            if taken:
                why = f"its address {', '.join(taken)} is held by a VM of network {wl.vpc} listed now"
            elif age > UNCONFIRMED_MAX:
                why = f"it has not been confirmed for {int(age)} s (more than {int(UNCONFIRMED_MAX)} s)"
            else:
                log.warning("gcp sync of %s: %s/%s not confirmed (%s): left as stored", project, zone, stored.id, exc)
                return set()
            log.warning(
                "gcp sync of %s: %s/%s recorded deleted: its zone cannot be read and %s", project, zone, stored.id, why
            )
            self.metric("GcpVmsFailedClosed", 1)
            rec = None
        if rec is not None:
            return self._store([rec], None, gave_back=gave_back)
        # its token revoked before its tombstone is written: every later pass skips a tombstone,
        # so one whose revocation then failed would leave the token authorizing
        if not self._retire(project, stored.id, failed):
            return set()
        gone = tombstone(stored.id, project, zone, now())
        if self.w.store.observe(gone):
            if releases_addresses(stored, gone):
                gave_back.add(stored.id)
            return {stored.id}
        return set()


def _at_call(change: TagChange | None, at: datetime | None) -> TagChange | None:
    """``change`` placed at its call's time ``at`` (an audit entry's ``timestamp``), never later
    than now (a pushed entry dated ahead would outrank every later write), so a late or
    redelivered entry is decided among the writes it came between (``govern_writes``), not as the
    newest."""
    if change is None or change.principal is None or change.requested is None or at is None:
        return change
    return TagChange(change.principal, change.requested, min(at.timestamp(), time.time()))


def _read_by(rec: InventoryRecord, t: float) -> InventoryRecord:
    """``rec`` (dated when its read began: an event's write stored since is newer) with its
    workload dated ``t``, when that read had ended: what it shows was so by then, so a call made by
    ``t`` may be what set it (:func:`_changed`; governance's ``LabelWrite.seen``)."""
    return rec.model_copy(update={"workload": rec.workload.model_copy(update={"observed_at": t})})


def _changed(
    requested: Mapping[str, str] | None,
    stored: InventoryRecord | None,
    call: datetime | None,
    mapper: LabelMapper | None = None,
    *,
    tagger: bool = False,
) -> dict[str, str] | None:
    """What of ``requested`` the call set, rather than re-sent (setLabels sends the whole set).

    A key of a governed dimension with an attributed last known write (``stored.label_writes``,
    ``mapper`` governing; any but ``unseen``) is decided by that write, not by an observation
    that may be newer than the call: the value it wrote, written before the ``call``, is re-sent
    (an unrelated edit by someone else keeps a tagger's approval, even where a read made after
    the call is stored before its entry is processed); another value, or one written at or after
    the call, is the call's move (a revocation and a re-escalation between two reads: the value
    written over and set again). Any other key: what differs from the tags ``stored`` was
    observed with, where that observation (when its read had ended: the workload's time; a sync's
    record is dated when its listing began) predates the call (by more than :data:`CLOCK_SKEW`);
    else it counts as set by the call (an observation made after the call may hold the call's
    own values).

    An allowed tagger's call (``tagger``: what it set approves) is judged by both: a value the
    observation says it re-sent is re-sent, and so is one whose last known write, made before
    the call, set it and is held (a non-tagger's call: ``other``), where the observation
    is too recent to say (within :data:`CLOCK_SKEW` of the call, or after it); and one held as
    ``unseen`` (no entry says who set it) that an observation first saw before the call. Re-sending
    a held move is not making it: that stays held, its mover named, until a tagger's call changes
    the value or an admin binding grants it. Any other write (approving, or ``unseen`` first seen
    after the call: that sighting may show the tagger's own value) leaves the observation to
    decide; :meth:`GcpIngest.confirm` then asks Cloud Logging (a held call whose entry is late)."""
    if requested is None:
        return None
    if stored is None or stored.state == "terminated" or call is None:
        return dict(requested)
    fresh = max(stored.observed_at, stored.workload.observed_at) >= call.timestamp() - CLOCK_SKEW
    seen = stored.workload.tags
    writes = stored.label_writes or {}
    dims = mapper.label_keys() if mapper is not None else {}

    def sets(key: str, value: str) -> bool:
        dim = dims.get(key)
        w = writes.get(dim) if dim is not None else None
        if mapper is not None and dim is not None and w is not None and w.by != "unseen":
            same = w.value == mapper.canonical_value(dim, value)
            if not tagger:
                return not same or w.at >= call.timestamp()
            if same and w.by == "other" and w.at < call.timestamp():
                # a held call set it before: the tagger's call re-sent it (one at the same time
                # is not before it; govern_writes holds it anyway, a tagger never outranking it)
                return False
        if (
            tagger
            and mapper is not None
            and dim is not None
            and w is not None
            and w.by == "unseen"
            and w.value == mapper.canonical_value(dim, value)
            and w.seen is not None
            and w.seen < call.timestamp()
        ):
            # held, set by a call no entry attributes (instances.update), and seen before the
            # tagger's call: the call re-sent it, however recent the sighting (a read ended
            # before the call cannot show the call's own value)
            return False
        return fresh or seen.get(key) != value

    return {k: v for k, v in requested.items() if sets(k, v)}


def _entry_time(entry: Mapping[str, Any]) -> datetime | None:
    """A log entry's ``timestamp`` (one Ringfence may not parse otherwise), None when it has none."""
    try:
        t = datetime.fromisoformat(str(entry.get("timestamp", "")).replace("Z", "+00:00"))
    except ValueError:
        return None
    return t if t.tzinfo is not None else None


def _before_call(entry: Mapping[str, Any], call: datetime) -> bool:
    """A log entry (one Ringfence does not parse) is dated at or before ``call``."""
    t = _entry_time(entry)
    return True if t is None else t <= call  # undated: it may be


def _entry_failed(entry: Mapping[str, Any]) -> bool:
    """A log entry (parsed or not) of a call that failed (severity ERROR, or a status with a code
    other than 0): it changed nothing."""
    payload = entry.get("protoPayload")
    status = payload.get("status") if isinstance(payload, Mapping) else None
    code = status.get("code") if isinstance(status, Mapping) else None
    return entry.get("severity") == "ERROR" or (isinstance(code, int) and code != 0)


def _said(entry: GcpEvent) -> tuple[object, ...]:
    """What an entry says decides: which entry, who called and what the call set."""
    return (entry.log_name, entry.event_id, entry.principal, entry.requested, entry.tag_value_ids)


def _entry_key(entry: GcpEvent) -> str:
    """An entry as a claim names it: its log and ``insertId`` with the VM and operation it is
    about, hashed (all of it pushed, of any length). An entry decided without a read spends
    claims from what was pushed: by ``insertId`` alone, a published copy of a genuine entry naming
    another VM, where nothing moves, spent the genuine one's decision before it arrived. A copy
    that names the genuine entry's VM and operation is the genuine entry; one that names others
    is not what Cloud Logging has, so it confirms nothing when read back."""
    about = [entry.log_name, entry.event_id, entry.instance, entry.operation]
    return hashlib.sha256(json.dumps(about).encode()).hexdigest()


def _decided(last: GcpEvent) -> str:
    """The claim a split call's last entry leaves when it decided without reading its first (by
    its own insertId: a forged "last" entry of the operation spends nothing of the genuine one)."""
    return f"decided-last#{_entry_key(last)}"


def _spent(entry: GcpEvent) -> str:
    """The claim an audit entry's approval leaves (:meth:`GcpIngest.apply`)."""
    return f"confirmed#{_entry_key(entry)}"


def _blamed(entry: GcpEvent) -> str:
    """The claim an audit entry's finding leaves (:meth:`GcpIngest.apply`)."""
    return f"blamed#{_entry_key(entry)}"
