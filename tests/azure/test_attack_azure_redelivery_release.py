"""An event delivered again reports what that event decided, nothing more: through the real route
(``POST /azure/events``) over the local ARM server and the local store.

Event Grid delivers at least once, and delivers again whatever a delivery failed: an attacker who
can make a batch fail (or simply waits for a duplicate) gets an old event processed again later.
Before, the report's records were derived from every move held on the VM at that time: a
non-tagger's event delivered again after an operator's release, while an allowed tagger's move was
held (awaiting a binding: no Azure event approves one), wrote a second ``label.held`` blaming her
for the tagger's move and quarantined the VM again, undoing the release. And every redelivery
logged the finding as "quarantined" for a released VM."""

from __future__ import annotations

import json
import logging
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from ringfence.clouds.azure.events import WRITE
from ringfence.clouds.azure.ingest import AzureEvents
from ringfence.clouds.azure.wiring import Azure, attach
from ringfence.clouds.onprem import OnPremAdmin
from ringfence.control.wiring import Config
from ringfence.local.azure_arm import ArmServer
from ringfence.local.azure_estate import nic_id, seed_vm, vm_id
from ringfence.local.eventgrid import OID, TENANT, arm_event
from ringfence.local.wiring import LocalWiring
from tests.onprem.conftest import policy_files, signing_key_file

from .conftest import PROD_WEB
from .test_attack_azure_blame import BOB, MALLORY, TAGS_WRITE, VM_WRITE, WEB, findings, quarantines
from .test_attack_azure_label_writes import _granted_jumpbox
from .test_azure_report_redelivery import deliver

TAGGER = f"azure:{TENANT}/{OID}"  # the local events' default caller


@pytest.fixture
def qtag(tmp_path: Path, azure: Azure) -> Iterator[LocalWiring]:
    """Quarantine on findings; the local events' default caller is an allowed tagger."""
    files = policy_files()
    files["labels.yaml"] = (
        files["labels.yaml"]
        .replace("on_privileged_change: hold", "on_privileged_change: quarantine")
        .replace(
            'taggers: ["arn:aws:iam::123456789012:role/ringfence-tagging"]',
            f'taggers: ["arn:aws:iam::123456789012:role/ringfence-tagging", "{TAGGER}"]',
        )
    )
    assert TAGGER in files["labels.yaml"] and "quarantine" in files["labels.yaml"]
    w = LocalWiring(tmp_path / "state" / "state.db", signing_key=signing_key_file(tmp_path), cfg=Config())
    attach(w, azure)
    assert OnPremAdmin(w).provision("alice", files, "quarantine mode").status == 201
    yield w
    w.close()


def held_records(w: LocalWiring) -> list[tuple[str, Any]]:
    return [
        (a.principal.rsplit("/", 1)[-1], a.detail.get("requested"))
        for a in w.store.audit_log()
        if a.action == "label.held"
    ]


def _mallory_quarantined_then_released(arm: ArmServer, azure: Azure, w: LocalWiring, name: str) -> dict[str, Any]:
    """Mallory (no tagger) moves the VM to role=jumpbox: named, quarantined; an operator releases
    it. Her event, to deliver again."""
    seed_vm(arm, name, WEB, "10.20.1.40", PROD_WEB)
    assert deliver(w, azure, arm_event(WRITE, vm_id(name), VM_WRITE)) == 200  # the tagger's create
    arm.get(vm_id(name))["tags"]["ringfence:role"] = "jumpbox"  # type: ignore[index]
    x = arm_event(WRITE, vm_id(name), TAGS_WRITE, oid=MALLORY)
    # her call made a minute before its event is processed (Event Grid's latency; it also keeps the
    # tagger's later move out of the seconds in which her call could be taken for it)
    x["eventTime"] = time.strftime("%Y-%m-%dT%H:%M:%S.0000000Z", time.gmtime(time.time() - 60))
    assert deliver(w, azure, x) == 200
    rec = w.store.get(WEB)
    assert rec is not None and rec.op_quarantined and findings(w) == [MALLORY] and quarantines(w) == 1
    assert OnPremAdmin(w).quarantine("operator", WEB, False, "reviewed; held until a binding").status == 200
    rec = w.store.get(WEB)
    assert rec is not None and not rec.op_quarantined
    return x


def test_attack_an_event_delivered_again_after_a_release_neither_quarantines_again_nor_blames_a_taggers_move(
    arm: ArmServer, azure: Azure, qtag: LocalWiring
) -> None:
    w = qtag
    x = _mallory_quarantined_then_released(arm, azure, w, "web-f1")
    arm.get(vm_id("web-f1"))["tags"]["ringfence:app"] = "admin"  # type: ignore[index]
    assert deliver(w, azure, arm_event(WRITE, vm_id("web-f1"), TAGS_WRITE)) == 200  # the tagger's: held
    rec = w.store.get(WEB)
    assert rec is not None and not rec.op_quarantined and rec.labels["app"] == "ordering"
    assert findings(w) == [MALLORY] and quarantines(w) == 1
    assert deliver(w, azure, x) == 200  # Mallory's event, delivered again
    rec = w.store.get(WEB)
    assert rec is not None and not rec.op_quarantined, "the operator's release undone by a redelivery"
    assert quarantines(w) == 1
    assert held_records(w) == [(MALLORY, {"role": "jumpbox"})], "the tagger's held move blamed on Mallory"


def test_attack_a_grant_ending_event_delivered_again_after_a_release_does_not_quarantine_again(
    arm: ArmServer, azure: Azure, qtag: LocalWiring
) -> None:
    """Bob's VM write ends a role=jumpbox grant: Bob named, the VM quarantined, then released. An
    unrelated NIC write observes the VM; an allowed tagger sets app=admin (held). Bob's event
    delivered again."""
    w = qtag
    _granted_jumpbox(arm, AzureEvents(w, azure), w, "ge-b", WEB, "10.20.1.92")
    arm.get(vm_id("ge-b"))["tags"]["owner"] = "team-b"  # type: ignore[index]
    e = arm_event(WRITE, vm_id("ge-b"), VM_WRITE, oid=BOB)
    assert deliver(w, azure, e) == 200
    rec = w.store.get(WEB)
    assert rec is not None and rec.op_quarantined and rec.labels.get("role") != "jumpbox"
    assert OnPremAdmin(w).quarantine("operator", WEB, False, "reviewed").status == 200
    held, q = held_records(w), quarantines(w)
    time.sleep(6)  # past the clock skew
    nic = arm_event(WRITE, nic_id("ge-b-nic"), "Microsoft.Network/networkInterfaces/write", oid=BOB)
    assert deliver(w, azure, nic) == 200
    arm.get(vm_id("ge-b"))["tags"]["ringfence:app"] = "admin"  # type: ignore[index]
    assert deliver(w, azure, arm_event(WRITE, vm_id("ge-b"), TAGS_WRITE)) == 200  # the tagger's: held
    rec = w.store.get(WEB)
    assert rec is not None and not rec.op_quarantined and quarantines(w) == q
    assert deliver(w, azure, e) == 200  # Bob's event, delivered again
    rec = w.store.get(WEB)
    assert rec is not None and not rec.op_quarantined, "the operator's release undone by a redelivery"
    assert quarantines(w) == q and held_records(w) == held


def test_attack_a_released_vm_is_not_reported_quarantined_on_each_redelivery(
    arm: ArmServer, azure: Azure, qtag: LocalWiring, caplog: pytest.LogCaptureFixture
) -> None:
    """Nothing else changed: the redeliveries write no record and quarantine nothing, and log no
    finding either (the SIEM would see the released VM "quarantined" on every one)."""
    w = qtag
    with caplog.at_level(logging.WARNING, logger="ringfence.findings"):
        x = _mallory_quarantined_then_released(arm, azure, w, "web-f2")
        assert deliver(w, azure, x) == 200
        assert deliver(w, azure, x) == 200
    rec = w.store.get(WEB)
    assert rec is not None and not rec.op_quarantined and quarantines(w) == 1 and findings(w) == [MALLORY]
    logged = [json.loads(r.getMessage()) for r in caplog.records if r.name == "ringfence.findings"]
    assert [(f["action"], f["requested"]) for f in logged] == [("quarantined", {"role": "jumpbox"})], (
        "a finding logged again for a VM the operator released"
    )


def test_attack_a_second_call_under_an_earlier_events_id_is_decided_as_a_new_event(
    arm: ArmServer, azure: Azure, qtag: LocalWiring
) -> None:
    """ARM's events carry the request's correlation id, which the caller may set: Mallory's second
    privileged move, under the id of her first (already decided, quarantined and released), must be
    reported and quarantined as the new call it is, not taken for a redelivery of the first."""
    w = qtag
    x = _mallory_quarantined_then_released(arm, azure, w, "web-f4")
    arm.get(vm_id("web-f4"))["tags"]["ringfence:app"] = "admin"  # type: ignore[index]
    again = arm_event(WRITE, vm_id("web-f4"), TAGS_WRITE, oid=MALLORY, event_id=x["id"])
    assert deliver(w, azure, again) == 200
    rec = w.store.get(WEB)
    assert rec is not None and rec.op_quarantined, "her second call taken for her first event, already decided"
    assert quarantines(w) == 2 and findings(w) == [MALLORY, MALLORY]
    assert deliver(w, azure, again) == 200  # that call's own redelivery: decided already
    assert quarantines(w) == 2 and findings(w) == [MALLORY, MALLORY]
