"""GCP: a VM the scheduled sync stored gone whose hand-off to compute then failed is handed on by
the next sync. Nothing redelivers a scheduled pass: the next one finds the VM stored deleted, has
nothing to store for it, and unless it hands recent tombstones on again the deleted VM stays in
its peers' sets until a rebuild. Through the real ingest, the local Google API and the real store;
the bound on that work (a window, a cap) too."""

from __future__ import annotations

import logging

import pytest

from ringfence.clouds.gcp.ingest import GcpIngest
from ringfence.clouds.gcp.instances import LabelSource
from ringfence.control import wiring as wiring_mod
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


def test_what_a_sync_hands_on_again_is_bounded(
    gcp: GcpApi, wiring: LocalWiring, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    """Only the tombstones of the window (``gone_resend_window``), at most ``GONE_RESEND_MAX`` a
    pass, the most recent first; those left out are logged and counted. (The module's store holds
    the other tests' tombstones too.)"""
    metrics: list[tuple[str, float]] = []
    ingest = GcpIngest(wiring, gcp_config(gcp, LabelSource.LABELS), metric=lambda n, v: metrics.append((n, v)))
    old, new, _ = estate(gcp, ingest, 3)
    gcp.delete_instance(PROJECT, ZONE, str(old["name"]))
    ingest.sync(PROJECT)
    gcp.delete_instance(PROJECT, ZONE, str(new["name"]))
    ingest.sync(PROJECT)
    recent = [r for r in wiring.store.all_records() if r.state == "terminated" and r.workload.account == PROJECT]
    assert str(old["id"]) in {r.id for r in recent}
    sent = lanes(monkeypatch, wiring)
    monkeypatch.setattr(wiring_mod, "GONE_RESEND_MAX", 1)
    with caplog.at_level(logging.WARNING, logger="ringfence.aws"):
        ingest.sync(PROJECT)
    assert sent == [(True, [new["id"]])], "the most recent tombstone, alone"
    assert ("GoneResendsCapped", len(recent) - 1) in metrics and str(old["id"]) in caplog.text
    del sent[:]
    monkeypatch.setattr(wiring.cfg, "gone_resend_window", 0.0)  # all stored before the window
    ingest.sync(PROJECT)
    assert sent == []
