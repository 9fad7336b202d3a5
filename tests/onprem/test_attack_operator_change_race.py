"""An operator's change that read the workload before a registration of its id again, landing
after it (SQLite under the real ``ringfence serve``; tests/aws holds the DynamoDB twin). Between
the route's read and its write, onboarding registers another host under the id through the same
routes: ``anew``, after deregistering the old one; ``in_place``, without (another box under the
same name, new addresses: the record keeps its ``governed_rev``, its mode and its quarantine).
Before, the change landed on the new host: an ``idle`` meant for the old box left the new one
unenforced, a quarantine cut it off, a release took it out of a quarantine, and a binding (re-read
on its retry) granted it the old host's privileged labels. Now each is refused (in place, as the
registration's observation time is part of the as-read check): 409 "workload changed meanwhile:
nothing set" naming the id, nothing written, the attempt audited and followed by its ``.failed``
record."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import pytest

from ringfence.control import admin as admin_service
from ringfence.control import governance
from tests.onprem.conftest import ESTATE, Served

WID = "dc1-proc-1"
NEW_BOX = {**ESTATE[1], "ips": ["192.168.10.222"]}


RACE = pytest.mark.parametrize("race", ["anew", "in_place"])


def raced(
    served: Served,
    monkeypatch: pytest.MonkeyPatch,
    target: Any,
    name: str,
    race: str,
    then: Callable[[], None] | None = None,
    box: dict[str, Any] = NEW_BOX,
) -> list[int]:
    """``target.name`` (called once the route has read the workload, before it writes) first lets
    onboarding register ``box`` under WID again, through the routes: ``anew`` after deregistering
    WID, ``in_place`` without (200, not created: the ``governed_rev`` stays, and so do the old
    host's mode, quarantine and credentials); then ``then`` (what else happens to the new host
    meanwhile). What it returns: how many times that happened."""
    real = getattr(target, name)
    done: list[int] = []

    def meanwhile(*args: Any, **kwargs: Any) -> Any:
        if not done:
            done.append(1)
            before = served.wiring.store.get(WID)
            if race == "anew":
                r = served.call("otto", "DELETE", f"/admin/workloads/{WID}", {"reason": "decommissioned"})
                assert r.status_code == 200, r.text
            r = served.call("otto", "POST", "/admin/workloads", {**box, "reason": "new box, same name"})
            assert r.status_code == 200, r.text
            if race == "in_place":
                after = served.wiring.store.get(WID)
                assert r.json()["created"] is False and before is not None and after is not None, r.text
                assert after.governed_rev == before.governed_rev, "the version moved: not an in-place race"
            if then is not None:
                then()
        return real(*args, **kwargs)

    monkeypatch.setattr(target, name, meanwhile)
    return done


def refused_and_audited(served: Served, r: Any, action: str, principal: str) -> None:
    assert r.status_code == 409, r.text
    assert r.json()["error"] == "workload changed meanwhile: nothing set" and WID in r.json()["detail"], r.text
    attempt = [a for a in served.audit(action) if a.principal == principal][-1]
    (failed,) = served.audit(f"{action}.failed")
    assert failed.detail["audit_id"] == attempt.id and "registered again" in failed.detail["why"], failed


@RACE
def test_attack_an_idle_read_before_a_reregistration_does_not_land_on_the_new_host(
    served: Served, monkeypatch: pytest.MonkeyPatch, race: str
) -> None:
    done = raced(served, monkeypatch, admin_service, "is_deregistered", race)
    r = served.call("paula", "PUT", f"/admin/workloads/{WID}/mode", {"mode": "idle", "reason": "old box, maintenance"})
    assert done, "the race happened"
    rec = served.wiring.store.get(WID)
    assert rec is not None and rec.state == "running" and rec.workload.ips == NEW_BOX["ips"]
    assert rec.op_mode is None, f"the old host's {rec.op_mode} landed on the new host"
    refused_and_audited(served, r, "workload.mode", "paula")


@RACE
def test_attack_a_quarantine_read_before_a_reregistration_does_not_land_on_the_new_host(
    served: Served, monkeypatch: pytest.MonkeyPatch, race: str
) -> None:
    done = raced(served, monkeypatch, admin_service, "is_deregistered", race)
    r = served.call("ivy", "POST", f"/admin/workloads/{WID}/quarantine", {"reason": "IR-7 old box"})
    assert done, "the race happened"
    rec = served.wiring.store.get(WID)
    assert rec is not None and rec.state == "running" and rec.workload.ips == NEW_BOX["ips"]
    assert not rec.op_quarantined, "the old host's quarantine landed on the new host"
    refused_and_audited(served, r, "workload.quarantine", "ivy")


@RACE
def test_attack_a_release_read_before_a_reregistration_keeps_the_new_hosts_quarantine(
    served: Served, monkeypatch: pytest.MonkeyPatch, race: str
) -> None:
    assert served.call("ivy", "POST", f"/admin/workloads/{WID}/quarantine", {"reason": "IR-7"}).status_code == 200

    def new_host_quarantined() -> None:  # another responder quarantines the new host at once
        r = served.call("ivy", "POST", f"/admin/workloads/{WID}/quarantine", {"reason": "IR-8 new box"})
        assert r.status_code == 200, r.text

    # in place, the new host keeps the old one's quarantine (and the version: none written meanwhile)
    then = new_host_quarantined if race == "anew" else None
    done = raced(served, monkeypatch, admin_service, "is_deregistered", race, then)
    r = served.call("ivy", "DELETE", f"/admin/workloads/{WID}/quarantine", {"reason": "IR-7 closed"})
    assert done, "the race happened"
    rec = served.wiring.store.get(WID)
    assert rec is not None and rec.state == "running" and rec.workload.ips == NEW_BOX["ips"]
    assert rec.op_quarantined, "a release meant for the old host took the new one out of quarantine"
    refused_and_audited(served, r, "workload.release", "ivy")


@RACE
def test_attack_a_binding_read_before_a_reregistration_grants_the_new_host_nothing(
    served: Served, monkeypatch: pytest.MonkeyPatch, race: str
) -> None:
    privileged = {"ringfence:role": "jumpbox", "ringfence:app": "admin"}
    grant = {"role": "jumpbox", "app": "admin"}
    old = {**ESTATE[1], "tags": {**ESTATE[1]["tags"], **privileged}}
    r = served.call("otto", "POST", "/admin/workloads", {**old, "reason": "retagged"})
    assert r.status_code == 200 and r.json()["held"] == grant, r.text
    # the new host asks for the same values: held, as onboarding may not grant them
    done = raced(served, monkeypatch, governance, "bind", race, box={**NEW_BOX, "tags": old["tags"]})
    r = served.call("paula", "PUT", f"/admin/workloads/{WID}/labels", {"labels": grant, "reason": "CHG-9 old"})
    assert done, "the race happened"
    rec = served.wiring.store.get(WID)
    assert rec is not None and rec.state == "running" and rec.workload.ips == NEW_BOX["ips"]
    assert rec.workload.label_grants == {}, f"the old host's binding granted the new host {rec.workload.label_grants}"
    assert rec.workload.held_labels is not None and rec.labels.get("role") != "jumpbox"
    refused_and_audited(served, r, "label.bind", "paula")
