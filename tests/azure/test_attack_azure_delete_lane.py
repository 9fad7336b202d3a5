"""Azure: a deleted VM gives its address back to the subnet, which may give it to a new VM; it
leaves its peers' sets through compute's priority lane, as an AWS instance's termination does, so
the address is not left allowed behind a tag storm's backlog in the ordinary lane
(docs/threat-model.md). A tag change stays in the ordinary lane. Through the Event Grid handler,
the local ARM server and the real store; the lane of each compute message recorded."""

from __future__ import annotations

import json
from typing import Any

import pytest

from ringfence.clouds.azure.events import DELETE, WRITE
from ringfence.clouds.azure.ingest import AzureEvents
from ringfence.clouds.azure.wiring import Azure
from ringfence.local.azure_arm import ArmServer
from ringfence.local.azure_estate import seed_vm, vm_id
from ringfence.local.eventgrid import arm_event
from ringfence.local.wiring import LocalWiring
from tests.azure.conftest import PROD_WEB, arm, azure, wiring  # noqa: F401 (fixtures)
from tests.azure.test_azure_events import HEADERS
from tests.storerace import lanes

GUID = "6a000000-0000-4000-8000-0000000cd001"


def handle(events: AzureEvents, item: dict[str, Any]) -> None:
    assert events.handle(HEADERS, json.dumps([item]).encode()).status == 200


def test_attack_azure_a_deleted_vm_leaves_its_peers_in_the_priority_lane(
    arm: ArmServer,  # noqa: F811
    azure: Azure,  # noqa: F811
    wiring: LocalWiring,  # noqa: F811
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    events = AzureEvents(wiring, azure)
    seed_vm(arm, "lane-1", GUID, "10.20.1.93", PROD_WEB)
    write = arm_event(WRITE, vm_id("lane-1"), "Microsoft.Compute/virtualMachines/write")
    handle(events, write)
    sent = lanes(monkeypatch, wiring)
    arm.get(vm_id("lane-1"))["tags"]["ringfence:role"] = "database"  # type: ignore[index]
    handle(events, write)
    assert sent and all(not urgent for urgent, ids in sent if GUID in ids), "a tag change takes the ordinary lane"
    sent.clear()
    arm.delete(vm_id("lane-1"))
    handle(events, arm_event(DELETE, vm_id("lane-1"), "Microsoft.Compute/virtualMachines/delete"))
    rec = wiring.store.get(GUID)
    assert rec is not None and rec.state == "terminated"
    naming = [urgent for urgent, ids in sent if GUID in ids]
    assert naming and all(naming), "the deleted VM's removal waits in the ordinary lane"
