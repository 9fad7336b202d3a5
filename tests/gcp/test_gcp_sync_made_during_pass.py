"""GCP: a VM made while a project's sync runs, which its aggregated listing missed, is stored by
its own insert entry and runs on: the sync neither tombstones it nor revokes its agent's token.
Through the real ingest, the local Google API and the real store."""

from __future__ import annotations

import secrets
from typing import Any

import pytest

from ringfence.clouds.gcp.ingest import GcpIngest
from ringfence.clouds.gcp.instances import LabelSource
from ringfence.local.gcp_api import GcpApi
from ringfence.local.gcp_events import audit_entry
from ringfence.local.gcp_project import PROJECT, ZONE, gcp_config, vm_name
from ringfence.local.wiring import LocalWiring
from tests.gcp.conftest import deliver
from tests.gcp.test_gcp_hand_off import PROD_WEB


def test_a_vm_made_after_the_sync_listed_and_stored_by_its_insert_runs_on(
    gcp: GcpApi, wiring: LocalWiring, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The VM is made, and stored by its insert entry, just after the sync's listing: the sync's
    tombstones are written at the listing's time, which the VM's own observation is newer than,
    and its token is revoked only where the tombstone lands."""
    ingest = GcpIngest(wiring, gcp_config(gcp, LabelSource.LABELS))
    old = gcp.add_instance(PROJECT, ZONE, vm_name(), ["10.20.8.1"], labels=PROD_WEB)
    deliver(gcp, ingest, audit_entry("v1.compute.instances.insert", old))
    real = ingest.instances.listing
    made: list[dict[str, Any]] = []
    token = secrets.token_hex(16)

    def listing(project: str) -> Any:
        answer = real(project)
        if not made:
            made.append(gcp.add_instance(PROJECT, ZONE, vm_name(), ["10.20.8.2"], labels=PROD_WEB))
            deliver(gcp, ingest, audit_entry("v1.compute.instances.insert", made[0]))
            wiring.store.put_token(token, made[0]["id"], 3600)  # its agent enrolled
        return answer

    monkeypatch.setattr(ingest.instances, "listing", listing)
    ingest.sync(PROJECT)
    assert made
    new = made[0]["id"]
    rec = wiring.store.get(new)
    assert rec is not None and rec.state == "running", "the sync tombstoned a running VM"
    assert wiring.store.token_workload(token) == new, "the sync revoked a running VM's agent token"
    assert not [a for a in wiring.store.audit_log() if a.action == "token.revoke" and a.target == new]
    kept = wiring.store.get(old["id"])
    assert kept is not None and kept.state == "running"
