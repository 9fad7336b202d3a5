"""Attacks on pairing keys, agent-key resets and re-registration, performed through the real admin
and agent-API routes (as ``ringfence serve`` runs them) over LocalWiring and its SQLite store."""

from __future__ import annotations

import threading
from typing import Any

import pytest
from aws_lambda_powertools.event_handler import APIGatewayRestResolver

from ringfence.adminroles import AdminRole
from ringfence.clouds.onprem import OnPremAdmin
from ringfence.control.agents import AgentApi
from ringfence.local.wiring import LocalWiring
from ringfence.routes.admin import admin_routes
from ringfence.routes.agent import agent_routes
from tests.aws.conftest import LambdaContext, rest_answer, rest_event
from tests.aws.test_attack_enroll import pause_after_the_key_check
from tests.aws.test_pipeline import AgentKey
from tests.onprem.conftest import boot

OPERATOR = "arn:aws:iam::123456789012:user/carol"
WID = "dc3-app-1"


class Plane:
    """The admin and agent routes over one wiring, and an agent's calls."""

    def __init__(self, wiring: LocalWiring, roles: frozenset[AdminRole] = frozenset(AdminRole)) -> None:
        self.wiring = wiring
        svc: OnPremAdmin = boot(wiring)
        self.admin = admin_routes(lambda: svc, onprem=lambda: svc, roles_of=lambda _: roles)
        api = AgentApi(wiring)
        self.agents = agent_routes(lambda: api)

    @staticmethod
    def call(app: APIGatewayRestResolver, method: str, path: str, body: Any = None, **kw: Any) -> tuple[int, Any]:
        event = rest_event(method, path, body, principal=OPERATOR, **kw)
        status, _, answer = rest_answer(app.resolve(event, LambdaContext()))
        return status, answer

    def register(self) -> None:
        spec = {"id": WID, "ips": ["192.168.30.41"], "tags": {"ringfence:role": "web"}}
        status, body = self.call(self.admin, "POST", "/admin/workloads", {**spec, "reason": "rack 3"})
        assert status in (200, 201), body

    def mint(self, uses: int = 5) -> str:
        status, body = self.call(
            self.admin, "POST", "/admin/pairing-keys", {"workload_id": WID, "uses": uses, "ttl": 600}
        )
        assert status == 201, body
        return str(body["pairing_key"])

    def nonce(self) -> str:
        return str(self.call(self.agents, "GET", "/v1/nonce")[1]["nonce"])

    def pair(self, pairing_key: str, key: AgentKey, text: str | None = None) -> tuple[int, Any]:
        """Enroll by pairing, signed by ``key``, presenting its key (or the key text ``text``)."""
        n = self.nonce()
        body = {
            "method": "pairing",
            "nonce": n,
            "workload_id": WID,
            "pairing_key": pairing_key,
            "agent_key": key.pem if text is None else text,
            "agent_signature": key.prove("enroll", WID, n),
        }
        return self.call(self.agents, "POST", "/v1/enroll", body)

    def refresh(self, key: AgentKey) -> tuple[int, Any]:
        n = self.nonce()
        body = {"nonce": n, "signature": key.prove("token", WID, n)}
        return self.call(self.agents, "POST", f"/v1/agents/{WID}/token", body)

    def bundle(self, token: str) -> int:
        headers = {"Authorization": f"Bearer {token}"}
        return self.call(self.agents, "GET", f"/v1/agents/{WID}/bundle", headers=headers)[0]


@pytest.fixture
def plane(wiring: LocalWiring) -> Plane:
    p = Plane(wiring)
    p.register()
    assert wiring.settle(60)
    return p


def test_attack_a_pairing_key_minted_before_an_agent_key_reset_enrolls_nothing_after_it(plane: Plane) -> None:
    """The host's disk was replaced and the operator resets its agent key. The pairing key first
    used to enroll it had uses left and leaked (a ticket, a shell history): before, whoever held
    it bound their own key after the reset and received the workload's bundle."""
    leaked = plane.mint(uses=5)
    status, body = plane.pair(leaked, AgentKey())
    assert status == 200, body
    status, out = plane.call(plane.admin, "DELETE", f"/admin/workloads/{WID}/agent-key", {"reason": "disk replaced"})
    assert status == 200 and out["pairing_keys_revoked"] == 1, out
    status, body = plane.pair(leaked, AgentKey())
    assert status == 401 and "unknown, expired, used up" in body["detail"], body
    assert plane.wiring.store.agent_key(WID) is None, "nothing bound by the leaked key"
    # the operator's way back: a key minted after the reset enrolls the reinstalled host
    status, body = plane.pair(plane.mint(uses=1), AgentKey())
    assert status == 200 and plane.bundle(body["token"]) == 200, body
    (reset,) = [a for a in plane.wiring.store.audit_log() if a.action == "agent-key.reset"]
    assert reset.detail["pairing_keys_revoked"] == 1


def test_attack_a_revoked_pairing_key_enrolls_nothing(plane: Plane, wiring: LocalWiring) -> None:
    """A pairing key leaked before its host was installed: the operator revokes it."""
    leaked = plane.mint(uses=3)
    also = plane.mint(uses=1)
    readers = admin_routes(lambda: OnPremAdmin(wiring), roles_of=lambda _: frozenset({AdminRole.READER}))
    status, body = Plane.call(readers, "DELETE", f"/admin/workloads/{WID}/pairing-keys", {})
    assert status == 403 and "pairing.revoke" in body["detail"], body
    status, body = plane.call(plane.admin, "DELETE", f"/admin/workloads/{WID}/pairing-keys", {"reason": "leaked"})
    assert status == 200 and body["pairing_keys_revoked"] == 2, body
    for key in (leaked, also):
        status, body = plane.pair(key, AgentKey())
        assert status == 401 and "unknown, expired, used up" in body["detail"], body
    assert plane.call(plane.admin, "DELETE", "/admin/workloads/dc9-nothere/pairing-keys", {})[0] == 404
    (rec,) = [a for a in wiring.store.audit_log() if a.action == "pairing.revoke"]
    assert rec.principal == OPERATOR and rec.reason == "leaked" and rec.detail == {"pairing_keys_revoked": 2}


def test_attack_a_reregistered_id_keeps_nothing_of_the_old_hosts_agent(plane: Plane, wiring: LocalWiring) -> None:
    """The id is deregistered, and registered again later for another host. A pairing that raced
    the deregistration bound the old host's key after it; that key, its token and the pairing
    keys of the old host must not carry over to the new host (they would receive its bundle)."""
    old = AgentKey()
    leftover = plane.mint(uses=5)
    status, body = plane.pair(leftover, old)
    assert status == 200, body
    token = body["token"]
    assert plane.call(plane.admin, "DELETE", f"/admin/workloads/{WID}", {"reason": "decommissioned"})[0] == 200
    # what a pairing in flight across the deregistration leaves: its key bound, its token written
    wiring.store.bind_agent_key(WID, old.pem, replace=True)
    wiring.store.put_pairing("leftover-hash", WID, uses=2, ttl=600)
    plane.register()
    assert wiring.settle(60)
    assert wiring.store.agent_key(WID) is None
    assert plane.refresh(old)[0] == 401, "the old host's key renews nothing"
    assert plane.bundle(token) == 401
    assert not wiring.store.use_pairing("leftover-hash", WID, agent_key=AgentKey().pem), (
        "the old host's pairing keys are gone"
    )
    status, body = plane.pair(plane.mint(uses=1), AgentKey())
    assert status == 200 and plane.bundle(body["token"]) == 200, body


def test_attack_a_token_renewal_racing_an_agent_key_reset_authorizes_nothing(
    plane: Plane, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The agent key was stolen and the operator resets it while the thief's renewal is in flight:
    the renewal checked the stolen key before the reset and writes its token after. Before, that
    token authorized for its whole lifetime; a token now holds only while the key it was issued
    under is bound."""
    stolen = AgentKey()
    status, body = plane.pair(plane.mint(uses=1), stolen)
    assert status == 200, body
    checked, go = pause_after_the_key_check(monkeypatch)
    out: dict[str, tuple[int, Any]] = {}
    renewal = threading.Thread(target=lambda: out.update(renewed=plane.refresh(stolen)))
    renewal.start()
    assert checked.wait(30), "the renewal checked the key"
    status, reset = plane.call(plane.admin, "DELETE", f"/admin/workloads/{WID}/agent-key", {"reason": "key stolen"})
    assert status == 200 and reset["agent_key_dropped"], reset
    go.set()
    renewal.join(30)
    status, body = out["renewed"]
    assert status == 401 and "was reset" in body["detail"], body
    assert not [a for a in plane.wiring.store.audit_log() if a.action == "token.refresh"], "no token issued"
    # the legitimate host enrolls again with a key minted after the reset
    status, body = plane.pair(plane.mint(uses=1), AgentKey())
    assert status == 200 and plane.bundle(body["token"]) == 200, body


def test_attack_after_a_reset_that_names_the_next_key_no_other_key_binds(plane: Plane) -> None:
    """A pairing key minted for the reinstalled host leaks on its way there: with the reset naming
    the new agent's key, the leaked key binds no other key and issues no keyless token."""
    from ringfence.control.credentials import agent_key_fingerprint

    assert plane.pair(plane.mint(uses=1), AgentKey())[0] == 200
    reinstalled = AgentKey()
    body = {"reason": "disk replaced", "next_agent_key": agent_key_fingerprint(reinstalled.pem)}
    status, out = plane.call(plane.admin, "DELETE", f"/admin/workloads/{WID}/agent-key", body)
    assert status == 200 and out["next_agent_key"] == body["next_agent_key"], out
    leaked = plane.mint(uses=5)
    status, answer = plane.pair(leaked, AgentKey())
    assert status == 401 and "not the one named" in answer["detail"], answer
    n = plane.nonce()
    keyless = {"method": "pairing", "nonce": n, "workload_id": WID, "pairing_key": leaked}
    status, answer = plane.call(plane.agents, "POST", "/v1/enroll", keyless)
    assert status == 401 and "needs agent_key" in answer["detail"], answer
    assert plane.wiring.store.agent_key(WID) is None
    status, answer = plane.pair(leaked, reinstalled)
    assert status == 200 and plane.bundle(answer["token"]) == 200, answer
    # once the named key is bound, the expectation has done its job: the host reinstalled again
    # later re-binds with a new pairing key, as always
    status, answer = plane.pair(plane.mint(uses=1), AgentKey())
    assert status == 200, answer


def test_attack_a_pairing_racing_an_agent_key_reset_binds_nothing(
    plane: Plane, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A leaked pairing key is used while the operator resets the workload: its use was checked
    before the reset revoked the pairing keys, its key bound after the reset dropped the old one.
    Before, that key stayed bound (and its token worked); the use and the binding are now one
    atomic step, which the reset's revocation either precedes or undoes."""
    leaked = plane.mint(uses=5)
    assert plane.pair(leaked, AgentKey())[0] == 200
    store = plane.wiring.store
    real = type(store).use_pairing
    resets: list[int] = []

    def then_reset(self: Any, *args: Any, **kwargs: Any) -> bool:
        spent = bool(real(self, *args, **kwargs))
        if spent and not resets:  # the operator's reset lands right after the use
            reset = plane.call(plane.admin, "DELETE", f"/admin/workloads/{WID}/agent-key", {"reason": "leak"})
            resets.append(reset[0])
        return spent

    monkeypatch.setattr(type(store), "use_pairing", then_reset)
    status, body = plane.pair(leaked, AgentKey())
    assert resets == [200]
    assert status == 401 and "was reset" in body["detail"], body
    assert store.agent_key(WID) is None, "the thief's key is not bound after the reset"


def test_attack_a_key_text_holding_the_named_key_and_the_attackers_does_not_pass_the_reset(plane: Plane) -> None:
    """After a reset naming the reinstalled agent's key, a leaked pairing key and that key's public
    half (no secret) behind the attacker's own block (with a header line) used to bind a text the
    attacker's key verifies: it renewed tokens for good, the named agent could not."""
    from ringfence.control.credentials import agent_key_fingerprint
    from tests.aws.test_attack_enroll import two_keys

    assert plane.pair(plane.mint(uses=1), AgentKey())[0] == 200
    reinstalled = AgentKey()
    body = {"reason": "disk replaced", "next_agent_key": agent_key_fingerprint(reinstalled.pem)}
    assert plane.call(plane.admin, "DELETE", f"/admin/workloads/{WID}/agent-key", body)[0] == 200
    leaked = plane.mint(uses=5)
    attacker = AgentKey()
    status, answer = plane.pair(leaked, attacker, two_keys(attacker, reinstalled.pem, header="X-Y: z"))
    assert status in (400, 422) and "one Ed25519 public key" in str(answer), (status, answer)
    assert plane.wiring.store.agent_key(WID) is None
    status, answer = plane.pair(leaked, reinstalled)
    assert status == 200 and plane.bundle(answer["token"]) == 200, answer
    assert plane.refresh(reinstalled)[0] == 200


def test_a_pairing_that_takes_the_identity_from_a_bound_agent_key_is_audited_as_a_replacement(plane: Plane) -> None:
    """A pairing key with uses left rebinds (a reinstalled host, or a key that leaked): the audit
    log says which key it replaced, apart from a first binding and from the same agent pairing again."""
    from ringfence.control.credentials import agent_key_id

    first, second = AgentKey(), AgentKey()
    key = plane.mint(uses=3)
    assert plane.pair(key, first)[0] == 200
    assert plane.pair(key, first)[0] == 200  # the same agent again: no replacement
    assert plane.pair(key, second)[0] == 200
    replaced = [r for r in plane.wiring.store.audit_log() if r.action == "agent.key.replaced" and r.target == WID]
    assert len(replaced) == 1, replaced
    assert replaced[0].detail["replaced_key"] == agent_key_id(first.pem)
    assert replaced[0].principal == f"agent-key:{agent_key_id(second.pem)}"
    assert plane.refresh(first)[0] == 401 and plane.refresh(second)[0] == 200


def test_a_key_bound_before_keys_were_read_strictly_is_reset_and_refused_with_a_record(plane: Plane) -> None:
    """A text holding two keys, bound before the strict read (the attack's own, or a key with a
    comment line): it renews nothing now, and the operator's reset that clears it, and a later
    claim refused against it, are audited like any other (they had raised before their record)."""
    from ringfence.agentapi import EnrollRequest
    from ringfence.control.agents import AgentApi
    from ringfence.control.enroll import ProofError
    from tests.aws.test_attack_enroll import two_keys

    victim, attacker, newcomer = AgentKey(), AgentKey(), AgentKey()
    store = plane.wiring.store
    store.bind_agent_key(WID, two_keys(attacker, victim.pem, header="X-Y: z"))
    assert plane.refresh(attacker)[0] == 401 and plane.refresh(victim)[0] == 401
    req = EnrollRequest(
        method="aws-iid", nonce="n", agent_key=newcomer.pem, agent_signature=newcomer.prove("enroll", WID, "n")
    )
    with pytest.raises(ProofError, match="another agent key"):
        AgentApi(plane.wiring).bind_key(req, WID)
    [refused] = [r for r in store.audit_log() if r.action == "agent.enroll.refused" and r.target == WID]
    assert refused.detail["bound_key"] == "(not one Ed25519 key)"
    status, out = plane.call(plane.admin, "DELETE", f"/admin/workloads/{WID}/agent-key", {"reason": "pre-upgrade key"})
    assert status == 200, out
    [reset] = [r for r in store.audit_log() if r.action == "agent-key.reset" and r.target == WID]
    assert reset.detail["agent_key"] == "(not one Ed25519 key)" and store.agent_key(WID) is None
    status, answer = plane.pair(plane.mint(uses=1), newcomer)
    assert status == 200 and plane.bundle(answer["token"]) == 200, answer
