"""GCP: a deleted VM gives its address back to the network, which may give it to a new VM; it
leaves its peers' sets through compute's priority lane, as an AWS instance's termination does, so
the address is not left allowed behind a label storm's backlog in the ordinary lane
(docs/threat-model.md). A label change stays in the ordinary lane. Through the /gcp/events route
and the sync, the local Google API and the real store; the lane of each compute message recorded."""

from __future__ import annotations

import pytest

from ringfence.clouds.gcp.ingest import GcpIngest
from ringfence.clouds.gcp.instances import LabelSource
from ringfence.local.gcp_api import GcpApi
from ringfence.local.gcp_events import audit_entry
from ringfence.local.gcp_project import PROJECT, ZONE, gcp_config, vm_name
from ringfence.local.wiring import LocalWiring
from tests.gcp.conftest import deliver, set_labels
from tests.gcp.test_gcp_hand_off import PROD_WEB
from tests.storerace import lanes


def test_attack_gcp_a_deleted_vm_leaves_its_peers_in_the_priority_lane(
    gcp: GcpApi, wiring: LocalWiring, monkeypatch: pytest.MonkeyPatch
) -> None:
    ingest = GcpIngest(wiring, gcp_config(gcp, LabelSource.LABELS))
    inst = gcp.add_instance(PROJECT, ZONE, vm_name(), ["10.20.6.1"], labels=PROD_WEB)
    deliver(gcp, ingest, audit_entry("v1.compute.instances.insert", inst))
    sent = lanes(monkeypatch, wiring)
    deliver(gcp, ingest, set_labels(gcp, inst, {**PROD_WEB, "ringfence-role": "database"}))
    assert sent == [(False, [inst["id"]])], "a label change takes the ordinary lane"
    sent.clear()
    gcp.delete_instance(PROJECT, ZONE, inst["name"])
    deliver(gcp, ingest, audit_entry("v1.compute.instances.delete", inst))
    rec = wiring.store.get(inst["id"])
    assert rec is not None and rec.state == "terminated"
    assert sent == [(True, [inst["id"]])], "the deleted VM's removal waits in the ordinary lane"


def test_attack_gcp_a_vm_the_sync_finds_deleted_leaves_its_peers_in_the_priority_lane(
    gcp: GcpApi, wiring: LocalWiring, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Its delete entry lost: the sync tombstones it, in the priority lane; the VM it lists (a
    label changed without an entry) in the ordinary one."""
    ingest = GcpIngest(wiring, gcp_config(gcp, LabelSource.LABELS))
    gone = gcp.add_instance(PROJECT, ZONE, vm_name(), ["10.20.6.2"], labels=PROD_WEB)
    kept = gcp.add_instance(PROJECT, ZONE, vm_name(), ["10.20.6.3"], labels=PROD_WEB)
    for inst in (gone, kept):
        deliver(gcp, ingest, audit_entry("v1.compute.instances.insert", inst))
    gcp.delete_instance(PROJECT, ZONE, gone["name"])
    set_labels(gcp, kept, {**PROD_WEB, "ringfence-role": "database"})  # its entry lost too
    sent = lanes(monkeypatch, wiring)
    assert ingest.sync(PROJECT) == {gone["id"], kept["id"]}
    assert sent[:2] == [(True, [gone["id"]]), (False, [kept["id"]])]
    # then what was stored gone before (the module's other test's VM) is handed on again, also in
    # the priority lane (hand_on_gone_again)
    assert all(urgent and gone["id"] not in ids and kept["id"] not in ids for urgent, ids in sent[2:])
