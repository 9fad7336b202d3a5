"""The DynamoDB twin of tests/onprem/test_attack_credential_change_race.py: the AWS admin and agent
functions (moto server behind them). Between the admin route's read of an on-premise workload and
its credential step (a pairing key, a revocation of its pairing keys, an agent-key reset), another
container of the admin function registers another host under its id (whose agent enrolls):
``anew``, after deregistering the old one; ``in_place``, without (the ``governed_rev`` stays, and
so do the old host's credentials). The step is refused (409, nothing written: the record as read,
its registration time included, is a condition of each transaction) and its attempt audited with
its ``.failed`` record; before, it landed on the new host. An enrolled agent's heartbeats and polls
between the read and the write refuse no operator route. A deregistration whose credential drop
runs after the id was registered again drops nothing of the new host's (the drop is conditional on
the tombstone it wrote)."""

from __future__ import annotations

import time
from typing import Any

import pytest

from ringfence.control import admin as admin_service
from ringfence.control import governance
from ringfence.model import Mode
from ringfence.store.base import AgentKeyReset, WorkloadChanged, agent_key_fingerprint_of
from ringfence.store.dynamodb import DynamoStore
from tests.aws.conftest import Env
from tests.aws.test_attack_operator_change_race_ddb import (
    GRANT,
    NEW_BOX,
    PAULA,
    RACE,
    RITA,
    WID,
    Other,
    hybrid,
    onprem,
    other,
    raced,
    refused_and_audited,
)
from tests.aws.test_onprem_hybrid import OTTO
from tests.aws.test_pipeline import AgentKey

__all__ = ["hybrid", "onprem", "other"]  # the fixtures, shared


class Agent:
    """An agent of WID, over the agent-API function: its key, and its token once enrolled."""

    def __init__(self, env: Env) -> None:
        self.env, self.key, self.token = env, AgentKey(), ""

    def enroll(self, pairing_key: str) -> int:
        nonce = self.env.rest("agentapi", "GET", "/v1/nonce")[2]["nonce"]
        body = {"method": "pairing", "nonce": nonce, "workload_id": WID, "pairing_key": pairing_key}
        status, _, answer = self.env.rest(
            "agentapi", "POST", "/v1/enroll", {**body, **self.key.enroll_fields(WID, nonce)}
        )
        if status == 200:
            self.token = answer["token"]
        return status

    def authorized(self) -> bool:
        """Whether its token is taken for its bundle (404 ``no bundle published for this workload
        yet`` is past the token check: compute is queued, not run, here)."""
        headers = {"Authorization": f"Bearer {self.token}"}
        status = self.env.rest("agentapi", "GET", f"/v1/agents/{WID}/bundle", headers=headers)[0]
        assert status in (200, 401, 404), status
        return status != 401


def mint(rest: Other, uses: int = 1) -> str:
    status, _, answer = rest("POST", "/admin/pairing-keys", {"workload_id": WID, "uses": uses, "ttl": 600}, OTTO)
    assert status == 201, answer
    return str(answer["pairing_key"])


def refused_after_its_request(env: Env, status: int, answer: Any, action: str) -> None:
    assert status == 409, answer
    assert answer["error"] == "workload changed meanwhile: nothing set" and WID in answer["detail"], answer
    log = env.store.audit_log()
    requested = [a for a in log if a.action == f"{action}.requested"][-1]
    (failed,) = [a for a in log if a.action == f"{action}.failed"]
    assert failed.detail["audit_id"] == requested.id and "registered again" in failed.detail["why"], failed
    assert not [a for a in log if a.action == action], f"{action} recorded as made"


@RACE
def test_attack_a_pairing_key_read_before_a_reregistration_does_not_enroll_the_new_host_ddb(
    onprem: Env, other: Other, monkeypatch: pytest.MonkeyPatch, race: str
) -> None:
    env = onprem
    done = raced(env, other, monkeypatch, admin_service, "is_deregistered", race)
    body = {"workload_id": WID, "uses": 1, "ttl": 600, "reason": "old box"}
    status, _, answer = env.rest("admin", "POST", "/admin/pairing-keys", body, principal=OTTO)
    assert done, "the race happened"
    if status == 201:
        assert Agent(env).enroll(answer["pairing_key"]) != 200, "a key meant for the old host enrolled the new one"
    refused_and_audited(env, status, answer, "pairing.create", OTTO)
    # no race (the hook passes through once it ran): a key minted for the new host enrolls it
    agent = Agent(env)
    assert agent.enroll(mint(other)) == 200 and agent.authorized()


@RACE
def test_attack_a_pairing_key_revocation_read_before_a_reregistration_keeps_the_new_hosts_keys_ddb(
    onprem: Env, other: Other, monkeypatch: pytest.MonkeyPatch, race: str
) -> None:
    env = onprem
    keys: list[str] = []
    done = raced(env, other, monkeypatch, admin_service.Admin, "_audit", race, lambda: keys.append(mint(other)))
    path = f"/admin/workloads/{WID}/pairing-keys"
    status, _, answer = env.rest("admin", "DELETE", path, {"reason": "old box's key leaked"}, principal=OTTO)
    assert done and keys, "the race happened"
    assert Agent(env).enroll(keys[0]) == 200, "a revocation meant for the old host revoked the new host's key"
    refused_after_its_request(env, status, answer, "pairing.revoke")


@RACE
def test_attack_an_agent_key_reset_read_before_a_reregistration_leaves_the_new_hosts_agent_ddb(
    onprem: Env, other: Other, monkeypatch: pytest.MonkeyPatch, race: str
) -> None:
    env = onprem
    new: dict[str, Agent] = {}

    def new_host_enrolls() -> None:
        new["agent"] = Agent(env)
        assert new["agent"].enroll(mint(other)) == 200

    done = raced(env, other, monkeypatch, admin_service.Admin, "_audit", race, new_host_enrolls)
    body = {"next_agent_key": agent_key_fingerprint_of(AgentKey().pem), "reason": "old box reinstalled"}
    status, _, answer = env.rest("admin", "DELETE", f"/admin/workloads/{WID}/agent-key", body, principal=OTTO)
    assert done and new, "the race happened"
    assert new["agent"].authorized(), "a reset meant for the old host revoked the new host's token"
    assert env.store.agent_key(WID) == new["agent"].key.pem, "a reset meant for the old host unbound the new host's key"
    assert env.store.expected_agent_key(WID) is None, "the new host now accepts only the key named for the old one"
    refused_after_its_request(env, status, answer, "agent-key.reset")


def test_attack_a_deregistration_does_not_cut_off_the_host_registered_after_its_tombstone_ddb(
    onprem: Env, other: Other, monkeypatch: pytest.MonkeyPatch
) -> None:
    env = onprem
    old = Agent(env)
    assert old.enroll(mint(other)) == 200
    write = DynamoStore.observe_addressed
    new: dict[str, Agent] = {}
    done: list[int] = []

    def tombstone_then_a_new_host(self: DynamoStore, *args: Any, **kwargs: Any) -> Any:
        got = write(self, *args, **kwargs)
        if not done:  # the deregistration's tombstone landed: a new host is registered and enrolls
            done.append(1)
            status, _, answer = other("POST", "/admin/workloads", {**NEW_BOX, "reason": "new box, same name"}, OTTO)
            assert status == 200, answer
            new["agent"] = Agent(env)
            assert new["agent"].enroll(mint(other)) == 200
        return got

    monkeypatch.setattr(DynamoStore, "observe_addressed", tombstone_then_a_new_host)
    status, _, answer = env.rest("admin", "DELETE", f"/admin/workloads/{WID}", {"reason": "gone"}, principal=OTTO)
    assert new, "the race happened"
    assert status == 200, answer
    rec = env.store.get(WID)
    assert rec is not None and rec.state == "running" and rec.workload.ips == NEW_BOX["ips"]
    assert new["agent"].authorized(), "the deregistration revoked the token of the host registered after it"
    assert env.store.agent_key(WID) == new["agent"].key.pem, "the deregistration unbound the new host's agent key"
    assert not old.authorized(), "the old host's token outlived its deregistration"


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


@pytest.mark.slow
def test_a_reset_revokes_more_pairing_keys_than_one_transaction_takes_ddb(onprem: Env) -> None:
    """120 pairing keys (240 items with their index): a reset over the record as read revokes them
    all, in transactions each conditional on it; one decided from a record no longer stored
    (registered again since) changes nothing, however many transactions it would take."""
    store = onprem.store
    assert isinstance(store, DynamoStore)
    read = store.get(WID)
    assert read is not None
    for i in range(120):
        store.put_pairing(f"left-{i}", WID, uses=1, ttl=600, as_read=read)
    assert store.reset_agent_key(AgentKeyReset(WID, None, read)) == (120, False)
    assert not any(store.use_pairing(f"left-{i}", WID, agent_key=AgentKey().pem) for i in range(120))

    stale = read.model_copy(update={"governed_rev": read.governed_rev + 7})
    for i in range(120):
        store.put_pairing(f"live-{i}", WID, uses=1, ttl=600)
    with pytest.raises(WorkloadChanged, match="registered again"):
        store.reset_agent_key(AgentKeyReset(WID, "f" * 64, stale))
    with pytest.raises(WorkloadChanged):
        store.drop_pairings(WID, as_read=stale)
    with pytest.raises(WorkloadChanged):
        store.put_pairing("stale", WID, uses=1, ttl=600, as_read=stale)
    assert store.expected_agent_key(WID) is None
    assert store.use_pairing("live-0", WID, agent_key=AgentKey().pem)
    assert store.use_pairing("live-119", WID, agent_key=AgentKey().pem)
    assert not store.use_pairing("stale", WID, agent_key=AgentKey().pem)
