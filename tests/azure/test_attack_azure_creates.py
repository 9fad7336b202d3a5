"""The Azure perimeter creates its ASGs and NSGs with ``If-None-Match: *``: one of the same name that
someone else creates after the run read the resource group (another team, an attacker who can write
there, a second Ringfence run) is never replaced by ours nor taken over. The scheduled reconcile
(AzureReconcile) with the real azure-mgmt-network client against the local ARM server (412 for a
PUT with ``If-None-Match: *`` of what exists, as ARM's resource provider contract has it), the
local wiring (SQLite) as the control plane. The other writes land through :meth:`ArmServer.before`:
just before the run's PUT is handled."""

from __future__ import annotations

from typing import Any
from urllib.parse import unquote

import pytest
from azure.core.exceptions import HttpResponseError
from azure.mgmt.network.models import NetworkSecurityGroup

from ringfence.audit import AuditRecord
from ringfence.clouds.azure.reconcile import AzureReconcile
from ringfence.clouds.azure.wiring import Azure
from ringfence.local.azure_arm import ArmServer
from ringfence.local.azure_estate import RG, SUB, nic_id, seed_vm
from ringfence.local.wiring import LocalWiring
from ringfence.perimeter import PerimeterConfig

from .conftest import PROD_WEB

WEB = "ab000000-0000-4000-8000-00000000e201"
NET = f"/subscriptions/{SUB}/resourceGroups/{RG}/providers/Microsoft.Network"
BOUNDARY = f"{NET}/applicationSecurityGroups/rf-prod-boundary"
NSG = f"{NET}/networkSecurityGroups/rf-prod-nsg"
NIC = nic_id("web-1-nic")
CONFIG = PerimeterConfig(admin_cidrs=["10.250.0.0/24"], control_plane_cidrs=["10.9.0.0/24"])
THEIR_RULE: dict[str, Any] = {
    "properties": {
        "protocol": "Tcp",
        "access": "Allow",
        "priority": 200,
        "direction": "Inbound",
        "sourcePortRange": "*",
        "destinationPortRange": "22",
        "sourceAddressPrefix": "10.77.0.0/16",
        "destinationAddressPrefix": "*",
    }
}


def applied(w: LocalWiring) -> list[AuditRecord]:
    return [a for a in w.store.audit_log() if a.action == "perimeter.apply"]


def rules_of(arm: ArmServer, nsg: str) -> list[str]:
    prefix = f"{nsg}/securityRules/".lower()
    return sorted(r["name"] for k, r in arm.resources.items() if k.startswith(prefix))


def puts(calls: list[tuple[str, str]], rid: str) -> int:
    return sum(1 for m, path in calls if m == "PUT" and unquote(path.split("?")[0]).lower() == rid.lower())


def nic_untouched(arm: ArmServer) -> bool:
    nic = arm.get(NIC)
    assert nic is not None
    ipc = nic["properties"]["ipConfigurations"][0]["properties"]
    return not ipc.get("applicationSecurityGroups") and not nic["properties"].get("networkSecurityGroup")


@pytest.fixture
def estate(arm: ArmServer) -> None:
    seed_vm(arm, "web-1", WEB, "10.20.1.4", PROD_WEB)


def test_attack_azure_an_asg_created_between_the_perimeters_read_and_write_is_not_taken_over(
    arm: ArmServer, azure: Azure, wiring: LocalWiring, estate: None
) -> None:
    """Someone creates rf-prod-boundary, untagged, after the run read the resource group and just
    before its create: ARM refuses the create (412), the ASG keeps its tags, the run stops for this
    subscription as for any look-alike (NameTaken) and no NIC is given it."""
    arm.before("PUT", BOUNDARY, lambda: arm.put(BOUNDARY, {"location": "westeurope", "tags": {"owner": "other"}}))
    with arm.recording() as calls:
        res = AzureReconcile(wiring, azure, CONFIG).run()
    held = arm.get(BOUNDARY)
    assert held is not None and held["tags"] == {"owner": "other"}, "their ASG was taken over by our PUT"
    assert "rf-prod-boundary" in res.failed[SUB] and "without the ringfence=perimeter tag" in res.failed[SUB]
    assert puts(calls, BOUNDARY) == 1 and puts(calls, NIC) == 0 and nic_untouched(arm)
    assert arm.get(NSG) is None  # the run stopped at the ASG: nothing after it written


def test_attack_azure_an_nsg_created_between_the_perimeters_read_and_write_is_not_overwritten(
    arm: ArmServer, azure: Azure, wiring: LocalWiring, estate: None
) -> None:
    """Another team creates rf-prod-nsg with its own rule after the run read the resource group:
    ARM refuses our create (412), their NSG keeps its tags and rule, none of ours is written into
    it, no NIC is put on it, and the run says why (NameTaken)."""

    def theirs() -> None:
        arm.put(NSG, {"location": "westeurope", "tags": {"owner": "netops"}})
        arm.put(f"{NSG}/securityRules/allow-ssh", THEIR_RULE)

    arm.before("PUT", NSG, theirs)
    with arm.recording() as calls:
        res = AzureReconcile(wiring, azure, CONFIG).run()
    held = arm.get(NSG)
    assert held is not None and held["tags"] == {"owner": "netops"}, "their NSG was overwritten by our PUT"
    assert rules_of(arm, NSG) == ["allow-ssh"], "our rules were written into their NSG"
    assert "NSG rf-prod-nsg" in res.failed[SUB] and "without the ringfence=perimeter tag" in res.failed[SUB]
    assert puts(calls, NSG) == 1 and puts(calls, NIC) == 0 and nic_untouched(arm)


def test_an_asg_and_nsg_another_run_creates_meanwhile_are_used_as_they_are(
    arm: ArmServer, azure: Azure, wiring: LocalWiring, estate: None
) -> None:
    """A second run (tagged as ours) creates rf-prod-boundary and rf-prod-nsg, with a rule this run
    does not want, just before this run's creates: both are used (not written again), our rules go
    into the NSG, its extra rule is left for the next run (not in this run's record), which deletes
    it under its own record and converges."""
    ours = {"ringfence": "perimeter"}

    def other_run_nsg() -> None:
        arm.put(NSG, {"location": "westeurope", "tags": {**ours, "ringfence-network": "x"}})
        arm.put(f"{NSG}/securityRules/rf-stale", THEIR_RULE)

    arm.before("PUT", BOUNDARY, lambda: arm.put(BOUNDARY, {"location": "westeurope", "tags": ours}))
    arm.before("PUT", NSG, other_run_nsg)
    before = len(applied(wiring))
    with arm.recording() as calls:
        res = AzureReconcile(wiring, azure, CONFIG).run()
    assert res.failed == {} and res.warnings == 3  # the ASG used, the NSG used, its extra rule left
    assert puts(calls, BOUNDARY) == 1 and puts(calls, NSG) == 1  # each refused once, not written again
    assert "rf-stale" in rules_of(arm, NSG) and "rf-boundary-deny" in rules_of(arm, NSG)
    nic = arm.get(NIC)
    assert nic is not None and nic["properties"]["networkSecurityGroup"]["id"].lower() == NSG.lower()
    [rec] = applied(wiring)[before:]
    assert "rf-stale" not in str(rec.detail["rules_deleted"])

    res = AzureReconcile(wiring, azure, CONFIG).run()
    assert res.failed == {} and res.warnings == 0
    assert "rf-stale" not in rules_of(arm, NSG)
    [rec] = applied(wiring)[before + 1 :]
    assert [r["rule"] for r in rec.detail["rules_deleted"]] == ["rf-stale"]
    assert AzureReconcile(wiring, azure, CONFIG).run().perimeter_writes == 0


def test_the_local_arm_refuses_a_create_only_put_of_what_exists(arm: ArmServer, azure: Azure) -> None:
    """What the tests above rely on, through the real client: ``If-None-Match: *`` passed as the
    perimeter passes it reaches the server; the first PUT creates, the second is 412 and changes
    nothing."""
    ops = azure.arm(SUB).network.network_security_groups
    body = NetworkSecurityGroup({"location": "westeurope", "tags": {"n": "1"}})
    ops.begin_create_or_update(RG, "rf-prod-nsg", body, headers={"If-None-Match": "*"}).result()
    first = arm.get(NSG)
    assert first is not None
    again = NetworkSecurityGroup({"location": "westeurope", "tags": {"n": "2"}})
    with pytest.raises(HttpResponseError) as refused:
        ops.begin_create_or_update(RG, "rf-prod-nsg", again, headers={"If-None-Match": "*"}).result()
    assert refused.value.status_code == 412
    held = arm.get(NSG)
    assert held is not None and held["tags"] == {"n": "1"} and held["etag"] == first["etag"]
