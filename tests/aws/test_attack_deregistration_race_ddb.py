"""The DynamoDB twin of tests/onprem/test_attack_deregistration_race.py: the AWS admin and agent
functions (moto server behind them). Between the admin route's read of an on-premise workload and
its deregistration's tombstone, another container of the admin function registers the id again
(deregistered and registered again, or replaced in place: a new box under the same name) and the
new host's agent enrolls. Before, the deregistration answered 200 either way: its tombstone did not
land (older than the registration) or replaced the newer registration and dropped the new host's
token and agent key. Now the tombstone's update is conditional on the registration read (its
observation, ``governed_rev`` and state): 409 "workload changed meanwhile: nothing set", the newer
registration and its host's credentials untouched, the attempt audited with its ``.failed``."""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import Any

import pytest

from ringfence.clouds import onprem as onprem_cloud
from ringfence.control import admin as admin_service
from ringfence.store.dynamodb import DynamoStore
from tests.aws.conftest import Env
from tests.aws.test_attack_credential_change_race_ddb import Agent, mint
from tests.aws.test_attack_operator_change_race_ddb import NEW_BOX, WID, Other, hybrid, onprem, other
from tests.aws.test_onprem_hybrid import OTTO

__all__ = ["hybrid", "onprem", "other"]  # the fixtures, shared

OLGA = "arn:aws:iam::123456789012:user/olga"  # onboarding too: the other caller
DEREGISTER = f"/admin/workloads/{WID}"


def new_host_meanwhile(env: Env, other: Other, new: dict[str, Agent], deregistered_first: bool) -> Callable[[], None]:
    env.bind(OLGA, ["onboarding"])

    def race() -> None:
        if deregistered_first:
            status, _, answer = other("DELETE", DEREGISTER, {"reason": "gone"}, OLGA)
            assert status == 200, answer
        status, _, answer = other("POST", "/admin/workloads", {**NEW_BOX, "reason": "new box, same name"}, OLGA)
        assert status == 200, answer
        new["agent"] = Agent(env)
        assert new["agent"].enroll(mint(other)) == 200

    return race


def refused_and_the_new_host_kept(env: Env, status: int, answer: Any, new: dict[str, Agent]) -> None:
    rec = env.store.get(WID)
    assert rec is not None and rec.state == "running", "the deregistration removed the registration made after its read"
    assert rec.workload.ips == NEW_BOX["ips"]
    assert new["agent"].authorized(), "the deregistration revoked the token of the host registered after its read"
    assert env.store.agent_key(WID) == new["agent"].key.pem, "the deregistration unbound the new host's agent key"
    assert status == 409, answer
    assert answer["error"] == "workload changed meanwhile: nothing set" and WID in answer["detail"], answer
    log = env.store.audit_log()
    attempt = [a for a in log if a.action == "workload.deregister" and a.principal == OTTO][-1]
    (failed,) = [a for a in log if a.action == "workload.deregister.failed"]
    assert failed.detail["audit_id"] == attempt.id and "registered again" in failed.detail["why"], failed


@pytest.mark.parametrize("deregistered_first", [True, False], ids=["deregistered-and-registered", "replaced"])
def test_attack_a_deregistration_read_before_a_registration_written_after_its_tombstone_time_is_refused_ddb(
    onprem: Env, other: Other, monkeypatch: pytest.MonkeyPatch, deregistered_first: bool
) -> None:
    env = onprem
    new: dict[str, Agent] = {}
    race = new_host_meanwhile(env, other, new, deregistered_first)
    real = admin_service.Admin._audit
    done: list[int] = []

    def audit(self: Any, principal: str, action: str, *args: Any, **kwargs: Any) -> Any:
        if not done and principal == OTTO and action == "workload.deregister":
            done.append(1)
            race()
        return real(self, principal, action, *args, **kwargs)

    monkeypatch.setattr(admin_service.Admin, "_audit", audit)
    status, _, answer = env.rest("admin", "DELETE", DEREGISTER, {"reason": "old box gone"}, principal=OTTO)
    assert done and new, "the race happened"
    refused_and_the_new_host_kept(env, status, answer, new)


@pytest.mark.parametrize("deregistered_first", [True, False], ids=["deregistered-and-registered", "replaced"])
def test_attack_a_deregistration_read_before_a_registration_does_not_remove_it_ddb(
    onprem: Env, other: Other, monkeypatch: pytest.MonkeyPatch, deregistered_first: bool
) -> None:
    env = onprem
    new: dict[str, Agent] = {}
    race = new_host_meanwhile(env, other, new, deregistered_first)
    real = DynamoStore.get
    done: list[int] = []

    def read_then_raced(self: DynamoStore, workload_id: str) -> Any:
        got = real(self, workload_id)
        if not done and workload_id == WID:
            done.append(1)
            race()
        return got

    monkeypatch.setattr(DynamoStore, "get", read_then_raced)
    status, _, answer = env.rest("admin", "DELETE", DEREGISTER, {"reason": "old box gone"}, principal=OTTO)
    assert done and new, "the race happened"
    refused_and_the_new_host_kept(env, status, answer, new)
    # no race: the same request deregisters the workload, and its host's credentials go
    monkeypatch.undo()
    status, _, answer = env.rest("admin", "DELETE", DEREGISTER, {"reason": "old box gone"}, principal=OTTO)
    assert status == 200, answer
    rec = env.store.get(WID)
    assert rec is not None and rec.state == "terminated"
    assert not new["agent"].authorized() and env.store.agent_key(WID) is None


class AheadClock:
    """The deregistering container's clock, a minute ahead of the other's (Lambda containers'
    clocks differ): its tombstone is newer than a registration the other makes meanwhile, so only
    a condition on the registration read keeps that registration."""

    def __init__(self) -> None:
        self.racing = False

    def time(self) -> float:
        return time.time() + (0 if self.racing else 60)


def test_attack_a_registration_between_the_tombstones_check_and_its_transaction_is_not_removed_ddb(
    onprem: Env, other: Other, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The race inside the store's write, after its read of the record (checked as read there) and
    before its transaction: the update's own condition refuses the tombstone."""
    env = onprem
    new: dict[str, Agent] = {}
    race = new_host_meanwhile(env, other, new, deregistered_first=False)
    clock = AheadClock()
    real = DynamoStore._claims
    done: list[int] = []

    def claims_then_raced(self: DynamoStore, addresses: list[str]) -> Any:
        got = real(self, addresses)
        if not done:
            done.append(1)
            clock.racing = True
            race()
            clock.racing = False
        return got

    monkeypatch.setattr(onprem_cloud, "time", clock)
    monkeypatch.setattr(DynamoStore, "_claims", claims_then_raced)
    status, _, answer = env.rest("admin", "DELETE", DEREGISTER, {"reason": "old box gone"}, principal=OTTO)
    assert done and new, "the race happened"
    refused_and_the_new_host_kept(env, status, answer, new)


@pytest.mark.slow
def test_a_reset_refused_between_its_transactions_revoked_only_keys_issued_before_the_new_registration_ddb(
    onprem: Env, other: Other, monkeypatch: pytest.MonkeyPatch
) -> None:
    """60 pairing keys (120 items with their index): a reset takes two transactions, each
    conditional on the registration read. The id deregistered and registered again between them
    (the new host enrolling with a key minted then, a spare key minted for it too), the last is
    refused (409) after the first revoked 13 of the old registration's keys: every key that first
    one revoked was listed before it, so issued before the new registration; the new host's keys,
    agent key and token stay (what DynamoStore.reset_agent_key's comment says)."""
    env = onprem
    store = env.store
    assert isinstance(store, DynamoStore)
    for _ in range(60):
        mint(other)
    new: dict[str, Agent] = {}
    spare: list[str] = []
    race = new_host_meanwhile(env, other, new, deregistered_first=True)
    real = DynamoStore._transact_part
    done: list[int] = []

    def then_raced(self: DynamoStore, part: Any) -> None:
        real(self, part)
        if not done:
            done.append(len(store._query_all(f"pairingof#{WID}")))  # the old keys left after the first
            race()
            spare.append(mint(other))

    monkeypatch.setattr(DynamoStore, "_transact_part", then_raced)
    body = {"reason": "old box reinstalled"}
    status, _, answer = env.rest("admin", "DELETE", f"/admin/workloads/{WID}/agent-key", body, principal=OTTO)
    assert done == [47] and new and spare, "the race happened between the reset's transactions"
    assert status == 409, answer
    assert answer["error"] == "workload changed meanwhile: nothing set", answer
    assert new["agent"].authorized(), "the refused reset revoked the new host's token"
    assert store.agent_key(WID) == new["agent"].key.pem, "the refused reset unbound the new host's agent key"
    monkeypatch.undo()
    assert Agent(env).enroll(spare[0]) == 200, "the refused reset revoked a key minted for the new host"
