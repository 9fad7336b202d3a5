"""A VM is deleted from the inventory only when GCP says so: looked up by its numeric id in the zone
it is stored in (or missing from a complete listing of its project), never because a VM of the name
or zone a pushed entry gives is not found. Anyone who may publish to the audit topic writes what
an entry says (it is not read back from Cloud Logging where nothing privileged moves), and a
rename (``instances.setName``) leaves the stored name pointing at nothing: either used to retire a
live VM's agent key and, once the reconcile brought the VM back as new, its approved privileged
label. Through the real ``POST /gcp/events`` route and reconcile, on the local Google API."""

from __future__ import annotations

import time
from typing import Any

import pytest

from ringfence.clouds.gcp import ingest as ingest_module
from ringfence.clouds.gcp.enroll import METHOD, GcpEnroller
from ringfence.clouds.gcp.ingest import GcpIngest
from ringfence.clouds.gcp.reconcile import GcpReconcile
from ringfence.control.agents import AgentApi
from ringfence.local.gcp_api import GcpApi
from ringfence.local.gcp_events import audit_entry, bind_tag_as, push_body, push_token
from ringfence.local.gcp_project import PROJECT, TAGGER, ZONE, gcp_config, tagged_vm
from ringfence.local.wiring import LocalWiring
from tests.aws.test_pipeline import AgentKey
from tests.gcp.conftest import deliver, post, web_vm
from tests.gcp.test_attack_gcp_enroll import enroll, token

MALLORY = "mallory@example.com"  # may publish to the audit topic; no Compute role
OTHER_ZONE = "europe-west1-c"


def _enrolled(gcp: GcpApi, wiring: LocalWiring, ingest: GcpIngest, ip: str, zone: str = ZONE) -> dict[str, Any]:
    """A VM ingested from its genuine insert entry, its agent enrolled (key bound)."""
    tags = {"ringfence-role": "web", "ringfence-app": "ordering", "ringfence-env": "prod"}
    inst = web_vm(gcp, ip) if zone == ZONE else tagged_vm(gcp, [ip], tags, zone=zone)
    deliver(gcp, ingest, audit_entry("v1.compute.instances.insert", inst))
    api = AgentApi(wiring, {METHOD: GcpEnroller(wiring, gcp_config(gcp))})
    status, body = enroll(api, inst["id"], token(gcp, inst), AgentKey())
    assert status == 200, body
    assert wiring.store.agent_key(inst["id"]) is not None
    return inst


def _published(gcp: GcpApi, ingest: GcpIngest, entry: dict[str, Any]) -> dict[str, Any]:
    """Pushed to the topic by someone with pubsub.topics.publish: never in Cloud Logging."""
    status, body = post(ingest, push_body(entry), push_token(gcp))
    assert status == 200, body
    return body


def _alive(wiring: LocalWiring, inst: dict[str, Any], role: str = "web") -> None:
    rec = wiring.store.get(inst["id"])
    assert rec is not None and rec.state == "running", rec
    assert rec.labels.get("role") == role, rec.labels
    assert wiring.store.agent_key(inst["id"]) is not None  # credentials not retired


def test_attack_gcp_forged_entry_naming_no_such_vm_deletes_nothing(gcp: GcpApi, wiring: LocalWiring) -> None:
    """The live VM's id with a name no VM has: it was read by that name, not found, and recorded
    deleted (agent key and tokens revoked). It is looked up by its id where it is stored."""
    ingest = GcpIngest(wiring, gcp_config(gcp))
    inst = _enrolled(gcp, wiring, ingest, "10.40.0.5")
    e = audit_entry("v1.compute.instances.setLabels", inst, principal=MALLORY)
    e["protoPayload"]["resourceName"] = f"projects/{PROJECT}/zones/{ZONE}/instances/no-such-vm"
    e["protoPayload"]["request"] = {"name": "no-such-vm"}
    _published(gcp, ingest, e)
    _alive(wiring, inst)


def test_attack_gcp_forged_entry_with_a_wrong_zone_keeps_the_vm_and_its_approval(
    gcp: GcpApi, wiring: LocalWiring, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The live VM's id in another zone: it was looked up there, recorded deleted, and the next
    reconcile brought it back as a new VM: no agent key, and the tagger's approved jumpbox gone
    (unlabeled, waiting for approval). The stored zone decides where it is looked up; an id that
    is stored nowhere and not found in the entry's zone is not recorded either."""
    monkeypatch.setattr(ingest_module, "LOGGING_LAG", 0.0)
    ingest = GcpIngest(wiring, gcp_config(gcp))
    inst = _enrolled(gcp, wiring, ingest, "10.40.0.6")
    deliver(gcp, ingest, bind_tag_as(gcp, TAGGER, inst, "ringfence-role", "jumpbox"))
    _alive(wiring, inst, "jumpbox")
    e = audit_entry("v1.compute.instances.setLabels", inst, principal=MALLORY)
    e["resource"]["labels"]["zone"] = OTHER_ZONE
    _published(gcp, ingest, e)
    _alive(wiring, inst, "jumpbox")
    GcpReconcile(wiring, gcp_config(gcp), ingest=ingest).run()
    _alive(wiring, inst, "jumpbox")
    # a VM not stored yet (its insert entry not delivered): a forged entry in the wrong zone
    # stores no deletion that its genuine entry would then have to outrun
    unseen = web_vm(gcp, "10.40.0.16")
    e = audit_entry("v1.compute.instances.setLabels", unseen, principal=MALLORY)
    e["resource"]["labels"]["zone"] = OTHER_ZONE
    _published(gcp, ingest, e)
    assert wiring.store.get(unseen["id"]) is None


def test_attack_gcp_renamed_vm_is_followed_not_deleted(gcp: GcpApi, wiring: LocalWiring) -> None:
    """No attacker: instances.setName renames the VM (same id). A tag binding entry names the VM by
    id only: read by the stored (old) name it was not found, and the VM recorded deleted; so did the
    pre-rename entry redelivered. Read by id, the VM is found and its new name stored; the rename's
    own entry is followed."""
    ingest = GcpIngest(wiring, gcp_config(gcp))
    inst = _enrolled(gcp, wiring, ingest, "10.40.0.7")
    stale = audit_entry("v1.compute.instances.insert", inst)  # the genuine entry, as pushed then
    renamed = gcp.rename(PROJECT, ZONE, inst["name"], inst["name"] + "-renamed")
    deliver(gcp, ingest, bind_tag_as(gcp, TAGGER, renamed, "ringfence-env", "prod"))  # a re-bind
    _alive(wiring, inst)
    rec = wiring.store.get(inst["id"])
    assert rec is not None and rec.workload.name == renamed["name"]
    _published(gcp, ingest, stale)  # Pub/Sub redelivers at least once
    _alive(wiring, inst)
    # the rename's own entry: the stored name follows it
    again = gcp.rename(PROJECT, ZONE, renamed["name"], inst["name"] + "-2")
    rename = audit_entry(
        "v1.compute.instances.setName", inst, request={"name": again["name"], "currentName": renamed["name"]}
    )
    out = deliver(gcp, ingest, rename)
    assert out["kind"] == "rename:last", out
    rec = wiring.store.get(inst["id"])
    assert rec is not None and rec.workload.name == again["name"]
    _alive(wiring, inst)


def test_attack_gcp_deleted_vm_recreated_under_its_name_is_told_apart(gcp: GcpApi, wiring: LocalWiring) -> None:
    """A VM deleted and another created under its name: the old id's entry deletes the old VM (a
    lookup by its id in its stored zone finds none), the new VM is not taken for it, and is
    stored under its own id."""
    ingest = GcpIngest(wiring, gcp_config(gcp))
    old = _enrolled(gcp, wiring, ingest, "10.40.0.8")
    gcp.delete_instance(PROJECT, ZONE, old["name"])
    new = web_vm(gcp, "10.40.0.9")
    new = gcp.rename(PROJECT, ZONE, new["name"], old["name"])  # created under the old name
    deliver(gcp, ingest, audit_entry("v1.compute.instances.delete", old))
    rec = wiring.store.get(old["id"])
    assert rec is not None and rec.state == "terminated"
    # a VM that is gone: its token revoked (its key binding stays: GCP never reuses the id)
    assert not wiring.store.revoke_tokens(old["id"]) and wiring.store.agent_key(old["id"]) is not None
    assert wiring.store.get(new["id"]) is None
    deliver(gcp, ingest, audit_entry("v1.compute.instances.insert", new))
    rec = wiring.store.get(new["id"])
    assert rec is not None and rec.state == "running" and rec.workload.ips == ["10.40.0.9"]


def test_attack_gcp_reconcile_leaves_the_vms_of_an_unreachable_zone(gcp: GcpApi, wiring: LocalWiring) -> None:
    """The aggregated list answers a zone it cannot reach with an UNREACHABLE warning and none of
    its VMs, and the zone's own lookups fail too: they are missing from a partial answer, not
    deleted, and keep their credentials (within the bound, UNCONFIRMED_MAX). Once the zone answers
    again, a VM deleted meanwhile is removed."""
    ingest = GcpIngest(wiring, gcp_config(gcp))
    inst = _enrolled(gcp, wiring, ingest, "10.40.0.10", zone=OTHER_ZONE)
    gcp.unreachable(OTHER_ZONE, lookups=True)
    try:
        res = GcpReconcile(wiring, gcp_config(gcp), ingest=ingest).run()
        assert res.failed == {}
        _alive(wiring, inst)
        gcp.delete_instance(PROJECT, OTHER_ZONE, inst["name"])
        GcpReconcile(wiring, gcp_config(gcp), ingest=ingest).run()
        _alive(wiring, inst)  # still not known to be gone
    finally:
        gcp.unreachable()
    GcpReconcile(wiring, gcp_config(gcp), ingest=ingest).run()
    rec = wiring.store.get(inst["id"])
    assert rec is not None and rec.state == "terminated" and not wiring.store.revoke_tokens(inst["id"])


def _reconcile(gcp: GcpApi, wiring: LocalWiring, ingest: GcpIngest, passes: int = 1) -> None:
    for _ in range(passes):
        assert GcpReconcile(wiring, gcp_config(gcp), ingest=ingest).run().failed == {}


def _deleted(wiring: LocalWiring, inst: dict[str, Any]) -> None:
    rec = wiring.store.get(inst["id"])
    assert rec is not None and rec.state == "terminated", rec
    assert rec.workload.ips == [] and rec.labels == {}, rec


def test_attack_gcp_deleted_jumpbox_of_an_unreachable_zone_is_looked_up_by_id(
    gcp: GcpApi, wiring: LocalWiring, monkeypatch: pytest.MonkeyPatch
) -> None:
    """An approved jumpbox deleted (its delete entry lost) in a zone the aggregated list keeps
    answering UNREACHABLE: every pass left it live, with its address, label and agent key, while a
    new VM of the region's other zone was given its address. The sync looks a stored VM of an
    unreachable zone up by its id in that zone: none there, it is deleted at the first pass. A VM
    of that zone still there is read from that lookup and stays."""
    monkeypatch.setattr(ingest_module, "LOGGING_LAG", 0.0)
    metrics: list[tuple[str, float]] = []
    ingest = GcpIngest(wiring, gcp_config(gcp), metric=lambda n, v: metrics.append((n, v)))
    inst = _enrolled(gcp, wiring, ingest, "10.40.0.30", zone=OTHER_ZONE)
    kept = _enrolled(gcp, wiring, ingest, "10.40.0.31", zone=OTHER_ZONE)
    deliver(gcp, ingest, bind_tag_as(gcp, TAGGER, inst, "ringfence-role", "jumpbox"))
    _alive(wiring, inst, "jumpbox")
    gcp.unreachable(OTHER_ZONE)
    try:
        gcp.delete_instance(PROJECT, OTHER_ZONE, inst["name"])
        _reconcile(gcp, wiring, ingest)
    finally:
        gcp.unreachable()
    _deleted(wiring, inst)
    _alive(wiring, kept)
    assert ("GcpZonesUnreachable", 1) in metrics


def test_attack_gcp_unconfirmed_vm_whose_address_a_listed_vm_holds_is_deleted(
    gcp: GcpApi, wiring: LocalWiring, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The zone cannot be read at all (the aggregated list and its own lookups fail), and its
    deleted jumpbox's address is given to a new VM of the region's other zone: the stale record
    held that address (and the jumpbox label on it) beside the new VM. GCP gives an internal
    address to one VM of a network at a time: the unconfirmed record whose address a listed VM of
    its network holds is recorded deleted (GcpVmsFailedClosed); one whose address nobody holds stays."""
    monkeypatch.setattr(ingest_module, "LOGGING_LAG", 0.0)
    metrics: list[tuple[str, float]] = []
    ingest = GcpIngest(wiring, gcp_config(gcp), metric=lambda n, v: metrics.append((n, v)))
    inst = _enrolled(gcp, wiring, ingest, "10.40.0.32", zone=OTHER_ZONE)
    kept = _enrolled(gcp, wiring, ingest, "10.40.0.33", zone=OTHER_ZONE)
    deliver(gcp, ingest, bind_tag_as(gcp, TAGGER, inst, "ringfence-role", "jumpbox"))
    gcp.unreachable(OTHER_ZONE, lookups=True)
    try:
        gcp.delete_instance(PROJECT, OTHER_ZONE, inst["name"])
        _reconcile(gcp, wiring, ingest)
        _alive(wiring, inst, "jumpbox")  # within the bound, nothing says it is gone
        newvm = web_vm(gcp, "10.40.0.32")  # same network, other zone: the address reused
        _reconcile(gcp, wiring, ingest)
        _deleted(wiring, inst)
        _alive(wiring, kept)
    finally:
        gcp.unreachable()
    rec = wiring.store.get(newvm["id"])
    assert rec is not None and rec.state == "running" and rec.workload.ips == ["10.40.0.32"]
    assert ("GcpVmsFailedClosed", 1) in metrics


def test_attack_gcp_vm_unconfirmed_past_the_bound_fails_closed(
    gcp: GcpApi, wiring: LocalWiring, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A zone that cannot be read at all kept a deleted jumpbox live for as long as it lasted. A
    VM not confirmed for a day (UNCONFIRMED_MAX) is recorded deleted: address, label and agent key
    gone (its tokens revoked). Were it alive after all, the first pass that reaches the zone brings it back as a new
    VM (its agent enrols again, its privileged value approved again: held until then)."""
    monkeypatch.setattr(ingest_module, "LOGGING_LAG", 0.0)
    ingest = GcpIngest(wiring, gcp_config(gcp))
    inst = _enrolled(gcp, wiring, ingest, "10.40.0.34", zone=OTHER_ZONE)
    deliver(gcp, ingest, bind_tag_as(gcp, TAGGER, inst, "ringfence-role", "jumpbox"))
    gcp.unreachable(OTHER_ZONE, lookups=True)
    try:
        _reconcile(gcp, wiring, ingest, passes=3)
        _alive(wiring, inst, "jumpbox")
        # five hours later (a Compute API outage of a few hours keeps the zone's VMs), still unreachable
        monkeypatch.setattr(ingest_module, "now", lambda: time.time() + 5 * 3600)
        _reconcile(gcp, wiring, ingest)
        _alive(wiring, inst, "jumpbox")
        # 25 hours later (the bound is a day: docs/deploy-gcp.md), still unreachable
        monkeypatch.setattr(ingest_module, "now", lambda: time.time() + 25 * 3600)
        _reconcile(gcp, wiring, ingest)
        _deleted(wiring, inst)
    finally:
        gcp.unreachable()
    _reconcile(gcp, wiring, ingest)  # alive after all: back as a new VM, the jumpbox not approved
    rec = wiring.store.get(inst["id"])
    assert rec is not None and rec.state == "running" and rec.labels.get("role") != "jumpbox", rec


def test_attack_gcp_forged_entry_in_a_zone_that_does_not_exist_is_refused(gcp: GcpApi, wiring: LocalWiring) -> None:
    """An entry naming a VM not stored, in a zone that does not exist: GCP answers the lookup 404,
    which the route answered 503, so Pub/Sub redelivered it until its dead-letter topic (the
    local API answered an empty list, so this was never exercised). Nothing can ever answer it:
    400, nothing stored. A stored VM named in such a zone is still looked up where it is stored."""
    ingest = GcpIngest(wiring, gcp_config(gcp))
    unseen = web_vm(gcp, "10.40.0.35")
    e = audit_entry("v1.compute.instances.setLabels", unseen, principal=MALLORY)
    e["resource"]["labels"]["zone"] = "zz-nowhere9-q"
    status, body = post(ingest, push_body(e), push_token(gcp))
    assert status == 400 and "does not exist" in body["detail"], body
    assert wiring.store.get(unseen["id"]) is None
    inst = _enrolled(gcp, wiring, ingest, "10.40.0.36")
    e = audit_entry("v1.compute.instances.setLabels", inst, principal=MALLORY)
    e["resource"]["labels"]["zone"] = "zz-nowhere9-q"
    _published(gcp, ingest, e)
    _alive(wiring, inst)


MALFORMED_LABELS: dict[str, object] = {
    "a string": "ringfence-role=web",
    "a number": 5,
    "a list of strings": ["a", "b"],
    "a map with a number": {"ringfence-role": 5},
    "an item with a number": [{"key": "ringfence-role", "value": 5}],
}


@pytest.mark.parametrize("case", sorted(MALFORMED_LABELS))
def test_attack_gcp_insert_with_malformed_labels_is_refused_naming_the_field(
    gcp: GcpApi, wiring: LocalWiring, case: str
) -> None:
    """An insert entry whose labels are not key/value strings raised ValueError or TypeError out of
    the route (a 500 with no reason: Pub/Sub retried it into the dead-letter topic). It is a
    malformed entry like any other: 400 naming the field, nothing stored."""
    ingest = GcpIngest(wiring, gcp_config(gcp))
    inst = web_vm(gcp, "10.41.0.9")
    e = audit_entry("v1.compute.instances.insert", inst, request={"labels": MALFORMED_LABELS[case]})
    status, body = post(ingest, push_body(e), push_token(gcp))
    assert status == 400 and "protoPayload.request.labels" in body["detail"], body
    assert wiring.store.get(inst["id"]) is None
