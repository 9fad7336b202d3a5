"""Event Grid deliveries over HTTPS: the handshake, the delivery secret, the documented event shapes
(ResourceWriteSuccess / ResourceDeleteSuccess routed on operationName; Resource Notifications
carrying the resource), each read back from ARM (a delivery's body is never the authority on a
VM), refused deliveries changing nothing."""

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
    GridEvent,
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
GHOST = "6a000000-0000-4000-8000-00000000b0ff"
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


def test_resource_notifications_name_the_resource_and_nothing_of_it_is_taken() -> None:
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
    assert c is not None and c.kind == "write" and c.resource.id == vm and c.principal is None
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


def test_event_fields_of_the_wrong_type_are_malformed_naming_the_field() -> None:
    """``data.claims`` / ``data.resourceInfo`` that are not objects (and their ids not strings):
    MalformedDelivery naming the field, not an AttributeError out of the route."""
    vm = vm_id("web-1")
    bad_claims = arm_event(WRITE, vm, "Microsoft.Compute/virtualMachines/write")
    bad_claims["data"]["claims"] = "oid=1"
    with pytest.raises(MalformedDelivery, match=r"data\.claims must be an object"):
        change_of(parse_delivery(json.dumps([bad_claims]))[0])
    bad_oid = arm_event(WRITE, vm, "Microsoft.Compute/virtualMachines/write")
    bad_oid["data"]["claims"] = {"oid": 5}
    with pytest.raises(MalformedDelivery, match=r"data\.claims\.oid must be a string"):
        change_of(parse_delivery(json.dumps([bad_oid]))[0])
    info = {"id": "x", "eventType": NOTIFIED, "subject": vm, "data": {"resourceInfo": "x"}}
    with pytest.raises(MalformedDelivery, match=r"data\.resourceInfo must be an object"):
        change_of(parse_delivery(json.dumps([info]))[0])
    info["data"] = {"resourceInfo": {"id": ["x"]}}
    with pytest.raises(MalformedDelivery, match=r"data\.resourceInfo\.id must be a string"):
        change_of(parse_delivery(json.dumps([info]))[0])


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


def notification(resource_info: dict[str, Any], event_id: str = "n1") -> dict[str, Any]:
    """A Resource Notifications CreatedOrUpdated event (the documented shape) carrying ``resource_info``."""
    return {
        "id": event_id,
        "topic": f"/subscriptions/{SUB}",
        "subject": resource_info["id"],
        "eventType": NOTIFIED,
        "eventTime": "2026-12-02T14:00:00Z",
        "dataVersion": "1",
        "metadataVersion": "1",
        "data": {
            "resourceInfo": resource_info,
            "apiVersion": "2024-07-01",
            "operationalInfo": {"resourceEventTime": "2026-12-02T14:00:00Z"},
        },
    }


def test_a_notification_is_read_back_from_arm_with_the_reads_of_a_write_event(
    arm: ArmServer, events: AzureEvents, wiring: LocalWiring
) -> None:
    """A notification is a trigger: the VM and its NIC are read from ARM, exactly the reads the
    system topic's write event makes (no more)."""
    vm = seed_vm(arm, "web-1", WEB, "10.20.1.4", PROD_WEB)
    with arm.recording() as by_notification:
        r = deliver(events, notification(vm))
    assert r.status == 200 and r.body["changed"] == [WEB]
    with arm.recording() as by_write_event:
        deliver(events, arm_event(WRITE, vm_id("web-1"), "Microsoft.Compute/virtualMachines/write"))
    assert by_notification == by_write_event
    assert any("virtualMachines/web-1?" in p for _, p in by_notification), "the VM is read from ARM"
    rec = wiring.store.get(WEB)
    assert rec is not None and rec.workload.ips == ["10.20.1.4"] and rec.labels["role"] == "web"


def test_attack_resource_notification_body_cannot_set_labels_or_addresses(
    arm: ArmServer, events: AzureEvents, wiring: LocalWiring
) -> None:
    """Whoever gets a delivery accepted (or replays a stale one) writes resourceInfo: other tags,
    another VM's NIC (its address), another workload's vmId, a VM that does not exist. ARM's
    values win and a VM ARM does not hold is not created."""
    seed_vm(arm, "web-1", WEB, "10.20.1.4", PROD_WEB)
    seed_vm(arm, "dev-1", DEV, "10.20.1.9", {**PROD_WEB, "ringfence:env": "dev"})
    forged = json.loads(json.dumps(arm.get(vm_id("web-1"))))
    forged["tags"] = {**PROD_WEB, "ringfence:role": "database"}
    forged["properties"]["networkProfile"]["networkInterfaces"] = [{"id": nic_id("dev-1-nic")}]
    r = deliver(events, notification(forged))
    assert r.status == 200 and r.body["changed"] == [WEB], r.body
    rec = wiring.store.get(WEB)
    assert rec is not None and rec.labels["role"] == "web" and rec.workload.ips == ["10.20.1.4"]
    # web-1 as ARM holds it, but claiming dev-1's vmId: dev-1's record is not written from it
    forged["properties"]["vmId"] = DEV
    r = deliver(events, notification(forged, "n2"))
    assert r.status == 200 and DEV not in r.body["changed"] and wiring.store.get(DEV) is None
    # a VM ARM does not hold, complete with tags, vmId and a NIC: nothing is created for it
    ghost = json.loads(json.dumps(forged))
    ghost["id"] = vm_id("ghost-1")
    ghost["properties"]["vmId"] = GHOST
    ghost["properties"]["networkProfile"]["networkInterfaces"] = [{"id": nic_id("web-1-nic")}]
    r = deliver(events, notification(ghost, "n3"))
    assert r.status == 200 and GHOST not in r.body["changed"], r.body
    assert wiring.store.get(GHOST) is None
    rec = wiring.store.get(WEB)
    assert rec is not None and rec.labels["role"] == "web" and rec.workload.ips == ["10.20.1.4"]


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


def test_attack_custom_topic_event_names_nobody(arm: ArmServer, events: AzureEvents, wiring: LocalWiring) -> None:
    """Anyone who owns an Event Grid topic can subscribe the route to it and publish ARM-shaped
    events, their ``data.claims`` naming whom they like; Event Grid's token on the delivery is
    genuine. Event Grid stamps such an event's ``topic`` with the custom topic's path, so its
    caller is not taken: a privileged move it points at is held, unattributed, and blames nobody
    (no ``label.held`` finding, no quarantine). The same move from the subscription's system topic
    names its caller in the finding."""
    seed_vm(arm, "web-1", WEB, "10.20.1.4", PROD_WEB)
    deliver(events, arm_event(WRITE, vm_id("web-1"), "Microsoft.Compute/virtualMachines/write"))
    arm.get(vm_id("web-1"))["tags"]["ringfence:role"] = "jumpbox"  # type: ignore[index]
    forged = arm_event(
        WRITE, vm_id("web-1"), "Microsoft.Resources/tags/write", oid="00000000-0000-4000-8000-0000000b1a3e"
    )
    forged["topic"] = f"/subscriptions/{SUB}/resourceGroups/rg/providers/Microsoft.EventGrid/topics/mine"
    assert change_of(parse_delivery(json.dumps([forged]))[0]).principal is None  # type: ignore[union-attr]
    assert deliver(events, forged).status == 200
    rec = wiring.store.get(WEB)
    assert rec is not None and rec.workload.held_labels is not None and rec.labels["role"] == "web"
    assert [a for a in wiring.store.audit_log() if a.action == "label.held"] == []
    # the genuine event (system topic, Event Grid's stamp, either case) names its caller
    genuine = arm_event(WRITE, vm_id("web-1"), "Microsoft.Resources/tags/write")
    genuine["topic"] = genuine["topic"].upper()
    deliver(events, genuine)
    [held] = [a for a in wiring.store.audit_log() if a.action == "label.held"]
    assert held.principal.endswith(OID) and held.target == WEB


def test_a_malformed_event_in_a_batch_loses_no_good_event(arm: ArmServer, wiring: LocalWiring, azure: Azure) -> None:
    """Event Grid batches events (up to 10, infra/azure/eventgrid.json) and does not retry a 400:
    through the real route, the good events of a delivery are applied and it is answered 200; each
    malformed one is listed by index in the answer, logged and counted (AzureEventsMalformed). A
    delivery with nothing readable in it is answered 400."""
    from ringfence.routes.azure import EVENTS_PATH, azure_event_routes
    from ringfence.serve import proxy_event

    seed_vm(arm, "web-1", WEB, "10.20.1.4", PROD_WEB)
    seed_vm(arm, "dev-1", DEV, "10.20.2.4", {**PROD_WEB, "ringfence:env": "dev"})
    counted: list[tuple[str, float]] = []

    def post(items: list[Any]) -> tuple[int, Any]:
        event = proxy_event("POST", EVENTS_PATH, list(HEADERS.items()), [], json.dumps(items).encode(), "127.0.0.1")
        out = azure_event_routes(lambda: AzureEvents(wiring, azure, lambda n, v: counted.append((n, v)))).resolve(
            event, None
        )
        return out["statusCode"], json.loads(out["body"])

    claims = arm_event(WRITE, vm_id("web-1"), "Microsoft.Compute/virtualMachines/write")
    claims["data"]["claims"] = "oid=1"
    info = {"id": "n1", "eventType": NOTIFIED, "subject": vm_id("web-1"), "data": {"resourceInfo": "x"}}
    cloudevent = {"id": "c1", "type": WRITE, "source": f"/subscriptions/{SUB}", "specversion": "1.0", "data": {}}
    validation = {"id": "v1", "eventType": VALIDATION, "data": {"validationCode": 5}}
    good = [
        arm_event(WRITE, vm_id("web-1"), "Microsoft.Compute/virtualMachines/write"),
        arm_event(WRITE, vm_id("dev-1"), "Microsoft.Compute/virtualMachines/write"),
    ]
    status, body = post([claims, good[0], info, cloudevent, good[1], validation, [1]])
    assert status == 200, body
    assert body["changed"] == sorted([WEB, DEV])
    assert [m["index"] for m in body["malformed"]] == [0, 2, 3, 5, 6]
    assert "data.claims must be an object" in body["malformed"][0]["error"]
    assert "data.resourceInfo must be an object" in body["malformed"][1]["error"]
    assert ("AzureEventsMalformed", 5) in counted
    web, dev = wiring.store.get(WEB), wiring.store.get(DEV)
    assert web is not None and dev is not None and dev.labels["env"] == "dev"
    # nothing readable at all: refused as a whole, nothing stored
    status, body = post([claims, cloudevent])
    assert status == 400 and "data.claims" in body["detail"], body


def test_an_events_key_is_the_same_for_its_redelivery_and_differs_for_another_call_under_its_id() -> None:
    """Records of what an event decided are keyed by :func:`event_key`: a caller may set the id
    ARM's events carry (the correlation id), never the time ARM stamps, the topic or its own name."""
    ev = arm_event(WRITE, vm_id("k-1"), "Microsoft.Compute/virtualMachines/write", event_id="corr-1")
    key = change_of(GridEvent.model_validate(ev))
    again = change_of(GridEvent.model_validate(json.loads(json.dumps(ev))))
    assert key is not None and again is not None
    assert key.event_id == again.event_id and key.event_id.startswith("corr-1#")
    for field, value in (
        ("eventTime", "2026-01-01T00:00:00.0000000Z"),
        ("topic", "/custom/topic"),
        ("subject", vm_id("k-2")),
    ):
        other = change_of(GridEvent.model_validate({**ev, field: value}))
        assert other is not None and other.event_id != key.event_id, field
    by_other = arm_event(
        WRITE, vm_id("k-1"), "Microsoft.Compute/virtualMachines/write", event_id="corr-1", oid="someone-else"
    )
    by_other["eventTime"] = ev["eventTime"]
    changed = change_of(GridEvent.model_validate(by_other))
    assert changed is not None and changed.event_id != key.event_id
