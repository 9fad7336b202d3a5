"""DynamoStore.audit_with on the moto server: an administrator's change and its audit record are
one TransactWriteItems (the change's items, the chain item, the id claim, the head), so a Lambda
killed between "record" and "change" is no longer possible: both are written or neither. A change
refused by its own condition leaves no record; a lost race for the chain's head is retried."""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import pytest
from botocore.exceptions import EndpointConnectionError

from ringfence.audit import AuditRecord, verify
from ringfence.model import Mode
from ringfence.store.base import ChangeFailed, ConflictError, OperatorChange, PolicyActivation
from ringfence.store.dynamodb import DynamoStore
from ringfence.store.sqlite import SqliteStore
from ringfence.versions import PolicyVersion

from .test_store import WID, make_dynamo, rec


class Killed(BaseException):
    """The Lambda's process ending where it stands (a timeout, an out-of-memory kill): no handler
    of ours runs after it."""


@pytest.fixture
def store(moto_url: str) -> Iterator[DynamoStore]:
    from ringfence.store import dynamodb

    dynamodb._CHAIN_WRITERS.clear()  # no head remembered from another test's tables
    st = make_dynamo(moto_url)
    assert isinstance(st, DynamoStore)
    assert st.observe(rec(1.0, "prod"))
    yield st
    dynamodb._CHAIN_WRITERS.clear()


def _hook(store: DynamoStore, event: str, handler: Any) -> Any:
    events = store.audit_table.meta.client.meta.events
    events.register(event, handler)
    return lambda: events.unregister(event, handler)


def _quarantined(store: DynamoStore) -> bool:
    got = store.get(WID)
    assert got is not None
    return got.op_quarantined


def _claims(store: DynamoStore) -> list[str]:
    """The id claims in the audit table, read raw (a record half written would show here)."""
    items = store.audit_table.scan(ConsistentRead=True)["Items"]
    return sorted(str(i["pk"]) for i in items if str(i["pk"]).startswith("id#"))


@pytest.mark.parametrize("when", ["before-call", "after-call"])
def test_a_kill_between_the_record_and_the_change_leaves_both_or_neither(store: DynamoStore, when: str) -> None:
    """The process is killed at the first write's call (before it is sent, or once it committed
    and before anything else runs). Either way the audit log and the store agree: a record of a
    quarantine exactly when the quarantine is in force. (Written first, the record alone stood
    with no quarantine and no ``.failed``: this test failed on that code, ``after-call``.)"""
    calls: list[str] = []

    def kill(**_: Any) -> None:
        calls.append(when)
        raise Killed

    unhook = _hook(store, f"{when}.dynamodb.TransactWriteItems", kill)
    try:
        with pytest.raises(Killed):
            store.audit_with(
                AuditRecord(principal="alice", action="workload.quarantine", target=WID),
                OperatorChange(WID, quarantined=True),
            )
    finally:
        unhook()
    assert calls == [when]
    recorded = [r.action for r in store.audit_log()]
    assert recorded == (["workload.quarantine"] if _quarantined(store) else []), "both or neither"
    assert recorded == ([] if when == "before-call" else ["workload.quarantine"])
    assert verify(store.audit_log(), store.audit_head()).ok


def test_a_change_refused_by_its_condition_writes_no_record(store: DynamoStore) -> None:
    """An unknown workload (the record's existence check) and a lost compare-and-swap of the
    active policy: ChangeFailed carrying the change's own error, no chain item, no id claim, the
    head unmoved, and nothing of the change (no quarantine item for the unknown workload)."""
    first = store.audit(AuditRecord(principal="alice", action="x", target="t"))
    head = store.audit_head()
    with pytest.raises(ChangeFailed) as caught:
        store.audit_with(
            AuditRecord(principal="alice", action="workload.quarantine", target="i-unknown"),
            OperatorChange("i-unknown", quarantined=True),
        )
    assert isinstance(caught.value.cause, KeyError)
    assert store.state.get_item(Key={"pk": "quarantine", "sk": "i-unknown"}, ConsistentRead=True).get("Item") is None

    store.activate_policy(PolicyVersion(number=1, keys={}, digest="d1", author="a"), expected_active=None)
    late = PolicyVersion(number=2, keys={}, digest="d2", author="b")
    with pytest.raises(ChangeFailed) as caught:
        store.audit_with(
            AuditRecord(principal="bob", action="policy.provision", target="policy/v2"),
            PolicyActivation(late, expected_active=None),  # read before v1 became active
        )
    assert isinstance(caught.value.cause, ConflictError)
    assert "policy version 1 became active meanwhile" in str(caught.value.cause)
    active = store.active_policy()
    assert active is not None and active.number == 1
    assert store.state.get_item(Key={"pk": "policy", "sk": "v00000002"}, ConsistentRead=True).get("Item") is None
    assert store.audit_log() == [first] and store.audit_head() == head and _claims(store) == [f"id#{first.id}"]


def test_a_lost_race_for_the_head_is_sealed_again_and_retried(store: DynamoStore, moto_url: str) -> None:
    """Another process appends between this one's read of the head and its transaction: the
    transaction is cancelled by the head's condition alone (the change's own condition held), so
    the record is sealed on the new head and the transaction made again, change and all."""
    other = DynamoStore("rf-inventory", "rf-state", "rf-audit", resource=store.ddb, one_audit_writer=False)
    assert store.audit(AuditRecord(principal="alice", action="first", target="t")).seq == 1  # head remembered
    sent: list[int] = []
    raced: list[AuditRecord] = []

    def race(params: dict[str, Any], **_: Any) -> None:
        sent.append(len(params["TransactItems"]))
        if not raced:  # a Lambda elsewhere appends first
            raced.append(AuditRecord(principal="bob", action="elsewhere", target="t"))
            raced[0] = other.audit(raced[0])

    unhook = _hook(store, "before-parameter-build.dynamodb.TransactWriteItems", race)
    try:
        sealed = store.audit_with(
            AuditRecord(principal="alice", action="workload.quarantine", target=WID),
            OperatorChange(WID, quarantined=True),
        )
    finally:
        unhook()
    # ours (2 change items + 3 chain items) twice, the other's (3) once in between
    assert sent == [5, 3, 5]
    log = store.audit_log()
    assert [(r.seq, r.action) for r in log] == [(1, "first"), (2, "elsewhere"), (3, "workload.quarantine")]
    assert log[-1] == sealed and sealed.prev == raced[0].hash
    assert verify(log, store.audit_head()).ok and _quarantined(store)


def test_a_transaction_whose_answer_was_lost_is_read_back(store: DynamoStore) -> None:
    """The call fails without a cancellation (a dropped connection): the record's id claim says
    whether the transaction committed. Committed: the caller gets its record (the change is in
    force with it); not sent: ChangeFailed with the error, nothing written."""

    def lost(**_: Any) -> None:
        raise EndpointConnectionError(endpoint_url="https://dynamodb")

    unhook = _hook(store, "after-call.dynamodb.TransactWriteItems", lost)
    try:
        sealed = store.audit_with(
            AuditRecord(principal="alice", action="workload.quarantine", target=WID),
            OperatorChange(WID, quarantined=True),
        )
    finally:
        unhook()
    assert store.audit_log() == [sealed] and _quarantined(store)

    unhook = _hook(store, "before-call.dynamodb.TransactWriteItems", lost)
    try:
        with pytest.raises(ChangeFailed) as caught:
            store.audit_with(
                AuditRecord(principal="alice", action="workload.mode", target=WID),
                OperatorChange(WID, set_mode=True, mode=Mode.IDLE),
            )
    finally:
        unhook()
    assert isinstance(caught.value.cause, EndpointConnectionError)
    got = store.get(WID)
    assert got is not None and got.op_mode is None and store.audit_log() == [sealed]


def test_records_queued_behind_a_write_carry_their_changes(store: DynamoStore) -> None:
    """The group commit carries a change with its record: quarantines audited from many threads
    at once all land with their records, in one chain, each change with its own record."""
    import threading

    ids = [f"i-{n:017x}" for n in range(12)]
    for wid in ids:
        assert store.observe(rec(1.0, "prod", wid=wid))
    got: dict[str, Any] = {}

    def one(wid: str) -> None:
        try:
            got[wid] = store.audit_with(
                AuditRecord(principal="alice", action="workload.quarantine", target=wid),
                OperatorChange(wid, quarantined=True) if wid != ids[5] else OperatorChange("i-gone", quarantined=True),
            )
        except Exception as exc:
            got[wid] = exc

    threads = [threading.Thread(target=one, args=(wid,)) for wid in ids]
    for t in threads:
        t.start()
    for t in threads:
        t.join(60)
    log = store.audit_log()
    assert verify(log, store.audit_head()).ok
    assert isinstance(got[ids[5]], ChangeFailed), "refused alone"
    assert sorted(r.target for r in log) == sorted(w for w in ids if w != ids[5])
    assert all(got[r.target] == r for r in log), "each caller got its record as stored"
    quarantined = {w for w in ids if (g := store.get(w)) is not None and g.op_quarantined}
    assert quarantined == {r.target for r in log}


def test_sqlite_takes_the_same_changes(tmp_path: Any) -> None:
    """The change descriptions are the store's interface: SQLite applies them in its transaction."""
    st = SqliteStore(tmp_path / "s.db")
    assert st.observe(rec(1.0, "prod"))
    st.audit_with(AuditRecord(principal="a", action="workload.quarantine", target=WID), OperatorChange(WID, True))
    got = st.get(WID)
    assert got is not None and got.op_quarantined
    st.close()
