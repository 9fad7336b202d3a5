"""Under ``ringfence serve`` over SQLite (the real HTTP server, the library's routes, LocalWiring):
a cloud instance's address is held while it is stopped."""

from __future__ import annotations

import time

from ringfence.model import Workload
from ringfence.store.base import InventoryRecord
from tests.onprem.conftest import Served


def test_attack_onboarding_cannot_take_a_stopped_instances_address_over_sqlite(served: Served) -> None:
    """A cloud instance's record (as ingest writes it) keeps its address while stopped: SQLite
    checks it in the write as the admin's read does (409), and a CMDB row is refused (400)."""
    store = served.wiring.store
    stopped = InventoryRecord(
        id="i-0aaaaaaaaaaaaaaa1",
        workload=Workload(id="i-0aaaaaaaaaaaaaaa1", ips=["10.9.0.5"], cloud="aws"),
        state="stopped",
        observed_at=time.time(),
    )
    store.observe(stopped)
    r = served.call("otto", "POST", "/admin/workloads", {"id": "dc9-web-1", "ips": ["10.9.0.5"]})
    assert r.status_code == 409 and "10.9.0.5 is held by workload i-0aaaaaaaaaaaaaaa1" in r.json()["detail"], r.text
    r = served.call("otto", "POST", "/admin/workloads/import", {"csv": "id,ips\ndc9-web-2,10.9.0.5\n", "reason": "x"})
    assert r.status_code == 400 and "cmdb.csv:2:" in r.json()["detail"], r.text
    assert store.get("dc9-web-1") is None and store.get("dc9-web-2") is None
    # terminated, it holds nothing: the address is free
    store.observe(stopped.model_copy(update={"state": "terminated", "observed_at": time.time() + 1}))
    r = served.call("otto", "POST", "/admin/workloads", {"id": "dc9-web-1", "ips": ["10.9.0.5"]})
    assert r.status_code == 201, r.text
