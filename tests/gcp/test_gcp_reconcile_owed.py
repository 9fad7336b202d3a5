"""GCP: a VM the scheduled sync stored gone whose hand-off to compute then failed is handed on by a
later scheduled pass however long compute's queue refused, past RINGFENCE_GONE_RESEND_WINDOW too:
the failure marks it owed in the store (SQLite here), and each pass (GcpReconcile.run) hands the
marks on. Through the real reconcile and ingest, the local Google API, the real store and the
local compute worker, down to the peer's served bundle."""

from __future__ import annotations

import pytest

from ringfence.clouds.gcp.instances import LabelSource
from ringfence.clouds.gcp.reconcile import GcpReconcile
from ringfence.local.gcp_api import GcpApi
from ringfence.local.gcp_project import PROJECT, gcp_config, vm_name
from ringfence.local.wiring import LocalWiring
from tests.gcp.test_gcp_hand_off import PROD_WEB
from tests.onprem.test_wiring import in_sets, served
from tests.storerace import lanes, refuse_first_enqueue

PROD_PROC = {**PROD_WEB, "ringfence-role": "processing"}  # the tier that accepts web
ZONE = "northamerica-northeast1-a"  # a region the example policy derives a loc from (app groups need one)


def test_attack_gcp_a_deletion_refused_by_compute_past_the_resend_window_is_handed_on_by_a_later_pass(
    gcp: GcpApi, wiring: LocalWiring, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The web VM is deleted and its entry lost; the scheduled pass's sync writes its tombstone and
    compute's queue refuses the hand-off. The outage outlasts the re-send window (0 s: every later
    pass finds the tombstone outside it). The next pass, the queue healthy, must still hand the
    deletion to compute in the priority lane, and the processing VM's bundle drop its address."""
    web = gcp.add_instance(PROJECT, ZONE, vm_name(), ["10.20.11.1"], labels=PROD_WEB)
    proc = gcp.add_instance(PROJECT, ZONE, vm_name(), ["10.20.11.2"], labels=PROD_PROC)
    cfg = gcp_config(gcp, LabelSource.LABELS)
    GcpReconcile(wiring, cfg).run()  # both inventoried (no events), their bundles computed
    assert wiring.settle(60)
    assert in_sets(served(wiring, proc["id"]), "10.20.11.1"), "the processing tier accepts web"
    monkeypatch.setattr(wiring.cfg, "gone_resend_window", 0.0)
    gcp.delete_instance(PROJECT, ZONE, web["name"])  # its delete entry lost
    refused = refuse_first_enqueue(monkeypatch, wiring)
    with pytest.raises(RuntimeError, match="unavailable"):
        GcpReconcile(wiring, cfg).run()
    rec = wiring.store.get(web["id"])
    assert rec is not None and rec.state == "terminated", "the pass stored the VM deleted"
    assert refused == [], "the refused hand-off reached compute after all"
    assert wiring.settle(60)
    assert in_sets(served(wiring, proc["id"]), "10.20.11.1"), "compute never heard"
    sent = lanes(monkeypatch, wiring)
    assert GcpReconcile(wiring, cfg).run().changed == []  # nothing more to store: only a mark names it
    assert (True, [web["id"]]) in sent, "the deletion was stored but compute never heard of it"
    assert not any(proc["id"] in ids for _, ids in sent), "a VM the pass did not change was recomputed"
    assert wiring.settle(60)
    assert not in_sets(served(wiring, proc["id"]), "10.20.11.1"), "the deleted VM's address is still allowed"
    assert wiring.store.owed_compute() == [], "a mark handed on stays"
