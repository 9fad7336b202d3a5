"""Inventory: VMs, scale sets' VMs and NICs of a subscription, read with the real SDK clients from
the local ARM server → the same governed records (tags → labels) as AWS instances."""

from __future__ import annotations

from ringfence.clouds.azure.inventory import observe_subscription
from ringfence.clouds.azure.model import ArmId, vm_from_wire
from ringfence.clouds.azure.wiring import Azure
from ringfence.local.azure_arm import ArmServer
from ringfence.local.azure_estate import RG, SUB, SUBNET, VNET, seed_vm
from ringfence.local.wiring import LocalWiring

from .conftest import PROD_WEB

WEB = "5f0e1c2a-0000-4000-8000-00000000a001"
DB = "5f0e1c2a-0000-4000-8000-00000000a002"
ODD = "5f0e1c2a-0000-4000-8000-00000000a003"


def test_subscription_vms_and_nics_become_labelled_workloads(arm: ArmServer, azure: Azure, wiring: LocalWiring) -> None:
    seed_vm(arm, "web-1", WEB.upper(), "10.20.1.4", PROD_WEB)
    seed_vm(arm, "db-1", DB, "10.20.1.5", {**PROD_WEB, "ringfence:role": "database"})
    seed_vm(arm, "odd-1", ODD, "10.20.1.6", {"Name": "x"})  # five VMs and NICs page at 2 per page
    res = observe_subscription(wiring, azure.arm(SUB))
    assert res.seen == 3 and sorted(res.changed) == sorted([WEB, DB, ODD])
    web = wiring.store.get(WEB)  # the workload id is the vmId, lower case (what IMDS attests)
    assert web is not None and web.state == "running"
    w = web.workload
    assert (w.cloud, w.account, w.region, w.zone, w.name) == ("azure", SUB, "westeurope", "1", "web-1")
    assert w.ips == ["10.20.1.4"] and w.subnet == SUBNET and w.vpc == VNET
    assert web.labels == {"app": "ordering", "role": "web", "env": "prod"}
    db = wiring.store.get(DB)
    assert db is not None and db.labels["role"] == "database"
    paged = [p for m, p in arm.requests if "skiptoken" in p]
    assert paged, "the lists were paged with nextLink"


def test_a_vm_gone_from_arm_is_terminated_and_nothing_else_changes(
    arm: ArmServer, azure: Azure, wiring: LocalWiring
) -> None:
    seed_vm(arm, "web-1", WEB, "10.20.1.4", PROD_WEB)
    vm = seed_vm(arm, "db-1", DB, "10.20.1.5", PROD_WEB)
    observe_subscription(wiring, azure.arm(SUB))
    arm.delete(vm["id"])
    res = observe_subscription(wiring, azure.arm(SUB))
    assert res.gone == [DB] and res.changed == [DB]
    gone = wiring.store.get(DB)
    assert gone is not None and gone.state == "terminated" and gone.workload.ips == []
    kept = wiring.store.get(WEB)
    assert kept is not None and kept.state == "running"


def test_scale_set_vms_are_read_per_set(arm: ArmServer, azure: Azure, wiring: LocalWiring) -> None:
    ss = f"/subscriptions/{SUB}/resourceGroups/{RG}/providers/Microsoft.Compute/virtualMachineScaleSets/web-ss"
    arm.put(ss, {"location": "westeurope", "properties": {}})
    nic = f"{ss}/virtualMachines/0/networkInterfaces/web-ss-nic"
    arm.put(
        f"{ss}/virtualMachines/0",
        {
            "location": "westeurope",
            "tags": PROD_WEB,
            "properties": {
                "vmId": "aa000000-0000-4000-8000-000000000000",
                "networkProfile": {"networkInterfaces": [{"id": nic}]},
            },
        },
    )
    arm.put(
        nic,
        {
            "properties": {
                "ipConfigurations": [
                    {"name": "c", "properties": {"privateIPAddress": "10.20.2.4", "subnet": {"id": SUBNET}}}
                ]
            }
        },
    )
    observe_subscription(wiring, azure.arm(SUB))
    rec = wiring.store.get("aa000000-0000-4000-8000-000000000000")
    assert rec is not None and rec.workload.ips == ["10.20.2.4"] and rec.workload.name == "web-ss_0"
    assert rec.labels["role"] == "web"


def test_a_throttled_arm_is_retried_after_retry_after(arm: ArmServer, azure: Azure, wiring: LocalWiring) -> None:
    seed_vm(arm, "web-1", WEB, "10.20.1.4", PROD_WEB)
    arm.throttle(times=1, retry_after=1)
    with arm.recording() as calls:
        res = observe_subscription(wiring, azure.arm(SUB))
    assert res.changed == [WEB]
    assert calls[0] == calls[1], "the throttled list was retried as it was"


def test_bad_arm_ids_and_vms_without_vmid_are_named() -> None:
    import pytest

    with pytest.raises(ValueError, match="not an ARM resource id"):
        ArmId.parse("/subscriptions/x/resourceGroups/y")
    with pytest.raises(ValueError, match=r"web-9: properties.vmId is missing"):
        vm_from_wire(
            {"id": f"/subscriptions/{SUB}/resourceGroups/{RG}/providers/Microsoft.Compute/virtualMachines/web-9"}
        )
