"""Every admin change is audited before it is made (as a provision is, tests/aws/test_audit_bounds.py):
a store that refuses the audit write leaves the change undone and the call failing, never a
change in force without its record.

Through the admin routes ``ringfence serve`` runs, over OnPremAdmin and the real LocalWiring
(SQLite store); only the store's audit append is made to fail."""

from __future__ import annotations

from typing import Any

import pytest
from aws_lambda_powertools.event_handler import APIGatewayRestResolver

from ringfence.adminroles import AdminRole
from ringfence.control.api import secret_hash
from ringfence.control.credentials import agent_key_fingerprint
from ringfence.local.wiring import LocalWiring
from ringfence.routes.admin import admin_routes
from ringfence.store.base import AuditRecord, agent_key_id_of
from tests.aws.test_pipeline import AgentKey
from tests.onprem.conftest import boot
from tests.onprem.test_admin_routes import call


class AuditDown(Exception):
    """The audit table refusing a write (throttled, unreachable)."""


def routes(wiring: LocalWiring) -> APIGatewayRestResolver:
    svc = boot(wiring)
    return admin_routes(lambda: svc, onprem=lambda: svc, roles_of=lambda _: frozenset(AdminRole))


def state(wiring: LocalWiring) -> list[dict[str, Any]]:
    return [r.model_dump(mode="json") for r in sorted(wiring.store.all_records(), key=lambda r: r.id)]


def refuse_audits(wiring: LocalWiring, monkeypatch: pytest.MonkeyPatch) -> list[str]:
    refused: list[str] = []

    def down(rec: AuditRecord) -> AuditRecord:
        refused.append(rec.action)
        raise AuditDown(rec.action)

    monkeypatch.setattr(wiring.store, "audit", down)
    return refused


def test_attack_admin_actions_whose_audit_write_fails_changes_nothing(
    wiring: LocalWiring, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Mode (idle: the firewall left alone), release from quarantine, quarantine, a pairing key
    minted or revoked, an agent key reset (which lets a new key claim the workload): each was in
    force before its record was tried, so a failed audit write left it in force unaudited. Now
    none changes anything, and each call fails."""
    app = routes(wiring)
    assert call(app, "POST", "/admin/workloads/dc1-web-1/quarantine", {"reason": "incident"})[0] == 200
    assert call(app, "POST", "/admin/pairing-keys", {"workload_id": "dc1-proc-1", "uses": 1, "ttl": 600})[0] == 201
    agent = AgentKey()  # dc1-proc-1's agent: its key bound, its token current
    wiring.store.bind_agent_key("dc1-proc-1", agent.pem)
    token = secret_hash("the agent's token")
    wiring.store.put_token(token, "dc1-proc-1", 600, agent_key_id_of(agent.pem) or "")
    assert wiring.store.token_workload(token) == "dc1-proc-1"
    log = wiring.store.audit_log()
    before = state(wiring)
    refused = refuse_audits(wiring, monkeypatch)
    attempts = [
        ("PUT", "/admin/workloads/dc1-proc-1/mode", {"mode": "idle", "reason": "quiet"}),
        ("DELETE", "/admin/workloads/dc1-web-1/quarantine", {"reason": "over"}),
        ("POST", "/admin/workloads/dc1-proc-1/quarantine", {"reason": "incident"}),
        ("POST", "/admin/pairing-keys", {"workload_id": "dc1-proc-1", "uses": 1, "ttl": 600}),
        ("DELETE", "/admin/workloads/dc1-proc-1/pairing-keys", {"reason": "leaked"}),
        (
            "DELETE",
            "/admin/workloads/dc1-proc-1/agent-key",
            {"reason": "lost", "next_agent_key": agent_key_fingerprint(AgentKey().pem)},
        ),
    ]
    for method, path, body in attempts:
        with pytest.raises(AuditDown):  # the call fails (serve answers 500; the function's alarm)
            call(app, method, path, body)
    assert refused == [
        "workload.mode",
        "workload.release",
        "workload.quarantine",
        "pairing.create",
        "pairing.revoke.requested",
        "agent-key.reset.requested",
    ]
    monkeypatch.undo()
    assert state(wiring) == before, "no mode, quarantine or release in force without its record"
    web, proc = wiring.store.get("dc1-web-1"), wiring.store.get("dc1-proc-1")
    assert web is not None and web.op_quarantined and proc is not None and proc.op_mode is None
    assert wiring.store.agent_key("dc1-proc-1") == agent.pem, "no agent key dropped without its record"
    assert wiring.store.expected_agent_key("dc1-proc-1") is None, "nor a next key named"
    assert wiring.store.token_workload(token) == "dc1-proc-1", "nor its token revoked"
    # the one key minted before: none minted, none revoked without its record
    assert wiring.store.drop_pairings("dc1-proc-1") == 1
    assert wiring.store.audit_log() == log


def test_attack_onprem_registrations_whose_audit_write_fails_changes_nothing(
    wiring: LocalWiring, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Registering a host (its labels in force), importing a CMDB file, deregistering one: each
    was written before its record was tried. Now a failed audit write writes none of them."""
    app = routes(wiring)
    log = wiring.store.audit_log()
    before = state(wiring)
    refused = refuse_audits(wiring, monkeypatch)
    spec = {"id": "dc3-web-1", "ips": ["192.168.30.11"], "tags": {"ringfence:role": "web"}, "reason": "rack"}
    attempts = [
        ("POST", "/admin/workloads", spec),
        ("POST", "/admin/workloads", {**spec, "id": "dc1-web-1", "ips": ["192.168.10.99"]}),
        ("POST", "/admin/workloads/import", {"csv": "id,ips,role\ndc3-db-1,192.168.30.31,database\n"}),
        ("DELETE", "/admin/workloads/dc1-proc-1", {"reason": "decommissioned"}),
    ]
    for method, path, body in attempts:
        with pytest.raises(AuditDown):
            call(app, method, path, body)
    assert refused == ["workload.register", "workload.register", "workload.import", "workload.deregister"]
    monkeypatch.undo()
    assert state(wiring) == before, "nothing registered, updated, imported or deregistered without its record"
    assert wiring.store.get("dc3-web-1") is None and wiring.store.get("dc3-db-1") is None
    proc = wiring.store.get("dc1-proc-1")
    assert proc is not None and proc.state == "running"
    assert wiring.store.audit_log() == log


def test_a_change_refused_after_its_record_gets_a_failed_record(wiring: LocalWiring) -> None:
    """A change refused in its transaction (the workload deregistered meanwhile) writes no record;
    the attempt is then recorded and followed by ``<action>.failed`` naming it: the log never claims
    a change that did not happen."""
    svc = boot(wiring)
    gone = wiring.store.set_operator

    def deregistered_meanwhile(workload_id: str, **_: Any) -> None:
        raise KeyError(workload_id)

    wiring.store.set_operator = deregistered_meanwhile  # type: ignore[method-assign]
    try:
        r = svc.quarantine("carol", "dc1-web-1", True, "incident")
    finally:
        wiring.store.set_operator = gone  # type: ignore[method-assign]
    assert r.status == 404
    first, failed = wiring.store.audit_log()[-2:]
    assert first.action == "workload.quarantine" and failed.action == "workload.quarantine.failed"
    assert failed.detail == {"audit_id": first.id, "why": "unknown workload"}


def test_a_change_that_raised_is_recorded_as_failed_or_unconfirmed(
    wiring: LocalWiring, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The record and the change are one store transaction (Store.audit_with), so a change that
    raised wrote neither: the attempt is recorded and followed by ``.failed``, or ``.unconfirmed``
    where the store cannot say whether the change is in force; a write that landed and then
    raised is rolled back with its record (SQLite; DynamoDB reads its commit back:
    tests/aws/test_audit_with_transaction.py). A binding (several writes, audited after) whose
    read-back failed is in force and its record stands."""
    from ringfence.control.governance import bind_labels
    from tests.onprem.conftest import policy_files

    svc = boot(wiring)
    assert svc.quarantine("carol", "dc1-web-1", True, "incident").status == 200
    assert svc.quarantine("carol", "dc1-web-1", False, "over").status == 200
    real_set, real_get = wiring.store.set_operator, wiring.store.get

    def lands_then_raises(workload_id: str, **kw: Any) -> None:
        real_set(workload_id, **kw)
        raise TimeoutError("read timeout after the update landed")

    def never_lands(workload_id: str, **kw: Any) -> None:
        raise TimeoutError("unreachable")

    def quarantine_raising(set_operator: Any, on: bool, get: Any = real_get) -> None:
        with monkeypatch.context() as m:
            m.setattr(wiring.store, "set_operator", set_operator)
            m.setattr(wiring.store, "get", get)
            with pytest.raises(TimeoutError):
                svc.quarantine("carol", "dc1-web-1", on, "over" if not on else "again")

    quarantine_raising(never_lands, True)
    assert [a.action for a in wiring.store.audit_log()[-2:]] == ["workload.quarantine", "workload.quarantine.failed"]

    # the store cannot say either: .unconfirmed (its first read answers, the read-back does not)
    reads = {"n": 0}

    def second_read_fails(workload_id: str) -> Any:
        reads["n"] += 1
        if reads["n"] > 1:
            raise TimeoutError("throttled")
        return real_get(workload_id)

    quarantine_raising(never_lands, True, get=second_read_fails)
    assert [a.action for a in wiring.store.audit_log()[-2:]] == [
        "workload.quarantine",
        "workload.quarantine.unconfirmed",
    ]

    # a binding whose grant was stored, then the read-back failed: in force, its record stands
    assert svc.provision("alice", policy_files(), "again").status == 200  # the active version's: no new one
    host = {
        "id": "bastion-1",
        "ips": ["10.20.0.5"],
        "tags": {"ringfence:role": "jumpbox", "ringfence:app": "admin", "ringfence:env": "prod"},
    }
    assert svc.register_workload("ops", host, "rack", may_bind=False).status == 201
    calls = {"n": 0}

    def read_back_fails(workload_id: str) -> Any:
        if workload_id == "bastion-1":
            calls["n"] += 1
            if calls["n"] == 2:
                raise TimeoutError("throttled")
        return real_get(workload_id)

    with monkeypatch.context() as m:
        m.setattr(wiring.store, "get", read_back_fails)
        with pytest.raises(TimeoutError):
            bind_labels(wiring, "bastion-1", {"role": "jumpbox", "app": "admin"}, "alice", "CHG-9")
    bound = wiring.store.get("bastion-1")
    assert bound is not None and bound.workload.label_grants == {"role": "jumpbox", "app": "admin"}
    assert [a.action for a in wiring.store.audit_log()[-1:]] == ["label.bind"]

    # the write that raised is rolled back with its record; the attempt is then recorded alone
    # and followed by .failed, and nothing changed
    before = wiring.store.get("dc1-web-1")
    assert before is not None and not before.op_quarantined
    quarantine_raising(lands_then_raises, True)
    after = wiring.store.get("dc1-web-1")
    assert after is not None and not after.op_quarantined
    assert [a.action for a in wiring.store.audit_log()[-2:]] == ["workload.quarantine", "workload.quarantine.failed"]
