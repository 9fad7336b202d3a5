"""On premise, over the real ``ringfence serve``: an operator's mode or quarantine belongs to the
host it was set for. Before, a deregistered id kept its ``idle`` mode (and its quarantine), and the
next host registered under that id ran unenforced with nothing in the answer or the audit log
saying so; a deregistered id also took modes, quarantines and pairing keys, which a binding
already refused (404)."""

from __future__ import annotations

from ringfence.model import Mode
from tests.onprem.conftest import ESTATE, Served

WID = "dc1-proc-1"
NEW_BOX = {**ESTATE[1], "ips": ["192.168.10.222"]}


def test_attack_reregistered_id_starts_without_the_old_hosts_mode_or_quarantine(served: Served) -> None:
    assert (
        served.call("paula", "PUT", f"/admin/workloads/{WID}/mode", {"mode": "idle", "reason": "old box"}).status_code
        == 200
    )
    assert served.call("ivy", "POST", f"/admin/workloads/{WID}/quarantine", {"reason": "IR-7"}).status_code == 200
    assert served.call("otto", "DELETE", f"/admin/workloads/{WID}", {"reason": "decommissioned"}).status_code == 200

    r = served.call("otto", "POST", "/admin/workloads", {**NEW_BOX, "reason": "new box, same name"})
    assert r.status_code == 200 and r.json()["created"] is False, r.text
    rec = served.wiring.store.get(WID)
    assert rec is not None and rec.state == "running"
    assert rec.op_mode is None, f"the old host's mode {rec.op_mode} landed on the new host"
    assert rec.op_quarantined is False, "the old host's quarantine landed on the new host"
    # the registration's record says what it cleared
    assert served.audit("workload.register")[-1].detail["operator_cleared"] == {"mode": "idle", "quarantined": True}


def test_attack_reregistered_id_by_import_starts_without_the_old_hosts_mode(served: Served) -> None:
    assert (
        served.call("paula", "PUT", f"/admin/workloads/{WID}/mode", {"mode": "idle", "reason": "old box"}).status_code
        == 200
    )
    assert served.call("otto", "DELETE", f"/admin/workloads/{WID}", {"reason": "decommissioned"}).status_code == 200
    csv = f"id,ips\n{WID},192.168.10.223\n"
    r = served.call("otto", "POST", "/admin/workloads/import", {"csv": csv, "source": "rack9.csv", "reason": "sync"})
    assert r.status_code == 200, r.text
    rec = served.wiring.store.get(WID)
    assert rec is not None and rec.op_mode is not Mode.IDLE
    assert served.audit("workload.import")[-1].detail["operator_cleared"] == {WID: {"mode": "idle"}}


def test_deregistered_workload_takes_no_mode_quarantine_or_pairing_key(served: Served) -> None:
    assert served.call("otto", "DELETE", f"/admin/workloads/{WID}", {"reason": "decommissioned"}).status_code == 200
    audited = len(served.wiring.store.audit_log())
    # answered as a binding to it is: an unknown workload
    bind = served.call("paula", "PUT", f"/admin/workloads/{WID}/labels", {"labels": {"role": "web"}, "reason": "x"})
    assert bind.status_code == 404 and bind.json()["error"] == "unknown workload", bind.text
    refused = [
        served.call("paula", "PUT", f"/admin/workloads/{WID}/mode", {"mode": "idle", "reason": "x"}),
        served.call("ivy", "POST", f"/admin/workloads/{WID}/quarantine", {"reason": "x"}),
        served.call("ivy", "DELETE", f"/admin/workloads/{WID}/quarantine", {"reason": "x"}),
        served.call("otto", "POST", "/admin/pairing-keys", {"workload_id": WID, "reason": "x"}),
    ]
    for r in refused:
        assert r.status_code == 404 and r.json()["error"] == "unknown workload", (r.request.url, r.text)
    assert len(served.wiring.store.audit_log()) == audited, "a refused request recorded a change"
    rec = served.wiring.store.get(WID)
    assert rec is not None and rec.op_mode is None and not rec.op_quarantined
