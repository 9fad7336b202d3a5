"""A registration of a deregistered id decided from a stale read must not cut off the host
registered meanwhile (SQLite here; tests/aws/test_attack_onprem_reregister_ddb.py runs the same
race over DynamoDB). Registration A reads the tombstone; right after A's registration read it
again to drop the old host's credentials, registration B of the same id lands through the admin
routes, a pairing key is minted for the new host and its agent enrolls with it. Before, A then
dropped the id's credentials all the same (its read said "still the tombstone"): the live host's
fresh token and agent key were revoked, recorded as a ``token.revoke`` of A's re-registration,
and A's own write was refused (409). Now the drop is one store transaction with the check that the
id is still the tombstone read: A drops nothing, is refused, and the live host keeps its token."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import pytest

from ringfence.clouds.onprem import OnPremAdmin
from ringfence.local.wiring import LocalWiring
from tests.aws.test_pipeline import AgentKey
from tests.onprem.test_attack_pairing_keys import WID, Plane

SPEC = {"id": WID, "ips": ["192.168.30.41"], "tags": {"ringfence:role": "web"}}


def _register(a: OnPremAdmin) -> Any:
    return a.register_workload("otto", SPEC, "new box")


def _import(a: OnPremAdmin) -> Any:
    return a.import_cmdb("otto", f"id,ips\n{WID},192.168.30.41\n", "c.csv", "nightly")


def stale_registration_meets_a_live_host(
    wiring: LocalWiring, monkeypatch: pytest.MonkeyPatch, stale: Callable[[OnPremAdmin], Any]
) -> None:
    """The race, deterministically: A's first store read after it set out to drop the old host's
    credentials (its read of the id again, or of its token) returns, then B registers the id, a
    key is minted and the new host enrolls (the real admin and agent routes), then A goes on."""
    plane = Plane(wiring)
    plane.register()
    old = AgentKey()
    status, body = plane.pair(plane.mint(uses=1), old)
    assert status == 200, body
    old_token = body["token"]
    assert plane.call(plane.admin, "DELETE", f"/admin/workloads/{WID}", {"reason": "decommissioned"})[0] == 200
    # a pairing key that raced the deregistration: the winning registration (B) must drop it
    wiring.store.put_pairing("raced-hash", WID, uses=2, ttl=600)
    assert wiring.settle(60)

    a = OnPremAdmin(wiring)  # another admin process, its read of the tombstone stale by then
    armed: list[bool] = []
    live: dict[str, Any] = {}
    store = wiring.store

    def after_the_read(name: str) -> Callable[..., Any]:
        read: Callable[..., Any] = getattr(store, name)

        def then(*args: Any, **kwargs: Any) -> Any:
            got = read(*args, **kwargs)
            if armed and not live:
                armed.clear()
                plane.register()  # B, through the admin routes
                new = AgentKey()
                status, body = plane.pair(plane.mint(uses=1), new)
                assert status == 200, body
                live.update(key=new, token=body["token"])
            return got

        return then

    for name in ("get", "get_many", "active_token"):
        monkeypatch.setattr(store, name, after_the_read(name))
    drop: Callable[[dict[str, Any]], None] = a._registered_anew

    def registered_anew(anew: dict[str, Any]) -> None:
        armed.append(True)
        drop(anew)

    monkeypatch.setattr(a, "_registered_anew", registered_anew)
    revocations = sum(x.action == "token.revoke" for x in store.audit_log())

    r = stale(a)
    assert live, "B registered and the new host enrolled between A's read and its drop"
    assert wiring.settle(60)
    assert plane.bundle(live["token"]) == 200, "a stale registration revoked the live host's token"
    assert store.agent_key(WID) == live["key"].pem, "a stale registration unbound the live host's agent key"
    assert sum(x.action == "token.revoke" for x in store.audit_log()) == revocations, (
        "a token.revoke recorded for the live host's token"
    )
    assert r.status == 409, r.body
    # the winner dropped everything of the old host and of the raced pairing key
    assert plane.bundle(old_token) == 401
    assert plane.refresh(old)[0] == 401
    assert not store.use_pairing("raced-hash", WID, agent_key=AgentKey().pem), "the raced pairing key outlived B"


def test_attack_stale_reregistration_leaves_the_live_hosts_credentials(
    wiring: LocalWiring, monkeypatch: pytest.MonkeyPatch
) -> None:
    stale_registration_meets_a_live_host(wiring, monkeypatch, _register)


def test_attack_stale_reimport_leaves_the_live_hosts_credentials(
    wiring: LocalWiring, monkeypatch: pytest.MonkeyPatch
) -> None:
    stale_registration_meets_a_live_host(wiring, monkeypatch, _import)


def test_the_register_route_answers_what_a_reregistration_cleared(wiring: LocalWiring) -> None:
    """Through the admin route (its answer's model): the old host's ``idle`` and quarantine, cleared
    by the write, are in the 200 answer as in the audit record."""
    plane = Plane(wiring)
    plane.register()
    for method, path, body in (("PUT", "mode", {"mode": "idle"}), ("POST", "quarantine", {})):
        status, answer = plane.call(plane.admin, method, f"/admin/workloads/{WID}/{path}", {**body, "reason": "IR-7"})
        assert status == 200, (path, answer)
    assert plane.call(plane.admin, "DELETE", f"/admin/workloads/{WID}", {"reason": "decommissioned"})[0] == 200
    status, answer = plane.call(plane.admin, "POST", "/admin/workloads", {**SPEC, "reason": "new box"})
    assert status == 200, answer
    assert answer["operator_cleared"] == {"mode": "idle", "quarantined": True}, answer
