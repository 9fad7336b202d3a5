"""A registration of a deregistered id decided from a stale read (SQLite; tests/aws holds the
DynamoDB one): registration A reads the tombstone, then registration B of the same id lands, an
incident responder quarantines the new host, a policy author sets it to enforce and its agent
enrolls. Before, A cleared the mode and quarantine (and revoked the agent's token) of the id
whatever it then held: the live, compromised host left quarantine with no record saying so and
no SafeguardsLowered, A's own write then refused (409) or landing as an update (an import, 200).
Now the clear lands only with A's write and only over the tombstone A read: A is refused
(409, ``.failed`` recorded) and the live host keeps its quarantine, mode and token."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from ringfence.clouds.onprem import OnPremAdmin
from ringfence.control.admin import SAFEGUARDS_LOWERED
from ringfence.control.api import secret_hash
from ringfence.local.wiring import LocalWiring
from ringfence.model import Mode
from tests.onprem.test_wiring import enroll

TAGS = {"ringfence:role": "web", "ringfence:app": "ordering", "ringfence:env": "prod", "ringfence:loc": "ca"}
SPEC = {"id": "x1", "ips": ["10.90.0.1"], "tags": TAGS}


def _admins(w: LocalWiring) -> tuple[OnPremAdmin, OnPremAdmin, list[str]]:
    """Two admin processes' services over one store; what A counts."""
    lowered: list[str] = []
    a, b = OnPremAdmin(w), OnPremAdmin(w)
    a.metric = lambda name, value: lowered.append(name) if name == SAFEGUARDS_LOWERED else None
    assert a.register_workload("otto", SPEC).status == 201
    assert a.set_mode("paula", "x1", Mode.IDLE, "old box").status == 200
    assert a.deregister_workload("otto", "x1", "decommissioned").status == 200
    lowered.clear()  # the idle above counted
    return a, b, lowered


def _meanwhile(a: OnPremAdmin, b: OnPremAdmin, w: LocalWiring, tokens: list[str]) -> None:
    """After A read the tombstone (its governing-policy read comes next), B registers the id, ivy
    quarantines the new host, paula sets enforce and the new host's agent enrolls."""
    read: Callable[[], Any] = a._governing
    done: list[int] = []

    def then() -> Any:
        if not done:
            done.append(1)
            assert b.register_workload("cmdb-sync", SPEC).status == 200
            assert b.quarantine("ivy", "x1", True, "INC-1 compromised").status == 200
            assert b.set_mode("paula", "x1", Mode.ENFORCE, "CHG-9").status == 200
            key = b.pairing_key("otto", "x1", uses=1, ttl=600).body["pairing_key"]
            status, body = enroll(w, "x1", key)
            assert status == 200, body
            tokens.append(body["token"])
        return read()

    a._governing = then  # type: ignore[method-assign]


def _live_host_untouched(w: LocalWiring, token: str) -> None:
    rec = w.store.get("x1")
    assert rec is not None and rec.state == "running"
    assert rec.op_quarantined, "a stale registration released the live host's quarantine"
    assert rec.op_mode is Mode.ENFORCE, f"a stale registration cleared the live host's mode ({rec.op_mode})"
    assert w.store.token_workload(secret_hash(token)) == "x1", "a stale registration revoked the live host's token"


def test_attack_stale_reregistration_keeps_the_live_hosts_quarantine(wiring: LocalWiring) -> None:
    a, b, lowered = _admins(wiring)
    tokens: list[str] = []
    _meanwhile(a, b, wiring, tokens)
    r = a.register_workload("otto", SPEC, "new box")
    _live_host_untouched(wiring, tokens[0])
    assert r.status == 409, r.body
    assert lowered == []
    failed = [x for x in wiring.store.audit_log() if x.action == "workload.register.failed"]
    assert failed and failed[-1].principal == "otto"


def test_attack_stale_reimport_keeps_the_live_hosts_quarantine(wiring: LocalWiring) -> None:
    a, b, lowered = _admins(wiring)
    tokens: list[str] = []
    _meanwhile(a, b, wiring, tokens)
    r = a.import_cmdb("otto", "id,ips\nx1,10.90.0.1\n", "c.csv", "nightly")
    _live_host_untouched(wiring, tokens[0])
    assert r.status == 409, r.body
    assert lowered == []
    assert any(x.action == "workload.import.failed" for x in wiring.store.audit_log())


def test_reregistration_clears_with_its_write_and_counts_the_quarantine(wiring: LocalWiring) -> None:
    """No race: the tombstone's mode and quarantine go with the write, counted once."""
    a, _, lowered = _admins(wiring)
    wiring.store.set_operator("x1", quarantined=True)  # a quarantine left on the tombstone
    r = a.register_workload("otto", SPEC, "new box")
    assert r.status == 200, r.body
    rec = wiring.store.get("x1")
    assert rec is not None and rec.op_mode is None and not rec.op_quarantined
    assert lowered == [SAFEGUARDS_LOWERED]
    reg = [x for x in wiring.store.audit_log() if x.action == "workload.register"][-1]
    assert reg.detail["operator_cleared"] == {"mode": "idle", "quarantined": True}
    assert r.body["operator_cleared"] == {"mode": "idle", "quarantined": True}, "the answer hides what it cleared"
    again = a.register_workload("otto", SPEC, "same box")
    assert again.status == 200 and "operator_cleared" not in again.body, again.body


def test_reimport_answers_what_it_cleared_per_workload(wiring: LocalWiring) -> None:
    a, _, _ = _admins(wiring)
    assert a.register_workload("otto", {"id": "y1", "ips": ["10.90.0.2"], "tags": TAGS}).status == 201
    r = a.import_cmdb("otto", "id,ips\nx1,10.90.0.1\ny1,10.90.0.2\n", "c.csv", "nightly")
    assert r.status == 200, r.body
    assert r.body["operator_cleared"] == {"x1": {"mode": "idle"}}, r.body


def test_attack_refused_import_leaves_the_tombstones_operator_state(wiring: LocalWiring) -> None:
    """An import refused "nothing imported" (here an address taken between the file's check and its
    write) cleared nothing before: the tombstone's mode and quarantine went, SafeguardsLowered
    counted, with the import's record saying it was refused."""
    a, b, lowered = _admins(wiring)
    wiring.store.set_operator("x1", quarantined=True)
    read: Callable[[], Any] = a._governing

    def then() -> Any:  # after the file was checked: another caller takes the address of its row y
        assert b.register_workload("otto", {"id": "z", "ips": ["10.90.0.7"], "tags": TAGS}).status == 201
        return read()

    a._governing = then  # type: ignore[method-assign]
    r = a.import_cmdb("otto", "id,ips\nx1,10.90.0.1\ny,10.90.0.7\n", "c.csv", "nightly")
    assert r.status in (400, 409) and "nothing imported" in r.body["error"], r.body
    rec = wiring.store.get("x1")
    assert rec is not None and rec.state == "terminated"
    assert rec.op_mode is Mode.IDLE and rec.op_quarantined, "a refused import cleared the tombstone's operator state"
    assert lowered == [], "a refused import counted SafeguardsLowered"
    # audit first: the record says what the import clears, the .failed one that it did not land
    imported = [x for x in wiring.store.audit_log() if x.action.startswith("workload.import")]
    assert [x.action for x in imported] == ["workload.import", "workload.import.failed"]
    assert imported[0].detail["operator_cleared"] == {"x1": {"mode": "idle", "quarantined": True}}
