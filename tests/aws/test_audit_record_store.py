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
    """The active token revoked with its record (both); no token at all, refused with
    ConflictError and nothing written (neither): no record of a revocation that did not happen."""
    assert store.active_token(WID) is None
    store.put_token("h1", WID, 3600)
    assert store.active_token(WID) == "h1" and store.token_workload("h1") == WID
    sealed = store.audit_with(
        AuditRecord(principal="ringfence", action="token.revoke", target=WID, detail={"reason": "gone"}),
        TokenRevocation(WID, "h1"),
    )
    assert store.token_workload("h1") is None and store.active_token(WID) is None
    assert store.token_grant("h1", WID).workload_id is None
    assert store.audit_record(sealed.id) == sealed and store.audit_log() == [sealed]

    with pytest.raises(ChangeFailed) as caught:  # nothing active: nothing to record
        store.audit_with(
            AuditRecord(principal="ringfence", action="token.revoke", target=WID), TokenRevocation(WID, "h1")
        )
    assert isinstance(caught.value.cause, ConflictError)
    assert store.audit_log() == [sealed]
    assert verify(store.audit_log(), store.audit_head()).ok


def test_a_token_revocation_revokes_the_token_that_replaced_the_one_read(store: Store) -> None:
    """A refresh between the read (h1) and the revocation (h2 current): the revocation is not
    refused (a copied agent key renewing between every read and its revocation would otherwise
    keep the workload's token for good) and h2 authorizes nothing after it, though on DynamoDB its
    ``token#`` item is left to its TTL: the workload's ``tokenof#`` item is gone."""
    store.put_token("h1", WID, 3600)
    assert store.active_token(WID) == "h1"
    store.put_token("h2", WID, 3600)  # the refresh
    sealed = store.audit_with(
        AuditRecord(principal="ringfence", action="token.revoke", target=WID), TokenRevocation(WID, "h1")
    )
    assert store.active_token(WID) is None
    for h in ("h1", "h2"):
        assert store.token_workload(h) is None, f"{h} still authorizes"
        assert store.token_grant(h, WID).workload_id is None, f"{h} still authorizes"
    assert store.audit_log() == [sealed]
    assert verify(store.audit_log(), store.audit_head()).ok
