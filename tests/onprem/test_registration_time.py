"""A registration is dated after the record it replaces (``onprem._after``), so a record a host
whose clock was ahead wrote carries its own id's later registrations ahead with it. A CMDB import
dates each row after its own record, not the file's latest: one row written far ahead does not
carry every other row of the file into the future; and the registration says so in the log.
``ringfence serve`` over SQLite."""

from __future__ import annotations

import logging
import time
from typing import Any

import pytest

from tests.onprem.conftest import ESTATE, Served
from tests.onprem.test_attack_registration_clock_behind import ahead

YEAR = 365 * 86400.0
COLS = ["ringfence:role", "ringfence:app", "ringfence:env", "ringfence:loc"]


def row(spec: dict[str, Any], ip: str) -> str:
    return ",".join([spec["id"], ip, *(spec["tags"][c] for c in COLS)])


def test_an_import_dates_each_row_after_its_own_record_not_a_far_ahead_one(
    served: Served, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    web, proc = ESTATE[0], ESTATE[1]
    ahead(monkeypatch, YEAR)  # a container a year ahead registers proc again
    assert served.call("otto", "POST", "/admin/workloads", {**proc, "ips": ["192.168.10.22"]}).status_code == 200
    monkeypatch.undo()
    caplog.set_level(logging.WARNING, logger="ringfence.clouds.onprem")
    csv = "\n".join(["id,ips," + ",".join(COLS), row(web, "192.168.10.12"), row(proc, "192.168.10.23")]) + "\n"
    r = served.call("otto", "POST", "/admin/workloads/import", {"csv": csv, "source": "cmdb.csv", "reason": "sync"})
    assert r.status_code == 200 and r.json()["updated"] == 2, r.text
    now = time.time()
    got = {wid: served.wiring.store.get(wid) for wid in (web["id"], proc["id"])}
    assert all(rec is not None for rec in got.values())
    assert got[proc["id"]].workload.ips == ["192.168.10.23"] and got[proc["id"]].observed_at > now + YEAR - 60
    assert got[web["id"]].workload.ips == ["192.168.10.12"]
    assert got[web["id"]].observed_at < now + 60, "one row written a year ahead carried the whole file with it"
    ahead_said = [r.getMessage() for r in caplog.records if "ahead of this clock" in r.getMessage()]
    assert len(ahead_said) == 1 and ahead_said[0].startswith(f"{proc['id']}: "), ahead_said
