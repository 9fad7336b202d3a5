"""An administrator's registration of an id in place (a new box under its name, a host moved to
another address or environment) over a record written by a container whose clock was ahead
(SQLite under the real ``ringfence serve``; tests/aws holds the DynamoDB twin). Before, its time
was now (only a tombstone's time was taken into account): the store kept the newer record and
dropped the registration, which was answered 200 ``{"created": false}``, audited as made and
handed to compute, the host left at its old address and labels. Now a registration is always
observed after the record it read (by at least ``STEP``): it is stored; one that a newer record
stored meanwhile would drop is refused (409 "workload changed meanwhile: nothing registered",
``workload.register.failed``), never answered 200. And at an equal clock, the registration still
moves the observation time, so that an operator's change read before it is refused."""

from __future__ import annotations

import time
from typing import Any

import pytest

from ringfence.clouds import onprem as onprem_cloud
from ringfence.control import admin as admin_service
from tests.onprem.conftest import Served
from tests.onprem.test_attack_operator_change_race import NEW_BOX, WID, refused_and_audited

MOVED = {**NEW_BOX, "ips": ["192.168.10.223"], "tags": {**NEW_BOX["tags"], "ringfence:env": "dev"}}


def ahead(monkeypatch: pytest.MonkeyPatch, by: float = 60) -> None:
    real = time.time
    monkeypatch.setattr(onprem_cloud.time, "time", lambda: real() + by)


def test_attack_an_in_place_registration_from_a_clock_behind_is_stored(
    served: Served, monkeypatch: pytest.MonkeyPatch
) -> None:
    ahead(monkeypatch)  # container A, a minute ahead
    assert served.call("pat", "POST", "/admin/workloads", {**NEW_BOX, "reason": "new box"}).status_code == 200
    before = served.wiring.store.get(WID)
    assert before is not None and before.workload.ips == NEW_BOX["ips"]
    monkeypatch.undo()  # container B, the right clock
    r = served.call("pat", "POST", "/admin/workloads", {**MOVED, "reason": "moved, now dev"})
    assert r.status_code == 200 and r.json()["created"] is False, r.text
    rec = served.wiring.store.get(WID)
    assert rec is not None and rec.workload.ips == MOVED["ips"], f"answered 200, stored {rec and rec.workload.ips}"
    assert rec.labels.get("env") == "dev" and rec.observed_at > before.observed_at
    assert not served.audit("workload.register.failed")


def test_attack_a_cmdb_import_from_a_clock_behind_is_stored(served: Served, monkeypatch: pytest.MonkeyPatch) -> None:
    ahead(monkeypatch)
    assert served.call("pat", "POST", "/admin/workloads", {**NEW_BOX, "reason": "new box"}).status_code == 200
    monkeypatch.undo()
    csv = f"id,ips,ringfence:role,ringfence:app,ringfence:env\n{WID},192.168.10.224,processing,ordering,dev\n"
    r = served.call("pat", "POST", "/admin/workloads/import", {"csv": csv, "source": "cmdb.csv", "reason": "sync"})
    assert r.status_code == 200 and r.json()["updated"] == 1, r.text
    rec = served.wiring.store.get(WID)
    assert rec is not None and rec.workload.ips == ["192.168.10.224"], (
        f"answered 200, stored {rec and rec.workload.ips}"
    )
    assert rec.labels.get("env") == "dev"


def test_attack_a_registration_overtaken_by_a_newer_one_is_refused_not_answered_200(
    served: Served, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Between this registration's read (its time decided) and its write, another container whose
    clock is ahead registers the id: this one is older than what is stored, and refused."""
    real, done = admin_service.Admin._audit, []

    def audit(self: Any, principal: str, action: str, *a: Any, **k: Any) -> Any:
        if not done and principal == "otto" and action == "workload.register":
            done.append(1)
            with monkeypatch.context() as m:
                t = time.time
                m.setattr(onprem_cloud.time, "time", lambda: t() + 60)
                r = served.call("pat", "POST", "/admin/workloads", {**NEW_BOX, "reason": "new box"})
                assert r.status_code == 200, r.text
        return real(self, principal, action, *a, **k)

    monkeypatch.setattr(admin_service.Admin, "_audit", audit)
    r = served.call("otto", "POST", "/admin/workloads", {**MOVED, "reason": "moved, now dev"})
    assert done, "the race happened"
    assert r.status_code == 409, f"answered {r.status_code} {r.text}, stored {served.wiring.store.get(WID)}"
    assert r.json()["error"] == "workload changed meanwhile: nothing registered", r.text
    rec = served.wiring.store.get(WID)
    assert rec is not None and rec.workload.ips == NEW_BOX["ips"]
    attempt = [a for a in served.audit("workload.register") if a.principal == "otto"][-1]
    (failed,) = served.audit("workload.register.failed")
    assert failed.detail["audit_id"] == attempt.id and "newer registration" in failed.detail["why"], failed


def test_attack_a_registration_at_an_equal_clock_refuses_a_mode_read_before_it(
    served: Served, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The registration in place made at the very time the stored one was (a clock that did not
    move, or one behind by exactly that): its observation still moves, so an ``idle`` read before
    it, meant for the old box, does not land on the new one."""
    stored = served.wiring.store.get(WID)
    assert stored is not None
    monkeypatch.setattr(onprem_cloud.time, "time", lambda: stored.observed_at)
    real, done = admin_service.is_deregistered, []

    def meanwhile(*args: Any, **kwargs: Any) -> Any:
        if not done:
            done.append(1)
            r = served.call("otto", "POST", "/admin/workloads", {**NEW_BOX, "reason": "new box, same name"})
            assert r.status_code == 200, r.text
        return real(*args, **kwargs)

    monkeypatch.setattr(admin_service, "is_deregistered", meanwhile)
    r = served.call("paula", "PUT", f"/admin/workloads/{WID}/mode", {"mode": "idle", "reason": "old box, maintenance"})
    assert done, "the race happened"
    rec = served.wiring.store.get(WID)
    assert rec is not None and rec.workload.ips == NEW_BOX["ips"]
    assert rec.op_mode is None, f"the old host's {rec.op_mode} landed on the new host"
    assert rec.observed_at > stored.observed_at
    refused_and_audited(served, r, "workload.mode", "paula")
