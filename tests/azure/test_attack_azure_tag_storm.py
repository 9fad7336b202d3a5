"""A storm of Azure tag writes compute reads nothing of: stored, never handed to compute."""

from __future__ import annotations

import json
from collections.abc import Callable

import pytest

from ringfence.clouds.azure.events import WRITE
from ringfence.clouds.azure.ingest import SECRET_HEADER, AzureEvents
from ringfence.clouds.azure.wiring import Azure
from ringfence.local.azure_arm import ArmServer
from ringfence.local.azure_estate import seed_vm, vm_id
from ringfence.local.eventgrid import arm_event
from ringfence.local.wiring import LocalWiring
from tests.storerace import race_a_role_in_before_the_write

from .conftest import PROD_WEB, SECRET

WEB = "6a000000-0000-4000-8000-00000000b071"
HEADERS = {SECRET_HEADER: SECRET, "aeg-event-type": "Notification"}


def _tag_writer(events: AzureEvents, name: str) -> Callable[[], list[str]]:
    """Delivers the Tags API write event of VM ``name``; returns what the delivery changed."""
    tags_of = f"{vm_id(name)}/providers/Microsoft.Resources/tags/default"

    def tag_write() -> list[str]:
        ev = arm_event(WRITE, vm_id(name), "Microsoft.Resources/tags/write", tags_of)
        r = events.handle(HEADERS, json.dumps([ev]).encode())
        assert r.status == 200, r.body
        return list(r.body["changed"])

    return tag_write


def test_attack_azure_non_label_tag_storm_sends_nothing_to_compute(
    arm: ArmServer, wiring: LocalWiring, azure: Azure, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Whoever may write a VM's tags flips one outside the labels' prefix (``scratch``) again and
    again: each write is stored, none reaches compute. A label tag still does."""
    events = AzureEvents(wiring, azure)
    seed_vm(arm, "web-storm", WEB, "10.20.1.71", PROD_WEB)
    tag_write = _tag_writer(events, "web-storm")

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
    tag_write = _tag_writer(events, "web-race")

    assert tag_write() == [vm]
    s0 = wiring.store.get(vm)
    assert s0 is not None and s0.workload.tags["ringfence:role"] == "web"
    sent: list[list[str]] = []
    monkeypatch.setattr(wiring, "enqueue_compute", lambda ids=(), **kw: sent.append(list(ids)))
    raced = race_a_role_in_before_the_write(monkeypatch, wiring.store, s0)
    changed = tag_write()  # ARM has it as web
    assert raced == ["database"]
    now = wiring.store.get(vm)
    assert now is not None and now.workload.tags["ringfence:role"] == "web" and now.labels["role"] == "web"
    assert changed == [vm], "the store moved database -> web: compute must recompile it"
    assert [vm] in sent
