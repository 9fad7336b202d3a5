"""Azure: a VM the scheduled subscription pass stored gone whose hand-off to compute then failed is
handed on by a later pass however long compute's queue refused, past RINGFENCE_GONE_RESEND_WINDOW
too: the failure marks it owed in the store (SQLite here), and each pass hands the marks on.
Through the reconcile, the local ARM server and the real store."""

from __future__ import annotations

import pytest

from ringfence.clouds.azure.reconcile import AzureReconcile
from ringfence.clouds.azure.wiring import Azure
from ringfence.local.azure_arm import ArmServer
from ringfence.local.wiring import LocalWiring
from tests.azure.conftest import arm, azure, wiring  # noqa: F401 (fixtures)
from tests.azure.test_azure_reconcile_gone_hand_off import deleted_by_a_pass_whose_hand_off_failed
from tests.storerace import lanes

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
    deleted_by_a_pass_whose_hand_off_failed(arm, azure, wiring, monkeypatch, ("gj-1", GUID), ("gj-2", PEER), 97)
    assert [(m.workload_id, m.urgent) for m in wiring.store.owed_compute()] == [(GUID, True)]
    sent = lanes(monkeypatch, wiring)
    assert AzureReconcile(wiring, azure).run().changed == []  # nothing more to store
    assert (True, [GUID]) in sent, "the deletion was stored but compute never heard of it"
    assert not any(PEER in ids for _, ids in sent), "a VM the pass did not change was recomputed"
    assert wiring.store.owed_compute() == []
