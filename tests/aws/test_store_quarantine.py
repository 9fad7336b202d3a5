"""The store contract for quarantines, DynamoStore (moto server) and SqliteStore alike: a
quarantine is kept apart from the inventory record (set_operator), a record reads quarantined
while it is kept or the record's own mark says so, and only a release (set_operator False) ends
it. Writing the record, as code in an event-fed role can, releases nothing."""

from __future__ import annotations

import pytest

from ringfence.engine.compiler import Engine
from ringfence.model import Mode
from ringfence.policy import load_policy
from ringfence.store.base import InventoryRecord, Store
from ringfence.store.dynamodb import DynamoStore
from ringfence.store.sqlite import SqliteStore
from tests.aws.conftest import POLICY_DIR
from tests.aws.test_store import WID, rec, store

__all__ = ["store"]  # the fixture (both stores), used by name


def write_mark(store: Store, wid: str, on: bool) -> None:
    """The record's own ``op_quarantined`` written directly, as a role that may update records
    could (or as a deployment from before the quarantine was kept apart wrote it)."""
    if isinstance(store, DynamoStore):
        store.inventory.update_item(
            Key={"id": wid}, UpdateExpression="SET op_quarantined = :q", ExpressionAttributeValues={":q": on}
        )
    else:
        assert isinstance(store, SqliteStore)
        store._db().execute("UPDATE inventory SET op_quarantined = ? WHERE id = ?", (int(on), wid))


def quarantined(store: Store, wid: str = WID) -> set[bool]:
    """The quarantine as every read gives it (one answer expected)."""
    one = store.get(wid)
    many = store.get_many([wid, "i-other"])[wid]
    listed = next(r for r in store.all_records() if r.id == wid)
    assert one is not None
    return {one.op_quarantined, many.op_quarantined, listed.op_quarantined}


def test_writing_the_records_mark_false_does_not_release_a_quarantine(store: Store) -> None:
    store.observe(rec(1, "prod"))
    store.observe(rec(1, "prod", wid="i-other"))
    gen = store.inventory_generation()
    store.set_operator(WID, quarantined=True)
    assert quarantined(store) == {True}
    assert not store.get("i-other").op_quarantined  # type: ignore[union-attr]
    assert gen is None or store.inventory_generation() != gen
    write_mark(store, WID, False)
    assert quarantined(store) == {True}
    store.observe(rec(2, "dev"), previous=store.get(WID))  # an observation keeps it too
    assert quarantined(store) == {True}

    gen = store.inventory_generation()
    store.set_operator(WID, quarantined=False)
    assert quarantined(store) == {False}
    assert gen is None or store.inventory_generation() != gen
    store.set_operator(WID, quarantined=True)
    store.set_operator(WID, mode=None)  # a mode change leaves the quarantine
    assert quarantined(store) == {True}


def test_a_record_quarantined_by_its_mark_before_the_upgrade_stays_so_until_released(store: Store) -> None:
    store.observe(rec(1, "prod"))
    write_mark(store, WID, True)
    assert quarantined(store) == {True}
    store.set_operator(WID, quarantined=False)  # clears the mark too
    assert quarantined(store) == {False}


def test_an_unknown_workload_is_neither_quarantined_nor_released(store: Store) -> None:
    for on in (True, False):
        with pytest.raises(KeyError):
            store.set_operator("i-unknown", quarantined=on)
    store.observe(rec(1, "prod", wid="i-unknown"))
    assert not store.get("i-unknown").op_quarantined  # type: ignore[union-attr]


def test_many_records_are_read_with_their_quarantines(store: Store) -> None:
    """More workloads than one BatchGetItem holds with their quarantine items (DynamoStore reads
    the quarantines apart then)."""
    ids = [f"i-{n:017x}" for n in range(120)]
    store.observe_many([rec(1, "prod", wid=w) for w in ids])
    store.set_operator(ids[7], quarantined=True)
    store.set_operator(ids[99], quarantined=True)
    got = store.get_many(ids)
    assert {w for w, r in got.items() if r.op_quarantined} == {ids[7], ids[99]}
    few = store.get_many(ids[:10])
    assert {w for w, r in few.items() if r.op_quarantined} == {ids[7]}


ALIAS = "i-0forgedalias0000"


def write_alias(store: Store, of: str, key: str = ALIAS) -> None:
    """A record under ``key`` holding ``of``'s own workload document, one observation newer: what
    a role that may write any key's cloud fields (a new key too) can store."""
    if isinstance(store, DynamoStore):
        item = store.inventory.get_item(Key={"id": of}, ConsistentRead=True)["Item"]
        store.inventory.update_item(
            Key={"id": key},
            UpdateExpression="SET workload = :w, #st = :s, observed_at = :t, labels = :l, problems = :p",
            ExpressionAttributeNames={"#st": "state"},
            ExpressionAttributeValues={
                ":w": item["workload"],
                ":s": "running",
                ":t": item["observed_at"] + 1,
                ":l": item.get("labels", "{}"),
                ":p": "[]",
            },
        )
    else:
        assert isinstance(store, SqliteStore)
        store._db().execute(
            "INSERT INTO inventory (id, workload, state, observed_at, labels, problems) "
            "SELECT ?, workload, 'running', observed_at + 1, labels, '[]' FROM inventory WHERE id = ?",
            (key, of),
        )


def test_a_record_under_another_workloads_key_is_left_out_of_every_read(store: Store) -> None:
    """The quarantine and the operator's mode are looked up by a record's key, the engine keys a
    workload by the id in its document: a record under another key holding a quarantined
    workload's document would have it compiled unquarantined (and two copies of one workload
    stopped every rebuild). Every read leaves it out, logged and counted; the engine compiles the
    workload once, quarantined. A correct observation of that key replaces it."""
    counted: list[tuple[str, float]] = []
    store.metric = lambda name, value: counted.append((name, value))
    store.observe(rec(1, "prod"))
    store.observe(rec(1, "prod", wid="i-other"))
    store.set_operator(WID, quarantined=True, mode=Mode.ENFORCE)
    write_alias(store, WID)

    assert store.get(ALIAS) is None
    assert ALIAS not in store.get_many([ALIAS, WID, "i-other"])
    assert set(store.get_many([f"i-{n:017x}" for n in range(60)] + [ALIAS, WID])) == {WID}  # the read apart
    records = store.all_records()
    assert sorted(r.id for r in records) == sorted([WID, "i-other"])
    assert quarantined(store) == {True}
    assert counted and {name for name, _ in counted} == {"InventoryRecordsMismatched"}

    engine = Engine(load_policy(POLICY_DIR))
    engine.load(r.effective() for r in records if r.active)
    assert engine.workloads[WID].quarantined and not engine.duplicates

    # the key's own observation (its instance seen) takes the key back
    store.observe(rec(5, "prod", wid=ALIAS))
    again = store.get(ALIAS)
    assert again is not None and again.workload.id == ALIAS and not again.op_quarantined
    assert quarantined(store) == {True}


def test_no_writer_stores_a_record_under_another_workloads_key(store: Store) -> None:
    w = rec(1, "prod").workload
    with pytest.raises(ValueError, match="holds workload"):
        store.observe(InventoryRecord(id=ALIAS, workload=w, observed_at=1))
    assert store.get(ALIAS) is None and store.get(WID) is None
