"""GCP events through the /gcp/events route into the inventory: the real SDK clients read the VM
from the local Google API stand-in; governance as on AWS (principalEmail, privileged values)."""

from __future__ import annotations

import json
from typing import Any

import pytest

from ringfence.clouds.gcp import ingest as ingest_module
from ringfence.clouds.gcp.ingest import GcpIngest
from ringfence.clouds.gcp.instances import LabelSource
from ringfence.local.gcp_api import GcpApi
from ringfence.local.gcp_events import audit_entry, push_body, push_token
from ringfence.local.gcp_project import NUMBER, ORG, PROJECT, TAGGER, ZONE, gcp_config, vm_name
from ringfence.local.wiring import LocalWiring
from tests.gcp.conftest import deliver, post, set_labels

PROD_WEB = {"ringfence-role": "web", "ringfence-app": "ordering", "ringfence-env": "prod"}


def bind(gcp: GcpApi, inst: dict[str, Any], tags: dict[str, str]) -> None:
    for k, v in tags.items():
        gcp.bind_tag(PROJECT, ZONE, inst["id"], ORG, k, v)


def test_insert_from_secure_tags_labels_the_vm_and_says_where_each_label_came_from(
    gcp: GcpApi, wiring: LocalWiring
) -> None:
    ingest = GcpIngest(wiring, gcp_config(gcp))
    # a reserved *label* claiming role=database: labels are not a source here
    inst = gcp.add_instance(PROJECT, ZONE, vm_name(), ["10.20.0.5"], labels={"ringfence-role": "database"})
    bind(gcp, inst, PROD_WEB)
    op = "operation-insert-1"
    first = deliver(gcp, ingest, audit_entry("v1.compute.instances.insert", inst, operation=op, last=False))
    assert first["changed"] == [] and first["kind"] == "insert:first"
    last = deliver(gcp, ingest, audit_entry("v1.compute.instances.insert", inst, operation=op, first=False))
    assert last["changed"] == [inst["id"]]
    rec = wiring.store.get(inst["id"])
    assert rec is not None and rec.workload.cloud == "gcp" and rec.workload.account == PROJECT
    assert rec.workload.ips == ["10.20.0.5"] and rec.workload.vpc == "default"
    assert rec.labels == {"role": "web", "app": "ordering", "env": "prod"}
    assert rec.workload.tags["gcp:source:ringfence:role"] == f"secure-tag {ORG}/ringfence-role/web"
    assert "ringfence:role" in rec.workload.tags and rec.workload.tags["ringfence:role"] == "web"


def test_a_secure_tag_under_a_foreign_parent_is_not_a_label(gcp: GcpApi, wiring: LocalWiring) -> None:
    ingest = GcpIngest(wiring, gcp_config(gcp))
    inst = gcp.add_instance(PROJECT, ZONE, vm_name(), ["10.20.0.6"])
    bind(gcp, inst, {"ringfence-app": "ordering", "ringfence-env": "prod"})
    gcp.bind_tag(PROJECT, ZONE, inst["id"], "attacker-project", "ringfence-role", "database")
    deliver(gcp, ingest, audit_entry("v1.compute.instances.insert", inst))
    rec = wiring.store.get(inst["id"])
    assert rec is not None and "role" not in rec.labels


def test_labels_as_source_set_labels_by_a_non_tagger_into_a_privileged_value_is_held(
    gcp: GcpApi, wiring: LocalWiring
) -> None:
    ingest = GcpIngest(wiring, gcp_config(gcp, LabelSource.LABELS))
    inst = gcp.add_instance(PROJECT, ZONE, vm_name(), ["10.20.0.7"], labels=PROD_WEB)
    deliver(gcp, ingest, audit_entry("v1.compute.instances.insert", inst))
    assert wiring.store.get(inst["id"]).labels["role"] == "web"  # type: ignore[union-attr]
    jump = {**PROD_WEB, "ringfence-role": "jumpbox"}
    gcp.set_labels(PROJECT, ZONE, inst["name"], jump)
    request = {"labels": [{"key": k, "value": v} for k, v in jump.items()]}
    deliver(
        gcp, ingest, audit_entry("beta.compute.instances.setLabels", inst, principal="mallory@x.com", request=request)
    )
    rec = wiring.store.get(inst["id"])
    assert rec is not None and rec.labels["role"] == "web" and rec.workload.held_labels is not None
    held = [a for a in wiring.store.audit_log() if a.action == "label.held" and a.target == inst["id"]]
    assert held and held[0].principal == "mallory@x.com"


def test_labels_as_source_an_allowed_tagger_moves_it_across_first_and_last_entries(
    gcp: GcpApi, wiring: LocalWiring
) -> None:
    ingest = GcpIngest(wiring, gcp_config(gcp, LabelSource.LABELS))
    inst = gcp.add_instance(PROJECT, ZONE, vm_name(), ["10.20.0.8"], labels=PROD_WEB)
    deliver(gcp, ingest, audit_entry("v1.compute.instances.insert", inst))
    jump = {**PROD_WEB, "ringfence-role": "jumpbox"}
    request = {"labels": [{"key": k, "value": v} for k, v in jump.items()]}
    op = "operation-setlabels-1"
    # the first entry has the request, the call is not done: nothing changes yet
    deliver(gcp, ingest, audit_entry("v1.compute.instances.setLabels", inst, request=request, operation=op, last=False))
    assert wiring.store.get(inst["id"]).labels["role"] == "web"  # type: ignore[union-attr]
    gcp.set_labels(PROJECT, ZONE, inst["name"], jump)
    out = deliver(gcp, ingest, audit_entry("v1.compute.instances.setLabels", inst, operation=op, first=False))
    assert out["changed"] == [inst["id"]]
    rec = wiring.store.get(inst["id"])
    assert rec is not None and rec.labels["role"] == "jumpbox" and rec.workload.held_labels is None
    assert any(a.action == "label.approve" and a.principal == TAGGER for a in wiring.store.audit_log())


def test_the_last_entry_alone_names_no_request_and_approves_nothing(
    gcp: GcpApi, wiring: LocalWiring, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A last entry whose first entry Cloud Logging does not have: asked again while Logging may
    still be catching up (503, Pub/Sub redelivers), then unattributed (the move is held)."""
    ingest = GcpIngest(wiring, gcp_config(gcp, LabelSource.LABELS))
    inst = gcp.add_instance(PROJECT, ZONE, vm_name(), ["10.20.0.9"], labels=PROD_WEB)
    deliver(gcp, ingest, audit_entry("v1.compute.instances.insert", inst))
    gcp.set_labels(PROJECT, ZONE, inst["name"], {**PROD_WEB, "ringfence-role": "jumpbox"})
    last = audit_entry("v1.compute.instances.setLabels", inst, operation="op-lost", first=False)
    status, body = post(ingest, push_body(last), push_token(gcp))
    assert status == 503 and "no first entry" in body["detail"], body
    monkeypatch.setattr(ingest_module, "LOGGING_LAG", 0.0)
    deliver(gcp, ingest, last)
    rec = wiring.store.get(inst["id"])
    assert rec is not None and rec.labels["role"] == "web" and rec.workload.held_labels is not None


@pytest.mark.parametrize("method", ["v1.compute.instances.setLabels", "v1.compute.instances.insert"])
@pytest.mark.parametrize("caller", [TAGGER, "mallory@shop-prod.iam.gserviceaccount.com"])
def test_a_last_entry_whose_first_went_to_another_process_is_decided_by_the_logged_first(
    gcp: GcpApi, wiring: LocalWiring, caller: str, method: str
) -> None:
    """A long-running setLabels or insert logs a first entry (with the request) and a last one;
    pushed to a function's concurrent instances, they may reach different processes. The last
    entry's process reads the operation's first entry from Cloud Logging (one read, and no second
    to confirm it), since the VM moves into a privileged value: a tagger's change is approved,
    not held (once a second read finds no later call on the VM that may have undone it, and for
    a setLabels a third no earlier one whose value it re-sent); a non-tagger's is a finding
    naming them."""
    ingest = GcpIngest(wiring, gcp_config(gcp, LabelSource.LABELS))
    jump = {**PROD_WEB, "ringfence-role": "jumpbox"}
    if method.endswith("insert"):
        inst = gcp.add_instance(PROJECT, ZONE, vm_name(), ["10.20.0.19"], labels=jump)
        request: dict[str, Any] = {"name": inst["name"], "labels": jump}
    else:
        inst = gcp.add_instance(PROJECT, ZONE, vm_name(), ["10.20.0.19"], labels=PROD_WEB)
        deliver(gcp, ingest, audit_entry("v1.compute.instances.insert", inst))
        gcp.set_labels(PROJECT, ZONE, inst["name"], jump)
        request = {"labels": [{"key": k, "value": v} for k, v in jump.items()]}
    op = f"operation-split-{inst['id']}"
    gcp.write_log(audit_entry(method, inst, principal=caller, request=request, operation=op, last=False))
    last = gcp.write_log(audit_entry(method, inst, principal=caller, operation=op, first=False))
    calls = len(gcp.calls)
    deliver(gcp, ingest, last)
    reads = (3 if method.endswith("setLabels") else 2) if caller == TAGGER else 1
    assert sum(1 for _, path in gcp.calls[calls:] if path == "/v2/entries:list") == reads
    rec = wiring.store.get(inst["id"])
    assert rec is not None
    held = [a.principal for a in wiring.store.audit_log() if a.action == "label.held" and a.target == inst["id"]]
    if caller == TAGGER:
        assert rec.labels["role"] == "jumpbox" and rec.workload.held_labels is None
        assert not held
    else:  # held: what was in force stays (a new VM has no role until a tagger or an admin says)
        assert rec.labels.get("role") == (None if method.endswith("insert") else "web")
        assert rec.workload.held_labels is not None and held == [caller]


def test_a_label_change_that_moves_nothing_privileged_costs_no_logging_read(gcp: GcpApi, wiring: LocalWiring) -> None:
    """Who made a change matters only where it moves a label into a privileged value: a setLabels
    that moves nothing privileged is stored without reading Cloud Logging, whether its first
    entry went to another process (or never existed: a fabricated "last" entry) or a tagger's
    call re-sends a privileged value already in force (setLabels sends every label)."""
    ingest = GcpIngest(wiring, gcp_config(gcp, LabelSource.LABELS))
    inst = gcp.add_instance(PROJECT, ZONE, vm_name(), ["10.20.0.20"], labels=PROD_WEB)
    deliver(gcp, ingest, audit_entry("v1.compute.instances.insert", inst))
    method = "v1.compute.instances.setLabels"

    # a split change of app (not privileged): its first entry elsewhere, then only a last one
    op = f"operation-app-{inst['id']}"
    gcp.write_log(set_labels(gcp, inst, {**PROD_WEB, "ringfence-app": "payroll"}, operation=op, last=False))
    calls = len(gcp.calls)
    deliver(gcp, ingest, audit_entry(method, inst, operation=op, first=False))
    assert sum(1 for _, path in gcp.calls[calls:] if path == "/v2/entries:list") == 0
    assert wiring.store.get(inst["id"]).labels["app"] == "payroll"  # type: ignore[union-attr]

    # a fabricated last entry of an operation Cloud Logging never had: no read, no 503
    calls = len(gcp.calls)
    deliver(gcp, ingest, audit_entry(method, inst, operation="op-never", first=False))
    assert sum(1 for _, path in gcp.calls[calls:] if path == "/v2/entries:list") == 0

    # the tagger moves role to jumpbox (privileged): read back (with the later calls) and its
    # earlier label writes read (what it may have re-sent), approved
    jump = {**PROD_WEB, "ringfence-app": "payroll", "ringfence-role": "jumpbox"}
    calls = len(gcp.calls)
    deliver(gcp, ingest, set_labels(gcp, inst, jump))
    assert sum(1 for _, path in gcp.calls[calls:] if path == "/v2/entries:list") == 2
    assert wiring.store.get(inst["id"]).labels["role"] == "jumpbox"  # type: ignore[union-attr]

    # then changes app again, re-sending role=jumpbox, which is in force already: no read
    calls = len(gcp.calls)
    deliver(gcp, ingest, set_labels(gcp, inst, {**jump, "ringfence-app": "core"}))
    assert sum(1 for _, path in gcp.calls[calls:] if path == "/v2/entries:list") == 0
    rec = wiring.store.get(inst["id"])
    assert rec is not None and rec.labels["role"] == "jumpbox" and rec.labels["app"] == "core"
    assert rec.workload.held_labels is None


def test_a_taggers_approval_survives_an_observation_stored_during_its_logging_read(
    gcp: GcpApi, wiring: LocalWiring
) -> None:
    """While the tagger's entry is read back from Cloud Logging (with retries, maybe), another
    process (a sync, a reconcile) stores a newer observation of the VM: the approval is still
    stored, since the VM is read again after the Logging read (an observation from before it
    would be dropped as older, its approval with it, and the entry spent)."""
    ingest = GcpIngest(wiring, gcp_config(gcp, LabelSource.LABELS))
    other = GcpIngest(wiring, gcp_config(gcp, LabelSource.LABELS))  # another worker
    inst = gcp.add_instance(PROJECT, ZONE, vm_name(), ["10.20.0.22"], labels=PROD_WEB)
    deliver(gcp, ingest, audit_entry("v1.compute.instances.insert", inst))
    jump = {**PROD_WEB, "ringfence-role": "jumpbox"}
    gcp.set_labels(PROJECT, ZONE, inst["name"], jump)
    request = {"labels": [{"key": k, "value": v} for k, v in jump.items()]}
    real = ingest.logs.find

    def find_while_another_syncs(*a: Any, **kw: Any) -> Any:
        other.sync(PROJECT)
        return real(*a, **kw)

    ingest.logs.find = find_while_another_syncs  # type: ignore[method-assign]
    deliver(gcp, ingest, audit_entry("v1.compute.instances.setLabels", inst, request=request))
    rec = wiring.store.get(inst["id"])
    assert rec is not None and rec.labels["role"] == "jumpbox" and rec.workload.held_labels is None


def test_delete_tombstones_and_a_mig_launch_is_recognised(gcp: GcpApi, wiring: LocalWiring) -> None:
    ingest = GcpIngest(wiring, gcp_config(gcp))
    mig = f"projects/{NUMBER}/zones/{ZONE}/instanceGroupManagers/web-mig"
    inst = gcp.add_instance(PROJECT, ZONE, vm_name(), ["10.20.0.10"], created_by=mig)
    bind(gcp, inst, PROD_WEB)
    entry = audit_entry("v1.compute.instances.insert", inst, principal=f"{NUMBER}@cloudservices.gserviceaccount.com")
    deliver(gcp, ingest, entry)
    rec = wiring.store.get(inst["id"])
    assert rec is not None and rec.workload.tags["gcp:instance-group-manager"] == "web-mig"
    gcp.delete_instance(PROJECT, ZONE, inst["name"])
    out = deliver(gcp, ingest, audit_entry("v1.compute.instances.delete", inst))
    assert out["changed"] == [inst["id"]]
    assert wiring.store.get(inst["id"]).state == "terminated"  # type: ignore[union-attr]


def test_a_late_delete_of_a_vm_whose_name_was_reused_tombstones_the_old_id_only(
    gcp: GcpApi, wiring: LocalWiring
) -> None:
    ingest = GcpIngest(wiring, gcp_config(gcp))
    old = gcp.add_instance(PROJECT, ZONE, vm_name(), ["10.20.0.16"])
    bind(gcp, old, PROD_WEB)
    deliver(gcp, ingest, audit_entry("v1.compute.instances.insert", old))
    gcp.delete_instance(PROJECT, ZONE, old["name"])
    new = gcp.add_instance(PROJECT, ZONE, old["name"], ["10.20.0.17"])
    bind(gcp, new, PROD_WEB)
    out = deliver(gcp, ingest, audit_entry("v1.compute.instances.delete", old))
    assert out["changed"] == [old["id"]]
    assert wiring.store.get(old["id"]).state == "terminated"  # type: ignore[union-attr]
    assert wiring.store.get(new["id"]) is None  # the new VM arrives with its own insert


def test_a_tag_binding_event_relabels_the_vm(gcp: GcpApi, wiring: LocalWiring) -> None:
    ingest = GcpIngest(wiring, gcp_config(gcp))
    inst = gcp.add_instance(PROJECT, ZONE, vm_name(), ["10.20.0.11"])
    bind(gcp, inst, PROD_WEB)
    deliver(gcp, ingest, audit_entry("v1.compute.instances.insert", inst))
    gcp.bind_tag(PROJECT, ZONE, inst["id"], ORG, "ringfence-role", "processing")
    parent = gcp.full_name(PROJECT, ZONE, inst["id"])
    entry = {
        "protoPayload": {
            "serviceName": "cloudresourcemanager.googleapis.com",
            "methodName": "TagBindings.CreateTagBinding",
            "resourceName": parent,
            "request": {"tagBinding": {"parent": parent, "tagValueNamespacedName": f"{ORG}/ringfence-role/processing"}},
            "authenticationInfo": {"principalEmail": TAGGER},
        },
        "insertId": "tb-1",
    }
    out = deliver(gcp, ingest, entry)
    assert out["changed"] == [inst["id"]]
    assert wiring.store.get(inst["id"]).labels["role"] == "processing"  # type: ignore[union-attr]


def test_inventory_sync_lists_every_zone_and_page_and_tombstones_the_gone(gcp: GcpApi, wiring: LocalWiring) -> None:
    ingest = GcpIngest(wiring, gcp_config(gcp))
    a = gcp.add_instance(PROJECT, "europe-west1-c", vm_name(), ["10.21.0.1"])
    b = gcp.add_instance(PROJECT, "europe-west1-d", vm_name(), ["10.21.0.2"])
    ingest.sync(PROJECT)
    assert {a["id"], b["id"]} <= {r.id for r in wiring.store.all_records()}
    gcp.delete_instance(PROJECT, "europe-west1-d", b["name"])
    changed = ingest.sync(PROJECT)
    assert b["id"] in changed and wiring.store.get(b["id"]).state == "terminated"  # type: ignore[union-attr]
    assert wiring.store.get(a["id"]).state == "running"  # type: ignore[union-attr]


def test_a_throttled_api_is_retried(gcp: GcpApi, wiring: LocalWiring) -> None:
    ingest = GcpIngest(wiring, gcp_config(gcp))
    inst = gcp.add_instance(PROJECT, ZONE, vm_name(), ["10.20.0.12"])
    bind(gcp, inst, PROD_WEB)
    gcp.throttle(2, retry_after=1)
    calls = len(gcp.calls)
    out = deliver(gcp, ingest, audit_entry("v1.compute.instances.insert", inst))
    assert out["changed"] == [inst["id"]]
    gets = [p for _, p in gcp.calls[calls:] if p.endswith(f"/zones/{ZONE}/instances")]  # looked up by id
    assert len(gets) == 3  # refused twice (429), answered the third time


def test_an_event_of_an_unknown_project_changes_nothing(gcp: GcpApi, wiring: LocalWiring) -> None:
    ingest = GcpIngest(wiring, gcp_config(gcp))
    inst = gcp.add_instance(PROJECT, ZONE, vm_name(), ["10.20.0.13"])
    entry = audit_entry("v1.compute.instances.insert", inst)
    entry["resource"]["labels"]["project_id"] = "someone-elses"
    before = len(wiring.store.all_records())
    status, body = post(ingest, push_body(entry), push_token(gcp))
    assert status == 400 and "someone-elses" in body["detail"]
    assert len(wiring.store.all_records()) == before


@pytest.mark.parametrize(
    ("why", "token"),
    [
        ("no token", lambda g: None),
        ("another audience", lambda g: push_token(g, audience="https://elsewhere.example/")),
        ("an unpinned sender", lambda g: push_token(g, email="push@attacker.iam.gserviceaccount.com")),
        ("an unverified email", lambda g: push_token(g, email_verified=False)),
        ("another issuer", lambda g: push_token(g, iss="https://evil.example")),
        ("expired", lambda g: push_token(g, exp=1, iat=0)),
    ],
)
def test_attack_gcp_push_without_a_valid_token_is_refused(
    gcp: GcpApi, wiring: LocalWiring, why: str, token: Any
) -> None:
    ingest = GcpIngest(wiring, gcp_config(gcp))
    inst = gcp.add_instance(PROJECT, ZONE, vm_name(), ["10.20.0.14"])
    calls = len(gcp.calls)
    status, body = post(ingest, push_body(audit_entry("v1.compute.instances.insert", inst)), token(gcp))
    assert status == 401, (why, body)
    assert wiring.store.get(inst["id"]) is None
    # nothing was read from the Google APIs for it (the JWKS fetch aside)
    assert all(p.startswith("/oauth2/") for _, p in gcp.calls[calls:])


def test_attack_gcp_push_signed_by_a_foreign_key_is_refused(gcp: GcpApi, wiring: LocalWiring) -> None:
    from ringfence.local.gcp_api import SigningKey

    ingest = GcpIngest(wiring, gcp_config(gcp))
    inst = gcp.add_instance(PROJECT, ZONE, vm_name(), ["10.20.0.15"])
    foreign = SigningKey(kid=gcp.key.kid)  # same key id, another key
    good = json.loads(__import__("base64").urlsafe_b64decode(push_token(gcp).split(".")[1] + "=="))
    status, body = post(ingest, push_body(audit_entry("v1.compute.instances.insert", inst)), foreign.sign(good))
    assert status == 401 and "invalid" in body["detail"].lower()
    assert wiring.store.get(inst["id"]) is None


def test_a_forged_last_entry_of_a_taggers_operation_spends_nothing(
    gcp: GcpApi, wiring: LocalWiring, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Someone who learnt a tagger's operation id pushes a "last" entry of it for the same VM
    before the genuine one: Logging does not list that last entry, so it is asked again (503)
    and then ignored; it does not use up the call's approval, and the genuine last approves."""
    monkeypatch.setattr(ingest_module, "LOGGING_LAG", 0.0)
    ingest = GcpIngest(wiring, gcp_config(gcp, LabelSource.LABELS))
    inst = gcp.add_instance(PROJECT, ZONE, vm_name(), ["10.20.0.29"], labels=PROD_WEB)
    deliver(gcp, ingest, audit_entry("v1.compute.instances.insert", inst))
    jump = {**PROD_WEB, "ringfence-role": "jumpbox"}
    method, op = "v1.compute.instances.setLabels", f"operation-forged-last-{inst['id']}"
    request = {"labels": [{"key": k, "value": v} for k, v in jump.items()]}
    gcp.write_log(audit_entry(method, inst, request=request, operation=op, last=False))
    forged = audit_entry(method, inst, operation=op, first=False)
    status, body = post(ingest, push_body(forged), push_token(gcp))
    assert status == 200, body
    gcp.set_labels(PROJECT, ZONE, inst["name"], jump)
    deliver(gcp, ingest, gcp.write_log(audit_entry(method, inst, operation=op, first=False)))
    rec = wiring.store.get(inst["id"])
    assert rec is not None and rec.labels["role"] == "jumpbox" and rec.workload.held_labels is None
