"""Under ``ringfence serve`` over SQLite (the real HTTP server, the library's routes, LocalWiring):
an id or a path with a trailing newline names no workload."""

from __future__ import annotations

from tests.onprem.conftest import ESTATE, Served

DB = ESTATE[2]


def test_attack_a_trailing_newline_names_no_workload_under_serve(served: Served) -> None:
    """``$`` matches before a trailing newline: ``dc1-db-1\\n`` registered as a second workload
    beside dc1-db-1, and ``DELETE /admin/workloads/dc1-db-1%0A`` (the server decodes the path)
    deregistered dc1-db-1, the OTHER workload. Refused now: the id (422), the paths (404), on
    the admin and the agent API."""
    store = served.wiring.store
    for wid in ("dc1-db-1\n", "import\n", "i-0123456789abcdef0\n"):
        r = served.call("otto", "POST", "/admin/workloads", {**DB, "id": wid, "ips": ["192.168.10.99"]})
        assert r.status_code == 422 and "workload id" in r.json()["detail"], (wid, r.text)
    for method, path, body in (
        ("DELETE", "/admin/workloads/dc1-db-1%0A", {"reason": "x"}),
        ("PUT", "/admin/workloads/dc1-db-1/mode%0A", {"mode": "idle", "reason": "x"}),
        ("DELETE", "/admin/workloads/dc1-db-1/agent-key%0A", {"reason": "x"}),
    ):
        who = "otto" if method == "DELETE" and path.count("/") == 3 else "pat"
        r = served.call(who, method, path, body)
        assert r.status_code == 404, (path, r.status_code, r.text)
    rec = store.get("dc1-db-1")
    assert rec is not None and rec.state == "running" and rec.op_mode is None
    assert sorted(r.id for r in store.all_records()) == sorted(w["id"] for w in ESTATE)
    assert not served.audit("workload.deregister")
    r = served.call("otto", "GET", "/v1/agents/dc1-db-1/bundle%0A")
    assert r.status_code == 404, r.text
