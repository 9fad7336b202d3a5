"""Attacks on the Azure perimeter, the real AzurePerimeter against the local ARM server: drift in our
NSGs (a deleted deny, a hand-added rule, an edited rule), a VM moving or leaving its environment,
ASGs and NSGs of other teams that share our prefix, environments whose names share a prefix, and a
bad CIDR in the configuration."""

from __future__ import annotations

from typing import Any

import pytest
from azure.core.exceptions import HttpResponseError
from azure.mgmt.network.models import ApplicationSecurityGroup, NetworkSecurityGroup

from ringfence.clouds.azure.perimeter import DENY_ALL_NAME, DENY_PRIORITY, NONE_NSG, AzurePerimeter, CidrInvalid
from ringfence.clouds.azure.wiring import Azure
from ringfence.local.azure_arm import ArmServer
from ringfence.local.azure_estate import RG, SUB, nic_id, seed_vm
from ringfence.perimeter import NameTaken, PerimeterConfig, PublishedService, Scope

WEB, DB, OTHER = (f"8c000000-0000-4000-8000-00000000a00{i}" for i in (1, 2, 3))
CONFIG = PerimeterConfig(admin_cidrs=["10.250.0.0/24"], control_plane_cidrs=["10.9.0.0/24"])
NET = f"/subscriptions/{SUB}/resourceGroups/{RG}/providers/Microsoft.Network"
NSGS = f"{NET}/networkSecurityGroups"
ASGS = f"{NET}/applicationSecurityGroups"


def env(e: str, role: str = "web") -> dict[str, str]:
    return {"app": "ordering", "role": role, "env": e}


def nic_asgs(arm: ArmServer, name: str) -> list[str]:
    nic = arm.get(nic_id(name))
    assert nic is not None
    return sorted(
        a["id"] for a in nic["properties"]["ipConfigurations"][0]["properties"].get("applicationSecurityGroups") or []
    )


def nic_nsg(arm: ArmServer, name: str) -> str:
    nic = arm.get(nic_id(name))
    assert nic is not None
    return str((nic["properties"].get("networkSecurityGroup") or {}).get("id", "")).rsplit("/", 1)[-1]


def rules(arm: ArmServer, nsg: str) -> dict[str, dict[str, Any]]:
    """The NSG's security rules as ARM holds them, name → properties."""
    head = f"{NSGS}/{nsg}/securityRules/".lower()
    return {r["name"]: dict(r["properties"]) for k, r in arm.resources.items() if k.startswith(head)}


def inbound_from_the_vnet(arm: ArmServer, nic: str, port: int) -> str:
    """Azure's verdict on VNet traffic to ``nic``'s port from an address in no ASG: its NSG's inbound
    rules by priority, then the default AllowVnetInBound."""
    on = {a.lower() for a in nic_asgs(arm, nic)}
    nsg = nic_nsg(arm, nic)
    for name, p in sorted(rules(arm, nsg).items(), key=lambda kv: kv[1]["priority"]):
        dst = {a["id"].lower() for a in p.get("destinationApplicationSecurityGroups") or []}
        if p["direction"] != "Inbound" or (dst and not dst & on):
            continue
        if p.get("sourceAddressPrefix") not in ("*", "VirtualNetwork") or p.get("sourceApplicationSecurityGroups"):
            continue
        if p.get("destinationPortRange") not in ("*", str(port)):
            continue
        return f"{p['access']} {nsg}/{name}"
    return "Allow AllowVnetInBound"


def hand_rule(arm: ArmServer, nsg: str, name: str, priority: int, access: str = "Allow") -> None:
    arm.put(
        f"{NSGS}/{nsg}/securityRules/{name}",
        {
            "properties": {
                "protocol": "*",
                "access": access,
                "priority": priority,
                "direction": "Inbound",
                "sourcePortRange": "*",
                "destinationPortRange": "*",
                "sourceAddressPrefix": "*",
                "destinationAddressPrefix": "*",
            }
        },
    )


def test_attack_azure_a_vm_moved_to_another_env_gets_that_envs_nsg_and_deny(arm: ArmServer, azure: Azure) -> None:
    seed_vm(arm, "web-1", WEB, "10.20.1.4")
    seed_vm(arm, "db-1", DB, "10.20.1.5")
    per = AzurePerimeter(azure.arm(SUB), CONFIG)
    per.reconcile({WEB: env("prod"), DB: env("prod", "database")})
    assert inbound_from_the_vnet(arm, "db-1-nic", 5432) == "Deny rf-prod-nsg/rf-boundary-deny"
    per.reconcile({WEB: env("prod"), DB: env("dev", "database")})
    # rf-prod-nsg's deny names rf-prod-boundary, which the NIC no longer has: it must leave that NSG
    assert nic_nsg(arm, "db-1-nic") == "rf-dev-nsg"
    assert inbound_from_the_vnet(arm, "db-1-nic", 5432) == "Deny rf-dev-nsg/rf-boundary-deny"
    assert per.reconcile({WEB: env("prod"), DB: env("dev", "database")}).writes == []


def test_attack_azure_a_nic_put_back_on_another_envs_nsg_is_moved_again(arm: ArmServer, azure: Azure) -> None:
    seed_vm(arm, "web-1", WEB, "10.20.1.4")
    seed_vm(arm, "db-1", DB, "10.20.1.5")
    per = AzurePerimeter(azure.arm(SUB), CONFIG)
    per.reconcile({WEB: env("prod"), DB: env("dev")})
    nic = arm.get(nic_id("db-1-nic"))
    assert nic is not None
    nic["properties"]["networkSecurityGroup"] = {"id": f"{NSGS}/rf-prod-nsg"}
    arm.put(nic["id"], nic)
    res = per.reconcile({WEB: env("prod"), DB: env("dev")}, Scope.WORKLOADS)
    assert res.writes == ["PUT nic db-1-nic"] and nic_nsg(arm, "db-1-nic") == "rf-dev-nsg"


@pytest.mark.parametrize("scope", [Scope.FULL, Scope.WORKLOADS])
def test_attack_azure_a_deleted_or_edited_boundary_deny_is_restored(arm: ArmServer, azure: Azure, scope: Scope) -> None:
    seed_vm(arm, "web-1", WEB, "10.20.1.4")
    per = AzurePerimeter(azure.arm(SUB), CONFIG)
    per.reconcile({WEB: env("prod")})
    arm.delete(f"{NSGS}/rf-prod-nsg/securityRules/rf-boundary-deny")
    assert inbound_from_the_vnet(arm, "web-1-nic", 5432) == "Allow AllowVnetInBound"
    assert per.reconcile({WEB: env("prod")}, scope).writes == ["PUT rule rf-prod-nsg/rf-boundary-deny"]
    assert inbound_from_the_vnet(arm, "web-1-nic", 5432) == "Deny rf-prod-nsg/rf-boundary-deny"
    deny = arm.get(f"{NSGS}/rf-prod-nsg/securityRules/rf-boundary-deny")
    assert deny is not None
    deny["properties"]["access"] = "Allow"
    arm.put(deny["id"], deny)
    assert per.reconcile({WEB: env("prod")}, scope).writes == ["PUT rule rf-prod-nsg/rf-boundary-deny"]
    restored = rules(arm, "rf-prod-nsg")["rf-boundary-deny"]
    assert restored["access"] == "Deny" and restored["priority"] == DENY_PRIORITY


def test_attack_azure_hand_added_and_edited_rules_in_our_nsg_are_undone(arm: ArmServer, azure: Azure) -> None:
    seed_vm(arm, "web-1", WEB, "10.20.1.4")
    per = AzurePerimeter(azure.arm(SUB), CONFIG)
    per.reconcile({WEB: env("prod")})
    before = rules(arm, "rf-prod-nsg")
    hand_rule(arm, "rf-prod-nsg", "temp-debug", 150)
    # the admin rule opened to everyone, its description (what the old code read) kept
    ssh = next(n for n, p in before.items() if p.get("destinationPortRange") == "22")
    edited = arm.get(f"{NSGS}/rf-prod-nsg/securityRules/{ssh}")
    assert edited is not None
    edited["properties"]["sourceAddressPrefix"] = "*"
    arm.put(edited["id"], edited)
    assert inbound_from_the_vnet(arm, "web-1-nic", 5432) == "Allow rf-prod-nsg/temp-debug"
    # the event path repairs what is ours but deletes nothing
    res = per.reconcile({WEB: env("prod")}, Scope.WORKLOADS)
    assert res.writes == [f"PUT rule rf-prod-nsg/{ssh}"]
    assert rules(arm, "rf-prod-nsg")[ssh]["sourceAddressPrefix"] == "10.250.0.0/24"
    # the full run removes every rule Ringfence does not want
    res = per.reconcile({WEB: env("prod")})
    assert res.writes == ["DELETE rule rf-prod-nsg/temp-debug"]
    after = rules(arm, "rf-prod-nsg")
    assert {n: p.get("sourceAddressPrefix") for n, p in before.items()} == {
        n: p.get("sourceAddressPrefix") for n, p in after.items()
    }
    assert inbound_from_the_vnet(arm, "web-1-nic", 5432) == "Deny rf-prod-nsg/rf-boundary-deny"
    assert per.reconcile({WEB: env("prod")}).writes == []


def test_attack_azure_another_teams_rf_named_asg_is_not_ours(arm: ArmServer, azure: Azure) -> None:
    seed_vm(arm, "web-1", WEB, "10.20.1.4")
    seed_vm(arm, "db-1", DB, "10.20.1.5")
    pci = arm.put(f"{ASGS}/rf-payments-pci", {"location": "westeurope", "tags": {"owner": "payments"}})
    # tagged as ours but not a name the plan gives: not ours either
    odd = arm.put(f"{ASGS}/rf-payments-vault", {"location": "westeurope", "tags": {"ringfence": "perimeter"}})
    nic = arm.get(nic_id("db-1-nic"))
    assert nic is not None
    nic["properties"]["ipConfigurations"][0]["properties"]["applicationSecurityGroups"] = [
        {"id": pci["id"]},
        {"id": odd["id"]},
    ]
    arm.put(nic["id"], nic)
    res = AzurePerimeter(azure.arm(SUB), CONFIG).reconcile({WEB: env("prod"), DB: env("prod")})
    assert not [w for w in res.writes if "payments" in w]
    assert arm.get(pci["id"]) is not None and arm.get(odd["id"]) is not None
    assert nic_asgs(arm, "db-1-nic") == sorted(
        [pci["id"], odd["id"], f"{ASGS}/rf-prod-boundary", f"{ASGS}/rf-prod-mgmt"]
    )


def test_attack_azure_an_untagged_asg_holding_our_name_is_refused_not_taken_over(arm: ArmServer, azure: Azure) -> None:
    seed_vm(arm, "web-1", WEB, "10.20.1.4")
    arm.put(f"{ASGS}/rf-prod-boundary", {"location": "westeurope", "tags": {"owner": "payments"}})
    with arm.recording() as calls, pytest.raises(NameTaken, match="rf-prod-boundary"):
        AzurePerimeter(azure.arm(SUB), CONFIG).reconcile({WEB: env("prod")})
    assert not [c for c in calls if c[0] != "GET"]


def test_attack_azure_our_asg_of_the_same_name_in_another_group_is_not_used(arm: ArmServer, azure: Azure) -> None:
    seed_vm(arm, "web-1", WEB, "10.20.1.4")
    elsewhere = f"/subscriptions/{SUB}/resourceGroups/shared-rg/providers/Microsoft.Network/applicationSecurityGroups"
    theirs = arm.put(f"{elsewhere}/rf-prod-boundary", {"location": "westeurope", "tags": {"ringfence": "perimeter"}})
    res = AzurePerimeter(azure.arm(SUB), CONFIG).reconcile({WEB: env("prod")})
    assert "PUT asg rf-prod-boundary" in res.writes
    assert nic_asgs(arm, "web-1-nic") == [f"{ASGS}/rf-prod-boundary", f"{ASGS}/rf-prod-mgmt"]
    assert arm.get(theirs["id"]) is not None


def test_attack_azure_an_env_sharing_a_prefix_does_not_hide_a_missing_nsg(arm: ArmServer, azure: Azure) -> None:
    seed_vm(arm, "eu-1", WEB, "10.20.1.4")
    seed_vm(arm, "p-1", DB, "10.20.1.5")
    per = AzurePerimeter(azure.arm(SUB), CONFIG)
    per.reconcile({WEB: env("prod-eu")})
    res = per.reconcile({WEB: env("prod-eu"), DB: env("prod")})
    assert "PUT nsg rf-prod-nsg" in res.writes and arm.get(f"{NSGS}/rf-prod-nsg") is not None
    assert nic_nsg(arm, "p-1-nic") == "rf-prod-nsg"
    assert inbound_from_the_vnet(arm, "p-1-nic", 5432) == "Deny rf-prod-nsg/rf-boundary-deny"


def test_attack_azure_the_event_path_does_not_take_a_hand_rules_priority(arm: ArmServer, azure: Azure) -> None:
    seed_vm(arm, "web-1", WEB, "10.20.1.4")
    AzurePerimeter(azure.arm(SUB), CONFIG).reconcile({WEB: env("prod")})
    taken = sorted(p["priority"] for p in rules(arm, "rf-prod-nsg").values())
    free = next(n for n in range(100, 4096) if n not in taken)
    hand_rule(arm, "rf-prod-nsg", "ops-deny-telnet", free, "Deny")
    wider = PerimeterConfig(admin_cidrs=["10.250.0.0/24", "10.251.0.0/24"], control_plane_cidrs=["10.9.0.0/24"])
    res = AzurePerimeter(azure.arm(SUB), wider).reconcile({WEB: env("prod")}, Scope.WORKLOADS)
    assert len([w for w in res.writes if w.startswith("PUT rule")]) == 2  # tcp/22 and tcp/3389 from the new range
    prios = [p["priority"] for p in rules(arm, "rf-prod-nsg").values()]
    assert len(prios) == len(set(prios)), "two rules of one NSG share a priority"


def test_attack_azure_a_vm_that_loses_its_env_label_loses_our_asgs(arm: ArmServer, azure: Azure) -> None:
    published = PerimeterConfig(
        admin_cidrs=["10.250.0.0/24"],
        published=[PublishedService(name="web", match={"role": "web"}, ports=["tcp/443"])],
    )
    seed_vm(arm, "web-1", WEB, "10.20.1.4")
    seed_vm(arm, "web-2", DB, "10.20.1.5")
    per = AzurePerimeter(azure.arm(SUB), published)
    per.reconcile({WEB: env("prod"), DB: env("prod")})
    assert f"{ASGS}/rf-prod-published.web" in nic_asgs(arm, "web-2-nic")
    assert inbound_from_the_vnet(arm, "web-2-nic", 5432) == "Deny rf-prod-nsg/rf-boundary-deny"
    envless = {WEB: env("prod"), DB: {"app": "ordering", "role": "web"}}
    res = per.reconcile(envless)
    # our ASGs off and rf-none on, in one PUT: rf-prod-nsg's deny names an ASG the NIC no longer has
    assert res.writes == ["PUT nsg rf-none", f"PUT rule rf-none/{DENY_ALL_NAME}", "PUT nic web-2-nic"]
    assert nic_asgs(arm, "web-2-nic") == []  # Azure needs no ASG on a NIC: no internet 443, not in prod
    assert nic_nsg(arm, "web-2-nic") == NONE_NSG
    for port in (22, 443, 5432):  # the VNet is not let in by Azure's default AllowVnetInBound
        assert inbound_from_the_vnet(arm, "web-2-nic", port) == f"Deny {NONE_NSG}/{DENY_ALL_NAME}"
    assert per.reconcile(envless).writes == []
    # rf-none is kept closed, by the event path too
    arm.delete(f"{NSGS}/{NONE_NSG}/securityRules/{DENY_ALL_NAME}")
    assert per.reconcile(envless, Scope.WORKLOADS).writes == [f"PUT rule rf-none/{DENY_ALL_NAME}"]
    # back in prod: off rf-none, onto rf-prod-nsg
    per.reconcile({WEB: env("prod"), DB: env("prod")})
    assert nic_nsg(arm, "web-2-nic") == "rf-prod-nsg"
    assert inbound_from_the_vnet(arm, "web-2-nic", 5432) == "Deny rf-prod-nsg/rf-boundary-deny"


def test_a_vm_ringfence_never_segmented_is_not_closed(arm: ArmServer, azure: Azure) -> None:
    seed_vm(arm, "web-1", WEB, "10.20.1.4")
    seed_vm(arm, "legacy-1", DB, "10.20.1.5")
    res = AzurePerimeter(azure.arm(SUB), CONFIG).reconcile({WEB: env("prod"), DB: {"app": "legacy"}})
    assert "PUT nic legacy-1-nic" not in res.writes and nic_nsg(arm, "legacy-1-nic") == ""


def test_a_bad_cidr_fails_the_whole_run_before_any_write(arm: ArmServer, azure: Azure) -> None:
    seed_vm(arm, "web-1", WEB, "10.20.1.4")
    for bad in (
        PerimeterConfig(admin_cidrs=["10.250.0.0/24", "10.250.0/33"]),
        PerimeterConfig(control_plane_cidrs=["cp.example.com"]),
        PerimeterConfig(
            published=[PublishedService(name="web", match={"role": "web"}, ports=["tcp/443"], sources=["300.0.0.0/8"])]
        ),
    ):
        with arm.recording() as calls, pytest.raises(CidrInvalid) as err:
            AzurePerimeter(azure.arm(SUB), bad).reconcile({WEB: env("prod")})
        named = [*bad.admin_cidrs[1:], *bad.control_plane_cidrs, *(s for p in bad.published for s in p.sources)]
        assert repr(named[0]) in str(err.value)
        assert not [c for c in calls if c[0] != "GET"]


@pytest.mark.parametrize("reachable", [{}, {"prod": ["dev"]}])
def test_an_asg_is_deleted_only_once_no_rule_of_ours_names_it(
    arm: ArmServer, azure: Azure, reachable: dict[str, list[str]]
) -> None:
    seed_vm(arm, "web-1", WEB, "10.20.1.4")
    seed_vm(arm, "dev-1", DB, "10.20.1.5")
    per = AzurePerimeter(azure.arm(SUB), CONFIG.model_copy(update={"reachable_from": reachable}))
    per.reconcile({WEB: env("prod"), DB: env("dev")})
    res = per.reconcile({WEB: env("prod"), DB: env("prod")})
    assert "DELETE asg rf-dev-boundary" in res.writes and "DELETE asg rf-dev-mgmt" in res.writes
    # ARM refuses to delete an ASG a security rule names: the rules naming it went first
    first_asg = min(i for i, w in enumerate(res.writes) if w.startswith("DELETE asg"))
    assert all(i < first_asg for i, w in enumerate(res.writes) if w.startswith("DELETE rule"))
    named = {
        a["id"].lower()
        for r in arm.resources.values()
        if r["type"].endswith("securityRules")
        for side in ("source", "destination")
        for a in r["properties"].get(f"{side}ApplicationSecurityGroups") or []
    }
    assert not [n for n in named if arm.get(n) is None], "a rule names a deleted ASG"
    assert per.reconcile({WEB: env("prod"), DB: env("prod")}).writes == []


def internet_ports(arm: ArmServer, nic: str) -> set[str]:
    """The ports ``nic`` is open on from 0.0.0.0/0: the inbound Allow rules of its NSG whose source
    is the internet and whose destination is an ASG the NIC carries."""
    on = {a.lower() for a in nic_asgs(arm, nic)}
    return {
        str(p["destinationPortRange"])
        for p in rules(arm, nic_nsg(arm, nic)).values()
        if p["direction"] == "Inbound" and p["access"] == "Allow" and p.get("sourceAddressPrefix") == "0.0.0.0/0"
        if {a["id"].lower() for a in p.get("destinationApplicationSecurityGroups") or []} & on
    }


def test_attack_azure_a_published_service_does_not_get_another_services_ports(arm: ArmServer, azure: Azure) -> None:
    cfg = CONFIG.model_copy(
        update={
            "published": [
                PublishedService(name="web", match={"role": "web"}, ports=["tcp/443"]),
                PublishedService(name="bastion", match={"role": "jumpbox"}, ports=["tcp/22"]),
            ]
        }
    )
    seed_vm(arm, "web-1", WEB, "10.20.1.4")
    seed_vm(arm, "jump-1", DB, "10.20.1.5")
    wl = {WEB: env("prod"), DB: env("prod", "jumpbox")}
    # what the previous version made: one shared rf-prod-published with the union of the ports
    AzurePerimeter(azure.arm(SUB), cfg).reconcile(wl)
    old = arm.put(f"{ASGS}/rf-prod-published", {"location": "westeurope", "tags": {"ringfence": "perimeter"}})
    for name in ("web-1-nic", "jump-1-nic"):
        nic = arm.get(nic_id(name))
        assert nic is not None
        nic["properties"]["ipConfigurations"][0]["properties"]["applicationSecurityGroups"] = [
            {"id": f"{ASGS}/rf-prod-boundary"},
            {"id": f"{ASGS}/rf-prod-mgmt"},
            {"id": old["id"]},
        ]
        arm.put(nic["id"], nic)
    for port in ("22", "443"):
        arm.put(
            f"{NSGS}/rf-prod-nsg/securityRules/old-{port}",
            {
                "properties": {
                    "protocol": "Tcp",
                    "access": "Allow",
                    "priority": 3000 + int(port),
                    "direction": "Inbound",
                    "sourcePortRange": "*",
                    "destinationPortRange": port,
                    "sourceAddressPrefix": "0.0.0.0/0",
                    "destinationApplicationSecurityGroups": [{"id": old["id"]}],
                }
            },
        )
    assert internet_ports(arm, "web-1-nic") == {"22", "443"}
    res = AzurePerimeter(azure.arm(SUB), cfg).reconcile(wl)
    assert internet_ports(arm, "web-1-nic") == {"443"}, "the web tier is not open on the bastion's tcp/22"
    assert internet_ports(arm, "jump-1-nic") == {"22"}
    assert f"{ASGS}/rf-prod-published.web" in nic_asgs(arm, "web-1-nic")
    assert f"{ASGS}/rf-prod-published.bastion" in nic_asgs(arm, "jump-1-nic")
    # the older shared ASG: its rules deleted, taken off every NIC, then deleted itself
    assert arm.get(old["id"]) is None and "DELETE asg rf-prod-published" in res.writes
    assert res.writes.index("DELETE asg rf-prod-published") > max(
        i for i, w in enumerate(res.writes) if w.startswith(("DELETE rule", "PUT nic"))
    )
    assert AzurePerimeter(azure.arm(SUB), cfg).reconcile(wl).writes == []


def test_a_published_service_whose_name_cannot_name_an_asg_is_skipped_with_a_warning(
    arm: ArmServer, azure: Azure
) -> None:
    cfg = CONFIG.model_copy(
        update={"published": [PublishedService(name="web-tier", match={"role": "web"}, ports=["tcp/443"])]}
    )
    seed_vm(arm, "web-1", WEB, "10.20.1.4")
    res = AzurePerimeter(azure.arm(SUB), cfg).reconcile({WEB: env("prod")})
    assert any("'web-tier'" in w for w in res.warnings)
    assert internet_ports(arm, "web-1-nic") == set()
    assert nic_asgs(arm, "web-1-nic") == [f"{ASGS}/rf-prod-boundary", f"{ASGS}/rf-prod-mgmt"]


@pytest.mark.parametrize("bad", ["a b", "x" * 90, "team#1"])
def test_attack_azure_an_env_no_asg_can_be_named_after_does_not_stop_the_run(
    arm: ArmServer, azure: Azure, bad: str
) -> None:
    seed_vm(arm, "web-1", WEB, "10.20.1.4")
    seed_vm(arm, "oddball", DB, "10.20.1.5")
    per = AzurePerimeter(azure.arm(SUB), CONFIG)
    per.reconcile({WEB: env("prod")})
    arm.delete(f"{NSGS}/rf-prod-nsg/securityRules/rf-boundary-deny")  # drift the run must still repair
    with arm.recording() as calls:
        res = per.reconcile({WEB: env("prod"), DB: env(bad)})
    assert res.writes == ["PUT rule rf-prod-nsg/rf-boundary-deny"]
    assert inbound_from_the_vnet(arm, "web-1-nic", 5432) == "Deny rf-prod-nsg/rf-boundary-deny"
    assert any(DB in w and "left as they are" in w for w in res.warnings)
    assert nic_asgs(arm, "oddball-nic") == [] and not [c for c in calls if "oddball" in c[1] and c[0] != "GET"]


def test_the_local_arm_refuses_asg_and_nsg_names_arm_refuses(arm: ArmServer, azure: Azure) -> None:
    ops = azure.arm(SUB).network
    for bad in ("rf-a b-boundary", "rf-team#1-nsg", "rf-" + "x" * 78, "rf-x-", ".rf-x"):
        with pytest.raises(HttpResponseError, match="InvalidResourceName"):
            ops.application_security_groups.begin_create_or_update(
                RG, bad, ApplicationSecurityGroup(location="westeurope")
            ).result()
    made = ops.network_security_groups.begin_create_or_update(
        RG, "rf-prod-published.web_", NetworkSecurityGroup(location="westeurope")
    ).result()
    assert made.name == "rf-prod-published.web_"


def test_attack_azure_two_vnets_of_one_resource_group_share_their_envs_nsg_and_converge(
    arm: ArmServer, azure: Azure
) -> None:
    cfg = CONFIG.model_copy(
        update={"published": [PublishedService(name="web", match={"role": "web"}, ports=["tcp/443"])]}
    )
    seed_vm(arm, "web-1", WEB, "10.20.1.4")
    seed_vm(arm, "db-9", DB, "10.30.1.4")
    nic = arm.get(nic_id("db-9-nic"))
    assert nic is not None
    nic["properties"]["ipConfigurations"][0]["properties"]["subnet"]["id"] = f"{NET}/virtualNetworks/zz-vnet/subnets/s1"
    arm.put(nic["id"], nic)
    wl = {WEB: env("prod"), DB: env("prod", "database")}
    per = AzurePerimeter(azure.arm(SUB), cfg)
    per.reconcile(wl)
    for run in range(3):
        assert per.reconcile(wl).writes == [], f"full run {run + 2} writes again"
    assert internet_ports(arm, "web-1-nic") == {"443"} and internet_ports(arm, "db-9-nic") == set()
    for nic_name in ("web-1-nic", "db-9-nic"):
        assert inbound_from_the_vnet(arm, nic_name, 5432) == "Deny rf-prod-nsg/rf-boundary-deny"
    assert arm.get(f"{ASGS}/rf-prod-published.web") is not None
