"""What an enrolled workload's drop reports cost the SIEM, through the real admin and agent-API
routes (as ``ringfence serve`` runs them) over LocalWiring, with the real file sinks (OCSF JSON
lines and CEF): drops are folded per batch with their count and first/last time, and a
workload's drop events are bounded per window, past which one summary says how many were
suppressed. Audit records (quarantine) are never folded or suppressed."""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Any

import pytest

from ringfence.local.wiring import LocalWiring
from ringfence.siem import DROP_BUDGET, Siem
from ringfence.siem.sinks import parse
from tests.aws.test_pipeline import AgentKey
from tests.onprem.test_attack_pairing_keys import WID, Plane
from tests.siem.test_siem import validate

ME = "192.168.30.41"  # WID's address
REPORT = f"/v1/agents/{WID}/reports"


class Clock:
    """The SIEM budget's clock, moved by the test instead of waiting a window out."""

    def __init__(self) -> None:
        self.now = time.time()

    def __call__(self) -> float:
        return self.now


def _plane(wiring: LocalWiring, tmp_path: Path, clock: Clock | None = None) -> tuple[Plane, dict[str, str]]:
    spec = f"file:{tmp_path}/siem.jsonl,cef+file:{tmp_path}/siem.cef"
    wiring.siem = Siem(parse(spec), spec, clock=clock or time.time)
    plane = Plane(wiring)
    plane.register()
    assert wiring.settle(60)
    st, b = plane.pair(plane.mint(uses=1), AgentKey())
    assert st == 200, b
    return plane, {"Authorization": f"Bearer {b['token']}"}


def _sent(tmp_path: Path) -> tuple[list[dict[str, Any]], list[str]]:
    ocsf = [json.loads(line) for line in (tmp_path / "siem.jsonl").read_text().splitlines()]
    cef = (tmp_path / "siem.cef").read_text().splitlines()
    return ocsf, cef


def _size(tmp_path: Path) -> tuple[int, int]:
    return (tmp_path / "siem.jsonl").stat().st_size, (tmp_path / "siem.cef").stat().st_size


def _drop(t: float, dport: int, **kw: Any) -> dict[str, Any]:
    return {"time": t, "direction": "outbound", "src": ME, "dst": "8.8.8.8", "proto": "tcp", "dport": dport,
            "action": "drop", "rule_id": "r", **kw}  # fmt: skip


def _big_report(now: float) -> tuple[str, int]:
    """The reviewer's report: drops to distinct ports (nothing to fold) up to 250 KiB of JSON."""
    drops: list[dict[str, Any]] = []
    while len(json.dumps({"drops": drops}, separators=(",", ":"))) <= 250 * 1024:
        drops.append(_drop(now - 10, len(drops) % 65535))
    drops.pop()
    return json.dumps({"drops": drops}, separators=(",", ":")), len(drops)


@pytest.mark.slow
def test_attack_a_workloads_drop_report_cannot_multiply_siem_volume(wiring: LocalWiring, tmp_path: Path) -> None:
    """One 256 KiB report of 1,773 drops to distinct ports became 1,773 events per sink: ~1.5 MB
    of OCSF (5.9x the request) and 0.6 MB of CEF, with no bound per workload. Now the workload's
    drop events are bounded per window (DROP_BUDGET a minute) and one summary carries the rest:
    each sink grows by less than the request, the counts still add up to every drop, further
    reports in the window add nothing until the window ends, and a quarantine is still sent."""
    clock = Clock()
    plane, hdr = _plane(wiring, tmp_path, clock)
    base = _size(tmp_path)
    body, n = _big_report(clock.now)
    assert n > 1700
    st, b = plane.call(plane.agents, "POST", REPORT, body, headers=hdr)
    assert st == 202 and b["accepted"] == n, b
    ocsf_bytes, cef_bytes = (after - before for after, before in zip(_size(tmp_path), base, strict=True))
    assert ocsf_bytes < len(body) and cef_bytes < len(body), (ocsf_bytes, cef_bytes, len(body))
    events, cef = _sent(tmp_path)
    drops = [e for e in events if e["class_uid"] == 4001]
    for e in drops:
        validate(e)
    summary = [e for e in drops if "suppressed" in e["unmapped"]["ringfence"]]
    assert len(drops) == DROP_BUDGET + 1 and len(summary) == 1, len(drops)
    assert sum(e["count"] for e in drops) == n, "the summary's count is every drop not sent"
    assert summary[0]["unmapped"]["ringfence"]["suppressed"]["events"] == n - DROP_BUDGET
    assert sum(int(line.split(" cnt=")[1].split(" ")[0]) for line in cef if " cnt=" in line) == n
    assert "cs6=dc3-app-1" in cef[-1], "the CEF summary names its workload"

    # the same again within the window: nothing more is sent until it ends
    st, b = plane.call(plane.agents, "POST", REPORT, body, headers=hdr)
    assert st == 202, b
    assert _size(tmp_path) == (base[0] + ocsf_bytes, base[1] + cef_bytes)
    # security-relevant events are never folded or suppressed
    st, b = plane.call(plane.admin, "POST", f"/admin/workloads/{WID}/quarantine", {"reason": "IR-12"})
    assert st == 200, b
    quarantine = [e for e in _sent(tmp_path)[0] if e["class_uid"] == 6003][-1]
    assert quarantine["api"]["operation"] == "workload.quarantine"

    # the window ends: the next report's first events are sent, and the previous window's rest summarized
    clock.now += 61
    st, b = plane.call(plane.agents, "POST", REPORT, {"drops": [_drop(clock.now, 1)]}, headers=hdr)
    assert st == 202, b
    drops = [e for e in _sent(tmp_path)[0] if e["class_uid"] == 4001]
    for e in drops:
        validate(e)
    assert sum(e["count"] for e in drops) == 2 * n + 1
    assert len([e for e in drops if "suppressed" in e["unmapped"]["ringfence"]]) == 2


def test_folded_drops_carry_their_count_and_first_and_last_time(wiring: LocalWiring, tmp_path: Path) -> None:
    """Drops of one (direction, src, dst, proto, dport, rule, action) in a batch are one event: the
    agent's counts summed, the first time as time/start_time, the last as end_time, the source
    port kept only when all had the same; another port, rule or action is an event of its own."""
    plane, hdr = _plane(wiring, tmp_path)
    t = time.time() - 30
    batch = [
        _drop(t + 5, 443, sport=40001, count=3),
        _drop(t, 443, sport=40002, count=2),
        _drop(t + 9, 443, sport=40003),
        _drop(t + 1, 22, sport=50000),
        _drop(t + 2, 22, sport=50000, count=4),
        _drop(t + 3, 22, sport=50000, rule_id="other"),
        _drop(t + 4, 22, sport=50000, action="would-drop"),
    ]
    st, b = plane.call(plane.agents, "POST", REPORT, {"drops": batch}, headers=hdr)
    assert st == 202 and b["accepted"] == 7, b
    events, cef = _sent(tmp_path)
    drops = [e for e in events if e["class_uid"] == 4001]
    for e in drops:
        validate(e)
    ms = lambda x: int(x * 1000)  # noqa: E731
    got = [
        (e["dst_endpoint"]["port"], e["unmapped"]["ringfence"]["rule_id"], e["unmapped"]["ringfence"]["observed"],
         e["count"], e["time"], e["start_time"], e["end_time"], e["src_endpoint"].get("port"))
        for e in drops
    ]  # fmt: skip
    assert got == [
        (443, "r", "drop", 6, ms(t), ms(t), ms(t + 9), None),
        (22, "r", "drop", 5, ms(t + 1), ms(t + 1), ms(t + 2), 50000),
        (22, "other", "drop", 1, ms(t + 3), ms(t + 3), ms(t + 3), 50000),
        (22, "r", "would-drop", 1, ms(t + 4), ms(t + 4), ms(t + 4), 50000),
    ]
    lines = [line for line in cef if "|400105|" in line or "|400106|" in line]
    assert len(lines) == 4
    assert f"cnt=6 start={ms(t)} end={ms(t + 9)}" in lines[0] and "dpt=443" in lines[0] and "spt=" not in lines[0]


@pytest.mark.slow
def test_drop_events_held_back_by_the_budget_are_counted_as_a_metric(tmp_path: Path) -> None:
    """The drop budget's suppressed events are counted through the wiring's metric (serve's
    counters, shown on GET /metrics; on AWS the agent-API function's CloudWatch metric): one
    report past the budget counts what it held back, a report within it counts nothing."""
    from ringfence.metrics import Counters
    from tests.onprem.conftest import signing_key_file

    counters = Counters()
    w = LocalWiring(tmp_path / "state" / "state.db", signing_key=signing_key_file(tmp_path), metric=counters)
    try:
        clock = Clock()
        plane, hdr = _plane(w, tmp_path, clock)
        body, n = _big_report(clock.now)
        st, b = plane.call(plane.agents, "POST", REPORT, body, headers=hdr)
        assert st == 202 and b["accepted"] == n, b
        metric = "ringfence_siem_drop_events_suppressed_total"
        assert f"{metric} {float(n - DROP_BUDGET)}" in counters.exposition().decode()
        clock.now += 61  # a new window: one drop is within the budget, nothing more is counted
        st, b = plane.call(plane.agents, "POST", REPORT, {"drops": [_drop(clock.now, 1)]}, headers=hdr)
        assert st == 202, b
        assert f"{metric} {float(n - DROP_BUDGET)}" in counters.exposition().decode()
    finally:
        w.close()
