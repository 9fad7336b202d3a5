"""The Azure perimeter writes a NIC last, minutes after it read it in a large subscription, and ARM
replaces a NIC whole: another team's change made to the NIC meanwhile (a security team's quarantine
ASG, its tags, an NSG) must not be undone, and the run's ``perimeter.apply`` record must never list
less than was done. The scheduled reconcile (AzureReconcile) with the real azure-mgmt-network
client against the local ARM server, which honours etags as ARM does (``If-Match``: 412 when the
NIC changed), the local wiring (SQLite) as the control plane. The other team's writes land through
:meth:`ArmServer.before`: just before a request of the run is handled."""

from __future__ import annotations

import logging
from typing import Any
from urllib.parse import unquote

import pytest

from ringfence.audit import AuditRecord
from ringfence.clouds.azure.perimeter import AzurePerimeter
from ringfence.clouds.azure.reconcile import AzureReconcile
from ringfence.clouds.azure.wiring import Azure
from ringfence.local.azure_arm import ArmServer
from ringfence.local.azure_estate import RG, SUB, nic_id, seed_vm
from ringfence.local.wiring import LocalWiring
from ringfence.perimeter import PerimeterConfig, PublishedService

from .conftest import PROD_WEB

WEB = "ab000000-0000-4000-8000-00000000e101"
NET = f"/subscriptions/{SUB}/resourceGroups/{RG}/providers/Microsoft.Network"
QUARANTINE = f"{NET}/applicationSecurityGroups/secteam-quarantine"
NIC = nic_id("web-1-nic")
CONFIG = PerimeterConfig(admin_cidrs=["10.250.0.0/24"], control_plane_cidrs=["10.9.0.0/24"])


def applied(w: LocalWiring) -> list[AuditRecord]:
    return [a for a in w.store.audit_log() if a.action == "perimeter.apply"]


def asgs_on(arm: ArmServer) -> list[str]:
    nic = arm.get(NIC)
    assert nic is not None
    ipc = nic["properties"]["ipConfigurations"][0]["properties"]
    return sorted(a["id"].rsplit("/", 1)[-1] for a in ipc.get("applicationSecurityGroups") or [])


def nsg_on(arm: ArmServer) -> str | None:
    nic = arm.get(NIC)
    assert nic is not None
    nsg = (nic["properties"].get("networkSecurityGroup") or {}).get("id")
    return str(nsg).rsplit("/", 1)[-1] if nsg else None


def quarantine(arm: ArmServer) -> None:
    """The security team's write to the NIC: its quarantine ASG (its deny rules key on it) and a tag."""
    nic = arm.get(NIC)
    assert nic is not None
    ipc = nic["properties"]["ipConfigurations"][0]["properties"]
    ipc["applicationSecurityGroups"] = (ipc.get("applicationSecurityGroups") or []) + [{"id": QUARANTINE}]
    nic["tags"] = {**(nic.get("tags") or {}), "secteam": "quarantined"}
    arm.put(NIC, nic)


def nic_requests(calls: list[tuple[str, str]]) -> list[str]:
    return [m for m, path in calls if unquote(path.split("?")[0]).lower() == NIC.lower()]


@pytest.fixture
def estate(arm: ArmServer) -> None:
    seed_vm(arm, "web-1", WEB, "10.20.1.4", PROD_WEB)
    arm.put(QUARANTINE, {"location": "westeurope", "tags": {"owner": "secteam"}})


def test_attack_a_nic_change_made_during_a_perimeter_run_is_not_undone(
    arm: ArmServer, azure: Azure, wiring: LocalWiring, estate: None
) -> None:
    """The security team quarantines the NIC after the run read it, while the run creates our ASGs
    (its first write): the NIC ends with the quarantine ASG and tag and our changes, exactly those
    the run's record lists."""
    arm.before("PUT", f"{NET}/applicationSecurityGroups/rf-prod-boundary", lambda: quarantine(arm))
    before = len(applied(wiring))
    with arm.recording() as calls:
        res = AzureReconcile(wiring, azure, CONFIG).run()
    assert res.failed == {}
    assert "secteam-quarantine" in asgs_on(arm), "the quarantine ASG was removed by a write of a stale copy"
    held = arm.get(NIC)
    assert held is not None and held["tags"] == {"secteam": "quarantined"}
    [rec] = applied(wiring)[before:]
    [nic] = rec.detail["nics"]
    # what the record lists is what the NIC got on top of the security team's state, nothing else
    assert nic == {
        "nic": "web-1-nic",
        "vm": WEB,
        "asgs_added": ["rf-prod-boundary", "rf-prod-mgmt"],
        "asgs_removed": [],
        "nsg": "rf-prod-nsg",
    }
    assert asgs_on(arm) == sorted(["secteam-quarantine", *nic["asgs_added"]]) and nsg_on(arm) == nic["nsg"]
    assert nic_requests(calls)[-2:] == ["GET", "PUT"]  # read again just before the write

    # converged: the next run writes nothing, the quarantine stays
    with arm.recording() as calls:
        assert AzureReconcile(wiring, azure, CONFIG).run().perimeter_writes == 0
    assert "PUT" not in nic_requests(calls) and "secteam-quarantine" in asgs_on(arm)


def test_attack_a_nic_change_landing_between_the_perimeters_read_and_write_is_refused_by_etag_and_kept(
    arm: ArmServer, azure: Azure, wiring: LocalWiring, estate: None
) -> None:
    """The quarantine lands after the run's last read of the NIC, just before its write: ARM refuses
    the write (If-Match, 412), the NIC is read again and written with the quarantine kept."""
    arm.before("PUT", NIC, lambda: quarantine(arm))
    before = len(applied(wiring))
    with arm.recording() as calls:
        res = AzureReconcile(wiring, azure, CONFIG).run()
    assert res.failed == {} and res.warnings == 0
    assert "secteam-quarantine" in asgs_on(arm), "the quarantine ASG was removed by a write of a stale copy"
    assert asgs_on(arm) == ["rf-prod-boundary", "rf-prod-mgmt", "secteam-quarantine"]
    assert nic_requests(calls)[-4:] == ["GET", "PUT", "GET", "PUT"]  # refused once, read again, written
    assert nsg_on(arm) == "rf-prod-nsg"
    held = arm.get(NIC)
    assert held is not None and held["tags"] == {"secteam": "quarantined"}
    [rec] = applied(wiring)[before:]
    [nic] = rec.detail["nics"]
    assert (nic["asgs_added"], nic["asgs_removed"], nic["nsg"]) == (
        ["rf-prod-boundary", "rf-prod-mgmt"],
        [],
        "rf-prod-nsg",
    )


def test_a_nic_that_keeps_changing_under_the_write_is_left_for_the_next_run(
    arm: ArmServer, azure: Azure, wiring: LocalWiring, estate: None, caplog: pytest.LogCaptureFixture
) -> None:
    """Refused twice (412 each time): the NIC is left as the other team made it, the run says so (a
    warning, counted) and writes the rest; the next run writes it, audited again, keeping theirs."""
    writes: list[int] = []

    def busy() -> None:
        writes.append(1)
        nic = arm.get(NIC)
        assert nic is not None
        arm.put(NIC, {**nic, "tags": {"secteam-write": str(len(writes))}})

    arm.before("PUT", NIC, busy, times=2)
    before = len(applied(wiring))
    with caplog.at_level(logging.WARNING), arm.recording() as calls:
        res = AzureReconcile(wiring, azure, CONFIG).run()
    assert res.failed == {} and res.warnings == 1 and len(writes) == 2
    assert any("web-1-nic not written" in r.getMessage() for r in caplog.records)
    assert nic_requests(calls)[-4:] == ["GET", "PUT", "GET", "PUT"]  # both refused, no third try
    assert asgs_on(arm) == [] and nsg_on(arm) is None
    held = arm.get(NIC)
    assert held is not None and held["tags"] == {"secteam-write": "2"}
    assert arm.get(f"{NET}/networkSecurityGroups/rf-prod-nsg") is not None  # the rest was written
    assert len(applied(wiring)) == before + 1

    res = AzureReconcile(wiring, azure, CONFIG).run()
    assert res.failed == {} and res.warnings == 0
    assert asgs_on(arm) == ["rf-prod-boundary", "rf-prod-mgmt"] and nsg_on(arm) == "rf-prod-nsg"
    held = arm.get(NIC)
    assert held is not None and held["tags"] == {"secteam-write": "2"}
    [rec] = applied(wiring)[before + 1 :]
    assert [n["nic"] for n in rec.detail["nics"]] == ["web-1-nic"]


def test_a_nic_that_now_needs_more_than_the_record_lists_is_left_for_the_next_run(
    arm: ArmServer, azure: Azure, wiring: LocalWiring, estate: None
) -> None:
    """The run's record lists one ASG for the NIC (a service newly published on it); meanwhile
    someone takes its NSG off. Putting rf-prod-nsg back is not in the record: the NIC is left as it
    is, and the next run writes both, audited."""
    assert AzureReconcile(wiring, azure, CONFIG).run().failed == {}
    assert nsg_on(arm) == "rf-prod-nsg"
    published = CONFIG.model_copy(
        update={"published": [PublishedService(name="web", match={"role": "web"}, ports=["tcp/443"])]}
    )

    def detach() -> None:
        nic = arm.get(NIC)
        assert nic is not None
        props: dict[str, Any] = dict(nic["properties"])
        props.pop("networkSecurityGroup", None)
        arm.put(NIC, {**nic, "properties": props})

    arm.before("PUT", f"{NET}/applicationSecurityGroups/rf-prod-published.web", detach)
    before = len(applied(wiring))
    with arm.recording() as calls:
        res = AzureReconcile(wiring, azure, published).run()
    assert res.failed == {} and res.warnings == 1
    [rec] = applied(wiring)[before:]
    [nic] = rec.detail["nics"]
    assert (nic["asgs_added"], nic["asgs_removed"], nic.get("nsg")) == (["rf-prod-published.web"], [], None)
    assert "PUT" not in nic_requests(calls) and nsg_on(arm) is None
    assert asgs_on(arm) == ["rf-prod-boundary", "rf-prod-mgmt"]

    res = AzureReconcile(wiring, azure, published).run()
    assert res.failed == {} and res.warnings == 0
    assert asgs_on(arm) == ["rf-prod-boundary", "rf-prod-mgmt", "rf-prod-published.web"]
    assert nsg_on(arm) == "rf-prod-nsg"
    [rec] = applied(wiring)[before + 1 :]
    [nic] = rec.detail["nics"]
    assert (nic["asgs_added"], nic["nsg"]) == (["rf-prod-published.web"], "rf-prod-nsg")


def test_the_local_arm_honours_if_match_as_arm_does(arm: ArmServer, azure: Azure, estate: None) -> None:
    """What the tests above rely on, through the real client: the etag on a read, 412 for a write
    with a stale one (nothing changed), the write with the current one accepted."""
    from azure.core.exceptions import ResourceModifiedError
    from azure.mgmt.network.models import NetworkInterface

    ops = azure.arm(SUB).network.network_interfaces
    read = ops.get(RG, "web-1-nic")
    stale = str(read.etag)
    quarantine(arm)
    body = NetworkInterface({"location": "westeurope", "properties": read.as_dict()["properties"]})
    with pytest.raises(ResourceModifiedError):
        ops.begin_create_or_update(
            RG, "web-1-nic", body, headers={"If-Match": stale}, error_map={412: ResourceModifiedError}
        ).result()
    assert "secteam-quarantine" in asgs_on(arm)
    current = ops.get(RG, "web-1-nic")
    assert current.etag != stale
    ops.begin_create_or_update(RG, "web-1-nic", body, headers={"If-Match": str(current.etag)}).result()
    assert "secteam-quarantine" not in asgs_on(arm)  # an unconditional overwrite by whoever holds the etag
    code, _, _ = arm.handle("PUT", f"{NIC}?api-version=1", {"location": "x"}, {"If-None-Match": "*"})
    assert code == 412
    code, _, _ = arm.handle("PUT", f"{NET}/networkInterfaces/new?api-version=1", {"location": "x"}, {"If-Match": "*"})
    assert code == 412


def test_an_asg_a_nic_left_for_the_next_run_still_holds_is_not_deleted(
    arm: ArmServer, azure: Azure, estate: None
) -> None:
    """The VM leaves its env: the full run takes our ASGs off its NIC, then deletes them (ARM refuses
    to delete an ASG a NIC holds). The NIC write refused twice, the ASGs are kept for the next run,
    which takes them off and deletes them."""
    perimeter = AzurePerimeter(azure.arm(SUB), CONFIG)
    perimeter.reconcile({WEB: {"app": "ordering", "role": "web", "env": "prod"}})
    assert asgs_on(arm) == ["rf-prod-boundary", "rf-prod-mgmt"]

    def busy() -> None:
        nic = arm.get(NIC)
        assert nic is not None
        arm.put(NIC, {**nic, "tags": {"secteam": "busy"}})

    arm.before("PUT", NIC, busy, times=2)
    res = perimeter.reconcile({WEB: {"app": "ordering", "role": "web"}})
    assert res.skipped == [NIC] and asgs_on(arm) == ["rf-prod-boundary", "rf-prod-mgmt"]
    assert not [w for w in res.writes if w.startswith("DELETE asg")]
    assert arm.get(f"{NET}/applicationSecurityGroups/rf-prod-boundary") is not None
    assert any("rf-prod-boundary" in w and "not deleted" in w for w in res.warnings)

    res = perimeter.reconcile({WEB: {"app": "ordering", "role": "web"}})
    assert res.skipped == [] and asgs_on(arm) == [] and nsg_on(arm) == "rf-none"
    assert arm.get(f"{NET}/applicationSecurityGroups/rf-prod-boundary") is None
    held = arm.get(NIC)
    assert held is not None and held["tags"] == {"secteam": "busy"}
