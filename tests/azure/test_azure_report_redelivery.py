"""A governance report that fails part-way is made again by the event's redelivery, on Azure too
(as on AWS and GCP since e619bf8), through the real route (``POST /azure/events``) over the local
ARM server and the local store.

The store refuses one audit write once (a transient failure: "database is locked" here, a throttle
on DynamoDB), after the record was stored; the delivery fails and Event Grid delivers the same
event again. An ARM event does not say what its call set, so Azure names a caller for a held move
once, recording the move as the caller's write: the redelivery finds that write stored by its own
event (``LabelWrite.event``) and decides the same again, and the records' derived ids make each
one written once."""

from __future__ import annotations

import json
import logging
import sqlite3
from typing import Any

import pytest

from ringfence.clouds.azure.events import WRITE
from ringfence.clouds.azure.ingest import AzureEvents
from ringfence.clouds.azure.wiring import Azure
from ringfence.local.azure_arm import ArmServer
from ringfence.local.azure_estate import seed_vm, vm_id
from ringfence.local.eventgrid import arm_event
from ringfence.local.wiring import LocalWiring

from .conftest import PROD_WEB
from .test_attack_azure_blame import (
    MALLORY,
    TAGS_WRITE,
    VM_WRITE,
    WEB,
    findings,
    quarantines,
    quarantining,
    route_answer,
)
from .test_attack_azure_label_writes import CALLER, _granted_jumpbox, _held_by

__all__ = ["quarantining"]  # the fixture, used by name


def deliver(w: LocalWiring, azure: Azure, *events: dict[str, Any]) -> int:
    """One delivery through the real route: its status (an exception fails the function)."""
    return int(route_answer(w, azure, *events)["statusCode"])


def refuse_once(w: LocalWiring, monkeypatch: pytest.MonkeyPatch, action: str) -> list[str]:
    """The first write of an audit record of ``action`` (alone or with its change) refused once."""
    hit: list[str] = []
    for name in ("audit", "audit_with"):
        real = getattr(w.store, name)

        def flaky(rec: Any, *a: Any, _real: Any = real, **k: Any) -> Any:
            if rec.action == action and not hit:
                hit.append(rec.action)
                raise sqlite3.OperationalError("database is locked")
            return _real(rec, *a, **k)

        monkeypatch.setattr(w.store, name, flaky)
    return hit


def records(w: LocalWiring, action: str, target: str) -> int:
    return len([a for a in w.store.audit_log() if a.action == action and a.target == target])


def _mallory_moves_web_to_jumpbox(arm: ArmServer, azure: Azure, w: LocalWiring, name: str) -> dict[str, Any]:
    """Her Tags API write of role=jumpbox, as ARM shows it; its event (not delivered yet)."""
    seed_vm(arm, name, WEB, "10.20.1.40", PROD_WEB)
    assert deliver(w, azure, arm_event(WRITE, vm_id(name), VM_WRITE)) == 200
    arm.get(vm_id(name))["tags"]["ringfence:role"] = "jumpbox"  # type: ignore[index]
    return arm_event(WRITE, vm_id(name), TAGS_WRITE, oid=MALLORY)


def test_a_findings_quarantine_is_never_in_force_without_its_record_and_each_is_written_once(
    arm: ArmServer,
    azure: Azure,
    quarantining: LocalWiring,
    monkeypatch: pytest.MonkeyPatch,
    caplog: pytest.LogCaptureFixture,
) -> None:
    """The ``workload.quarantine`` record's write refused once (after ``label.held`` was written):
    no quarantine in force without it; the redelivery, which had found Mallory's move stored as
    her write and named nobody, names her again, quarantines with the record and writes each
    record once; the SIEM finding is logged. A further delivery of the event adds nothing."""
    w = quarantining
    ev = _mallory_moves_web_to_jumpbox(arm, azure, w, "web-rq")
    refused = refuse_once(w, monkeypatch, "workload.quarantine")
    with pytest.raises(sqlite3.OperationalError):
        deliver(w, azure, ev)
    assert refused
    rec = w.store.get(WEB)
    assert rec is not None and rec.workload.held_labels is not None and rec.labels["role"] == "web"
    assert records(w, "label.held", WEB) == 1
    assert not rec.op_quarantined, "a quarantine in force without its audit record"
    with caplog.at_level(logging.WARNING, logger="ringfence.findings"):
        assert deliver(w, azure, ev) == 200  # Event Grid's redelivery
    rec = w.store.get(WEB)
    assert rec is not None and rec.op_quarantined, "the quarantine was never made"
    assert findings(w) == [MALLORY], "the finding recorded twice, or lost"
    assert quarantines(w) == 1 and records(w, "workload.quarantine", WEB) == 1
    siem = [json.loads(r.getMessage()) for r in caplog.records if r.name == "ringfence.findings"]
    assert [(f["workload_id"], f["action"], f["principal"].rsplit("/", 1)[-1]) for f in siem] == [
        (WEB, "quarantined", MALLORY)
    ]
    assert deliver(w, azure, ev) == 200  # at least once: delivered yet again
    assert findings(w) == [MALLORY] and quarantines(w) == 1


def test_a_finding_whose_record_write_fails_is_reported_and_quarantined_on_redelivery(
    arm: ArmServer, azure: Azure, quarantining: LocalWiring, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The finding's ``label.held`` write refused once: nothing is recorded and no quarantine is
    in force after the first delivery; the redelivery names Mallory and quarantines, once."""
    w = quarantining
    ev = _mallory_moves_web_to_jumpbox(arm, azure, w, "web-rh")
    refused = refuse_once(w, monkeypatch, "label.held")
    with pytest.raises(sqlite3.OperationalError):
        deliver(w, azure, ev)
    assert refused and findings(w) == [] and quarantines(w) == 0
    assert deliver(w, azure, ev) == 200
    rec = w.store.get(WEB)
    assert rec is not None and rec.workload.held_labels is not None and rec.op_quarantined
    assert findings(w) == [MALLORY], "the finding was never recorded"
    assert quarantines(w) == 1


@pytest.mark.parametrize("action", ["label.grant.ended", "label.held"])
def test_a_grant_end_whose_report_fails_is_reported_on_redelivery(
    arm: ArmServer, azure: Azure, wiring: LocalWiring, monkeypatch: pytest.MonkeyPatch, action: str
) -> None:
    """A write of a granted VM ends the grant (``label.grant.ended``) and names its caller for the
    value held again (``label.held``). Either record's write refused once: the redelivery finds
    the end stored by its own event, reports it again, and each record is written once."""
    guid = "6a000000-0000-4000-8000-0000000fe30" + ("1" if action == "label.held" else "2")
    name = "ge-" + guid[-1]
    _granted_jumpbox(arm, AzureEvents(wiring, azure), wiring, name, guid, "10.20.1.8" + guid[-1])
    named = _held_by(wiring, guid)
    refused = refuse_once(wiring, monkeypatch, action)
    arm.get(vm_id(name))["tags"]["owner"] = "team-b"  # type: ignore[index]
    ev = arm_event(WRITE, vm_id(name), VM_WRITE)
    with pytest.raises(sqlite3.OperationalError):
        deliver(wiring, azure, ev)
    assert refused
    rec = wiring.store.get(guid)
    assert rec is not None and not rec.workload.label_grants and rec.labels.get("role") != "jumpbox"
    assert deliver(wiring, azure, ev) == 200  # Event Grid's redelivery
    assert records(wiring, "label.grant.ended", guid) == 1, "the grant's end in force with no record (or two)"
    assert _held_by(wiring, guid) == [*named, CALLER], "the caller never named (or named twice)"
    assert deliver(wiring, azure, ev) == 200
    assert records(wiring, "label.grant.ended", guid) == 1 and _held_by(wiring, guid) == [*named, CALLER]
