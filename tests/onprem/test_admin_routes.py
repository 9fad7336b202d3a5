"""The admin API's on-premise routes (the library's resolver, as ``ringfence serve`` runs it) over
OnPremAdmin and LocalWiring, then the agent API's enrollment with the minted key."""

from __future__ import annotations

from typing import Any

from aws_lambda_powertools.event_handler import APIGatewayRestResolver

from ringfence.adminroles import AdminRole
from ringfence.clouds.onprem import OnPremAdmin
from ringfence.control.agents import AgentApi
from ringfence.local.wiring import LocalWiring
from ringfence.routes.admin import admin_routes
from ringfence.routes.agent import agent_routes
from tests.aws.conftest import LambdaContext, rest_answer, rest_event
from tests.aws.test_pipeline import AgentKey
from tests.onprem.conftest import boot

OPERATOR = "arn:aws:iam::123456789012:user/carol"


def call(app: APIGatewayRestResolver, method: str, path: str, body: Any = None) -> tuple[int, Any]:
    status, _, answer = rest_answer(app.resolve(rest_event(method, path, body, principal=OPERATOR), LambdaContext()))
    return status, answer


def test_register_import_pair_and_deregister_through_the_routes(wiring: LocalWiring) -> None:
    svc = boot(wiring)
    app = admin_routes(lambda: svc, onprem=lambda: svc, roles_of=lambda _: frozenset(AdminRole))
    spec = {
        "id": "dc3-web-1",
        "ips": ["192.168.30.11"],
        "tags": {"ringfence:role": "web", "ringfence:app": "ordering", "ringfence:env": "prod", "ringfence:loc": "ca"},
    }
    status, body = call(app, "POST", "/admin/workloads", {**spec, "reason": "new rack"})
    assert status == 201 and body["created"] is True, body
    status, body = call(app, "POST", "/admin/workloads", {"ips": ["10.0.0.1"]})
    assert status == 422 and "id" in body["detail"], body
    status, body = call(app, "POST", "/admin/workloads", {"id": "x", "ips": ["10.0.0.300"]})
    assert status == 422 and "not an IP address" in body["detail"], body

    bad = "id,ips,role\ndc3-db-1,192.168.30.31,database\ndc3-db-2,192.168.30.3x,database\n"
    status, body = call(app, "POST", "/admin/workloads/import", {"csv": bad, "source": "rack3.csv"})
    assert status == 400 and body["detail"] == "rack3.csv:3:10: not an IP address: '192.168.30.3x'"
    assert wiring.store.get("dc3-db-1") is None, "nothing of a bad file is imported"
    good = bad.replace("3x", "32")
    status, body = call(app, "POST", "/admin/workloads/import", {"csv": good, "source": "rack3.csv"})
    assert status == 200 and body["imported"] == 2, body

    status, key = call(app, "POST", "/admin/pairing-keys", {"workload_id": "dc3-db-1", "uses": 1, "ttl": 600})
    assert status == 201 and key["workload_id"] == "dc3-db-1"
    agents = agent_routes(lambda: AgentApi(wiring))
    _, nonce = call(agents, "GET", "/v1/nonce")
    agent = AgentKey()
    enroll = {
        "method": "pairing",
        "nonce": nonce["nonce"],
        "workload_id": "dc3-db-2",
        "pairing_key": key["pairing_key"],
        **agent.enroll_fields("dc3-db-2", nonce["nonce"]),
    }
    status, body = call(agents, "POST", "/v1/enroll", enroll)
    assert status == 401 and "not issued for dc3-db-2" in body["detail"]
    _, nonce = call(agents, "GET", "/v1/nonce")
    again = {**enroll, "nonce": nonce["nonce"], "workload_id": "dc3-db-1"}
    status, body = call(agents, "POST", "/v1/enroll", {**again, **agent.enroll_fields("dc3-db-1", nonce["nonce"])})
    assert status == 200 and body["workload_id"] == "dc3-db-1"
    # a pairing without the agent's own key is refused, and spends nothing
    _, nonce = call(agents, "GET", "/v1/nonce")
    keyless = {k: v for k, v in again.items() if k not in ("agent_key", "agent_signature")}
    status, body = call(agents, "POST", "/v1/enroll", {**keyless, "nonce": nonce["nonce"]})
    assert status == 401 and "needs agent_key" in body["detail"], body

    status, body = call(app, "DELETE", "/admin/workloads/dc3-web-1", {"reason": "decommissioned"})
    assert status == 200
    rec = wiring.store.get("dc3-web-1")
    assert rec is not None and rec.state == "terminated"
    audit = [(a.principal, a.action, a.target) for a in wiring.store.audit_log() if a.principal == OPERATOR]
    assert audit == [
        (OPERATOR, "workload.register", "dc3-web-1"),
        (OPERATOR, "workload.import", "rack3.csv"),
        (OPERATOR, "pairing.create", "dc3-db-1"),
        (OPERATOR, "workload.deregister", "dc3-web-1"),
    ]


def test_a_pairing_key_left_over_enrolls_no_deregistered_workload_and_bad_strings_are_400(wiring: LocalWiring) -> None:
    svc = boot(wiring)
    app = admin_routes(lambda: svc, onprem=lambda: svc, roles_of=lambda _: frozenset(AdminRole))
    spec = {"id": "dc3-app-1", "ips": ["192.168.30.41"], "tags": {"ringfence:role": "web"}}
    assert call(app, "POST", "/admin/workloads", {**spec, "reason": "rack"})[0] == 201
    _, key = call(app, "POST", "/admin/pairing-keys", {"workload_id": "dc3-app-1", "uses": 5, "ttl": 600})
    agents = agent_routes(lambda: AgentApi(wiring))

    def enroll(**fields: Any) -> tuple[int, Any]:
        nonce = call(agents, "GET", "/v1/nonce")[1]["nonce"]
        body = {"method": "pairing", "nonce": nonce, "workload_id": "dc3-app-1", "pairing_key": key["pairing_key"]}
        return call(agents, "POST", "/v1/enroll", {**body, **AgentKey().enroll_fields("dc3-app-1", nonce), **fields})

    # a lone UTF-16 surrogate ("\ud800" in the JSON) in any field: the request's fault; an id is
    # held to the workload-id rule before anything reads it (422 naming the field)
    for field in ("pairing_key", "nonce"):
        status, body = enroll(**{field: "\ud800"})
        assert status == 400 and "surrogate" in body["detail"], (field, status, body)
    status, body = enroll(workload_id="\ud800")
    assert status == 422 and body["detail"].startswith("body.workload_id:"), body
    assert call(app, "DELETE", "/admin/workloads/dc3-app-1", {"reason": "decommissioned"})[0] == 200
    status, body = enroll()  # the key has uses left: the deregistered id is not enrolled with it
    assert status == 401 and "pairing key is unknown" in body["detail"], body
    status, body = enroll(workload_id="dc3-never-registered")
    assert status == 401


def test_the_aws_admin_api_has_no_onprem_routes(wiring: LocalWiring) -> None:
    svc = OnPremAdmin(wiring)
    status, _ = call(
        admin_routes(lambda: svc, roles_of=lambda _: frozenset(AdminRole)),
        "POST",
        "/admin/workloads",
        {"id": "x", "ips": ["10.0.0.1"]},
    )
    assert status == 404


def test_provision_answers_and_audits_warnings_and_suggest_reads_the_flow_rows(wiring: LocalWiring) -> None:
    from tests.onprem.conftest import policy_files

    svc = boot(wiring)
    app = admin_routes(lambda: svc, onprem=lambda: svc, roles_of=lambda _: frozenset(AdminRole))
    moot = (
        "rulesets:\n  - name: moot\n    scope: all()\n    same: []\n    rules:\n"
        "      - {name: never, from: role == web, to: role == web && role == database, services: [tcp/80]}\n"
        "      - {name: nobody, from: role == web, to: app == payroll && role == processing, services: [tcp/80]}\n"
    )
    status, body = call(app, "POST", "/admin/policies", {"files": {**policy_files(), "moot.yaml": moot}, "reason": "x"})
    assert status == 201, body  # warnings never refuse a version
    # (this small estate leaves many example rules matching nobody: those are warnings too)
    mine = [w for w in body["warnings"] if w.startswith("moot.yaml")]
    assert [w.split(": warning: ")[0] for w in mine] == ["moot.yaml:6:9", "moot.yaml:7:9"], body
    assert "can never match any workload" in mine[0] and "matches no workload of the estate (3 workloads)" in mine[1]
    (entry,) = [a for a in wiring.store.audit_log() if a.action == "policy.provision" and a.principal == OPERATOR]
    assert entry.detail["warnings"] == body["warnings"]

    status, _, body = rest_answer(
        app.resolve(rest_event("GET", "/admin/suggest", query={"app": "ordering"}, principal=OPERATOR), LambdaContext())
    )
    assert status == 200 and body["rules"] == [] and body["file"] == "suggested-ordering.yaml", body


def test_of_two_concurrent_provisions_the_one_that_activates_over_a_version_that_moved_is_refused(
    wiring: LocalWiring,
) -> None:
    """Provision A reads v1 as active and takes number 2; B, meanwhile, provisions 3 over v1.
    A's activation is a compare-and-swap over v1: refused (409), nothing of it active or left
    published, its record followed by one that says so; before, the slower one (the older number)
    overwrote the newer."""
    import threading

    from tests.onprem.conftest import policy_files

    svc = boot(wiring)
    old, new = policy_files(), policy_files()
    old["tests.yaml"] += "# revised\n"  # not v1's files (those again make no version)
    new["tests.yaml"] += "# tightened\n"
    a_publishing, b_done = threading.Event(), threading.Event()
    put = wiring.publisher.put_text

    def paused_put(key: str, text: str) -> None:
        if key.startswith("policies/v000002/"):
            a_publishing.set()
            assert b_done.wait(60)
        put(key, text)

    wiring.publisher.put_text = paused_put  # type: ignore[method-assign]
    answers: dict[str, tuple[int, Any]] = {}

    def provision(who: str, files: dict[str, str]) -> None:
        app = admin_routes(lambda: svc, onprem=lambda: svc, roles_of=lambda _: frozenset(AdminRole))
        answers[who] = call(app, "POST", "/admin/policies", {"files": files, "reason": who})

    a = threading.Thread(target=provision, args=("a", old))
    a.start()
    assert a_publishing.wait(60)
    provision("b", new)
    b_done.set()
    a.join(60)
    assert answers["b"][0] == 201 and answers["b"][1]["version"] == 3, answers
    status, body = answers["a"]
    assert status == 409 and body["error"] == "policy changed meanwhile: nothing provisioned", body
    assert "version 3 became active" in body["detail"]
    active = wiring.store.active_policy()
    assert active is not None and active.number == 3
    assert [v.number for v in wiring.store.policy_versions()] == [1, 3]
    # each provision is audited before its activation; the loser's record is followed by one
    # that says it was not activated (the store's history holds only what was)
    log = wiring.store.audit_log()
    provisions = {a.target: a.id for a in log if a.action == "policy.provision"}
    assert sorted(provisions) == ["policy/v1", "policy/v2", "policy/v3"]
    (abandoned,) = [a for a in log if a.action == "policy.provision.abandoned"]
    assert abandoned.target == "policy/v2" and abandoned.detail["audit_id"] == provisions["policy/v2"]
    assert "version 3 became active" in abandoned.detail["why"]
    assert not list((wiring.state_dir / "objects" / "policies").glob("v000002/*")), "the loser's files are removed"
