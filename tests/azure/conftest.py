"""Azure tests: the real azure-mgmt clients against the local ARM server (one per module), over
the local control plane (LocalWiring) with the example policy provisioned."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from ringfence.clouds.azure.arm import StaticTokenCredential
from ringfence.clouds.azure.wiring import Azure, AzureConfig, attach
from ringfence.control.wiring import Config
from ringfence.local.azure_arm import ArmServer
from ringfence.local.wiring import LocalWiring
from tests.onprem.conftest import policy_files, signing_key_file

SUB = "0b1f6471-1bf0-4dda-aec3-111122223333"
OTHER_SUB = "9c2f0000-0000-4000-8000-000000000009"
RG = "ordering-prod"
VNET = f"/subscriptions/{SUB}/resourceGroups/{RG}/providers/Microsoft.Network/virtualNetworks/prod-vnet"
SUBNET = f"{VNET}/subnets/web"
SECRET = "s3cret-delivery-value"

PROD_WEB = {"ringfence:app": "ordering", "ringfence:role": "web", "ringfence:env": "prod"}


def vm_id(name: str, group: str = RG, sub: str = SUB) -> str:
    return f"/subscriptions/{sub}/resourceGroups/{group}/providers/Microsoft.Compute/virtualMachines/{name}"


def nic_id(name: str, group: str = RG, sub: str = SUB) -> str:
    return f"/subscriptions/{sub}/resourceGroups/{group}/providers/Microsoft.Network/networkInterfaces/{name}"


def seed_vm(
    arm: ArmServer, name: str, guid: str, ip: str, tags: dict[str, str] | None = None, sub: str = SUB
) -> dict[str, Any]:
    """A VM with one NIC in the prod VNet, as ARM holds them."""
    nic = nic_id(f"{name}-nic", sub=sub)
    vm = arm.put(
        vm_id(name, sub=sub),
        {
            "location": "westeurope",
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
            "location": "westeurope",
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


@pytest.fixture(scope="module")
def arm() -> Iterator[ArmServer]:
    with ArmServer(page_size=2) as server:
        yield server


@pytest.fixture
def azure(arm: ArmServer) -> Iterator[Azure]:
    yield Azure(
        AzureConfig(subscriptions=[SUB], arm_url=arm.url, eventgrid_secret=SECRET),
        StaticTokenCredential("local-arm-token"),
    )
    arm.resources.clear()


@pytest.fixture
def wiring(tmp_path: Path, azure: Azure) -> Iterator[LocalWiring]:
    """The local control plane with the example policy and azure-attested enrollment offered."""
    from ringfence.clouds.onprem import OnPremAdmin

    cfg = Config(enroll_methods=["pairing", "azure-attested"])
    w = LocalWiring(tmp_path / "state" / "state.db", signing_key=signing_key_file(tmp_path), cfg=cfg)
    attach(w, azure)
    r = OnPremAdmin(w).provision("alice", policy_files(), "initial")
    assert r.status == 201, r.body
    yield w
    w.close()
