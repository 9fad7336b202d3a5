"""Issue 10, control plane: admin API authorization per route, the API's resource policy, and
the actions that lower a safeguard (idle, release, fail-safes widened) audited and alarmed.

Against the real admin function (moto server behind it) with API Gateway's IAM caller in the
event, and against ``ringfence serve`` over HTTP with role-carrying admin tokens."""

from __future__ import annotations

import json
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest

from ringfence import serve
from ringfence.adminroles import ACTIONS, AdminRole, RoleBindings, principal_key
from tests.aws.conftest import Env
from tests.aws.test_handler_metrics import emitted
from tests.aws.test_pipeline import boot
from tests.aws.test_serve import policy_files
from tests.aws.test_static import ROOT, hcl, template

RESPONDERS = "arn:aws:iam::123456789012:role/ringfence/IncidentResponders"
JANE = "arn:aws:sts::123456789012:assumed-role/IncidentResponders/jane"  # a session of that role
AUTHORS = "arn:aws:iam::123456789012:role/PolicyAuthors"
MALLORY = "arn:aws:iam::123456789012:user/mallory"  # may call the API (IAM), bound to no role


def denials(env: Env) -> list[tuple[str, str]]:
    return [(r.principal, r.detail["action"]) for r in env.store.audit_log() if r.action == "admin.denied"]


def test_attack_incident_responder_cannot_set_idle_or_provision(env: Env) -> None:
    est = boot(env)
    db = est["ids"]["db"][0]
    env.bind(RESPONDERS, ["incident-responder"])
    status, _, body = env.rest("admin", "PUT", f"/admin/workloads/{db}/mode", {"mode": "idle"}, principal=JANE)
    assert status == 403 and "workload.mode" in body["detail"], body
    status, _, _ = env.rest("admin", "POST", "/admin/policies", {"files": policy_files()}, principal=JANE)
    assert status == 403
    assert env.store.get(db).op_mode is None and env.store.active_policy().number == 1
    # what the role is for still works
    status, _, _ = env.rest("admin", "POST", f"/admin/workloads/{db}/quarantine", {"reason": "ir-7"}, principal=JANE)
    assert status == 200 and env.store.get(db).op_quarantined
    assert denials(env) == [(JANE, "workload.mode"), (JANE, "policy.provision")]


def test_attack_policy_author_cannot_release_a_quarantine(env: Env) -> None:
    est = boot(env)
    web = est["ids"]["web"][0]
    env.bind(RESPONDERS, ["incident-responder"])
    env.bind(AUTHORS, ["policy-author"])
    assert env.rest("admin", "POST", f"/admin/workloads/{web}/quarantine", {}, principal=JANE)[0] == 200
    author = "arn:aws:sts::123456789012:assumed-role/PolicyAuthors/pat"
    status, _, _ = env.rest("admin", "DELETE", f"/admin/workloads/{web}/quarantine", {}, principal=author)
    assert status == 403 and env.store.get(web).op_quarantined
    status, _, _ = env.rest("admin", "POST", "/admin/pairing-keys", {"workload_id": web}, principal=author)
    assert status == 403


def test_attack_unbound_caller_is_refused_every_action(env: Env) -> None:
    est = boot(env)
    web = est["ids"]["web"][0]
    calls: list[tuple[str, str, Any]] = [
        ("POST", "/admin/policies", {"files": policy_files()}),
        ("PUT", f"/admin/workloads/{web}/mode", {"mode": "idle"}),
        ("POST", f"/admin/workloads/{web}/quarantine", {}),
        ("DELETE", f"/admin/workloads/{web}/quarantine", {}),
        ("POST", "/admin/pairing-keys", {"workload_id": web}),
        # a body that does not validate is refused (audited) for the role first, not answered 422
        ("POST", "/admin/policies", {"files": {"/boundaries.yaml": ""}}),
        ("PUT", f"/admin/workloads/{web}/mode", {"mode": "bogus"}),
        ("PUT", f"/admin/workloads/{web}/labels", {}),
    ]
    for method, path, body in calls:
        assert env.rest("admin", method, path, body, principal=MALLORY)[0] == 403, path
    assert len(denials(env)) == len(calls)


def test_no_bindings_refuse_everyone(env: Env, monkeypatch: pytest.MonkeyPatch) -> None:
    est = boot(env)
    monkeypatch.delenv("RINGFENCE_ADMIN_ROLES")
    web = est["ids"]["web"][0]
    assert env.rest("admin", "POST", f"/admin/workloads/{web}/quarantine", {})[0] == 403


def test_safeguards_lowered_are_audited_and_counted(env: Env, capsys: pytest.CaptureFixture[str]) -> None:
    est = boot(env)
    web, db = est["ids"]["web"][0], est["ids"]["db"][0]
    capsys.readouterr()
    assert env.rest("admin", "PUT", f"/admin/workloads/{db}/mode", {"mode": "idle"})[0] == 200
    assert env.rest("admin", "PUT", f"/admin/workloads/{db}/mode", {"mode": "observe"})[0] == 200
    assert env.rest("admin", "POST", f"/admin/workloads/{web}/quarantine", {})[0] == 200
    assert env.rest("admin", "DELETE", f"/admin/workloads/{web}/quarantine", {})[0] == 200
    files = policy_files()
    files["labels.yaml"] = files["labels.yaml"].replace("admin_cidrs: [10.99.0.0/24]", "admin_cidrs: [10.0.0.0/8]")
    status, _, body = env.rest("admin", "POST", "/admin/policies", {"files": files, "reason": "wider"})
    assert status == 201, body
    assert emitted(capsys.readouterr().out).get("SafeguardsLowered") == 3  # idle, release, widening
    (provision,) = [r for r in env.store.audit_log() if r.target == f"policy/v{body['version']}"]
    assert provision.detail["widens_failsafes"] == ["admin_cidrs: 10.0.0.0/8"]


def test_a_policy_that_idles_workloads_is_counted_and_names_them(env: Env, capsys: pytest.CaptureFixture[str]) -> None:
    boot(env)
    capsys.readouterr()
    files = policy_files()
    assert "  mode: enforce\n" in files["labels.yaml"]
    files["labels.yaml"] = files["labels.yaml"].replace("  mode: enforce\n", "  mode: idle\n", 1)
    status, _, body = env.rest("admin", "POST", "/admin/policies", {"files": files, "reason": "quiet please"})
    assert status == 201, body
    assert emitted(capsys.readouterr().out).get("SafeguardsLowered") == 1
    (provision,) = [r for r in env.store.audit_log() if r.target == f"policy/v{body['version']}"]
    idle = provision.detail["newly_idle"]
    assert idle["count"] == 5 and len(idle["workloads"]) == 5  # every instance of the estate


# --- ringfence serve: roles on admin tokens ---------------------------------------------------------


@pytest.fixture
def served_roles(env: Env, tmp_path: Path, aws_wiring: Callable[[], Any]) -> Iterator[tuple[str, dict[str, str]]]:
    tokens, lines = {}, []
    for who, roles in {"ann": ["policy-author"], "ivan": ["incident-responder"], "rita": ["reader"]}.items():
        tokens[who], line = serve.new_admin_token(who, roles)
        lines.append(line)
    path = tmp_path / "admin-tokens"
    path.write_text("\n".join(lines) + "\n")
    app = serve.ServeApp.over(aws_wiring(), serve.AdminTokens.load(path))
    with serve.serving(app) as running:
        yield running.url, tokens


def test_attack_serve_token_roles_hold_per_route(env: Env, served_roles: tuple[str, dict[str, str]]) -> None:
    url, tok = served_roles
    est = env.estate()

    def call(method: str, path: str, who: str, body: Any) -> httpx.Response:
        return httpx.request(method, url + path, json=body, headers={"Authorization": f"Bearer {tok[who]}"})

    assert call("POST", "/admin/policies", "ivan", {"files": policy_files()}).status_code == 403
    assert call("POST", "/admin/policies", "rita", {"files": policy_files()}).status_code == 403
    assert call("POST", "/admin/policies", "ann", {"files": policy_files()}).status_code == 201
    for ids in est["ids"].values():
        for iid in ids:
            env.put(env.state_event(iid, "running"))
    env.pump()
    web = est["ids"]["web"][0]
    # a header claiming roles is not where roles come from
    r = httpx.post(
        f"{url}/admin/workloads/{web}/quarantine",
        json={},
        headers={"Authorization": f"Bearer {tok['rita']}", "ringfence_roles": "incident-responder"},
    )
    assert r.status_code == 403
    assert call("POST", f"/admin/workloads/{web}/quarantine", "ann", {}).status_code == 403
    assert call("POST", f"/admin/workloads/{web}/quarantine", "ivan", {}).status_code == 200
    assert [(p, a) for p, a in denials(env)] == [
        ("ivan", "policy.provision"),
        ("rita", "policy.provision"),
        ("rita", "workload.quarantine"),
        ("ann", "workload.quarantine"),
    ]


def test_admin_token_lines_carry_roles(tmp_path: Path) -> None:
    p = tmp_path / "t"
    p.write_text(f"old:{serve.token_hash('x')}\n")
    with pytest.raises(serve.ServeError, match=r"t:1: no admin roles"):
        serve.AdminTokens.load(p)
    p.write_text(f"bad:{serve.token_hash('x')}:root\n")
    with pytest.raises(serve.ServeError, match="unknown admin role 'root'"):
        serve.AdminTokens.load(p)
    with pytest.raises(serve.ServeError, match="at least one role"):
        serve.new_admin_token("nobody", [])


# --- bindings, resource policy and alarm in the deploy templates ------------------------------------


def test_role_bindings_match_sessions_of_their_role() -> None:
    b = RoleBindings.from_json(json.dumps({RESPONDERS: ["incident-responder"]}))
    assert b.roles(JANE) == {AdminRole.INCIDENT_RESPONDER}
    assert b.roles("arn:aws:sts::999999999999:assumed-role/IncidentResponders/jane") == frozenset()
    assert b.roles(MALLORY) == frozenset() and b.roles(None) == frozenset()
    assert principal_key(MALLORY) == MALLORY
    assert all(AdminRole.READER not in roles for roles in ACTIONS.values()), "readers change nothing"


@pytest.mark.slow
def test_admin_api_resource_policy_and_alarm_in_sam_and_terraform() -> None:
    res = template()["Resources"]
    custom = res["AdminApi"]["Properties"]["Auth"]["ResourcePolicy"]["CustomStatements"]
    allow = [s for s in custom if s["Effect"] == "Allow"]
    deny = [s for s in custom if s["Effect"] == "Deny"]
    assert allow and allow[0]["Principal"] == {"AWS": {"Ref": "AdminPrincipalArns"}}
    assert deny and deny[0]["Principal"] == "*"
    assert deny[0]["Condition"] == {"ArnNotEquals": {"aws:PrincipalArn": {"Ref": "AdminPrincipalArns"}}}
    env = res["AdminFunction"]["Properties"]["Environment"]["Variables"]
    assert env["RINGFENCE_ADMIN_ROLES"] == {"Ref": "AdminRoles"}
    alarm = res["SafeguardsLoweredAlarm"]["Properties"]
    assert alarm["MetricName"] == "SafeguardsLowered" and alarm["Namespace"] == "Ringfence"

    api = hcl(ROOT / "infra/modules/ringfence/api.tf")
    (doc,) = [
        b["aws_iam_policy_document"]["admin_api"]
        for b in api["data"]
        if "admin_api" in b.get("aws_iam_policy_document", {})
    ]
    effects = {s.get("effect", "Allow"): s for s in doc["statement"]}
    assert "keys(var.admin_roles)" in str(effects["Allow"]["principals"])
    assert "keys(var.admin_roles)" in str(effects["Deny"]["condition"])
    assert any("aws_api_gateway_rest_api_policy" in b for b in api["resource"])
    lam = (ROOT / "infra/modules/ringfence/lambda.tf").read_text()
    assert "RINGFENCE_ADMIN_ROLES" in lam and "jsonencode(var.admin_roles)" in lam
    assert "SafeguardsLowered" in (ROOT / "infra/modules/ringfence/alarms.tf").read_text()


def test_attack_serve_reader_cannot_reset_an_agent_key(env: Env, served_roles: tuple[str, dict[str, str]]) -> None:
    """``ringfence serve`` serves the reset route (the same resolver) under the same roles."""
    url, tok = served_roles
    est = boot(env)
    web = est["ids"]["web"][0]
    for who in ("rita", "ivan"):
        r = httpx.delete(f"{url}/admin/workloads/{web}/agent-key", headers={"Authorization": f"Bearer {tok[who]}"})
        assert r.status_code == 403 and "agent-key.reset" in r.json()["detail"], r.text
    assert denials(env)[-2:] == [("rita", "agent-key.reset"), ("ivan", "agent-key.reset")]
