"""The DynamoDB twin of tests/onprem/test_attack_operator_change_race.py: the AWS admin function
(moto server behind it, API Gateway's IAM caller in the event). Between the route's read of an
on-premise workload and its write, onboarding registers another host under its id through another
container of the function: ``anew``, after deregistering the old one; ``in_place``, without (the
``governed_rev`` stays). The mode, quarantine, release or binding is refused (409, nothing written:
the record as read, its version and registration time, is a condition of the transaction), and
its attempt audited with its ``.failed`` record; before, it landed on the new host."""

from __future__ import annotations

from collections.abc import Callable, Iterator
from typing import Any

import pytest

from ringfence.control import admin as admin_service
from ringfence.control import governance
from ringfence.local.lambdas import LambdaContext, load_functions, retire_functions
from ringfence.model import Mode
from tests.aws.conftest import ROOT, Env, rest_answer, rest_event
from tests.aws.test_onprem_hybrid import DB, OTTO, hybrid, register

__all__ = ["hybrid"]  # the fixture, shared

PAULA = "arn:aws:iam::123456789012:user/paula"  # policy-author
RITA = "arn:aws:iam::123456789012:user/rita"  # incident-responder
WID = DB["id"]
NEW_BOX = {**DB, "ips": ["192.168.10.99"]}
PRIVILEGED = {"ringfence:role": "jumpbox", "ringfence:app": "admin"}
GRANT = {"role": "jumpbox", "app": "admin"}


Other = Callable[..., tuple[int, dict[str, str], Any]]


@pytest.fixture
def onprem(hybrid: tuple[Env, dict[str, Any]]) -> Env:
    env, _ = hybrid
    env.bind(PAULA, ["policy-author"])
    env.bind(RITA, ["incident-responder"])
    assert register(env, DB)[0] == 201
    return env


@pytest.fixture
def other(onprem: Env) -> Iterator[Other]:
    """Another container of the admin function (another Lambda instance, same tables): what
    happens meanwhile is its requests, as the one racing them is still being resolved."""
    fns = load_functions(["admin"], ROOT / "functions", keep_clients=True)

    def rest(method: str, path: str, body: Any, principal: str) -> tuple[int, dict[str, str], Any]:
        return rest_answer(fns["admin"].handler(rest_event(method, path, body, principal=principal), LambdaContext()))

    yield rest
    retire_functions(fns.values())


RACE = pytest.mark.parametrize("race", ["anew", "in_place"])


def raced(
    env: Env,
    other: Other,
    monkeypatch: pytest.MonkeyPatch,
    target: Any,
    name: str,
    race: str,
    then: Callable[[], None] | None = None,
    box: dict[str, Any] = NEW_BOX,
) -> list[int]:
    """``target.name`` (called once the route has read the workload, before it writes) first lets
    onboarding register ``box`` under WID again, through another container of the admin function:
    ``anew`` after deregistering WID, ``in_place`` without (200, not created: the ``governed_rev``
    stays, and so do the old host's mode, quarantine and credentials); then ``then`` (what else
    happens to the new host meanwhile)."""
    real = getattr(target, name)
    done: list[int] = []

    def meanwhile(*args: Any, **kwargs: Any) -> Any:
        if not done:
            done.append(1)
            before = env.store.get(WID)
            if race == "anew":
                status, _, answer = other("DELETE", f"/admin/workloads/{WID}", {"reason": "gone"}, OTTO)
                assert status == 200, answer
            status, _, answer = other("POST", "/admin/workloads", {**box, "reason": "new box, same name"}, OTTO)
            assert status == 200, answer
            if race == "in_place":
                after = env.store.get(WID)
                assert answer["created"] is False and before is not None and after is not None, answer
                assert after.governed_rev == before.governed_rev, "the version moved: not an in-place race"
            if then is not None:
                then()
        return real(*args, **kwargs)

    monkeypatch.setattr(target, name, meanwhile)
    return done


def refused_and_audited(env: Env, status: int, answer: Any, action: str, principal: str) -> None:
    assert status == 409, answer
    assert answer["error"] == "workload changed meanwhile: nothing set" and WID in answer["detail"], answer
    log = env.store.audit_log()
    attempt = [a for a in log if a.action == action and a.principal == principal][-1]
    (failed,) = [a for a in log if a.action == f"{action}.failed"]
    assert failed.detail["audit_id"] == attempt.id and "registered again" in failed.detail["why"], failed


@RACE
def test_attack_an_idle_read_before_a_reregistration_does_not_land_on_the_new_host_ddb(
    onprem: Env, other: Other, monkeypatch: pytest.MonkeyPatch, race: str
) -> None:
    env = onprem
    done = raced(env, other, monkeypatch, admin_service, "is_deregistered", race)
    status, _, answer = env.rest(
        "admin", "PUT", f"/admin/workloads/{WID}/mode", {"mode": "idle", "reason": "old box"}, principal=PAULA
    )
    assert done, "the race happened"
    rec = env.store.get(WID)
    assert rec is not None and rec.state == "running" and rec.workload.ips == NEW_BOX["ips"]
    assert rec.op_mode is None, f"the old host's {rec.op_mode} landed on the new host"
    refused_and_audited(env, status, answer, "workload.mode", PAULA)
    # no race: the same request sets the new host's mode
    monkeypatch.undo()
    status, _, answer = env.rest(
        "admin", "PUT", f"/admin/workloads/{WID}/mode", {"mode": "enforce", "reason": "new box"}, principal=PAULA
    )
    assert status == 200 and env.store.get(WID).op_mode is Mode.ENFORCE, answer


@RACE
def test_attack_a_release_read_before_a_reregistration_keeps_the_new_hosts_quarantine_ddb(
    onprem: Env, other: Other, monkeypatch: pytest.MonkeyPatch, race: str
) -> None:
    env = onprem
    quarantine = f"/admin/workloads/{WID}/quarantine"
    assert env.rest("admin", "POST", quarantine, {"reason": "IR-7"}, principal=RITA)[0] == 200

    def new_host_quarantined() -> None:
        status, _, answer = other("POST", quarantine, {"reason": "IR-8 new box"}, RITA)
        assert status == 200, answer

    # in place, the new host keeps the old one's quarantine (and the version: none written meanwhile)
    then = new_host_quarantined if race == "anew" else None
    done = raced(env, other, monkeypatch, admin_service, "is_deregistered", race, then)
    status, _, answer = env.rest("admin", "DELETE", quarantine, {"reason": "IR-7 closed"}, principal=RITA)
    assert done, "the race happened"
    rec = env.store.get(WID)
    assert rec is not None and rec.state == "running" and rec.workload.ips == NEW_BOX["ips"]
    assert rec.op_quarantined, "a release meant for the old host took the new one out of quarantine"
    refused_and_audited(env, status, answer, "workload.release", RITA)


@RACE
def test_attack_a_quarantine_read_before_a_reregistration_does_not_land_on_the_new_host_ddb(
    onprem: Env, other: Other, monkeypatch: pytest.MonkeyPatch, race: str
) -> None:
    env = onprem
    done = raced(env, other, monkeypatch, admin_service, "is_deregistered", race)
    status, _, answer = env.rest(
        "admin", "POST", f"/admin/workloads/{WID}/quarantine", {"reason": "IR-9 old box"}, principal=RITA
    )
    assert done, "the race happened"
    rec = env.store.get(WID)
    assert rec is not None and rec.state == "running" and rec.workload.ips == NEW_BOX["ips"]
    assert not rec.op_quarantined, "the old host's quarantine landed on the new host"
    refused_and_audited(env, status, answer, "workload.quarantine", RITA)


@RACE
def test_attack_a_binding_read_before_a_reregistration_grants_the_new_host_nothing_ddb(
    onprem: Env, other: Other, monkeypatch: pytest.MonkeyPatch, race: str
) -> None:
    env = onprem
    retagged = {**DB, "tags": {**DB["tags"], **PRIVILEGED}}
    status, answer = register(env, retagged)
    assert status == 200 and answer["held"] == GRANT, answer
    done = raced(env, other, monkeypatch, governance, "bind", race, box={**NEW_BOX, "tags": retagged["tags"]})
    status, _, answer = env.rest(
        "admin", "PUT", f"/admin/workloads/{WID}/labels", {"labels": GRANT, "reason": "CHG-9 old"}, principal=PAULA
    )
    assert done, "the race happened"
    rec = env.store.get(WID)
    assert rec is not None and rec.state == "running" and rec.workload.ips == NEW_BOX["ips"]
    assert rec.workload.label_grants == {}, f"the old host's binding granted the new host {rec.workload.label_grants}"
    assert rec.workload.held_labels is not None
    refused_and_audited(env, status, answer, "label.bind", PAULA)
