"""Azure: a VM deletion whose subscription pass stored the tombstone and then failed to hand it on
(``ComputeNotQueued``) is handed to compute by the event's redelivery. The redelivery's pass finds
the VM stored gone already and stores nothing: unless the deletion the event names is handed on
again, the deleted VM stays in its peers' sets until a rebuild. Through the Event Grid handler, the
local ARM server and the real store."""

from __future__ import annotations

import logging

import pytest

from ringfence.clouds.azure.events import DELETE, WRITE
from ringfence.clouds.azure.ingest import AzureEvents
from ringfence.clouds.azure.wiring import Azure
from ringfence.local.azure_arm import ArmServer
from ringfence.local.azure_estate import seed_vm, vm_id
from ringfence.local.eventgrid import arm_event
from ringfence.local.wiring import LocalWiring
from tests.azure.conftest import PROD_WEB, arm, azure, wiring  # noqa: F401 (fixtures)
from tests.azure.test_azure_hand_off import handle
from tests.storerace import lanes

GUID = "6a000000-0000-4000-8000-0000000cf0d1"
PEER = "6a000000-0000-4000-8000-0000000cf0d2"


def test_a_deletion_whose_hand_offs_failed_is_computed_on_redelivery(
    arm: ArmServer,  # noqa: F811
    azure: Azure,  # noqa: F811
    wiring: LocalWiring,  # noqa: F811
    monkeypatch: pytest.MonkeyPatch,
    caplog: pytest.LogCaptureFixture,
) -> None:
    metrics: list[str] = []
    events = AzureEvents(wiring, azure, lambda name, value: metrics.append(name))
    seed_vm(arm, "rd-1", GUID, "10.20.1.93", PROD_WEB)
    seed_vm(arm, "rd-2", PEER, "10.20.1.94", PROD_WEB)
    for name in ("rd-1", "rd-2"):
        assert handle(events, arm_event(WRITE, vm_id(name), "Microsoft.Compute/virtualMachines/write")) == 200
    real = wiring.enqueue_compute

    def refused(*a: object, **kw: object) -> None:
        raise RuntimeError("the compute queue is unavailable")

    # every compute hand-off of the first delivery fails: the pass's own and the delivery's
    monkeypatch.setattr(wiring, "enqueue_compute", refused)
    arm.delete(vm_id("rd-1"))
    delete = arm_event(DELETE, vm_id("rd-1"), "Microsoft.Compute/virtualMachines/delete")
    with caplog.at_level(logging.ERROR, logger="ringfence.aws"):
        assert handle(events, delete) != 200
    rec = wiring.store.get(GUID)
    assert rec is not None and rec.state == "terminated"  # the tombstone was stored
    assert "ComputeNotQueued" in metrics, "the pass's failed hand-off was neither counted nor retried"
    assert GUID in caplog.text
    monkeypatch.setattr(wiring, "enqueue_compute", real)
    sent = lanes(monkeypatch, wiring)
    assert handle(events, delete) == 200  # delivered again
    assert (True, [GUID]) in sent, "the deletion was stored but compute never heard of it"
    assert not any(PEER in ids for _, ids in sent), "a VM the delete does not name was recomputed"


def test_a_delete_event_names_the_tombstones_of_its_vm_or_scale_sets_vms_only() -> None:
    from ringfence.clouds.azure.inventory import named_by
    from ringfence.clouds.azure.model import ArmId, tombstone
    from ringfence.local.azure_estate import SUB

    ss = f"/subscriptions/{SUB}/resourceGroups/rg/providers/Microsoft.Compute/virtualMachineScaleSets/Web"
    # as the record kept it (lower case) and as the event names it
    gone = tombstone(GUID, SUB, "westeurope", 1.0, "Web_3", f"{ss}/virtualMachines/3".lower())
    assert named_by([ArmId.parse(f"{ss}/virtualMachines/3")])(gone)
    assert named_by([ArmId.parse(ss)])(gone)  # the scale set deleted: all its VMs
    assert not named_by([ArmId.parse(f"{ss}/virtualMachines/4")])(gone)
    assert not named_by([ArmId.parse(ss.replace("/rg/", "/other-rg/"))])(gone)  # a namesake elsewhere
    assert not named_by([ArmId.parse(f"{ss}2")])(gone)
    rd1 = tombstone(GUID, SUB, None, 1.0, "RD-1", vm_id("RD-1").lower())
    assert named_by([ArmId.parse(vm_id("rd-1"))])(rd1)
    assert not named_by([ArmId.parse(vm_id("rd-10"))])(rd1)
    assert not named_by([ArmId.parse(vm_id("rd-1", group="other-rg"))])(rd1)
    assert not named_by([ArmId.parse(vm_id("rd-1", sub="other"))])(rd1)
    # kept no ARM id (written before tombstones kept one): not matched by its name alone
    assert not named_by([ArmId.parse(vm_id("rd-1"))])(tombstone(GUID, SUB, None, 1.0, "rd-1"))
