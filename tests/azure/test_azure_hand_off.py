"""Azure: a VM deleted whose token's revocation fails in the delivery that finds it gone is still
cut off and leaves its peers' sets once Event Grid delivers the event again. Through the Event
Grid handler, the local ARM server and the real store."""

from __future__ import annotations

import json
import secrets
from typing import Any

import pytest

from ringfence.clouds.azure.events import DELETE, WRITE
from ringfence.clouds.azure.ingest import AzureEvents
from ringfence.clouds.azure.wiring import Azure
from ringfence.local.azure_arm import ArmServer
from ringfence.local.azure_estate import seed_vm, vm_id
from ringfence.local.eventgrid import arm_event
from ringfence.local.wiring import LocalWiring
from tests.azure.conftest import PROD_WEB, arm, azure, wiring  # noqa: F401 (fixtures)
from tests.azure.test_azure_events import HEADERS
from tests.storerace import computed, fail_once

GUID = "6a000000-0000-4000-8000-0000000cf001"


def handle(events: AzureEvents, *items: dict[str, Any]) -> int:
    """Event Grid's delivery: the status it is answered (not 2xx: delivered again; an error the
    handler does not answer is the host's 5xx)."""
    try:
        return events.handle(HEADERS, json.dumps(list(items)).encode()).status
    except RuntimeError:
        return 500


def test_a_deleted_vm_whose_token_revocation_fails_is_cut_off_and_computed_on_redelivery(
    arm: ArmServer,  # noqa: F811
    azure: Azure,  # noqa: F811
    wiring: LocalWiring,  # noqa: F811
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """The delete's subscription pass finds the VM gone; revoking its agent token fails once. The
    redelivery's pass must still revoke it and hand the VM to compute: a tombstone stored before
    the revocation would be skipped by every later pass (stored gone), the token left authorizing."""
    events = AzureEvents(wiring, azure)
    seed_vm(arm, "ho-1", GUID, "10.20.1.91", PROD_WEB)
    assert handle(events, arm_event(WRITE, vm_id("ho-1"), "Microsoft.Compute/virtualMachines/write")) == 200
    token = secrets.token_hex(16)
    wiring.store.put_token(token, GUID, 3600)
    ids = computed(monkeypatch, wiring)
    failed = fail_once(monkeypatch, wiring.store, "revoke_tokens")
    arm.delete(vm_id("ho-1"))
    delete = arm_event(DELETE, vm_id("ho-1"), "Microsoft.Compute/virtualMachines/delete")
    assert handle(events, delete) != 200
    assert failed
    assert handle(events, delete) == 200  # delivered again
    rec = wiring.store.get(GUID)
    assert rec is not None and rec.state == "terminated"
    assert wiring.store.token_workload(token) is None, "the deleted VM's token still authorizes"
    assert GUID in ids, "the delete was stored but compute never heard of it"
