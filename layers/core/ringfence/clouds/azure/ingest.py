"""Event Grid deliveries over HTTPS → the handshake, the delivery's secret and/or Entra ID token
checked, and each change read back from ARM (whatever the event carries: a delivery only says
which resource to read) and stored as the same governed workload records AWS ingest writes.

One entry point, :meth:`AzureEvents.handle` (headers, body → :class:`~ringfence.control.api.Response`),
served by ``ringfence.routes.azure`` (``POST /azure/events``) in ``ringfence serve`` and in the
``azureevents`` Lambda function.
"""

from __future__ import annotations

import hmac
import time
from collections.abc import Mapping
from dataclasses import dataclass, field

from azure.core.exceptions import HttpResponseError

from ringfence.control.api import Response, error
from ringfence.control.wiring import COMPUTE_NOT_QUEUED, BaseWiring, Metric, log, no_metric, owe_compute
from ringfence.governance import SKEW, LabelWrite, TagChange, is_tagger
from ringfence.labels import LabelMapper
from ringfence.store.base import InventoryRecord

from .arm import Arm
from .entra import EntraVerifier, KeysUnavailable, TokenRefused
from .events import (
    SCALE_SET,
    SECRET_HEADER,
    Change,
    GridEvent,
    MalformedDelivery,
    change_of,
    read_delivery,
    stored_key,
    validation_code,
)
from .inventory import InventoryResult, hand_on, nics_by_id, observe, observe_subscription
from .model import NIC, SCALE_SET_VM, SCALE_SET_VM_NIC, VM, ArmId, AzureNic, AzureVm, to_record, vm_from_wire
from .wiring import Azure

RETRY_AFTER = "30"


@dataclass
class DeliveryResult:
    changed: set[str] = field(default_factory=set)
    gave_back: set[str] = field(default_factory=set)  # of changed: deleted or gone (the priority lane)
    ignored: int = 0
    synced: list[str] = field(default_factory=list)  # subscriptions fully re-read (a delete)


def _delivery_count(h: Mapping[str, str]) -> int:
    """Event Grid's ``aeg-delivery-count``: the attempts made before this one (0: a first
    delivery, as is a delivery whose header is missing or not a number)."""
    try:
        return int(h.get("aeg-delivery-count", "0"))
    except ValueError:
        return 0


def _named(write: LabelWrite | None, value: str) -> bool:
    """The dimension's last known write set ``value`` and was a named caller's (or approved)."""
    return write is not None and write.value == value and write.by != "unseen"


class AzureEvents:
    def __init__(self, w: BaseWiring, azure: Azure, metric: Metric = no_metric) -> None:
        self.w = w
        self.azure = azure
        self.metric = metric
        cfg = azure.cfg
        self.entra = (
            EntraVerifier(cfg.eventgrid_tenant, cfg.eventgrid_audience, cfg.eventgrid_jwks_url, cfg.eventgrid_app_id)
            if cfg.eventgrid_tenant and cfg.eventgrid_audience
            else None
        )

    def authenticate(self, h: Mapping[str, str]) -> Response | None:
        """Each configured check must hold: the delivery secret, the Entra ID token. None: both off."""
        secret = self.azure.cfg.eventgrid_secret
        if not secret and self.entra is None:
            return error(503, "azure events are off", "configure RINGFENCE_EVENTGRID_SECRET or an Entra ID audience")
        if secret and not hmac.compare_digest(h.get(SECRET_HEADER, "").encode(), secret.encode()):
            self.metric("AzureDeliveriesRefused", 1)
            return error(401, "delivery refused", f"missing or wrong {SECRET_HEADER} header")
        if self.entra is not None:
            try:
                self.entra.verify(h.get("authorization"))
            except TokenRefused as exc:
                self.metric("AzureDeliveriesRefused", 1)
                return error(401, "delivery refused", str(exc))
            except KeysUnavailable as exc:
                # neither accepted nor refused: Event Grid retries a 503 (it drops a 401)
                log.warning("azure: %s: Event Grid retries the delivery", exc)
                self.metric("AzureDeliveriesDeferred", 1)
                out = error(503, "Entra ID keys unavailable", str(exc))
                out.headers["Retry-After"] = RETRY_AFTER
                return out
        return None

    def handle(self, headers: Mapping[str, str], body: bytes) -> Response:
        h = {k.lower(): v for k, v in headers.items()}
        refused = self.authenticate(h)
        if refused is not None:
            return refused
        try:
            parsed, bad = read_delivery(body)
        except MalformedDelivery as exc:
            return error(400, "not an Event Grid delivery", str(exc))
        total = len(parsed) + len(bad)
        events: list[tuple[int, GridEvent]] = []
        for i, ev in parsed:
            try:
                validation_code([ev])
                events.append((i, ev))
            except MalformedDelivery as exc:
                bad[i] = f"event [{i}]: {exc}"
        code = validation_code([ev for _, ev in events])
        if code is not None:
            if h.get("aeg-event-type", "").lower() != "subscriptionvalidation":
                return error(400, "validation event without aeg-event-type: SubscriptionValidation")
            log.info("azure: Event Grid subscription %s validated", h.get("aeg-subscription-name", "?"))
            return Response(200, {"validationResponse": code})
        changes: list[Change] = []
        for i, ev in events:
            try:
                c = change_of(ev)
            except MalformedDelivery as exc:
                bad[i] = f"event [{i}]: {exc}"
                continue
            if c is not None:
                changes.append(c)
        if bad and len(bad) == total:
            # nothing in the delivery is an event we can read: refused as a whole (Event Grid does
            # not retry a 400; its dead-letter, where configured, keeps it)
            return error(400, "not an Event Grid delivery", "; ".join(bad[i] for i in sorted(bad)))
        foreign = sorted(
            {c.resource.subscription for c in changes if not self.azure.cfg.governs(c.resource.subscription)}
        )
        if foreign:
            # the whole delivery is refused (not retried by Event Grid: 403): nothing is stored
            self.metric("AzureEventsForeign", len(changes))
            return error(403, "event for an unknown subscription", ", ".join(foreign))
        try:
            res = self.apply(changes, retried=_delivery_count(h) > 0)
        except HttpResponseError as exc:  # ARM throttled past the SDK's retries, or failed
            log.warning("azure: ARM read failed (%s): Event Grid retries the delivery", exc.status_code)
            out = error(503, "ARM unavailable", str(exc.message or exc))
            out.headers["Retry-After"] = RETRY_AFTER
            return out
        res.ignored = len(events) - len(changes) - len([i for i, _ in events if i in bad])
        self.metric("AzureEvents", len(events))
        body_out: dict[str, object] = {"changed": sorted(res.changed), "ignored": res.ignored, "synced": res.synced}
        if bad:
            # the delivery's good events are applied and it is answered 200 (a 400 is not retried
            # and would dead-letter the good events with the bad); each bad one is logged by index,
            # counted and listed in the answer
            for i in sorted(bad):
                log.warning("azure: malformed event in a delivery, skipped: %s", bad[i])
            self.metric("AzureEventsMalformed", len(bad))
            body_out["malformed"] = [{"index": i, "error": bad[i]} for i in sorted(bad)]
        return Response(200, body_out)

    def apply(self, changes: list[Change], *, retried: bool = False) -> DeliveryResult:
        """Each change read back from ARM and stored; compute is asked about what changed, also
        when a later change of the delivery fails (a 503: Event Grid delivers it all again): what
        was stored before then is handed on, since its redelivery finds nothing more to store and
        would hand on nothing (a grant's end would never reach compute). ``retried`` (Event Grid's
        redelivery, ``aeg-delivery-count`` above 0): the VMs its events name are handed on even
        where nothing is stored, since the first delivery may have stored the change and failed
        to hand it on (a first delivery does not: a tag storm of writes compute reads nothing of
        stays out of compute, and only a failure of ours makes Event Grid deliver again)."""
        res = DeliveryResult()
        full: set[str] = set()
        deleted: list[ArmId] = []  # what delete events name: handed on again where stored gone already
        named: set[str] = set()  # the VMs the events name, handed on by a redelivery
        passed: set[str] = set()  # handed on by a subscription pass already
        try:
            for c in changes:
                arm = self.azure.arm(c.resource.subscription)
                vm = self._vm_now(arm, c)
                if vm is None:
                    # gone, or a NIC/scale set changed: a delete names no vmId, so the subscription is
                    # re-read and what ARM no longer lists is gone (converges like reconcile)
                    if c.kind == "delete" or c.resource.type in (VM, SCALE_SET_VM, SCALE_SET):
                        full.add(c.resource.subscription)
                    if c.kind == "delete":
                        deleted.append(c.resource)
                    continue
                if retried:
                    named.add(vm.vm_id)
                nics = self._nics(arm, vm)
                # the event attests who and when, not which tags were set: a write of the VM ends
                # an approval made before it, and its caller is named only where the write may
                # have made a held move nobody has been named for yet, or ended an approval
                # (:meth:`_change`)
                stored = self.w.store.get(vm.vm_id)
                legacy = c.event_id
                if stored is not None and stored.label_writes:
                    # an earlier delivery of the event made before its key had a digest (b0245af):
                    # its writes matched and its records named by the bare id, new writes by c's key
                    legacy = stored_key(c.event_id, stored.label_writes.values(), time.time())
                change = self._change(c, vm, nics, stored, legacy)
                try:
                    res.changed |= observe(
                        self.w, [vm], nics, change, event_id=legacy, metric=self.metric, gave_back=res.gave_back
                    )
                except BaseException:
                    res.changed.add(vm.vm_id)  # it may be stored (a failure after its write): compute re-reads it
                    raise
            for sub in sorted(full):
                inv: InventoryResult = observe_subscription(self.w, self.azure.arm(sub), self.metric, deleted)
                res.changed |= set(inv.changed)
                res.gave_back |= set(inv.gave_back)
                passed |= set(inv.changed)
                res.synced.append(sub)
        except BaseException:
            if (res.changed | named) - passed:
                self._hand_on_stored((res.changed | named) - passed, res.gave_back)
            raise
        try:
            hand_on(self.w, (res.changed | named) - passed, res.gave_back)
        except Exception:
            # raised for Event Grid's redelivery (which hands the VMs it names on again: ``named``),
            # and counted as every failed hand-off is
            log.exception("azure: %s stored but compute could not be queued", ", ".join(sorted(res.changed)))
            self.metric(COMPUTE_NOT_QUEUED, 1)
            owed = (res.changed | named) - passed
            owe_compute(self.w, owed, "azure event", self.metric, urgent=res.gave_back)
            raise
        return res

    def _hand_on_stored(self, changed: set[str], gave_back: set[str]) -> None:
        """What a failing delivery stored before it failed, to compute (``gave_back``: deleted, in
        the priority lane); a failure to queue it is logged and counted, and the delivery's own
        failure answered (Event Grid retries it)."""
        try:
            hand_on(self.w, changed, gave_back)
        except Exception:
            log.exception("azure: %s stored but compute could not be queued", ", ".join(sorted(changed)))
            self.metric(COMPUTE_NOT_QUEUED, 1)
            owe_compute(self.w, changed, "azure event", self.metric, urgent=gave_back)

    def _mapper(self) -> LabelMapper | None:
        active = self.w.governing_policy()
        return active[1].labels if active is not None else None

    def _change(
        self, c: Change, vm: AzureVm, nics: dict[str, AzureNic], stored: InventoryRecord | None, legacy: str
    ) -> TagChange:
        """What the event says about the change: its caller, and the held moves the caller is to
        be named for (a finding; quarantine where the policy says so; ``requested``), else none
        (the move stays held, naming nobody). An Azure event does not say what the call set, so
        its caller is named for a move only

        * for a write of the VM itself (a NIC's caller never changed the VM's tags),
        * that may have made the move: this event's read of ARM is the first to see it (the VM's
          governed tags changed from those stored), or it was first seen by an observation that
          named nobody (the scheduled reconcile, another event of the VM such as a NIC write in the
          same delivery, a subscription sync: an ``unseen`` write) and the call's ``eventTime`` is
          no later than that first sighting and no earlier than the last observation of the value
          before (each within :data:`~ringfence.governance.SKEW`); a record with no first sighting
          stored (written before it was recorded) names the caller of a Tags API write only,
        * for a held move no event has named anyone for yet: the move is then recorded as that
          caller's write (the record's ``label_writes``, ``by: other``, with the event's id), so
          each move names one caller once and a release by an operator stands against later
          writes and redeliveries; the same event delivered again names its caller again (the
          same verdict, reported again where its report failed part-way; each record written
          once per event, the quarantine with its record only).

        So the order in which events and observations are processed does not decide who is named;
        when the calls were made does. Never which tags an allowed tagger set: no Azure event
        approves a privileged value.

        A write of the VM itself reported by its system topic is a call of unknown content
        (``unknown_content``, at its ``eventTime``): it may have set any tag, so it ends a grant
        made before it (:func:`~ringfence.governance.govern_writes`): a revocation and a
        re-escalation between two reads of ARM look like no change at all. The value is held again
        and the caller named for it (governance decides that: it knows which grants ended). A
        NIC's write cannot set the VM's tags; a Resource Notification or a custom topic's event is
        not Azure's word about a call: triggers only."""
        own = c.kind == "write" and c.resource.type in (VM, SCALE_SET_VM)
        alias = legacy if legacy != c.event_id else None
        unknown = own and c.system_topic
        principal = c.principal
        if principal is None or not own:
            return TagChange(None, None, c.time, unknown_content=unknown, event=c.event_id or None, stored_as=alias)
        mapper = self._mapper()
        if mapper is None or not mapper.governed:
            return TagChange(
                principal, None, c.time, unknown_content=unknown, event=c.event_id or None, stored_as=alias
            )
        if is_tagger(mapper.config.taggers, principal):
            # held, not set by the call: no finding, no approval
            return TagChange(
                principal, None, c.time, unknown_content=unknown, event=c.event_id or None, stored_as=alias
            )
        old = stored
        if old is not None and old.state == "terminated":
            old = None
        now = to_record(vm, nics, time.time(), mapper).workload
        wanted = mapper.resolve_tags(now).labels
        before = mapper.resolve_tags(old.workload).labels if old is not None else None
        in_force = old.labels if old is not None else {}
        moves = {d: v for d, v in wanted.items() if mapper.is_privileged(d, v) and in_force.get(d) != v}
        writes = (old.label_writes if old is not None else None) or {}
        fresh = {d: v for d, v in moves.items() if self._may_have_made(c, alias, v, before, writes.get(d), d)}
        if not fresh:
            # a resize, a disk, a later write: each held move names one caller, once (this one only
            # for the values whose grant its call ends)
            return TagChange(
                principal, None, c.time, unknown_content=unknown, event=c.event_id or None, stored_as=alias
            )
        # the named moves at the observation's time (no time given), as before: _may_have_made
        # placed the call against the observations already; the approvals it ends by its own
        # time (a late event of a call older than a grant leaves the grant, as on the other paths)
        requested = {mapper.keys[d][0]: v for d, v in fresh.items()}
        return TagChange(
            principal, requested, unknown_content=unknown, called_at=c.time, event=c.event_id or None, stored_as=alias
        )

    @staticmethod
    def _may_have_made(
        c: Change, alias: str | None, value: str, before: Mapping[str, str] | None, write: LabelWrite | None, dim: str
    ) -> bool:
        """The call of ``c`` may have set ``dim`` to the held ``value`` and nobody has been named for it."""
        if before is None or before.get(dim) != value:
            return True  # this read of ARM is the first to see the value
        if (
            write is not None
            and write.event is not None
            and write.event in (c.event_id, alias)
            and write.value == value
        ):
            # stored by an earlier delivery of this event (whose report may have failed): named
            # again as it was then, so the redelivery decides and reports the same (each record
            # once per event); an end it made is governance's to find again, not a named move
            return write.ended is None
        if _named(write, value):
            return False  # named (or approved) already: a release stands
        if write is None or write.by != "unseen" or write.value != value or write.seen is None:
            return c.tags_write  # no first sighting recorded: as before it was
        if c.time is None:
            return False  # a call of unknown time is not taken for the one an observation saw
        return write.at - SKEW <= c.time <= write.seen + SKEW

    def _vm_now(self, arm: Arm, c: Change) -> AzureVm | None:
        r = c.resource
        if c.kind == "delete":
            return None
        # always ARM's word, never the delivery's: a Resource Notification's resourceInfo is not read
        raw = None
        if r.type == VM:
            raw = arm.vm(r.group, r.names[0])
        elif r.type == SCALE_SET_VM:
            raw = arm.scale_set_vm(r.group, r.names[0], r.names[1])
        elif r.type in (NIC, SCALE_SET_VM_NIC):
            nic = arm.nic(r.group, r.names[0]) if r.type == NIC else None
            owner = (nic or {}).get("properties", {}).get("virtualMachine", {}).get("id")
            if r.type == SCALE_SET_VM_NIC:
                raw = arm.scale_set_vm(r.group, r.names[0], r.names[1])
            elif owner:
                o = ArmId.parse(owner)
                raw = arm.vm(o.group, o.names[0]) if o.type == VM else None
        if raw is None:
            return None
        try:
            return vm_from_wire(raw)
        except ValueError as exc:
            log.warning("azure: %s", exc)
            return None

    def _nics(self, arm: Arm, vm: AzureVm) -> dict[str, AzureNic]:
        if vm.scale_set is not None:
            instance = ArmId.parse(vm.id).names[1]
            return nics_by_id(arm.scale_set_vm_nics(vm.group, vm.scale_set, instance))
        raw = []
        for nid in vm.nic_ids:
            n = ArmId.parse(nid)
            got = arm.nic(n.group, n.names[0])
            if got is not None:
                raw.append(got)
        return nics_by_id(raw)
