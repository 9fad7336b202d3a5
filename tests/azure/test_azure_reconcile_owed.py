"""Azure: a VM the scheduled subscription pass stored gone whose hand-off to compute then failed is
handed on by a later pass however long compute's queue refused, past RINGFENCE_GONE_RESEND_WINDOW
too: the failure marks it owed in the store (SQLite here), and each pass hands the marks on.
Through the reconcile, the local ARM server and the real store."""

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

GUID = "6a000000-0000-4000-8000-0000000cf0f1"
PEER = "6a000000-0000-4000-8000-0000000cf0f2"


def test_attack_azure_a_deletion_refused_by_compute_past_the_resend_window_is_handed_on_by_a_later_pass(
    arm: ArmServer,  # noqa: F811
    azure: Azure,  # noqa: F811
    wiring: LocalWiring,  # noqa: F811
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """The VM is deleted and its event lost; the scheduled pass writes its tombstone and compute's
    queue refuses the hand-off. The outage outlasts the re-send window (0 s: every later pass
    finds the tombstone outside it). The next pass must still hand the deletion to compute, in
    the priority lane, and then no longer owe it."""
    monkeypatch.setattr(wiring.cfg, "gone_resend_window", 0.0)  # the module's wiring is shared
    events = AzureEvents(wiring, azure)
    seed_vm(arm, "gj-1", GUID, "10.20.1.97", PROD_WEB)
    seed_vm(arm, "gj-2", PEER, "10.20.1.98", PROD_WEB)
    for name in ("gj-1", "gj-2"):
        assert handle(events, arm_event(WRITE, vm_id(name), "Microsoft.Compute/virtualMachines/write")) == 200
    arm.delete(vm_id("gj-1"))  # its delete event lost
    failed = fail_once(monkeypatch, wiring, "enqueue_compute")
    with pytest.raises(RuntimeError, match="unavailable"):
        AzureReconcile(wiring, azure).run()
    assert failed
    rec = wiring.store.get(GUID)
    assert rec is not None and rec.state == "terminated", "the pass stored the VM gone"
    assert [(m.workload_id, m.urgent) for m in wiring.store.owed_compute()] == [(GUID, True)]
    sent = lanes(monkeypatch, wiring)
    assert AzureReconcile(wiring, azure).run().changed == []  # nothing more to store
    assert (True, [GUID]) in sent, "the deletion was stored but compute never heard of it"
    assert not any(PEER in ids for _, ids in sent), "a VM the pass did not change was recomputed"
    assert wiring.store.owed_compute() == []
