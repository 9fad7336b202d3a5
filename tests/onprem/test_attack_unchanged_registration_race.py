"""A registration that changes nothing is not written (a CMDB sync of the same row), so the store
no longer checks, in the write, that the record is still the one it was decided from. A
deregistration or a revocation landing between the registration's read and its answer was then
answered "registered" (200, audited as landed after it) while the workload stayed deregistered,
or audited with grants already taken back. Now such a registration re-reads the rows it leaves
unwritten: changed meanwhile, 409 ``workload changed meanwhile: nothing registered`` with its
``.failed`` record, as a write over a moved record is (the sync sends it again). ``ringfence
serve`` over SQLite."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import pytest

from ringfence.clouds import onprem
from tests.onprem.conftest import ESTATE, Served

WID = ESTATE[1]["id"]
BASTION = {
    "id": "bastion-1",
    "ips": ["192.168.10.99"],
    "tags": {"ringfence:role": "jumpbox", "ringfence:app": "admin", "ringfence:env": "prod"},
}


def after_the_read(monkeypatch: pytest.MonkeyPatch, then: Callable[[], Any]) -> list[Any]:
    """``then`` runs once the registration has read the stored record (its next step reads the
    active policy), before it decides and answers; its answer is kept."""
    real = onprem.OnPremAdmin._governing
    done: list[Any] = []

    def meanwhile(self: Any) -> Any:
        if not done:
            done.append(None)  # first: ``then``'s own request reads the policy too
            done[0] = then()
        return real(self)

    monkeypatch.setattr(onprem.OnPremAdmin, "_governing", meanwhile)
    return done


def refused(served: Served, r: Any, action: str) -> None:
    assert r.status_code == 409, r.text
    assert r.json()["error"] == "workload changed meanwhile: nothing registered", r.text
    (failed,) = served.audit(f"{action}.failed")
    assert failed.detail["audit_id"] == served.audit(action)[-1].id


def test_attack_an_unchanged_registration_overtaken_by_a_deregistration_is_not_answered_registered(
    served: Served, monkeypatch: pytest.MonkeyPatch
) -> None:
    sync = {**ESTATE[1], "reason": "CMDB sync"}
    assert served.call("otto", "POST", "/admin/workloads", sync).status_code == 200  # stored under the policy
    done = after_the_read(
        monkeypatch, lambda: served.call("otto", "DELETE", f"/admin/workloads/{WID}", {"reason": "decommissioned"})
    )
    r = served.call("otto", "POST", "/admin/workloads", sync)
    assert done and done[0].status_code == 200, "the deregistration landed between the read and the answer"
    rec = served.wiring.store.get(WID)
    assert rec is not None and rec.state == "terminated"
    refused(served, r, "workload.register")
    # sent again, it registers the host anew
    assert served.call("otto", "POST", "/admin/workloads", sync).status_code == 200
    rec = served.wiring.store.get(WID)
    assert rec is not None and rec.state == "running"


def test_attack_an_unchanged_import_overtaken_by_a_revocation_does_not_audit_the_grant_taken_back(
    served: Served, monkeypatch: pytest.MonkeyPatch
) -> None:
    csv = "id,ips,ringfence:role,ringfence:app,ringfence:env\nbastion-1,192.168.10.99,jumpbox,admin,prod\n"
    body = {"csv": csv, "source": "cmdb.csv", "reason": "CMDB sync"}
    assert served.call("pat", "POST", "/admin/workloads/import", body).status_code == 200
    rec = served.wiring.store.get("bastion-1")
    assert rec is not None and rec.workload.label_grants.get("role") == "jumpbox"
    assert served.call("pat", "POST", "/admin/workloads/import", body).json().get("updated") == 1  # unchanged now
    done = after_the_read(
        monkeypatch,
        lambda: served.call(
            "paula", "DELETE", "/admin/workloads/bastion-1/labels", {"dimensions": ["role"], "reason": "CHG-1"}
        ),
    )
    r = served.call("pat", "POST", "/admin/workloads/import", body)
    assert done and done[0].status_code == 200, "the revocation landed between the read and the answer"
    rec = served.wiring.store.get("bastion-1")
    assert rec is not None and "role" not in rec.workload.label_grants
    assert r.status_code == 409, r.text
    assert r.json()["error"] == "a workload changed meanwhile: import the file again", r.text
    (failed,) = served.audit("workload.import.failed")
    assert failed.detail["audit_id"] == served.audit("workload.import")[-1].id


def test_an_unchanged_registration_overtaken_by_another_registration_is_written_as_any(
    served: Served, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Two registrations of one id racing (a CMDB sync and an onboarding change): the one that
    would have changed nothing over what it read is written as any registration is, after the
    other (last registration wins, as before rows were left unwritten), not refused."""
    sync = {**ESTATE[1], "reason": "CMDB sync"}
    assert served.call("otto", "POST", "/admin/workloads", sync).status_code == 200
    moved = {**ESTATE[1], "tags": {**ESTATE[1]["tags"], "team": "payments"}, "reason": "tagged"}
    done = after_the_read(monkeypatch, lambda: served.call("otto", "POST", "/admin/workloads", moved))
    r = served.call("otto", "POST", "/admin/workloads", sync)
    assert done and done[0].status_code == 200, "the other registration landed between the read and the answer"
    assert r.status_code == 200, r.text
    rec = served.wiring.store.get(WID)
    assert rec is not None and "team" not in rec.workload.tags, "the later registration is the one stored"
    assert "unchanged" not in served.audit("workload.register")[-1].detail
    assert not served.audit("workload.register.failed")
