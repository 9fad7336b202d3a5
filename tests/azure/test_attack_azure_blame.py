"""Who an Azure event names for a held move, through the real route (``POST /azure/events``,
``azure_event_routes``) over the local ARM server. An ARM event names its caller but not what the
call set, so a non-tagger's caller is named (a ``label.held`` finding, quarantine where the policy
says so) only for a write of the VM that may have made a move nobody has been named for: each move
once. An operator's release stands against later unrelated writes and redeliveries; a NIC's
caller is never named for the VM's tags."""

from __future__ import annotations

import json
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from ringfence.clouds.azure.events import WRITE
from ringfence.clouds.azure.ingest import SECRET_HEADER, AzureEvents
from ringfence.clouds.azure.reconcile import AzureReconcile
from ringfence.clouds.azure.wiring import Azure
from ringfence.clouds.onprem import OnPremAdmin
from ringfence.control.wiring import Config
from ringfence.local.azure_arm import ArmServer
from ringfence.local.azure_estate import nic_id, seed_vm, vm_id
from ringfence.local.eventgrid import arm_event
from ringfence.local.wiring import LocalWiring
from ringfence.routes.azure import EVENTS_PATH, azure_event_routes
from ringfence.serve import proxy_event
from tests.onprem.conftest import policy_files, signing_key_file

from .conftest import PROD_WEB, SECRET

WEB = "6a000000-0000-4000-8000-00000000e101"
MALLORY = "00000000-0000-4000-8000-00000000a11e"
BOB = "00000000-0000-4000-8000-000000000b0b"
CAROL = "00000000-0000-4000-8000-0000000ca201"
VM_WRITE = "Microsoft.Compute/virtualMachines/write"
TAGS_WRITE = "Microsoft.Resources/tags/write"


@pytest.fixture
def quarantining(tmp_path: Path) -> Iterator[LocalWiring]:
    """The example policy with ``on_privileged_change: quarantine``."""
    files = policy_files()
    files["labels.yaml"] = files["labels.yaml"].replace(
        "on_privileged_change: hold", "on_privileged_change: quarantine"
    )
    assert "on_privileged_change: quarantine" in files["labels.yaml"]
    w = LocalWiring(tmp_path / "state" / "state.db", signing_key=signing_key_file(tmp_path), cfg=Config())
    assert OnPremAdmin(w).provision("alice", files, "quarantine on findings").status == 201
    yield w
    w.close()


def route_answer(w: LocalWiring, azure: Azure, *events: dict[str, Any]) -> dict[str, Any]:
    """One delivery through the real route, as API Gateway hands it to the azureevents function
    (an exception fails the function: Event Grid delivers again); the route's answer."""
    event = proxy_event(
        "POST",
        EVENTS_PATH,
        [(SECRET_HEADER, SECRET), ("aeg-event-type", "Notification")],
        [],
        json.dumps(list(events)).encode(),
        "127.0.0.1",
    )
    out: dict[str, Any] = azure_event_routes(lambda: AzureEvents(w, azure)).resolve(event, None)
    return out


def post(w: LocalWiring, azure: Azure, *events: dict[str, Any]) -> dict[str, Any]:
    """One delivery through the real route; its answer's body (a 200 asserted)."""
    out = route_answer(w, azure, *events)
    assert out["statusCode"] == 200, out
    body: dict[str, Any] = json.loads(out["body"])
    return body


def findings(w: LocalWiring) -> list[str]:
    """The principals named by label.held findings, in order."""
    return [a.principal.rsplit("/", 1)[-1] for a in w.store.audit_log() if a.action == "label.held"]


def quarantines(w: LocalWiring) -> int:
    return len([a for a in w.store.audit_log() if a.action == "workload.quarantine" and a.detail.get("quarantined")])


def _mallory_moves_to_jumpbox(arm: ArmServer, azure: Azure, w: LocalWiring, name: str) -> dict[str, Any]:
    seed_vm(arm, name, WEB, "10.20.1.40", PROD_WEB)
    post(w, azure, arm_event(WRITE, vm_id(name), VM_WRITE))
    arm.get(vm_id(name))["tags"]["ringfence:role"] = "jumpbox"  # type: ignore[index]
    ev = arm_event(WRITE, vm_id(name), TAGS_WRITE, oid=MALLORY)
    post(w, azure, ev)
    rec = w.store.get(WEB)
    assert rec is not None and rec.workload.held_labels is not None and rec.labels["role"] == "web"
    assert rec.op_quarantined and findings(w) == [MALLORY] and quarantines(w) == 1
    return ev


def test_attack_azure_unrelated_write_after_a_release_names_nobody_and_does_not_requarantine(
    arm: ArmServer, azure: Azure, quarantining: LocalWiring
) -> None:
    """Mallory's move into role=jumpbox is held, named and quarantined; an operator releases the
    VM (the move stays held). Then Bob resizes it (a VM write leaving its tags as stored), Bob
    writes an unrelated tag through the Tags API, Event Grid redelivers both and Mallory's own
    event: nobody more is named, the VM stays released. Mallory moving it again after the tag was
    taken off is a new move: named and quarantined again."""
    w = quarantining
    mallory = _mallory_moves_to_jumpbox(arm, azure, w, "web-1")
    assert OnPremAdmin(w).quarantine("operator", WEB, False, "held until a binding; release").status == 200
    vm: dict[str, Any] = arm.get(vm_id("web-1"))  # type: ignore[assignment]
    vm.setdefault("properties", {})["hardwareProfile"] = {"vmSize": "Standard_D4s_v5"}
    resize = arm_event(WRITE, vm_id("web-1"), VM_WRITE, oid=BOB)
    post(w, azure, resize)
    vm["tags"]["owner"] = "bob"
    tag = arm_event(WRITE, vm_id("web-1"), TAGS_WRITE, oid=BOB)
    post(w, azure, tag)
    post(w, azure, resize, tag, mallory)  # Event Grid delivers at least once
    rec = w.store.get(WEB)
    assert rec is not None and not rec.op_quarantined and rec.workload.held_labels is not None
    assert findings(w) == [MALLORY] and quarantines(w) == 1
    # the tag taken off (by anyone) and put back by Mallory: a new move, named once more
    vm["tags"]["ringfence:role"] = "web"
    post(w, azure, arm_event(WRITE, vm_id("web-1"), TAGS_WRITE, oid=BOB))
    vm["tags"]["ringfence:role"] = "jumpbox"
    post(w, azure, arm_event(WRITE, vm_id("web-1"), TAGS_WRITE, oid=MALLORY))
    rec = w.store.get(WEB)
    assert rec is not None and rec.op_quarantined and rec.labels["role"] == "web"
    assert findings(w) == [MALLORY, MALLORY] and quarantines(w) == 2


def test_attack_azure_nic_write_names_nobody_for_the_vms_tags(
    arm: ArmServer, azure: Azure, quarantining: LocalWiring
) -> None:
    """Carol (network team) writes the VM's NIC while Mallory's move is held and released: a NIC
    write cannot have set the VM's tags, so Carol is never named and the VM is not quarantined."""
    w = quarantining
    _mallory_moves_to_jumpbox(arm, azure, w, "web-2")
    assert OnPremAdmin(w).quarantine("operator", WEB, False, "held until a binding; release").status == 200
    post(w, azure, arm_event(WRITE, nic_id("web-2-nic"), "Microsoft.Network/networkInterfaces/write", oid=CAROL))
    rec = w.store.get(WEB)
    assert rec is not None and not rec.op_quarantined and rec.workload.held_labels is not None
    assert findings(w) == [MALLORY] and quarantines(w) == 1


NIC_WRITE = "Microsoft.Network/networkInterfaces/write"


def _web_vm(arm: ArmServer, azure: Azure, w: LocalWiring, name: str) -> None:
    seed_vm(arm, name, WEB, "10.20.1.41", PROD_WEB)
    post(w, azure, arm_event(WRITE, vm_id(name), VM_WRITE))
    rec = w.store.get(WEB)
    assert rec is not None and rec.labels["role"] == "web" and findings(w) == []


def _named_and_quarantined_once(w: LocalWiring) -> None:
    rec = w.store.get(WEB)
    assert rec is not None and rec.workload.held_labels is not None and rec.labels["role"] == "web"
    assert rec.op_quarantined and findings(w) == [MALLORY] and quarantines(w) == 1


def test_attack_azure_nic_write_first_in_the_delivery_does_not_hide_the_vm_write(
    arm: ArmServer, azure: Azure, quarantining: LocalWiring
) -> None:
    """Mallory writes the VM's NIC, then PUTs the VM with role=jumpbox; Event Grid delivers both in
    one delivery, the NIC's first. The NIC event reads the VM (already jumpbox) and stores the move
    held with nobody named; her VM write, made before that sighting, is still named and the VM
    quarantined, once (a redelivery of both changes nothing)."""
    w = quarantining
    _web_vm(arm, azure, w, "web-3")
    nic = arm_event(WRITE, nic_id("web-3-nic"), NIC_WRITE, oid=MALLORY)
    arm.get(vm_id("web-3"))["tags"]["ringfence:role"] = "jumpbox"  # type: ignore[index]
    put = arm_event(WRITE, vm_id("web-3"), VM_WRITE, oid=MALLORY)
    post(w, azure, nic, put)
    _named_and_quarantined_once(w)
    assert OnPremAdmin(w).quarantine("operator", WEB, False, "held until a binding; release").status == 200
    post(w, azure, nic, put)
    rec = w.store.get(WEB)
    assert rec is not None and not rec.op_quarantined and findings(w) == [MALLORY] and quarantines(w) == 1


def test_attack_azure_reconcile_before_her_event_does_not_hide_the_vm_write(
    arm: ArmServer, azure: Azure, quarantining: LocalWiring
) -> None:
    """Mallory PUTs the VM with role=jumpbox and the scheduled reconcile stores the move (held,
    nobody named) before Event Grid's delivery of her write is processed (a delivery retried after
    a 503). Her VM write, made before the reconcile saw the move, is named and the VM quarantined.
    A write by Bob made after that sighting (a resize, an unrelated Tags API write) names nobody."""
    w = quarantining
    _web_vm(arm, azure, w, "web-4")
    arm.get(vm_id("web-4"))["tags"]["ringfence:role"] = "jumpbox"  # type: ignore[index]
    put = arm_event(WRITE, vm_id("web-4"), VM_WRITE, oid=MALLORY)
    AzureReconcile(w, azure).run()
    rec = w.store.get(WEB)
    assert rec is not None and rec.workload.held_labels is not None and findings(w) == []
    # Bob's writes a minute after the reconcile saw the move (Mallory's event not processed yet)
    later = time.strftime("%Y-%m-%dT%H:%M:%S.0000000Z", time.gmtime(time.time() + 60))
    resize = arm_event(WRITE, vm_id("web-4"), VM_WRITE, oid=BOB) | {"eventTime": later}
    post(w, azure, resize)
    arm.get(vm_id("web-4"))["tags"]["owner"] = "bob"  # type: ignore[index]
    tag = arm_event(WRITE, vm_id("web-4"), TAGS_WRITE, oid=BOB) | {"eventTime": later}
    post(w, azure, tag)
    assert findings(w) == [] and quarantines(w) == 0
    post(w, azure, put)
    _named_and_quarantined_once(w)
    post(w, azure, put, resize, tag)  # redelivered
    _named_and_quarantined_once(w)
