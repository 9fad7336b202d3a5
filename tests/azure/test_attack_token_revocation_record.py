"""A deleted VM's token revocation and its ``token.revoke`` audit record are both written or
neither (credentials.retire: one store transaction), through the Event Grid handler, the local
ARM server and the real SQLite store.

Before, the token was revoked first and its record written after, only when a token was active.
Had the record's write failed (a locked database, a process killed in between), the event's
redelivery found no active token and wrote no record: a revocation in force that the audit log
never showed."""

from __future__ import annotations

import json
import secrets
import sqlite3
from typing import Any

import pytest

from ringfence.clouds.azure.events import DELETE, WRITE
from ringfence.clouds.azure.ingest import AzureEvents
from ringfence.clouds.azure.wiring import Azure
from ringfence.local.azure_arm import ArmServer
from ringfence.local.azure_estate import seed_vm, vm_id
from ringfence.local.eventgrid import arm_event
from ringfence.local.wiring import LocalWiring
from tests.azure.conftest import PROD_WEB
from tests.azure.test_azure_events import HEADERS

GUID = "6a000000-0000-4000-8000-0000000cf0a1"


def delivered(events: AzureEvents, *items: dict[str, Any]) -> bool:
    """One Event Grid delivery: True if answered 2xx (else Event Grid delivers it again)."""
    try:
        return 200 <= events.handle(HEADERS, json.dumps(list(items)).encode()).status < 300
    except Exception:
        return False


def revocations(w: LocalWiring, wid: str) -> int:
    return len([r for r in w.store.audit_log() if r.action == "token.revoke" and r.target == wid])


def test_attack_a_deleted_vms_revocation_whose_record_write_fails_is_recorded_by_the_redelivery(
    arm: ArmServer, azure: Azure, wiring: LocalWiring, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The ``token.revoke`` record's write fails once ("database is locked"), inside the
    retirement's transaction. The failed delivery leaves the token live and no record (never a
    revocation without its record); the redelivery revokes it and writes exactly one record; a
    further delivery adds none."""
    w = wiring
    events = AzureEvents(w, azure)
    seed_vm(arm, "rv-1", GUID, "10.20.1.95", PROD_WEB)
    assert delivered(events, arm_event(WRITE, vm_id("rv-1"), "Microsoft.Compute/virtualMachines/write"))
    token = secrets.token_hex(16)
    w.store.put_token(token, GUID, 3600)
    refused: list[str] = []
    real = w.store.audit

    def audit(rec: Any) -> Any:
        if rec.action == "token.revoke" and not refused:
            refused.append(rec.target)
            raise sqlite3.OperationalError("database is locked")
        return real(rec)

    monkeypatch.setattr(w.store, "audit", audit)
    arm.delete(vm_id("rv-1"))
    delete = arm_event(DELETE, vm_id("rv-1"), "Microsoft.Compute/virtualMachines/delete")
    assert not delivered(events, delete)
    assert refused == [GUID]
    assert revocations(w, GUID) == 0
    assert w.store.token_workload(token) == GUID, "the token was revoked with no record of it"
    assert delivered(events, delete)  # Event Grid's redelivery
    assert w.store.token_workload(token) is None, "the deleted VM's token still authorizes"
    assert revocations(w, GUID) == 1, "the revocation in force has no audit record"
    assert delivered(events, delete)  # at least once: delivered yet again
    assert revocations(w, GUID) == 1
