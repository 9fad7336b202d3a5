"""Admin roles under ``ringfence serve`` over SQLite (the real HTTP server, the library's routes,
LocalWiring): what an admin token of one role can and cannot do through the on-premise routes."""

from __future__ import annotations

from typing import Any

import pytest

from ringfence.local.wiring import LocalWiring
from tests.onprem.conftest import ESTATE, Served, policy_files

PRIVILEGED = {"ringfence:role": "jumpbox", "ringfence:app": "admin"}


def test_attack_onboarding_cannot_grant_a_privileged_label_by_registering_or_importing(served: Served) -> None:
    """Only a policy author may bind a privileged label value. An ``onboarding`` token that
    registers (or re-registers) a workload, or imports a CMDB file, whose tags set ``role:
    jumpbox`` / ``app: admin`` gets the registration, but the move is held (previous labels in
    force; a new workload none), answered and audited as held, and granted nothing; a policy
    author then approves it by binding, and a policy author's own registration grants it."""
    store = served.wiring.store
    db = dict(ESTATE[2], tags={**ESTATE[2]["tags"], **PRIVILEGED})  # type: ignore[dict-item]
    r = served.call("otto", "POST", "/admin/workloads", {**db, "reason": "routine CMDB sync"})
    assert r.status_code == 200 and r.json()["held"] == {"role": "jumpbox", "app": "admin"}, r.text
    rec = store.get("dc1-db-1")
    assert rec is not None and rec.workload.label_grants == {}
    assert rec.labels["role"] == "database" and rec.labels["app"] == "ordering", "the previous labels stay in force"
    last = served.audit("workload.register")[-1]
    assert last.principal == "otto" and "label_grants" not in last.detail
    assert last.detail["held"] == {"role": "jumpbox", "app": "admin"}

    csv = "id,ips,ringfence:role,ringfence:app,ringfence:env,ringfence:loc\nevil-jump-1,192.168.10.99,jumpbox,admin,prod,ca\n"
    r = served.call("otto", "POST", "/admin/workloads/import", {"csv": csv, "source": "cmdb.csv"})
    assert r.status_code == 200 and r.json()["held"] == {"evil-jump-1": {"role": "jumpbox", "app": "admin"}}, r.text
    rec = store.get("evil-jump-1")
    assert rec is not None and rec.workload.label_grants == {} and rec.labels == {}, "new: nothing to keep, unlabeled"
    imported = served.audit("workload.import")[-1]
    assert "label_grants" not in imported.detail and imported.detail["held"] == {
        "evil-jump-1": r.json()["held"]["evil-jump-1"]
    }

    # the privileged route stays refused to onboarding (and is audited)
    r = served.call(
        "otto", "PUT", "/admin/workloads/evil-jump-1/labels", {"labels": {"role": "jumpbox"}, "reason": "x"}
    )
    assert r.status_code == 403 and served.audit("admin.denied")[-1].principal == "otto"
    # a policy author approves the held move by binding it
    r = served.call(
        "paula",
        "PUT",
        "/admin/workloads/dc1-db-1/labels",
        {"labels": {"role": "jumpbox", "app": "admin"}, "reason": "CHG-9"},
    )
    assert r.status_code == 200 and r.json()["held"] is False, r.text
    rec = store.get("dc1-db-1")
    assert rec is not None and rec.labels["role"] == "jumpbox" and rec.workload.held_labels is None
    # a re-registration by onboarding keeps a grant a policy author made
    r = served.call("otto", "POST", "/admin/workloads", {**db, "reason": "routine CMDB sync"})
    assert r.status_code == 200 and "held" not in r.json(), r.text
    assert (rec := store.get("dc1-db-1")) is not None and rec.labels["role"] == "jumpbox"
    # registering is onboarding's; a caller who may also bind (a policy author) grants by registering
    jump = {"id": "dc1-jump-1", "ips": ["192.168.99.5"], "tags": {**PRIVILEGED, "ringfence:env": "shared"}}
    assert served.call("paula", "POST", "/admin/workloads", jump).status_code == 403
    r = served.call("pat", "POST", "/admin/workloads", {**jump, "reason": "CHG-10"})
    assert r.status_code == 201 and "held" not in r.json(), r.text
    rec = store.get("dc1-jump-1")
    assert rec is not None and rec.workload.label_grants == {"role": "jumpbox", "app": "admin"}
    assert rec.labels["role"] == "jumpbox" and rec.workload.held_labels is None
    assert served.audit("workload.register")[-1].detail["label_grants"] == {"role": "jumpbox", "app": "admin"}


@pytest.mark.parametrize(
    "name",
    ["/boundaries.yaml", "../escape.yaml", ".hidden.yaml", "zz/../../x.yaml", "a\\b.yaml", "", "a\0.yaml", "x//y.yaml"],
)
def test_attack_policy_file_names_that_alias_or_leave_the_version_are_refused_before_anything_is_written(
    served: Served, name: str
) -> None:
    """A file name that is not its own normal form would be one file on disk with another name
    (``/boundaries.yaml`` over ``boundaries.yaml``: the enforced policy not the tested, audited
    one), or leave the version's directory. Refused with 422 naming the file, before a version
    number is taken or anything is written: the next good provision is the next version."""
    files = policy_files()
    state = served.wiring.state_dir
    before = sorted(state.rglob("policies/**/*"))
    audited = len(served.wiring.store.audit_log())
    r = served.call("paula", "POST", "/admin/policies", {"files": {**files, name: "rulesets: []\n"}, "reason": "x"})
    assert r.status_code == 422, r.text
    assert r.json()["detail"].startswith("body.files:") and repr(name) in r.json()["detail"], r.text
    assert before and sorted(state.rglob("policies/**/*")) == before, "nothing written"
    assert not (served.wiring.state_dir / "escape.yaml").exists()
    assert len(served.wiring.store.audit_log()) == audited
    revised = {**files, "tests.yaml": files["tests.yaml"] + "# v2\n"}  # not v1's (those make no version)
    r = served.call("paula", "POST", "/admin/policies", {"files": revised, "reason": "v2"})
    assert r.status_code == 201 and r.json()["version"] == 2, r.text


def test_attack_a_caller_without_the_role_gets_the_audited_refusal_even_for_a_body_that_does_not_validate(
    served: Served,
) -> None:
    """The role is checked before the body: a caller without it learns nothing of what the route
    takes (no 422 naming its fields) and the attempt is audited as ``admin.denied``; a caller
    with the role still gets the 422."""
    calls: list[tuple[str, str, Any, str, str]] = [
        ("POST", "/admin/policies", {"files": {}}, "policy.provision", "policy"),
        ("PUT", "/admin/workloads/dc1-db-1/mode", {"mode": "bogus"}, "workload.mode", "dc1-db-1"),
        ("PUT", "/admin/workloads/dc1-db-1/labels", {"labels": {}}, "label.bind", "dc1-db-1"),
        ("POST", "/admin/pairing-keys", {"uses": "many"}, "pairing.create", ""),
        ("POST", "/admin/workloads", {"ips": []}, "workload.register", ""),
        ("POST", "/admin/workloads/import", {}, "workload.import", "cmdb"),
        ("DELETE", "/admin/workloads/dc1-db-1/agent-key", {"next_agent_key": "x"}, "agent-key.reset", "dc1-db-1"),
    ]
    for method, path, body, action, target in calls:
        before = len(served.audit("admin.denied"))
        r = served.call("rita", method, path, body)
        assert r.status_code == 403 and action in r.json()["detail"], (path, r.text)
        denied = served.audit("admin.denied")
        assert len(denied) == before + 1, path
        assert (denied[-1].principal, denied[-1].detail["action"], denied[-1].target) == ("rita", action, target)
    # the role's holder is told what is wrong with the body, and nothing is audited as denied
    before = len(served.audit("admin.denied"))
    r = served.call("paula", "PUT", "/admin/workloads/dc1-db-1/mode", {"mode": "bogus"})
    assert r.status_code == 422 and r.json()["detail"].startswith("body.mode:"), r.text
    r = served.call("otto", "POST", "/admin/pairing-keys", {"uses": "many"})
    assert r.status_code == 422, r.text
    assert len(served.audit("admin.denied")) == before


def test_every_admin_route_names_the_action_checked_before_its_body(wiring: LocalWiring) -> None:
    """A route missing from ROUTE_ACTIONS would answer a bad body with 422 before its role."""
    from ringfence.adminroles import ACTIONS, READS, AdminRole
    from ringfence.clouds.onprem import OnPremAdmin
    from ringfence.routes.admin import ROUTE_ACTIONS, admin_routes

    svc = OnPremAdmin(wiring)
    app = admin_routes(lambda: svc, onprem=lambda: svc, roles_of=lambda _: frozenset(AdminRole))
    routes = {(r.method, r.path) for r in [*app._static_routes, *app._dynamic_routes] if r.path.startswith("/admin")}
    assert routes == set(ROUTE_ACTIONS)
    assert all(action in ACTIONS or action in READS for action, _ in ROUTE_ACTIONS.values())
