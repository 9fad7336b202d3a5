"""On-premise ids on AWS: an id or a path with a trailing newline names no workload (the real
admin and agent-API functions over the moto server)."""

from __future__ import annotations

from typing import Any

from tests.aws.conftest import Env
from tests.aws.test_attack_enroll import audits
from tests.aws.test_onprem_hybrid import DB, OTTO, hybrid, register  # noqa: F401


def test_attack_an_id_with_a_trailing_newline_names_no_workload_on_aws(
    hybrid: tuple[Env, dict[str, Any]],  # noqa: F811
) -> None:
    """``$`` matches before a trailing newline: ``dc1-db-1\\n`` was registered beside dc1-db-1,
    ``import\\n`` passed the reserved-id check, and ``DELETE /admin/workloads/dc1-db-1\\n`` was
    routed as dc1-db-1's deregistration (the route's pattern ended in ``$``). Refused now (422),
    and such a path is no route's (404) on both APIs. (A CMDB cell is stripped: its newline goes.)"""
    env, _ = hybrid
    assert register(env, DB)[0] == 201
    for wid in ("dc1-db-1\n", "import\n", "i-0123456789abcdef0\n"):
        status, answer = register(env, {**DB, "id": wid, "ips": ["192.168.10.6"]})
        assert status == 422 and "workload id" in answer["detail"], (wid, answer)
    for method, path, body in (
        ("DELETE", "/admin/workloads/dc1-db-1\n", {"reason": "x"}),
        ("PUT", "/admin/workloads/dc1-db-1/mode\n", {"mode": "idle", "reason": "x"}),
        ("POST", "/admin/workloads/dc1-db-1\n/quarantine", {"reason": "x"}),
    ):
        status, _, answer = env.rest("admin", method, path, body, principal=OTTO)
        assert status == 404, (path, status, answer)
    rec = env.store.get("dc1-db-1")
    assert rec is not None and rec.state == "running" and rec.op_mode is None
    assert sorted(r.id for r in env.store.all_records() if r.workload.cloud == "onprem") == ["dc1-db-1"]
    assert not audits(env, "workload.deregister", "dc1-db-1")
    status, _, _ = env.rest("agentapi", "GET", "/v1/agents/dc1-db-1/bundle\n")
    assert status == 404
