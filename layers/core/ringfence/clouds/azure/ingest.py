"""Event Grid deliveries over HTTPS → the handshake, the delivery's secret and/or Entra ID token
checked, and each change read back from ARM (whatever the event carries: a delivery only says
which resource to read) and stored as the same governed workload records AWS ingest writes.

One entry point, :meth:`AzureEvents.handle` (headers, body → :class:`~ringfence.control.api.Response`),
served by ``ringfence.routes.azure`` (``POST /azure/events``) in ``ringfence serve`` and in the
``azureevents`` Lambda function.
"""

from __future__ import annotations

import hmac
from collections.abc import Mapping
from dataclasses import dataclass, field

from azure.core.exceptions import HttpResponseError

from ringfence.control.api import Response, error
from ringfence.control.wiring import BaseWiring, Metric, log, no_metric
from ringfence.governance import TagChange

from .arm import Arm
from .entra import EntraVerifier, TokenRefused
from .events import SCALE_SET, Change, MalformedDelivery, change_of, parse_delivery, validation_code
from .inventory import InventoryResult, nics_by_id, observe, observe_subscription
from .model import NIC, SCALE_SET_VM, SCALE_SET_VM_NIC, VM, ArmId, AzureNic, AzureVm, vm_from_wire
from .wiring import Azure

SECRET_HEADER = "x-ringfence-eventgrid-secret"  # noqa: S105 (a header name, not a secret)
RETRY_AFTER = "30"


@dataclass
class DeliveryResult:
    changed: set[str] = field(default_factory=set)
    ignored: int = 0
    synced: list[str] = field(default_factory=list)  # subscriptions fully re-read (a delete)


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
        return None

    def handle(self, headers: Mapping[str, str], body: bytes) -> Response:
        h = {k.lower(): v for k, v in headers.items()}
        refused = self.authenticate(h)
        if refused is not None:
            return refused
        try:
            events = parse_delivery(body)
            code = validation_code(events)
        except MalformedDelivery as exc:
            return error(400, "not an Event Grid delivery", str(exc))
        if code is not None:
            if h.get("aeg-event-type", "").lower() != "subscriptionvalidation":
                return error(400, "validation event without aeg-event-type: SubscriptionValidation")
            log.info("azure: Event Grid subscription %s validated", h.get("aeg-subscription-name", "?"))
            return Response(200, {"validationResponse": code})
        changes = [c for c in (change_of(ev) for ev in events) if c is not None]
        foreign = sorted(
            {c.resource.subscription for c in changes if not self.azure.cfg.governs(c.resource.subscription)}
        )
        if foreign:
            # the whole delivery is refused (not retried by Event Grid: 403): nothing is stored
            self.metric("AzureEventsForeign", len(changes))
            return error(403, "event for an unknown subscription", ", ".join(foreign))
        try:
            res = self.apply(changes)
        except HttpResponseError as exc:  # ARM throttled past the SDK's retries, or failed
            log.warning("azure: ARM read failed (%s): Event Grid retries the delivery", exc.status_code)
            out = error(503, "ARM unavailable", str(exc.message or exc))
            out.headers["Retry-After"] = RETRY_AFTER
            return out
        res.ignored = len(events) - len(changes)
        self.metric("AzureEvents", len(events))
        return Response(200, {"changed": sorted(res.changed), "ignored": res.ignored, "synced": res.synced})

    def apply(self, changes: list[Change]) -> DeliveryResult:
        res = DeliveryResult()
        full: set[str] = set()
        for c in changes:
            arm = self.azure.arm(c.resource.subscription)
            vm = self._vm_now(arm, c)
            if vm is None:
                # gone, or a NIC/scale set changed: a delete names no vmId, so the subscription is
                # re-read and what ARM no longer lists is gone (converges like reconcile)
                if c.kind == "delete" or c.resource.type in (VM, SCALE_SET_VM, SCALE_SET):
                    full.add(c.resource.subscription)
                continue
            nics = self._nics(arm, vm)
            change = TagChange(c.principal, None)  # the event attests who, not which tags were set
            res.changed |= observe(self.w, [vm], nics, change, event_id=c.event_id, metric=self.metric)
        for sub in sorted(full):
            inv: InventoryResult = observe_subscription(self.w, self.azure.arm(sub), self.metric)
            res.changed |= set(inv.changed)
            res.synced.append(sub)
        self.w.enqueue_compute(sorted(res.changed))
        return res

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
