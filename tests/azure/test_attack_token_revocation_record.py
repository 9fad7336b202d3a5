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

from ringfence import agentapi
from ringfence.clouds.azure.events import DELETE, WRITE
from ringfence.clouds.azure.ingest import AzureEvents
from ringfence.clouds.azure.inventory import observe_subscription
from ringfence.clouds.azure.wiring import Azure
from ringfence.control.agents import AgentApi
from ringfence.control.api import secret_hash
from ringfence.local.azure_arm import ArmServer
from ringfence.local.azure_estate import SUB, seed_vm, vm_id
from ringfence.local.eventgrid import arm_event
from ringfence.local.wiring import LocalWiring
from tests.aws.test_pipeline import AgentKey
from tests.azure.conftest import PROD_WEB
from tests.azure.test_azure_events import HEADERS
from tests.storerace import refuse_first_enqueue

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


A = "7b000000-0000-4000-8000-0000000aa001"
B = "7b000000-0000-4000-8000-0000000aa002"


def two_gone_vms(arm: ArmServer, azure: Azure, w: LocalWiring) -> dict[str, str]:
    """Two VMs stored by a pass, each with an agent token, then deleted with their events lost:
    the next subscription pass finds both gone. Their tokens by id."""
    seed_vm(arm, "rv-a", A, "10.20.1.41", PROD_WEB)
    seed_vm(arm, "rv-b", B, "10.20.1.42", PROD_WEB)
    observe_subscription(w, azure.arm(SUB))
    tokens = {A: secrets.token_hex(16), B: secrets.token_hex(16)}
    for wid, token in tokens.items():
        w.store.put_token(secret_hash(token), wid, 3600)
    arm.delete(vm_id("rv-a"))
    arm.delete(vm_id("rv-b"))
    return tokens


def test_attack_a_copied_agent_key_renewing_during_every_revocation_does_not_stop_the_subscription_pass(
    arm: ArmServer, azure: Azure, wiring: LocalWiring
) -> None:
    """Root on VM A copied its agent key; A and B are deleted, their events lost. Between each of
    retire's reads of A's current token and its transaction (BEGIN IMMEDIATE), the thief renews by
    nonce through the real token route. Conditioned on the token read, every attempt was refused,
    retire raised, and the pass ended: neither A nor B tombstoned, pass after pass. Now the
    revocation takes whichever token is current: both are tombstoned by the first pass and no
    token of the thief authorizes."""
    w = wiring
    tokens = two_gone_vms(arm, azure, w)
    api = AgentApi(w)
    key = AgentKey()
    w.store.bind_agent_key(A, key.pem)  # as enrollment binds it (the thief copied this key)
    renewed: list[str] = []
    real = w.store.active_token

    def active_token(wid: str) -> str | None:
        current = real(wid)
        if wid == A and current is not None and not w.store._db().in_transaction:  # retire's read
            n = str(api.nonce().body["nonce"])
            r = api.refresh(A, agentapi.TokenRequest(nonce=n, signature=key.prove("token", A, n)))
            assert r.status == 200, r.body
            renewed.append(r.body["token"])
        return current

    w.store.active_token = active_token  # type: ignore[method-assign]
    try:
        res = observe_subscription(w, azure.arm(SUB))
    finally:
        del w.store.active_token
    assert renewed, "the thief's renewal did not land"
    assert sorted(res.gone) == sorted([A, B])
    for wid in (A, B):
        rec = w.store.get(wid)
        assert rec is not None and rec.state == "terminated"
    for token in [tokens[A], *renewed]:
        assert w.store.token_workload(secret_hash(token)) is None, "a token of the thief still authorizes"
        refused = api.authorize(f"Bearer {token}", A)
        assert refused is not None and refused.status == 401
    assert revocations(w, A) == 1 and revocations(w, B) == 1


def test_attack_one_vms_failed_revocation_does_not_keep_the_other_deleted_vms_from_the_pass(
    arm: ArmServer, azure: Azure, wiring: LocalWiring, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A and B are deleted, their events lost; the store refuses the first revocation of the pass.
    That VM stays as stored, token live (its tombstone would make every later pass skip it), but
    the other is still revoked and tombstoned by the same pass, which then fails, for its retry;
    the next pass retires the first."""
    w = wiring
    tokens = two_gone_vms(arm, azure, w)
    refused: list[str] = []
    real = w.store.audit_with

    def audit_with(rec: Any, change: Any) -> Any:
        if not refused:
            refused.append(rec.target)
            raise sqlite3.OperationalError("database is locked")
        return real(rec, change)

    monkeypatch.setattr(w.store, "audit_with", audit_with)
    with pytest.raises(sqlite3.OperationalError):
        observe_subscription(w, azure.arm(SUB))
    assert len(refused) == 1
    first, other = refused[0], B if refused[0] == A else A
    kept, gone = w.store.get(first), w.store.get(other)
    assert gone is not None and gone.state == "terminated", "one VM's failed revocation stopped the pass"
    assert w.store.token_workload(secret_hash(tokens[other])) is None
    assert kept is not None and kept.state != "terminated"
    assert w.store.token_workload(secret_hash(tokens[first])) == first
    res = observe_subscription(w, azure.arm(SUB))  # the next pass
    assert res.gone == [first]
    assert w.store.token_workload(secret_hash(tokens[first])) is None
    assert revocations(w, A) == 1 and revocations(w, B) == 1


def test_attack_a_vms_revocation_failing_every_pass_does_not_keep_earlier_tombstones_from_compute(
    arm: ArmServer, azure: Azure, wiring: LocalWiring, monkeypatch: pytest.MonkeyPatch
) -> None:
    """B is deleted, its event lost; the scheduled pass stores its tombstone and fails to queue it
    for compute (nothing redelivers a pass: later passes hand what was stored gone lately on
    again). Then A is deleted and its revocation fails on every pass. Each pass fails for A, and
    before, failing skipped that hand-on: B's address stayed in its peers' sets for as long as A's
    revocation failed. Now every such pass still hands B on, and fails after."""
    w = wiring
    seed_vm(arm, "rv3-a", A, "10.20.1.61", PROD_WEB)
    seed_vm(arm, "rv3-b", B, "10.20.1.62", PROD_WEB)
    observe_subscription(w, azure.arm(SUB), scheduled=True)
    w.store.put_token(secret_hash(secrets.token_hex(16)), A, 3600)
    arm.delete(vm_id("rv3-b"))
    sent = refuse_first_enqueue(monkeypatch, w)
    with pytest.raises(RuntimeError):
        observe_subscription(w, azure.arm(SUB), scheduled=True)
    rec = w.store.get(B)
    assert rec is not None and rec.state == "terminated" and not sent
    arm.delete(vm_id("rv3-a"))
    real_audit = w.store.audit_with

    def audit_with(rec: Any, change: Any) -> Any:
        if rec.target == A:
            raise sqlite3.OperationalError("database is locked")
        return real_audit(rec, change)

    monkeypatch.setattr(w.store, "audit_with", audit_with)
    for _ in range(2):  # two scheduled passes, each failing for A
        sent.clear()
        with pytest.raises(sqlite3.OperationalError):
            observe_subscription(w, azure.arm(SUB), scheduled=True)
        assert any(B in ids for ids in sent), "B's tombstone kept from compute while A's revocation fails"
    rec = w.store.get(A)
    assert rec is not None and rec.state != "terminated"
