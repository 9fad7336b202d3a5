"""A credential step keyed by a workload id that read the old host, landing after the id was
deregistered and registered again (SQLite under the real ``ringfence serve``; tests/aws holds the
DynamoDB twin). Between the route's read and its write, onboarding deregisters the host and
registers another one under its id (and its agent enrolls), through the same server. Before, the
step landed on the new host: a pairing key requested for the old box enrolled an agent as the new
one, a revocation of the old box's pairing keys revoked the new one's, and an agent-key reset cut
the new host's agent off and named, for it, the key meant for the old box. Now each is refused: 409
"workload changed meanwhile: nothing set", nothing stored, the attempt audited and followed by its
``.failed`` record. And a deregistration whose credential drop runs after the id was registered
again (and the new host enrolled) drops nothing of the new host's."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import httpx
import pytest

from ringfence.control import admin as admin_service
from ringfence.store.base import agent_key_fingerprint_of
from tests.aws.test_pipeline import AgentKey
from tests.onprem.conftest import Served
from tests.onprem.test_attack_operator_change_race import NEW_BOX, WID, refused_and_audited, replaced_meanwhile


class Agent:
    """An agent of WID, over the server's agent routes: its key, and its token once enrolled."""

    def __init__(self, served: Served) -> None:
        self.served, self.key, self.token = served, AgentKey(), ""

    def _call(self, method: str, path: str, body: Any = None, token: str = "") -> httpx.Response:
        headers = {"Authorization": f"Bearer {token}"} if token else {}
        return httpx.request(method, self.served.url + path, json=body, headers=headers, timeout=60)

    def enroll(self, pairing_key: str) -> int:
        nonce = self._call("GET", "/v1/nonce").json()["nonce"]
        body = {"method": "pairing", "nonce": nonce, "workload_id": WID, "pairing_key": pairing_key}
        r = self._call("POST", "/v1/enroll", {**body, **self.key.enroll_fields(WID, nonce)})
        if r.status_code == 200:
            self.token = r.json()["token"]
        return r.status_code

    def bundle(self) -> int:
        return self._call("GET", f"/v1/agents/{WID}/bundle", token=self.token).status_code


def mint(served: Served, uses: int = 1) -> str:
    r = served.call("otto", "POST", "/admin/pairing-keys", {"workload_id": WID, "uses": uses, "ttl": 600})
    assert r.status_code == 201, r.text
    return str(r.json()["pairing_key"])


def enrolled(served: Served) -> Agent:
    agent = Agent(served)
    assert agent.enroll(mint(served)) == 200
    return agent


def refused_after_its_request(served: Served, r: Any, action: str) -> None:
    """As refused_and_audited, for the actions recorded as ``<action>.requested`` first."""
    assert r.status_code == 409, r.text
    assert r.json()["error"] == "workload changed meanwhile: nothing set" and WID in r.json()["detail"], r.text
    requested = served.audit(f"{action}.requested")[-1]
    (failed,) = served.audit(f"{action}.failed")
    assert failed.detail["audit_id"] == requested.id and "registered again" in failed.detail["why"], failed
    assert not served.audit(action), f"{action} recorded as made"


def new_host_enrolls(served: Served, new: dict[str, Agent]) -> Callable[[], None]:
    def then() -> None:
        new["agent"] = enrolled(served)

    return then


def test_attack_a_pairing_key_read_before_a_reregistration_does_not_enroll_the_new_host(
    served: Served, monkeypatch: pytest.MonkeyPatch
) -> None:
    done = replaced_meanwhile(served, monkeypatch, admin_service, "is_deregistered")
    r = served.call("otto", "POST", "/admin/pairing-keys", {"workload_id": WID, "uses": 1, "ttl": 600})
    assert done, "the race happened"
    if r.status_code == 201:
        intruder = Agent(served)
        assert intruder.enroll(r.json()["pairing_key"]) != 200, "a key meant for the old host enrolled the new one"
    refused_and_audited(served, r, "pairing.create", "otto")
    # no race: a key minted for the new host enrolls it
    monkeypatch.undo()
    assert enrolled(served).bundle() == 200


def test_attack_a_pairing_key_revocation_read_before_a_reregistration_keeps_the_new_hosts_keys(
    served: Served, monkeypatch: pytest.MonkeyPatch
) -> None:
    keys: list[str] = []
    done = replaced_meanwhile(served, monkeypatch, admin_service.Admin, "_audit", lambda: keys.append(mint(served)))
    r = served.call("otto", "DELETE", f"/admin/workloads/{WID}/pairing-keys", {"reason": "old box's key leaked"})
    assert done and keys, "the race happened"
    assert Agent(served).enroll(keys[0]) == 200, "a revocation meant for the old host revoked the new host's key"
    refused_after_its_request(served, r, "pairing.revoke")


def test_attack_an_agent_key_reset_read_before_a_reregistration_leaves_the_new_hosts_agent(
    served: Served, monkeypatch: pytest.MonkeyPatch
) -> None:
    new: dict[str, Agent] = {}
    done = replaced_meanwhile(served, monkeypatch, admin_service.Admin, "_audit", new_host_enrolls(served, new))
    reinstalled_old_box = AgentKey()
    body = {"next_agent_key": agent_key_fingerprint_of(reinstalled_old_box.pem), "reason": "old box reinstalled"}
    r = served.call("otto", "DELETE", f"/admin/workloads/{WID}/agent-key", body)
    assert done and new, "the race happened"
    store = served.wiring.store
    assert new["agent"].bundle() == 200, "a reset meant for the old host revoked the new host's token"
    assert store.agent_key(WID) == new["agent"].key.pem, "a reset meant for the old host unbound the new host's key"
    assert store.expected_agent_key(WID) is None, "the new host now accepts only the key named for the old one"
    refused_after_its_request(served, r, "agent-key.reset")


def test_attack_a_deregistration_does_not_cut_off_the_host_registered_after_its_tombstone(
    served: Served, monkeypatch: pytest.MonkeyPatch
) -> None:
    store = served.wiring.store
    old = enrolled(served)
    write = store.observe_addressed
    new: dict[str, Agent] = {}
    done: list[int] = []

    def tombstone_then_a_new_host(recs: Any, *args: Any, **kwargs: Any) -> Any:
        got = write(recs, *args, **kwargs)
        if not done:  # the deregistration's tombstone landed: a new host is registered and enrolls
            done.append(1)
            r = served.call("otto", "POST", "/admin/workloads", {**NEW_BOX, "reason": "new box, same name"})
            assert r.status_code == 200, r.text
            new["agent"] = enrolled(served)
        return got

    monkeypatch.setattr(store, "observe_addressed", tombstone_then_a_new_host)
    r = served.call("otto", "DELETE", f"/admin/workloads/{WID}", {"reason": "decommissioned"})
    assert new, "the race happened"
    assert r.status_code == 200, r.text
    rec = store.get(WID)
    assert rec is not None and rec.state == "running" and rec.workload.ips == NEW_BOX["ips"]
    assert new["agent"].bundle() == 200, "the deregistration revoked the token of the host registered after it"
    assert store.agent_key(WID) == new["agent"].key.pem, "the deregistration unbound the new host's agent key"
    assert old.bundle() == 401, "the old host's token outlived its deregistration"


def test_a_deregistration_whose_answer_was_lost_drops_the_old_hosts_credentials(
    served: Served, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The tombstone landed but its write raised: it is the tombstone this request wrote, so the
    credentials go all the same (and the deregistration is answered as made)."""
    store = served.wiring.store
    old = enrolled(served)
    spare = mint(served, uses=2)
    write = store.observe_addressed

    def landed_then_lost(recs: Any, *args: Any, **kwargs: Any) -> Any:
        write(recs, *args, **kwargs)
        raise RuntimeError("the answer was lost")

    monkeypatch.setattr(store, "observe_addressed", landed_then_lost)
    r = served.call("otto", "DELETE", f"/admin/workloads/{WID}", {"reason": "decommissioned"})
    assert r.status_code == 200, r.text
    assert old.bundle() == 401 and store.agent_key(WID) is None
    assert Agent(served).enroll(spare) != 200, "the old host's pairing key outlived its deregistration"
