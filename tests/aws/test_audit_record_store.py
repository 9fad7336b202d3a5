"""Store.audit_record and the token revocation made with its record (TokenRevocation through
Store.audit_with), held to the same behaviour on DynamoStore (moto server) and SqliteStore."""

from __future__ import annotations

import pytest

from ringfence.audit import verify
from ringfence.store.base import AuditRecord, ChangeFailed, ConflictError, OperatorChange, Store, TokenRevocation

from .test_store import WID, rec, store

__all__ = ["store"]  # the parametrized fixture, used by name


def test_audit_record_reads_a_record_by_its_id(store: Store) -> None:
    """An unknown id: None. A record written by audit, and one written by audit_with with its
    change: each read back by id as sealed (principal, action, target, detail and the chain's
    fields), the other's id never answering for it."""
    assert store.audit_record("no-such-record") is None
    written = store.audit(
        AuditRecord(principal="alice", action="policy.provision", target="policy/v1", detail={"digest": "d1", "n": 2})
    )
    got = store.audit_record(written.id)
    assert got == written
    assert got is not None
    assert (got.principal, got.action, got.target, got.detail) == (
        "alice",
        "policy.provision",
        "policy/v1",
        {"digest": "d1", "n": 2},
    )
    assert store.observe(rec(1.0, "prod"))
    with_change = store.audit_with(
        AuditRecord(principal="bob", action="workload.quarantine", target=WID, detail={"quarantined": True}),
        OperatorChange(WID, quarantined=True),
    )
    got = store.audit_record(with_change.id)
    assert got == with_change and got is not None and got.seq == written.seq + 1
    assert (got.principal, got.action, got.target, got.detail) == (
        "bob",
        "workload.quarantine",
        WID,
        {"quarantined": True},
    )
    assert store.audit_record(written.id) == written
    assert store.audit_record("no-such-record") is None


def test_a_token_revocation_and_its_record_are_written_together_or_not_at_all(store: Store) -> None:
    """The active token revoked with its record (both); a token read before a refresh replaced it,
    and no token at all, refused with ConflictError and nothing written (neither): no record of a
    revocation that did not happen, the new token still live."""
    assert store.active_token(WID) is None
    store.put_token("h1", WID, 3600)
    assert store.active_token(WID) == "h1" and store.token_workload("h1") == WID
    store.put_token("h2", WID, 3600)  # a refresh: h1 no longer current
    with pytest.raises(ChangeFailed) as caught:
        store.audit_with(
            AuditRecord(principal="ringfence", action="token.revoke", target=WID), TokenRevocation(WID, "h1")
        )
    assert isinstance(caught.value.cause, ConflictError)
    assert store.audit_log() == [] and store.token_workload("h2") == WID, "refused, yet something was written"

    sealed = store.audit_with(
        AuditRecord(principal="ringfence", action="token.revoke", target=WID, detail={"reason": "gone"}),
        TokenRevocation(WID, "h2"),
    )
    assert store.token_workload("h2") is None and store.active_token(WID) is None
    assert store.audit_record(sealed.id) == sealed and store.audit_log() == [sealed]

    with pytest.raises(ChangeFailed) as caught:  # nothing active: nothing to record
        store.audit_with(
            AuditRecord(principal="ringfence", action="token.revoke", target=WID), TokenRevocation(WID, "h2")
        )
    assert isinstance(caught.value.cause, ConflictError)
    assert store.audit_log() == [sealed]
    assert verify(store.audit_log(), store.audit_head()).ok
