"""The store contract for quarantines, DynamoStore (moto server) and SqliteStore alike: a
quarantine is kept apart from the inventory record (set_operator), a record reads quarantined
while it is kept or the record's own mark says so, and only a release (set_operator False) ends
it. Writing the record, as code in an event-fed role can, releases nothing."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest

from ringfence.store.base import Store
from ringfence.store.dynamodb import DynamoStore
from ringfence.store.sqlite import SqliteStore
from tests.aws.test_store import WID, make_dynamo, rec


@pytest.fixture(params=["dynamodb", "sqlite"])
def store(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[Store]:
    if request.param == "dynamodb":
        yield make_dynamo(request.getfixturevalue("moto_url"))
    else:
        st = SqliteStore(tmp_path / "state.db")
        yield st
        assert st.integrity_check() == "ok"
        st.close()


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
