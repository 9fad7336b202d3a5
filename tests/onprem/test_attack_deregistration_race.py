"""A deregistration that read one registration of an id, racing another registration of it (SQLite
under the real ``ringfence serve``; tests/aws holds the DynamoDB twin). Between the route's read and
its tombstone's write, onboarding registers the id again (deregistered and registered again, or
its record replaced in place: a new box under the same name) and the new host's agent enrolls.
Before, the deregistration answered 200 either way: with the registration written after its
tombstone's time, the tombstone silently did not land (the workload stayed registered, nothing
audited as failed); written before it, the tombstone replaced the newer registration and dropped
the new host's token and agent key. Now the tombstone lands only over the registration read (its
observation, governance version and state, checked in the write's transaction): else 409
"workload changed meanwhile: nothing set", the newer registration and its host's credentials
untouched, the attempt audited and followed by ``workload.deregister.failed``."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import pytest

from ringfence.control import admin as admin_service
from tests.onprem.conftest import Served
from tests.onprem.test_attack_credential_change_race import Agent, enrolled
from tests.onprem.test_attack_operator_change_race import NEW_BOX, WID

DEREGISTER = f"/admin/workloads/{WID}"


def new_host_meanwhile(served: Served, new: dict[str, Agent], deregistered_first: bool) -> Callable[[], None]:
    """The other onboarding caller: WID deregistered (or not) and NEW_BOX registered under it,
    whose agent then enrolls."""

    def race() -> None:
        if deregistered_first:
            r = served.call("pat", "DELETE", DEREGISTER, {"reason": "decommissioned"})
            assert r.status_code == 200, r.text
        r = served.call("pat", "POST", "/admin/workloads", {**NEW_BOX, "reason": "new box, same name"})
        assert r.status_code == 200, r.text
        new["agent"] = enrolled(served)

    return race


def refused_and_the_new_host_kept(served: Served, r: Any, new: dict[str, Agent]) -> None:
    store = served.wiring.store
    rec = store.get(WID)
    assert rec is not None and rec.state == "running", "the deregistration removed the registration made after its read"
    assert rec.workload.ips == NEW_BOX["ips"]
    assert new["agent"].bundle() == 200, "the deregistration revoked the token of the host registered after its read"
    assert store.agent_key(WID) == new["agent"].key.pem, "the deregistration unbound the new host's agent key"
    assert r.status_code == 409, r.text
    assert r.json()["error"] == "workload changed meanwhile: nothing set" and WID in r.json()["detail"], r.text
    attempt = [a for a in served.audit("workload.deregister") if a.principal == "otto"][-1]
    (failed,) = served.audit("workload.deregister.failed")
    assert failed.detail["audit_id"] == attempt.id and "registered again" in failed.detail["why"], failed
    assert failed.principal == "otto"


@pytest.mark.parametrize("deregistered_first", [True, False], ids=["deregistered-and-registered", "replaced"])
def test_attack_a_deregistration_read_before_a_registration_written_after_its_tombstone_time_is_refused(
    served: Served, monkeypatch: pytest.MonkeyPatch, deregistered_first: bool
) -> None:
    """The race after the tombstone's time was taken (at its audit record): the registration is
    newer than the tombstone, which before did not land while the deregistration answered 200."""
    new: dict[str, Agent] = {}
    race = new_host_meanwhile(served, new, deregistered_first)
    real = admin_service.Admin._audit
    done: list[int] = []

    def audit(self: Any, principal: str, action: str, *args: Any, **kwargs: Any) -> Any:
        if not done and principal == "otto" and action == "workload.deregister":
            done.append(1)
            race()
        return real(self, principal, action, *args, **kwargs)

    monkeypatch.setattr(admin_service.Admin, "_audit", audit)
    r = served.call("otto", "DELETE", DEREGISTER, {"reason": "old box decommissioned"})
    assert done and new, "the race happened"
    refused_and_the_new_host_kept(served, r, new)


@pytest.mark.parametrize("deregistered_first", [True, False], ids=["deregistered-and-registered", "replaced"])
def test_attack_a_deregistration_read_before_a_registration_does_not_remove_it(
    served: Served, monkeypatch: pytest.MonkeyPatch, deregistered_first: bool
) -> None:
    """The race right after the route's read, before the tombstone's time is taken: the tombstone
    is newer than the registration, and before replaced it (and cut the new host off)."""
    old = enrolled(served)
    new: dict[str, Agent] = {}
    race = new_host_meanwhile(served, new, deregistered_first)
    store = served.wiring.store
    real = store.get
    done: list[int] = []

    def read_then_raced(workload_id: str) -> Any:
        got = real(workload_id)
        if not done and workload_id == WID:
            done.append(1)
            race()
        return got

    monkeypatch.setattr(store, "get", read_then_raced)
    r = served.call("otto", "DELETE", DEREGISTER, {"reason": "old box decommissioned"})
    assert done and new, "the race happened"
    refused_and_the_new_host_kept(served, r, new)
    # the old host's agent: cut off by the new registration's own deregistration, or by its key's
    # binding to the new host (enrolled under the id)
    assert old.bundle() == 401
    # no race: the same request deregisters the workload
    monkeypatch.undo()
    r = served.call("otto", "DELETE", DEREGISTER, {"reason": "old box decommissioned"})
    assert r.status_code == 200, r.text
    rec = store.get(WID)
    assert rec is not None and rec.state == "terminated"
    assert new["agent"].bundle() == 401 and store.agent_key(WID) is None
