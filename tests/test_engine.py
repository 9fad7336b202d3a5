"""Engine and explain behaviour on the shipped example, scenario by scenario."""

from __future__ import annotations

import json
from typing import Any

from ringfence import addresses
from ringfence.addresses import format_address
from ringfence.engine import Engine
from ringfence.engine.compiler import MAX_PIECES
from ringfence.engine.explain import decide, format_decision, parse_endpoint
from ringfence.model import Mode, Workload
from ringfence.policy import Policy, load_policy_texts
from tests.conftest import rule_parts


def engine_for(policy: Policy, inventory: list[Workload]) -> Engine:
    e = Engine(policy, policy_version=1)
    e.load(inventory)
    return e


def by_id(inventory: list[Workload], wid: str) -> Workload:
    return next(w for w in inventory if w.id == wid)


def verdict(policy: Policy, e: Engine, src: str, dst: str, port: str) -> str:
    proto, _, num = port.partition("/")
    return decide(
        policy, parse_endpoint(src, policy, e.workloads), parse_endpoint(dst, policy, e.workloads), proto, int(num)
    ).verdict


def sources_of(e: Engine, wid: str, rule_id: str) -> list[str]:
    doc: Any = e.render(wid)
    rule = next(r for r in rule_parts(doc["inbound"]) if r["id"] == rule_id)
    return doc["sets"][rule["set"]]["v4"]


def test_sets_are_shared_by_content(example_policy: Policy, example_inventory: list[Workload]) -> None:
    e = engine_for(example_policy, example_inventory)
    a: Any = e.render("ord-prod-proc-1")
    b: Any = e.render("ord-prod-proc-2")
    rule_a = next(r for r in rule_parts(a["inbound"]) if r["id"] == "ordering/web-to-processing")
    rule_b = next(r for r in rule_parts(b["inbound"]) if r["id"] == "ordering/web-to-processing")
    assert rule_a["set"] == rule_b["set"], "same app group, same peers → one set"
    dev: Any = e.render("ord-dev-proc-1")
    rule_dev = next(r for r in rule_parts(dev["inbound"]) if r["id"] == "ordering/web-to-processing")
    assert rule_dev["set"] != rule_a["set"], "dev instantiates its own set"
    assert dev["sets"][rule_dev["set"]]["v4"] == ["10.2.1.10/32"]


def test_quarantine_empties_own_bundle_and_leaves_every_peer_set(
    example_policy: Policy, example_inventory: list[Workload]
) -> None:
    e = engine_for(example_policy, example_inventory)
    assert sources_of(e, "ord-prod-proc-1", "ordering/web-to-processing") == ["10.1.1.10/31"]
    upd = e.upsert(by_id(example_inventory, "ord-prod-web-1").model_copy(update={"quarantined": True}))
    assert upd.rebuilt == {"ord-prod-web-1"}
    own: Any = upd.bundles["ord-prod-web-1"]
    assert own["quarantined"] and own["mode"] == "enforce" and own["inbound"] == own["outbound"] == []
    assert sources_of(e, "ord-prod-proc-1", "ordering/web-to-processing") == ["10.1.1.11/32"]
    assert {"ord-prod-proc-1", "ord-prod-proc-2", "ord-prod-lb-1"} <= upd.notify
    # every set holding web-1 loses the /31 it shared with web-2 and keeps web-2 alone
    pair, web2 = addresses.parse_prefix("10.1.1.10/31"), addresses.parse_prefix("10.1.1.11/32")
    assert upd.set_deltas
    assert all(removed == [pair] and added == [web2] for _, added, removed in upd.set_deltas.values())
    assert verdict(example_policy, e, "ord-prod-web-1", "ord-prod-proc-1", "tcp/8443") == "deny"
    # release: back in every set
    e.upsert(by_id(example_inventory, "ord-prod-web-1"))
    assert sources_of(e, "ord-prod-proc-1", "ordering/web-to-processing") == ["10.1.1.10/31"]


def test_ip_change_is_a_delta_for_peers_and_no_rebuild(
    example_policy: Policy, example_inventory: list[Workload]
) -> None:
    e = engine_for(example_policy, example_inventory)
    upd = e.upsert(by_id(example_inventory, "ord-prod-web-2").model_copy(update={"ips": ["10.1.1.50"]}))
    assert upd.rebuilt == set(), "its own rules did not change"
    assert sources_of(e, "ord-prod-proc-1", "ordering/web-to-processing") == ["10.1.1.10/32", "10.1.1.50/32"]
    assert "ord-prod-proc-1" in upd.notify and "pay-prod-db-1" not in upd.notify


def test_duplicate_event_is_a_no_op(example_policy: Policy, example_inventory: list[Workload]) -> None:
    e = engine_for(example_policy, example_inventory)
    before = e.revision
    upd = e.upsert(by_id(example_inventory, "ord-prod-web-2"))
    assert not upd.changed and e.revision == before


def test_mode_change_rebuilds_only_that_workload(example_policy: Policy, example_inventory: list[Workload]) -> None:
    e = engine_for(example_policy, example_inventory)
    upd = e.upsert(by_id(example_inventory, "ord-prod-db-1").model_copy(update={"mode": Mode.IDLE}))
    assert upd.rebuilt == {"ord-prod-db-1"} and not upd.set_deltas
    doc: Any = upd.bundles["ord-prod-db-1"]
    assert doc["mode"] == "idle" and doc["inbound"] == [] and doc["sets"] == {}
    # an idle workload still appears in its peers' sets: processing may still send to it
    proc: Any = e.render("ord-prod-proc-1")
    out = next(r for r in rule_parts(proc["outbound"]) if r["id"] == "ordering/processing-to-database")
    assert proc["sets"][out["set"]]["v4"] == ["10.1.3.10/32"]


def test_unlabeled_workload_gets_default_policy_and_no_app_access(
    example_policy: Policy, example_inventory: list[Workload]
) -> None:
    e = engine_for(example_policy, example_inventory)
    ws = e.workloads["ord-prod-web-9"]
    assert ws.unlabeled and "env" not in ws.labels and ws.mode is Mode.ENFORCE
    assert verdict(example_policy, e, "ord-prod-web-9", "ord-prod-proc-1", "tcp/8443") == "deny"
    assert verdict(example_policy, e, "ord-prod-web-9", "core-dns-1", "udp/53") == "allow", "core services still work"


def test_observe_mode_reports_would_deny(example_policy: Policy, example_inventory: list[Workload]) -> None:
    e = engine_for(example_policy, example_inventory)
    assert e.workloads["pay-dev-web-1"].mode is Mode.OBSERVE
    # payroll dev → payroll prod db: dev's own (observe) side would deny, prod db's (enforce) side denies
    assert verdict(example_policy, e, "pay-dev-web-1", "pay-prod-db-1", "tcp/1433") == "deny"
    # an outside address to the observe-mode host: nothing blocks, but it is reported
    assert verdict(example_policy, e, "198.51.100.7", "pay-dev-web-1", "tcp/8080") == "would-deny"


def test_failsafe_admin_ssh_even_to_quarantined_host(example_policy: Policy, example_inventory: list[Workload]) -> None:
    e = engine_for(example_policy, example_inventory)
    e.upsert(by_id(example_inventory, "ord-prod-db-1").model_copy(update={"quarantined": True}))
    d = decide(
        example_policy,
        parse_endpoint("10.99.0.77", example_policy, e.workloads),
        parse_endpoint("ord-prod-db-1", example_policy, e.workloads),
        "tcp",
        22,
    )
    assert d.verdict == "allow" and d.sides[0].failsafe == "management from an admin range"


def test_staged_ruleset_is_explained_not_enforced() -> None:
    policy = load_policy_texts(
        {
            "p.yaml": """
rulesets:
  - name: live
    scope: app == a
    same: [app]
    rules: [{name: web-db, from: role == web, to: role == db, services: [tcp/5432]}]
  - name: trial
    scope: app == a
    same: [app]
    staged: true
    rules: [{name: web-cache, from: role == web, to: role == cache, services: [tcp/6379]}]
"""
        }
    )
    e = engine_for(
        policy,
        [
            Workload(id="w", ips=["10.0.0.1"], tags={"ringfence:app": "a", "ringfence:role": "web"}),
            Workload(id="c", ips=["10.0.0.2"], tags={"ringfence:app": "a", "ringfence:role": "cache"}),
        ],
    )
    doc: Any = e.render("c")
    assert doc["inbound"] == [], "staged rules never reach a bundle"
    d = decide(policy, parse_endpoint("w", policy, e.workloads), parse_endpoint("c", policy, e.workloads), "tcp", 6379)
    assert d.verdict == "deny" and d.staged_verdict == "allow"
    assert any(r.staged for s in d.sides for r in s.matched)


def test_override_deny_beats_allow_and_allow_beats_deny() -> None:
    policy = load_policy_texts(
        {
            "p.yaml": """
rulesets:
  - name: r
    scope: all()
    same: []
    rules:
      - {name: allow-all, from: all(), to: all(), services: [tcp/1-1000]}
      - {name: deny-22, from: all(), to: all(), services: [tcp/22], action: deny}
      - {name: never-23, from: all(), to: all(), services: [tcp/23], action: override-deny}
"""
        }
    )
    e = engine_for(
        policy,
        [
            Workload(id="a", ips=["10.0.0.1"], tags={"ringfence:role": "x"}),
            Workload(id="b", ips=["10.0.0.2"], tags={"ringfence:role": "y"}),
        ],
    )
    assert verdict(policy, e, "a", "b", "tcp/22") == "allow"
    assert verdict(policy, e, "a", "b", "tcp/23") == "deny"
    doc: Any = e.render("b")
    assert [r["action"] for r in doc["inbound"]] == ["override-deny", "allow", "deny"]


def test_three_tier_written_once_never_crosses_environments(example_inventory: list[Workload]) -> None:
    from tests.conftest import EXAMPLE

    # without the dev ↛ prod boundary: the app-group pinning alone keeps dev out of prod
    sources = {
        str(p): p.read_text()
        for p in (EXAMPLE / "policy").glob("*.yaml")
        if p.name not in ("boundaries.yaml", "tests.yaml")
    }
    policy = load_policy_texts(sources)
    e = engine_for(policy, example_inventory)
    assert verdict(policy, e, "ord-dev-web-1", "ord-prod-proc-1", "tcp/8443") == "deny"
    assert verdict(policy, e, "ord-prod-web-1", "ord-prod-proc-1", "tcp/8443") == "allow"
    assert verdict(policy, e, "ord-dev-web-1", "ord-dev-proc-1", "tcp/8443") == "allow"


def test_set_names_cannot_collide_through_crafted_label_values() -> None:
    from ringfence.engine.compiler import set_name

    assert set_name(("x", (("app", "a;env=b"), ("env", "c")))) != set_name(("x", (("app", "a"), ("env", "b;env=c"))))
    assert set_name(("x", (("env", None),))) != set_name(("x", (("env", ""),)))
    policy = load_policy_texts(
        {
            "p.yaml": """
rulesets:
  - name: r
    scope: all()
    same: [app, env]
    rules: [{name: web-db, from: role == web, to: role == db, services: [tcp/5432]}]
"""
        }
    )
    inv = [
        Workload(
            id="web-a",
            ips=["10.0.1.1"],
            tags={"ringfence:role": "web", "ringfence:app": "a;env=b", "ringfence:env": "c"},
        ),
        Workload(
            id="db-a", ips=["10.0.2.1"], tags={"ringfence:role": "db", "ringfence:app": "a;env=b", "ringfence:env": "c"}
        ),
        Workload(
            id="web-b",
            ips=["10.0.1.2"],
            tags={"ringfence:role": "web", "ringfence:app": "a", "ringfence:env": "b;env=c"},
        ),
        Workload(
            id="db-b", ips=["10.0.2.2"], tags={"ringfence:role": "db", "ringfence:app": "a", "ringfence:env": "b;env=c"}
        ),
    ]
    e = engine_for(policy, inv)
    assert sources_of(e, "db-a", "r/web-db") == ["10.0.1.1/32"]
    assert sources_of(e, "db-b", "r/web-db") == ["10.0.1.2/32"]
    e.remove("db-b")
    e.upsert(inv[2].model_copy(update={"ips": ["10.0.1.3"]}))  # used to raise KeyError after the collision


def test_a_blank_label_value_is_absent() -> None:
    policy = load_policy_texts({"p.yaml": "rulesets: []\n"})
    e = engine_for(policy, [Workload(id="w", labels={"env": "  "}, tags={"ringfence:role": "---"})])
    assert e.workloads["w"].labels == {"role": "---"}  # default normalisation keeps dashes; blanks go
    assert "env" not in e.workloads["w"].labels


def test_any_address_is_decided_by_content_not_name() -> None:
    policy = load_policy_texts(
        {
            "p.yaml": """
ip_lists:
  - {name: everything, cidrs: [0.0.0.0/0, "::/0"]}
  - {name: corp, cidrs: [10.0.0.0/8]}
rulesets:
  - name: r
    scope: all()
    rules:
      - {name: all-in, from: {ip_list: everything}, to: role == lb, services: [tcp/443]}
      - {name: corp-in, from: {ip_list: corp}, to: role == lb, services: [tcp/22]}
"""
        }
    )
    e = engine_for(policy, [Workload(id="lb", ips=["10.0.0.1"], tags={"ringfence:role": "lb"})])
    doc: Any = e.render("lb")
    by_id = {r["id"]: r for r in rule_parts(doc["inbound"])}
    assert by_id["r/all-in"]["set"] is None
    assert doc["sets"][by_id["r/corp-in"]["set"]]["v4"] == ["10.0.0.0/8"]


GROUPING_POLICY = """
rulesets:
  - name: core
    scope: all()
    same: []
    rules:
      - {name: dns, from: all(), to: role == dns, services: [udp/53, tcp/53]}
      - {name: ntp, from: all(), to: role == ntp, services: [udp/123]}
      - {name: mon, from: role == mon, to: all(), services: [tcp/9100, icmp/8]}
      - {name: backup, from: role == backup, to: all(), services: [tcp/9100]}
      - {name: scan, from: role == scan, to: all(), services: [tcp/1-65535]}
      - {name: all-tcp, from: role == audit, to: all(), services: [tcp, icmp]}
      - {name: any-a, from: role == ops, to: all(), services: [any]}
      - {name: any-b, from: role == sec, to: all(), services: [any]}
      - {name: no-ntp-out, from: role == mon, to: role == ntp, services: [udp/123], action: deny}
      - {name: ssh, from: role == jump, to: role != jump, services: [tcp/22]}
  - name: app
    scope: has(app)
    rules:
      - {name: web-db, from: role == web, to: role == db, services: [tcp/5432]}
      - {name: web-cache, from: role == web, to: role == cache, services: [tcp/6379]}
"""


def test_allow_rules_of_one_owner_side_render_as_one_grouped_rule() -> None:
    policy = load_policy_texts({"p.yaml": GROUPING_POLICY})
    wls = [
        Workload(
            id="web", ips=["10.0.0.1"], tags={"ringfence:role": "web", "ringfence:app": "a", "ringfence:env": "prod"}
        ),
        Workload(id="dns", ips=["10.0.1.1"], tags={"ringfence:role": "dns"}),
        Workload(id="ntp", ips=["10.0.1.2"], tags={"ringfence:role": "ntp"}),
        Workload(id="mon", ips=["10.0.2.1"], tags={"ringfence:role": "mon"}),
    ]
    e = engine_for(policy, wls)
    doc: Any = e.render("web")
    out = [(r["id"], [m["id"] for m in r.get("members", [])]) for r in doc["outbound"]]
    # everyone → dns, ntp: one owner side (all()); web → db, cache: another (role == web, same app/env)
    assert out == [("core/dns", ["core/dns", "core/ntp"]), ("app/web-db", ["app/web-db", "app/web-cache"])]
    inbound = [(r["id"], r["action"], [m["id"] for m in r.get("members", [])]) for r in doc["inbound"]]
    assert inbound == [
        # every allow of one owner side: one group (scan's tcp/1-65535 is cut around tcp/9100;
        # 'any' and all tcp ports need no cut, the agent keeps them in sets of their own)
        ("core/mon", "allow", ["core/mon", "core/backup", "core/scan", "core/all-tcp", "core/any-a", "core/any-b"]),
        # the jumpbox rule's owner side (role != jump) is not all(): not grouped with the others
        ("core/ssh", "allow", []),
    ]
    scan = next(m for m in doc["inbound"][0]["members"] if m["id"] == "core/scan")
    assert [(x["proto"], x["ports"]) for x in scan["services"]] == [
        ("tcp", [1, 9099]),
        ("tcp", [9100, 9100]),
        ("tcp", [9101, 65535]),
    ]
    group = doc["outbound"][0]
    assert group["action"] == "allow" and group["set"] is None and group["services"] == []
    assert [m["set"] for m in group["members"]] == [
        next(r["set"] for r in rule_parts(doc["outbound"]) if r["id"] == rid) for rid in ("core/dns", "core/ntp")
    ]
    # the denies keep their own rules (per-rule attribution of drops), after the allows
    mon: Any = e.render("mon")
    assert [r["action"] for r in mon["outbound"]][-1] == "deny"
    assert all("members" not in r for r in mon["outbound"] if r["action"] != "allow")
    # every rendered bundle is a valid bundle document
    from ringfence.bundle import Bundle

    for w in e.workloads:
        Bundle.model_validate_json(json.dumps(e.render(w)), strict=True)


def _covered(services: list[dict[str, Any]], ports: range) -> set[tuple[str, int | None]]:
    """(protocol, port) pairs the services allow over ``ports``; ("any", None) for any."""
    out: set[tuple[str, int | None]] = set()
    for svc in services:
        if svc["proto"] == "any":
            out.add(("any", None))
        elif svc["proto"] in ("tcp", "udp"):
            lo, hi = svc.get("ports") or (0, 65535)
            out.update((svc["proto"], x) for x in ports if lo <= x <= hi)
        else:
            out.add((svc["proto"], svc.get("icmp_type")))
    return out


def test_cut_port_ranges_allow_exactly_the_policy_and_keep_the_contract() -> None:
    import random

    from ringfence.bundle import Bundle, spans_groupable

    rng = random.Random(7)
    for _ in range(40):
        rules = []
        for i in range(rng.randint(2, 5)):
            svcs = []
            for _ in range(rng.randint(1, 3)):
                kind = rng.random()
                if kind < 0.1:
                    svcs.append(rng.choice(["any", "tcp", "udp"]))
                else:
                    lo = rng.randint(1, 30)
                    hi = rng.choice([lo, rng.randint(lo, 30), 65535])
                    svcs.append(f"{rng.choice(['tcp', 'udp'])}/{lo}" + (f"-{hi}" if hi != lo else ""))
            rules.append(f"      - {{name: r{i}, from: role == c{i}, to: role == srv, services: [{', '.join(svcs)}]}}")
        text = "rulesets:\n  - name: g\n    scope: all()\n    same: []\n    rules:\n" + "\n".join(rules) + "\n"
        policy = load_policy_texts({"p.yaml": text})
        e = engine_for(policy, [Workload(id="srv", ips=["10.0.0.1"], tags={"ringfence:role": "srv"})])
        doc: Any = e.render("srv")
        Bundle.model_validate_json(json.dumps(doc), strict=True)  # identical-or-disjoint port ranges
        policy_rules = {r.id: r for r in policy.rules}
        seen = []
        for group in doc["inbound"]:  # one group, plus the members a bounded cut left out
            parts = group.get("members") or [group]
            spans = [(x["proto"], *(x["ports"] or (0, 65535))) for m in parts for x in m["services"]]
            assert spans_groupable([x for x in spans if x[0] in ("tcp", "udp")]), text
            probe = range(0, 40)
            for m in parts:
                seen.append(m["id"])
                wanted = [{"proto": p.proto, **p.to_json()} for p in policy_rules[m["id"]].services]
                assert _covered(m["services"], probe) == _covered(wanted, probe), (text, m)
                assert _covered(m["services"], range(65530, 65536)) == _covered(wanted, range(65530, 65536))
                assert len(m["services"]) == len({json.dumps(x, sort_keys=True) for x in m["services"]}), m
                for p in policy_rules[m["id"]].services:  # no range cut into more than MAX_PIECES
                    if p.proto in ("tcp", "udp") and (p.lo, p.hi) != (0, 65535):
                        inside = [x for x in m["services"] if x["proto"] == p.proto and x["ports"]]
                        n = sum(1 for x in inside if p.lo <= x["ports"][0] and x["ports"][1] <= p.hi)
                        assert n <= MAX_PIECES, (text, m)
        assert sorted(seen) == sorted(policy_rules), text
        assert len([g for g in doc["inbound"] if g.get("members")]) <= 1, text


def test_grouped_rules_share_sets_and_follow_deltas() -> None:
    policy = load_policy_texts({"p.yaml": GROUPING_POLICY})
    wls = [
        Workload(id="a", ips=["10.0.0.1"], tags={"ringfence:role": "x"}),
        Workload(id="b", ips=["10.0.0.2"], tags={"ringfence:role": "y"}),
        Workload(id="dns", ips=["10.0.1.1"], tags={"ringfence:role": "dns"}),
        Workload(id="ntp", ips=["10.0.1.2"], tags={"ringfence:role": "ntp"}),
    ]
    e = engine_for(policy, wls)
    a: Any = e.render("a")
    b: Any = e.render("b")
    assert a["outbound"] == b["outbound"], "one owner side: identical grouped rule in every bundle"
    upd = e.upsert(Workload(id="dns2", ips=["10.0.1.3"], tags={"ringfence:role": "dns"}))
    dns_set = next(r["set"] for r in rule_parts(a["outbound"]) if r["id"] == "core/dns")
    assert dns_set in upd.set_deltas and {"a", "b"} <= upd.notify and not {"a", "b"} & upd.rebuilt


def test_explain_says_when_addresses_of_one_workload_are_decided_differently() -> None:
    policy = load_policy_texts(
        {
            "p.yaml": """
ip_lists:
  - {name: corp-v4, cidrs: [10.0.0.0/8]}
rulesets:
  - name: r
    scope: all()
    rules:
      - {name: web-out, from: role == web, to: {ip_list: any}, services: [tcp/5432]}
      - {name: corp-in, from: {ip_list: corp-v4}, to: role == db, services: [tcp/5432]}
"""
        }
    )
    e = engine_for(
        policy,
        [
            Workload(id="db", ips=["10.0.0.1", "fd00::1"], tags={"ringfence:role": "db"}),
            Workload(id="out", ips=["192.0.2.7"], tags={"ringfence:role": "web"}),
            Workload(id="ds", ips=["10.0.0.9", "fd00::9"], tags={"ringfence:role": "web"}),
        ],
    )

    def at(src: str) -> Any:
        return decide(
            policy, parse_endpoint(src, policy, e.workloads), parse_endpoint("db", policy, e.workloads), "tcp", 5432
        )

    d = at("ds")  # its v4 address is in corp-v4, its v6 address is not
    assert d.verdict == "allow"
    assert {(format_address(sa), format_address(da), v) for sa, da, v in d.by_address} == {
        ("10.0.0.9", "10.0.0.1", "allow"),
        ("fd00::9", "fd00::1", "deny"),
    }
    assert "fd00::9 → fd00::1: DENY" in format_decision(d)
    # naming one address decides that address only
    assert at("fd00::9").verdict == "deny" and at("10.0.0.9").verdict == "allow"
    assert at("fd00::9").by_address == [] and at("out").by_address == []


def test_a_member_cut_into_too_many_pieces_stays_out_of_the_group() -> None:
    ports = [9100 + 10 * i for i in range(20)]
    rules = [
        f"      - {{name: exp{i}, from: role == mon, to: all(), services: [tcp/{p}]}}" for i, p in enumerate(ports)
    ]
    rules.append("      - {name: wide, from: env == prod, to: all(), services: [tcp/1024-65535]}")
    rules.append("      - {name: few, from: env == dev, to: all(), services: [tcp/9000-9115]}")
    text = "rulesets:\n  - name: core\n    scope: all()\n    same: []\n    rules:\n" + "\n".join(rules) + "\n"
    wls = [Workload(id="w", ips=["10.0.0.1"], tags={"ringfence:role": "web", "ringfence:env": "prod"})]
    doc: Any = engine_for(load_policy_texts({"p.yaml": text}), wls).render("w")
    by_id = {r["id"]: r for r in doc["inbound"]}
    wide = by_id["core/wide"]  # 41 pieces: a plain rule over its own set, its range whole
    assert "members" not in wide and wide["services"] == [{"proto": "tcp", "ports": [1024, 65535], "icmp_type": None}]
    [group] = [r for r in doc["inbound"] if r.get("members")]
    members = {m["id"]: m for m in group["members"]}
    assert set(members) == {f"core/exp{i}" for i in range(20)} | {"core/few"}
    # 9000-9115 around 9100 and 9110: 5 pieces, within the bound, so it stays and is cut
    assert [tuple(x["ports"]) for x in members["core/few"]["services"]] == [
        (9000, 9099),
        (9100, 9100),
        (9101, 9109),
        (9110, 9110),
        (9111, 9115),
    ]


def test_a_whole_service_equal_to_an_earlier_piece_is_not_repeated() -> None:
    text = (
        "rulesets:\n  - name: g\n    scope: all()\n    same: []\n    rules:\n"
        "      - {name: a, from: role == c, to: role == srv, services: [tcp/85-100, tcp/90]}\n"
        "      - {name: b, from: role == d, to: role == srv, services: [tcp/90]}\n"
    )
    wls = [Workload(id="srv", ips=["10.0.0.1"], tags={"ringfence:role": "srv"})]
    doc: Any = engine_for(load_policy_texts({"p.yaml": text}), wls).render("srv")
    [group] = doc["inbound"]
    a = next(m for m in group["members"] if m["id"] == "g/a")
    assert [tuple(x["ports"]) for x in a["services"]] == [(85, 89), (90, 90), (91, 100)]


def test_a_workload_given_twice_is_compiled_once_and_a_copy_never_releases_a_quarantine(
    example_policy: Policy, example_inventory: list[Workload]
) -> None:
    """One bad input must not stop a whole rebuild (compute's, for everyone): the duplicate is
    left out and listed; a quarantined copy wins over one that is not, whichever comes first."""
    w = by_id(example_inventory, "ord-prod-proc-1")
    q = w.model_copy(update={"quarantined": True, "ips": ["10.9.9.9"]})
    e = engine_for(example_policy, [*example_inventory, w.model_copy(update={"ips": ["10.9.9.9"]})])
    assert e.duplicates == [w.id] and e.workloads[w.id].addrs == engine_for(example_policy, [w]).workloads[w.id].addrs
    for order in ([w, q], [q, w]):
        rest = [x for x in example_inventory if x.id != w.id]
        e = engine_for(example_policy, [*rest, *order])
        assert e.duplicates == [w.id] and e.workloads[w.id].quarantined
        assert len(e.workloads) == len(example_inventory)
