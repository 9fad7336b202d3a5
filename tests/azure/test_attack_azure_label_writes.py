"""Azure and the label-provenance attacks fixed for AWS in 71479a5 (a late tagger approval, a
revocation and re-escalation between two reads, a reconcile deciding from a stale read), against
the local ARM stand-in through the real Event Grid ingest and the real reconcile.

An Event Grid event names its caller but not the tags the call set, so no Azure event approves a
privileged value (a late one cannot either); a privileged value is in force on Azure only through
an admin grant (``bind_labels``), which holds for the tags as they stood when it was made: a later
write of the VM ends it."""

from __future__ import annotations

import json
from collections.abc import Iterator
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import pytest

from ringfence.clouds.azure import inventory
from ringfence.clouds.azure.events import WRITE
from ringfence.clouds.azure.ingest import SECRET_HEADER, AzureEvents
from ringfence.clouds.azure.reconcile import AzureReconcile
from ringfence.clouds.azure.wiring import Azure, attach
from ringfence.clouds.onprem import OnPremAdmin
from ringfence.control.governance import bind_labels
from ringfence.control.wiring import Config
from ringfence.local.azure_arm import ArmServer
from ringfence.local.azure_estate import nic_id, seed_vm, vm_id
from ringfence.local.eventgrid import OID, TENANT, arm_event
from ringfence.local.wiring import LocalWiring
from tests.onprem.conftest import policy_files, signing_key_file

from .conftest import PROD_WEB, SECRET

HEADERS = {SECRET_HEADER: SECRET, "aeg-event-type": "Notification"}
TAGS_WRITE = "Microsoft.Resources/tags/write"
CALLER = f"azure:{TENANT}/{OID}"  # the caller the local events name


@pytest.fixture
def tagging(tmp_path: Path, azure: Azure) -> Iterator[LocalWiring]:
    """The local control plane whose policy lists the events' caller among the allowed taggers."""
    files = policy_files()
    files["labels.yaml"] = files["labels.yaml"].replace(
        'taggers: ["arn:aws:iam::123456789012:role/ringfence-tagging"]',
        f'taggers: ["arn:aws:iam::123456789012:role/ringfence-tagging", "{CALLER}"]',
    )
    assert CALLER in files["labels.yaml"]
    w = LocalWiring(tmp_path / "state" / "state.db", signing_key=signing_key_file(tmp_path), cfg=Config())
    attach(w, azure)
    r = OnPremAdmin(w).provision("alice", files, "initial")
    assert r.status == 201, r.body
    yield w
    w.close()


def deliver(events: AzureEvents, *items: dict[str, Any]) -> None:
    r = events.handle(HEADERS, json.dumps(list(items)).encode())
    assert r.status == 200, r.body


def _role(arm: ArmServer, name: str, value: str) -> None:
    arm.get(vm_id(name))["tags"]["ringfence:role"] = value  # type: ignore[index]


def _granted_jumpbox(arm: ArmServer, events: AzureEvents, w: LocalWiring, name: str, guid: str, ip: str) -> None:
    seed_vm(arm, name, guid, ip, PROD_WEB)
    deliver(events, arm_event(WRITE, vm_id(name), "Microsoft.Compute/virtualMachines/write"))
    _role(arm, name, "jumpbox")
    deliver(events, arm_event(WRITE, vm_id(name), TAGS_WRITE))
    bind_labels(w, guid, {"role": "jumpbox"}, "alice", "INC-42 temporary bastion")
    rec = w.store.get(guid)
    assert rec is not None and rec.labels["role"] == "jumpbox"


def test_attack_azure_a_taggers_event_approves_nothing_so_a_late_one_cannot(
    arm: ArmServer, azure: Azure, tagging: LocalWiring
) -> None:
    """Even an allowed tagger's event (delivered on time, or late after a revocation and a
    re-escalation) approves no privileged value: the event does not say which tags the call set.
    The move stays held, and nothing is approved."""
    guid = "6a000000-0000-4000-8000-00000000c001"
    events = AzureEvents(tagging, azure)
    seed_vm(arm, "tag-1", guid, "10.20.1.21", PROD_WEB)
    deliver(events, arm_event(WRITE, vm_id("tag-1"), "Microsoft.Compute/virtualMachines/write"))
    _role(arm, "tag-1", "jumpbox")
    deliver(events, arm_event(WRITE, vm_id("tag-1"), TAGS_WRITE))
    rec = tagging.store.get(guid)
    assert rec is not None and rec.labels["role"] == "web" and rec.workload.held_labels is not None
    assert not [a for a in tagging.store.audit_log() if a.action == "label.approve"]


@pytest.mark.parametrize("landed", ["revocation", "grant"])
def test_attack_azure_reconcile_decides_from_the_record_as_stored_when_it_writes(
    arm: ArmServer, azure: Azure, wiring: LocalWiring, monkeypatch: pytest.MonkeyPatch, landed: str
) -> None:
    """A reconcile pass lists the subscription; before it writes, an event stores a revocation of
    a granted jumpbox (``revocation``), or an admin grants jumpbox (``grant``). Its listing, stale
    by then, neither puts the revoked value back in force nor undoes the grant."""
    guid = "6a000000-0000-4000-8000-00000000c002"
    events = AzureEvents(wiring, azure)
    if landed == "revocation":
        _granted_jumpbox(arm, events, wiring, "rec-1", guid, "10.20.1.22")
    else:
        seed_vm(arm, "rec-1", guid, "10.20.1.22", {**PROD_WEB, "ringfence:role": "jumpbox"})
        deliver(events, arm_event(WRITE, vm_id("rec-1"), "Microsoft.Compute/virtualMachines/write"))
        rec = wiring.store.get(guid)
        assert rec is not None and rec.labels.get("role") != "jumpbox" and rec.workload.held_labels is not None
    real = inventory.nics_by_id
    fired: list[bool] = []

    def meanwhile(raw: Any) -> Any:
        if not fired:  # after the pass listed the VMs, before it decides
            fired.append(True)
            if landed == "revocation":
                _role(arm, "rec-1", "web")
                deliver(events, arm_event(WRITE, vm_id("rec-1"), TAGS_WRITE))
                rec = wiring.store.get(guid)
                assert rec is not None and rec.labels["role"] == "web" and not rec.workload.label_grants
            else:
                bind_labels(wiring, guid, {"role": "jumpbox"}, "alice", "INC-43")
        return real(raw)

    monkeypatch.setattr(inventory, "nics_by_id", meanwhile)
    AzureReconcile(wiring, azure).run()
    assert fired
    rec = wiring.store.get(guid)
    assert rec is not None
    if landed == "revocation":
        assert rec.labels.get("role") != "jumpbox" and not rec.workload.label_grants
    else:
        assert rec.labels["role"] == "jumpbox" and rec.workload.label_grants == {"role": "jumpbox"}


def _held_by(w: LocalWiring, guid: str) -> list[str]:
    """The callers named for held moves of the workload (its ``label.held`` audit records)."""
    return [a.principal for a in w.store.audit_log() if a.action == "label.held" and a.target == guid]


def _grant_ended(w: LocalWiring, guid: str) -> None:
    rec = w.store.get(guid)
    assert rec is not None
    assert not rec.workload.label_grants and rec.labels.get("role") != "jumpbox"
    assert rec.workload.held_labels is not None and "role" not in rec.workload.held_labels


def test_attack_azure_a_grant_does_not_outlive_a_revocation_and_reescalation_between_two_reads(
    arm: ArmServer, azure: Azure, wiring: LocalWiring
) -> None:
    """Jumpbox granted; the developer moves the VM to web and back to jumpbox before either event
    is read, so every ARM read shows jumpbox. On AWS the revoking call (its request says role=web)
    ends the grant; here neither event says what its call set, but both were made after the grant:
    the grant ends, jumpbox is held again and the developer is named for it, once (the second
    event names nobody)."""
    guid = "6a000000-0000-4000-8000-00000000c003"
    events = AzureEvents(wiring, azure)
    _granted_jumpbox(arm, events, wiring, "gr-1", guid, "10.20.1.23")
    named = _held_by(wiring, guid)  # the move the grant was made for
    _role(arm, "gr-1", "web")
    _role(arm, "gr-1", "jumpbox")
    deliver(events, arm_event(WRITE, vm_id("gr-1"), TAGS_WRITE), arm_event(WRITE, vm_id("gr-1"), TAGS_WRITE))
    _grant_ended(wiring, guid)
    assert _held_by(wiring, guid) == [*named, CALLER]


@pytest.mark.parametrize(
    "operation", [TAGS_WRITE, "Microsoft.Compute/virtualMachines/write"], ids=["unrelated-tag", "vm-write"]
)
def test_any_write_of_the_vm_after_the_grant_ends_it(
    arm: ArmServer, azure: Azure, wiring: LocalWiring, operation: str
) -> None:
    """The cost of failing closed: a write of the granted VM that changes no governed tag (an
    unrelated tag through the Tags API, a VM PUT) cannot be told from a revocation and a
    re-escalation, so it ends the grant too, naming its caller; the administrator grants anew (the
    grant then holds for the tags as they stand). A NIC's write cannot set the VM's tags: it ends
    nothing."""
    guid = "6a000000-0000-4000-8000-00000000c004"
    events = AzureEvents(wiring, azure)
    _granted_jumpbox(arm, events, wiring, "gr-2", guid, "10.20.1.24")
    named = _held_by(wiring, guid)
    deliver(events, arm_event(WRITE, nic_id("gr-2-nic"), "Microsoft.Network/networkInterfaces/write"))
    rec = wiring.store.get(guid)
    assert rec is not None and rec.labels["role"] == "jumpbox" and rec.workload.label_grants == {"role": "jumpbox"}
    arm.get(vm_id("gr-2"))["tags"]["owner"] = "team-b"  # type: ignore[index]
    deliver(events, arm_event(WRITE, vm_id("gr-2"), operation))
    _grant_ended(wiring, guid)
    assert _held_by(wiring, guid) == [*named, CALLER]
    bind_labels(wiring, guid, {"role": "jumpbox"}, "alice", "INC-42 granted again after the tag write")
    rec = wiring.store.get(guid)
    assert rec is not None and rec.labels["role"] == "jumpbox" and rec.workload.held_labels is None


@pytest.mark.parametrize(("before", "ends"), [(60.0, False), (2.0, True)], ids=["late", "within-skew"])
def test_a_write_made_before_the_grant_and_delivered_late_ends_it_only_within_the_clock_skew(
    arm: ArmServer, azure: Azure, wiring: LocalWiring, before: float, ends: bool
) -> None:
    """A write of the VM made before the grant, its event delivered after it (a slow or repeated
    delivery), changes nothing about the grant: the grant was made on the tags that write left.
    Within :data:`~ringfence.governance.SKEW` seconds of the grant (``eventTime`` is Azure's clock,
    the grant's time ours) it is taken for a later write and ends the grant: fail closed."""
    guid = "6a000000-0000-4000-8000-00000000c005"
    events = AzureEvents(wiring, azure)
    _granted_jumpbox(arm, events, wiring, "gr-3", guid, "10.20.1.25")
    named = _held_by(wiring, guid)
    rec = wiring.store.get(guid)
    assert rec is not None and rec.label_writes is not None
    granted_at = rec.label_writes["role"].at
    late = arm_event(WRITE, vm_id("gr-3"), TAGS_WRITE)
    late["eventTime"] = datetime.fromtimestamp(granted_at - before, UTC).isoformat().replace("+00:00", "Z")
    deliver(events, late)
    if ends:
        _grant_ended(wiring, guid)
        assert _held_by(wiring, guid) == [*named, CALLER]
    else:
        rec = wiring.store.get(guid)
        assert rec is not None and rec.labels["role"] == "jumpbox" and rec.workload.label_grants == {"role": "jumpbox"}
        assert rec.workload.held_labels is None and _held_by(wiring, guid) == named
