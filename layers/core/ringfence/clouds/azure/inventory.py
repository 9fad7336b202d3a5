"""Azure VMs (and scale sets' VMs) and their NICs → governed inventory records, per subscription."""

from __future__ import annotations

import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from typing import Any

from ringfence.control import credentials
from ringfence.control.governance import store_deletable
from ringfence.control.wiring import (
    COMPUTE_NOT_QUEUED,
    BaseWiring,
    Metric,
    hand_on_gone_again,
    log,
    no_metric,
    owe_compute,
)
from ringfence.governance import TagChange
from ringfence.store.base import InventoryRecord, releases_addresses

from .arm import Arm, Page
from .events import SCALE_SET
from .model import SCALE_SET_VM, VM, ArmId, AzureNic, AzureVm, nic_from_wire, to_record, tombstone, vm_from_wire


@dataclass
class InventoryResult:
    seen: int = 0
    changed: list[str] = field(default_factory=list)
    gone: list[str] = field(default_factory=list)
    skipped: list[str] = field(default_factory=list)  # resources ARM returned that are not VMs we can read
    gave_back: list[str] = field(default_factory=list)  # of changed: deleted or gone (the priority lane)


def read_vms(pages: Iterable[Page], res: InventoryResult) -> list[AzureVm]:
    out = []
    for page in pages:
        for item in page.items:
            try:
                out.append(vm_from_wire(item, page.read_at))
            except ValueError as exc:
                log.warning("azure: %s", exc)
                res.skipped.append(str(item.get("id")))
    return out


def observe(
    w: BaseWiring,
    vms: list[AzureVm],
    nics: dict[str, AzureNic],
    change: TagChange | None = None,
    *,
    event_id: str = "",
    metric: Metric = no_metric,
    gave_back: set[str] | None = None,
    observed_at: float | None = None,
) -> set[str]:
    """Store what these VMs are now (governed against the stored records); the ids that changed
    in what compute reads (:func:`concerns_compute`): a VM's tag outside the labels' prefix, which
    any tag writer may change as often as they like, is stored and not handed on. ``gave_back``
    gets the ids whose write gave their addresses back (deleted: :func:`releases_addresses`).
    ``observed_at``: when the read of these VMs began (else now)."""
    mapper = w.mapper()
    stored = w.store.get_many([v.vm_id for v in vms])
    # a VM's workload is dated when its read returned (a listing's VM: when its page did), so that a
    # move it first saw is one a call made by then may have set, and no later call (LabelWrite.seen:
    # who answers for it); the record, dated when the read began, loses to an event's write stored since
    read = time.time()
    t0 = read if observed_at is None else observed_at
    observed = [to_record(vm, nics, t0, mapper, seen_at=read if vm.read_at is None else vm.read_at) for vm in vms]
    what = f"azure event {event_id or '-'}"
    return store_deletable(
        w, observed, stored, change, event_id=event_id, metric=metric, gave_back=gave_back, what=what, gone="VM deleted"
    )


def hand_on(w: BaseWiring, changed: Iterable[str], gave_back: Iterable[str]) -> None:
    """Compute for ``changed``: those that gave their addresses back (deleted, gone) first, in the
    priority lane, as AWS's removals: a deleted VM's address may be given to a new VM, and must
    not stay allowed in its peers' sets while a tag storm's backlog drains."""
    ids, first = set(changed), set(gave_back)
    if ids & first:
        w.enqueue_compute(sorted(ids & first), urgent=True)
    if ids - first:
        w.enqueue_compute(sorted(ids - first))


def nics_by_id(raw: Iterable[dict[str, Any]]) -> dict[str, AzureNic]:
    return {n.id.lower(): n for n in (nic_from_wire(x) for x in raw)}


def named_by(deleted: Iterable[ArmId]) -> Callable[[InventoryRecord], bool]:
    """Whether a record is of a VM one of ``deleted`` names: a VM or a scale set's VM by its ARM
    id, a scale set by its VMs' (``<scale set's id>/virtualMachines/<instance>``), as ARM compares
    ids (case-insensitively), by the ARM id the record keeps. Not by name: a scale set deleted in
    one resource group would name every VM ever stored of a namesake in another. A record stored
    before records kept their ARM id is named by none (the scheduled pass hands on what was
    stored gone lately: :func:`hand_on_gone_again`). The ids are gathered once, for a pass that
    tests every record of its subscription stored gone."""
    vms: set[str] = set()
    scale_sets: set[str] = set()
    for r in deleted:
        rid = r.id.strip().lower()
        if r.type in (VM, SCALE_SET_VM):
            vms.add(rid)
        elif r.type == SCALE_SET:
            scale_sets.add(rid)

    def named(rec: InventoryRecord) -> bool:
        rid = rec.workload.resource
        # a scale set's VM: …/virtualmachinescalesets/<set>/virtualmachines/<instance>
        return rid is not None and (rid in vms or rid.rsplit("/", 2)[0] in scale_sets)

    return named


def observe_subscription(
    w: BaseWiring, arm: Arm, metric: Metric = no_metric, deleted: Iterable[ArmId] = (), *, scheduled: bool = False
) -> InventoryResult:
    """A full sync of one subscription: every VM, every scale set's VMs, their NICs; stored Azure
    workloads of the subscription that ARM no longer lists are gone. Reconcile and deletes run it.
    ``deleted``: what the delete events that asked for the pass name; their VMs' records stored
    deleted already are handed on again (in the priority lane): the event's first delivery may
    have stored the tombstone and failed to hand it on, and its redelivery stores nothing.
    ``scheduled`` (reconcile's pass, which nothing redelivers): the subscription's VMs stored gone
    lately are handed on again too (:func:`hand_on_gone_again`)."""
    is_named = named_by(deleted)
    res = InventoryResult()
    # before the listing: a VM it misses because it was made later is stored by its own event
    # after this time, which the tombstone written at it does not overwrite
    listed_at = time.time()
    vms = read_vms(arm.vms(), res)
    nics = nics_by_id(arm.nics())
    for ss in arm.scale_sets():
        sid = ArmId.parse(ss["id"])
        group, name = sid.group, sid.names[0]
        vms.extend(read_vms(arm.scale_set_vms(group, name), res))
        nics.update(nics_by_id(arm.scale_set_nics(group, name)))
    res.seen = len(vms)
    gave_back: set[str] = set()
    stored_gone: list[InventoryRecord] = []  # of the subscription, not listed, stored gone before the pass
    # dated when the listing began, as its tombstones: a VM's write stored by its event after
    # then (its tags changed during the pass) is newer than this listing's copy, which the store
    # drops rather than putting the old tags back
    changed = observe(w, vms, nics, metric=metric, gave_back=gave_back, observed_at=listed_at)
    failed: list[Exception] = []  # revocations that failed: their VMs left as stored
    try:
        live = {v.vm_id for v in vms}
        for rec in w.store.all_records():
            mine = rec.workload.cloud == "azure" and (rec.workload.account or "").lower() == arm.subscription.lower()
            if not mine or rec.id in live:
                continue
            if rec.state == "terminated":
                stored_gone.append(rec)
                if is_named(rec):
                    changed.add(rec.id)
                    gave_back.add(rec.id)
                continue
            # its token revoked before its tombstone is written: a tombstone stored whose revocation
            # then failed would be skipped by every later pass (as stored gone), token and all.
            # Only where the tombstone lands: not over a VM observed after the listing
            try:
                retired = credentials.retire_before_tombstone(w, rec.id, listed_at, "VM gone (azure inventory)")
            except Exception as exc:
                # one VM's failed revocation does not keep the others' tombstones from the pass
                log.warning(
                    "azure sync of %s: the token of %s could not be revoked (%s): left as stored",
                    arm.subscription,
                    rec.id,
                    exc,
                )
                failed.append(exc)
                continue
            if not retired:
                continue
            was = rec.workload
            gone = tombstone(rec.id, arm.subscription, was.region, listed_at, was.name, was.resource)
            if w.store.observe(gone):
                changed.add(rec.id)
                res.gone.append(rec.id)
                if releases_addresses(rec, gone):
                    gave_back.add(rec.id)
    finally:
        # what was stored is handed on even when a later step fails: the next pass finds nothing
        # more to store for it and would not
        res.changed = sorted(changed)
        res.gave_back = sorted(gave_back & changed)
        try:
            hand_on(w, res.changed, res.gave_back)
        except Exception:
            # raised for the caller's retry (an event's redelivery hands the deletion it names on
            # again: ``deleted``), and counted as every failed hand-off is
            log.exception("azure sync of %s: %s stored but compute could not be queued", arm.subscription, res.changed)
            metric(COMPUTE_NOT_QUEUED, 1)
            owe_compute(w, res.changed, f"azure sync of {arm.subscription}", metric, urgent=res.gave_back)
            raise
    if scheduled:
        # also when a VM's revocation failed: the pass failing for that VM on every retry must not
        # keep what was stored gone earlier from compute
        hand_on_gone_again(w, stored_gone, lambda r: True, res.changed, f"azure sync of {arm.subscription}", metric)
    if failed:  # the pass fails, for its retry (the next pass revokes and tombstones them)
        raise failed[0]
    return res
