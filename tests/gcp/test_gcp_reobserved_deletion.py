"""GCP: a deletion observed again (its entry redelivered) is handed to compute again. Where the
first delivery's revocation failed after the tombstone's write and its hand-off of what it stored
failed too (ComputeNotQueued), the redelivery stores nothing: unless it hands the VM on, the
deleted VM stays in its peers' sets until a rebuild. Through the real ingest, the local Google API
and the real store."""

from __future__ import annotations

import secrets

import pytest

from ringfence.clouds.gcp.ingest import GcpIngest
from ringfence.clouds.gcp.instances import LabelSource
from ringfence.local.gcp_api import GcpApi
from ringfence.local.gcp_events import audit_entry, logged
from ringfence.local.gcp_project import PROJECT, ZONE, gcp_config, vm_name
from ringfence.local.wiring import LocalWiring
from tests.gcp.conftest import deliver
from tests.gcp.test_gcp_hand_off import PROD_WEB, push
from tests.storerace import computed, fail_once


def test_a_deletion_whose_revocation_and_hand_off_both_failed_is_computed_on_redelivery(
    gcp: GcpApi, wiring: LocalWiring, monkeypatch: pytest.MonkeyPatch
) -> None:
    metrics: list[str] = []
    ingest = GcpIngest(wiring, gcp_config(gcp, LabelSource.LABELS))
    monkeypatch.setattr(ingest, "metric", lambda name, value: metrics.append(name))
    inst = gcp.add_instance(PROJECT, ZONE, vm_name(), ["10.20.9.9"], labels=PROD_WEB)
    deliver(gcp, ingest, audit_entry("v1.compute.instances.insert", inst))
    token = secrets.token_hex(16)
    wiring.store.put_token(token, inst["id"], 3600)
    fail_once(monkeypatch, wiring.store, "revoke_tokens")
    fail_once(monkeypatch, wiring, "enqueue_compute")
    gcp.delete_instance(PROJECT, ZONE, inst["name"])
    entry = audit_entry("v1.compute.instances.delete", inst)
    logged(gcp, entry)
    assert push(gcp, ingest, entry) != 200
    assert "ComputeNotQueued" in metrics
    rec = wiring.store.get(inst["id"])
    assert rec is not None and rec.state == "terminated"  # stored before the revocation failed
    ids = computed(monkeypatch, wiring)
    assert push(gcp, ingest, entry) == 200  # the redelivery
    assert wiring.store.token_workload(token) is None, "the deleted VM's token still authorizes"
    assert inst["id"] in ids, "the deletion was stored but compute never heard of it"
