"""Who decides a GCP VM's labels: secure tag keys only under the configured parents (a project
owner's key of the same name carries nothing, and a configuration trusting any parent does not
load), and a privileged move approved only by a tagger's call that Cloud Logging has (a message
published to the topic naming a tagger approves nothing). Against the local Google APIs through
the real SDK clients and the real Logging HTTP path."""

from __future__ import annotations

import contextlib
import copy
import time
from collections.abc import Iterator
from typing import Any

import pytest

from ringfence import serve
from ringfence.clouds.gcp import ingest as ingest_module
from ringfence.clouds.gcp.config import GcpConfig
from ringfence.clouds.gcp.ingest import GcpIngest
from ringfence.clouds.gcp.instances import Instances, LabelSource
from ringfence.clouds.onprem import OnPremAdmin
from ringfence.local.gcp_api import GcpApi
from ringfence.local.gcp_events import (
    audit_entry,
    bind_tag_as,
    logged,
    push_body,
    push_token,
    tag_binding_entry,
    unbind_tag_as,
)
from ringfence.local.gcp_project import NUMBER, ORG, PROJECT, TAGGER, ZONE, gcp_config, gcp_environment, vm_name
from ringfence.local.wiring import LocalWiring
from tests.gcp.conftest import deliver, gcp_policy_files, post, set_labels, web_vm

MALLORY = "mallory@shop-prod.iam.gserviceaccount.com"  # may bind tags on her VMs; not a tagger
BOB = "bob@shop-prod.iam.gserviceaccount.com"  # her colleague, not a tagger
ENTRIES_LIST = "/v2/entries:list"


def reads(gcp: GcpApi, since: int) -> int:
    """How many Cloud Logging reads the control plane made since call ``since``."""
    return sum(1 for _, path in gcp.calls[since:] if path == ENTRIES_LIST)


def audits(w: LocalWiring, action: str, target: str) -> list[Any]:
    return [a for a in w.store.audit_log() if a.action == action and a.target == target]


# --- 1. secure tag keys: the configured parents only, and a configuration must name them -----------


def test_attack_gcp_tag_key_created_under_a_project_grants_no_label(
    gcp: GcpApi, wiring: LocalWiring, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A project owner creates a tag key ``ringfence-role`` in their project (parent
    ``projects/NUMBER``, namespace the project id) and binds ``role=database`` to their VM."""
    # the configuration that trusted every parent (RINGFENCE_GCP_TAG_PARENTS left unset, the old
    # default) does not load: not in the function, not in serve
    env = gcp_environment(gcp)
    del env["RINGFENCE_GCP_TAG_PARENTS"]
    with pytest.raises(ValueError, match="RINGFENCE_GCP_TAG_PARENTS"):
        GcpConfig.from_env(env)
    with pytest.raises(serve.ServeError, match="RINGFENCE_GCP_TAG_PARENTS"):
        serve.gcp_services(wiring, env)
    from ringfence.local.lambdas import load_functions
    from tests.aws.conftest import ROOT

    for k, v in env.items():
        monkeypatch.setenv(k, v)
    monkeypatch.delenv("RINGFENCE_GCP_TAG_PARENTS", raising=False)
    with pytest.raises(ValueError, match="RINGFENCE_GCP_TAG_PARENTS"):
        load_functions(["gcpevents"], ROOT / "functions")

    # the VM: the organization's app and env, and the project owner's own role key
    inst = gcp.add_instance(PROJECT, ZONE, vm_name(), ["10.20.2.1"])
    for k, v in {"ringfence-app": "ordering", "ringfence-env": "prod"}.items():
        gcp.bind_tag(PROJECT, ZONE, inst["id"], ORG, k, v)
    gcp.bind_tag(PROJECT, ZONE, inst["id"], PROJECT, "ringfence-role", "database", parent=f"projects/{NUMBER}")
    effective = gcp.tags[gcp.full_name(PROJECT, ZONE, inst["id"])]
    assert {
        "namespacedTagValue": f"{PROJECT}/ringfence-role/database",
        "tagKeyParentName": f"projects/{NUMBER}",
    }.items() <= next(t for t in effective if t["namespacedTagKey"] == f"{PROJECT}/ringfence-role").items()

    # configured with the organization (the lab's configuration): the project's key carries nothing
    cfg = GcpConfig.from_env(gcp_environment(gcp))
    assert cfg.tag_parents == [f"organizations/{ORG}"]
    deliver(gcp, GcpIngest(wiring, cfg), audit_entry("v1.compute.instances.insert", inst))
    rec = wiring.store.get(inst["id"])
    assert rec is not None and rec.labels.get("app") == "ordering" and rec.labels.get("env") == "prod"
    assert "role" not in rec.labels, rec.labels
    assert "ringfence:role" not in rec.workload.tags and "gcp:source:ringfence:role" not in rec.workload.tags

    # and a reader given no parents trusts no tag at all (it never trusts any parent)
    assert Instances(cfg.endpoints, ()).secure_tags(NUMBER, inst) == []
    assert {t.key for t in Instances(cfg.endpoints, cfg.tag_parents).secure_tags(NUMBER, inst)} == {
        "ringfence-app",
        "ringfence-env",
    }


@pytest.mark.parametrize("source", ["secure-tags", "both", None])
@pytest.mark.parametrize("parents", [None, "", " , "])
def test_an_empty_tag_parents_setting_is_refused_with_a_clear_error(
    gcp: GcpApi, source: str | None, parents: str | None
) -> None:
    env = gcp_environment(gcp)
    env.pop("RINGFENCE_GCP_TAG_PARENTS")
    if parents is not None:
        env["RINGFENCE_GCP_TAG_PARENTS"] = parents
    if source is not None:
        env["RINGFENCE_GCP_LABEL_SOURCE"] = source
    with pytest.raises(ValueError) as err:
        GcpConfig.from_env(env)
    message = str(err.value)
    assert "RINGFENCE_GCP_TAG_PARENTS is empty" in message
    assert "organizations/ORGANIZATION_ID" in message and "any parent" in message, message
    # built in code, the same refusal
    with pytest.raises(ValueError, match="RINGFENCE_GCP_TAG_PARENTS is empty"):
        GcpConfig(projects={PROJECT: NUMBER}, label_source=LabelSource(source or "secure-tags"))


@pytest.mark.parametrize(
    ("parent", "hint"),
    [
        ("organizations/acme", "organizations/ORGANIZATION_ID"),
        ("987654", "organizations/ORGANIZATION_ID"),
        ("folders/123", "never a folder"),
        (f"projects/{PROJECT}", "by its number"),
        ("organizations/987654/", "organizations/ORGANIZATION_ID"),
    ],
)
def test_a_malformed_tag_parent_is_refused_naming_it(gcp: GcpApi, parent: str, hint: str) -> None:
    env = {**gcp_environment(gcp), "RINGFENCE_GCP_TAG_PARENTS": f"organizations/{ORG},{parent}"}
    with pytest.raises(ValueError) as err:
        GcpConfig.from_env(env)
    assert f"RINGFENCE_GCP_TAG_PARENTS: {parent!r} is not a tag key parent" in str(err.value)
    assert hint in str(err.value)


def test_tag_parents_take_organizations_and_project_numbers_and_labels_need_none(gcp: GcpApi) -> None:
    env = {**gcp_environment(gcp), "RINGFENCE_GCP_TAG_PARENTS": f"organizations/{ORG}, projects/{NUMBER}"}
    assert GcpConfig.from_env(env).tag_parents == [f"organizations/{ORG}", f"projects/{NUMBER}"]
    labels = {**gcp_environment(gcp), "RINGFENCE_GCP_TAG_PARENTS": "", "RINGFENCE_GCP_LABEL_SOURCE": "labels"}
    assert GcpConfig.from_env(labels).tag_parents == []


# --- 2. approvals: confirmed with Cloud Logging ---------------------------------------------------


def test_attack_gcp_forged_audit_entry_naming_a_tagger_approves_nothing(
    gcp: GcpApi, wiring: LocalWiring, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Mallory may bind tags on her VM and publish to the audit topic (a valid push follows). She
    binds ``role=jumpbox`` and publishes an entry naming the tagging service account as caller."""
    ingest = GcpIngest(wiring, gcp_config(gcp))
    inst = web_vm(gcp, "10.20.2.10")
    deliver(gcp, ingest, audit_entry("v1.compute.instances.insert", inst))
    assert wiring.store.get(inst["id"]).labels["role"] == "web"  # type: ignore[union-attr]

    genuine = bind_tag_as(gcp, MALLORY, inst, "ringfence-role", "jumpbox")  # logged by Google
    # a fabricated entry: the tagger as caller, an insertId Cloud Logging never wrote
    forged = tag_binding_entry(gcp, inst, "ringfence-role", "jumpbox", principal=TAGGER)
    calls = len(gcp.calls)
    # fresh: Cloud Logging may not list it yet, so the push is answered 503 (Pub/Sub redelivers)
    status, body = post(ingest, push_body(forged), push_token(gcp))
    assert status == 503, body
    assert wiring.store.get(inst["id"]).labels["role"] == "web"  # type: ignore[union-attr]
    assert not audits(wiring, "label.approve", inst["id"])
    monkeypatch.setattr(ingest_module, "LOGGING_LAG", 0.0)  # redelivered once it should be listed
    calls = len(gcp.calls)
    status, body = post(ingest, push_body(forged), push_token(gcp))
    assert status == 200 and body["changed"] == [inst["id"]], body
    rec = wiring.store.get(inst["id"])
    assert rec is not None and rec.labels["role"] == "web", rec.labels
    assert rec.workload.held_labels is not None  # held, not approved
    assert not audits(wiring, "label.approve", inst["id"])
    # a tagger's approval is read back with one listing of the VM's entries, and, not in it, by
    # its insertId
    assert reads(gcp, calls) == 2
    [unconfirmed] = audits(wiring, "label.unconfirmed", inst["id"])
    assert unconfirmed.detail["claimed_principal"] == TAGGER and unconfirmed.detail["event_id"] == forged["insertId"]
    assert "Cloud Logging has no entry" in unconfirmed.reason

    # her real entry with the principal swapped: Cloud Logging names her, and she is not a tagger
    swapped = copy.deepcopy(genuine)
    swapped["protoPayload"]["authenticationInfo"]["principalEmail"] = TAGGER
    status, body = post(ingest, push_body(swapped), push_token(gcp))
    assert status == 200, body
    rec = wiring.store.get(inst["id"])
    assert rec is not None and rec.labels["role"] == "web" and rec.workload.held_labels is not None
    assert not audits(wiring, "label.approve", inst["id"])
    assert any(MALLORY in a.reason for a in audits(wiring, "label.unconfirmed", inst["id"]))
    assert [a.principal for a in audits(wiring, "label.held", inst["id"])] == [MALLORY]  # the finding names her

    # her genuine entry as Google published it: a non-tagger setting a privileged value, read back
    # once before it could name her; the swapped push (the same entry as logged) named her already
    calls = len(gcp.calls)
    deliver(gcp, ingest, genuine)
    assert reads(gcp, calls) == 1
    assert wiring.store.get(inst["id"]).labels["role"] == "web"  # type: ignore[union-attr]
    assert [a.principal for a in audits(wiring, "label.held", inst["id"])] == [MALLORY], "one entry, one finding"

    # the tagger's own change to another VM, logged by Google and pushed: confirmed and approved
    other = web_vm(gcp, "10.20.2.11")
    deliver(gcp, ingest, audit_entry("v1.compute.instances.insert", other))
    real = bind_tag_as(gcp, TAGGER, other, "ringfence-role", "jumpbox")
    calls = len(gcp.calls)
    gcp.throttle(1, path=ENTRIES_LIST)  # the Logging read is throttled once: retried, as the SDK clients' calls are
    status, body = post(ingest, push_body(real), push_token(gcp))
    assert status == 200 and body["changed"] == [other["id"]], body
    assert reads(gcp, calls) == 2
    rec = wiring.store.get(other["id"])
    assert rec is not None and rec.labels["role"] == "jumpbox" and rec.workload.held_labels is None
    assert [a.principal for a in audits(wiring, "label.approve", other["id"])] == [TAGGER]
    assert not audits(wiring, "label.unconfirmed", other["id"])


def test_a_tagger_entry_cloud_logging_has_but_logged_long_ago_approves_nothing(
    gcp: GcpApi, wiring: LocalWiring, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A genuine tagger's entry published again later (a replay) approves no move made since."""
    # the VM, observed at its insert now without the value, says so too: left aside, to show the
    # age rule on its own
    monkeypatch.setattr(ingest_module, "SETTLED", 10.0**9)
    ingest = GcpIngest(wiring, gcp_config(gcp))
    inst = web_vm(gcp, "10.20.2.20")
    deliver(gcp, ingest, audit_entry("v1.compute.instances.insert", inst))
    gcp.bind_tag(PROJECT, ZONE, inst["id"], ORG, "ringfence-role", "jumpbox")
    old = tag_binding_entry(gcp, inst, "ringfence-role", "jumpbox", principal=TAGGER)
    old["timestamp"] = time.strftime("%Y-%m-%dT%H:%M:%S.000Z", time.gmtime(time.time() - 7200))
    deliver(gcp, ingest, old)  # logged (two hours ago), then pushed
    rec = wiring.store.get(inst["id"])
    assert rec is not None and rec.labels["role"] == "web" and rec.workload.held_labels is not None
    [unconfirmed] = audits(wiring, "label.unconfirmed", inst["id"])
    assert "replay" in unconfirmed.reason


def test_labels_as_source_a_forged_first_entry_of_an_operation_approves_nothing(
    gcp: GcpApi, wiring: LocalWiring, monkeypatch: pytest.MonkeyPatch
) -> None:
    """setLabels logs its request on the operation's first entry: a forged first entry naming the
    tagger, then the genuine last entry of Mallory's call, approves nothing: the first entry as
    logged decides, and names her."""
    monkeypatch.setattr(ingest_module, "LOGGING_LAG", 0.0)  # past the wait for Logging to list it
    ingest = GcpIngest(wiring, gcp_config(gcp, LabelSource.LABELS))
    prod_web = {"ringfence-role": "web", "ringfence-app": "ordering", "ringfence-env": "prod"}
    inst = gcp.add_instance(PROJECT, ZONE, vm_name(), ["10.20.2.30"], labels=prod_web)
    deliver(gcp, ingest, audit_entry("v1.compute.instances.insert", inst))
    jump = {**prod_web, "ringfence-role": "jumpbox"}
    gcp.set_labels(PROJECT, ZONE, inst["name"], jump)
    request = {"labels": [{"key": k, "value": v} for k, v in jump.items()]}
    op = "operation-setlabels-forged"
    method = "v1.compute.instances.setLabels"
    logged(gcp, audit_entry(method, inst, principal=MALLORY, request=request, operation=op, last=False))
    forged_first = audit_entry(method, inst, principal=TAGGER, request=request, operation=op, last=False)
    status, body = post(ingest, push_body(forged_first), push_token(gcp))
    assert status == 200 and body["changed"] == [], body
    deliver(gcp, ingest, audit_entry(method, inst, principal=MALLORY, operation=op, first=False))
    rec = wiring.store.get(inst["id"])
    assert rec is not None and rec.labels["role"] == "web" and rec.workload.held_labels is not None
    assert not audits(wiring, "label.approve", inst["id"])
    [unconfirmed] = audits(wiring, "label.unconfirmed", inst["id"])
    assert unconfirmed.detail["event_id"] == forged_first["insertId"]
    assert [a.principal for a in audits(wiring, "label.held", inst["id"])] == [MALLORY]


def test_attack_gcp_a_forged_first_entry_of_her_own_call_does_not_stand_for_the_genuine_one(
    gcp: GcpApi, wiring: LocalWiring, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Mallory's setLabels returns her its operation id. Before the sink's push she publishes a
    "first" entry of that operation saying she re-sent the labels unchanged; the first entry seen
    stays, so Google's first, arriving next, is ignored. When her call's last entry arrives, the
    VM moves into jumpbox: the first entry as Cloud Logging has it decides, and names her."""
    monkeypatch.setattr(ingest_module, "LOGGING_LAG", 0.0)
    ingest = GcpIngest(wiring, gcp_config(gcp, LabelSource.LABELS))
    prod_web = {"ringfence-role": "web", "ringfence-app": "ordering", "ringfence-env": "prod"}
    inst = gcp.add_instance(PROJECT, ZONE, vm_name(), ["10.20.2.66"], labels=prod_web)
    deliver(gcp, ingest, audit_entry("v1.compute.instances.insert", inst))
    op, method = f"operation-mallory-{inst['id']}", "v1.compute.instances.setLabels"
    jump = {**prod_web, "ringfence-role": "jumpbox"}
    genuine_first = logged(gcp, set_labels(gcp, inst, jump, principal=MALLORY, operation=op, last=False))
    genuine_last = logged(gcp, audit_entry(method, inst, principal=MALLORY, operation=op, first=False))
    unchanged = {"labels": [{"key": k, "value": v} for k, v in prod_web.items()]}
    forged_first = audit_entry(method, inst, principal=MALLORY, operation=op, last=False, request=unchanged)
    for entry in (forged_first, genuine_first, genuine_last):
        status, body = post(ingest, push_body(entry), push_token(gcp))
        assert status == 200, body
    rec = wiring.store.get(inst["id"])
    assert rec is not None and rec.labels["role"] == "web" and rec.workload.held_labels is not None
    assert [a.principal for a in audits(wiring, "label.held", inst["id"])] == [MALLORY], "her forged first hid her"
    [unconfirmed] = audits(wiring, "label.unconfirmed", inst["id"])
    assert unconfirmed.detail["event_id"] == forged_first["insertId"]


def test_attack_gcp_forged_last_entry_cannot_carry_a_taggers_call_to_another_vm(
    gcp: GcpApi, wiring: LocalWiring, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Labels as the source: the tagger's genuine setLabels on one VM is in flight (its first
    entry, logged and pushed, waits for the operation's last). Mallory, who set role=jumpbox on her
    own VM (held), publishes a "last" entry of that operation naming her VM, then a "first" one
    naming herself. Neither moves the tagger's call onto her VM nor replaces it: her VM stays held,
    and the genuine last entry still approves the tagger's VM."""
    ingest = GcpIngest(wiring, gcp_config(gcp, LabelSource.LABELS))
    prod_web = {"ringfence-role": "web", "ringfence-app": "ordering", "ringfence-env": "prod"}
    jump = {**prod_web, "ringfence-role": "jumpbox"}
    request = {"labels": [{"key": k, "value": v} for k, v in jump.items()]}
    method = "v1.compute.instances.setLabels"
    evil = gcp.add_instance(PROJECT, ZONE, vm_name(), ["10.20.9.1"], labels=prod_web)
    deliver(gcp, ingest, audit_entry("v1.compute.instances.insert", evil))
    gcp.set_labels(PROJECT, ZONE, evil["name"], jump)
    deliver(gcp, ingest, audit_entry(method, evil, principal=MALLORY, request=request))
    held = wiring.store.get(evil["id"])
    assert held is not None and held.labels["role"] == "web" and held.workload.held_labels is not None

    good = gcp.add_instance(PROJECT, ZONE, vm_name(), ["10.20.9.2"], labels=prod_web)
    deliver(gcp, ingest, audit_entry("v1.compute.instances.insert", good))
    gcp.set_labels(PROJECT, ZONE, good["name"], jump)
    op = "operation-genuine-tagger"
    deliver(gcp, ingest, audit_entry(method, good, principal=TAGGER, request=request, operation=op, last=False))
    forged_last = audit_entry(method, evil, principal=TAGGER, operation=op, first=False)
    status, body = post(ingest, push_body(forged_last), push_token(gcp))
    assert status == 503 and "not this last one" in body["detail"], "Logging never lists it: asked again"
    monkeypatch.setattr(ingest_module, "LOGGING_LAG", 0.0)  # redelivered past the wait: ignored
    for forged in (
        forged_last,
        audit_entry(method, good, principal=MALLORY, request=request, operation=op, last=False),
    ):
        status, body = post(ingest, push_body(forged), push_token(gcp))
        assert status == 200, body
    rec = wiring.store.get(evil["id"])
    assert rec is not None and rec.labels["role"] == "web" and rec.workload.held_labels is not None
    assert not audits(wiring, "label.approve", evil["id"])

    deliver(gcp, ingest, audit_entry(method, good, principal=TAGGER, operation=op, first=False))
    rec = wiring.store.get(good["id"])
    assert rec is not None and rec.labels["role"] == "jumpbox", "the tagger's own call still approves"
    assert audits(wiring, "label.approve", good["id"])


@pytest.mark.parametrize("failed_last_first", [True, False], ids=["after-the-failed-end", "before-it"])
def test_attack_gcp_a_taggers_failed_call_with_a_forged_end_approves_nothing(
    gcp: GcpApi, wiring: LocalWiring, monkeypatch: pytest.MonkeyPatch, failed_last_first: bool
) -> None:
    """The tagger's setLabels to jumpbox is accepted (its first entry logged and pushed) but the
    operation fails: the labels never change. Mallory then sets jumpbox herself (held, named) and
    publishes a "last" entry of the tagger's operation with no error, which Cloud Logging never
    had, after the genuine failed end or before it arrives. The tagger's first entry must not
    approve her move."""
    monkeypatch.setattr(ingest_module, "LOGGING_LAG", 0.0)
    ingest = GcpIngest(wiring, gcp_config(gcp, LabelSource.LABELS))
    prod_web = {"ringfence-role": "web", "ringfence-app": "ordering", "ringfence-env": "prod"}
    jump = {**prod_web, "ringfence-role": "jumpbox"}
    request = {"labels": [{"key": k, "value": v} for k, v in jump.items()]}
    method = "v1.compute.instances.setLabels"
    inst = gcp.add_instance(PROJECT, ZONE, vm_name(), ["10.20.9.41"], labels=prod_web)
    deliver(gcp, ingest, audit_entry("v1.compute.instances.insert", inst))
    op = f"operation-failed-{inst['id']}"
    deliver(gcp, ingest, audit_entry(method, inst, principal=TAGGER, request=request, operation=op, last=False))
    failed_last = logged(gcp, audit_entry(method, inst, operation=op, first=False, severity="ERROR"))
    forged_last = {**copy.deepcopy(failed_last), "severity": "NOTICE", "insertId": "forged0000001"}
    if failed_last_first:
        assert post(ingest, push_body(failed_last), push_token(gcp))[0] == 200
    gcp.set_labels(PROJECT, ZONE, inst["name"], jump)
    deliver(gcp, ingest, audit_entry(method, inst, principal=MALLORY, request=request))
    assert audits(wiring, "label.held", inst["id"])
    status, body = post(ingest, push_body(forged_last), push_token(gcp))
    assert status == 200, body
    if not failed_last_first:
        assert post(ingest, push_body(failed_last), push_token(gcp))[0] == 200
    rec = wiring.store.get(inst["id"])
    assert rec is not None and rec.labels["role"] == "web" and rec.workload.held_labels is not None
    assert not audits(wiring, "label.approve", inst["id"])


def test_a_taggers_entry_logging_does_not_list_yet_is_retried_then_approved(gcp: GcpApi, wiring: LocalWiring) -> None:
    """The sink may publish an entry before entries:list shows it: the push is answered 503 and
    Pub/Sub redelivers it; once Cloud Logging lists it, the tagger's change is approved."""
    ingest = GcpIngest(wiring, gcp_config(gcp))
    inst = web_vm(gcp, "10.20.2.40")
    deliver(gcp, ingest, audit_entry("v1.compute.instances.insert", inst))
    zone = inst["zone"].rsplit("/", 1)[-1]
    gcp.bind_tag(PROJECT, zone, inst["id"], ORG, "ringfence-role", "jumpbox")
    entry = tag_binding_entry(gcp, inst, "ringfence-role", "jumpbox", principal=TAGGER)
    status, body = post(ingest, push_body(entry), push_token(gcp))
    assert status == 503, body
    assert wiring.store.get(inst["id"]).labels["role"] == "web"  # type: ignore[union-attr]
    assert not audits(wiring, "label.unconfirmed", inst["id"]), "not held for Logging's lag"
    logged(gcp, entry)  # now listed
    status, body = post(ingest, push_body(entry), push_token(gcp))
    assert status == 200, body
    rec = wiring.store.get(inst["id"])
    assert rec is not None and rec.labels["role"] == "jumpbox" and rec.workload.held_labels is None


def test_attack_gcp_a_taggers_entry_replayed_approves_once(gcp: GcpApi, wiring: LocalWiring) -> None:
    """The tagger's genuine, confirmed entry approves its move. Mallory later holds the same
    privileged value on that VM again (its labels were moved back, then she bound it): replaying
    the tagger's entry, within the hour, approves nothing."""
    ingest = GcpIngest(wiring, gcp_config(gcp))
    inst = web_vm(gcp, "10.20.2.41")
    deliver(gcp, ingest, audit_entry("v1.compute.instances.insert", inst))
    genuine = bind_tag_as(gcp, TAGGER, inst, "ringfence-role", "jumpbox")
    deliver(gcp, ingest, genuine)
    assert wiring.store.get(inst["id"]).labels["role"] == "jumpbox"  # type: ignore[union-attr]
    deliver(gcp, ingest, bind_tag_as(gcp, TAGGER, inst, "ringfence-role", "web"))  # moved back
    assert wiring.store.get(inst["id"]).labels["role"] == "web"  # type: ignore[union-attr]
    deliver(gcp, ingest, bind_tag_as(gcp, MALLORY, inst, "ringfence-role", "jumpbox"))
    held = wiring.store.get(inst["id"])
    assert held is not None and held.labels["role"] == "web" and held.workload.held_labels is not None
    status, body = post(ingest, push_body(genuine), push_token(gcp))
    assert status == 200, body
    rec = wiring.store.get(inst["id"])
    assert rec is not None and rec.labels["role"] == "web" and rec.workload.held_labels is not None
    assert any("approved a move already" in a.reason for a in audits(wiring, "label.unconfirmed", inst["id"]))


def test_a_taggers_approval_that_failed_to_be_stored_is_approved_when_redelivered(
    gcp: GcpApi, wiring: LocalWiring, monkeypatch: pytest.MonkeyPatch
) -> None:
    """An entry is spent only once its approval is stored: when storing the VM fails after the
    entry was confirmed (the store unavailable), the push fails and Pub/Sub's redelivery still
    approves."""
    import sqlite3

    ingest = GcpIngest(wiring, gcp_config(gcp))
    inst = web_vm(gcp, "10.20.2.42")
    deliver(gcp, ingest, audit_entry("v1.compute.instances.insert", inst))
    entry = bind_tag_as(gcp, TAGGER, inst, "ringfence-role", "jumpbox")
    real, failures = ingest._store, [1]

    def unavailable_once(*args: Any, **kwargs: Any) -> Any:
        if failures[0]:
            failures[0] -= 1
            raise sqlite3.OperationalError("database is locked")
        return real(*args, **kwargs)

    monkeypatch.setattr(ingest, "_store", unavailable_once)
    calls = len(gcp.calls)
    with pytest.raises(sqlite3.OperationalError):  # the push fails (500): Pub/Sub redelivers
        post(ingest, push_body(entry), push_token(gcp))
    assert not failures[0] and reads(gcp, calls) == 1, "it failed after the entry was read back"
    status, body = post(ingest, push_body(entry), push_token(gcp))  # the redelivery
    assert status == 200, body
    rec = wiring.store.get(inst["id"])
    assert rec is not None and rec.labels["role"] == "jumpbox" and rec.workload.held_labels is None
    assert not audits(wiring, "label.unconfirmed", inst["id"])


def test_attack_gcp_forged_entry_framing_a_colleague_blames_and_quarantines_nobody(
    gcp: GcpApi, wiring: LocalWiring, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Mallory binds ``role=jumpbox`` on a VM and publishes an entry naming a colleague (not a
    tagger) as caller, under a policy that quarantines on such a finding: the colleague would be
    blamed, and the VM quarantined, so that a tagger's genuine approval later still leaves it cut
    off. Cloud Logging has no such entry: the move is held, nobody is named, nothing is
    quarantined, and the unconfirmed entry is audited. Entries that set no privileged value name
    nobody and cost no read."""
    with quarantining(wiring):
        _framing(gcp, wiring, monkeypatch)


@contextlib.contextmanager
def quarantining(wiring: LocalWiring) -> Iterator[OnPremAdmin]:
    """The lab's policy with ``on_privileged_change: quarantine``, for the block only (the
    module's control plane goes on with its own policy after)."""
    policy = gcp_policy_files()
    policy["labels.yaml"] = policy["labels.yaml"].replace(
        "on_privileged_change: hold", "on_privileged_change: quarantine"
    )
    assert "on_privileged_change: quarantine" in policy["labels.yaml"]
    admin = OnPremAdmin(wiring)
    assert admin.provision("alice", policy, "quarantine on findings").status == 201
    try:
        yield admin
    finally:
        assert admin.provision("alice", gcp_policy_files(), "back").status == 201


def _framing(gcp: GcpApi, wiring: LocalWiring, monkeypatch: pytest.MonkeyPatch) -> None:
    ingest = GcpIngest(wiring, gcp_config(gcp))
    inst = web_vm(gcp, "10.20.2.12")
    calls = len(gcp.calls)
    deliver(gcp, ingest, audit_entry("v1.compute.instances.insert", inst))  # no privileged value
    assert reads(gcp, calls) == 0

    bind_tag_as(gcp, MALLORY, inst, "ringfence-role", "jumpbox")
    framed = tag_binding_entry(gcp, inst, "ringfence-role", "jumpbox", principal=BOB)
    monkeypatch.setattr(ingest_module, "LOGGING_LAG", 0.0)
    calls = len(gcp.calls)
    status, body = post(ingest, push_body(framed), push_token(gcp))
    assert status == 200, body
    assert reads(gcp, calls) == 1
    rec = wiring.store.get(inst["id"])
    assert rec is not None and rec.workload.held_labels is not None and rec.labels["role"] == "web"
    assert not rec.op_quarantined, "a forged entry quarantines nothing"
    assert not audits(wiring, "label.held", inst["id"]), "and blames nobody"
    [unconfirmed] = audits(wiring, "label.unconfirmed", inst["id"])
    assert unconfirmed.detail["claimed_principal"] == BOB and "names nobody" in unconfirmed.reason

    # the tagger's genuine change approves the move: in force, and nothing left cut off
    real = bind_tag_as(gcp, TAGGER, inst, "ringfence-role", "jumpbox")
    deliver(gcp, ingest, real)
    rec = wiring.store.get(inst["id"])
    assert rec is not None and rec.labels["role"] == "jumpbox" and rec.workload.held_labels is None
    assert not rec.op_quarantined


def test_a_non_taggers_binding_named_by_id_only_is_read_back_and_then_names_them(
    gcp: GcpApi, wiring: LocalWiring, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Resource Manager may log a binding by its tag value's id alone (``tagValues/…``): what it
    set is not in the entry. A genuine non-tagger's such binding of a privileged value must still
    be a finding naming them (read back first, as any blame), and a forged one of the same shape
    names nobody. So must an insert binding secure tags by id (``params.resourceManagerTags``)."""
    from ringfence.clouds.gcp.auditlog import parse

    ingest = GcpIngest(wiring, gcp_config(gcp))
    inst = web_vm(gcp, "10.20.2.13")
    deliver(gcp, ingest, audit_entry("v1.compute.instances.insert", inst))
    zone = inst["zone"].rsplit("/", 1)[-1]
    jumpbox = gcp.bind_tag(PROJECT, zone, inst["id"], ORG, "ringfence-role", "jumpbox")
    genuine = by_id(tag_binding_entry(gcp, inst, "ringfence-role", "jumpbox", principal=MALLORY), jumpbox)
    forged = copy.deepcopy(genuine)
    forged["insertId"], forged["protoPayload"]["authenticationInfo"]["principalEmail"] = "forged-1", BOB
    monkeypatch.setattr(ingest_module, "LOGGING_LAG", 0.0)

    calls = len(gcp.calls)
    status, body = post(ingest, push_body(forged), push_token(gcp))
    assert status == 200, body
    assert reads(gcp, calls) == 1
    rec = wiring.store.get(inst["id"])
    assert rec is not None and rec.workload.held_labels is not None and rec.labels["role"] == "web"
    assert not audits(wiring, "label.held", inst["id"]), "a forged entry blames nobody"
    [unconfirmed] = audits(wiring, "label.unconfirmed", inst["id"])
    assert unconfirmed.detail["claimed_principal"] == BOB

    calls = len(gcp.calls)
    deliver(gcp, ingest, genuine)
    assert reads(gcp, calls) == 1
    assert wiring.store.get(inst["id"]).labels["role"] == "web"  # type: ignore[union-attr]
    assert [a.principal for a in audits(wiring, "label.held", inst["id"])] == [MALLORY], "her finding is not lost"

    tags = {"name": inst["name"], "params": {"resourceManagerTags": {"tagKeys/1": jumpbox}}}
    event = parse(audit_entry("v1.compute.instances.insert", inst, principal=MALLORY, request=tags))
    assert event is not None and event.tag_value_ids == (jumpbox,)
    plain = parse(audit_entry("v1.compute.instances.insert", inst, principal=MALLORY, request={"name": "x"}))
    assert plain is not None and not plain.tag_value_ids, "an ordinary insert costs no read"


def by_id(entry: dict[str, Any], tag_value: str) -> dict[str, Any]:
    """A CreateTagBinding entry as Resource Manager may log it: the value by its id only."""
    binding = entry["protoPayload"]["request"]["tagBinding"]
    del binding["tagValueNamespacedName"]
    binding["tagValue"] = tag_value
    return entry


def test_a_binding_named_by_id_blames_only_for_the_value_it_bound(
    gcp: GcpApi, wiring: LocalWiring, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A tagger has bound ``role=jumpbox`` and its entry is not delivered yet, when a non-tagger
    CI account binds an unrelated tag (not a label key) by id. That entry's delivery sees the move
    and holds it, but the CI account did not make it: under a policy that quarantines on findings
    nobody is named and nothing is quarantined, and it costs no Logging read. The tagger's own
    binding, named by id too, is resolved to what it set and approves the move."""
    with quarantining(wiring):
        ingest = GcpIngest(wiring, gcp_config(gcp))
        inst = web_vm(gcp, "10.20.2.14")
        deliver(gcp, ingest, audit_entry("v1.compute.instances.insert", inst))
        zone = inst["zone"].rsplit("/", 1)[-1]
        jumpbox = gcp.bind_tag(PROJECT, zone, inst["id"], ORG, "ringfence-role", "jumpbox")
        tagger = logged(gcp, by_id(tag_binding_entry(gcp, inst, "ringfence-role", "jumpbox"), jumpbox))
        cost = gcp.bind_tag(PROJECT, zone, inst["id"], ORG, "cost-center", "cc-7")
        ci = logged(gcp, by_id(tag_binding_entry(gcp, inst, "cost-center", "cc-7", principal=MALLORY), cost))
        monkeypatch.setattr(ingest_module, "LOGGING_LAG", 0.0)

        calls = len(gcp.calls)
        deliver(gcp, ingest, ci)
        assert reads(gcp, calls) == 0, "it set no privileged value: nothing to read back"
        rec = wiring.store.get(inst["id"])
        assert rec is not None and rec.workload.held_labels is not None and rec.labels["role"] == "web"
        assert not rec.op_quarantined, "a binding of another tag quarantines nothing"
        assert not audits(wiring, "label.held", inst["id"]), "and names nobody"

        calls = len(gcp.calls)
        deliver(gcp, ingest, tagger)
        assert reads(gcp, calls) == 1
        rec = wiring.store.get(inst["id"])
        assert rec is not None and rec.labels["role"] == "jumpbox" and rec.workload.held_labels is None
        assert not rec.op_quarantined


def test_a_colleagues_set_labels_resending_a_held_value_names_only_who_moved_it(
    gcp: GcpApi, wiring: LocalWiring, monkeypatch: pytest.MonkeyPatch
) -> None:
    """setLabels sends a VM's whole label set. Mallory (not a tagger) moves ``role`` to jumpbox:
    held, the finding names her and the VM is quarantined; an operator releases it while the move
    stays held. Bob (not a tagger either) then changes ``app`` in the console, which re-sends
    ``role=jumpbox`` as the VM already carried it: his call moved nothing privileged, so it names
    nobody and quarantines nothing (before, every colleague's label edit re-quarantined the VM
    in his name). A value he did change, though, is his; and an observation made after a call
    (a sync between the call and its entry's delivery) does not excuse the caller."""
    with quarantining(wiring) as admin:
        monkeypatch.setattr(ingest_module, "LOGGING_LAG", 0.0)
        # the calls here are milliseconds apart, not seconds: no margin for the clocks' skew
        monkeypatch.setattr(ingest_module, "CLOCK_SKEW", 0.0)
        ingest = GcpIngest(wiring, gcp_config(gcp, LabelSource.LABELS))
        prod_web = {"ringfence-role": "web", "ringfence-app": "ordering", "ringfence-env": "prod"}
        inst = gcp.add_instance(PROJECT, ZONE, vm_name(), ["10.20.2.31"], labels=prod_web)
        deliver(gcp, ingest, audit_entry("v1.compute.instances.insert", inst))
        method = "v1.compute.instances.setLabels"

        jump = {**prod_web, "ringfence-role": "jumpbox"}
        deliver(gcp, ingest, set_labels(gcp, inst, jump, principal=MALLORY))
        rec = wiring.store.get(inst["id"])
        assert rec is not None and rec.op_quarantined and rec.workload.held_labels is not None
        assert [a.principal for a in audits(wiring, "label.held", inst["id"])] == [MALLORY]
        assert admin.quarantine("oscar", inst["id"], False, "looked into it").status == 200

        deliver(gcp, ingest, set_labels(gcp, inst, {**jump, "ringfence-app": "payroll"}, principal=BOB))
        rec = wiring.store.get(inst["id"])
        assert rec is not None and rec.labels["role"] == "web"
        assert rec.workload.held_labels is not None, "the move is still held (and the labels with it)"
        assert not rec.op_quarantined, "a colleague's unrelated edit quarantines nothing"
        assert [a.principal for a in audits(wiring, "label.held", inst["id"])] == [MALLORY]

        app_admin = {**jump, "ringfence-app": "admin"}  # app=admin is privileged: his move
        deliver(gcp, ingest, set_labels(gcp, inst, app_admin, principal=BOB))
        rec = wiring.store.get(inst["id"])
        assert rec is not None and rec.op_quarantined
        assert [a.principal for a in audits(wiring, "label.held", inst["id"])][-1] == BOB

        # Mallory again, on another VM: a sync observes her change before her entry arrives
        other = gcp.add_instance(PROJECT, ZONE, vm_name(), ["10.20.2.32"], labels=prod_web)
        deliver(gcp, ingest, audit_entry("v1.compute.instances.insert", other))
        gcp.set_labels(PROJECT, ZONE, other["name"], jump)
        request = {"labels": [{"key": k, "value": v} for k, v in jump.items()]}
        entry = audit_entry(method, other, principal=MALLORY, request=request)
        ingest.sync(PROJECT)
        assert not wiring.store.get(other["id"]).op_quarantined  # type: ignore[union-attr]
        deliver(gcp, ingest, entry)
        assert wiring.store.get(other["id"]).op_quarantined  # type: ignore[union-attr]
        assert [a.principal for a in audits(wiring, "label.held", other["id"])] == [MALLORY]


def test_attack_gcp_a_taggers_entry_that_moved_nothing_replayed_approves_nothing(
    gcp: GcpApi, wiring: LocalWiring, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The tagger's setLabels that changed ``app`` re-sent ``role=jumpbox``, in force already, so
    it was stored without a Logging read. Later Mallory moves the VM back to web and then to
    jumpbox (held). Whoever may publish to the topic pushes the tagger's genuine entry again,
    within the hour: it approves nothing. Nor does a split call's last entry, replayed."""
    monkeypatch.setattr(ingest_module, "LOGGING_LAG", 0.0)
    ingest = GcpIngest(wiring, gcp_config(gcp, LabelSource.LABELS))
    prod_web = {"ringfence-role": "web", "ringfence-app": "ordering", "ringfence-env": "prod"}
    inst = gcp.add_instance(PROJECT, ZONE, vm_name(), ["10.20.2.33"], labels=prod_web)
    deliver(gcp, ingest, audit_entry("v1.compute.instances.insert", inst))
    method = "v1.compute.instances.setLabels"
    jump = {**prod_web, "ringfence-role": "jumpbox"}
    deliver(gcp, ingest, set_labels(gcp, inst, jump))  # the tagger: approved
    resend = set_labels(gcp, inst, {**jump, "ringfence-app": "core"})
    deliver(gcp, ingest, resend)
    op = f"operation-resend-{inst['id']}"
    gcp.write_log(set_labels(gcp, inst, {**jump, "ringfence-app": "payroll"}, operation=op, last=False))
    split_last = logged(gcp, audit_entry(method, inst, operation=op, first=False))
    deliver(gcp, ingest, split_last)  # its first went elsewhere; nothing privileged moved
    deliver(gcp, ingest, set_labels(gcp, inst, {**jump, "ringfence-role": "web"}, principal=MALLORY))
    deliver(gcp, ingest, set_labels(gcp, inst, {**jump, "ringfence-app": "payroll"}, principal=MALLORY))
    rec = wiring.store.get(inst["id"])
    assert rec is not None and rec.labels["role"] == "web" and rec.workload.held_labels is not None

    for replay in (resend, split_last):
        status, body = post(ingest, push_body(replay), push_token(gcp))
        assert status == 200, body
        rec = wiring.store.get(inst["id"])
        assert rec is not None and rec.labels["role"] == "web", "a replayed entry approved Mallory's move"
    assert [a.principal for a in audits(wiring, "label.held", inst["id"])] == [MALLORY]


def test_attack_gcp_a_taggers_late_entry_approves_no_later_move_by_another(
    gcp: GcpApi, wiring: LocalWiring, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Pub/Sub does not order deliveries, and a 503 while Cloud Logging lags puts an entry minutes
    behind later calls. The tagger sets ``role=jumpbox`` (its entry delivered late), then moves
    the VM back to web; Mallory (not a tagger) then sets jumpbox: held, and she is named. The
    tagger's genuine, unspent entry arriving last approves nothing: Cloud Logging lists a later
    call on the VM that set another role. So on a second VM, where the late entry arrives before
    Mallory's; and with secure tags. The tagger's own later call still approves."""
    monkeypatch.setattr(ingest_module, "LOGGING_LAG", 0.0)
    ingest = GcpIngest(wiring, gcp_config(gcp, LabelSource.LABELS))
    prod_web = {"ringfence-role": "web", "ringfence-app": "ordering", "ringfence-env": "prod"}
    jump = {**prod_web, "ringfence-role": "jumpbox"}

    def held_and_named(inst: dict[str, Any]) -> None:
        rec = wiring.store.get(inst["id"])
        assert rec is not None and rec.labels["role"] == "web", "Mallory's move approved by the tagger's undone call"
        assert rec.workload.held_labels is not None
        assert [a.principal for a in audits(wiring, "label.held", inst["id"])] == [MALLORY]
        assert not audits(wiring, "label.approve", inst["id"])

    for ip, late_first in (("10.20.2.50", False), ("10.20.2.51", True)):
        inst = gcp.add_instance(PROJECT, ZONE, vm_name(), [ip], labels=prod_web)
        deliver(gcp, ingest, audit_entry("v1.compute.instances.insert", inst))
        late = logged(gcp, set_labels(gcp, inst, jump))  # the tagger; its delivery is delayed
        undo = logged(gcp, set_labels(gcp, inst, prod_web))  # the tagger moves it back
        mallory = logged(gcp, set_labels(gcp, inst, jump, principal=MALLORY))
        order = [late, mallory, undo] if late_first else [mallory, undo, late]
        for entry in order:
            status, body = post(ingest, push_body(entry), push_token(gcp))
            assert status == 200, body
        held_and_named(inst)
        [stale] = [
            a for a in audits(wiring, "label.unconfirmed", inst["id"]) if a.detail["event_id"] == late["insertId"]
        ]
        assert "later call on the VM" in stale.reason and undo["insertId"] in stale.reason

    # secure tags: the tagger binds jumpbox, then web; Mallory binds jumpbox; the first arrives last
    ingest = GcpIngest(wiring, gcp_config(gcp))
    inst = web_vm(gcp, "10.20.2.52")
    deliver(gcp, ingest, audit_entry("v1.compute.instances.insert", inst))
    late = bind_tag_as(gcp, TAGGER, inst, "ringfence-role", "jumpbox")
    undo = bind_tag_as(gcp, TAGGER, inst, "ringfence-role", "web")
    for entry in (bind_tag_as(gcp, MALLORY, inst, "ringfence-role", "jumpbox"), undo, late):
        status, body = post(ingest, push_body(entry), push_token(gcp))
        assert status == 200, body
    held_and_named(inst)

    # the tagger's own call after Mallory's (binding the value again) is what the VM carries: approved
    deliver(gcp, ingest, bind_tag_as(gcp, TAGGER, inst, "ringfence-role", "jumpbox"))
    rec = wiring.store.get(inst["id"])
    assert rec is not None and rec.labels["role"] == "jumpbox" and rec.workload.held_labels is None


def test_attack_gcp_a_taggers_late_binding_approves_nothing_after_a_delete_of_it(
    gcp: GcpApi, wiring: LocalWiring, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The same with secure tags, the tagger's move undone by deleting its binding: the tagger
    binds ``role=jumpbox`` (its entry delivered late), the binding is deleted, and Mallory binds
    jumpbox again. A ``DeleteTagBinding`` names the binding only (``tagBindings/{the VM's full
    resource name, percent-encoded}/tagValues/N``, no parent): Ringfence must still read it as a
    call on the VM, and find it among the VM's calls in Cloud Logging, so the tagger's late entry
    approves nothing and Mallory stays named."""
    monkeypatch.setattr(ingest_module, "LOGGING_LAG", 0.0)
    ingest = GcpIngest(wiring, gcp_config(gcp))
    inst = web_vm(gcp, "10.20.2.54")
    deliver(gcp, ingest, audit_entry("v1.compute.instances.insert", inst))
    late = bind_tag_as(gcp, TAGGER, inst, "ringfence-role", "jumpbox")
    undo = unbind_tag_as(gcp, TAGGER, inst, "ringfence-role", "jumpbox")
    assert (
        "parent" not in str(undo["protoPayload"]["request"])
        and "%2Finstances%2F" in undo["protoPayload"]["resourceName"]
    )
    for entry in (bind_tag_as(gcp, MALLORY, inst, "ringfence-role", "jumpbox"), undo, late):
        status, body = post(ingest, push_body(entry), push_token(gcp))
        assert status == 200, body
    rec = wiring.store.get(inst["id"])
    assert rec is not None and rec.labels["role"] == "web", "Mallory's move approved by the tagger's undone binding"
    assert rec.workload.held_labels is not None
    assert [a.principal for a in audits(wiring, "label.held", inst["id"])] == [MALLORY]
    assert not audits(wiring, "label.approve", inst["id"])
    [stale] = [a for a in audits(wiring, "label.unconfirmed", inst["id"]) if a.detail["event_id"] == late["insertId"]]
    assert "later call on the VM" in stale.reason and undo["insertId"] in stale.reason


def test_attack_gcp_a_taggers_late_entry_approves_nothing_where_the_vm_was_seen_undone(
    gcp: GcpApi, wiring: LocalWiring, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Cloud Logging may not list the calls made since a late entry yet (its own lag): the VM as
    Ringfence last saw it says something too. The tagger sets ``role=jumpbox`` (its entry
    delivered late) and moves the VM back to web, which a scheduled pass sees; Mallory then sets
    jumpbox, and neither call is listed yet. The tagger's late entry approves nothing, with no
    Logging read; Mallory's entry, once listed, names her."""
    monkeypatch.setattr(ingest_module, "LOGGING_LAG", 0.0)
    monkeypatch.setattr(ingest_module, "SETTLED", 0.0)  # the pass runs well after the call
    ingest = GcpIngest(wiring, gcp_config(gcp, LabelSource.LABELS))
    prod_web = {"ringfence-role": "web", "ringfence-app": "ordering", "ringfence-env": "prod"}
    jump = {**prod_web, "ringfence-role": "jumpbox"}
    inst = gcp.add_instance(PROJECT, ZONE, vm_name(), ["10.20.2.53"], labels=prod_web)
    deliver(gcp, ingest, audit_entry("v1.compute.instances.insert", inst))
    late = logged(gcp, set_labels(gcp, inst, jump))
    undo = set_labels(gcp, inst, prod_web)  # not listed yet
    ingest.sync(PROJECT)
    mallory = set_labels(gcp, inst, jump, principal=MALLORY)  # not listed yet
    calls = len(gcp.calls)
    status, body = post(ingest, push_body(late), push_token(gcp))
    assert status == 200, body
    assert reads(gcp, calls) == 0
    rec = wiring.store.get(inst["id"])
    assert rec is not None and rec.labels["role"] == "web" and rec.workload.held_labels is not None
    assert not audits(wiring, "label.approve", inst["id"])
    [stale] = audits(wiring, "label.unconfirmed", inst["id"])
    assert stale.detail["event_id"] == late["insertId"] and "seen without" in stale.reason
    logged(gcp, undo)
    deliver(gcp, ingest, mallory)
    assert [a.principal for a in audits(wiring, "label.held", inst["id"])] == [MALLORY]


def test_attack_gcp_a_split_calls_last_entry_pushed_with_a_later_time_approves_nothing_seen_undone(
    gcp: GcpApi, wiring: LocalWiring, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The same for a split setLabels (first and last entries, both late), where when the call
    ended is its last entry's time: Mallory, who may publish to the topic, pushes the tagger's
    genuine last entry again with a timestamp 30 s later (Cloud Logging's read still finds it by
    insertId), to date the call after the pass that saw the VM back on web. The end is the last
    entry's time as Cloud Logging has it: the entry approves nothing, as the genuine one does."""
    monkeypatch.setattr(ingest_module, "LOGGING_LAG", 0.0)
    monkeypatch.setattr(ingest_module, "SETTLED", 0.0)  # the pass runs well after the call
    ingest = GcpIngest(wiring, gcp_config(gcp, LabelSource.LABELS))
    prod_web = {"ringfence-role": "web", "ringfence-app": "ordering", "ringfence-env": "prod"}
    jump = {**prod_web, "ringfence-role": "jumpbox"}
    method = "v1.compute.instances.setLabels"

    def scenario(ip: str) -> tuple[dict[str, Any], dict[str, Any]]:
        inst = gcp.add_instance(PROJECT, ZONE, vm_name(), [ip], labels=prod_web)
        deliver(gcp, ingest, audit_entry("v1.compute.instances.insert", inst))
        gcp.set_labels(PROJECT, ZONE, inst["name"], jump)  # the tagger's split call, logged
        op = f"operation-late-{inst['id']}"
        request = {"labels": [{"key": k, "value": v} for k, v in jump.items()]}
        logged(gcp, audit_entry(method, inst, request=request, operation=op, last=False))
        last = logged(gcp, audit_entry(method, inst, operation=op, first=False))
        set_labels(gcp, inst, prod_web)  # undone; not listed yet
        time.sleep(0.05)
        ingest.sync(PROJECT)  # seen back on web after the call
        set_labels(gcp, inst, jump, principal=MALLORY)  # re-made; not listed yet
        return inst, last

    def held_unconfirmed(inst: dict[str, Any]) -> None:
        rec = wiring.store.get(inst["id"])
        assert rec is not None and rec.labels["role"] == "web" and rec.workload.held_labels is not None
        assert not audits(wiring, "label.approve", inst["id"])
        [stale] = audits(wiring, "label.unconfirmed", inst["id"])
        assert "seen without" in stale.reason

    inst, last = scenario("10.20.2.64")  # the genuine last entry, late
    assert post(ingest, push_body(last), push_token(gcp))[0] == 200
    held_unconfirmed(inst)

    inst, last = scenario("10.20.2.65")
    forged = copy.deepcopy(last)
    later = time.time() + 30
    forged["timestamp"] = time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(later)) + f".{int(later % 1 * 1e6):06d}Z"
    assert post(ingest, push_body(forged), push_token(gcp))[0] == 200
    held_unconfirmed(inst)


def test_attack_gcp_a_published_copy_of_an_entry_on_another_vm_spends_nothing_of_it(
    gcp: GcpApi, wiring: LocalWiring, monkeypatch: pytest.MonkeyPatch
) -> None:
    """An entry decided without a Logging read (nothing privileged moves on its VM) is spent, so
    that replayed later it decides nothing. Whoever may publish copies a genuine entry, its
    insertId kept, onto a decoy VM where nothing moves, before the sink's push (or its
    redelivery) arrives: the copy must spend nothing of the genuine entry. Mallory's own move
    is still a finding naming her, the tagger's move is still approved, and a split call's last
    entry still reads its first from Cloud Logging."""
    monkeypatch.setattr(ingest_module, "LOGGING_LAG", 0.0)
    ingest = GcpIngest(wiring, gcp_config(gcp, LabelSource.LABELS))
    prod_web = {"ringfence-role": "web", "ringfence-app": "ordering", "ringfence-env": "prod"}
    jump = {**prod_web, "ringfence-role": "jumpbox"}
    method = "v1.compute.instances.setLabels"

    def vm(ip: str) -> dict[str, Any]:
        inst = gcp.add_instance(PROJECT, ZONE, vm_name(), [ip], labels=prod_web)
        deliver(gcp, ingest, audit_entry("v1.compute.instances.insert", inst))
        return inst

    def copy_onto(entry: dict[str, Any], target: dict[str, Any], decoy: dict[str, Any]) -> None:
        forged = copy.deepcopy(entry)  # published to the topic, not logged
        forged["resource"]["labels"]["instance_id"] = decoy["id"]
        payload = forged["protoPayload"]
        payload["resourceName"] = payload["resourceName"].replace(target["name"], decoy["name"])
        payload["response"]["targetId"] = decoy["id"]
        status, body = post(ingest, push_body(forged), push_token(gcp))
        assert status == 200, body

    def held_by(inst: dict[str, Any]) -> list[str | None]:
        return [a.principal for a in audits(wiring, "label.held", inst["id"])]

    # Mallory's move: her genuine entry, pre-empted by a copy on her decoy, still names her
    target, decoy = vm("10.20.2.60"), vm("10.20.2.61")
    genuine = logged(gcp, set_labels(gcp, target, jump, principal=MALLORY))
    copy_onto(genuine, target, decoy)
    deliver(gcp, ingest, genuine)
    rec = wiring.store.get(target["id"])
    assert rec is not None and rec.workload.held_labels is not None
    assert held_by(target) == [MALLORY], "Mallory's finding was spent by a copy on another VM"

    # the tagger's move: still approved
    target, decoy = vm("10.20.2.62"), vm("10.20.2.63")
    genuine = logged(gcp, set_labels(gcp, target, jump))
    copy_onto(genuine, target, decoy)
    deliver(gcp, ingest, genuine)
    rec = wiring.store.get(target["id"])
    assert rec is not None and rec.labels["role"] == "jumpbox" and rec.workload.held_labels is None

    # a split call whose first entry went to another process: its last, copied first, still
    # reads the first from Cloud Logging and names her
    target, decoy = vm("10.20.2.64"), vm("10.20.2.65")
    op = f"operation-split-{target['id']}"
    gcp.write_log(set_labels(gcp, target, jump, principal=MALLORY, operation=op, last=False))
    last = logged(gcp, audit_entry(method, target, principal=MALLORY, operation=op, first=False))
    copy_onto(last, target, decoy)
    deliver(gcp, ingest, last)
    assert held_by(target) == [MALLORY], "the split call's last entry was spent by a copy on another VM"


def test_attack_gcp_a_genuine_finding_replayed_quarantines_once(
    gcp: GcpApi, wiring: LocalWiring, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Mallory (not a tagger) binds ``role=jumpbox``: Cloud Logging has her entry, the finding
    names her and the VM is quarantined. An operator looks into it and releases the VM while the
    move is still held. Whoever may publish to the topic then pushes her genuine entry again,
    within the hour: it must not quarantine the VM again, nor name her a second time; the replay
    is audited as such."""
    with quarantining(wiring) as admin:
        monkeypatch.setattr(ingest_module, "LOGGING_LAG", 0.0)
        ingest = GcpIngest(wiring, gcp_config(gcp))
        inst = web_vm(gcp, "10.20.2.15")
        deliver(gcp, ingest, audit_entry("v1.compute.instances.insert", inst))
        genuine = bind_tag_as(gcp, MALLORY, inst, "ringfence-role", "jumpbox")
        deliver(gcp, ingest, genuine)
        rec = wiring.store.get(inst["id"])
        assert rec is not None and rec.op_quarantined and rec.workload.held_labels is not None
        assert [a.principal for a in audits(wiring, "label.held", inst["id"])] == [MALLORY]

        assert admin.quarantine("oscar", inst["id"], False, "looked into it").status == 200
        calls = len(gcp.calls)
        status, body = post(ingest, push_body(genuine), push_token(gcp))
        assert status == 200, body
        assert reads(gcp, calls) == 1
        rec = wiring.store.get(inst["id"])
        assert rec is not None and rec.workload.held_labels is not None and rec.labels["role"] == "web"
        assert not rec.op_quarantined, "a replayed finding quarantines nothing"
        assert [a.principal for a in audits(wiring, "label.held", inst["id"])] == [MALLORY]
        [replay] = audits(wiring, "label.unconfirmed", inst["id"])
        assert "named its caller already" in replay.reason


def test_a_binding_by_id_on_a_vm_that_is_gone_is_taken_not_redelivered_forever(
    gcp: GcpApi, wiring: LocalWiring, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Resource Manager refuses the effective tags of a VM that no longer exists (403): an entry
    binding by id on such a VM (a scale-in, a backlog) is taken like any event about a gone VM
    (its record tombstoned), not answered 503 at every redelivery."""
    ingest = GcpIngest(wiring, gcp_config(gcp))
    inst = web_vm(gcp, "10.20.2.16")
    deliver(gcp, ingest, audit_entry("v1.compute.instances.insert", inst))
    zone = inst["zone"].rsplit("/", 1)[-1]
    jumpbox = gcp.bind_tag(PROJECT, zone, inst["id"], ORG, "ringfence-role", "jumpbox")
    entry = logged(gcp, by_id(tag_binding_entry(gcp, inst, "ringfence-role", "jumpbox", principal=MALLORY), jumpbox))
    gcp.delete_instance(PROJECT, zone, inst["name"])
    monkeypatch.setattr(ingest_module, "LOGGING_LAG", 0.0)
    status, body = post(ingest, push_body(entry), push_token(gcp))
    assert status == 200, body
    assert wiring.store.get(inst["id"]).state == "terminated"  # type: ignore[union-attr]


def test_a_failure_after_the_first_entry_is_taken_keeps_it_for_the_redelivery(
    gcp: GcpApi, wiring: LocalWiring, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A tagger's insert binding ``role=jumpbox`` by id logs a first and a last entry. Storing
    the last one's observation fails once (503): the redelivered last entry must still find the
    first and approve, not hold the tagger's labels as unattributed."""
    monkeypatch.setattr(ingest_module, "LOGGING_LAG", 0.0)
    ingest = GcpIngest(wiring, gcp_config(gcp))
    inst = gcp.add_instance(PROJECT, ZONE, vm_name(), ["10.20.2.17"])
    ids = {k: gcp.bind_tag(PROJECT, ZONE, inst["id"], ORG, f"ringfence-{k}", v) for k, v in PRIVILEGED_WEB.items()}
    request = {"name": inst["name"], "params": {"resourceManagerTags": {f"tagKeys/{k}": v for k, v in ids.items()}}}
    method, op = "v1.compute.instances.insert", f"operation-insert-{inst['id']}"
    deliver(gcp, ingest, audit_entry(method, inst, request=request, operation=op, last=False))
    last = logged(gcp, audit_entry(method, inst, operation=op, first=False))
    real_store = GcpIngest._store
    failures = [1]

    def store_failing_once(self: GcpIngest, *a: Any, **kw: Any) -> set[str]:
        if failures:
            failures.pop()
            raise ingest_module.ServiceUnavailable("the store is busy")  # type: ignore[no-untyped-call]
        return real_store(self, *a, **kw)

    monkeypatch.setattr(GcpIngest, "_store", store_failing_once)
    status, body = post(ingest, push_body(last), push_token(gcp))
    assert status == 503, body
    deliver(gcp, ingest, last)
    rec = wiring.store.get(inst["id"])
    assert rec is not None and rec.labels.get("role") == "jumpbox" and rec.workload.held_labels is None, rec


PRIVILEGED_WEB = {"role": "jumpbox", "app": "ordering", "env": "prod"}
