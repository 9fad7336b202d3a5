"""GCP: a VM the scheduled sync stored gone whose hand-off to compute then failed is handed on by
the next sync. Nothing redelivers a scheduled pass: the next one finds the VM stored deleted, has
nothing to store for it, and unless it hands recent tombstones on again the deleted VM stays in
its peers' sets until a rebuild. Through the real ingest, the local Google API and the real store;
the bound on that work (a window) too."""

from __future__ import annotations

import time

import pytest

from ringfence.clouds.gcp.ingest import GcpIngest
from ringfence.clouds.gcp.instances import LabelSource, tombstone
from ringfence.local.gcp_api import GcpApi
from ringfence.local.gcp_events import audit_entry
from ringfence.local.gcp_project import PROJECT, ZONE, gcp_config, vm_name
from ringfence.local.wiring import LocalWiring
from tests.gcp.conftest import deliver
from tests.gcp.test_gcp_hand_off import PROD_WEB
from tests.storerace import fail_once, lanes


def estate(gcp: GcpApi, ingest: GcpIngest, n: int) -> list[dict[str, object]]:
    vms = [gcp.add_instance(PROJECT, ZONE, vm_name(), [f"10.20.9.{i + 1}"], labels=PROD_WEB) for i in range(n)]
    for inst in vms:
        deliver(gcp, ingest, audit_entry("v1.compute.instances.insert", inst))
    return vms


def test_a_vm_a_sync_stored_gone_whose_hand_off_failed_is_handed_on_by_the_next_sync(
    gcp: GcpApi, wiring: LocalWiring, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The VM is deleted and its entry lost. The sync writes its tombstone, then the hand-off to
    compute fails: the sync fails. The next sync must hand the deletion to compute (in the
    priority lane), and not the VM it did not change."""
    ingest = GcpIngest(wiring, gcp_config(gcp, LabelSource.LABELS))
    gone, peer = estate(gcp, ingest, 2)
    gcp.delete_instance(PROJECT, ZONE, str(gone["name"]))
    failed = fail_once(monkeypatch, wiring, "enqueue_compute")
    with pytest.raises(RuntimeError, match="unavailable"):
        ingest.sync(PROJECT)
    assert failed
    rec = wiring.store.get(str(gone["id"]))
    assert rec is not None and rec.state == "terminated", "the sync stored the VM deleted"
    sent = lanes(monkeypatch, wiring)
    assert ingest.sync(PROJECT) == set()  # the next sync: nothing more to store
    assert any(urgent and gone["id"] in ids for urgent, ids in sent), "the deletion stored never reached compute"
    assert not any(peer["id"] in ids for _, ids in sent), "a VM the sync did not change was recomputed"


def test_what_a_sync_hands_on_again_is_bounded_by_its_window(
    gcp: GcpApi, wiring: LocalWiring, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Only the tombstones of the window (``gone_resend_window``), each of them. (The module's
    store holds the other tests' tombstones too.)"""
    ingest = GcpIngest(wiring, gcp_config(gcp, LabelSource.LABELS))
    old, new, _ = estate(gcp, ingest, 3)
    gcp.delete_instance(PROJECT, ZONE, str(old["name"]))
    ingest.sync(PROJECT)
    gcp.delete_instance(PROJECT, ZONE, str(new["name"]))
    ingest.sync(PROJECT)
    sent = lanes(monkeypatch, wiring)
    ingest.sync(PROJECT)
    assert len(sent) == 1 and sent[0][0] and {old["id"], new["id"]} <= set(sent[0][1]), "both tombstones, urgent"
    del sent[:]
    monkeypatch.setattr(wiring.cfg, "gone_resend_window", 0.0)  # all stored before the window
    ingest.sync(PROJECT)
    assert sent == []


def test_attack_gcp_mass_deletion_past_500_tombstones_each_handed_on_again(
    gcp: GcpApi, wiring: LocalWiring, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A scale-in of 600 VMs during a compute-queue outage: the sync stored their tombstones, all
    dated at its listing's time, and their hand-off failed. Each of them must reach compute on the
    next passes, not only the 500 a pass a cap by recency would pick (the same 500 every pass, as
    they tie on their time)."""
    ingest = GcpIngest(wiring, gcp_config(gcp, LabelSource.LABELS))
    listed_at = time.time()
    ids = {f"90000000{i:06d}" for i in range(600)}
    for i in ids:  # as the failed sync stored them (the VMs no longer listed)
        assert wiring.store.observe(tombstone(i, PROJECT, ZONE, listed_at))
    sent = lanes(monkeypatch, wiring)
    for _ in range(2):
        ingest.sync(PROJECT)
    reached = {i for urgent, s in sent if urgent for i in s}
    assert ids <= reached, f"{len(ids - reached)} tombstones never handed on again"
