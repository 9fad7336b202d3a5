"""Azure VMs and NICs as Ringfence sees them, apart from ARM's wire format (:func:`vm_from_wire`,
:func:`nic_from_wire` read it, as ARM returns it; Resource Notifications' ``resourceInfo`` has the
same shape but is never read: a delivery is not the authority on a VM, ARM is) → inventory records.

A workload's id is the VM's ``vmId`` (a GUID, lower case): it is what the IMDS attested document
names (as an EC2 identity document names the instance id), it is stable for the VM's life, and it
fits in the agent API's paths (an ARM resource id does not).
"""

from __future__ import annotations

import re
from typing import Any

from pydantic import BaseModel, ConfigDict, Field

from ringfence.labels import LabelMapper
from ringfence.model import Workload
from ringfence.store.base import InventoryRecord

_RESOURCE = re.compile(
    r"^/subscriptions/(?P<sub>[^/]+)/resourceGroups/(?P<rg>[^/]+)/providers/(?P<path>.+)$", re.IGNORECASE
)


class ArmId(BaseModel):
    """An ARM resource id taken apart: ``/subscriptions/s/resourceGroups/rg/providers/ns/t/n[/t2/n2]``."""

    model_config = ConfigDict(frozen=True)

    id: str
    subscription: str
    group: str
    type: str  # e.g. microsoft.compute/virtualmachines/… (lower case: ARM compares ids case-insensitively)
    names: tuple[str, ...]

    @classmethod
    def parse(cls, resource_id: str) -> ArmId:
        m = _RESOURCE.match(resource_id.strip())
        parts = m.group("path").split("/") if m else []
        if m is None or len(parts) < 3 or len(parts) % 2 == 0:
            raise ValueError(f"not an ARM resource id: {resource_id!r}")
        rtype = "/".join([parts[0], *parts[1::2]]).lower()
        return cls(id=resource_id, subscription=m["sub"], group=m["rg"], type=rtype, names=tuple(parts[2::2]))


VM = "microsoft.compute/virtualmachines"
SCALE_SET_VM = "microsoft.compute/virtualmachinescalesets/virtualmachines"
NIC = "microsoft.network/networkinterfaces"
SCALE_SET_VM_NIC = "microsoft.compute/virtualmachinescalesets/virtualmachines/networkinterfaces"


class AzureNic(BaseModel):
    id: str
    vm: str | None = None  # the VM's resource id
    primary: bool = False
    ips: list[str] = Field(default_factory=list)  # private, primary ip configuration first
    subnet: str | None = None
    nsg: str | None = None
    asgs: list[str] = Field(default_factory=list)


class AzureVm(BaseModel):
    id: str  # ARM resource id
    vm_id: str  # properties.vmId
    name: str
    subscription: str
    group: str
    location: str | None = None
    zone: str | None = None
    scale_set: str | None = None
    tags: dict[str, str] = Field(default_factory=dict)
    nic_ids: list[str] = Field(default_factory=list)
    deleting: bool = False
    read_at: float | None = None  # a listing's: when the page holding it returned (arm.Page)


def nic_from_wire(nic: dict[str, Any]) -> AzureNic:
    props = nic.get("properties") or {}
    configs = sorted(props.get("ipConfigurations") or [], key=lambda c: not (c.get("properties") or {}).get("primary"))
    ips: list[str] = []
    subnet = None
    asgs: list[str] = []
    for c in configs:
        cp = c.get("properties") or {}
        if cp.get("privateIPAddress"):
            ips.append(cp["privateIPAddress"])
        subnet = subnet or (cp.get("subnet") or {}).get("id")
        asgs.extend(a["id"] for a in cp.get("applicationSecurityGroups") or [] if a.get("id"))
    return AzureNic(
        id=nic["id"],
        vm=(props.get("virtualMachine") or {}).get("id"),
        primary=bool(props.get("primary")),
        ips=list(dict.fromkeys(ips)),
        subnet=subnet,
        nsg=(props.get("networkSecurityGroup") or {}).get("id"),
        asgs=list(dict.fromkeys(asgs)),
    )


def vm_from_wire(vm: dict[str, Any], read_at: float | None = None) -> AzureVm:
    """A VM (or a scale set's VM) as ARM returns it (``read_at``: when the listing's page holding
    it returned); ValueError naming what is missing."""
    rid = ArmId.parse(vm.get("id") or "")
    props = vm.get("properties") or {}
    vm_id = props.get("vmId")
    if not vm_id:
        raise ValueError(f"{rid.id}: properties.vmId is missing")
    nics = sorted(
        (props.get("networkProfile") or {}).get("networkInterfaces") or [],
        key=lambda n: not (n.get("properties") or {}).get("primary", True),
    )
    zones = vm.get("zones") or []
    return AzureVm(
        id=rid.id,
        vm_id=str(vm_id).lower(),
        name=rid.names[-1] if rid.type == VM else f"{rid.names[0]}_{rid.names[-1]}",
        subscription=rid.subscription,
        group=rid.group,
        location=vm.get("location"),
        zone=zones[0] if zones else None,
        scale_set=rid.names[0] if rid.type == SCALE_SET_VM else None,
        tags={str(k): str(v) for k, v in (vm.get("tags") or {}).items()},
        nic_ids=[n["id"] for n in nics if n.get("id")],
        deleting=str(props.get("provisioningState", "")).lower() == "deleting",
        read_at=read_at,
    )


def vnet_of(subnet_id: str | None) -> str | None:
    """The VNet's id of a subnet id (…/virtualNetworks/v/subnets/s → …/virtualNetworks/v)."""
    if not subnet_id or "/subnets/" not in subnet_id.lower():
        return None
    return subnet_id[: subnet_id.lower().rindex("/subnets/")]


def to_record(
    vm: AzureVm,
    nics: dict[str, AzureNic],
    observed_at: float,
    mapper: LabelMapper | None = None,
    *,
    seen_at: float | None = None,
) -> InventoryRecord:
    """``nics``: by lower-case id; the VM's own, in its order, give its addresses. ``seen_at``:
    the workload's time, when the read of the VM had returned (else ``observed_at``): what it shows
    was so by then, where the record is dated when the read began (the store's order)."""
    own = [nics[n.lower()] for n in vm.nic_ids if n.lower() in nics]
    ips = list(dict.fromkeys(ip for n in own for ip in n.ips))
    subnet = next((n.subnet for n in own if n.subnet), None)
    w = Workload(
        id=vm.vm_id,
        name=vm.name,
        ips=[] if vm.deleting else ips,
        tags=vm.tags,
        cloud="azure",
        account=vm.subscription,
        region=vm.location,
        zone=vm.zone,
        vpc=vnet_of(subnet),
        subnet=subnet,
        resource=vm.id.strip().lower(),
        observed_at=observed_at if seen_at is None else seen_at,
    )
    return InventoryRecord.observed(w, "terminated" if vm.deleting else "running", observed_at, mapper)


def tombstone(
    vm_id: str,
    subscription: str,
    region: str | None,
    observed_at: float,
    name: str | None = None,
    resource: str | None = None,
) -> InventoryRecord:
    """``name``, ``resource`` (its ARM id): the VM's, as its record had them. A delete event names
    the VM by its ARM id, which the redelivery of the event matches to the tombstone by
    (:func:`.inventory.named_by`)."""
    w = Workload(
        id=vm_id,
        name=name,
        cloud="azure",
        account=subscription,
        region=region,
        resource=resource,
        observed_at=observed_at,
    )
    return InventoryRecord(id=vm_id, workload=w, state="terminated", observed_at=observed_at)
