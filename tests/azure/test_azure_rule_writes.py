"""The Azure perimeter writes each rule of its NSGs conditionally on the rule as the run read it
(``If-Match`` its etag, ``If-None-Match: *`` where there was none): a rule changed between that read
and the write is read again and written over what it is then, never blind. The scheduled reconcile
(AzureReconcile) with the real azure-mgmt-network client against the local ARM server, which
answers 412 as ARM does; the other writes land through :meth:`ArmServer.before`."""

from __future__ import annotations

import copy
from urllib.parse import unquote

import pytest

from ringfence.audit import AuditRecord
from ringfence.clouds.azure.reconcile import AzureReconcile
from ringfence.clouds.azure.wiring import Azure
from ringfence.local.azure_arm import ArmServer
from ringfence.local.azure_estate import RG, SUB, seed_vm
from ringfence.local.wiring import LocalWiring
from ringfence.perimeter import PerimeterConfig

from .conftest import PROD_WEB

WEB = "ab000000-0000-4000-8000-00000000e301"
NSG = f"/subscriptions/{SUB}/resourceGroups/{RG}/providers/Microsoft.Network/networkSecurityGroups/rf-prod-nsg"
DENY = f"{NSG}/securityRules/rf-boundary-deny"
CONFIG = PerimeterConfig(admin_cidrs=["10.250.0.0/24"], control_plane_cidrs=["10.9.0.0/24"])


def applied(w: LocalWiring) -> list[AuditRecord]:
    return [a for a in w.store.audit_log() if a.action == "perimeter.apply"]


def on_deny(calls: list[tuple[str, str]]) -> list[str]:
    return [m for m, path in calls if unquote(path.split("?")[0]).lower() == DENY.lower()]


def access(arm: ArmServer) -> str | None:
    rule = arm.get(DENY)
    return None if rule is None else str(rule["properties"]["access"])


def edit(arm: ArmServer, how: str) -> None:
    """Another writer's change to the deny rule (or its making again, if gone)."""
    rule = copy.deepcopy(arm.get(DENY)) or {"properties": {"priority": 4096, "direction": "Inbound"}}
    rule["properties"] |= {"access": "Allow", "protocol": "*", "description": how}
    arm.put(DENY, {"properties": rule["properties"]})


@pytest.fixture
def converged(arm: ArmServer, azure: Azure, wiring: LocalWiring) -> None:
    seed_vm(arm, "web-1", WEB, "10.20.1.4", PROD_WEB)
    assert AzureReconcile(wiring, azure, CONFIG).run().failed == {}
    assert access(arm) == "Deny"


def test_a_rule_changed_between_the_runs_read_and_its_write_is_read_again_and_repaired(
    arm: ArmServer, azure: Azure, wiring: LocalWiring, converged: None
) -> None:
    """The deny is turned into an allow; the run reads it and, just before its write, it is changed
    again: ARM refuses the write (If-Match, 412), the rule is read again and written with its new
    etag: the deny is back, and the run's record lists that write."""
    edit(arm, "first")
    arm.before("PUT", DENY, lambda: edit(arm, "second"))
    before = len(applied(wiring))
    with arm.recording() as calls:
        res = AzureReconcile(wiring, azure, CONFIG).run()
    assert res.failed == {} and res.warnings == 0
    assert on_deny(calls) == ["PUT", "GET", "PUT"]  # refused once, read again, written
    assert access(arm) == "Deny"
    [rec] = applied(wiring)[before:]
    assert [r["rule"] for r in rec.detail["rules_written"]] == ["rf-boundary-deny"]


def test_a_rule_deleted_and_made_again_by_another_writer_is_not_written_blind(
    arm: ArmServer, azure: Azure, wiring: LocalWiring, converged: None
) -> None:
    """The deny is deleted; just before the run makes it again (If-None-Match: *) someone makes an
    allow of its name: ARM refuses ours (412), the rule is read and written over with its etag."""
    arm.delete(DENY)
    arm.before("PUT", DENY, lambda: edit(arm, "made again"))
    with arm.recording() as calls:
        res = AzureReconcile(wiring, azure, CONFIG).run()
    assert res.failed == {} and res.warnings == 0
    assert on_deny(calls) == ["PUT", "GET", "PUT"]
    assert access(arm) == "Deny"


def test_a_rule_that_keeps_changing_under_the_write_is_left_for_the_next_run(
    arm: ArmServer, azure: Azure, wiring: LocalWiring, converged: None
) -> None:
    """Refused twice: the run writes the rest, says so (a warning, counted), its changes do not
    list the rule, and the subscription is reported failed; the next run repairs it."""
    edit(arm, "first")
    arm.before("PUT", DENY, lambda: edit(arm, "again"), times=2)
    with arm.recording() as calls:
        res = AzureReconcile(wiring, azure, CONFIG).run()
    assert list(res.failed) == [SUB] and res.warnings == 1
    assert on_deny(calls) == ["PUT", "GET", "PUT"]  # both refused, no third try
    assert access(arm) == "Allow"

    res = AzureReconcile(wiring, azure, CONFIG).run()
    assert res.failed == {} and res.warnings == 0 and access(arm) == "Deny"


def test_attack_azure_a_rule_write_refused_twice_puts_no_nic_on_its_nsg_and_fails_the_run(
    arm: ArmServer, azure: Azure, wiring: LocalWiring
) -> None:
    """A VM's first run: its NSG is made, and someone turns the boundary's deny into an allow of
    everything just before each of the run's two writes of it. The VM's NIC is not put on that NSG
    (it would let the whole VNet and more in), the subscription is reported failed (counted, tried
    again next run), and a perimeter.apply.partial record says what the perimeter.apply record
    listed but was not done: the deny and the NIC. The next run attaches it under the deny."""
    nic = f"/subscriptions/{SUB}/resourceGroups/{RG}/providers/Microsoft.Network/networkInterfaces/web-1-nic"

    def allow_all(how: str) -> None:
        edit(arm, how)
        rule = copy.deepcopy(arm.get(DENY))
        assert rule is not None
        rule["properties"] |= {"sourceAddressPrefix": "*", "destinationAddressPrefix": "*"}
        rule["properties"].pop("destinationApplicationSecurityGroups", None)
        arm.put(DENY, {"properties": rule["properties"]})

    seed_vm(arm, "web-1", WEB, "10.20.1.4", PROD_WEB)
    assert arm.get(NSG) is None
    arm.before("PUT", DENY, lambda: allow_all("racer"), times=2)
    failures: list[int] = []
    run = AzureReconcile(
        wiring, azure, CONFIG, metric=lambda n, v: failures.append(v) if n == "AzureReconcileFailed" else None
    )
    res = run.run()
    assert access(arm) == "Allow"
    assert (arm.get(nic) or {})["properties"].get("networkSecurityGroup") is None  # left as it was
    assert list(res.failed) == [SUB] and failures == [1]
    [rec] = applied(wiring)
    assert "rf-boundary-deny" in [r["rule"] for r in rec.detail["rules_written"]]
    assert [n["nic"] for n in rec.detail["nics"]] == ["web-1-nic"]
    [partial] = [a for a in wiring.store.audit_log() if a.action == "perimeter.apply.partial"]
    assert (partial.principal, partial.target) == (rec.principal, rec.target)
    not_done = partial.detail["not_done"]
    assert [r["rule"] for r in not_done["rules_written"]] == ["rf-boundary-deny"]
    assert [(n["nic"], n["nsg"]) for n in not_done["nics"]] == [("web-1-nic", "rf-prod-nsg")]

    res = AzureReconcile(wiring, azure, CONFIG).run()
    assert res.failed == {} and access(arm) == "Deny"
    assert str((arm.get(nic) or {})["properties"]["networkSecurityGroup"]["id"]).lower() == NSG.lower()
