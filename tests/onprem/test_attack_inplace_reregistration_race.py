"""An operator's write decided from one registration of an on-premise id, racing a registration of
the id in place (SQLite under the real ``ringfence serve``; tests/aws holds the DynamoDB twin).
Between the route's read and its write, onboarding registers the id again without deregistering it:
another box under the same name, new addresses. That keeps the record's ``governed_rev`` (nothing
governed changed), its operator mode and quarantine, and the old host's token, agent key and
pairing keys (the new box's agent takes the id over by enrolling with a pairing key). Before, the
as-read check compared the version and the state only, so each write landed on the new box: a mode
or quarantine (or a release) meant for the old box, a binding granting it the old box's privileged
labels, a pairing key that enrolls it, a revocation of the keys issued for it, an agent-key reset
that cut its agent off. Now the registration's observation time (which only a registration or a
deregistration moves) is part of the check: 409 "workload changed meanwhile: nothing set", nothing
written, the attempt audited and followed by its ``.failed`` record. An enrolled agent's heartbeats
and polls between the read and the write move nothing that check compares: every route lands."""

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
from tests.onprem.conftest import ESTATE, Served
from tests.onprem.test_attack_credential_change_race import Agent, enrolled, mint, refused_after_its_request
from tests.onprem.test_attack_operator_change_race import NEW_BOX, WID, refused_and_audited


def replaced_in_place(
    served: Served,
    monkeypatch: pytest.MonkeyPatch,
    target: Any,
    name: str,
    then: Callable[[], None] | None = None,
    box: dict[str, Any] = NEW_BOX,
) -> list[int]:
    """``target.name`` (called once the route has read the workload, before it writes) first lets
    onboarding register ``box`` under WID in place (no deregistration: 200, not created), then
    ``then`` (what else happens to the new box meanwhile)."""
    real = getattr(target, name)
    done: list[int] = []

    def meanwhile(*args: Any, **kwargs: Any) -> Any:
        if not done:
            done.append(1)
            before = served.wiring.store.get(WID)
            r = served.call("otto", "POST", "/admin/workloads", {**box, "reason": "new box, same name"})
            assert r.status_code == 200 and r.json()["created"] is False, r.text
            after = served.wiring.store.get(WID)
            assert before is not None and after is not None
            assert after.governed_rev == before.governed_rev, "the version moved: not the race this file tests"
            if then is not None:
                then()
        return real(*args, **kwargs)

    monkeypatch.setattr(target, name, meanwhile)
    return done


def test_attack_an_idle_read_before_an_inplace_reregistration_does_not_land_on_the_new_box(
    served: Served, monkeypatch: pytest.MonkeyPatch
) -> None:
    done = replaced_in_place(served, monkeypatch, admin_service, "is_deregistered")
    r = served.call("paula", "PUT", f"/admin/workloads/{WID}/mode", {"mode": "idle", "reason": "old box, maintenance"})
    assert done, "the race happened"
    rec = served.wiring.store.get(WID)
    assert rec is not None and rec.state == "running" and rec.workload.ips == NEW_BOX["ips"]
    assert rec.op_mode is None, f"the old box's {rec.op_mode} landed on the new box"
    refused_and_audited(served, r, "workload.mode", "paula")


def test_attack_a_quarantine_read_before_an_inplace_reregistration_does_not_land_on_the_new_box(
    served: Served, monkeypatch: pytest.MonkeyPatch
) -> None:
    done = replaced_in_place(served, monkeypatch, admin_service, "is_deregistered")
    r = served.call("ivy", "POST", f"/admin/workloads/{WID}/quarantine", {"reason": "IR-7 old box"})
    assert done, "the race happened"
    rec = served.wiring.store.get(WID)
    assert rec is not None and rec.workload.ips == NEW_BOX["ips"]
    assert not rec.op_quarantined, "the old box's quarantine landed on the new box"
    refused_and_audited(served, r, "workload.quarantine", "ivy")


def test_attack_a_release_read_before_an_inplace_reregistration_keeps_the_new_box_quarantined(
    served: Served, monkeypatch: pytest.MonkeyPatch
) -> None:
    assert served.call("ivy", "POST", f"/admin/workloads/{WID}/quarantine", {"reason": "IR-7"}).status_code == 200
    done = replaced_in_place(served, monkeypatch, admin_service, "is_deregistered")
    r = served.call("ivy", "DELETE", f"/admin/workloads/{WID}/quarantine", {"reason": "IR-7 closed (old box)"})
    assert done, "the race happened"
    rec = served.wiring.store.get(WID)
    assert rec is not None and rec.workload.ips == NEW_BOX["ips"]
    assert rec.op_quarantined, "a release meant for the old box took the new one out of quarantine"
    refused_and_audited(served, r, "workload.release", "ivy")


def test_attack_a_binding_read_before_an_inplace_reregistration_grants_the_new_box_nothing(
    served: Served, monkeypatch: pytest.MonkeyPatch
) -> None:
    privileged = {"ringfence:role": "jumpbox", "ringfence:app": "admin"}
    grant = {"role": "jumpbox", "app": "admin"}
    old = {**ESTATE[1], "tags": {**ESTATE[1]["tags"], **privileged}}
    r = served.call("otto", "POST", "/admin/workloads", {**old, "reason": "retagged"})
    assert r.status_code == 200 and r.json()["held"] == grant, r.text
    # the new box asks for the same values: held, as onboarding may not grant them
    done = replaced_in_place(served, monkeypatch, governance, "bind", box={**NEW_BOX, "tags": old["tags"]})
    r = served.call("paula", "PUT", f"/admin/workloads/{WID}/labels", {"labels": grant, "reason": "CHG-9 old"})
    assert done, "the race happened"
    rec = served.wiring.store.get(WID)
    assert rec is not None and rec.workload.ips == NEW_BOX["ips"]
    assert rec.workload.label_grants == {}, f"the old box's binding granted the new box {rec.workload.label_grants}"
    assert rec.labels.get("role") != "jumpbox"
    refused_and_audited(served, r, "label.bind", "paula")


def test_attack_a_pairing_key_read_before_an_inplace_reregistration_does_not_enroll_the_new_box(
    served: Served, monkeypatch: pytest.MonkeyPatch
) -> None:
    done = replaced_in_place(served, monkeypatch, admin_service, "is_deregistered")
    r = served.call("otto", "POST", "/admin/pairing-keys", {"workload_id": WID, "uses": 1, "ttl": 600})
    assert done, "the race happened"
    if r.status_code == 201:
        intruder = Agent(served)
        assert intruder.enroll(r.json()["pairing_key"]) != 200, "a key meant for the old box enrolled the new one"
    refused_and_audited(served, r, "pairing.create", "otto")
    monkeypatch.undo()  # no race: a key minted for the new box enrolls it
    assert enrolled(served).bundle() == 200


def test_attack_a_pairing_key_revocation_read_before_an_inplace_reregistration_keeps_the_new_boxs_key(
    served: Served, monkeypatch: pytest.MonkeyPatch
) -> None:
    keys: list[str] = []
    done = replaced_in_place(served, monkeypatch, admin_service.Admin, "_audit", lambda: keys.append(mint(served)))
    r = served.call("otto", "DELETE", f"/admin/workloads/{WID}/pairing-keys", {"reason": "old box's key leaked"})
    assert done and keys, "the race happened"
    assert Agent(served).enroll(keys[0]) == 200, "a revocation meant for the old box revoked the new box's key"
    refused_after_its_request(served, r, "pairing.revoke")


def test_attack_an_agent_key_reset_read_before_an_inplace_reregistration_leaves_the_new_boxs_agent(
    served: Served, monkeypatch: pytest.MonkeyPatch
) -> None:
    new: dict[str, Agent] = {}

    def new_box_enrolls() -> None:
        new["agent"] = enrolled(served)

    done = replaced_in_place(served, monkeypatch, admin_service.Admin, "_audit", new_box_enrolls)
    body = {"next_agent_key": agent_key_fingerprint_of(AgentKey().pem), "reason": "old box reinstalled"}
    r = served.call("otto", "DELETE", f"/admin/workloads/{WID}/agent-key", body)
    assert done and new, "the race happened"
    store = served.wiring.store
    assert new["agent"].bundle() == 200, "a reset meant for the old box revoked the new box's token"
    assert store.agent_key(WID) == new["agent"].key.pem, "a reset meant for the old box unbound the new box's key"
    assert store.expected_agent_key(WID) is None, "the new box now accepts only the key named for the old one"
    refused_after_its_request(served, r, "agent-key.reset")


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
