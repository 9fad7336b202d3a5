"""A CMDB sync registers or imports the same rows again and again. A row that changes nothing is
not written: its registration time stays, so an incident responder's quarantine (or any operator
write, each checked against the registration it read) decided while the sync runs is not refused
as "registered again". A row that changes anything is still a registration (the in-place race
tests: the ``in_place`` ones of tests/onprem/test_attack_operator_change_race.py and
tests/onprem/test_attack_credential_change_race.py). ``ringfence serve`` over SQLite."""

from __future__ import annotations

from typing import Any

import pytest

from ringfence.control import admin as admin_service
from tests.onprem.conftest import ESTATE, Served
from tests.onprem.test_attack_operator_change_race import WID

COLS = ["ringfence:role", "ringfence:app", "ringfence:env", "ringfence:loc"]


def csv_of(specs: list[dict[str, Any]]) -> str:
    rows = [",".join([s["id"], s["ips"][0], *(s["tags"][c] for c in COLS)]) for s in specs]
    return "\n".join(["id,ips," + ",".join(COLS), *rows]) + "\n"


def sync(served: Served, how: str) -> Any:
    if how == "register":
        return served.call("otto", "POST", "/admin/workloads", {**ESTATE[1], "reason": "CMDB sync"})
    return served.call("otto", "POST", "/admin/workloads/import", {"csv": csv_of(ESTATE), "reason": "CMDB sync"})


@pytest.mark.parametrize("how", ["register", "import"])
def test_a_sync_that_changes_nothing_between_a_quarantines_read_and_write_does_not_refuse_it(
    served: Served, monkeypatch: pytest.MonkeyPatch, how: str
) -> None:
    assert sync(served, how).status_code == 200  # the labels the policy gives, stored once
    before = served.wiring.store.get(WID)
    assert before is not None
    real = admin_service.is_deregistered  # called once the route has read the workload
    answers: list[Any] = []

    def meanwhile(*args: Any, **kwargs: Any) -> Any:
        if not answers:
            answers.append(sync(served, how))
        return real(*args, **kwargs)

    monkeypatch.setattr(admin_service, "is_deregistered", meanwhile)
    r = served.call("ivy", "POST", f"/admin/workloads/{WID}/quarantine", {"reason": "IR-9"})
    assert answers and answers[0].status_code == 200, "the sync landed between the read and the write"
    assert r.status_code == 200, r.text
    rec = served.wiring.store.get(WID)
    assert rec is not None and rec.op_quarantined
    assert rec.observed_at == before.observed_at, "a sync that changed nothing moved the registration time"
    action = "workload.register" if how == "register" else "workload.import"
    last = served.audit(action)[-1]
    assert last.detail["unchanged"] == (True if how == "register" else sorted(s["id"] for s in ESTATE))
    assert not served.audit("workload.quarantine.failed")


def test_a_sync_that_changes_a_row_is_a_registration_still(served: Served) -> None:
    assert sync(served, "register").status_code == 200
    before = served.wiring.store.get(WID)
    moved = {**ESTATE[1], "tags": {**ESTATE[1]["tags"], "team": "payments"}, "reason": "moved"}
    assert served.call("otto", "POST", "/admin/workloads", moved).status_code == 200
    rec = served.wiring.store.get(WID)
    assert before is not None and rec is not None
    assert rec.observed_at > before.observed_at and rec.workload.tags["team"] == "payments"
    assert "unchanged" not in served.audit("workload.register")[-1].detail
