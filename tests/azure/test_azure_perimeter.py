"""Azure perimeters: the provider-neutral plan as ASGs on NIC IP configurations and rules of one NSG
per VNet and environment, written with the real azure-mgmt-network client to the local ARM server;
Azure's limits checked before any change; the smallest diff on later runs."""

from __future__ import annotations

import pytest

from ringfence.clouds.azure.perimeter import RULES_PER_NSG, AzurePerimeter, azure_limits, security_rule
from ringfence.clouds.azure.wiring import Azure
from ringfence.local.azure_arm import ArmServer
from ringfence.local.azure_estate import SUB, nic_id, seed_vm
from ringfence.perimeter import INGRESS, Member, PerimeterConfig, PerimeterRule, QuotaExceeded, desired_state

from .conftest import PROD_WEB

WEB, DB, DEV = (f"8c000000-0000-4000-8000-00000000d00{i}" for i in (1, 2, 3))
CONFIG = PerimeterConfig(admin_cidrs=["10.250.0.0/24"], control_plane_cidrs=["10.9.0.0/24"])


def labels(env: str, role: str) -> dict[str, str]:
    return {"app": "ordering", "role": role, "env": env}


def writes(arm: ArmServer, calls: list[tuple[str, str]]) -> list[str]:
    return [
        f"{m} {p.split('?')[0].rsplit('/', 2)[-2]}/{p.split('?')[0].rsplit('/', 1)[-1]}"
        for m, p in calls
        if m in ("PUT", "DELETE", "PATCH")
    ]


def test_groups_rules_and_nics_then_nothing_on_a_second_run(arm: ArmServer, azure: Azure) -> None:
    seed_vm(arm, "web-1", WEB, "10.20.1.4", PROD_WEB)
    seed_vm(arm, "db-1", DB, "10.20.1.5", PROD_WEB)
    seed_vm(arm, "dev-1", DEV, "10.20.1.9", PROD_WEB)
    inv = {WEB: labels("prod", "web"), DB: labels("prod", "database"), DEV: labels("dev", "web")}
    per = AzurePerimeter(azure.arm(SUB), CONFIG)
    res = per.reconcile(inv)
    assert res.warnings == []
    asgs = sorted(w.split()[-1] for w in res.writes if w.startswith("PUT asg"))
    assert asgs == ["rf-dev-boundary", "rf-dev-mgmt", "rf-prod-boundary", "rf-prod-mgmt"]
    assert sorted(w for w in res.writes if w.startswith("PUT nsg")) == ["PUT nsg rf-dev-nsg", "PUT nsg rf-prod-nsg"]
    web_nic = arm.get(nic_id("web-1-nic"))
    assert web_nic is not None
    on = {
        a["id"].rsplit("/", 1)[-1]
        for a in web_nic["properties"]["ipConfigurations"][0]["properties"]["applicationSecurityGroups"]
    }
    assert on == {"rf-prod-boundary", "rf-prod-mgmt"}
    assert web_nic["properties"]["networkSecurityGroup"]["id"].endswith("/rf-prod-nsg")
    # the boundary closes with a deny at 4096 (Azure's defaults would let the whole VNet in)
    deny = arm.get(
        f"/subscriptions/{SUB}/resourceGroups/ordering-prod/providers/Microsoft.Network/networkSecurityGroups/rf-prod-nsg/securityRules/rf-boundary-deny"
    )
    assert deny is not None and deny["properties"]["priority"] == 4096 and deny["properties"]["access"] == "Deny"
    with arm.recording() as calls:
        again = per.reconcile(inv)
    assert again.writes == [] and again.plan.empty
    assert not [c for c in calls if c[0] != "GET"], "a converged perimeter is only read"


def test_a_workload_moving_env_rewrites_only_its_nic(arm: ArmServer, azure: Azure) -> None:
    seed_vm(arm, "web-1", WEB, "10.20.1.4", PROD_WEB)
    seed_vm(arm, "dev-1", DEV, "10.20.1.9", PROD_WEB)
    per = AzurePerimeter(azure.arm(SUB), CONFIG)
    per.reconcile({WEB: labels("prod", "web"), DEV: labels("dev", "web")})
    res = per.reconcile({WEB: labels("prod", "web"), DEV: labels("prod", "web")})
    nic_writes = [w for w in res.writes if w.startswith("PUT nic")]
    assert nic_writes == ["PUT nic dev-1-nic"]
    assert "DELETE asg rf-dev-boundary" in res.writes  # dev lost its purpose (full run)


def test_over_an_azure_limit_nothing_is_written(arm: ArmServer, azure: Azure) -> None:
    seed_vm(arm, "web-1", WEB, "10.20.1.4", PROD_WEB)
    many = PerimeterConfig(admin_cidrs=[f"10.{i // 250}.{i % 250}.0/24" for i in range(RULES_PER_NSG)])
    with arm.recording() as calls, pytest.raises(QuotaExceeded, match="limit: rules per NSG"):
        AzurePerimeter(azure.arm(SUB), many).reconcile({WEB: labels("prod", "web")})
    assert not [c for c in calls if c[0] != "GET"]


def test_limits_name_each_azure_limit() -> None:
    members = [Member(f"nic-{i}", "vnet-1", labels("prod", "web")) for i in range(4001)]
    ds = desired_state(CONFIG, members)
    assert any("4001 IP configurations > 4000" in v for v in azure_limits(ds, {}))
    rule = security_rule("asg-b", PerimeterRule(INGRESS, "tcp", 22, 22, "cidr", "10.0.0.0/8"), {}, 100)
    assert rule["properties"]["destinationApplicationSecurityGroups"] == [{"id": "asg-b"}]
    assert (
        rule["properties"]["sourceAddressPrefix"] == "10.0.0.0/8" and rule["properties"]["destinationPortRange"] == "22"
    )


def test_a_throttled_arm_is_retried_and_the_perimeter_written(arm: ArmServer, azure: Azure) -> None:
    seed_vm(arm, "web-1", WEB, "10.20.1.4", PROD_WEB)
    arm.throttle(times=2, retry_after=1)
    with arm.recording() as calls:
        res = AzurePerimeter(azure.arm(SUB), CONFIG).reconcile({WEB: labels("prod", "web")})
    assert calls[0] == calls[1] == calls[2], "the throttled request was retried as it was"
    assert "PUT nsg rf-prod-nsg" in res.writes
    nic = arm.get(nic_id("web-1-nic"))
    assert nic is not None and nic["properties"]["networkSecurityGroup"]["id"].endswith("/rf-prod-nsg")
