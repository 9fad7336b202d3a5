"""Azure: what a delete event's pass hands on again of the VMs stored gone already (94d2c85: the
redelivery of a delete whose first hand-off failed). It names them by the ARM id their record
kept: a caller who deletes a scale set in their own resource group named after another team's
does not send that team's history of instances through compute's priority lane, once per delete
(as matching by name did). And the pass reads a delivery's deletes once, not once per tombstone
of the subscription: matching by scanning them for each made one delivery of 800 deletes against
60,000 tombstones outlast the events function's timeout. Real handler, real store, local ARM."""

from __future__ import annotations

import uuid
from typing import Any

import pytest

from ringfence.clouds.azure.events import DELETE
from ringfence.clouds.azure.ingest import AzureEvents
from ringfence.clouds.azure.inventory import observe_subscription
from ringfence.clouds.azure.model import ArmId, tombstone
from ringfence.clouds.azure.wiring import Azure
from ringfence.local.azure_arm import ArmServer
from ringfence.local.azure_estate import RG, SUB, SUBNET, vm_id
from ringfence.local.eventgrid import arm_event
from ringfence.local.wiring import LocalWiring
from tests.azure.conftest import PROD_WEB, arm, azure, wiring  # noqa: F401 (fixtures)
from tests.azure.test_azure_hand_off import handle
from tests.storerace import lanes

SETS = f"/subscriptions/{SUB}/resourceGroups/{{group}}/providers/Microsoft.Compute/virtualMachineScaleSets/web"
INSTANCES = 5


def _guid(i: int) -> str:
    return f"6a000000-0000-4000-8000-0000000cf1{i:02x}"


def _scale_set_with_vms(arm: ArmServer, group: str, n: int) -> str:  # noqa: F811
    ss = SETS.format(group=group)
    arm.put(ss, {"location": "westeurope", "properties": {}})
    for i in range(n):
        nic = f"{ss}/virtualMachines/{i}/networkInterfaces/web-nic"
        arm.put(
            f"{ss}/virtualMachines/{i}",
            {
                "location": "westeurope",
                "tags": PROD_WEB,
                "properties": {"vmId": _guid(i), "networkProfile": {"networkInterfaces": [{"id": nic}]}},
            },
        )
        ip = {"name": "c", "properties": {"privateIPAddress": f"10.20.3.{i + 4}", "subnet": {"id": SUBNET}}}
        arm.put(nic, {"properties": {"ipConfigurations": [ip]}})
    return ss


def test_attack_azure_deleting_a_namesake_scale_set_does_not_recompute_anothers_history(
    arm: ArmServer,  # noqa: F811
    azure: Azure,  # noqa: F811
    wiring: LocalWiring,  # noqa: F811
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    # another team's autoscaled scale set "web": its instances seen, then scaled in (stored gone)
    theirs = _scale_set_with_vms(arm, RG, INSTANCES)
    observe_subscription(wiring, azure.arm(SUB))
    for i in range(INSTANCES):
        arm.delete(f"{theirs}/virtualMachines/{i}")
    observe_subscription(wiring, azure.arm(SUB))
    history = {_guid(i) for i in range(INSTANCES)}
    for g in history:
        rec = wiring.store.get(g)
        assert rec is not None and rec.state == "terminated"
    events = AzureEvents(wiring, azure)
    sent = lanes(monkeypatch, wiring)
    # Mallory makes an empty "web" in her own group and deletes it, again and again
    mine = SETS.format(group="mallory-sandbox")
    for _ in range(3):
        arm.put(mine, {"location": "westeurope", "properties": {}})
        arm.delete(mine)
        ev = arm_event(DELETE, mine, "Microsoft.Compute/virtualMachineScaleSets/delete")
        assert handle(events, {**ev, "id": str(uuid.uuid4())}) == 200
    recomputed = [i for _, ids in sent for i in ids if i in history]
    assert not recomputed, f"another group's scale set's instances recomputed: {len(recomputed)}"
    # the other team's own scale set's delete names them (the redelivery 94d2c85 is for)
    arm.delete(theirs)
    ev = arm_event(DELETE, theirs.upper(), "Microsoft.Compute/virtualMachineScaleSets/delete")
    assert handle(events, ev) == 200
    assert {i for urgent, ids in sent if urgent for i in ids} == history


reads = [0]


class CountedArmId(ArmId):
    """An ARM id that counts how often what it names is read."""

    def __getattribute__(self, name: str) -> Any:
        if name in ("id", "subscription", "group", "type", "names"):
            reads[0] += 1
        return super().__getattribute__(name)


def test_a_pass_reads_a_deliverys_deletes_once_not_once_per_tombstone(
    arm: ArmServer,  # noqa: F811
    azure: Azure,  # noqa: F811
    wiring: LocalWiring,  # noqa: F811
) -> None:
    tombstones, deletes = 400, 50
    for i in range(tombstones):
        wiring.store.observe(tombstone(str(uuid.UUID(int=i + 1)), SUB, "westeurope", 1.0, f"churn-{i}"))
    deleted = [CountedArmId(**ArmId.parse(vm_id(f"gone-{i}")).model_dump()) for i in range(deletes)]
    reads[0] = 0
    observe_subscription(wiring, azure.arm(SUB), deleted=deleted)
    # a few reads per delete, whatever the number of tombstones (scanned per tombstone: 40,000)
    assert reads[0] <= 4 * deletes, f"{reads[0]} reads of {deletes} deletes for {tombstones} tombstones"
