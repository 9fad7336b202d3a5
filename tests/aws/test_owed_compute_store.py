"""The workloads owed to compute (Store.owe_compute, owed_compute, settle_owed), held to the same
behaviour on DynamoStore (moto server) and SqliteStore: a mark of any age is read back, a drain
deletes only the marks it read, and a mark written again after the read survives the drain."""

from __future__ import annotations

import sqlite3
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import pytest

from ringfence.control import wiring
from ringfence.control.wiring import no_metric
from ringfence.store.base import OwedMark, Store, owed_key
from ringfence.store.sqlite import SCHEMA_VERSION, SqliteStore

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


def _sqlite_drain(store: SqliteStore) -> tuple[Any, list[str], list[int]]:
    """A wiring over ``store`` whose compute takes every hand-off; the ids handed on, and the
    number of marks each of the store's reads returned."""
    sent: list[str] = []
    reads: list[int] = []
    read = store.owed_compute

    def counted(limit: int | None = None, start: str = "") -> list[OwedMark]:
        marks = read(limit=limit, start=start)
        reads.append(len(marks))
        return marks

    store.owed_compute = counted  # type: ignore[method-assign]
    w = SimpleNamespace(store=store, enqueue_compute=lambda ids, urgent=False: sent.extend(ids), metric=no_metric)
    return w, sent, reads


def test_a_sqlite_table_larger_than_a_pass_reads_is_drained_over_several_passes(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The drain's bounds scaled down (a pass reads 20 marks, hands 7 on; on AWS and on premise
    50,000 and 5,000): 200 marks, 30 urgent, are read a bounded part a pass from a random point
    of the key order, and every one is handed on exactly once, 7 a pass: ceil(200 / 7) passes."""
    monkeypatch.setattr(wiring, "OWED_SCAN_LIMIT", 20)
    monkeypatch.setattr(wiring, "OWED_READ_LIMIT", 7)
    store = SqliteStore(tmp_path / "s.db")
    try:
        ids = [f"i-{n:017x}" for n in range(200)]
        store.owe_compute(ids[30:])
        store.owe_compute(ids[:30], urgent=True)
        w, sent, reads = _sqlite_drain(store)
        passes = 0
        while store.owed_compute():
            reads.clear()
            before = len(sent)
            wiring.hand_on_owed(w, "test")
            passes += 1
            assert reads == [min(20, 200 - before)], "each pass reads at most its bound"
            assert len(sent) - before == min(7, 200 - before)
            assert passes <= 29
        assert passes == 29
        assert sorted(sent) == ids, "every mark handed on, none twice"
        assert store.integrity_check() == "ok"
    finally:
        store.close()


def _steps(store: SqliteStore, limit: int) -> int:
    """The SQLite VM steps one bounded read of the owed marks takes (from a start past every slot:
    the read round from the beginning)."""
    db = store._db()
    steps = [0]

    def count() -> int:
        steps[0] += 1
        return 0

    db.set_progress_handler(count, 1)
    try:
        assert len(store.owed_compute(limit=limit, start="g")) == limit
    finally:
        db.set_progress_handler(None, 1)
    return steps[0]


def test_a_bounded_sqlite_read_costs_the_same_whatever_the_table_holds(tmp_path: Path) -> None:
    """A pass reads its bound of marks through the key's index, not the whole table: the same
    20-mark read costs alike over 100 marks and over 5,000. Before, SQLite read every row and
    sorted the table in Python at each pass (the 5,000's read took ~50 times the 100's)."""
    small, large = SqliteStore(tmp_path / "small.db"), SqliteStore(tmp_path / "large.db")
    try:
        small.owe_compute([f"i-{n:017x}" for n in range(100)])
        large.owe_compute([f"i-{n:017x}" for n in range(5000)])
        cost_small, cost_large = _steps(small, 20), _steps(large, 20)
        assert cost_large < 2 * cost_small, (cost_small, cost_large)
    finally:
        small.close()
        large.close()


@pytest.mark.parametrize("table", [True, False])
def test_a_version_5_sqlite_file_gains_the_key_its_marks_are_read_in(tmp_path: Path, table: bool) -> None:
    """A file of the previous schema (5: marks without their key, or no owed_compute table yet)
    is migrated when opened: its marks are read in key order from any start, as marks written
    since, and an earlier release refuses the file from then on (schema 6)."""
    path = tmp_path / "old.db"
    SqliteStore(path).close()
    db = sqlite3.connect(path)
    rows = "INSERT INTO owed_compute VALUES ('i-a', 0, 'n1'), ('i-b', 1, 'n2'), ('i-c', 0, 'n3');"
    db.executescript(
        "BEGIN; DROP TABLE owed_compute;"
        + (
            " CREATE TABLE owed_compute (workload_id TEXT PRIMARY KEY, urgent INTEGER NOT NULL, nonce TEXT NOT NULL);"
            + rows
            if table
            else ""
        )
        + " PRAGMA user_version = 5; COMMIT;"
    )
    db.close()
    st = SqliteStore(path)
    try:
        assert st._db().execute("PRAGMA user_version").fetchone()[0] == SCHEMA_VERSION == 6
        st.owe_compute(["i-d"])
        ids = ["i-a", "i-b", "i-c", "i-d"] if table else ["i-d"]
        order = sorted(ids, key=owed_key)
        assert [m.workload_id for m in st.owed_compute()] == order
        for n, wid in enumerate(order):
            got = [m.workload_id for m in st.owed_compute(limit=len(ids), start=owed_key(wid))]
            assert got == order[n:] + order[:n], wid
        if table:
            assert {m.workload_id: (m.urgent, m.nonce) for m in st.owed_compute()}["i-b"] == (True, "n2")
        assert st.integrity_check() == "ok"
    finally:
        st.close()


# ids no writer of ringfence makes, written by hand: no text at all, or text that is no UTF-8
NO_TEXT_IDS = "(NULL, 1, 'n2'), (x'00ff', 0, 'n3'), (CAST(x'ff' AS TEXT), 0, 'n4')"


def _drain(st: SqliteStore) -> tuple[list[str], dict[str, float]]:
    sent: list[str] = []
    counted: dict[str, float] = {}

    def metric(name: str, value: float) -> None:
        counted[name] = counted.get(name, 0) + value

    w = SimpleNamespace(store=st, enqueue_compute=lambda ids, urgent=False: sent.extend(ids), metric=metric)
    wiring.hand_on_owed(w, "test")  # type: ignore[arg-type]
    return sent, counted


def _ids_left(path: Path) -> list[Any]:
    db = sqlite3.connect(path)
    try:
        return [r[0] for r in db.execute("SELECT CAST(workload_id AS BLOB) FROM owed_compute ORDER BY rowid")]
    finally:
        db.close()


def test_a_version_5_file_with_marks_whose_id_is_no_text_opens_and_the_drain_deletes_them(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """Marks written by hand in a file of the previous schema with a NULL, BLOB or non-UTF-8 id
    (the table's TEXT PRIMARY KEY lets SQLite keep them) stop neither the migration (it keyed
    each id, and failed on these) nor the drain: it reads them as naming no workload, deletes them
    unsent and counts them OwedMarksMalformed, and hands the real mark beside them on."""
    path = tmp_path / "old.db"
    SqliteStore(path).close()
    db = sqlite3.connect(path)
    db.executescript(
        "BEGIN; DROP TABLE owed_compute;"
        " CREATE TABLE owed_compute (workload_id TEXT PRIMARY KEY, urgent INTEGER NOT NULL, nonce TEXT NOT NULL);"
        f" INSERT INTO owed_compute VALUES ('i-a', 0, 'n1'), {NO_TEXT_IDS}; PRAGMA user_version = 5; COMMIT;"
    )
    db.close()
    st = SqliteStore(path)
    try:
        assert st._db().execute("PRAGMA user_version").fetchone()[0] == SCHEMA_VERSION
        marks = st.owed_compute()
        assert sorted(m.workload_id for m in marks) == ["<blob 00FF>", "<null>", "<text FF>", "i-a"]
        with caplog.at_level("WARNING", logger="ringfence"):
            sent, counted = _drain(st)
        assert sent == ["i-a"]
        assert counted == {wiring.OWED_MARKS_MALFORMED: 3}
        assert "test: 3 owed marks name no workload (deleted unsent)" in caplog.text
        assert _ids_left(path) == []
        assert st.integrity_check() == "ok"
    finally:
        st.close()


def test_a_mark_whose_id_is_no_text_written_by_hand_is_deleted_by_the_drain_and_only_it(tmp_path: Path) -> None:
    """On this release's schema: the drain deletes such marks (each by its row, only while it
    still holds what was read: a row given a real id meanwhile stays) and counts them."""
    path = tmp_path / "s.db"
    st = SqliteStore(path)
    try:
        st.owe_compute(["i-a"])
        db = sqlite3.connect(path)
        db.executescript(f"INSERT INTO owed_compute (workload_id, urgent, nonce) VALUES {NO_TEXT_IDS};")
        db.close()
        marks = [m for m in st.owed_compute() if m.workload_id != "i-a"]
        assert len(marks) == 3 and all(m.key for m in marks)
        db = sqlite3.connect(path)
        db.execute("UPDATE owed_compute SET workload_id = 'i-b' WHERE workload_id IS NULL")
        db.commit()
        db.close()
        assert sorted(st.settle_owed(marks)) == ["<blob 00FF>", "<text FF>"]
        assert sorted(_ids_left(path)) == [b"i-a", b"i-b"]
        db = sqlite3.connect(path)
        db.execute("INSERT INTO owed_compute (workload_id, urgent, nonce) VALUES (NULL, 1, 'n5')")
        db.commit()
        db.close()
        sent, counted = _drain(st)
        assert sorted(sent) == ["i-a", "i-b"]
        assert counted == {wiring.OWED_MARKS_MALFORMED: 1}
        assert _ids_left(path) == []
    finally:
        st.close()
