"""Revoking a grant under ``ringfence serve`` over SQLite (the real HTTP server, the library's
routes, LocalWiring's compute worker): ``DELETE /admin/workloads/{id}/labels`` takes a policy
author's binding back, the workload's privileged values are held again and compute takes them
out of its own bundle and its peers' sets. The AWS admin function serves the same route
(tests/aws/test_admin_bind.py)."""

from __future__ import annotations

import ipaddress
from typing import Any

import httpx

from ringfence import bundle
from tests.onprem.conftest import ESTATE, Served
from tests.onprem.test_wiring import served as enforced

DB = "dc1-db-1"
DB_IP = "192.168.10.31"
PEERS = ("dc1-web-1", "dc1-proc-1")
PRIVILEGED = {"ringfence:role": "jumpbox", "ringfence:app": "admin"}
GRANT = {"role": "jumpbox", "app": "admin"}


def ssh(doc: bundle.Bundle, direction: str, ip: str) -> bool:
    """``doc`` allows SSH (tcp/22) inbound from, or outbound to, ``ip`` by one of its sets."""
    addr = ipaddress.ip_address(ip)
    for rule in doc.inbound if direction == "in" else doc.outbound:
        if rule.action != "allow":
            continue
        entries = [(m.set, m.services) for m in rule.members] if rule.members else [(rule.set, rule.services)]
        for name, services in entries:
            port = any(
                s.proto in ("tcp", "any") and (s.ports is None or s.ports[0] <= 22 <= s.ports[1]) for s in services
            )
            if port and name is not None and any(addr in ipaddress.ip_network(c) for c in doc.sets[name].v4):
                return True
    return False


def jump_access(s: Served) -> dict[str, bool]:
    """Does each production peer let dc1-db-1 in over SSH, and does its own bundle let it out?"""
    assert s.wiring.settle(60)
    out = {wid: ssh(enforced(s.wiring, wid), "in", DB_IP) for wid in PEERS}
    out[DB] = ssh(enforced(s.wiring, DB), "out", ESTATE[0]["ips"][0])  # type: ignore[index]
    return out


def bound_jumpbox(s: Served) -> None:
    """dc1-db-1 retagged role=jumpbox, app=admin by onboarding (held), then bound by a policy author."""
    assert not any(jump_access(s).values())
    db: dict[str, Any] = dict(ESTATE[2], tags={**ESTATE[2]["tags"], **PRIVILEGED})  # type: ignore[dict-item]
    r = s.call("otto", "POST", "/admin/workloads", {**db, "reason": "CMDB sync"})
    assert r.status_code == 200 and r.json()["held"] == GRANT, r.text
    r = s.call("paula", "PUT", f"/admin/workloads/{DB}/labels", {"labels": GRANT, "reason": "CHG-9 bastion"})
    assert r.status_code == 200 and r.json()["held"] is False, r.text
    assert all(jump_access(s).values()), "bound: every peer's SSH peer, and its bundle opens SSH to them"


def test_serve_revokes_a_grant_the_values_are_held_and_compute_takes_them_out(served: Served) -> None:
    bound_jumpbox(served)
    store = served.wiring.store
    r = served.call(
        "paula", "DELETE", f"/admin/workloads/{DB}/labels", {"dimensions": ["role", "app"], "reason": "CHG-11"}
    )
    assert r.status_code == 200, r.text
    body = r.json()
    assert body["revoked"] == GRANT and body["label_grants"] == {} and body["held"] is True
    assert body["labels"] == {"env": "prod", "loc": "ca"}, "the revoked values dropped, not the tags' database"
    rec = store.get(DB)
    assert rec is not None and rec.workload.label_grants == {} and rec.labels == body["labels"]
    [revoked] = served.audit("label.unbind")
    assert (revoked.principal, revoked.target, revoked.reason, revoked.id) == ("paula", DB, "CHG-11", body["audit_id"])
    assert revoked.detail["revoked"] == GRANT
    assert not any(jump_access(served).values()), "out of every peer's SSH set, and its own SSH rule gone"

    # onboarding's next CMDB sync of the same tags does not bring the grant back: held again
    db: dict[str, Any] = dict(ESTATE[2], tags={**ESTATE[2]["tags"], **PRIVILEGED})  # type: ignore[dict-item]
    r = served.call("otto", "POST", "/admin/workloads", {**db, "reason": "CMDB sync"})
    assert r.status_code == 200 and r.json()["held"] == GRANT, r.text
    assert (rec := store.get(DB)) is not None and rec.workload.label_grants == {} and "role" not in rec.labels
    assert not any(jump_access(served).values())
    # nor does the sync of a caller who may bind (onboarding and policy-author), registering or
    # importing: the revocation is the values' last write, only a binding grants them again
    r = served.call("pat", "POST", "/admin/workloads", {**db, "reason": "CMDB sync"})
    assert r.status_code == 200 and r.json()["held"] == GRANT, r.text
    csv = f"id,ips,site,ringfence:role,ringfence:app,ringfence:env,ringfence:loc\n{DB},{DB_IP},dc1,jumpbox,admin,prod,ca\n"
    r = served.call("pat", "POST", "/admin/workloads/import", {"csv": csv, "reason": "CMDB sync"})
    assert r.status_code == 200 and r.json()["held"] == {DB: GRANT}, r.text
    assert (rec := store.get(DB)) is not None and rec.workload.label_grants == {} and "role" not in rec.labels
    assert not any(jump_access(served).values())

    # nothing left to take back: 409, nothing written or audited
    r = served.call("paula", "DELETE", f"/admin/workloads/{DB}/labels", {"dimensions": ["role"], "reason": "again"})
    assert r.status_code == 409 and "no grant of role" in r.json()["detail"], r.text
    assert len(served.audit("label.unbind")) == 1
    r = served.call("paula", "DELETE", "/admin/workloads/dc9-nope/labels", {"dimensions": ["role"], "reason": "x"})
    assert r.status_code == 404, r.text


def test_attack_only_policy_authors_may_revoke_a_grant_under_serve(served: Served) -> None:
    """An onboarding token (it registers the host), a reader token and a caller with no token
    cannot take a policy author's grant back: 403 audited as ``admin.denied`` (401 without a
    token), the grant and the peers' access as they were."""
    bound_jumpbox(served)
    store = served.wiring.store
    before = store.get(DB)
    for who in ("otto", "rita"):
        for body in ({"dimensions": ["role", "app"], "reason": "revoke it"}, {"dimensions": []}):
            r = served.call(who, "DELETE", f"/admin/workloads/{DB}/labels", body)
            assert r.status_code == 403 and "label.unbind" in r.json()["detail"], (who, r.text)
    r = httpx.request(
        "DELETE", f"{served.url}/admin/workloads/{DB}/labels", json={"dimensions": ["role"], "reason": "x"}
    )
    assert r.status_code == 401, r.text
    denied = [(a.principal, a.target, a.detail["action"]) for a in served.audit("admin.denied")]
    assert denied == [(who, DB, "label.unbind") for who in ("otto", "rita") for _ in range(2)]
    assert store.get(DB) == before and not served.audit("label.unbind")
    assert all(jump_access(served).values()), "the grant stands"
