"""The DynamoDB twin of tests/onprem/test_attack_inplace_reregistration_race.py: the AWS admin and
agent functions (moto server behind them). Between the admin route's read of an on-premise workload
and its write, another container of the admin function registers the id again in place (a new box
under the same name, new addresses, no deregistration: the ``governed_rev`` stays, and so do the
old host's credentials). Before, the mode, quarantine, release, binding, pairing key, revocation or
agent-key reset landed on the new box (the conditions compared the version and the state only).
Now the registration's observation time is a condition of each write too: 409 "workload changed
meanwhile: nothing set", nothing written, the attempt audited with its ``.failed`` record. An
enrolled agent's heartbeats and polls between the read and the write refuse nothing."""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import Any

import pytest

from ringfence.control import admin as admin_service
from ringfence.control import governance
from ringfence.model import Mode
from ringfence.store.base import agent_key_fingerprint_of
from tests.aws.conftest import Env
from tests.aws.test_attack_credential_change_race_ddb import Agent, mint, refused_after_its_request
from tests.aws.test_attack_operator_change_race_ddb import (
    GRANT,
    NEW_BOX,
    PAULA,
    PRIVILEGED,
    RITA,
    WID,
    Other,
    hybrid,
    onprem,
    other,
    refused_and_audited,
)
from tests.aws.test_onprem_hybrid import DB, OTTO, register
from tests.aws.test_pipeline import AgentKey

__all__ = ["hybrid", "onprem", "other"]  # the fixtures, shared


def replaced_in_place(
    env: Env,
    other: Other,
    monkeypatch: pytest.MonkeyPatch,
    target: Any,
    name: str,
    then: Callable[[], None] | None = None,
    box: dict[str, Any] = NEW_BOX,
) -> list[int]:
    """``target.name`` (called once the route has read the workload, before it writes) first lets
    onboarding register ``box`` under WID in place through another container (200, not created),
    then ``then``."""
    real = getattr(target, name)
    done: list[int] = []

    def meanwhile(*args: Any, **kwargs: Any) -> Any:
        if not done:
            done.append(1)
            before = env.store.get(WID)
            status, _, answer = other("POST", "/admin/workloads", {**box, "reason": "new box, same name"}, OTTO)
            assert status == 200 and answer["created"] is False, answer
            after = env.store.get(WID)
            assert before is not None and after is not None
            assert after.governed_rev == before.governed_rev, "the version moved: not the race this file tests"
            if then is not None:
                then()
        return real(*args, **kwargs)

    monkeypatch.setattr(target, name, meanwhile)
    return done


def test_attack_an_idle_read_before_an_inplace_reregistration_does_not_land_on_the_new_box_ddb(
    onprem: Env, other: Other, monkeypatch: pytest.MonkeyPatch
) -> None:
    env = onprem
    done = replaced_in_place(env, other, monkeypatch, admin_service, "is_deregistered")
    status, _, answer = env.rest(
        "admin", "PUT", f"/admin/workloads/{WID}/mode", {"mode": "idle", "reason": "old box"}, principal=PAULA
    )
    assert done, "the race happened"
    rec = env.store.get(WID)
    assert rec is not None and rec.state == "running" and rec.workload.ips == NEW_BOX["ips"]
    assert rec.op_mode is None, f"the old box's {rec.op_mode} landed on the new box"
    refused_and_audited(env, status, answer, "workload.mode", PAULA)


def test_attack_a_quarantine_read_before_an_inplace_reregistration_does_not_land_on_the_new_box_ddb(
    onprem: Env, other: Other, monkeypatch: pytest.MonkeyPatch
) -> None:
    env = onprem
    done = replaced_in_place(env, other, monkeypatch, admin_service, "is_deregistered")
    status, _, answer = env.rest(
        "admin", "POST", f"/admin/workloads/{WID}/quarantine", {"reason": "IR-9 old box"}, principal=RITA
    )
    assert done, "the race happened"
    rec = env.store.get(WID)
    assert rec is not None and rec.workload.ips == NEW_BOX["ips"]
    assert not rec.op_quarantined, "the old box's quarantine landed on the new box"
    refused_and_audited(env, status, answer, "workload.quarantine", RITA)


def test_attack_a_release_read_before_an_inplace_reregistration_keeps_the_new_box_quarantined_ddb(
    onprem: Env, other: Other, monkeypatch: pytest.MonkeyPatch
) -> None:
    env = onprem
    quarantine = f"/admin/workloads/{WID}/quarantine"
    assert env.rest("admin", "POST", quarantine, {"reason": "IR-7"}, principal=RITA)[0] == 200
    done = replaced_in_place(env, other, monkeypatch, admin_service, "is_deregistered")
    status, _, answer = env.rest("admin", "DELETE", quarantine, {"reason": "IR-7 closed (old box)"}, principal=RITA)
    assert done, "the race happened"
    rec = env.store.get(WID)
    assert rec is not None and rec.workload.ips == NEW_BOX["ips"]
    assert rec.op_quarantined, "a release meant for the old box took the new one out of quarantine"
    refused_and_audited(env, status, answer, "workload.release", RITA)


def test_attack_a_binding_read_before_an_inplace_reregistration_grants_the_new_box_nothing_ddb(
    onprem: Env, other: Other, monkeypatch: pytest.MonkeyPatch
) -> None:
    env = onprem
    retagged = {**DB, "tags": {**DB["tags"], **PRIVILEGED}}
    status, answer = register(env, retagged)
    assert status == 200 and answer["held"] == GRANT, answer
    box = {**NEW_BOX, "tags": retagged["tags"]}
    done = replaced_in_place(env, other, monkeypatch, governance, "bind", box=box)
    status, _, answer = env.rest(
        "admin", "PUT", f"/admin/workloads/{WID}/labels", {"labels": GRANT, "reason": "CHG-9 old"}, principal=PAULA
    )
    assert done, "the race happened"
    rec = env.store.get(WID)
    assert rec is not None and rec.workload.ips == NEW_BOX["ips"]
    assert rec.workload.label_grants == {}, f"the old box's binding granted the new box {rec.workload.label_grants}"
    refused_and_audited(env, status, answer, "label.bind", PAULA)


def test_attack_a_pairing_key_read_before_an_inplace_reregistration_does_not_enroll_the_new_box_ddb(
    onprem: Env, other: Other, monkeypatch: pytest.MonkeyPatch
) -> None:
    env = onprem
    done = replaced_in_place(env, other, monkeypatch, admin_service, "is_deregistered")
    body = {"workload_id": WID, "uses": 1, "ttl": 600, "reason": "old box"}
    status, _, answer = env.rest("admin", "POST", "/admin/pairing-keys", body, principal=OTTO)
    assert done, "the race happened"
    if status == 201:
        assert Agent(env).enroll(answer["pairing_key"]) != 200, "a key meant for the old box enrolled the new one"
    refused_and_audited(env, status, answer, "pairing.create", OTTO)
    agent = Agent(env)  # no race (the hook passes through once it ran): a key minted for the new box enrolls it
    assert agent.enroll(mint(other)) == 200 and agent.authorized()


def test_attack_a_pairing_key_revocation_read_before_an_inplace_reregistration_keeps_the_new_boxs_key_ddb(
    onprem: Env, other: Other, monkeypatch: pytest.MonkeyPatch
) -> None:
    env = onprem
    keys: list[str] = []
    done = replaced_in_place(env, other, monkeypatch, admin_service.Admin, "_audit", lambda: keys.append(mint(other)))
    path = f"/admin/workloads/{WID}/pairing-keys"
    status, _, answer = env.rest("admin", "DELETE", path, {"reason": "old box's key leaked"}, principal=OTTO)
    assert done and keys, "the race happened"
    assert Agent(env).enroll(keys[0]) == 200, "a revocation meant for the old box revoked the new box's key"
    refused_after_its_request(env, status, answer, "pairing.revoke")


def test_attack_an_agent_key_reset_read_before_an_inplace_reregistration_leaves_the_new_boxs_agent_ddb(
    onprem: Env, other: Other, monkeypatch: pytest.MonkeyPatch
) -> None:
    env = onprem
    new: dict[str, Agent] = {}

    def new_box_enrolls() -> None:
        new["agent"] = Agent(env)
        assert new["agent"].enroll(mint(other)) == 200

    done = replaced_in_place(env, other, monkeypatch, admin_service.Admin, "_audit", new_box_enrolls)
    body = {"next_agent_key": agent_key_fingerprint_of(AgentKey().pem), "reason": "old box reinstalled"}
    status, _, answer = env.rest("admin", "DELETE", f"/admin/workloads/{WID}/agent-key", body, principal=OTTO)
    assert done and new, "the race happened"
    assert new["agent"].authorized(), "a reset meant for the old box revoked the new box's token"
    assert env.store.agent_key(WID) == new["agent"].key.pem, "a reset meant for the old box unbound the new box's key"
    assert env.store.expected_agent_key(WID) is None, "the new box now accepts only the key named for the old one"
    refused_after_its_request(env, status, answer, "agent-key.reset")


# --- ordinary traffic between the read and the write: every route lands --------------------------

HOOKS = [(admin_service, "is_deregistered"), (governance, "bind"), (admin_service.Admin, "_audit")]
ROUTES: dict[str, tuple[str, str, str, dict[str, Any], int, str, int]] = {
    # name: (caller, method, path, body, hook (HOOKS), action, status)
    "mode": (PAULA, "PUT", f"/admin/workloads/{WID}/mode", {"mode": "idle", "reason": "r"}, 0, "workload.mode", 200),
    "quarantine": (RITA, "POST", f"/admin/workloads/{WID}/quarantine", {"reason": "r"}, 0, "workload.quarantine", 200),
    "release": (RITA, "DELETE", f"/admin/workloads/{WID}/quarantine", {"reason": "r"}, 0, "workload.release", 200),
    "bind": (PAULA, "PUT", f"/admin/workloads/{WID}/labels", {"labels": GRANT, "reason": "r"}, 1, "label.bind", 200),
    "pairing": (
        OTTO,
        "POST",
        "/admin/pairing-keys",
        {"workload_id": WID, "uses": 1, "ttl": 600},
        0,
        "pairing.create",
        201,
    ),
    "revoke": (OTTO, "DELETE", f"/admin/workloads/{WID}/pairing-keys", {"reason": "r"}, 2, "pairing.revoke", 200),
    "reset": (OTTO, "DELETE", f"/admin/workloads/{WID}/agent-key", {"reason": "r"}, 2, "agent-key.reset", 200),
}


@pytest.mark.parametrize("route", sorted(ROUTES))
def test_an_enrolled_agents_heartbeats_and_polls_between_the_read_and_the_write_refuse_nothing_ddb(
    onprem: Env, other: Other, monkeypatch: pytest.MonkeyPatch, route: str
) -> None:
    env = onprem
    who, method, path, body, hook, action, status = ROUTES[route]
    agent = Agent(env)
    assert agent.enroll(mint(other)) == 200
    if route == "release":
        assert (
            env.rest("admin", "POST", f"/admin/workloads/{WID}/quarantine", {"reason": "IR"}, principal=RITA)[0] == 200
        )
    env.store.set_liveness(WID, heartbeat=time.time() - 3600)  # the next heartbeat is written
    read = env.store.get(WID)
    target, name = HOOKS[hook]
    real = getattr(target, name)
    done: list[int] = []

    def meanwhile(*args: Any, **kwargs: Any) -> Any:
        if not done:
            done.append(1)
            for _ in range(2):
                hb = {"applied_version": None, "mode": None, "healthy": True}
                headers = {"Authorization": f"Bearer {agent.token}"}
                got, _, answer = env.rest("agentapi", "POST", f"/v1/agents/{WID}/heartbeat", hb, headers=headers)
                assert got == 200, answer
                assert agent.authorized()
        return real(*args, **kwargs)

    monkeypatch.setattr(target, name, meanwhile)
    got, _, answer = env.rest("admin", method, path, body, principal=who)
    assert done, f"the traffic happened between the read and the write: {answer}"
    assert got == status, answer
    log = env.store.audit_log()
    assert [a for a in log if a.action == action] and not [a for a in log if a.action == f"{action}.failed"]
    rec = env.store.get(WID)
    assert read is not None and rec is not None and rec.observed_at == read.observed_at
    assert rec.last_heartbeat is not None and (read.last_heartbeat or 0) < rec.last_heartbeat
    if route == "mode":
        assert rec.op_mode is Mode.IDLE
