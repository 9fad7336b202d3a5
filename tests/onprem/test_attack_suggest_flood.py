"""One compromised, enrolled workload floods ``suggest``'s bound (1,000 tests) with its own flows,
each claimed seen a billion times, to push another workload's real flows out of the suggestion.
Performed through the real agent-API report route and the real admin suggest route (as
``ringfence serve`` runs them) over LocalWiring, its SQLite store and its inline flow ingest."""

from __future__ import annotations

import time
from typing import Any

from ringfence.flows import suggest as suggest_mod
from ringfence.local.wiring import LocalWiring
from tests.aws.test_pipeline import AgentKey
from tests.onprem.test_attack_pairing_keys import WID, Plane

ATT_IP = "192.168.30.41"  # WID (dc3-app-1), an ordering web host in rack 3
VICTIM, VICTIM_IP, DB_IP = "dc1-proc-1", "192.168.10.21", "192.168.10.31"
TAGS = {"ringfence:app": "ordering", "ringfence:env": "prod", "ringfence:loc": "ca"}
# more ordering roles, one host each: more label groups for the attacker's flows to name
MORE = {"lb": "192.168.10.41", "dns": "192.168.10.42", "ntp": "192.168.10.43", "ad": "192.168.10.44",
        "syslog": "192.168.10.45", "monitoring": "192.168.10.46"}  # fmt: skip
VICTIM_PORTS = range(7000, 7020)
BILLION = 10**9


def _enroll(plane: Plane, wid: str) -> dict[str, str]:
    """``wid``'s agent token, enrolled by pairing as its agent would."""
    st, b = plane.call(plane.admin, "POST", "/admin/pairing-keys", {"workload_id": wid, "uses": 1, "ttl": 600})
    assert st == 201, b
    key, n = AgentKey(), plane.nonce()
    body = {"method": "pairing", "nonce": n, "workload_id": wid, "pairing_key": b["pairing_key"],
            "agent_key": key.pem, "agent_signature": key.prove("enroll", wid, n)}  # fmt: skip
    st, b = plane.call(plane.agents, "POST", "/v1/enroll", body)
    assert st == 200, b
    return {"Authorization": f"Bearer {b['token']}"}


def _report(plane: Plane, wid: str, hdr: dict[str, str], batch: dict[str, Any]) -> int:
    st, b = plane.call(plane.agents, "POST", f"/v1/agents/{wid}/reports", batch, headers=hdr)
    assert st == 202, b
    return int(b["accepted"])


def _drop(now: float, src: str, dst: str, proto: str, port: int, direction: str) -> dict[str, Any]:
    return {"time": now, "direction": direction, "src": src, "dst": dst, "proto": proto, "dport": port,
            "action": "drop", "count": BILLION}  # fmt: skip


def test_attack_a_workload_flooding_suggest_cannot_push_out_anothers_flows(wiring: LocalWiring) -> None:
    """The bound kept the flows seen most: the attacker's 1,000 rows (its daily cap), each a drop
    claimed folded a billion times, between its group and every other group of its app (up to 32
    ports per rule, so none folds into a many-ports observation), took all 1,000 tests, and the
    processing host's 20 real blocked flows to the database were left out, named only as
    "20 flows to propose, those seen least". Now the room is shared among the reporters: the
    victim's flows are all proposed, the attacker's take what is left, and ``left_out`` names
    the attacker as the reporter of what was left out."""
    plane = Plane(wiring)  # web-1 .11, proc-1 .21, db-1 .31 (ordering, prod, ca), the example policy
    for role, ip in MORE.items():
        spec = {"id": f"dc1-{role}-1", "ips": [ip], "tags": {**TAGS, "ringfence:role": role}, "reason": "rack 1"}
        st, b = plane.call(plane.admin, "POST", "/admin/workloads", spec)
        assert st in (200, 201), b
    spec = {"id": WID, "ips": [ATT_IP], "tags": {**TAGS, "ringfence:role": "web"}, "reason": "rack 3"}
    st, b = plane.call(plane.admin, "POST", "/admin/workloads", spec)
    assert st in (200, 201), b
    assert wiring.settle(60)
    attacker, victim = _enroll(plane, WID), _enroll(plane, VICTIM)
    now = time.time()

    # the victim's real traffic: 20 connections to the database on ports the policy does not allow
    flows = [{"start": now, "end": now + 1, "src": VICTIM_IP, "dst": DB_IP, "proto": "tcp", "dport": p,
              "packets": 3, "bytes": 180, "direction": "outbound"} for p in VICTIM_PORTS]  # fmt: skip
    assert _report(plane, VICTIM, victim, {"flows": flows}) == len(flows)

    # the attacker's: to every group of its app, and from those whose group runs no agent (its
    # word about them is all there is), 32 ports per rule on tcp and udp
    peers = ["192.168.10.11", VICTIM_IP, DB_IP, *MORE.values()]
    no_agent = [DB_IP, *MORE.values()]
    ports = range(20000, 20032)
    drops = [
        _drop(now, ATT_IP, p, proto, port, "outbound") for p in peers for proto in ("tcp", "udp") for port in ports
    ]
    drops += [
        _drop(now, p, ATT_IP, proto, port, "inbound") for p in no_agent for proto in ("tcp", "udp") for port in ports
    ]
    assert len(drops) > suggest_mod.MAX_TESTS
    for i in range(0, len(drops), 500):
        assert _report(plane, WID, attacker, {"flows": [], "drops": drops[i : i + 500]}) == len(drops[i : i + 500])

    st, b = plane.call(plane.admin, "GET", "/admin/suggest", query={"app": "ordering"})
    assert st == 200, b
    proposed = [o for r in b["rules"] for o in r["observed"]]
    assert b["partial"] is True and b["yaml"].count("expect: allow") == suggest_mod.MAX_TESTS, b["left_out"]
    mine = sorted(int(o["port"].split("/")[1]) for o in proposed if o["reporters"] == [VICTIM])
    assert mine == list(VICTIM_PORTS), (mine, b["left_out"])
    assert len([o for o in proposed if o["reporters"] == [WID]]) == suggest_mod.MAX_TESTS - len(VICTIM_PORTS)
    # what was left out is the attacker's, and says so
    assert len(b["left_out"]) == 1 and f"reported by {WID} (" in b["left_out"][0], b["left_out"]
    assert VICTIM not in b["left_out"][0]
