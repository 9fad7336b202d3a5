"""The pending bundle mark on the SQLite store (``ringfence serve``), and the window it closes on
the in-process path: compute moves set heads, then publishes the rebuilt bundles itself. The
DynamoDB side: tests/aws/test_publish_pending.py."""

from __future__ import annotations

import json
import threading
from pathlib import Path
from typing import Any

from ringfence.control.agents import AgentApi
from ringfence.store.base import BundlePointer
from ringfence.store.sqlite import SqliteStore
from tests.onprem.conftest import boot, signing_key_file


def check_pending_mark(store: Any) -> None:
    """What every store does with the mark (shared with the DynamoDB test)."""
    assert store.bundle_pointer("w-1") is None
    store.mark_bundle_pending("w-1", 5)
    assert store.bundle_pointer("w-1") is None  # a mark alone is no pointer
    assert store.bundle_pointers(["w-1"]) == {}

    def ptr(version: int) -> BundlePointer:
        return BundlePointer(
            workload_id="w-1", version=version, key=f"k{version}", etag=f'"{version}"', rules_revision=1
        )

    assert store.put_bundle_pointer(ptr(3))  # an older job lands first: pointed at, the mark stays
    got = store.bundle_pointer("w-1")
    assert (got.version, got.pending, got.in_flight) == (3, 5, 5)
    assert "pending" not in got.model_dump_json()  # the mark is not part of the pointer's doc
    store.mark_bundle_pending("w-1", 4)  # never lowered
    assert store.bundle_pointers(["w-1"])["w-1"].pending == 5
    assert store.put_bundle_pointer(ptr(5))  # the marked job lands: satisfied
    got = store.bundle_pointer("w-1")
    assert (got.version, got.in_flight) == (5, None)
    assert not store.put_bundle_pointer(ptr(4))  # never backwards, as before
    store.mark_bundle_pending("w-1", 7)
    assert store.bundle_pointer("w-1").in_flight == 7


def test_the_sqlite_store_keeps_the_pending_mark_beside_the_pointer(tmp_path: Path) -> None:
    check_pending_mark(SqliteStore(tmp_path / "state.db"))


def test_serve_answers_no_delta_past_a_bundle_compute_has_not_published_yet(tmp_path: Path) -> None:
    """One batch quarantines the db and adds a peer to a set the db holds. Compute moves the set
    head, then publishes the db's bundle itself: an agent asking in between was served the delta
    to the new version (and then refused the quarantine bundle at that same version as a replay).
    Every answer given while the head had moved and the pointer had not must stay below it."""
    from ringfence.local.wiring import LocalWiring

    w = LocalWiring(tmp_path / "state" / "state.db", signing_key=signing_key_file(tmp_path))
    try:
        admin = boot(w)
        w.worker.stop()  # compute runs here, in this test, from now on
        api = AgentApi(w)
        db = "dc1-db-1"
        held = w.store.bundle_pointer(db).version
        spec = {
            "id": "dc1-proc-2",
            "ips": ["192.168.10.22"],
            "tags": {
                "ringfence:role": "processing",
                "ringfence:app": "ordering",
                "ringfence:env": "prod",
                "ringfence:loc": "ca",
            },
        }
        assert admin.register_workload("alice", spec).status == 201
        w.store.set_operator(db, quarantined=True)
        seen: list[tuple[int, list[int]]] = []
        lock = threading.Lock()
        real = w.store.put_set_head

        def watched(name: str, version: int, digest: str | None = None) -> None:
            real(name, version, digest)
            got = api.deltas(db, held)  # an agent's request right after the head moved
            tos = [d["to_version"] for d in json.loads(got.body)["deltas"]] if got.status == 200 else []
            with lock:
                seen.append((w.store.bundle_pointer(db).version, tos))

        w.store.put_set_head = watched  # type: ignore[method-assign]
        w.compute.run([{"ids": [db, "dc1-proc-2"]}])
        ptr = w.store.bundle_pointer(db)
        assert seen  # a set the db holds moved
        for pointed, tos in seen:
            if pointed < ptr.version:  # the db's new bundle not published yet
                assert all(t < ptr.version for t in tos), (seen, ptr.version)
        assert json.loads(api.bundle(db, None).body)["quarantined"]
    finally:
        w.close()
