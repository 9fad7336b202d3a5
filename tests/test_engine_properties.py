"""Property tests: incremental updates equal a full recompile; bundles agree with explain.

Random estates (labels over small value spaces so selectors collide often, shared IPs, v4 and v6)
and random change sequences (add, remove, relabel, re-IP, mode, quarantine).
"""

from __future__ import annotations

import ipaddress
from typing import Any

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from ringfence import addresses
from ringfence.engine import Engine
from ringfence.engine.explain import Endpoint, decide
from ringfence.model import Mode, Workload
from ringfence.policy import Policy, load_policy_texts

HEAD = """
labels:
  dimensions:
    tier: {keys: ["ringfence:tier"]}
services:
  - {name: web, ports: [tcp/80, tcp/443]}
  - {name: db, ports: [tcp/5432]}
  - {name: dns, ports: [udp/53]}
ip_lists:
  - {name: corp, cidrs: [10.9.0.0/16, "fd09::/32"], exclude: [10.9.9.0/24]}
"""
POLICY = (
    HEAD
    + """rulesets:
  - name: app
    scope: has(app)
    rules:
      - {name: lb-web, from: role == lb, to: role == web, services: [web]}
      - {name: web-db, from: role == web, to: role == db, services: [db], same: [app, env]}
      - {name: corp-lb, from: {ip_list: corp}, to: role == lb, services: [web]}
      - {name: out, from: role == web, to: {ip_list: any}, services: [tcp/443]}
  - name: shared
    scope: all()
    same: []
    rules:
      - {name: dns, from: all(), to: role == dns, services: [dns]}
      - {name: tiered, from: "tier in {a, b}", to: "!has(tier) && role != dns", services: [tcp/9000-9100]}
      - {name: no-dev-prod, from: env == dev, to: env == prod, services: [all], action: override-deny}
      - {name: plain-deny, from: role == lb, to: role == db, services: [db], action: deny}
      # allow rules of one owner side (inbound to all()): one group, with a member joining on
      # identical services, one overlapping (tcp/9000-9100 ∩ tcp/9050: cut into pieces) and 'any'
      - {name: mon, from: role == dns, to: all(), services: [tcp/9050, icmp/8]}
      - {name: mon2, from: tier == c, to: all(), services: [tcp/9050, udp/53]}
      - {name: wide, from: tier == b, to: all(), services: [tcp/9000-9100]}
      - {name: from-corp, from: {ip_list: corp}, to: all(), services: [tcp/80]}
      - {name: from-anywhere, from: {ip_list: any}, to: all(), services: [tcp/5432]}
      - {name: lb-any, from: role == lb && app == a, to: all(), services: [all]}
      - {name: web-any, from: role == web && app == c, to: all(), services: [all]}
  - name: trial
    scope: app == a
    staged: true
    rules:
      - {name: web-web, from: role == web, to: role == web, services: [tcp/8080]}
modes:
  - {selector: env == test, mode: observe}
  - {selector: role == lb && app == c, mode: idle}
"""
)

ROLES = ["lb", "web", "db", "dns"]
APPS = ["a", "b", "c"]
ENVS = ["dev", "prod", "test"]
IPS4 = [f"10.0.0.{i}" for i in range(12)] + ["10.9.1.1", "10.9.9.9"]
IPS6 = ["fd00::1", "fd00::2", "fd00::3", "fd09::5"]


def policy() -> Policy:
    return load_policy_texts({"p.yaml": POLICY})


# random rulesets over IP lists that hold workload addresses (all of them, a server range, one
# address excluded, IPv6 only) as well as selectors, with every action: for the matrix and
# policy diff against explain
RANDOM_HEAD = (
    HEAD
    + """  - {name: servers, cidrs: [10.0.0.0/29]}
  - {name: most, cidrs: [0.0.0.0/0], exclude: [10.0.0.5/32]}
  - {name: v6, cidrs: ["fd00::/126"]}
rulesets:
"""
)
RANDOM_SELECTORS = [
    "all()",
    "role == web",
    "role == db",
    "role in {lb, web}",
    "app == a",
    "env == prod",
    "env != prod",
    "!has(tier)",
    "tier in {a, b}",
]
RANDOM_IP_LISTS = ["any", "corp", "servers", "most", "v6"]
RANDOM_SERVICES = ["web", "db", "dns", "all", "tcp/9000-9100", "tcp/80", "icmp/8", "tcp/5432", "udp/1-100"]
RANDOM_PROBES = [("tcp", 80), ("tcp", 443), ("tcp", 5432), ("udp", 53), ("tcp", 9050), ("icmp", 8), ("udp", 7)]


@st.composite
def random_policy_texts(draw: Any, min_rules: int = 1) -> str:
    """A policy of random rules: selector or IP-list peers, allow / deny / override-deny, ``same:``."""

    def peer(ip: bool) -> str:
        if ip:
            return "{ip_list: " + draw(st.sampled_from(RANDOM_IP_LISTS)) + "}"
        return '"' + draw(st.sampled_from(RANDOM_SELECTORS)) + '"'

    lines = []
    for r in range(draw(st.integers(min_value=1, max_value=3))):
        staged = draw(st.integers(min_value=0, max_value=4)) == 0
        lines.append(f"  - name: rs{r}\n    scope: all()\n    same: []\n    staged: {str(staged).lower()}\n    rules:")
        for i in range(draw(st.integers(min_value=min_rules if r == 0 else 1, max_value=5))):
            ip_side = draw(st.sampled_from(["none", "none", "from", "to"]))  # a rule needs workloads on one side
            src, dst = peer(ip_side == "from"), peer(ip_side == "to")
            action = draw(st.sampled_from(["allow", "allow", "allow", "deny", "override-deny"]))
            services = draw(st.lists(st.sampled_from(RANDOM_SERVICES), min_size=1, max_size=2, unique=True))
            same = draw(st.sampled_from(["[]", "[]", "[app]", "[app, env]"])) if ip_side == "none" else "[]"
            lines.append(
                f"      - {{name: r{r}-{i}, from: {src}, to: {dst}, action: {action}, "
                f"services: [{', '.join(services)}], same: {same}}}"
            )
    return RANDOM_HEAD + "\n".join(lines) + "\n"


@st.composite
def workloads(draw: Any, wid: str) -> Workload:
    tags: dict[str, str] = {}
    for key, values in (("role", ROLES), ("app", APPS), ("env", ENVS), ("tier", ["a", "b", "c"])):
        if draw(st.booleans()) or key == "role":
            tags["ringfence:" + key] = draw(st.sampled_from(values))
    ips = draw(st.lists(st.sampled_from(IPS4 + IPS6), min_size=0, max_size=3, unique=True))
    mode = draw(st.sampled_from([None, None, None, Mode.IDLE, Mode.OBSERVE, Mode.ENFORCE]))
    held = None  # a move into a privileged value waiting for approval: these labels are in force
    if draw(st.integers(min_value=0, max_value=4)) == 0:
        dims = (("role", ROLES), ("app", APPS), ("env", ENVS))
        held = {d: draw(st.sampled_from(v)) for d, v in dims if draw(st.booleans())}
    quarantined = draw(st.booleans()) and draw(st.booleans())
    return Workload(id=wid, ips=ips, tags=tags, mode=mode, quarantined=quarantined, held_labels=held)


@st.composite
def scenarios(draw: Any) -> tuple[list[Workload], list[tuple[str, Workload | str]]]:
    n = draw(st.integers(min_value=0, max_value=8))
    initial = [draw(workloads(f"w{i}")) for i in range(n)]
    changes: list[tuple[str, Workload | str]] = []
    for _ in range(draw(st.integers(min_value=1, max_value=12))):
        if draw(st.booleans()):
            changes.append(("upsert", draw(workloads(f"w{draw(st.integers(min_value=0, max_value=10))}"))))
        else:
            changes.append(("remove", f"w{draw(st.integers(min_value=0, max_value=10))}"))
    return initial, changes


def contents(engine: Engine) -> dict[str, Any]:
    out = {}
    for wid in engine.workloads:
        doc = engine.render(wid)
        doc.pop("version")
        for s in doc["sets"].values():  # type: ignore[attr-defined]
            s.pop("version")
        out[wid] = doc
    return out


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(scenarios())
def test_incremental_equals_full_recompile(scenario: tuple[list[Workload], list[tuple[str, Any]]]) -> None:
    pol = policy()
    initial, changes = scenario
    inc = Engine(pol)
    inc.load(initial)
    state = {w.id: w for w in initial}
    last_versions = {wid: inc.bundle_version(wid) for wid in inc.workloads}
    applied_sets: dict[str, dict[str, Any]] = {wid: inc.render(wid)["sets"] for wid in inc.workloads}  # type: ignore[misc]
    chain: dict[tuple[str, int], tuple[int, list[Any], list[Any]]] = {}  # (set, from) → (to, added, removed)
    for op, arg in changes:
        if op == "upsert":
            upd = inc.upsert(arg)
            state[arg.id] = arg
        else:
            upd = inc.remove(arg)
            state.pop(arg, None)
        for name, (from_v, added, removed) in upd.set_deltas.items():
            chain[(name, from_v)] = (upd.revision, added, removed)
        # the dropped denies the change re-decided (only entries whose sets hold a changed
        # address) are what deciding every entry afresh gives, for every workload
        for ws in inc.workloads.values():
            assert ws.dropped == inc._dropped(ws), f"{ws.id}: dropped denies out of step"
        # a set's text, patched by each delta, is what rendering its cover afresh gives
        for s in inc.sets.values():
            if s.rendered is not None:
                patched = (list(s.rendered[0]), list(s.rendered[1]))
                s.rendered = None
                assert s.cover_text() == patched, f"{s.name}: rendered text out of step with its cover"
        # every agent can follow by deltas alone unless told to rebuild; one not nudged decides
        # as its fresh bundle does, and catches up by walking the chain when nudged
        for wid in list(applied_sets):
            if wid not in inc.workloads:
                del applied_sets[wid]
                continue
            fresh = inc.render(wid)
            if wid in upd.rebuilt:
                assert upd.bundles[wid] == fresh, "the update carries the rebuilt bundle"
            if wid in upd.rebuilt or wid not in last_versions:
                applied_sets[wid] = fresh["sets"]  # type: ignore[assignment]
            elif wid in upd.notify:
                sets = applied_sets[wid]
                for name in sets:
                    sets[name] = _walk(chain, name, sets[name])
                assert sets == fresh["sets"], f"{wid}: deltas did not reproduce the bundle's sets"
            elif applied_sets[wid] != fresh["sets"]:
                assert set(applied_sets[wid]) == set(fresh["sets"])  # type: ignore[arg-type]
                lagging = {**fresh, "sets": applied_sets[wid]}
                for direction in ("inbound", "outbound"):
                    for peer in IPS4 + IPS6:
                        for proto, port in FLOWS:
                            assert _side_allows(lagging, direction, peer, proto, port) == _side_allows(
                                fresh, direction, peer, proto, port
                            ), f"{wid} was not nudged but its decisions changed ({direction} {peer} {proto}/{port})"
            version = inc.bundle_version(wid)
            assert version >= last_versions.get(wid, 0), "bundle version went backwards"
            last_versions[wid] = version
        for wid in inc.workloads:
            applied_sets.setdefault(wid, inc.render(wid)["sets"])  # type: ignore[arg-type]
    full = Engine(pol)
    full.load(state.values())
    assert contents(inc) == contents(full)
    # no set lingers without a reference, and each set's cover matches its members
    assert set(inc.sets) == set(full.sets)


FLOWS = [("tcp", 80), ("tcp", 443), ("tcp", 5432), ("udp", 53), ("tcp", 9050), ("tcp", 9000), ("icmp", 8), ("tcp", 22)]


def _walk(
    chain: dict[tuple[str, int], tuple[int, list[Any], list[Any]]], name: str, s: dict[str, Any]
) -> dict[str, Any]:
    """A set moved along the delta chain from its version to the newest (as an agent's fetch does)."""
    version = s["version"]
    cover = {*s["v4"], *s["v6"]}
    while (name, version) in chain:
        version, added, removed = chain[(name, version)]
        cover -= {addresses.format_prefix(p) for p in removed}
        cover |= {addresses.format_prefix(p) for p in added}
    return {"version": version, **_split(cover)}


def _split(cover: set[str]) -> dict[str, list[str]]:
    v4 = sorted((c for c in cover if ":" not in c), key=lambda c: ipaddress.ip_network(c))
    v6 = sorted((c for c in cover if ":" in c), key=lambda c: ipaddress.ip_network(c))
    return {"v4": v4, "v6": v6}


# --- the compiled bundles implement exactly what explain decides ----------------------------------


def _side_allows(doc: dict[str, Any], direction: str, peer_addr: str, proto: str, port: int) -> bool:
    """Simulate the agent's first-match evaluation of one side of a bundle (enforce semantics)."""
    ip = ipaddress.ip_address(peer_addr)

    def matches(part: dict[str, Any]) -> bool:
        if part["set"] is not None:
            s = doc["sets"][part["set"]]
            if not any(ip in ipaddress.ip_network(c) for c in s["v4"] + s["v6"]):
                return False
        return any(_svc(m, proto, port) for m in part["services"])

    for rule in doc[direction]:
        # a grouped rule matches where one of its members matches (peer and service of that member)
        if not any(matches(m) for m in rule.get("members") or [rule]):
            continue
        return bool(rule["action"] == "allow")
    return False


def _svc(m: dict[str, Any], proto: str, port: int) -> bool:
    if m["proto"] == "any":
        return True
    if m["proto"] != proto:
        return False
    return m["ports"] is None or m["ports"][0] <= port <= m["ports"][1]


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(scenarios(), st.sampled_from([("tcp", 80), ("tcp", 5432), ("udp", 53), ("tcp", 9050), ("tcp", 443)]))
def test_bundles_match_explain(scenario: tuple[list[Workload], Any], flow: tuple[str, int]) -> None:
    pol = policy()
    initial, _ = scenario
    # distinct addresses per workload so an address identifies its workload
    pool = iter(IPS4 + IPS6)
    wls = [w.model_copy(update={"ips": [next(pool)]}) for w in initial[: len(IPS4) + len(IPS6)]]
    engine = Engine(pol)
    engine.load(wls)
    proto, port = flow
    for src in wls:
        for dst in wls:
            s, d = engine.workloads[src.id], engine.workloads[dst.id]
            src_ep = Endpoint(src.id, s.labels, s.addrs, s.mode, s.quarantined)
            dst_ep = Endpoint(dst.id, d.labels, d.addrs, d.mode, d.quarantined)
            decision = decide(pol, src_ep, dst_ep, proto, port)
            out_doc, in_doc = engine.render(src.id), engine.render(dst.id)
            for side in decision.sides:
                doc, direction, peer = (
                    (out_doc, "outbound", dst.ips[0])
                    if side.direction == "outbound"
                    else (in_doc, "inbound", src.ips[0])
                )
                if side.endpoint.mode is Mode.IDLE and not side.endpoint.quarantined:
                    assert doc[direction] == [], "idle workloads carry no rules"
                    continue
                assert _side_allows(doc, direction, peer, proto, port) == (side.decision == "allow"), (
                    f"{direction} {src.id}->{dst.id} {proto}/{port}: bundle disagrees with explain"
                )


# --- dropped denies: left out where no allow overlaps them, back in the update that needs them -----

# without the any-address allows every deny meets, the denies come and go with the inventory
NARROW = "\n".join(line for line in POLICY.splitlines() if "from-anywhere" not in line and "name: out," not in line)


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(scenarios(), st.sampled_from([POLICY, NARROW]))
def test_agents_follow_explain_through_changes(scenario: tuple[list[Workload], Any], text: str) -> None:
    """After a sequence of changes, what each agent enforces (its bundle as the updates left it:
    rebuilt, moved on by the delta chain when nudged, else its lagging copy) is what explain
    decides: a deny left out earlier is back wherever a later change made it matter."""
    pol = load_policy_texts({"p.yaml": text})
    initial, changes = scenario
    pool = IPS4 + IPS6  # one address per workload id: an address names one workload
    ip_of = {f"w{i}": pool[i] for i in range(11)}
    fix = {w.id: w.model_copy(update={"ips": [ip_of[w.id]]}) for w in initial}
    engine = Engine(pol)
    engine.load(fix.values())
    agent = {wid: engine.render(wid) for wid in engine.workloads}
    chain: dict[tuple[str, int], tuple[int, list[Any], list[Any]]] = {}
    for op, arg in changes:
        if op == "upsert":
            w = arg.model_copy(update={"ips": [ip_of[arg.id]]})
            upd = engine.upsert(w)
        else:
            upd = engine.remove(arg)
        for name, (from_v, added, removed) in upd.set_deltas.items():
            chain[(name, from_v)] = (upd.revision, added, removed)
        for ws in engine.workloads.values():  # re-decided incrementally = decided afresh
            assert ws.dropped == engine._dropped(ws), f"{ws.id}: dropped denies out of step"
        for wid in list(agent):
            if wid not in engine.workloads:
                del agent[wid]
        for wid in engine.workloads:
            if wid in upd.rebuilt or wid not in agent:
                agent[wid] = engine.render(wid)
            elif wid in upd.notify:
                doc = agent[wid]
                doc["sets"] = {n: _walk(chain, n, s) for n, s in doc["sets"].items()}  # type: ignore[attr-defined]
    states = engine.workloads
    for a in states.values():
        for b in states.values():
            if not a.addrs or not b.addrs:
                continue
            src = Endpoint(a.id, a.labels, a.addrs, a.mode, a.quarantined)
            dst = Endpoint(b.id, b.labels, b.addrs, b.mode, b.quarantined)
            for proto, port in (("tcp", 5432), ("tcp", 9050), ("udp", 53), ("tcp", 9000)):
                for side in decide(pol, src, dst, proto, port).sides:
                    own, peer = (a, b) if side.direction == "outbound" else (b, a)
                    if own.quarantined or own.mode is Mode.IDLE:
                        continue
                    got = _side_allows(agent[own.id], side.direction, fix_ip(peer.addrs), proto, port)
                    assert got == (side.decision == "allow"), (
                        f"{side.direction} on {own.id}: {a.id}->{b.id} {proto}/{port}"
                    )


def fix_ip(addrs: tuple[Any, ...]) -> str:
    return addresses.format_address(addrs[0])


DROP_POLICY = """
rulesets:
  - name: all
    scope: all()
    same: []
    rules:
      - {name: scan, from: role == scanner, to: all(), services: [tcp/22]}
      - {name: dev-not-prod, from: env == dev, to: env == prod, services: [all], action: override-deny}
"""


def _wl(wid: str, ip: str, **tags: str) -> Workload:
    return Workload(id=wid, ips=[ip], tags={f"ringfence:{k}": v for k, v in tags.items()})


def test_override_deny_dropped_then_an_allow_appears_the_update_brings_it_back() -> None:
    pol = load_policy_texts({"p.yaml": DROP_POLICY})
    engine = Engine(pol)
    engine.load([_wl("db", "10.0.0.1", role="db", env="prod"), _wl("dev-app", "10.0.0.2", role="app", env="dev")])

    def inbound(doc: dict[str, Any]) -> list[str]:
        return [r["action"] for r in doc["inbound"]]

    # no scanner yet: the allow admits nobody, the override-deny decides nothing and is left out
    db = engine.render("db")
    assert inbound(db) == ["allow"] and len(db["sets"]) == 1  # type: ignore[arg-type]
    # a dev scanner appears: the allow now admits a dev address; the same update rebuilds db's
    # bundle with the override-deny back, so the scanner stays out of prod
    upd = engine.upsert(_wl("scanner", "10.0.0.3", role="scanner", env="dev"))
    assert "db" in upd.rebuilt and "db" in upd.notify
    db = upd.bundles["db"]
    assert inbound(db) == ["override-deny", "allow"]
    assert not _side_allows(db, "inbound", "10.0.0.3", "tcp", 22)
    s = engine.workloads["scanner"]
    d = engine.workloads["db"]
    verdict = decide(
        pol,
        Endpoint("scanner", s.labels, s.addrs, s.mode, s.quarantined),
        Endpoint("db", d.labels, d.addrs, d.mode, d.quarantined),
        "tcp",
        22,
    )
    assert verdict.policy_verdict == "deny"
    # another dev workload: the deny set grows at an address no allow of db admits; db decides
    # alike with its copy, is not nudged, and catches up at its next fetch
    upd = engine.upsert(_wl("dev-web", "10.0.0.4", role="web", env="dev"))
    assert upd.set_deltas and "db" not in upd.notify and "db" not in upd.rebuilt
    # the scanner moves to prod: the allow admits no dev address any more, the override-deny goes
    upd = engine.upsert(_wl("scanner", "10.0.0.3", role="scanner", env="prod"))
    assert "db" in upd.rebuilt and inbound(upd.bundles["db"]) == ["allow"]
    assert _side_allows(upd.bundles["db"], "inbound", "10.0.0.3", "tcp", 22)
    # and a full recompile agrees
    full = Engine(pol)
    full.load(
        [
            _wl("db", "10.0.0.1", role="db", env="prod"),
            _wl("dev-app", "10.0.0.2", role="app", env="dev"),
            _wl("scanner", "10.0.0.3", role="scanner", env="prod"),
            _wl("dev-web", "10.0.0.4", role="web", env="dev"),
        ]
    )
    assert contents(full) == contents(engine)
