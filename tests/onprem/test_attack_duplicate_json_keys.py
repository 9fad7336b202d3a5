"""Over the real ``ringfence serve`` (the admin and agent API routes, the Lambda functions' code):
a JSON body that gives a key twice in one object is refused (422 naming the key). Before,
``json.loads`` kept the last: ``{"mode": "enforce", "reason": "CHG-1", "mode": "idle"}`` set the
workload idle, and a registration of ``new-host-7`` with a second ``id`` re-registered
``dc1-db-1`` without its tags, while the first value is what a reviewer or a log read."""

from __future__ import annotations

import json

import httpx

from ringfence.adminroles import RoleBindings
from ringfence.local.wiring import LocalWiring
from ringfence.model import Mode
from ringfence.routes.admin import admin_routes, iam_roles
from tests.aws.conftest import LambdaContext, rest_answer, rest_event
from tests.onprem.conftest import Served, boot


def raw(served: Served, who: str, method: str, path: str, body: str, token: str | None = None) -> httpx.Response:
    headers = {"Authorization": f"Bearer {token or served.tokens[who]}", "Content-Type": "application/json"}
    return httpx.request(method, served.url + path, content=body, headers=headers, timeout=60)


def test_attack_duplicate_json_keys_are_refused(served: Served) -> None:
    store = served.wiring.store
    r = raw(
        served,
        "paula",
        "PUT",
        "/admin/workloads/dc1-web-1/mode",
        '{"mode": "enforce", "reason": "CHG-1", "mode": "idle"}',
    )
    assert r.status_code == 422, r.text
    assert r.json()["detail"] == "body: duplicate key 'mode'"
    rec = store.get("dc1-web-1")
    assert rec is not None and rec.op_mode is not Mode.IDLE

    tags_before = store.get("dc1-db-1").workload.tags  # type: ignore[union-attr]
    body = '{"id": "new-host-7", "ips": ["192.168.10.91"], "reason": "new box", "id": "dc1-db-1"}'
    r = raw(served, "otto", "POST", "/admin/workloads", body)
    assert r.status_code == 422 and "duplicate key 'id'" in r.json()["detail"], r.text
    assert store.get("dc1-db-1").workload.tags == tags_before  # type: ignore[union-attr]
    assert store.get("new-host-7") is None

    # at any depth: a tag given twice
    body = '{"id": "new-host-8", "ips": ["192.168.10.92"], "tags": {"ringfence:env": "dev", "ringfence:env": "prod"}}'
    r = raw(served, "otto", "POST", "/admin/workloads", body)
    assert r.status_code == 422 and r.json()["detail"] == "body: duplicate key 'ringfence:env'", r.text
    assert store.get("new-host-8") is None


def test_attack_duplicate_json_keys_refused_after_the_role_check(served: Served) -> None:
    """A caller without the route's role still gets the audited 403, not a 422 about the body."""
    before = len(served.audit("admin.denied"))
    r = raw(served, "rita", "PUT", "/admin/workloads/dc1-web-1/mode", '{"mode": "enforce", "mode": "idle"}')
    assert r.status_code == 403, r.text
    assert len(served.audit("admin.denied")) == before + 1


def test_attack_duplicate_json_keys_refused_by_the_agent_api(served: Served) -> None:
    """The agent API's routes parse bodies with the same resolver: a duplicate key is a 422 there
    too (answered before the bearer token is looked at, as any body that does not validate)."""
    r = raw(
        served,
        "rita",
        "POST",
        "/v1/enroll",
        '{"workload_id": "dc1-web-1", "method": "pairing", "workload_id": "dc1-db-1"}',
        token="not-a-token",
    )
    assert r.status_code == 422 and "duplicate key 'workload_id'" in r.json()["detail"], r.text


def test_attack_duplicate_json_keys_are_refused_by_the_lambda_admin_routes(wiring: LocalWiring) -> None:
    """The AWS admin function's route code (IAM role bindings), over the same resolver."""
    svc = boot(wiring)
    arn = "arn:aws:iam::123456789012:role/PolicyAuthor"
    app = admin_routes(
        lambda: svc,
        onprem=lambda: svc,
        roles_of=iam_roles(RoleBindings.from_json(json.dumps({arn: ["policy-author"]}))),
    )
    body = '{"mode": "enforce", "reason": "CHG-1", "mode": "idle"}'
    ev = rest_event("PUT", "/admin/workloads/dc1-web-1/mode", body, principal=arn)
    status, _, answer = rest_answer(app.resolve(ev, LambdaContext()))
    assert status == 422 and answer["detail"] == "body: duplicate key 'mode'", answer
    rec = wiring.store.get("dc1-web-1")
    assert rec is not None and rec.op_mode is not Mode.IDLE
