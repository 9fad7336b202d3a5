"""One compromised, enrolled workload floods ``suggest``'s bound (1,000 tests) with its own flows,
each claimed seen a billion times, to push another workload's real flows out of the suggestion;
or, agentless, with real traffic flow logs see; or folds a peer's real flow into its own
many-ports observation. Performed through the real agent-API report route, the real flow-log
parser and aggregator (:meth:`FlowIngest.vpc_object`, as the flows function runs it) and the real
admin suggest route (as ``ringfence serve`` runs them) over LocalWiring, its SQLite store and its
inline flow ingest."""

from __future__ import annotations

import gzip
import time
from typing import Any

from ringfence.flows import suggest as suggest_mod
from ringfence.flows.ingest import FlowIngest
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
WEB1, WEB1_IP = "dc1-web-1", "192.168.10.11"
FLOW_LOG_HEAD = "version srcaddr dstaddr dstport protocol packets bytes start end action log-status"


def _estate(plane: Plane, att_role: str = "web") -> None:
    """One more ordering host per role of :data:`MORE`, and the attacker (WID) as ``att_role``."""
    for role, ip in MORE.items():
        spec = {"id": f"dc1-{role}-1", "ips": [ip], "tags": {**TAGS, "ringfence:role": role}, "reason": "rack 1"}
        st, b = plane.call(plane.admin, "POST", "/admin/workloads", spec)
        assert st in (200, 201), b
    spec = {"id": WID, "ips": [ATT_IP], "tags": {**TAGS, "ringfence:role": att_role}, "reason": "rack 3"}
    st, b = plane.call(plane.admin, "POST", "/admin/workloads", spec)
    assert st in (200, 201), b
    assert plane.wiring.settle(60)


def _flood(now: float) -> list[dict[str, Any]]:
    """The attacker's drops: to every group of its app, and from those whose group runs no agent
    (its word about them is all there is), 32 ports per rule on tcp and udp (none folds)."""
    peers = [WEB1_IP, VICTIM_IP, DB_IP, *MORE.values()]
    no_agent = [DB_IP, *MORE.values()]
    ports = range(20000, 20032)
    drops = [
        _drop(now, ATT_IP, p, proto, port, "outbound") for p in peers for proto in ("tcp", "udp") for port in ports
    ]
    drops += [
        _drop(now, p, ATT_IP, proto, port, "inbound") for p in no_agent for proto in ("tcp", "udp") for port in ports
    ]
    assert len(drops) > suggest_mod.MAX_TESTS
    return drops


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
    _estate(plane)
    attacker, victim = _enroll(plane, WID), _enroll(plane, VICTIM)
    now = time.time()

    # the victim's real traffic: 20 connections to the database on ports the policy does not allow
    flows = [{"start": now, "end": now + 1, "src": VICTIM_IP, "dst": DB_IP, "proto": "tcp", "dport": p,
              "packets": 3, "bytes": 180, "direction": "outbound"} for p in VICTIM_PORTS]  # fmt: skip
    assert _report(plane, VICTIM, victim, {"flows": flows}) == len(flows)

    drops = _flood(now)
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


def test_attack_one_hosts_flow_log_traffic_cannot_push_out_an_agentless_workloads_flows(wiring: LocalWiring) -> None:
    """Flow logs were one reporter, ``vpc``: with no agent enrolled (the usual onboarding case),
    one host's real connections, 5 each to 32 ports of every group, filled that one share, and
    the processing host's 20 real flows to the database, seen by flow logs only, were all left
    out, ``left_out`` naming only "vpc". Now flow-log evidence is counted per address that sent
    it (``vpc:<address>``): the victim's flows have a share of their own."""
    plane = Plane(wiring)
    _estate(plane)  # no agent enrolled anywhere
    # and one host per role of ordering in a second site without loc: more groups to flood
    noloc = {r: f"192.168.11.{40 + i}" for i, r in enumerate(("web", "processing", "database", *MORE))}
    tags = {k: v for k, v in TAGS.items() if k != "ringfence:loc"}
    for role, ip in noloc.items():
        spec = {"id": f"dc2-{role}-1", "ips": [ip], "tags": {**tags, "ringfence:role": role}, "reason": "rack 1"}
        st, b = plane.call(plane.admin, "POST", "/admin/workloads", spec)
        assert st in (200, 201), b
    assert wiring.settle(60)
    active = wiring.active_policy()
    assert active is not None
    ingest = FlowIngest(wiring.store, active[1])
    now = int(time.time())
    ingest.sync(at=now - 3600.0)

    def log(lines: list[str]) -> bytes:
        return gzip.compress("\n".join([FLOW_LOG_HEAD, *lines]).encode())

    # the victim's real traffic: 20 connections to the database, 3 each (the policy allows none)
    victim = [f"2 {VICTIM_IP} {DB_IP} {p} 6 4 400 {now - 600} {now - 500} ACCEPT OK" for p in VICTIM_PORTS]
    ingest.vpc_object("victim.log.gz", log(victim * 3))
    # the attacker's: real connections, 5 to each of 32 ports of every group, on tcp and udp
    peers = [WEB1_IP, VICTIM_IP, DB_IP, *MORE.values(), *noloc.values()]
    flood = [
        f"2 {ATT_IP} {p} {port} {proto} 1 60 {now - 300} {now - 200} ACCEPT OK"
        for p in peers
        for proto in (6, 17)
        for port in range(20000, 20032)
    ]
    ingest.vpc_object("flood.log.gz", log(flood * 5))

    st, b = plane.call(plane.admin, "GET", "/admin/suggest", query={"app": "ordering"})
    assert st == 200, b
    assert b["partial"] is True and b["yaml"].count("expect: allow") == suggest_mod.MAX_TESTS, b["left_out"]
    proposed = [o for r in b["rules"] for o in r["observed"]]
    mine = sorted(
        o["port"] for o in proposed if o["src"].endswith("role=processing") and o["dst"].endswith("role=database")
    )
    assert mine == [f"tcp/{p}" for p in VICTIM_PORTS], (mine, b["left_out"])
    # what was left out is the attacker's address's, and says so
    assert len(b["left_out"]) == 1 and f"reported by vpc:{ATT_IP} (" in b["left_out"][0], b["left_out"]
    assert VICTIM_IP not in b["left_out"][0]


def test_attack_a_hosts_many_ports_do_not_fold_a_same_group_peers_real_flow(wiring: LocalWiring) -> None:
    """A compromised web host (the labels of dc1-web-1) reported its own drops to the database on
    33 ports: with dc1-web-1's real blocked flow to the database on tcp/7000, one rule's 34 ports,
    all folded into one flagged many-ports observation, and the real flow was not proposed (33
    rows, no flood). Now ports are counted per reporter: the attacker's 33 are folded and flagged,
    naming it, and dc1-web-1's flow is proposed."""
    plane = Plane(wiring)
    _estate(plane, "web")
    attacker, victim = _enroll(plane, WID), _enroll(plane, WEB1)
    now = time.time()
    real = [{"start": now, "end": now + 1, "src": WEB1_IP, "dst": DB_IP, "proto": "tcp", "dport": 7000,
             "packets": 3, "bytes": 180, "direction": "outbound"}]  # fmt: skip
    assert _report(plane, WEB1, victim, {"flows": real}) == 1
    many = range(20000, 20000 + suggest_mod.MAX_PORTS + 1)
    drops = [_drop(now, ATT_IP, DB_IP, "tcp", p, "outbound") for p in many]
    assert _report(plane, WID, attacker, {"flows": [], "drops": drops}) == len(drops)

    st, b = plane.call(plane.admin, "GET", "/admin/suggest", query={"app": "ordering"})
    assert st == 200, b
    proposed = [(o["port"], o["reporters"]) for r in b["rules"] for o in r["observed"]]
    assert proposed == [("tcp/7000", [WEB1])], (proposed, b["flagged"])
    (folded,) = [f for f in b["flagged"] if f["kind"] == "many-ports"]
    assert folded["reporters"] == [WID] and folded["port"] == f"tcp/20000-20032 ({len(many)} ports)", folded
    assert WID in folded["reason"], folded


def test_attack_a_flood_of_proposals_cannot_push_out_anothers_pinned_flows(wiring: LocalWiring) -> None:
    """With ``include_allowed``, proposed flows took the 1,000 tests before pinned flows had any
    room: the attacker's flood left the processing host's allowed flow unpinned, and ``left_out``
    named the victim as the reporter of what was left out. Now proposals and pins share the room
    together, each reporter's proposals before its pins: the victim's pin is kept."""
    plane = Plane(wiring)
    _estate(plane, "web")
    attacker, victim = _enroll(plane, WID), _enroll(plane, VICTIM)
    now = time.time()
    flows = [{"start": now, "end": now + 1, "src": VICTIM_IP, "dst": DB_IP, "proto": "tcp", "dport": 5432,
              "packets": 3, "bytes": 180, "direction": "outbound"}]  # fmt: skip
    assert _report(plane, VICTIM, victim, {"flows": flows}) == 1
    drops = _flood(now)
    for i in range(0, len(drops), 500):
        _report(plane, WID, attacker, {"flows": [], "drops": drops[i : i + 500]})

    st, b = plane.call(plane.admin, "GET", "/admin/suggest", query={"app": "ordering", "include_allowed": "true"})
    assert st == 200, b
    assert b["yaml"].count("expect: allow") == suggest_mod.MAX_TESTS, b["left_out"]
    assert [(o["port"], o["reporters"]) for o in b["pinned"]] == [("tcp/5432", [VICTIM])], b["left_out"]
    assert b["partial"] is True and all(VICTIM not in x for x in b["left_out"]), b["left_out"]
    assert all(f"reported by {WID} (" in x for x in b["left_out"]), b["left_out"]
