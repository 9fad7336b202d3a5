"""Azure: a VM the scheduled subscription pass stored gone whose hand-off to compute then failed is
handed on by the next pass. Nothing redelivers a scheduled pass: the next one finds the VM stored
gone, has nothing to store for it, and unless it hands recent tombstones on again the deleted VM
stays in its peers' sets until a rebuild. Through the reconcile, the local ARM server and the real
store."""

from __future__ import annotations

import pytest

from ringfence.clouds.azure.events import WRITE
from ringfence.clouds.azure.ingest import AzureEvents
from ringfence.clouds.azure.reconcile import AzureReconcile
from ringfence.clouds.azure.wiring import Azure
from ringfence.local.azure_arm import ArmServer
from ringfence.local.azure_estate import seed_vm, vm_id
from ringfence.local.eventgrid import arm_event
from ringfence.local.wiring import LocalWiring
from tests.azure.conftest import PROD_WEB, arm, azure, wiring  # noqa: F401 (fixtures)
from tests.azure.test_azure_hand_off import handle
from tests.storerace import fail_once, lanes

GUID = "6a000000-0000-4000-8000-0000000cf0e1"
PEER = "6a000000-0000-4000-8000-0000000cf0e2"


def test_a_vm_a_pass_stored_gone_whose_hand_off_failed_is_handed_on_by_the_next_pass(
    arm: ArmServer,  # noqa: F811
    azure: Azure,  # noqa: F811
    wiring: LocalWiring,  # noqa: F811
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """The VM is deleted and its event lost. The scheduled pass writes its tombstone, then the
    hand-off to compute fails: the pass fails. The next pass must hand the deletion to compute (in
    the priority lane), and not the peer it did not change."""
    deleted_by_a_pass_whose_hand_off_failed(arm, azure, wiring, monkeypatch, ("gh-1", GUID), ("gh-2", PEER), 95)
    sent = lanes(monkeypatch, wiring)
    assert AzureReconcile(wiring, azure).run().changed == []  # the next pass: nothing more to store
    assert (True, [GUID]) in sent, "the deletion was stored but compute never heard of it"
    assert not any(PEER in ids for _, ids in sent), "a VM the pass did not change was recomputed"


def deleted_by_a_pass_whose_hand_off_failed(
    arm: ArmServer,  # noqa: F811
    azure: Azure,  # noqa: F811
    wiring: LocalWiring,  # noqa: F811
    monkeypatch: pytest.MonkeyPatch,
    gone: tuple[str, str],
    peer: tuple[str, str],
    host: int,
) -> None:
    """Two VMs (name, vmId) stored by their events at 10.20.1.``host`` and the next address; the
    first deleted with its delete event lost; a scheduled pass stores its tombstone and fails on
    compute's queue refusing the hand-off."""
    events = AzureEvents(wiring, azure)
    for k, (name, vm) in enumerate((gone, peer)):
        seed_vm(arm, name, vm, f"10.20.1.{host + k}", PROD_WEB)
        assert handle(events, arm_event(WRITE, vm_id(name), "Microsoft.Compute/virtualMachines/write")) == 200
    arm.delete(vm_id(gone[0]))  # its delete event lost
    failed = fail_once(monkeypatch, wiring, "enqueue_compute")
    with pytest.raises(RuntimeError, match="unavailable"):
        AzureReconcile(wiring, azure).run()
    assert failed
    rec = wiring.store.get(gone[1])
    assert rec is not None and rec.state == "terminated", "the pass stored the VM gone"
