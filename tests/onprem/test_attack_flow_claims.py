"""Attacks on flow evidence by one end's word: an enrolled workload reports flows (or drops) that
name its peer as the one who acted, performed through the real admin and agent-API routes (as
``ringfence serve`` runs them) over LocalWiring, its SQLite store and its inline flow ingest; the
suggestion read back through ``GET /admin/suggest`` and ``ringfence labels check --flows``."""

from __future__ import annotations

import json
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

from ringfence.flows.aggregate import merge
from ringfence.local.wiring import LocalWiring
from ringfence.siem import Siem
from tests.onprem.conftest import policy_files
from tests.onprem.test_attack_flow_reports import _enroll, cli_ingest_archived
from tests.onprem.test_attack_pairing_keys import WID, Plane

ME, DB, PROC = "192.168.30.41", "192.168.10.31", "192.168.10.21"  # the attacker WID, dc1-db-1, dc1-proc-1
WEB = "app=ordering,env=prod,loc=ca,role=web"
DATABASE = "app=ordering,env=prod,loc=ca,role=database"


def _attacker(wiring: LocalWiring) -> tuple[Plane, dict[str, str]]:
    """The estate (web-1, proc-1, db-1 of app ordering), the attacker WID registered as an ordering
    web host and enrolled: the plane and its agent's bearer header."""
    plane = Plane(wiring)
    tags = {"ringfence:role": "web", "ringfence:app": "ordering", "ringfence:env": "prod", "ringfence:loc": "ca"}
    st, b = plane.call(plane.admin, "POST", "/admin/workloads", {"id": WID, "ips": [ME], "tags": tags, "reason": "r3"})
    assert st in (200, 201), b
    assert wiring.settle(60)
    return plane, _enroll(plane, WID)


def _flow(src: str, dst: str, dport: int, direction: str) -> dict[str, Any]:
    t = time.time() - 30
    return {"start": t, "end": t + 1, "src": src, "dst": dst, "proto": "tcp", "dport": dport, "packets": 5,
            "bytes": 500, "direction": direction}  # fmt: skip


def _drop(src: str, dst: str, dport: int, direction: str) -> dict[str, Any]:
    return {"time": time.time() - 20, "direction": direction, "src": src, "dst": dst, "proto": "tcp", "dport": dport,
            "action": "drop", "rule_id": None}  # fmt: skip


def _suggest(plane: Plane) -> dict[str, Any]:
    st, s = plane.call(plane.admin, "GET", "/admin/suggest", query={"app": "ordering"})
    assert st == 200, s
    return dict(s)


def _labels_check(wiring: LocalWiring, tmp_path: Path) -> list[dict[str, Any]]:
    policy = tmp_path / "policy"
    policy.mkdir(exist_ok=True)
    for name, text in policy_files().items():
        (policy / name).write_text(text)
    out = subprocess.run([sys.executable, "-m", "ringfence.cli", "labels", "check", "--policy", str(policy),
                          "--flows", f"sqlite:{wiring.state_dir / 'state.db'}", "--json"],
                         capture_output=True, text=True, timeout=120)  # fmt: skip
    assert out.returncode in (0, 1), out.stderr
    return list(json.loads(out.stdout)["findings"])


def test_attack_a_workloads_claimed_flow_from_a_peer_is_not_proposed_by_suggest(
    wiring: LocalWiring, tmp_path: Path
) -> None:
    """The attacker (an ordering web host) reports an inbound flow db-1 → itself on tcp/4444 that
    db-1 never sent (db-1 runs an agent, which reported nothing). It was stored as database → web
    and ``suggest`` proposed ``database-to-web`` on tcp/4444 with nothing flagged and no reporter
    named: accepted, every ordering database could open connections to every web host on 4444;
    ``labels check --flows`` accused the pair of an unexpected port. Now each row records which end
    reported it and who: the flow, resting on the destination's word alone about a source that runs
    an agent, is flagged ``unconfirmed`` naming the attacker, not proposed, and ``labels check``
    lists it as ``flows/unconfirmed`` instead of accusing anyone. Once db-1's own agent reports the
    flow leaving, it is confirmed and proposed, both ends named."""
    plane, hdr = _attacker(wiring)
    db_hdr = _enroll(plane, "dc1-db-1")  # db-1 runs an agent, which saw no such flow
    st, b = plane.call(
        plane.agents, "POST", f"/v1/agents/{WID}/reports", {"flows": [_flow(DB, ME, 4444, "inbound")]}, headers=hdr
    )
    assert st == 202 and b == {"accepted": 1}, b  # its own end (the destination) is its address: its word is kept
    s = _suggest(plane)
    assert not [r for r in s["rules"] if "tcp/4444" in r["services"]], s["rules"]
    assert "tcp/4444" not in s["yaml"].split("# FLAGGED")[0], s["yaml"]
    (row,) = [r for r in merge(wiring.store.flow_rows()) if r.port == 4444]
    assert (row.src, row.dst, row.reported_by, row.reporters) == (DATABASE, WEB, ["dst"], [WID]), row
    (flag,) = [f for f in s["flagged"] if f["port"] == "tcp/4444"]
    assert flag["kind"] == "unconfirmed" and flag["reporters"] == [WID] and WID in flag["reason"], flag
    assert flag["reported_by"] == ["dst"] and flag["src"] == DATABASE, flag
    found = [f for f in _labels_check(wiring, tmp_path) if f.get("port") == "tcp/4444"]
    assert [f["kind"] for f in found] == ["flows/unconfirmed"] and WID in found[0]["message"], found

    # db-1's agent reports the flow leaving: both ends saw it, it is proposed, both named
    st, b = plane.call(
        plane.agents,
        "POST",
        "/v1/agents/dc1-db-1/reports",
        {"flows": [_flow(DB, ME, 4444, "outbound")]},
        headers=db_hdr,
    )
    assert st == 202 and b == {"accepted": 1}, b
    s = _suggest(plane)
    (rule,) = [r for r in s["rules"] if "tcp/4444" in r["services"]]
    (seen,) = rule["observed"]
    assert seen["reported_by"] == ["dst", "src"] and seen["reporters"] == ["dc1-db-1", WID], seen
    assert "reported by dst, src" in rule["description"], rule
    assert not [f for f in s["flagged"] if f["port"] == "tcp/4444"], s["flagged"]


def test_a_source_claim_about_a_peer_is_proposed_with_its_reporter_named(wiring: LocalWiring) -> None:
    """The other way round, the attacker's claim that it called a peer is what it did (its own
    egress may have stopped it before the peer saw it; it could send it for real anyway): it is
    proposed, and the suggestion names the attacker as the one that reported it."""
    plane, hdr = _attacker(wiring)
    _enroll(plane, "dc1-proc-1")
    st, b = plane.call(
        plane.agents, "POST", f"/v1/agents/{WID}/reports", {"drops": [_drop(ME, PROC, 7777, "outbound")]}, headers=hdr
    )
    assert st == 202 and b == {"accepted": 1}, b
    (rule,) = [r for r in _suggest(plane)["rules"] if "tcp/7777" in r["services"]]
    assert [(o["reported_by"], o["reporters"]) for o in rule["observed"]] == [(["src"], [WID])], rule


def test_attack_a_drop_reported_with_the_wrong_direction_is_refused(wiring: LocalWiring, tmp_path: Path) -> None:
    """``direction`` was never checked against which end is the reporter's: a drop "outbound"
    from db-1's address to the attacker was kept, and the SIEM event put the attacker's
    instance_uid on db-1's address (db-1 named as the dropping host's source side: it looked like
    db-1's agent dropping its own connection to the attacker); a flow "inbound" to a peer from the
    attacker's address was stored as if the peer's end reported it. Now the route keeps a record
    only if its own end (the source of an outbound one, the destination of an inbound one) is the
    reporter's, and counts the others as refused; the ingest (``ringfence flows ingest`` of an
    archived batch, the flows function) checks the same."""
    wiring.siem = Siem.from_spec(f"file:{tmp_path}/siem.jsonl")
    plane, hdr = _attacker(wiring)
    path = f"/v1/agents/{WID}/reports"
    turned = {"drops": [_drop(DB, ME, 4444, "outbound"), _drop(ME, DB, 4445, "inbound")],
              "flows": [_flow(DB, ME, 4446, "outbound"), _flow(ME, PROC, 4447, "inbound")]}  # fmt: skip
    st, b = plane.call(plane.agents, "POST", path, turned, headers=hdr)
    assert st == 202 and b == {"accepted": 0}, b
    assert not list((wiring.state_dir / "objects" / "reports").rglob("*.json"))  # nothing archived
    assert not [r for r in wiring.store.flow_rows() if r.port in (4444, 4445, 4446, 4447)]
    assert not (tmp_path / "siem.jsonl").exists() or '"class_uid":4001' not in (tmp_path / "siem.jsonl").read_text()
    # the same drop the right way round: kept, the attacker's instance_uid on its own address
    st, b = plane.call(plane.agents, "POST", path, {"drops": [_drop(DB, ME, 4444, "inbound")]}, headers=hdr)
    assert st == 202 and b == {"accepted": 1}, b
    (event,) = [
        e for e in map(json.loads, (tmp_path / "siem.jsonl").read_text().splitlines()) if e["class_uid"] == 4001
    ]
    assert event["dst_endpoint"]["ip"] == ME and event["dst_endpoint"].get("instance_uid") == WID, event
    assert "instance_uid" not in event["src_endpoint"], event
    (row,) = [r for r in merge(wiring.store.flow_rows()) if r.port == 4444]
    assert row.reported_by == ["dst"] and row.reporters == [WID], row

    # an archived batch (written before the route checked) read by the CLI: the turned records are not taken
    cli_ingest_archived(wiring, tmp_path, {**turned, "flows": [*turned["flows"], _flow(ME, PROC, 4448, "outbound")]})
    rows = {r.port: r for r in merge(wiring.store.flow_rows())}
    assert not {4445, 4446, 4447} & set(rows) and rows[4444].flows == 1, rows
    assert rows[4448].reported_by == ["src"] and rows[4448].src == WEB, rows


def test_attack_claims_about_a_peer_on_many_ports_neither_hide_its_real_flow_nor_lose_their_flag(
    wiring: LocalWiring,
) -> None:
    """db-1's own agent reports a real flow to a web host on tcp/5000; the attacker (a web host)
    then claims 33 inbound flows from db-1 on other ports, its word alone. Before, suggest folded
    the ports of one rule before it set one end's word apart: the 34 ports became one flagged
    many-ports observation, the real tcp/5000 rule was no longer proposed, and the claims lost
    their "unconfirmed" flag, borrowing db-1's confirmation (reported_by [dst, src]). Now the
    claims are set apart first: folded among themselves, still flagged unconfirmed with the
    attacker named, and the real flow is proposed."""
    plane, hdr = _attacker(wiring)
    db_hdr = _enroll(plane, "dc1-db-1")
    st, b = plane.call(plane.agents, "POST", "/v1/agents/dc1-db-1/reports",
                       {"flows": [_flow(DB, ME, 5000, "outbound")]}, headers=db_hdr)  # fmt: skip
    assert st == 202 and b == {"accepted": 1}, b
    claims = [_flow(DB, ME, p, "inbound") for p in range(6000, 6033)]
    st, b = plane.call(plane.agents, "POST", f"/v1/agents/{WID}/reports", {"flows": claims}, headers=hdr)
    assert st == 202 and b == {"accepted": 33}, b
    s = _suggest(plane)
    assert [r["services"] for r in s["rules"] if "tcp/5000" in r["services"]] == [["tcp/5000"]], s["rules"]
    (flag,) = [f for f in s["flagged"] if f["kind"] == "unconfirmed"]
    assert flag["reported_by"] == ["dst"] and flag["reporters"] == [WID], flag
    assert "33 distinct ports" in flag["reason"] and WID in flag["reason"], flag
    assert not [f for f in s["flagged"] if f["kind"] == "many-ports"], s["flagged"]
