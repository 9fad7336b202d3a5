"""The workloads owed to compute (Store.owe_compute, owed_compute, settle_owed), held to the same
behaviour on DynamoStore (moto server) and SqliteStore: a mark of any age is read back, a drain
deletes only the marks it read, and a mark written again after the read survives the drain."""

from __future__ import annotations

from ringfence.store.base import OwedMark, Store, owed_key

from .test_store import store

__all__ = ["store"]  # the parametrized fixture, used by name


def test_marks_are_read_back_with_their_lane_and_deleted_by_the_drain_that_read_them(store: Store) -> None:
    assert store.owed_compute() == []
    store.owe_compute(["i-b", "i-a"])
    store.owe_compute(["i-c"], urgent=True)
    marks = store.owed_compute()
    assert sorted((m.workload_id, m.urgent) for m in marks) == [("i-a", False), ("i-b", False), ("i-c", True)]
    assert len({m.nonce for m in marks}) == 3
    assert sorted(store.settle_owed(marks)) == ["i-a", "i-b", "i-c"]
    assert store.owed_compute() == []
    assert store.settle_owed(marks) == [], "a mark deleted once is not there to delete again"


def test_a_mark_written_again_after_the_drain_read_it_survives_the_drain(store: Store) -> None:
    """A newer hand-off's failure marks the workload again between the drain's read and its delete
    (its enqueue of the older state may have left compute before the newer change was stored):
    the drain deletes the marks it read and leaves that one for the next pass."""
    store.owe_compute(["i-a", "i-b"])
    read = store.owed_compute()
    store.owe_compute(["i-b"])  # the newer failure
    assert store.settle_owed(read) == ["i-a"]
    left = store.owed_compute()
    assert [m.workload_id for m in left] == ["i-b"]
    assert left[0].nonce != next(m.nonce for m in read if m.workload_id == "i-b")
    assert store.settle_owed(left) == ["i-b"] and store.owed_compute() == []


def test_an_urgent_mark_stays_urgent_when_an_ordinary_failure_marks_it_again(store: Store) -> None:
    store.owe_compute(["i-a"], urgent=True)
    store.owe_compute(["i-a"])
    assert [(m.workload_id, m.urgent) for m in store.owed_compute()] == [("i-a", True)]
    store.owe_compute(["i-b"])
    store.owe_compute(["i-b"], urgent=True)
    assert sorted((m.workload_id, m.urgent) for m in store.owed_compute()) == [("i-a", True), ("i-b", True)]


def test_a_forged_nonce_deletes_nothing(store: Store) -> None:
    store.owe_compute(["i-a"])
    assert store.settle_owed([OwedMark("i-a", False, "not-its-nonce")]) == []
    assert [m.workload_id for m in store.owed_compute()] == ["i-a"]


def test_a_drain_reads_at_most_its_limit_of_marks_in_key_order(store: Store) -> None:
    """hand_on_owed reads OWED_SCAN_LIMIT marks a pass (the rest are the next pass's): a partition
    grown by a flood of marks is read a bounded part at a time, each part handed on and deleted;
    in owed_key order (a slot hashed from the id), on both stores."""
    ids = ["i-d", "i-b", "i-a", "i-c"]
    store.owe_compute(ids[:3])
    store.owe_compute(ids[3:], urgent=True)
    order = sorted(ids, key=owed_key)
    first = store.owed_compute(limit=2)
    assert [m.workload_id for m in first] == order[:2]
    assert store.settle_owed(first) == order[:2]
    assert [m.workload_id for m in store.owed_compute(limit=2)] == order[2:]
    assert len(store.owed_compute(limit=10)) == 2 and len(store.owed_compute()) == 2


def test_a_drain_reads_from_its_start_round_to_the_marks_before_it(store: Store) -> None:
    """hand_on_owed reads from a random slot round to the partition's beginning: marks whose
    keys sort first cannot keep the rest unread pass after pass; both stores alike."""
    ids = ["i-d", "i-b", "i-a", "i-c"]
    store.owe_compute(ids)
    keys = sorted(owed_key(i) for i in ids)
    order = [k.partition("#")[2] for k in keys]
    assert [m.workload_id for m in store.owed_compute(limit=3, start=keys[2])] == [*order[2:], order[0]]
    mid = keys[1] + "0"  # between the second key and the third
    assert [m.workload_id for m in store.owed_compute(start=mid)] == [*order[2:], *order[:2]]
    assert [m.workload_id for m in store.owed_compute(start="g")] == order  # past every slot
