"""A storm of GCP label changes compute reads nothing of: stored, never handed to compute."""

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
from tests.storerace import race_a_role_in_before_the_write

PROD_WEB = {"ringfence-role": "web", "ringfence-app": "ordering", "ringfence-env": "prod"}


def test_attack_gcp_non_label_storm_sends_nothing_to_compute(
    gcp: GcpApi, wiring: LocalWiring, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Whoever may set a VM's labels flips one outside the reserved prefix (``scratch``) again and
    again: each setLabels is stored, none reaches compute. A label under the prefix still does."""
    ingest = GcpIngest(wiring, gcp_config(gcp, LabelSource.LABELS))
    inst = gcp.add_instance(PROJECT, ZONE, vm_name(), ["10.20.0.71"], labels=PROD_WEB)
    deliver(gcp, ingest, audit_entry("v1.compute.instances.insert", inst))
    sent: list[list[str]] = []
    monkeypatch.setattr(wiring, "enqueue_compute", lambda ids=(), **kw: sent.append(list(ids)))
    for k in range(6):
        out = deliver(gcp, ingest, set_labels(gcp, inst, {**PROD_WEB, "scratch": f"v{k % 2}"}))
        assert out["changed"] == []
        rec = wiring.store.get(inst["id"])
        assert rec is not None and rec.workload.tags["scratch"] == f"v{k % 2}", "stored as the cloud has it"
    assert sent == []
    out: dict[str, Any] = deliver(gcp, ingest, set_labels(gcp, inst, {**PROD_WEB, "ringfence-role": "database"}))
    assert out["changed"] == [inst["id"]] and sent == [[inst["id"]]]


def test_attack_a_concurrent_write_between_read_and_write_still_reaches_compute(
    gcp: GcpApi, wiring: LocalWiring, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Ingest reads the VM (role=web), another delivery then stores it as role=database and
    compute compiles that; this setLabels' write of web, retried over the newer record, is
    compared with what it replaced (database), not with its own earlier read: compute is told."""
    ingest = GcpIngest(wiring, gcp_config(gcp, LabelSource.LABELS))
    inst = gcp.add_instance(PROJECT, ZONE, vm_name(), ["10.20.0.91"], labels=PROD_WEB)
    deliver(gcp, ingest, audit_entry("v1.compute.instances.insert", inst))
    iid = inst["id"]
    s0 = wiring.store.get(iid)
    assert s0 is not None and s0.workload.tags["ringfence:role"] == "web"
    sent: list[list[str]] = []
    monkeypatch.setattr(wiring, "enqueue_compute", lambda ids=(), **kw: sent.append(list(ids)))
    raced = race_a_role_in_before_the_write(monkeypatch, wiring.store, s0)
    out = deliver(gcp, ingest, set_labels(gcp, inst, PROD_WEB))  # the VM as GCP has it: web
    assert raced == ["database"]
    now = wiring.store.get(iid)
    assert now is not None and now.workload.tags["ringfence:role"] == "web" and now.labels["role"] == "web"
    assert out["changed"] == [iid], "the store moved database -> web: compute must recompile it"
    assert [iid] in sent
