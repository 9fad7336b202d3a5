"""GCP: one deleted VM whose token revocation fails does not keep the sync's other deleted VMs
from being revoked and tombstoned (the pass fails at its end, for its retry). Through the real
ingest's sync, the local Google API and the real store."""

from __future__ import annotations

import secrets
from typing import Any

import pytest

from ringfence.clouds.gcp.ingest import GcpIngest
from ringfence.clouds.gcp.instances import LabelSource
from ringfence.local.gcp_api import GcpApi
from ringfence.local.gcp_project import PROJECT, ZONE, gcp_config, vm_name
from ringfence.local.wiring import LocalWiring
from tests.gcp.test_gcp_hand_off import PROD_WEB
from tests.storerace import refuse_first_enqueue


def test_attack_one_vms_failed_revocation_does_not_keep_the_other_deleted_vms_from_the_sync(
    gcp: GcpApi, wiring: LocalWiring, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Two VMs with agent tokens are deleted, their delete entries lost; the store refuses the
    first revocation of the sync. Before, that error ended the pass: the other VM was neither
    revoked nor tombstoned either (and a VM whose revocation failed every pass, none of them). Now
    the one refused stays as stored, token live, the other is retired and tombstoned, the sync
    fails at its end, and the next sync retires the first."""
    ingest = GcpIngest(wiring, gcp_config(gcp, LabelSource.LABELS))
    vms = [gcp.add_instance(PROJECT, ZONE, vm_name(), [f"10.20.8.{i}"], labels=PROD_WEB) for i in (1, 2)]
    ingest.sync(PROJECT)
    tokens = {inst["id"]: secrets.token_hex(16) for inst in vms}
    for wid, token in tokens.items():
        wiring.store.put_token(token, wid, 3600)
    for inst in vms:
        gcp.delete_instance(PROJECT, ZONE, inst["name"])
    refused: list[str] = []
    real = wiring.store.audit_with

    def audit_with(rec: Any, change: Any) -> Any:
        if not refused:
            refused.append(rec.target)
            raise RuntimeError("the store is unavailable")
        return real(rec, change)

    monkeypatch.setattr(wiring.store, "audit_with", audit_with)
    with pytest.raises(RuntimeError):
        ingest.sync(PROJECT)
    assert len(refused) == 1
    first = refused[0]
    (other,) = set(tokens) - {first}
    gone = wiring.store.get(other)
    assert gone is not None and gone.state == "terminated", "one VM's failed revocation stopped the sync"
    assert wiring.store.token_workload(tokens[other]) is None
    kept = wiring.store.get(first)
    assert kept is not None and kept.state != "terminated"
    assert wiring.store.token_workload(tokens[first]) == first
    ingest.sync(PROJECT)  # the next pass
    kept = wiring.store.get(first)
    assert kept is not None and kept.state == "terminated"
    assert wiring.store.token_workload(tokens[first]) is None


def test_attack_a_vms_revocation_failing_every_sync_does_not_keep_earlier_tombstones_from_compute(
    gcp: GcpApi, wiring: LocalWiring, monkeypatch: pytest.MonkeyPatch
) -> None:
    """B is deleted, its entry lost; a sync stores its tombstone and fails to queue it for compute
    (the next syncs hand what was stored gone lately on again). Then A is deleted and its
    revocation fails on every sync. Before, each sync failing for A skipped that hand-on, so B's
    address stayed in its peers' sets; now each hands B on, then fails."""
    ingest = GcpIngest(wiring, gcp_config(gcp, LabelSource.LABELS))
    a, b = (gcp.add_instance(PROJECT, ZONE, vm_name(), [f"10.20.9.{i}"], labels=PROD_WEB) for i in (1, 2))
    ingest.sync(PROJECT)
    wiring.store.put_token(secrets.token_hex(16), a["id"], 3600)
    gcp.delete_instance(PROJECT, ZONE, b["name"])
    sent = refuse_first_enqueue(monkeypatch, wiring)
    with pytest.raises(RuntimeError):
        ingest.sync(PROJECT)
    rec = wiring.store.get(b["id"])
    assert rec is not None and rec.state == "terminated" and not sent
    gcp.delete_instance(PROJECT, ZONE, a["name"])
    real_audit = wiring.store.audit_with

    def audit_with(rec: Any, change: Any) -> Any:
        if rec.target == a["id"]:
            raise RuntimeError("the store refuses this one")
        return real_audit(rec, change)

    monkeypatch.setattr(wiring.store, "audit_with", audit_with)
    for _ in range(2):  # two syncs, each failing for A
        sent.clear()
        with pytest.raises(RuntimeError, match="refuses"):
            ingest.sync(PROJECT)
        assert any(b["id"] in ids for ids in sent), "B's tombstone kept from compute while A's revocation fails"
    rec = wiring.store.get(a["id"])
    assert rec is not None and rec.state != "terminated"
