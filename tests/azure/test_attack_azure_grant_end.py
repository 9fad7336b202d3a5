"""Azure: how a write of a granted VM (a call of unknown content) ends an approval, and what
reaches compute and the audit log when it does (review of 3d1d804)."""

from __future__ import annotations

import json
import time
from collections.abc import Iterator
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import pytest
from azure.core.exceptions import HttpResponseError

from ringfence.clouds.azure import arm as armmod
from ringfence.clouds.azure.events import WRITE
from ringfence.clouds.azure.ingest import AzureEvents
from ringfence.clouds.azure.wiring import Azure, attach
from ringfence.clouds.onprem import OnPremAdmin
from ringfence.control.wiring import Config
from ringfence.governance import SKEW, LabelWrite, TagChange
from ringfence.local.azure_arm import ArmServer
from ringfence.local.azure_estate import nic_id, seed_vm, vm_id
from ringfence.local.eventgrid import TENANT, arm_event
from ringfence.local.wiring import LocalWiring
from tests.azure.conftest import PROD_WEB, arm, azure, wiring  # noqa: F401 (fixtures)
from tests.azure.test_attack_azure_label_writes import (  # noqa: F401 (tagging: a fixture)
    CALLER,
    HEADERS,
    TAGS_WRITE,
    _granted_jumpbox,
    _held_by,
    _role,
    deliver,
    tagging,
)
from tests.onprem.conftest import policy_files, signing_key_file
from tests.test_governance import DEV, JUMP_TAGS, MAPPER
from tests.test_governance_writes import box, step

DEV_OID = "11111111-2222-4333-8444-555555555555"
AZ_DEV = f"azure:{TENANT}/{DEV_OID}"


def _at(t: float) -> str:
    return datetime.fromtimestamp(t, UTC).isoformat().replace("+00:00", "Z")


def _ended(w: LocalWiring, guid: str) -> list[dict[str, Any]]:
    return [
        {"principal": a.principal, **a.detail}
        for a in w.store.audit_log()
        if a.action == "label.grant.ended" and a.target == guid
    ]


def test_attack_azure_a_grant_ended_in_a_delivery_that_fails_later_reaches_compute(
    arm: ArmServer,  # noqa: F811
    azure: Azure,  # noqa: F811
    wiring: LocalWiring,  # noqa: F811
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """A delivery's first event ends a grant (stored); its second event's ARM read fails (503:
    Event Grid delivers the whole batch again). The redelivery finds nothing more to store for the
    first VM, nor does reconcile: what was stored must be handed to compute when the delivery
    fails, or the VM keeps jumpbox's access until a rebuild."""
    guid = "6a000000-0000-4000-8000-0000000ce301"
    events = AzureEvents(wiring, azure)
    _granted_jumpbox(arm, events, wiring, "mb-1", guid, "10.20.1.71")
    seed_vm(arm, "mb-2", "6a000000-0000-4000-8000-0000000ce302", "10.20.1.72", PROD_WEB)
    queued: list[str] = []
    real_enqueue = wiring.enqueue_compute

    def enqueue(ids: Any = (), **kw: Any) -> None:
        queued.extend(ids)
        return real_enqueue(ids, **kw)

    monkeypatch.setattr(wiring, "enqueue_compute", enqueue)
    real_vm = armmod.Arm.vm
    failed: list[bool] = []

    def vm(self: armmod.Arm, group: str, name: str) -> Any:
        if name == "mb-2" and not failed:
            failed.append(True)
            raise HttpResponseError(message="throttled")
        return real_vm(self, group, name)

    monkeypatch.setattr(armmod.Arm, "vm", vm)
    batch = json.dumps([arm_event(WRITE, vm_id("mb-1"), TAGS_WRITE), arm_event(WRITE, vm_id("mb-2"), TAGS_WRITE)])
    r = events.handle(HEADERS, batch.encode())
    assert r.status == 503, r.body
    rec = wiring.store.get(guid)
    assert rec is not None and not rec.workload.label_grants and rec.labels.get("role") != "jumpbox"
    assert guid in queued, "the grant's end was stored but compute was not asked to take it in"


@pytest.fixture
def ungoverned(tmp_path: Path, azure: Azure) -> Iterator[LocalWiring]:  # noqa: F811
    """The local control plane whose policy does not make jumpbox privileged yet."""
    w = LocalWiring(tmp_path / "state" / "state.db", signing_key=signing_key_file(tmp_path), cfg=Config())
    attach(w, azure)
    files = policy_files()
    files["labels.yaml"] = files["labels.yaml"].replace("      privileged: [jumpbox]\n", "")
    assert "privileged: [jumpbox]" not in files["labels.yaml"]
    r = OnPremAdmin(w).provision("alice", files, "jumpbox not privileged yet")
    assert r.status == 201, r.body
    yield w
    w.close()


def test_attack_azure_a_kept_privileged_value_does_not_outlive_a_revocation_and_reescalation(
    arm: ArmServer,  # noqa: F811
    azure: Azure,  # noqa: F811
    ungoverned: LocalWiring,
) -> None:
    """A VM holding jumpbox when jumpbox becomes privileged keeps it (``kept``): the other
    standing approval. The developer moves it to web and back before either event is read: every
    ARM read shows jumpbox, so the calls (of unknown content, made after it) end it, as a grant."""
    w = ungoverned
    guid = "6a000000-0000-4000-8000-0000000ce001"
    events = AzureEvents(w, azure)
    seed_vm(arm, "kp-1", guid, "10.20.1.41", {**PROD_WEB, "ringfence:role": "jumpbox"})
    deliver(events, arm_event(WRITE, vm_id("kp-1"), "Microsoft.Compute/virtualMachines/write"))
    r = OnPremAdmin(w).provision("alice", policy_files(), "jumpbox privileged")
    assert r.status == 201, r.body
    deliver(events, arm_event(WRITE, nic_id("kp-1-nic"), "Microsoft.Network/networkInterfaces/write"))
    rec = w.store.get(guid)
    assert rec is not None and rec.labels["role"] == "jumpbox"
    assert rec.label_writes is not None and rec.label_writes["role"].by == "kept"
    _role(arm, "kp-1", "web")
    _role(arm, "kp-1", "jumpbox")
    deliver(events, arm_event(WRITE, vm_id("kp-1"), TAGS_WRITE), arm_event(WRITE, vm_id("kp-1"), TAGS_WRITE))
    rec = w.store.get(guid)
    assert rec is not None and rec.labels.get("role") != "jumpbox", "kept jumpbox outlived the revocation"
    assert _held_by(w, guid) == [CALLER]
    assert [e["ended"] for e in _ended(w, guid)] == [
        {
            "role": {
                "value": "jumpbox",
                "approval": "kept",
                "approved_at": pytest.approx(rec.label_writes["role"].ended.at),
            }
        }  # type: ignore[index,union-attr]
    ]


@pytest.mark.parametrize("approval", ["kept", "tagger", "grant"])
def test_a_call_of_unknown_content_ends_every_approval_made_before_it(approval: str) -> None:
    """govern_writes alone: an approving write at 20, the developer's calls of unknown content
    at 30 and 31 (what AWS would see as role=web then role=jumpbox): held, whatever the approval."""
    w, writes, _ = step(None, {}, 0.0, box(JUMP_TAGS, 20.0))
    w = w.model_copy(update={"held_labels": None})
    writes = {**writes, "role": LabelWrite(at=20.0, value="jumpbox", by=approval)}  # type: ignore[arg-type]
    assert MAPPER.resolve(w).labels["role"] == "jumpbox"
    call = TagChange(DEV, None, 30.0, unknown_content=True)
    w1, wr1, v = step(w, writes, 20.0, box(JUMP_TAGS, 40.0), call, now=40.0)
    assert MAPPER.resolve(w1).labels.get("role") != "jumpbox"
    assert v.finding and v.ended["role"].ended == writes["role"]
    w2, _, v2 = step(w1, wr1, 40.0, box(JUMP_TAGS, 41.0), TagChange(DEV, None, 31.0, unknown_content=True), now=41.0)
    assert MAPPER.resolve(w2).labels.get("role") != "jumpbox" and not v2.ended  # named once


def test_a_later_processed_earlier_call_takes_the_end_over() -> None:
    """govern_writes alone: a grant at 20, ended by a call at 40 (processed first), then a call at
    30 (processed second) takes the end over and is named; one before the grant (beyond SKEW), or
    at or after the end, changes nothing."""
    w, writes, _ = step(None, {}, 0.0, box(JUMP_TAGS, 20.0))
    w = w.model_copy(update={"held_labels": None})
    grant = LabelWrite(at=20.0, value="jumpbox", by="grant")
    w = w.model_copy(update={"label_grants": {"role": "jumpbox"}})
    writes = {**writes, "role": grant}
    w1, wr1, v1 = step(
        w, writes, 20.0, box(JUMP_TAGS, 50.0), TagChange(DEV, None, 40.0, unknown_content=True), now=50.0
    )
    assert wr1["role"].at == 40.0 and wr1["role"].ended == grant and v1.finding
    for late in (20.0 - SKEW - 1, 40.0, 45.0):
        _, wr, v = step(w1, wr1, 50.0, box(JUMP_TAGS, 51.0), TagChange(DEV, None, late, unknown_content=True), now=51.0)
        assert wr["role"] == wr1["role"] and not v.ended and not v.finding, late
    _, wr2, v2 = step(w1, wr1, 50.0, box(JUMP_TAGS, 51.0), TagChange(DEV, None, 30.0, unknown_content=True), now=51.0)
    assert wr2["role"].at == 30.0 and wr2["role"].ended == grant and v2.finding and "role" in v2.ended


@pytest.mark.parametrize("tagger_first", [False, True], ids=["dev-events-first", "tagger-event-first"])
def test_attack_azure_the_earliest_write_after_a_grant_is_named_whatever_order_its_events_come_in(
    arm: ArmServer,  # noqa: F811
    azure: Azure,  # noqa: F811
    tagging: LocalWiring,  # noqa: F811
    tagger_first: bool,
) -> None:
    """After a grant, a developer revokes and re-escalates (two VM writes, t1 < t2) and an allowed
    tagger then makes a routine tag write (t3). Event Grid may hand the tagger's event over first:
    it ends the grant naming nobody (a tagger is never named), and the developer's earlier calls
    must still be named (once): the calls' times decide, not their events' order."""
    guid = "6a000000-0000-4000-8000-0000000ce40" + ("1" if tagger_first else "2")
    name = "or-1" if tagger_first else "or-2"
    events = AzureEvents(tagging, azure)
    _granted_jumpbox(arm, events, tagging, name, guid, "10.20.1.8" + ("1" if tagger_first else "2"))
    rec = tagging.store.get(guid)
    assert rec is not None and rec.label_writes is not None
    g = rec.label_writes["role"].at
    named = _held_by(tagging, guid)
    time.sleep(max(0.0, g + 1.5 - time.time()))  # the calls were made after the grant, before now
    _role(arm, name, "web")
    _role(arm, name, "jumpbox")
    arm.get(vm_id(name))["tags"]["owner"] = "team-b"  # type: ignore[index]
    d1 = arm_event(WRITE, vm_id(name), TAGS_WRITE, oid=DEV_OID)
    d1["eventTime"] = _at(g + 0.3)
    d2 = arm_event(WRITE, vm_id(name), TAGS_WRITE, oid=DEV_OID)
    d2["eventTime"] = _at(g + 0.6)
    t3 = arm_event(WRITE, vm_id(name), TAGS_WRITE)  # the tagger (CALLER is allow-listed here)
    t3["eventTime"] = _at(g + 1.2)
    deliver(events, *([t3, d1, d2] if tagger_first else [d1, d2, t3]))
    rec = tagging.store.get(guid)
    assert rec is not None and not rec.workload.label_grants and rec.labels.get("role") != "jumpbox"
    assert _held_by(tagging, guid) == [*named, AZ_DEV], "the developer who wrote the granted VM first is not named"
    assert rec.label_writes is not None and rec.label_writes["role"].at == pytest.approx(g + 0.3, abs=0.01)
    # the same delivery again names nobody more
    deliver(events, *([t3, d1, d2] if tagger_first else [d1, d2, t3]))
    assert _held_by(tagging, guid) == [*named, AZ_DEV]


def test_a_late_event_of_a_write_made_before_the_grant_leaves_it_also_where_it_names_another_move(
    arm: ArmServer,  # noqa: F811
    azure: Azure,  # noqa: F811
    wiring: LocalWiring,  # noqa: F811
) -> None:
    """The developer set app=admin 60 s before the grant; its event arrives only now, and its read
    of ARM is the first to see app=admin: the caller is named for app=admin (held), and the grant
    of role, made after the call, stands (docs/deploy-azure.md section 3)."""
    guid = "6a000000-0000-4000-8000-0000000ce101"
    events = AzureEvents(wiring, azure)
    _granted_jumpbox(arm, events, wiring, "lt-1", guid, "10.20.1.51")
    rec = wiring.store.get(guid)
    assert rec is not None and rec.label_writes is not None
    named = _held_by(wiring, guid)
    arm.get(vm_id("lt-1"))["tags"]["ringfence:app"] = "admin"  # type: ignore[index]
    late = arm_event(WRITE, vm_id("lt-1"), TAGS_WRITE)
    late["eventTime"] = _at(rec.label_writes["role"].at - 60)
    deliver(events, late)
    rec = wiring.store.get(guid)
    assert rec is not None
    assert _held_by(wiring, guid) == [*named, CALLER]  # named for app=admin
    assert rec.workload.label_grants == {"role": "jumpbox"}, "a pre-grant write's late event ended the grant"
    assert rec.labels["role"] == "jumpbox" and rec.labels.get("app") != "admin"
    assert not _ended(wiring, guid)


def test_an_approval_ended_by_a_taggers_write_is_audited(
    arm: ArmServer,  # noqa: F811
    azure: Azure,  # noqa: F811
    tagging: LocalWiring,  # noqa: F811
) -> None:
    """An allowed tagger's write of a granted VM ends the grant (fail closed) and raises no
    finding: the end is audited all the same (``label.grant.ended``: who, which event, what)."""
    guid = "6a000000-0000-4000-8000-0000000ce201"
    events = AzureEvents(tagging, azure)
    _granted_jumpbox(arm, events, tagging, "tg-1", guid, "10.20.1.61")
    held = _held_by(tagging, guid)
    arm.get(vm_id("tg-1"))["tags"]["owner"] = "team-b"  # type: ignore[index]
    ev = arm_event(WRITE, vm_id("tg-1"), TAGS_WRITE)
    deliver(events, ev)
    rec = tagging.store.get(guid)
    assert rec is not None and not rec.workload.label_grants and rec.labels.get("role") != "jumpbox"
    assert _held_by(tagging, guid) == held  # a tagger is named in no finding
    ended = _ended(tagging, guid)
    assert len(ended) == 1, ended
    assert ended[0]["principal"] == CALLER and ended[0]["event_id"].startswith(ev["id"] + "#")
    assert ended[0]["ended"]["role"]["value"] == "jumpbox" and ended[0]["ended"]["role"]["approval"] == "grant"
    deliver(events, ev)  # redelivered: nothing more ended, nothing more audited
    assert len(_ended(tagging, guid)) == 1
