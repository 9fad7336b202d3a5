"""Azure VMs in the local ARM server (:class:`ringfence.local.azure_arm.ArmServer`) as ARM holds
them — a VM, its NIC, the NIC's private address in a subnet of a VNet — for tests and the demo."""

from __future__ import annotations

from typing import Any

from ringfence.local.azure_arm import ArmServer

SUB = "0b1f6471-1bf0-4dda-aec3-111122223333"
RG = "ordering-prod"
VNET = f"/subscriptions/{SUB}/resourceGroups/{RG}/providers/Microsoft.Network/virtualNetworks/prod-vnet"
SUBNET = f"{VNET}/subnets/web"


def vm_id(name: str, group: str = RG, sub: str = SUB) -> str:
    return f"/subscriptions/{sub}/resourceGroups/{group}/providers/Microsoft.Compute/virtualMachines/{name}"


def nic_id(name: str, group: str = RG, sub: str = SUB) -> str:
    return f"/subscriptions/{sub}/resourceGroups/{group}/providers/Microsoft.Network/networkInterfaces/{name}"


def seed_vm(
    arm: ArmServer,
    name: str,
    guid: str,
    ip: str,
    tags: dict[str, str] | None = None,
    sub: str = SUB,
    location: str = "westeurope",
) -> dict[str, Any]:
    """A VM (``vmId`` ``guid``, tagged ``tags``) with one NIC holding ``ip`` in the prod VNet's
    subnet, as ARM holds them."""
    nic = nic_id(f"{name}-nic", sub=sub)
    vm = arm.put(
        vm_id(name, sub=sub),
        {
            "location": location,
            "zones": ["1"],
            "tags": tags or {},
            "properties": {
                "vmId": guid,
                "networkProfile": {"networkInterfaces": [{"id": nic, "properties": {"primary": True}}]},
            },
        },
    )
    arm.put(
        nic,
        {
            "location": location,
            "properties": {
                "primary": True,
                "virtualMachine": {"id": vm["id"]},
                "ipConfigurations": [
                    {
                        "name": "ipconfig1",
                        "properties": {"primary": True, "privateIPAddress": ip, "subnet": {"id": SUBNET}},
                    }
                ],
            },
        },
    )
    return vm


def retag(arm: ArmServer, resource_id: str, tags: dict[str, str]) -> dict[str, Any]:
    """Merge ``tags`` into the resource's tags, as a tag write does in ARM."""
    current = arm.get(resource_id)
    if current is None:
        raise KeyError(resource_id)
    return arm.put(resource_id, {**current, "tags": {**(current.get("tags") or {}), **tags}})
