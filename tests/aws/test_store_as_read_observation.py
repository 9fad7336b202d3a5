"""The store's as-read contract (both stores): a write made over the registration as read
(``as_read``) compares its observation time too, so a registration of the id in place that keeps
its ``governed_rev`` (another box under the name) refuses it, while what an agent writes (liveness)
and the writes themselves (a quarantine, a pairing key) refuse nothing. The routes' races are the
``in_place`` ones of tests/onprem/test_attack_operator_change_race.py,
tests/onprem/test_attack_credential_change_race.py and their DynamoDB twins."""

from __future__ import annotations

import time

import pytest

from ringfence.model import Mode, Workload
from ringfence.store.base import (
    AgentKeyReset,
    AuditRecord,
    ChangeFailed,
    InventoryRecord,
    OperatorChange,
    Store,
    WorkloadChanged,
)
from tests.aws.test_pipeline import AgentKey
from tests.aws.test_store import store

__all__ = ["store"]  # the fixture (DynamoDB over moto, SQLite)

WID = "dc1-app-1"


def registration(ips: list[str], t: float) -> InventoryRecord:
    w = Workload(id=WID, ips=ips, cloud="onprem", observed_at=t)
    return InventoryRecord(id=WID, workload=w, state="running", observed_at=t)


def test_a_write_over_the_registration_read_is_refused_after_a_registration_in_place(store: Store) -> None:
    t = time.time()
    store.observe_addressed([registration(["192.168.10.5"], t)])
    read = store.get(WID)
    assert read is not None
    # what the routes' own writes and an agent write keep the registration as read
    store.set_liveness(WID, enrolled=True, heartbeat=t + 1, offline=False)
    store.set_operator(WID, quarantined=True, as_read=read)
    store.put_pairing("before", WID, uses=1, ttl=600, as_read=read)
    assert store.drop_pairings(WID, as_read=read) == 1
    store.put_pairing("kept", WID, uses=1, ttl=600, as_read=read)
    now = store.get(WID)
    assert now is not None and now.observed_at == read.observed_at and now.governed_rev == read.governed_rev

    # another box under the name, in place: the version stays, the observation moves
    store.observe_addressed([registration(["192.168.10.99"], t + 2)])
    new = store.get(WID)
    assert new is not None and new.governed_rev == read.governed_rev and new.observed_at != read.observed_at

    for write in (
        lambda: store.set_operator(WID, mode=Mode.IDLE, as_read=read),
        lambda: store.set_operator(WID, quarantined=False, as_read=read),
        lambda: store.put_pairing("stale", WID, uses=1, ttl=600, as_read=read),
        lambda: store.drop_pairings(WID, as_read=read),
        lambda: store.reset_agent_key(AgentKeyReset(WID, "f" * 64, read)),
    ):
        with pytest.raises(WorkloadChanged, match="registered again"):
            write()
    with pytest.raises(ChangeFailed) as caught:
        change = OperatorChange(WID, set_mode=True, mode=Mode.IDLE, as_read=read)
        store.audit_with(AuditRecord(principal="paula", action="workload.mode", target=WID), change)
    assert isinstance(caught.value.cause, WorkloadChanged)
    got = store.get(WID)
    assert got is not None and got.op_mode is None and got.op_quarantined, "a write read before it landed"
    assert store.expected_agent_key(WID) is None
    assert not store.use_pairing("stale", WID, agent_key=AgentKey().pem)
    assert store.use_pairing("kept", WID, agent_key=AgentKey().pem), "a revocation read before it landed"
    # over the registration stored: made
    store.set_operator(WID, mode=Mode.IDLE, quarantined=False, as_read=new)
    got = store.get(WID)
    assert got is not None and got.op_mode is Mode.IDLE and not got.op_quarantined
