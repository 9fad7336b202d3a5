"""Event Grid deliveries over HTTPS: the handshake, the delivery secret, the documented event shapes
(ResourceWriteSuccess / ResourceDeleteSuccess routed on operationName and read back from ARM;
Resource Notifications carrying tags), refused deliveries changing nothing."""

from __future__ import annotations

import json
from typing import Any

import pytest

from ringfence.clouds.azure.events import (
    DELETE,
    NOTIFIED,
    NOTIFIED_DELETE,
    VALIDATION,
    WRITE,
    MalformedDelivery,
    change_of,
    parse_delivery,
)
from ringfence.clouds.azure.ingest import SECRET_HEADER, AzureEvents
from ringfence.clouds.azure.wiring import Azure
from ringfence.local.azure_arm import ArmServer
from ringfence.local.azure_estate import SUB, nic_id, seed_vm, vm_id
from ringfence.local.eventgrid import OID, arm_event
from ringfence.local.wiring import LocalWiring

from .conftest import OTHER_SUB, PROD_WEB, SECRET

WEB = "6a000000-0000-4000-8000-00000000b001"
DEV = "6a000000-0000-4000-8000-00000000b002"
HEADERS = {SECRET_HEADER: SECRET, "aeg-event-type": "Notification"}


def deliver(events: AzureEvents, *items: dict[str, Any], headers: dict[str, str] | None = None) -> Any:
    return events.handle(headers or HEADERS, json.dumps(list(items)).encode())


@pytest.fixture
def events(wiring: LocalWiring, azure: Azure) -> AzureEvents:
    return AzureEvents(wiring, azure)


# --- parsing the documented shapes (no I/O) -------------------------------------------------------


def test_write_events_route_on_operation_name_and_tag_writes_name_the_resource() -> None:
    vm = vm_id("web-1")
    ev = parse_delivery(json.dumps([arm_event(WRITE, vm, "Microsoft.Compute/virtualMachines/write")]))
    c = change_of(ev[0])
    assert c is not None and c.kind == "write" and c.resource.type == "microsoft.compute/virtualmachines"
    assert c.principal == f"azure:tenant-1/{OID}"
    # a Tags API write, subject as the tags child or as the resource itself: both name the VM
    for subject in (f"{vm}/providers/Microsoft.Resources/tags/default", vm):
        t = change_of(parse_delivery(json.dumps([arm_event(WRITE, vm, "Microsoft.Resources/tags/write", subject)]))[0])
        assert t is not None and t.kind == "write" and t.resource.names == ("web-1",)
    d = change_of(parse_delivery(json.dumps([arm_event(DELETE, vm, "Microsoft.Compute/virtualMachines/delete")]))[0])
    assert d is not None and d.kind == "delete"
    # an action (restart) and another resource type change no workload
    assert (
        change_of(
            parse_delivery(json.dumps([arm_event(WRITE, vm, "Microsoft.Compute/virtualMachines/restart/action")]))[0]
        )
        is None
    )
    storage = f"/subscriptions/{SUB}/resourceGroups/rg/providers/Microsoft.Storage/storageAccounts/st1"
    assert (
        change_of(parse_delivery(json.dumps([arm_event(WRITE, storage, "Microsoft.Storage/storageAccounts/write")]))[0])
        is None
    )


def test_resource_notifications_carry_the_resource_with_its_tags() -> None:
    vm = vm_id("web-1")
    body = {
        "id": "4eef929a-0001",
        "topic": f"/subscriptions/{SUB}",
        "subject": vm,
        "data": {
            "resourceInfo": {
                "tags": PROD_WEB,
                "id": vm,
                "name": "web-1",
                "type": "Microsoft.Compute/virtualMachines",
                "location": "westeurope",
                "properties": {"provisioningState": "Succeeded", "vmId": WEB},
            },
            "apiVersion": "2024-07-01",
            "operationalInfo": {"resourceEventTime": "2026-12-02T14:00:00Z"},
        },
        "eventType": NOTIFIED,
        "dataVersion": "1",
        "metadataVersion": "1",
        "eventTime": "2026-12-02T14:00:00Z",
    }
    c = change_of(parse_delivery(json.dumps([body]))[0])
    assert c is not None and c.resource_info is not None and c.resource_info["tags"] == PROD_WEB
    gone = {
        **body,
        "eventType": NOTIFIED_DELETE,
        "data": {"resourceInfo": {"id": vm, "name": "web-1", "type": "Microsoft.Compute/virtualMachines"}},
    }
    d = change_of(parse_delivery(json.dumps([gone]))[0])
    assert d is not None and d.kind == "delete"


def test_malformed_deliveries_are_named() -> None:
    with pytest.raises(MalformedDelivery, match="not JSON"):
        parse_delivery(b"{")
    with pytest.raises(MalformedDelivery, match=r"event \[0\]: eventType"):
        parse_delivery(json.dumps([{"id": "x"}]))


# --- the service over the local ARM server -------------------------------------------------------


def test_subscription_validation_handshake(events: AzureEvents) -> None:
    ev = {
        "id": "v1",
        "topic": "",
        "subject": "",
        "eventType": VALIDATION,
        "eventTime": "2026-12-02T14:00:00Z",
        "data": {
            "validationCode": "512d38b6-c7b8-40c8-89fe-f46f9e9622b6",
            "validationUrl": "https://rp-eastus2.eventgrid.azure.net:553/x",
        },
        "dataVersion": "2",
        "metadataVersion": "1",
    }
    r = deliver(events, ev, headers={SECRET_HEADER: SECRET, "aeg-event-type": "SubscriptionValidation"})
    assert (r.status, r.body) == (200, {"validationResponse": "512d38b6-c7b8-40c8-89fe-f46f9e9622b6"})
    # without the secret even the handshake is refused: nobody else subscribes this endpoint
    assert deliver(events, ev, headers={"aeg-event-type": "SubscriptionValidation"}).status == 401


def test_a_vm_write_is_read_back_and_stored_with_its_labels(
    arm: ArmServer, events: AzureEvents, wiring: LocalWiring
) -> None:
    seed_vm(arm, "web-1", WEB, "10.20.1.4", PROD_WEB)
    r = deliver(events, arm_event(WRITE, vm_id("web-1"), "Microsoft.Compute/virtualMachines/write"))
    assert r.status == 200 and r.body["changed"] == [WEB]
    rec = wiring.store.get(WEB)
    assert rec is not None and rec.workload.ips == ["10.20.1.4"] and rec.labels["role"] == "web"
    # a tag change through the Tags API: the VM is read again, the new labels stored
    arm.get(vm_id("web-1"))["tags"]["ringfence:role"] = "database"  # type: ignore[index]
    sub = f"{vm_id('web-1')}/providers/Microsoft.Resources/tags/default"
    r = deliver(events, arm_event(WRITE, vm_id("web-1"), "Microsoft.Resources/tags/write", sub))
    assert r.body["changed"] == [WEB]
    rec = wiring.store.get(WEB)
    assert rec is not None and rec.labels["role"] == "database"
    # a NIC write reaches its VM
    r = deliver(events, arm_event(WRITE, nic_id("web-1-nic"), "Microsoft.Network/networkInterfaces/write"))
    assert r.status == 200 and r.body["changed"] == []  # nothing new: observed as it was


def test_a_delete_re_reads_the_subscription_and_ends_the_workload(
    arm: ArmServer, events: AzureEvents, wiring: LocalWiring
) -> None:
    seed_vm(arm, "web-1", WEB, "10.20.1.4", PROD_WEB)
    seed_vm(arm, "dev-1", DEV, "10.20.1.9", {**PROD_WEB, "ringfence:env": "dev"})
    deliver(events, arm_event(WRITE, vm_id("web-1"), "Microsoft.Compute/virtualMachines/write"))
    deliver(events, arm_event(WRITE, vm_id("dev-1"), "Microsoft.Compute/virtualMachines/write"))
    arm.delete(vm_id("web-1"))
    r = deliver(events, arm_event(DELETE, vm_id("web-1"), "Microsoft.Compute/virtualMachines/delete"))
    assert r.status == 200 and r.body["changed"] == [WEB] and r.body["synced"] == [SUB]
    gone, kept = wiring.store.get(WEB), wiring.store.get(DEV)
    assert gone is not None and gone.state == "terminated"
    assert kept is not None and kept.state == "running"


def test_a_notification_with_tags_needs_no_arm_read(arm: ArmServer, events: AzureEvents, wiring: LocalWiring) -> None:
    vm = seed_vm(arm, "web-1", WEB, "10.20.1.4", PROD_WEB)
    body = {
        "id": "n1",
        "topic": f"/subscriptions/{SUB}",
        "subject": vm["id"],
        "eventType": NOTIFIED,
        "eventTime": "2026-12-02T14:00:00Z",
        "dataVersion": "1",
        "metadataVersion": "1",
        "data": {"resourceInfo": vm},
    }
    with arm.recording() as calls:
        r = deliver(events, body)
    assert r.status == 200 and r.body["changed"] == [WEB]
    assert not any("virtualMachines/web-1?" in p for _, p in calls), "the VM came with the event"


def test_a_privileged_value_set_through_azure_is_held(arm: ArmServer, events: AzureEvents, wiring: LocalWiring) -> None:
    """The event names the caller but not the tags it wrote: a move into a privileged value
    (role=jumpbox) is held at the labels in force, as an unattributed AWS change is."""
    seed_vm(arm, "web-1", WEB, "10.20.1.4", PROD_WEB)
    deliver(events, arm_event(WRITE, vm_id("web-1"), "Microsoft.Compute/virtualMachines/write"))
    arm.get(vm_id("web-1"))["tags"]["ringfence:role"] = "jumpbox"  # type: ignore[index]
    deliver(events, arm_event(WRITE, vm_id("web-1"), "Microsoft.Resources/tags/write"))
    rec = wiring.store.get(WEB)
    assert rec is not None and rec.workload.held_labels is not None
    assert rec.workload.held_labels.get("role") == "web"


def test_refused_deliveries_change_nothing(arm: ArmServer, events: AzureEvents, wiring: LocalWiring) -> None:
    seed_vm(arm, "web-1", WEB, "10.20.1.4", PROD_WEB)
    ev = arm_event(WRITE, vm_id("web-1"), "Microsoft.Compute/virtualMachines/write")
    wrong = deliver(events, ev, headers={SECRET_HEADER: "guess", "aeg-event-type": "Notification"})
    assert wrong.status == 401
    foreign = arm_event(WRITE, vm_id("web-1", sub=OTHER_SUB), "Microsoft.Compute/virtualMachines/write")
    r = deliver(events, ev, foreign)
    assert r.status == 403 and OTHER_SUB in r.body["detail"]
    assert deliver(events, headers=HEADERS).status == 200  # an empty delivery: nothing to do
    assert events.handle(HEADERS, b"not json").status == 400
    assert wiring.store.get(WEB) is None


def test_arm_throttled_past_retries_answers_503_with_retry_after(
    arm: ArmServer, events: AzureEvents, wiring: LocalWiring
) -> None:
    seed_vm(arm, "web-1", WEB, "10.20.1.4", PROD_WEB)
    events.azure.arm(SUB).compute._config.retry_policy.total_retries = 0  # type: ignore[attr-defined]
    arm.throttle(times=1, retry_after=0)
    r = deliver(events, arm_event(WRITE, vm_id("web-1"), "Microsoft.Compute/virtualMachines/write"))
    assert r.status == 503 and r.headers["Retry-After"] == "30"
    assert wiring.store.get(WEB) is None


def test_a_throttled_arm_read_is_retried_and_the_delivery_taken(
    arm: ArmServer, events: AzureEvents, wiring: LocalWiring
) -> None:
    seed_vm(arm, "web-1", WEB, "10.20.1.4", PROD_WEB)
    arm.throttle(times=1, retry_after=1)
    with arm.recording() as calls:
        r = deliver(events, arm_event(WRITE, vm_id("web-1"), "Microsoft.Compute/virtualMachines/write"))
    assert r.status == 200 and r.body["changed"] == [WEB], r.body
    assert calls[0] == calls[1], "the throttled read was retried as it was"
    rec = wiring.store.get(WEB)
    assert rec is not None and rec.labels["role"] == "web"
