"""Admin roles on the on-premise routes as the AWS admin function serves them (moto server behind
it, API Gateway's IAM caller in the event, bindings in RINGFENCE_ADMIN_ROLES): the AWS twin of
tests/onprem/test_attack_admin_roles.py. Registering, importing, deregistering and minting
pairing keys is ``onboarding``'s; a privileged label value is a policy author's to grant."""

from __future__ import annotations

from typing import Any

import pytest

from tests.aws.conftest import Env
from tests.aws.test_attack_enroll import audits
from tests.aws.test_onprem_hybrid import DB, OTTO, hybrid, register

__all__ = ["hybrid"]  # the fixture, shared

PAULA = "arn:aws:iam::123456789012:user/paula"  # policy-author
RITA = "arn:aws:iam::123456789012:user/rita"  # incident-responder
MALLORY = "arn:aws:iam::123456789012:user/mallory"  # may call the API (IAM), bound to no role
PAT = "arn:aws:iam::123456789012:user/pat"  # onboarding and policy-author
PRIVILEGED = {"ringfence:role": "jumpbox", "ringfence:app": "admin"}


@pytest.fixture
def roles(hybrid: tuple[Env, dict[str, Any]]) -> Env:
    env, _ = hybrid
    env.bind(PAULA, ["policy-author"])
    env.bind(RITA, ["incident-responder"])
    env.bind(PAT, ["onboarding", "policy-author"])
    return env


def denied(env: Env) -> list[tuple[str, str, str]]:
    return [(r.principal, r.detail["action"], r.target) for r in env.store.audit_log() if r.action == "admin.denied"]


def test_attack_a_caller_without_onboarding_cannot_register_import_or_deregister_on_aws(roles: Env) -> None:
    """A policy author, an incident responder and an unbound caller each get the audited 403 on
    every on-premise route, before the body is read (a body that does not validate gets the 403,
    not a 422 describing the route); nothing is registered, imported or deregistered."""
    env = roles
    assert register(env, DB)[0] == 201  # onboarding's own registration, for the deregistration below
    csv = "id,ips,ringfence:role,ringfence:app,ringfence:env\nrogue-2,192.168.66.2,database,ordering,prod\n"
    calls: list[tuple[str, str, Any, str, str]] = [
        ("POST", "/admin/workloads", {"id": "rogue-1", "ips": ["192.168.66.1"]}, "workload.register", "rogue-1"),
        ("POST", "/admin/workloads", {"ips": []}, "workload.register", ""),  # does not validate
        ("POST", "/admin/workloads/import", {"csv": csv, "source": "x.csv"}, "workload.import", "x.csv"),
        ("POST", "/admin/workloads/import", {}, "workload.import", "cmdb"),
        ("DELETE", "/admin/workloads/dc1-db-1", {"reason": "x"}, "workload.deregister", "dc1-db-1"),
        ("POST", "/admin/pairing-keys", {"workload_id": "dc1-db-1"}, "pairing.create", "dc1-db-1"),
    ]
    for who in (PAULA, RITA, MALLORY):
        for method, path, body, action, target in calls:
            before = len(denied(env))
            status, _, answer = env.rest("admin", method, path, body, principal=who)
            assert status == 403 and action in answer["detail"], (who, path, status, answer)
            assert denied(env)[before:] == [(who, action, target)], (who, path)
    assert env.store.get("rogue-1") is None and env.store.get("rogue-2") is None
    assert (rec := env.store.get("dc1-db-1")) is not None and rec.state == "running", "still registered"
    assert [r.principal for r in env.store.audit_log() if r.action.startswith("workload.")] == [OTTO]


def test_attack_onboarding_cannot_grant_a_privileged_label_by_registering_on_aws(roles: Env) -> None:
    """An ``onboarding`` caller registering (or importing) a host whose tags set ``role: jumpbox``
    / ``app: admin`` gets the registration with the move held: granted nothing, the previous
    labels (a new host: none) in force, answered and audited as held, and the EC2 estate's bundles
    do not admit it as a jumpbox. Binding stays refused to it; a policy author approves by
    binding, and a caller who is both grants by registering."""
    env = roles
    assert register(env, DB)[0] == 201
    status, answer = register(env, {**DB, "tags": {**DB["tags"], **PRIVILEGED}})  # type: ignore[dict-item]
    assert status == 200 and answer["held"] == {"role": "jumpbox", "app": "admin"}, answer
    rec = env.store.get("dc1-db-1")
    assert rec is not None and rec.workload.label_grants == {}
    assert rec.labels["role"] == "database" and rec.labels["app"] == "ordering", "the previous labels stay in force"
    last = audits(env, "workload.register", "dc1-db-1")[-1]
    assert last.principal == OTTO and "label_grants" not in last.detail
    assert last.detail["held"] == {"role": "jumpbox", "app": "admin"}

    csv = "id,ips,ringfence:role,ringfence:app,ringfence:env,ringfence:loc\nevil-jump-1,192.168.10.99,jumpbox,admin,prod,ca\n"
    status, _, answer = env.rest("admin", "POST", "/admin/workloads/import", {"csv": csv}, principal=OTTO)
    assert status == 200 and answer["held"] == {"evil-jump-1": {"role": "jumpbox", "app": "admin"}}, answer
    rec = env.store.get("evil-jump-1")
    assert rec is not None and rec.workload.label_grants == {} and rec.labels == {}, "new: nothing to keep"

    status, _, answer = env.rest(
        "admin",
        "PUT",
        "/admin/workloads/evil-jump-1/labels",
        {"labels": {"role": "jumpbox"}, "reason": "x"},
        principal=OTTO,
    )
    assert status == 403 and denied(env)[-1] == (OTTO, "label.bind", "evil-jump-1"), answer
    env.pump()
    # what the estate enforces: no EC2 bundle admits either host as a jumpbox would be
    assert not any(r.labels.get("role") == "jumpbox" for r in env.store.all_records())

    body = {"labels": {"role": "jumpbox", "app": "admin"}, "reason": "CHG-9"}
    status, _, answer = env.rest("admin", "PUT", "/admin/workloads/dc1-db-1/labels", body, principal=PAULA)
    assert status == 200 and answer["held"] is False, answer
    assert (rec := env.store.get("dc1-db-1")) is not None and rec.labels["role"] == "jumpbox"
    # registering is onboarding's: a policy author alone may not; one holding both grants by registering
    jump = {"id": "dc1-jump-1", "ips": ["192.168.99.5"], "tags": {**PRIVILEGED, "ringfence:env": "shared"}}
    assert register(env, jump, principal=PAULA)[0] == 403
    status, answer = register(env, jump, principal=PAT)
    assert status == 201 and "held" not in answer, answer
    rec = env.store.get("dc1-jump-1")
    assert rec is not None and rec.workload.label_grants == {"role": "jumpbox", "app": "admin"}
    assert audits(env, "workload.register", "dc1-jump-1")[-1].detail["label_grants"] == {
        "role": "jumpbox",
        "app": "admin",
    }


def test_attack_onboarding_cannot_take_an_ec2_instances_identity_by_registering_its_id_first(
    roles: Env, hybrid: tuple[Env, dict[str, Any]]
) -> None:
    """An instance launched but not in inventory yet (its events on their way): an ``onboarding``
    caller who registered its id as an on-premise host, minted a pairing key and paired an agent
    of its own would hold the instance's identity once ingest wrote the instance over that record
    (the instance's bundle, heartbeats claiming its enforcement, flow reports in its name), and
    the instance's own agent would be refused (the identity bound to the other key). An id of a
    cloud instance's form (EC2, an Azure vmId, GCP) is refused, registered or imported, before
    anything is written; the instance's agent then enrolls with its identity document."""
    from tests.aws.test_pipeline import enroll_iid

    env = roles
    _, est = hybrid
    (new,) = est["run"]("web", est["subnets"]["web"])
    assert env.store.get(new) is None, "launched, not ingested yet"
    web = {"ringfence:role": "web", "ringfence:app": "ordering", "ringfence:env": "prod", "ringfence:loc": "ca"}
    for wid in (new, "0f8fad5b-d9cb-469f-a165-70867728950e", "7205924612093401234"):
        status, answer = register(env, {"id": wid, "ips": ["192.168.50.1"], "tags": web})
        assert status == 422 and "cloud instance" in answer["detail"], (wid, answer)
    csv = f"id,ips,ringfence:role,ringfence:app,ringfence:env,ringfence:loc\n{new},192.168.50.1,web,ordering,prod,ca\n"
    status, _, answer = env.rest(
        "admin", "POST", "/admin/workloads/import", {"csv": csv, "source": "x.csv"}, principal=OTTO
    )
    assert status == 400 and "x.csv:2:1:" in answer["detail"] and "cloud instance" in answer["detail"], answer
    assert env.store.get(new) is None and not audits(env, "workload.register", new)
    body = {"workload_id": new, "uses": 1, "ttl": 600}
    assert env.rest("admin", "POST", "/admin/pairing-keys", body, principal=OTTO)[0] == 404

    env.put(env.state_event(new, "running"))
    env.pump()
    status, answer = enroll_iid(env, new)
    assert status == 200 and answer["workload_id"] == new, answer


def ssh_admitting(env: Env, est: dict[str, Any], ip: str) -> list[str]:
    """The production EC2 hosts whose bundles admit ``ip`` over SSH (tcp/22)."""
    import ipaddress

    out = []
    for iid in (*est["ids"]["web"], *est["ids"]["proc"], *est["ids"]["db"]):
        doc = env.bundle(iid)
        for rule in doc.inbound:
            entries = [(m.set, m.services) for m in rule.members] if rule.members else [(rule.set, rule.services)]
            for name, services in entries:
                ssh = any(
                    s.proto in ("tcp", "any") and (s.ports is None or s.ports[0] <= 22 <= s.ports[1]) for s in services
                )
                nets = [ipaddress.ip_network(c) for c in doc.sets[name].v4] if name is not None else []
                if rule.action == "allow" and ssh and any(ipaddress.ip_address(ip) in n for n in nets):
                    out.append(iid)
    return sorted(set(out))


def test_attack_a_revoked_grant_is_not_granted_again_by_a_cmdb_sync(
    roles: Env, hybrid: tuple[Env, dict[str, Any]]
) -> None:
    """A data-centre jumpbox registered by a caller holding onboarding and policy-author (a CMDB
    sync automation's role): granted, every production host admits it over SSH. A policy author
    revokes the grants (the box is compromised). The automation's next run sends the same tags
    again, a registration and a CMDB import: neither grants them back, they are held (answered and
    audited as held, no grant recorded) and no host admits the box; only an explicit binding
    (PUT .../labels) grants them again, after which the sync keeps them granted."""
    env = roles
    _, est = hybrid
    ip = DB["ips"][0]
    box = {**DB, "tags": {**DB["tags"], **PRIVILEGED}}
    assert register(env, box, principal=PAT)[0] == 201
    env.pump()
    assert ssh_admitting(env, est, ip), "granted by a caller who may bind: a jumpbox"

    body = {"dimensions": ["role", "app"], "reason": "CHG-30 jumpbox compromised"}
    status, _, answer = env.rest("admin", "DELETE", "/admin/workloads/dc1-db-1/labels", body, principal=PAULA)
    assert status == 200 and answer["revoked"] == {"role": "jumpbox", "app": "admin"}, answer
    env.pump()
    assert not ssh_admitting(env, est, ip)

    held = {"role": "jumpbox", "app": "admin"}
    status, answer = register(env, box, principal=PAT)
    assert status == 200 and answer["held"] == held, answer
    last = audits(env, "workload.register", "dc1-db-1")[-1]
    assert last.detail["held"] == held and "label_grants" not in last.detail
    csv = (
        "id,ips,site,ringfence:role,ringfence:app,ringfence:env,ringfence:loc\n"
        f"dc1-db-1,{ip},dc1,jumpbox,admin,prod,ca\n"
    )
    status, _, answer = env.rest(
        "admin", "POST", "/admin/workloads/import", {"csv": csv, "reason": "sync"}, principal=PAT
    )
    assert status == 200 and answer["held"] == {"dc1-db-1": held}, answer
    rec = env.store.get("dc1-db-1")
    assert rec is not None and rec.workload.label_grants == {} and "role" not in rec.labels
    env.pump()
    assert not ssh_admitting(env, est, ip), "the revocation stands through the sync"

    grant = {"labels": held, "reason": "CHG-31 rebuilt"}
    status, _, answer = env.rest("admin", "PUT", "/admin/workloads/dc1-db-1/labels", grant, principal=PAULA)
    assert status == 200 and answer["held"] is False, answer
    status, answer = register(env, box, principal=PAT)
    assert status == 200 and "held" not in answer, answer
    rec = env.store.get("dc1-db-1")
    assert rec is not None and rec.workload.label_grants == held
    env.pump()
    assert ssh_admitting(env, est, ip)
