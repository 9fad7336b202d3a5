"""Azure: a VM made while a subscription pass runs, which its listing missed, is stored by its own
write event and runs on: the pass neither tombstones it nor revokes its agent's token (nor audits
it "VM gone"). Through the Event Grid handler, the local ARM server and the real store."""

from __future__ import annotations

import json
import secrets
from typing import Any

import pytest

from ringfence.clouds.azure.events import WRITE
from ringfence.clouds.azure.ingest import AzureEvents
from ringfence.clouds.azure.inventory import observe_subscription
from ringfence.clouds.azure.wiring import Azure
from ringfence.local.azure_arm import ArmServer
from ringfence.local.azure_estate import SUB, seed_vm, vm_id
from ringfence.local.eventgrid import arm_event
from ringfence.local.wiring import LocalWiring
from tests.azure.conftest import PROD_WEB, arm, azure, wiring  # noqa: F401 (fixtures)
from tests.azure.test_azure_events import HEADERS

OLD = "6a000000-0000-4000-8000-0000000cfa01"
NEW = "6a000000-0000-4000-8000-0000000cfb02"


def made_and_stored(arm: ArmServer, events: AzureEvents, wiring: LocalWiring) -> str:  # noqa: F811
    """The new VM made and stored by its write event, its agent enrolled: its token."""
    seed_vm(arm, "made-late", NEW, "10.20.1.72", PROD_WEB)
    write = arm_event(WRITE, vm_id("made-late"), "Microsoft.Compute/virtualMachines/write")
    assert events.handle(HEADERS, json.dumps([write]).encode()).status == 200
    token = secrets.token_hex(16)
    wiring.store.put_token(token, NEW, 3600)
    return token


def made_and_stored_at_first(
    monkeypatch: pytest.MonkeyPatch,
    obj: Any,
    name: str,
    arm: ArmServer,  # noqa: F811
    events: AzureEvents,
    wiring: LocalWiring,  # noqa: F811
) -> list[str]:
    """At the pass's first call of ``obj.name``, the new VM is made and stored (once: the event's
    own reads may make the same call): its token, in the list returned, once it is."""
    real = getattr(obj, name)
    token: list[str] = []

    def hooked(*a: Any, **kw: Any) -> Any:
        if not token:
            token.append("")
            token[0] = made_and_stored(arm, events, wiring)
        return real(*a, **kw)

    monkeypatch.setattr(obj, name, hooked)
    return token


def assert_runs_on(wiring: LocalWiring, token: str, gone: list[str]) -> None:  # noqa: F811
    rec = wiring.store.get(NEW)
    assert rec is not None and rec.state == "running" and NEW not in gone, "the pass tombstoned a running VM"
    assert wiring.store.token_workload(token) == NEW, "the pass revoked a running VM's agent token"
    assert not [a for a in wiring.store.audit_log() if a.action == "token.revoke" and a.target == NEW]


@pytest.fixture
def events(arm: ArmServer, azure: Azure, wiring: LocalWiring) -> AzureEvents:  # noqa: F811
    ev = AzureEvents(wiring, azure)
    seed_vm(arm, "made-early", OLD, "10.20.1.71", PROD_WEB)
    write = arm_event(WRITE, vm_id("made-early"), "Microsoft.Compute/virtualMachines/write")
    assert ev.handle(HEADERS, json.dumps([write]).encode()).status == 200
    return ev


def test_a_vm_stored_by_its_event_while_the_pass_reads_the_store_keeps_its_token(
    arm: ArmServer,  # noqa: F811
    azure: Azure,  # noqa: F811
    wiring: LocalWiring,  # noqa: F811
    events: AzureEvents,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """The VM is made and stored after the pass listed ARM, as it reads the store: the pass's
    tombstone is refused (older than the VM's observation), so its token must not be revoked."""
    token = made_and_stored_at_first(monkeypatch, wiring.store, "all_records", arm, events, wiring)
    res = observe_subscription(wiring, azure.arm(SUB))
    assert token
    assert_runs_on(wiring, token[0], res.gone)


def test_a_vm_made_after_the_listing_and_stored_before_the_pass_ends_runs_on(
    arm: ArmServer,  # noqa: F811
    azure: Azure,  # noqa: F811
    wiring: LocalWiring,  # noqa: F811
    events: AzureEvents,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """The VM is made, and stored by its event, just after the pass listed the VMs (as it lists
    the NICs): the listing's time, not a later one, is what the pass's tombstones are written at,
    so the VM's own observation stands."""
    sub = azure.arm(SUB)
    token = made_and_stored_at_first(monkeypatch, sub, "nics", arm, events, wiring)
    res = observe_subscription(wiring, sub)
    assert token
    assert_runs_on(wiring, token[0], res.gone)
    rec = wiring.store.get(OLD)
    assert rec is not None and rec.state == "running"
