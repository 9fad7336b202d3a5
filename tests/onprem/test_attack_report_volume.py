"""What one compromised, enrolled workload can add through its reports: flow rows (bounded per
reporter and day), rows that make ``suggest`` unanswerable, and flows dated before it existed.
Performed through the real agent-API and admin routes (as ``ringfence serve`` runs them) over
LocalWiring, its SQLite store and its inline flow ingest; the attacker enrolls by pairing."""

from __future__ import annotations

import logging
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from ringfence.flows import suggest as suggest_mod
from ringfence.flows.aggregate import FlowRow, merge
from ringfence.flows.ingest import FlowIngest
from ringfence.local.wiring import LocalWiring
from ringfence.metrics import Counters
from tests.aws.test_pipeline import AgentKey
from tests.onprem.conftest import signing_key_file
from tests.onprem.test_attack_pairing_keys import WID, Plane

ATT_IP = "192.168.30.41"  # WID (dc3-app-1), an ordering web host in rack 3
PROC_IP = "192.168.10.21"
WEB = "app=ordering,env=prod,loc=ca,role=web"
PROC = "app=ordering,env=prod,loc=ca,role=processing"


@pytest.fixture
def counted(tmp_path: Path) -> Iterator[tuple[LocalWiring, Counters]]:
    counters = Counters()
    w = LocalWiring(tmp_path / "state" / "state.db", signing_key=signing_key_file(tmp_path), metric=counters)
    yield w, counters
    w.close()


def _attacker(w: LocalWiring) -> tuple[Plane, dict[str, str]]:
    plane = Plane(w)  # web-1 .11, proc-1 .21, db-1 .31 (ordering, prod, ca), the example policy
    tags = {"ringfence:role": "web", "ringfence:app": "ordering", "ringfence:env": "prod", "ringfence:loc": "ca"}
    st, b = plane.call(
        plane.admin, "POST", "/admin/workloads", {"id": WID, "ips": [ATT_IP], "tags": tags, "reason": "r3"}
    )
    assert st in (200, 201), b
    assert w.settle(60)
    st, b = plane.pair(plane.mint(uses=1), AgentKey())
    assert st == 200, b
    return plane, {"Authorization": f"Bearer {b['token']}"}


def _flow(start: float, dport: int, proto: str = "udp") -> dict[str, Any]:
    return {"start": start, "end": start + 1, "src": ATT_IP, "dst": PROC_IP, "proto": proto, "dport": dport,
            "packets": 5, "bytes": 500, "direction": "outbound"}  # fmt: skip


def _report(plane: Plane, hdr: dict[str, str], flows: list[dict[str, Any]]) -> int:
    st, b = plane.call(plane.agents, "POST", f"/v1/agents/{WID}/reports", {"flows": flows}, headers=hdr)
    assert st == 202, b
    return int(b["accepted"])


def _rows_of_attacker(w: LocalWiring) -> list[FlowRow]:
    return [r for r in w.store.flow_rows() if r.sample_src == ATT_IP]


def test_attack_one_workloads_reports_cannot_add_unbounded_flow_rows(
    counted: tuple[LocalWiring, Counters], monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    """A 256 KiB report of flows to distinct UDP ports made ~1,950 stored rows, ten of them
    ~19,000 (kept 30 days; every map and suggestion reads them all), and suggest proposed
    udp/2-1948. Now one reporter's flows make at most RINGFENCE_FLOW_ROWS_PER_REPORTER_DAY
    distinct rows a day (40 here); the rest are dropped, counted (FlowRowsCapped) and logged
    once; a row it already has still counts its flows; suggest flags the spread of ports as one
    observation and proposes no range."""
    w, counters = counted
    monkeypatch.setenv("RINGFENCE_FLOW_ROWS_PER_REPORTER_DAY", "40")
    plane, hdr = _attacker(w)
    now = time.time()
    with caplog.at_level(logging.WARNING, logger="ringfence.flows.ingest"):
        for batch in range(3):
            assert _report(plane, hdr, [_flow(now, 1 + batch * 300 + i) for i in range(300)]) == 300
    rows = _rows_of_attacker(w)
    assert len(rows) == 40, len(rows)
    capped = [r for r in caplog.records if "rows today" in r.getMessage()]
    assert len(capped) == 1 and WID in capped[0].getMessage()  # logged once a day
    assert b"ringfence_flow_rows_capped_total 860.0" in counters.exposition()
    # a row it has already: its flows still count
    port = rows[0].port
    assert port is not None
    _report(plane, hdr, [_flow(now, port)])
    again = {r.key: r for r in _rows_of_attacker(w)}
    assert len(again) == 40 and again[rows[0].key].flows == rows[0].flows + 1
    st, b = plane.call(plane.admin, "GET", "/admin/suggest", query={"app": "ordering"})
    assert st == 200, b
    assert all(len(r["services"]) <= suggest_mod.MAX_PORTS for r in b["rules"])
    for r in b["rules"]:
        for spec in r["services"]:
            lo, _, hi = spec.split("/")[1].partition("-")
            assert int(hi or lo) - int(lo) < suggest_mod.MAX_PORTS, spec
    many = [f for f in b["flagged"] if f["kind"] == "many-ports"]
    assert len(many) == 1 and many[0]["src"] == WEB and many[0]["dst"] == PROC and "(40 ports)" in many[0]["port"]


@pytest.mark.slow
def test_attack_suggest_answers_when_flows_would_expand_past_the_loader_limit(wiring: LocalWiring) -> None:
    """Ten such reports (19,325 rows) made GET /admin/suggest raise AssertionError for every
    operator ("document expands to more than 200000 values"). The rows are stored here as the
    ingest writes them (many reporters, each under its cap, or rows kept from before the cap):
    20,000 UDP ports between two groups, and 1,470 flows between 49 other pairs of roles (30 ports each). The
    answer is bounded: the ports are one flagged observation, at most MAX_TESTS tests, what was
    left out named (partial); a suggestion the loader refuses is a 422 naming why."""
    plane = Plane(wiring)
    now = time.time()
    day = time.strftime("%Y-%m-%d", time.gmtime(now))

    def row(src: str, dst: str, port: int) -> FlowRow:
        return FlowRow(
            day=day, src=src, dst=dst, proto="udp", port=port, decision="blocked", rule="default deny", flows=1,
            first_seen=now, last_seen=now, origins=["agent"],
        )  # fmt: skip

    rows = [row(WEB, PROC, p) for p in range(1, 20_001)]
    roles = ["lb", "web", "processing", "database", "dns", "ntp", "ad", "syslog", "monitoring", "jumpbox"]
    ends = [f"app=ordering,env=prod,loc=ca,role={r}" for r in roles]
    rows += [row(s, d, p) for s in ends for d in ends[:5] if (s, d) != (WEB, PROC) for p in range(20_001, 20_031)]
    wiring.store.add_flows(rows, 3600)
    st, b = plane.call(plane.admin, "GET", "/admin/suggest", query={"app": "ordering"})
    assert st == 200, b
    assert b["yaml"].count("expect: allow") == suggest_mod.MAX_TESTS
    assert b["partial"] is True and "470 flows to propose" in b["left_out"][0]
    assert [f["port"] for f in b["flagged"] if f["kind"] == "many-ports"] == ["udp/1-20000 (20000 ports)"]
    assert all(len(r["services"]) == 1 and r["services"][0].startswith("udp/20001-") for r in b["rules"])
    # a suggestion the loader refuses (rows kept from before the policy narrowed a dimension's
    # values name one it no longer allows): an answer naming why, not a crash
    gone = row("app=ordering,env=prod,loc=gone,role=web", PROC, 20_001)
    gone.flows = 5  # among the flows kept (those seen most)
    wiring.store.add_flows([gone], 3600)
    st, b = plane.call(plane.admin, "GET", "/admin/suggest", query={"app": "ordering"})
    assert st == 422 and "do not load with the policy" in b["detail"] and "'gone'" in b["detail"], b


def test_attack_flows_backdated_before_the_reporter_existed_are_refused(wiring: LocalWiring) -> None:
    """Own flows dated 1970, 20 years back, 400 days back (before the rows' retention) or 10
    days back (before the host was registered) were taken: rows of those days, kept 30 days from
    now, a fabricated long-standing dependency in the map and suggest. Now the report route and
    the ingest (also the flows function's and ``ringfence flows ingest``'s path, from the archived
    batch) refuse them; a flow of now is taken."""
    plane, hdr = _attacker(wiring)
    now = time.time()
    old = [0.0, 86400 * 365 * 20, now - 86400 * 400, now - 86400 * 10]
    # the route refuses those before the retention; the ingest, which notes the new host's
    # addresses first, those before it was first seen too
    assert _report(plane, hdr, [_flow(t, 9000 + i, "tcp") for i, t in enumerate(old)]) == 1
    assert _report(plane, hdr, [_flow(now, 9100, "tcp")]) == 1
    # once its addresses are noted, the route refuses those before it was first seen as well
    assert _report(plane, hdr, [_flow(old[-1], 9010, "tcp")]) == 0
    assert [(r.day, r.port) for r in _rows_of_attacker(wiring)] == [(time.strftime("%Y-%m-%d", time.gmtime(now)), 9100)]
    # the ingest alone (an archived batch read again), with the reporter's first interval noted
    active = wiring.active_policy()
    assert active is not None
    ingest = FlowIngest(wiring.store, active[1])
    res = ingest.agent_batch(WID, {"flows": [_flow(t, 9200 + i, "tcp") for i, t in enumerate(old)]})
    assert res.rows == 0 and res.foreign == len(old)
    assert [r.port for r in merge(_rows_of_attacker(wiring))] == [9100]
    st, b = plane.call(plane.admin, "GET", "/admin/suggest", query={"app": "ordering"})
    assert st == 200 and [o["port"] for r in b["rules"] for o in r["observed"]] == ["tcp/9100"], b
