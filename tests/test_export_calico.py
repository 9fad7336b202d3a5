"""Calico export: structure of the YAML, and the same connectivity as Ringfence's own evaluation."""

from __future__ import annotations

import yaml

from ringfence import synth
from ringfence.engine import Engine
from ringfence.engine.connectivity import compute, label_key
from ringfence.engine.explain import Endpoint, decide
from ringfence.export.calico import (
    MODE_LABEL,
    QUARANTINE_LABEL,
    export_calico,
    selector_text,
    service_rules,
    split_families,
)
from ringfence.model import Workload
from ringfence.policy import Policy, load_policy_texts
from ringfence.selectors import parse
from ringfence.services import PortRange, parse_port_spec
from tests.calico_eval import CalicoModel


def _probes(policy: Policy) -> list[tuple[str, int]]:
    """(proto, port) points on both sides of every range the policy mentions."""
    out: set[tuple[str, int]] = {("tcp", 1), ("udp", 1), ("tcp", 65535), ("icmp", 0)}
    ranges = [p for r in policy.rules for p in r.services]
    ranges += [parse_port_spec(p) for p in policy.defaults.failsafes.admin_ports]
    for p in ranges:
        if p.proto in ("tcp", "udp"):
            for port in (p.lo - 1, p.lo, p.hi, p.hi + 1):
                if 1 <= port <= 65535:
                    out.add((p.proto, port))
        elif p.proto in ("icmp", "icmpv6"):
            out.add((p.proto, p.lo))
    return sorted(out)


def _check_against_matrix(policy: Policy, workloads: list[Workload]) -> int:
    """Every (source, destination, probe) decided alike by the exported Calico and the matrix."""
    text = export_calico(policy, workloads, modes=False, failsafes=False, staged=False)
    model = CalicoModel.load(text)
    engine = Engine(policy)
    engine.load(workloads)
    matrix = compute(policy, engine.workloads.values())
    probes = _probes(policy)
    names = {w.id: d["metadata"]["name"] for w, d in zip(workloads, yaml.safe_load_all(text), strict=False)}
    checked = 0
    for a in engine.workloads.values():
        for b in engine.workloads.values():
            if a.id == b.id:
                continue
            edge = None
            if not a.quarantined and not b.quarantined:
                edge = matrix.edges.get((label_key(a.labels), label_key(b.labels)))
            for proto, port in probes:
                ours = edge is not None and any(s.matches(proto, port) for s in edge.services)
                theirs = model.allowed(names[a.id], names[b.id], proto, port)
                assert ours == theirs, f"{a.id} -> {b.id} {proto}/{port}: ours {ours}, calico {theirs}"
                checked += 1
    return checked


def test_example_estate_same_connectivity_as_matrix(example_policy: Policy, example_inventory: list[Workload]) -> None:
    assert _check_against_matrix(example_policy, example_inventory) > 10_000


def test_synthetic_estate_same_connectivity_as_matrix() -> None:
    estate = synth.generate(90, seed=3, apps=3)
    policy = load_policy_texts(estate.policy_texts)
    # quarantine two workloads and put one in observe mode (ignored with modes=False)
    wls = list(estate.workloads)
    wls[40] = wls[40].model_copy(update={"quarantined": True})
    wls[60] = wls[60].model_copy(update={"quarantined": True})
    assert _check_against_matrix(policy, wls) > 100_000


def test_example_estate_matches_explain_with_modes_and_failsafes(
    example_policy: Policy, example_inventory: list[Workload]
) -> None:
    """With modes and fail-safes exported, the data plane decides as ``explain`` (would-deny passes)."""
    wls = list(example_inventory)
    wls[1] = wls[1].model_copy(update={"quarantined": True})  # ord-prod-web-1
    text = export_calico(example_policy, wls, staged=False)
    model = CalicoModel.load(text)
    engine = Engine(example_policy)
    engine.load(wls)
    names = {d["spec"]["node"]: d["metadata"]["name"] for d in yaml.safe_load_all(text) if d["kind"] == "HostEndpoint"}
    probes = [*_probes(example_policy), ("udp", 53), ("tcp", 53)]
    for a in engine.workloads.values():
        for b in engine.workloads.values():
            if a.id == b.id:
                continue
            ea = Endpoint(a.id, a.labels, a.addrs, a.mode, a.quarantined)
            eb = Endpoint(b.id, b.labels, b.addrs, b.mode, b.quarantined)
            for proto, port in probes:
                verdict = decide(example_policy, ea, eb, proto, port).verdict
                theirs = model.allowed(names[a.id], names[b.id], proto, port)
                assert (verdict != "deny") == theirs, f"{a.id} -> {b.id} {proto}/{port}: explain {verdict}"


def test_structure(example_policy: Policy, example_inventory: list[Workload]) -> None:
    wls = list(example_inventory)
    wls[0] = wls[0].model_copy(update={"quarantined": True})
    docs = list(yaml.safe_load_all(export_calico(example_policy, wls)))
    heps = [d for d in docs if d["kind"] == "HostEndpoint"]
    pols = [d for d in docs if d["kind"] != "HostEndpoint"]
    assert len(heps) == len(wls)
    assert all(d["apiVersion"] == "projectcalico.org/v3" for d in docs)
    names = [d["metadata"]["name"] for d in docs]
    assert len(names) == len(set(names)), "resource names are unique"
    by_name = {d["metadata"]["name"]: d for d in heps}
    db = by_name["ord-prod-db-1"]
    assert db["metadata"]["labels"] == {
        "app": "ordering",
        "env": "prod",
        "loc": "ca",
        "role": "database",
        MODE_LABEL: "enforce",
    }
    assert db["spec"]["expectedIPs"] == ["10.1.3.10", "fd00:1::3:10"]
    assert by_name["ord-prod-lb-1"]["metadata"]["labels"] == {QUARANTINE_LABEL: "true"}
    assert by_name["pay-dev-web-1"]["metadata"]["labels"][MODE_LABEL] == "observe"
    # precedence as order: override-deny before allow; fail-safes and quarantine before everything
    order = {d["metadata"]["name"]: d["spec"]["order"] for d in pols}
    deny = [o for n, o in order.items() if "dev-never-reaches-prod" in n]
    allow = [o for n, o in order.items() if "processing-to-database" in n]
    assert deny and allow and max(deny) < min(allow)
    assert order["rf-failsafe-management"] < order["rf-quarantine-in"] < min(deny)
    assert max(order.values()) == order["rf-default-deny-ingress"]
    # same: pinning expanded per app group, both sides pinned
    ptd = [d for d in pols if d["metadata"]["name"].startswith("rf-ordering-processing-to-database")]
    assert {d["metadata"]["name"] for d in ptd} == {
        f"rf-ordering-processing-to-database-ordering.{env}.ca-{way}"
        for env in ("dev", "prod")
        for way in ("in", "out")
    }
    ing = next(d for d in ptd if d["metadata"]["name"].endswith("prod.ca-in"))["spec"]
    assert ing["types"] == ["Ingress"]
    assert ing["selector"] == "app == 'ordering' && env == 'prod' && loc == 'ca' && role == 'database'"
    assert ing["ingress"] == [
        {
            "action": "Allow",
            "protocol": "TCP",
            "source": {"selector": "app == 'ordering' && env == 'prod' && loc == 'ca' && role == 'processing'"},
            "destination": {"ports": [5432]},
        }
    ]
    # IP lists as nets / notNets
    lb = next(d for d in pols if d["metadata"]["name"].startswith("rf-ordering-internet-to-lb"))["spec"]
    assert [(r["ipVersion"], r["source"]) for r in lb["ingress"]] == [
        (4, {"nets": ["0.0.0.0/0"], "notNets": ["10.0.0.0/8", "172.16.0.0/12", "192.168.0.0/16"]}),
        (6, {"nets": ["::/0"]}),
    ]
    # Calico refuses rules mixing IPv4 and IPv6 CIDRs
    for d in pols:
        for r in d["spec"].get("ingress", []) + d["spec"].get("egress", []):
            cidrs = [
                c for side in ("source", "destination") for k in ("nets", "notNets") for c in r.get(side, {}).get(k, [])
            ]
            assert len({":" in c for c in cidrs}) <= 1, (d["metadata"]["name"], r)
    # selectors matching label-less endpoints keep quarantined ones out
    dns = next(d for d in pols if d["metadata"]["name"] == "rf-core-services-dns-in")["spec"]
    assert dns["ingress"][0]["source"] == {"selector": f"!has({QUARANTINE_LABEL})"}


def test_split_families() -> None:
    rule = {
        "action": "Allow",
        "protocol": "ICMP",
        "icmp": {"type": 8},
        "source": {"nets": ["10.0.0.0/8", "fd00::/8"], "notNets": ["10.1.0.0/16"]},
    }
    assert split_families(rule) == [
        {**rule, "source": {"nets": ["10.0.0.0/8"], "notNets": ["10.1.0.0/16"]}, "ipVersion": 4}
    ]
    only_v4_nets = {"action": "Deny", "destination": {"nets": ["192.0.2.0/24"], "notNets": ["fd00::/8"]}}
    assert split_families(only_v4_nets) == [
        {"action": "Deny", "destination": {"nets": ["192.0.2.0/24"]}, "ipVersion": 4}
    ]
    assert split_families({"action": "Allow", "source": {"selector": "all()"}}) == [
        {"action": "Allow", "source": {"selector": "all()"}}
    ]


def test_selector_and_service_translation() -> None:
    node = parse("role in {web, app} && !(env == dev || has(pci)) && tier not in {a, b}")
    assert selector_text(node) == "!(env == 'dev' || has(pci)) && role in {'app', 'web'} && tier not in {'a', 'b'}"
    assert parse(selector_text(node)).canonical() == node.canonical()
    ranges = [
        PortRange("tcp", 443, 443),
        PortRange("tcp", 9000, 9010),
        PortRange("udp", 53, 53),
        PortRange("icmp", 8, 8),
    ]
    assert service_rules(ranges) == [
        {"protocol": "ICMP", "icmp": {"type": 8}},
        {"protocol": "TCP", "destination": {"ports": [443, "9000:9010"]}},
        {"protocol": "UDP", "destination": {"ports": [53]}},
    ]
    assert service_rules([PortRange("any")]) == [{}]
    assert service_rules([PortRange("tcp", 0, 65535)]) == [{"protocol": "TCP"}]
