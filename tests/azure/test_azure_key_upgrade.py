"""Azure: events stored before b0245af keep their bare ``id`` as the key of what they decided
(``LabelWrite.event``, the records' ids); since then an event's key is ``id#digest``. An event
whose report failed part-way before the upgrade and is delivered again after it finds its stored
write (and records) its own within Event Grid's retry span of that write, never after it. Through
the real route over the local ARM server and the local store; the tree before the upgrade is
simulated by keying the first delivery by its bare id."""

from __future__ import annotations

import sqlite3
import time
from collections.abc import Iterable

import pytest

import ringfence.clouds.azure.events as events_mod
import ringfence.clouds.azure.ingest as ingest_mod
from ringfence.clouds.azure.events import RETRY_SPAN, WRITE, stored_key
from ringfence.clouds.azure.wiring import Azure
from ringfence.governance import LabelWrite
from ringfence.local.azure_arm import ArmServer
from ringfence.local.azure_estate import vm_id
from ringfence.local.eventgrid import arm_event
from ringfence.local.wiring import LocalWiring
from tests.azure.conftest import arm, azure  # noqa: F401 (fixtures)
from tests.azure.test_attack_azure_blame import MALLORY, TAGS_WRITE, WEB, findings, quarantines, quarantining  # noqa: F401
from tests.azure.test_attack_azure_redelivery_release import _mallory_quarantined_then_released, qtag  # noqa: F401
from tests.azure.test_azure_report_redelivery import _mallory_moves_web_to_jumpbox, deliver, records, refuse_once

HOUR = 3600.0


def before_the_upgrade(monkeypatch: pytest.MonkeyPatch) -> None:
    """Events keyed as the tree before b0245af keyed them: by their bare id."""
    monkeypatch.setattr(events_mod, "event_key", lambda ev, principal: ev.id)


def test_a_report_failed_before_the_upgrade_is_completed_by_the_redelivery_after_it(
    arm: ArmServer,  # noqa: F811
    azure: Azure,  # noqa: F811
    quarantining: LocalWiring,  # noqa: F811
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """Mallory's held move stored as hers, the quarantine's record refused, on the old tree; Event
    Grid delivers the event again after the upgrade: the quarantine is made, each record once."""
    w = quarantining
    ev = _mallory_moves_web_to_jumpbox(arm, azure, w, "web-up")
    with monkeypatch.context() as m:
        before_the_upgrade(m)
        refused = refuse_once(w, m, "workload.quarantine")
        with pytest.raises(sqlite3.OperationalError):
            deliver(w, azure, ev)
        assert refused
    rec = w.store.get(WEB)
    assert rec is not None and not rec.op_quarantined
    assert rec.label_writes is not None and rec.label_writes["role"].event == ev["id"], "stored with the bare id"
    assert deliver(w, azure, ev) == 200  # upgraded; Event Grid delivers it again
    rec = w.store.get(WEB)
    assert rec is not None and rec.op_quarantined, "Mallory's held move: the quarantine was never made"
    assert findings(w) == [MALLORY] and quarantines(w) == 1
    assert records(w, "label.held", WEB) == 1 and records(w, "workload.quarantine", WEB) == 1


def test_attack_a_second_call_under_a_pre_upgrade_events_id_past_the_retry_span_is_a_new_event(
    arm: ArmServer,  # noqa: F811
    azure: Azure,  # noqa: F811
    qtag: LocalWiring,  # noqa: F811
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """Mallory's first move decided on the old tree (quarantined, released); her second call,
    under the first's id (a caller may set the correlation id) more than 24 h after it was stored,
    cannot be its redelivery: it is reported and quarantined as its own."""
    w = qtag
    with monkeypatch.context() as m:
        before_the_upgrade(m)
        x = _mallory_quarantined_then_released(arm, azure, w, "web-u2")
    real = stored_key

    def a_day_later(key: str, writes: Iterable[LabelWrite], now: float) -> str:
        return real(key, writes, now + RETRY_SPAN + 3600)

    monkeypatch.setattr(ingest_mod, "stored_key", a_day_later)
    arm.get(vm_id("web-u2"))["tags"]["ringfence:app"] = "admin"  # type: ignore[index]
    again = arm_event(WRITE, vm_id("web-u2"), TAGS_WRITE, oid=MALLORY, event_id=x["id"])
    assert deliver(w, azure, again) == 200
    rec = w.store.get(WEB)
    assert rec is not None and rec.op_quarantined, "her second call taken for her first event's redelivery"
    assert quarantines(w) == 2 and findings(w) == [MALLORY, MALLORY]


def test_attack_calls_under_a_pre_upgrade_events_id_do_not_renew_its_retry_span(
    arm: ArmServer,  # noqa: F811
    azure: Azure,  # noqa: F811
    qtag: LocalWiring,  # noqa: F811
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """Mallory's first move decided on the old tree (quarantined, released); 23 h later her second
    call under its id is taken for it (within the span: accepted). What that call stores must not
    carry the bare id with a fresh time, or the span never ends: 46 h after the pre-upgrade write
    her third call under the id (role moved back to web by a tagger, then to jumpbox again) is a
    new held move and is quarantined."""
    w = qtag
    real = time.time
    with monkeypatch.context() as m:
        before_the_upgrade(m)
        x = _mallory_quarantined_then_released(arm, azure, w, "web-u3")
    t0 = real()

    def at(offset: float) -> None:
        monkeypatch.setattr(time, "time", lambda: real() + offset)

    at(23 * HOUR)
    arm.get(vm_id("web-u3"))["tags"]["ringfence:app"] = "admin"  # type: ignore[index]
    assert deliver(w, azure, arm_event(WRITE, vm_id("web-u3"), TAGS_WRITE, oid=MALLORY, event_id=x["id"])) == 200
    rec = w.store.get(WEB)
    assert rec is not None and rec.label_writes is not None
    renewing = [d for d, lw in rec.label_writes.items() if lw.event == x["id"] and lw.at > t0 + HOUR]
    assert not renewing, f"a write stored 23 h on under the pre-upgrade id: {renewing}"
    at(46 * HOUR)
    arm.get(vm_id("web-u3"))["tags"]["ringfence:role"] = "web"  # type: ignore[index]
    assert deliver(w, azure, arm_event(WRITE, vm_id("web-u3"), TAGS_WRITE)) == 200  # a tagger's
    at(46 * HOUR + 120)
    q0 = quarantines(w)
    arm.get(vm_id("web-u3"))["tags"]["ringfence:role"] = "jumpbox"  # type: ignore[index]
    assert deliver(w, azure, arm_event(WRITE, vm_id("web-u3"), TAGS_WRITE, oid=MALLORY, event_id=x["id"])) == 200
    rec = w.store.get(WEB)
    assert rec is not None and rec.op_quarantined, "her third call, 46 h on, taken for the pre-upgrade event"
    assert quarantines(w) == q0 + 1


def test_a_bare_id_is_the_key_only_within_the_retry_span_of_its_write() -> None:
    now = 1_800_000_000.0
    key = "ev-1#0123456789abcdef"

    def write(event: str | None, at: float) -> LabelWrite:
        return LabelWrite(at=at, value="jumpbox", by="other", event=event)

    assert stored_key(key, [write("ev-1", now - 3600)], now) == "ev-1"
    assert stored_key(key, [write("ev-1", now - RETRY_SPAN - 3600)], now) == key, "past the span"
    assert stored_key(key, [write("ev-2", now - 60)], now) == key, "another event's write"
    assert stored_key(key, [write(key, now - 60)], now) == key
    assert stored_key("ev-1", [write("ev-1", now - 60)], now) == "ev-1"
    assert stored_key(key, [write(None, now - 60)], now) == key
    assert stored_key(key, [write("ev-1", now + 3600)], now) == key, "a write dated in the future"
    assert stored_key(key, [write("ev-1", now + 1)], now) == "ev-1", "within SKEW"
