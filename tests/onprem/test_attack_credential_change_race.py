"""A credential step keyed by a workload id that read the old host, landing after the id was
registered again (SQLite under the real ``ringfence serve``; tests/aws holds the DynamoDB twin).
Between the route's read and its write, onboarding registers another host under its id (and its
agent enrolls), through the same server: ``anew``, after deregistering the old one; ``in_place``,
without (200 not created: the ``governed_rev`` stays, and so do the old host's token, agent key and
pairing keys). Before, the step landed on the new host: a pairing key requested for the old box
enrolled an agent as the new one, a revocation of the old box's pairing keys revoked the new one's,
and an agent-key reset cut the new host's agent off and named, for it, the key meant for the old
box. Now each is refused: 409 "workload changed meanwhile: nothing set", nothing stored, the
attempt audited and followed by its ``.failed`` record (in place, as the registration time is part
of the as-read check). An enrolled agent's heartbeats and polls between the read and the write
move nothing that check compares: every operator route lands. And a deregistration whose
credential drop runs after the id was registered again (and the new host enrolled) drops nothing
of the new host's."""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import Any

import httpx
import pytest

from ringfence.control import admin as admin_service
from ringfence.control import governance
from ringfence.model import Mode
from ringfence.store.base import agent_key_fingerprint_of
from tests.aws.test_pipeline import AgentKey
from tests.onprem.conftest import Served
from tests.onprem.test_attack_operator_change_race import NEW_BOX, RACE, WID, raced, refused_and_audited


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


@RACE
def test_attack_a_pairing_key_read_before_a_reregistration_does_not_enroll_the_new_host(
    served: Served, monkeypatch: pytest.MonkeyPatch, race: str
) -> None:
    done = raced(served, monkeypatch, admin_service, "is_deregistered", race)
    r = served.call("otto", "POST", "/admin/pairing-keys", {"workload_id": WID, "uses": 1, "ttl": 600})
    assert done, "the race happened"
    if r.status_code == 201:
        intruder = Agent(served)
        assert intruder.enroll(r.json()["pairing_key"]) != 200, "a key meant for the old host enrolled the new one"
    refused_and_audited(served, r, "pairing.create", "otto")
    # no race: a key minted for the new host enrolls it
    monkeypatch.undo()
    assert enrolled(served).bundle() == 200


@RACE
def test_attack_a_pairing_key_revocation_read_before_a_reregistration_keeps_the_new_hosts_keys(
    served: Served, monkeypatch: pytest.MonkeyPatch, race: str
) -> None:
    keys: list[str] = []
    done = raced(served, monkeypatch, admin_service.Admin, "_audit", race, lambda: keys.append(mint(served)))
    r = served.call("otto", "DELETE", f"/admin/workloads/{WID}/pairing-keys", {"reason": "old box's key leaked"})
    assert done and keys, "the race happened"
    assert Agent(served).enroll(keys[0]) == 200, "a revocation meant for the old host revoked the new host's key"
    refused_after_its_request(served, r, "pairing.revoke")


@RACE
def test_attack_an_agent_key_reset_read_before_a_reregistration_leaves_the_new_hosts_agent(
    served: Served, monkeypatch: pytest.MonkeyPatch, race: str
) -> None:
    new: dict[str, Agent] = {}
    done = raced(served, monkeypatch, admin_service.Admin, "_audit", race, new_host_enrolls(served, new))
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


# --- ordinary traffic between the read and the write: every route lands --------------------------


def agent_traffic(served: Served, agent: Agent) -> None:
    """What an enrolled agent does all the time: heartbeats and bundle polls (answered)."""
    for _ in range(2):
        hb = {"applied_version": None, "mode": None, "healthy": True}
        r = httpx.post(
            f"{served.url}/v1/agents/{WID}/heartbeat",
            json=hb,
            headers={"Authorization": f"Bearer {agent.token}"},
            timeout=60,
        )
        assert r.status_code == 200, r.text
        assert agent.bundle() == 200


ROUTES: dict[str, tuple[str, str, str, dict[str, Any], Any, str, int]] = {
    # name: (who, method, path, body, hooked (target, name) below, action, status)
    "mode": ("paula", "PUT", f"/admin/workloads/{WID}/mode", {"mode": "idle", "reason": "r"}, 0, "workload.mode", 200),
    "quarantine": ("ivy", "POST", f"/admin/workloads/{WID}/quarantine", {"reason": "r"}, 0, "workload.quarantine", 200),
    "release": ("ivy", "DELETE", f"/admin/workloads/{WID}/quarantine", {"reason": "r"}, 0, "workload.release", 200),
    "bind": (
        "paula",
        "PUT",
        f"/admin/workloads/{WID}/labels",
        {"labels": {"role": "jumpbox"}, "reason": "r"},
        1,
        "label.bind",
        200,
    ),
    "pairing": (
        "otto",
        "POST",
        "/admin/pairing-keys",
        {"workload_id": WID, "uses": 1, "ttl": 600},
        0,
        "pairing.create",
        201,
    ),
    "revoke": ("otto", "DELETE", f"/admin/workloads/{WID}/pairing-keys", {"reason": "r"}, 2, "pairing.revoke", 200),
    "reset": ("otto", "DELETE", f"/admin/workloads/{WID}/agent-key", {"reason": "r"}, 2, "agent-key.reset", 200),
}


@pytest.mark.parametrize("route", sorted(ROUTES))
def test_an_enrolled_agents_heartbeats_and_polls_between_the_read_and_the_write_refuse_nothing(
    served: Served, monkeypatch: pytest.MonkeyPatch, route: str
) -> None:
    who, method, path, body, hooked, action, status = ROUTES[route]
    agent = enrolled(served)
    if route == "release":
        assert served.call("ivy", "POST", f"/admin/workloads/{WID}/quarantine", {"reason": "IR"}).status_code == 200
    served.wiring.store.set_liveness(WID, heartbeat=time.time() - 3600)  # the next heartbeat is written
    read = served.wiring.store.get(WID)
    target, name = [(admin_service, "is_deregistered"), (governance, "bind"), (admin_service.Admin, "_audit")][hooked]
    real = getattr(target, name)
    done: list[int] = []

    def meanwhile(*args: Any, **kwargs: Any) -> Any:
        if not done:
            done.append(1)
            agent_traffic(served, agent)
        return real(*args, **kwargs)

    monkeypatch.setattr(target, name, meanwhile)
    r = served.call(who, method, path, body)
    assert done, f"the traffic happened between the read and the write: {r.text}"
    assert r.status_code == status, r.text
    assert served.audit(action) and not served.audit(f"{action}.failed")
    rec = served.wiring.store.get(WID)
    assert read is not None and rec is not None and rec.observed_at == read.observed_at
    assert rec.last_heartbeat is not None and (read.last_heartbeat or 0) < rec.last_heartbeat
    if route == "mode":
        assert rec.op_mode is Mode.IDLE
    elif route == "bind":
        assert rec.workload.label_grants == {"role": "jumpbox"}
