"""The store's part in governance by the time of each write: a record's known writes are kept
(DynamoDB and SQLite alike), a decision is written only over exactly the record it was read
from, and a version-3 SQLite file gains the column."""

from __future__ import annotations

from pathlib import Path

import pytest

from ringfence.governance import LabelWrite
from ringfence.store.base import GovernanceMoved, InventoryRecord, Store
from ringfence.store.sqlite import SCHEMA_VERSION, SqliteStore
from tests.aws.test_store import WID, rec, store  # noqa: F401  (the store fixture, both stores)

WRITES = {"role": LabelWrite(at=12.5, value="jumpbox", by="tagger")}


def _decided(t: float, base: InventoryRecord | None, writes: dict[str, LabelWrite] | None) -> InventoryRecord:
    return rec(t, "prod").model_copy(
        update={"governed_rev": base.governed_rev if base is not None else 0, "label_writes": writes}
    )


def test_known_writes_are_stored_and_move_the_version(store: Store) -> None:  # noqa: F811
    store.observe(rec(1.0, "prod"), previous=None)
    read = store.get(WID)
    assert read is not None and read.label_writes is None
    store.observe(_decided(2.0, read, WRITES), previous=read)
    got = store.get(WID)
    assert got is not None and got.label_writes == WRITES and got.governed_rev == read.governed_rev + 1
    # a decision made from the record before them is refused: it would drop them
    with pytest.raises(GovernanceMoved):
        store.observe(_decided(3.0, read, {}), previous=read)


def test_a_decision_is_written_only_over_the_observation_it_was_read_from(store: Store) -> None:  # noqa: F811
    """Two observations decided from the same read (two ingest invocations, a reconcile pass): the
    second is refused even when the first changed no held labels, grants or writes, and decided
    again from what the first stored."""
    store.observe(rec(1.0, "prod"), previous=None)
    read = store.get(WID)
    assert read is not None
    store.observe(_decided(2.0, read, None), previous=read)
    with pytest.raises(GovernanceMoved):
        store.observe(_decided(3.0, read, None), previous=read)
    again = store.get(WID)
    assert again is not None and again.observed_at == 2.0
    assert store.observe(_decided(3.0, again, None), previous=again) is False  # same cloud view
    assert store.get(WID).observed_at == 3.0  # type: ignore[union-attr]
    # a caller that read nothing stored: refused over a stored record; an older one is dropped
    with pytest.raises(GovernanceMoved):
        store.observe(_decided(4.0, None, None), previous=None)
    assert store.observe(_decided(0.5, None, None), previous=None) is False


def test_a_version_3_sqlite_file_gains_the_label_writes(tmp_path: Path) -> None:
    import sqlite3

    path = tmp_path / "v3.db"
    st = SqliteStore(path)
    st.observe(rec(1.0, "prod"))
    st.close()
    db = sqlite3.connect(path)
    db.executescript("BEGIN; ALTER TABLE inventory DROP COLUMN label_writes; PRAGMA user_version = 3; COMMIT;")
    db.close()
    st = SqliteStore(path)
    try:
        got = st.get(WID)
        assert got is not None and got.label_writes is None and got.workload.tags == {"ringfence:env": "prod"}
        st.observe(_decided(2.0, got, WRITES), previous=got)
        assert st.get(WID).label_writes == WRITES  # type: ignore[union-attr]
        assert st._db().execute("PRAGMA user_version").fetchone()[0] == SCHEMA_VERSION
        assert st.integrity_check() == "ok"
    finally:
        st.close()
