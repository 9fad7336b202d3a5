"""A storm of Azure tag writes compute reads nothing of: stored, never handed to compute."""

from __future__ import annotations

import json
from typing import Any

import pytest

from ringfence.clouds.azure.events import WRITE
from ringfence.clouds.azure.ingest import SECRET_HEADER, AzureEvents
from ringfence.clouds.azure.wiring import Azure
from ringfence.local.azure_arm import ArmServer
from ringfence.local.azure_estate import seed_vm, vm_id
from ringfence.local.eventgrid import arm_event
from ringfence.local.wiring import LocalWiring

from .conftest import PROD_WEB, SECRET

WEB = "6a000000-0000-4000-8000-00000000b071"
HEADERS = {SECRET_HEADER: SECRET, "aeg-event-type": "Notification"}


def test_attack_azure_non_label_tag_storm_sends_nothing_to_compute(
    arm: ArmServer, wiring: LocalWiring, azure: Azure, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Whoever may write a VM's tags flips one outside the labels' prefix (``scratch``) again and
    again: each write is stored, none reaches compute. A label tag still does."""
    events = AzureEvents(wiring, azure)
    seed_vm(arm, "web-storm", WEB, "10.20.1.71", PROD_WEB)
    tags_of = f"{vm_id('web-storm')}/providers/Microsoft.Resources/tags/default"

    def tag_write() -> list[str]:
        ev = arm_event(WRITE, vm_id("web-storm"), "Microsoft.Resources/tags/write", tags_of)
        r = events.handle(HEADERS, json.dumps([ev]).encode())
        assert r.status == 200, r.body
        return list(r.body["changed"])

    assert tag_write() == [WEB]
    sent: list[list[str]] = []
    monkeypatch.setattr(wiring, "enqueue_compute", lambda ids=(), **kw: sent.append(list(ids)))
    for k in range(6):
        arm.get(vm_id("web-storm"))["tags"]["scratch"] = f"v{k % 2}"  # type: ignore[index]
        assert tag_write() == []
        rec = wiring.store.get(WEB)
        assert rec is not None and rec.workload.tags["scratch"] == f"v{k % 2}", "stored as the cloud has it"
    assert all(ids == [] for ids in sent)
    arm.get(vm_id("web-storm"))["tags"]["ringfence:role"] = "database"  # type: ignore[index]
    assert tag_write() == [WEB]
    assert sent[-1] == [WEB]


def test_attack_a_concurrent_write_between_read_and_write_still_reaches_compute(
    arm: ArmServer, wiring: LocalWiring, azure: Azure, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Ingest reads the VM (role=web), another delivery then stores it as role=database and
    compute compiles that; this event's write of web, retried over the newer record, is compared
    with what it replaced (database), not with its own earlier read: compute is told."""
    events = AzureEvents(wiring, azure)
    vm = "6a000000-0000-4000-8000-00000000b0a1"
    seed_vm(arm, "web-race", vm, "10.20.1.91", PROD_WEB)
    tags_of = f"{vm_id('web-race')}/providers/Microsoft.Resources/tags/default"

    def tag_write() -> list[str]:
        ev = arm_event(WRITE, vm_id("web-race"), "Microsoft.Resources/tags/write", tags_of)
        r = events.handle(HEADERS, json.dumps([ev]).encode())
        assert r.status == 200, r.body
        return list(r.body["changed"])

    assert tag_write() == [vm]
    s0 = wiring.store.get(vm)
    assert s0 is not None and s0.workload.tags["ringfence:role"] == "web"
    sent: list[list[str]] = []
    monkeypatch.setattr(wiring, "enqueue_compute", lambda ids=(), **kw: sent.append(list(ids)))
    real = wiring.store.observe
    raced: list[str] = []

    def observe(rec: Any, **kw: Any) -> bool:
        if rec.id == vm and not raced:
            t = (rec.observed_at + s0.observed_at) / 2
            tags = {**s0.workload.tags, "ringfence:role": "database"}
            w1 = s0.workload.model_copy(update={"tags": tags, "observed_at": t})
            s1 = s0.model_copy(update={"workload": w1, "observed_at": t, "labels": {**s0.labels, "role": "database"}})
            assert real(s1, previous=s0)
            now = wiring.store.get(vm)
            assert now is not None
            raced.append(now.workload.tags["ringfence:role"])
        return real(rec, **kw)

    monkeypatch.setattr(wiring.store, "observe", observe)
    changed = tag_write()  # ARM has it as web
    assert raced == ["database"]
    now = wiring.store.get(vm)
    assert now is not None and now.workload.tags["ringfence:role"] == "web" and now.labels["role"] == "web"
    assert changed == [vm], "the store moved database -> web: compute must recompile it"
    assert [vm] in sent
