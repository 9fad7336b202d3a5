"""Audit-log entries → GcpEvent, on the documented shapes (cloud_events.md §3.2, §3.3)."""

from __future__ import annotations

import base64
import json
from typing import Any

import pytest

from ringfence.clouds.gcp.auditlog import Action, log_entry, parse
from ringfence.events import MalformedEvent

# §3.2: an instance a MIG created (iap-desktop's TestInsertInstanceEvent), first entry
MIG_INSERT: dict[str, Any] = {
    "protoPayload": {
        "@type": "type.googleapis.com/google.cloud.audit.AuditLog",
        "serviceName": "compute.googleapis.com",
        "methodName": "v1.compute.instances.insert",
        "resourceName": "projects/111/zones/us-central1-a/instances/instance-1",
        "request": {
            "@type": "type.googleapis.com/compute.instances.insert",
            "name": "instance-group-1-xbtt",
            "networkInterfaces": [{"network": "projects/111/global/networks/default"}],
            "links": [
                {
                    "type": "MEMBER_OF",
                    "target": "projects/111/locations/us-central1-a/instances/instance-group-1-xbtt",
                    "source": "projects/111/locations/us-central1-a/instanceGroupManagers/instance-group-1@3579973466633327805",
                }
            ],
        },
        "response": {
            "@type": "type.googleapis.com/operation",
            "operationType": "insert",
            "status": "RUNNING",
            "targetId": "518436304627895054",
            "user": "111@cloudservices.gserviceaccount.com",
        },
        "authenticationInfo": {"principalEmail": "111@cloudservices.gserviceaccount.com"},
    },
    "insertId": "3vuqdhe1iqbu",
    "resource": {
        "type": "gce_instance",
        "labels": {"zone": "us-central1-a", "instance_id": "11111111631960822", "project_id": "project-1"},
    },
    "timestamp": "2020-05-03T12:15:29.009Z",
    "severity": "NOTICE",
    "logName": "projects/project-1/logs/cloudaudit.googleapis.com%2Factivity",
    "operation": {"id": "operation-1588508129141", "producer": "compute.googleapis.com", "first": True},
}

# §3.3: setLabels, first entry: the complete new label set as a list
SET_LABELS: dict[str, Any] = {
    "protoPayload": {
        "@type": "type.googleapis.com/google.cloud.audit.AuditLog",
        "serviceName": "compute.googleapis.com",
        "methodName": "v1.compute.instances.setLabels",
        "resourceName": "projects/project-1/zones/asia-southeast1-b/instances/instance-1",
        "request": {
            "labels": [{"key": "label-1", "value": "value-1"}, {"key": "label-2", "value": "value-2"}],
            "labelFingerprint": "abc=",
            "@type": "type.googleapis.com/compute.instances.setLabels",
        },
        "response": {"operationType": "compute.instance.setLabels", "targetId": "1718410000000000000"},
        "authenticationInfo": {"principalEmail": "alice@example.com"},
    },
    "insertId": "x1",
    "resource": {
        "type": "gce_instance",
        "labels": {"project_id": "project-1", "instance_id": "1718410000000000000", "zone": "asia-southeast1-b"},
    },
    "severity": "NOTICE",
    "operation": {"id": "operation-1683499480843", "producer": "compute.googleapis.com", "first": True},
}


def test_a_mig_insert_first_entry_names_the_vm_its_group_and_the_service_agent() -> None:
    ev = parse(MIG_INSERT)
    assert ev is not None
    assert (ev.action, ev.project, ev.zone, ev.instance) == (
        Action.INSERT,
        "project-1",
        "us-central1-a",
        "11111111631960822",
    )
    assert ev.group == "instance-group-1"
    assert ev.principal == "111@cloudservices.gserviceaccount.com"
    assert ev.first and not ev.last and ev.operation == "operation-1588508129141"


def test_set_labels_first_entry_carries_the_complete_new_set_and_the_last_none() -> None:
    ev = parse(SET_LABELS)
    assert ev is not None and ev.action is Action.LABELS
    assert ev.requested == {"label-1": "value-1", "label-2": "value-2"}
    last = json.loads(json.dumps(SET_LABELS))
    del last["protoPayload"]["request"]
    last["operation"] = {"id": "operation-1683499480843", "last": True}
    ev2 = parse(last)
    assert ev2 is not None and ev2.last and not ev2.first and ev2.requested is None


@pytest.mark.parametrize("prefix", ["v1.", "beta."])
@pytest.mark.parametrize(
    ("method", "action"),
    [("insert", Action.INSERT), ("delete", Action.DELETE), ("setLabels", Action.LABELS)],
)
def test_v1_and_beta_methods_are_followed(prefix: str, method: str, action: Action) -> None:
    entry = json.loads(json.dumps(SET_LABELS))
    entry["protoPayload"]["methodName"] = f"{prefix}compute.instances.{method}"
    ev = parse(entry)
    assert ev is not None and ev.action is action


def test_other_methods_and_failed_calls() -> None:
    other = json.loads(json.dumps(SET_LABELS))
    other["protoPayload"]["methodName"] = "v1.compute.instances.setMetadata"
    assert parse(other) is None
    failed = json.loads(json.dumps(SET_LABELS))
    failed["severity"] = "ERROR"
    failed["protoPayload"]["status"] = {"code": 3, "message": "conditionNotMet"}
    ev = parse(failed)
    assert ev is not None and ev.failed


def test_a_tag_binding_on_a_vm_and_one_on_a_project() -> None:
    parent = "//compute.googleapis.com/projects/4711/zones/europe-west1-b/instances/123456789"
    entry = {
        "protoPayload": {
            "serviceName": "cloudresourcemanager.googleapis.com",
            "methodName": "TagBindings.CreateTagBinding",
            "resourceName": parent,
            "request": {"tagBinding": {"parent": parent, "tagValueNamespacedName": "987654/ringfence-role/web"}},
            "authenticationInfo": {"principalEmail": "tagger@x.iam.gserviceaccount.com"},
        },
        "insertId": "t1",
    }
    ev = parse(entry)
    assert ev is not None and ev.action is Action.TAGS
    assert (ev.project, ev.zone, ev.instance, ev.requested) == (
        "4711",
        "europe-west1-b",
        "123456789",
        {"ringfence-role": "web"},
    )
    entry["protoPayload"]["request"] = {"tagBinding": {"parent": "//cloudresourcemanager.googleapis.com/projects/4711"}}
    entry["protoPayload"]["resourceName"] = "//cloudresourcemanager.googleapis.com/projects/4711"
    assert parse(entry) is None


def test_a_tag_binding_delete_names_its_vm_by_the_binding_name_alone() -> None:
    """``DeleteTagBindingRequest`` has only ``name``: ``tagBindings/{full resource name,
    percent-encoded}/tagValues/N`` (the API reference; not checked against a live log). It is a
    tag change of the VM that name holds, which set nothing; one of a project's binding is not."""
    parent = "//compute.googleapis.com/projects/4711/zones/europe-west1-b/instances/123456789"
    name = "tagBindings/" + parent.replace("/", "%2F") + "/tagValues/281479"
    entry = {
        "protoPayload": {
            "serviceName": "cloudresourcemanager.googleapis.com",
            "methodName": "google.cloud.resourcemanager.v3.TagBindings.DeleteTagBinding",
            "resourceName": name,
            "request": {
                "@type": "type.googleapis.com/google.cloud.resourcemanager.v3.DeleteTagBindingRequest",
                "name": name,
            },
            "authenticationInfo": {"principalEmail": "mallory@x.iam.gserviceaccount.com"},
        },
        "insertId": "d1",
    }
    ev = parse(entry)
    assert ev is not None and ev.action is Action.TAGS
    assert (ev.project, ev.zone, ev.instance, ev.requested, ev.tag_value_ids) == (
        "4711",
        "europe-west1-b",
        "123456789",
        None,
        (),
    )
    entry["protoPayload"]["resourceName"] = "//cloudresourcemanager.googleapis.com/projects/4711"  # by request alone
    assert parse(entry) is not None
    project = "tagBindings/%2F%2Fcloudresourcemanager.googleapis.com%2Fprojects%2F4711/tagValues/281479"
    entry["protoPayload"]["request"] = {"name": project}
    entry["protoPayload"]["resourceName"] = project
    assert parse(entry) is None


def test_pubsub_push_envelope_and_eventarc_body_carry_the_same_entry() -> None:
    data = base64.b64encode(json.dumps(SET_LABELS).encode()).decode()
    push = json.dumps({"message": {"data": data, "messageId": "1"}, "subscription": "s"})
    assert log_entry(push) == SET_LABELS
    assert log_entry(json.dumps(SET_LABELS)) == SET_LABELS


@pytest.mark.parametrize(
    ("body", "message"),
    [
        (b"not json", "not JSON"),
        (b"[]", "not a JSON object"),
        (json.dumps({"message": {"data": "%%%"}}).encode(), "not base64 JSON"),
    ],
)
def test_bad_bodies_are_named(body: bytes, message: str) -> None:
    with pytest.raises(MalformedEvent, match=message):
        log_entry(body)


def test_an_entry_without_an_instance_is_malformed() -> None:
    entry = json.loads(json.dumps(SET_LABELS))
    entry["resource"]["labels"] = {}
    entry["protoPayload"]["resourceName"] = "projects/p"
    del entry["protoPayload"]["response"]
    with pytest.raises(MalformedEvent, match="names no instance"):
        parse(entry)
    with pytest.raises(MalformedEvent, match="protoPayload"):
        parse({"insertId": "x"})
