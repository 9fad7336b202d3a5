"""The DynamoDB twin of tests/onprem/test_attack_registration_clock_behind.py: the AWS admin
function (moto server behind it), two containers of it whose clocks differ. A registration of an id
in place over a record the container ahead wrote is stored (before: dropped as older and answered
200 ``{"created": false}``); one overtaken by a newer registration between its read and its write,
or inside the store's write before its transaction, is refused (409, ``workload.register.failed``);
one at an equal clock still moves the observation time, so a mode read before it is refused."""

from __future__ import annotations

import time
from typing import Any

import pytest

from ringfence.clouds import onprem as onprem_cloud
from ringfence.control import admin as admin_service
from ringfence.store.dynamodb import DynamoStore
from tests.aws.conftest import Env
from tests.aws.test_attack_operator_change_race_ddb import (
    NEW_BOX,
    PAULA,
    WID,
    Other,
    hybrid,
    onprem,
    other,
    refused_and_audited,
)
from tests.aws.test_onprem_hybrid import OTTO

__all__ = ["hybrid", "onprem", "other"]  # the fixtures, shared

MOVED = {**NEW_BOX, "ips": ["192.168.10.98"], "tags": {**NEW_BOX["tags"], "ringfence:env": "dev"}}


class Clock:
    """A container's clock, ``off`` seconds from the right one."""

    def __init__(self, off: float) -> None:
        self.off = off

    def time(self) -> float:
        return time.time() + self.off


def register(env: Env, body: dict[str, Any]) -> tuple[int, Any]:
    status, _, answer = env.rest("admin", "POST", "/admin/workloads", body, principal=OTTO)
    return status, answer


def test_attack_an_in_place_registration_from_a_clock_behind_is_stored_ddb(
    onprem: Env, other: Other, monkeypatch: pytest.MonkeyPatch
) -> None:
    env = onprem
    clock = Clock(3600.5)  # the other container, an hour ahead
    monkeypatch.setattr(onprem_cloud, "time", clock)
    status, _, answer = other("POST", "/admin/workloads", {**NEW_BOX, "reason": "new box"}, OTTO)
    assert status == 200, answer
    before = env.store.get(WID)
    assert before is not None and before.workload.ips == NEW_BOX["ips"]
    clock.off = 0  # this container, the right clock
    status, answer = register(env, {**MOVED, "reason": "moved, now dev"})
    assert status == 200 and answer["created"] is False, answer
    rec = env.store.get(WID)
    assert rec is not None and rec.workload.ips == MOVED["ips"], f"answered 200, stored {rec and rec.workload.ips}"
    assert rec.labels.get("env") == "dev" and rec.observed_at > before.observed_at
    assert not [a for a in env.store.audit_log() if a.action == "workload.register.failed"]


def test_attack_a_cmdb_import_from_a_clock_behind_is_stored_ddb(
    onprem: Env, other: Other, monkeypatch: pytest.MonkeyPatch
) -> None:
    env = onprem
    clock = Clock(3600.5)
    monkeypatch.setattr(onprem_cloud, "time", clock)
    status, _, answer = other("POST", "/admin/workloads", {**NEW_BOX, "reason": "new box"}, OTTO)
    assert status == 200, answer
    clock.off = 0
    csv = f"id,ips,site\n{WID},192.168.10.97,dc1\n"
    status, _, answer = env.rest(
        "admin", "POST", "/admin/workloads/import", {"csv": csv, "source": "cmdb.csv", "reason": "sync"}, principal=OTTO
    )
    assert status == 200 and answer["updated"] == 1, answer
    rec = env.store.get(WID)
    assert rec is not None and rec.workload.ips == ["192.168.10.97"], f"answered 200, stored {rec and rec.workload.ips}"


def overtaken(env: Env, status: int, answer: Any) -> None:
    assert status == 409, f"answered {status} {answer}, stored {env.store.get(WID)}"
    assert answer["error"] == "workload changed meanwhile: nothing registered", answer
    rec = env.store.get(WID)
    assert rec is not None and rec.workload.ips == NEW_BOX["ips"]
    log = env.store.audit_log()
    attempt = [a for a in log if a.action == "workload.register" and a.detail.get("ips") == MOVED["ips"]][-1]
    (failed,) = [a for a in log if a.action == "workload.register.failed"]
    assert failed.detail["audit_id"] == attempt.id, failed


def test_attack_a_registration_overtaken_by_a_newer_one_is_refused_not_answered_200_ddb(
    onprem: Env, other: Other, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Between this registration's read and its write, the other container (clock ahead)
    registers the id: this one, older than what is stored, is refused."""
    env = onprem
    clock = Clock(0)
    monkeypatch.setattr(onprem_cloud, "time", clock)
    real, done = admin_service.Admin._audit, []

    def audit(self: Any, principal: str, action: str, *a: Any, **k: Any) -> Any:
        if not done and action == "workload.register":
            done.append(1)
            clock.off = 60
            status, _, answer = other("POST", "/admin/workloads", {**NEW_BOX, "reason": "new box"}, OTTO)
            clock.off = 0
            assert status == 200, answer
        return real(self, principal, action, *a, **k)

    monkeypatch.setattr(admin_service.Admin, "_audit", audit)
    status, answer = register(env, {**MOVED, "reason": "moved, now dev"})
    assert done, "the race happened"
    overtaken(env, status, answer)


def test_attack_a_registration_overtaken_inside_the_stores_write_is_refused_ddb(
    onprem: Env, other: Other, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The race after the store's own read of the record and before its transaction: the update's
    condition (the observation no newer than this one) refuses it."""
    env = onprem
    clock = Clock(0)
    monkeypatch.setattr(onprem_cloud, "time", clock)
    real, done = DynamoStore._claims, []

    def claims_then_raced(self: DynamoStore, addresses: list[str]) -> Any:
        got = real(self, addresses)
        if not done and addresses == MOVED["ips"]:
            done.append(1)
            clock.off = 60
            status, _, answer = other("POST", "/admin/workloads", {**NEW_BOX, "reason": "new box"}, OTTO)
            clock.off = 0
            assert status == 200, answer
        return got

    monkeypatch.setattr(DynamoStore, "_claims", claims_then_raced)
    status, answer = register(env, {**MOVED, "reason": "moved, now dev"})
    assert done, "the race happened"
    overtaken(env, status, answer)


def test_attack_a_registration_at_an_equal_clock_refuses_a_mode_read_before_it_ddb(
    onprem: Env, other: Other, monkeypatch: pytest.MonkeyPatch
) -> None:
    env = onprem
    stored = env.store.get(WID)
    assert stored is not None
    clock = Clock(0)
    monkeypatch.setattr(onprem_cloud, "time", clock)
    monkeypatch.setattr(clock, "time", lambda: stored.observed_at)  # a clock at the stored record's time
    real, done = admin_service.is_deregistered, []

    def meanwhile(*args: Any, **kwargs: Any) -> Any:
        if not done:
            done.append(1)
            status, _, answer = other("POST", "/admin/workloads", {**NEW_BOX, "reason": "new box, same name"}, OTTO)
            assert status == 200, answer
        return real(*args, **kwargs)

    monkeypatch.setattr(admin_service, "is_deregistered", meanwhile)
    status, _, answer = env.rest(
        "admin", "PUT", f"/admin/workloads/{WID}/mode", {"mode": "idle", "reason": "old box"}, principal=PAULA
    )
    assert done, "the race happened"
    rec = env.store.get(WID)
    assert rec is not None and rec.workload.ips == NEW_BOX["ips"]
    assert rec.op_mode is None, f"the old host's {rec.op_mode} landed on the new host"
    assert rec.observed_at > stored.observed_at
    refused_and_audited(env, status, answer, "workload.mode", PAULA)
