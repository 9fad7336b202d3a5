"""GCP: a project's sync must not put a VM's old labels back over a label write stored by its
setLabels entry while the sync ran (between its listing and its write): the sync's copy is dated
when its listing began, so the store keeps the entry's newer record. Through the real ingest, the
local Google API and the real store."""

from __future__ import annotations

from typing import Any

import pytest

from ringfence.clouds.gcp.ingest import GcpIngest
from ringfence.clouds.gcp.instances import LabelSource
from ringfence.local.gcp_api import GcpApi
from ringfence.local.gcp_events import audit_entry
from ringfence.local.gcp_project import PROJECT, ZONE, gcp_config, vm_name
from ringfence.local.wiring import LocalWiring
from tests.gcp.conftest import deliver, set_labels
from tests.gcp.test_gcp_hand_off import PROD_WEB


def test_attack_gcp_sync_stale_listing_puts_no_old_labels_back(
    gcp: GcpApi, wiring: LocalWiring, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The VM's env moves prod → dev just after the sync listed the project, and its setLabels
    entry is stored then: after the sync the record says dev, as Google does, not the listing's
    prod (which would keep the VM in prod's sets until the next sync)."""
    ingest = GcpIngest(wiring, gcp_config(gcp, LabelSource.LABELS))
    inst = gcp.add_instance(PROJECT, ZONE, vm_name(), ["10.20.8.21"], labels=PROD_WEB)
    deliver(gcp, ingest, audit_entry("v1.compute.instances.insert", inst))
    wid = inst["id"]
    rec = wiring.store.get(wid)
    assert rec is not None and rec.labels.get("env") == "prod"
    real = ingest.instances.listing
    moved: list[int] = []

    def listing(project: str) -> Any:
        answer = real(project)
        if not moved:  # listed: the owner moves the VM out of prod, and its entry is stored
            moved.append(1)
            deliver(gcp, ingest, set_labels(gcp, inst, {**PROD_WEB, "ringfence-env": "dev"}))
            during = wiring.store.get(wid)
            assert during is not None and during.labels.get("env") == "dev"
        return answer

    monkeypatch.setattr(ingest.instances, "listing", listing)
    ingest.sync(PROJECT)
    assert moved
    rec = wiring.store.get(wid)
    assert rec is not None
    assert rec.workload.tags.get("ringfence:env") == "dev", "the sync put the listing's old labels back"
    assert rec.labels.get("env") == "dev"
    monkeypatch.setattr(ingest.instances, "listing", real)
    ingest.sync(PROJECT)
    again = wiring.store.get(wid)
    assert again is not None and again.labels.get("env") == "dev"


def test_attack_gcp_sync_stale_lookup_of_an_unreachable_zone_puts_no_old_labels_back(
    gcp: GcpApi, wiring: LocalWiring, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The VM's zone is unreachable to the aggregated list, so the sync looks the VM up by its id;
    its env moves prod → dev just after that lookup answered, and its setLabels entry is stored
    then: the lookup's copy is dated before it was read, and the record stays dev."""
    ingest = GcpIngest(wiring, gcp_config(gcp, LabelSource.LABELS))
    inst = gcp.add_instance(PROJECT, ZONE, vm_name(), ["10.20.8.22"], labels=PROD_WEB)
    deliver(gcp, ingest, audit_entry("v1.compute.instances.insert", inst))
    wid = inst["id"]
    real = ingest.instances.by_id
    moved: list[int] = []

    def by_id(project: str, zone: str, instance_id: str) -> Any:
        answer = real(project, zone, instance_id)
        if instance_id == wid and not moved:
            moved.append(1)
            deliver(gcp, ingest, set_labels(gcp, inst, {**PROD_WEB, "ringfence-env": "dev"}))
            during = wiring.store.get(wid)
            assert during is not None and during.labels.get("env") == "dev"
        return answer

    monkeypatch.setattr(ingest.instances, "by_id", by_id)
    gcp.unreachable(ZONE)
    try:
        ingest.sync(PROJECT)
    finally:
        gcp.unreachable()
    assert moved, "the sync did not look the VM up by its id"
    rec = wiring.store.get(wid)
    assert rec is not None and rec.state == "running"
    assert rec.workload.tags.get("ringfence:env") == "dev", "the lookup put its old labels back"
    assert rec.labels.get("env") == "dev"
