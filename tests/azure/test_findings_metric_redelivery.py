"""``PrivilegedLabelFindings`` counts a finding once, with its ``label.held`` record, however often
Event Grid delivers its event: through the Event Grid handler, the local ARM server and the local
store. Before, every delivery that decided the finding again counted it, though the record (its
id derived from the event) was written by the first only."""

from __future__ import annotations

import json
import sqlite3
from typing import Any

import pytest

from ringfence.clouds.azure.ingest import AzureEvents
from ringfence.clouds.azure.wiring import Azure
from ringfence.local.azure_arm import ArmServer
from ringfence.local.wiring import LocalWiring
from tests.azure.test_attack_azure_blame import MALLORY, findings, quarantines, quarantining
from tests.azure.test_azure_events import HEADERS
from tests.azure.test_azure_report_redelivery import _mallory_moves_web_to_jumpbox, refuse_once

__all__ = ["quarantining"]  # the fixture, used by name


def test_a_findings_metric_is_counted_once_however_often_its_event_is_delivered(
    arm: ArmServer, azure: Azure, quarantining: LocalWiring, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Mallory's move: the first delivery writes the finding's record and fails at its quarantine
    (refused once); the redelivery completes the report; a third delivery (a duplicate) finds
    both written. One finding recorded, one counted."""
    w = quarantining
    counted: list[tuple[str, float]] = []
    events = AzureEvents(w, azure, metric=lambda name, value: counted.append((name, value)))
    ev = _mallory_moves_web_to_jumpbox(arm, azure, w, "web-fm")
    body = json.dumps([ev]).encode()

    def findings_counted() -> float:
        return sum(v for n, v in counted if n == "PrivilegedLabelFindings")

    refused = refuse_once(w, monkeypatch, "workload.quarantine")
    with pytest.raises(sqlite3.OperationalError):
        events.handle(HEADERS, body)
    assert refused and findings(w) == [MALLORY] and quarantines(w) == 0
    assert findings_counted() == 1, "the finding's record was written: counted"
    for _ in range(2):  # Event Grid's redelivery, then a duplicate
        answer: Any = events.handle(HEADERS, body)
        assert answer.status == 200
    assert findings(w) == [MALLORY] and quarantines(w) == 1
    assert findings_counted() == 1, "one finding counted on each delivery of its event"


def test_a_finding_whose_record_landed_unanswered_is_counted_by_the_redelivery(
    arm: ArmServer, azure: Azure, quarantining: LocalWiring, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The finding's ``label.held`` record commits but its write raises (the answer lost: on
    DynamoDB, a read-back that fails too): that delivery counts nothing. Its redelivery finds the
    record written by another; counted only by the delivery that wrote it, the finding was
    recorded and never counted. It counts it now, once (a duplicate after it does not)."""
    w = quarantining
    counted: list[tuple[str, float]] = []
    events = AzureEvents(w, azure, metric=lambda name, value: counted.append((name, value)))
    ev = _mallory_moves_web_to_jumpbox(arm, azure, w, "web-fl")
    body = json.dumps([ev]).encode()
    real = w.store.audit
    lost: list[str] = []

    def landed_unanswered(rec: Any) -> Any:
        out = real(rec)  # committed
        if rec.action == "label.held" and not lost:
            lost.append(rec.id)
            raise sqlite3.OperationalError("the answer was lost")
        return out

    monkeypatch.setattr(w.store, "audit", landed_unanswered)
    with pytest.raises(sqlite3.OperationalError):
        events.handle(HEADERS, body)
    assert lost and findings(w) == [MALLORY]
    assert not [n for n, _ in counted if n == "PrivilegedLabelFindings"]
    for _ in range(2):  # Event Grid's redelivery, then a duplicate
        answer: Any = events.handle(HEADERS, body)
        assert answer.status == 200
    assert findings(w) == [MALLORY] and quarantines(w) == 1
    assert sum(v for n, v in counted if n == "PrivilegedLabelFindings") == 1, "a finding recorded but never counted"


def test_a_counted_claim_that_cannot_be_written_blocks_neither_the_quarantine_nor_the_finding(
    arm: ArmServer, azure: Azure, quarantining: LocalWiring, monkeypatch: pytest.MonkeyPatch, caplog: Any
) -> None:
    """The finding's counted claim refused on every delivery (on AWS, a role without the grant:
    AccessDenied). Raised, it failed the delivery after the finding's record and before its
    quarantine and its SIEM line, and every redelivery the same. A metric's claim blocks
    neither: quarantined, logged, and counted once (by the delivery that wrote the record)."""
    import logging

    w = quarantining
    counted: list[tuple[str, float]] = []
    events = AzureEvents(w, azure, metric=lambda name, value: counted.append((name, value)))
    ev = _mallory_moves_web_to_jumpbox(arm, azure, w, "web-fc")
    body = json.dumps([ev]).encode()
    real = w.store.claim_once
    refused: list[str] = []

    def claim_once(key: str, ttl: int) -> bool:
        if key.startswith("counted#"):
            refused.append(key)
            raise sqlite3.OperationalError("not authorized")
        return real(key, ttl)

    monkeypatch.setattr(w.store, "claim_once", claim_once)
    caplog.set_level(logging.INFO, logger="ringfence.findings")
    for _ in range(2):  # the delivery, then a duplicate
        answer: Any = events.handle(HEADERS, body)
        assert answer.status == 200
    assert refused, "the scenario made no counted claim"
    assert findings(w) == [MALLORY] and quarantines(w) == 1
    assert [r for r in caplog.records if r.name == "ringfence.findings"], "the finding was never logged"
    assert sum(v for n, v in counted if n == "PrivilegedLabelFindings") == 1
