"""The connectivity matrix and ``policy diff`` equal ``explain`` on every workload pair and probe of random
estates (IP-list peers, several addresses per workload, IPv6, deny and override-deny), and the
inventory-only path (:func:`compute_inventory`, no ``Engine.load``) equals the one over compiled states."""

from __future__ import annotations

import io
import json
from dataclasses import replace
from typing import Any

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from ringfence.addresses import Address
from ringfence.engine import Engine
from ringfence.engine.compiler import WorkloadState
from ringfence.engine.connectivity import Matrix, compute, compute_inventory, write_json, write_text
from ringfence.engine.explain import Endpoint, decide, workload_endpoint
from ringfence.model import Workload
from ringfence.policy import Policy, load_policy_texts
from ringfence.policydiff import diff
from ringfence.services import PortRange
from tests.test_engine_properties import RANDOM_PROBES, policy, random_policy_texts, scenarios


def _only(ep: Endpoint, addr: Address | None) -> Endpoint:
    return ep if addr is None else replace(ep, addrs=(addr,))


def _open_by_explain(pol: Policy, s: WorkloadState, d: WorkloadState, proto: str, port: int) -> bool:
    """Explain's policy verdict (every side as if enforced) for some address pair of one family
    (a packet carries one address of each end); ends without such a pair are judged whole."""
    src, dst = workload_endpoint(s), workload_endpoint(d)
    pairs = [
        (sa, da)
        for sa in src.addrs or (None,)
        for da in dst.addrs or (None,)
        if sa is None or da is None or sa[0] == da[0]
    ] or [(None, None)]
    return any(decide(pol, _only(src, sa), _only(dst, da), proto, port).policy_verdict == "allow" for sa, da in pairs)


def _check_against_explain(pol: Policy, engine: Engine, matrix: Matrix) -> int:
    services = {(a, b): edge.services for a, b, edge in matrix.workload_pairs()}
    live = [ws for ws in engine.workloads.values() if not ws.quarantined]
    checked = 0
    for s in live:
        for d in live:
            if s.id == d.id:
                continue
            for proto, port in RANDOM_PROBES:
                ours = any(r.matches(proto, port) for r in services.get((s.id, d.id), ()))
                assert ours == _open_by_explain(pol, s, d, proto, port), (
                    f"{s.id} {s.labels} {s.addrs} -> {d.id} {d.labels} {d.addrs} {proto}/{port}: matrix says {ours}"
                )
                checked += 1
    return checked


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(scenarios(), st.one_of(st.none(), random_policy_texts()))
def test_matrix_equals_explain(scenario: tuple[list[Any], Any], text: str | None) -> None:
    """Group and workload level, against explain: random label sets, 0–3 addresses per workload (v4
    and v6, shared), IP lists holding all, some or one-excluded workload addresses, deny and
    override-deny on selectors and IP lists."""
    initial, _ = scenario
    pol = policy() if text is None else load_policy_texts({"p.yaml": text})
    engine = Engine(pol)
    engine.load(initial)
    matrix = compute(pol, engine.workloads.values())
    _check_against_explain(pol, engine, matrix)
    assert sum(len(ids) for ids in matrix.groups.values()) == sum(
        1 for ws in engine.workloads.values() if not ws.quarantined
    )


@settings(max_examples=80, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(scenarios(), random_policy_texts(), random_policy_texts())
def test_policy_diff_equals_explain(scenario: tuple[list[Any], Any], before: str, after: str) -> None:
    """Access gained and lost is what explain decides under the two policies, pair by pair and port by port."""
    initial, _ = scenario
    old, new = load_policy_texts({"p.yaml": before}), load_policy_texts({"p.yaml": after})
    result = diff(old, new, initial)
    gained = {(c.source, c.destination): c.services for c in result.gained}
    lost = {(c.source, c.destination): c.services for c in result.lost}
    engines = []
    for pol in (old, new):
        engine = Engine(pol)
        engine.load(initial)
        engines.append(engine)
    live = [ws.id for ws in engines[0].workloads.values() if not ws.quarantined]
    for a in live:
        for b in live:
            if a == b:
                continue
            for proto, port in RANDOM_PROBES:
                was, now = (_open_by_explain(e.policy, e.workloads[a], e.workloads[b], proto, port) for e in engines)
                assert any(r.matches(proto, port) for r in gained.get((a, b), ())) == (now and not was)
                assert any(r.matches(proto, port) for r in lost.get((a, b), ())) == (was and not now)


def _content(m: Matrix) -> tuple[dict[Any, list[str]], dict[Any, tuple[list[PortRange], list[str]]]]:
    return m.groups, {pair: (edge.services, edge.rules) for pair, edge in m.edges.items()}


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(scenarios(), st.one_of(st.none(), random_policy_texts()))
def test_inventory_matrix_equals_compiled_states_matrix(scenario: tuple[list[Any], Any], text: str | None) -> None:
    initial, _ = scenario
    engine = Engine(policy() if text is None else load_policy_texts({"p.yaml": text}))
    engine.load(initial)
    for staged in (False, True):
        expected = compute(engine.policy, engine.workloads.values(), include_staged=staged)
        assert _content(compute_inventory(engine.policy, initial, include_staged=staged)) == _content(expected)


LABELS_POLICY = """
labels:
  dimensions:
    loc: {derive: {source: region, map: {ca-central-1: ca, eu-west-1: eu}}}
    role: {keys: ["ringfence:role", "ringfence:tier"]}
rulesets:
  - name: r
    same: [loc]
    rules:
      - {name: web-db, from: role == web, to: role == db, services: [tcp/5432]}
"""


def test_inventory_matrix_tells_apart_records_that_resolve_differently() -> None:
    """Labels are resolved once per distinct input: region (derivation) and every label key are part of it."""
    pol = load_policy_texts({"p.yaml": LABELS_POLICY})
    inventory = [
        Workload(id="web-ca", region="ca-central-1", tags={"ringfence:role": "web"}),
        Workload(id="web-eu", region="eu-west-1", tags={"ringfence:role": "web"}),
        Workload(id="db-ca", region="ca-central-1", tags={"ringfence:role": "db"}),
        # two keys of one dimension: the first key in the policy's order wins, so these two differ
        Workload(id="db-first", region="eu-west-1", tags={"ringfence:tier": "web", "ringfence:role": "db"}),
        Workload(id="web-first", region="eu-west-1", tags={"ringfence:tier": "db", "ringfence:role": "web"}),
    ]
    m = compute_inventory(pol, inventory)
    pairs = sorted((a, b) for a, b, _ in m.workload_pairs())
    assert pairs == [("web-ca", "db-ca"), ("web-eu", "db-first"), ("web-first", "db-first")]
    engine = Engine(pol)
    engine.load(inventory)
    assert _content(m) == _content(compute(pol, engine.workloads.values()))


def test_inventory_matrix_rejects_duplicate_ids() -> None:
    with pytest.raises(ValueError, match="duplicate workload id 'w'"):
        compute_inventory(
            policy(),
            [Workload(id="w", tags={"ringfence:role": "web"}), Workload(id="w", tags={"ringfence:role": "db"})],
        )


SPLIT_POLICY = """
ip_lists:
  - {name: corp, cidrs: [10.9.0.0/16, "fd09::/32"], exclude: [10.9.9.0/24]}
rulesets:
  - name: r
    scope: all()
    same: []
    rules:
      - {name: out, from: role == web, to: {ip_list: any}, services: [tcp/5432]}
      - {name: in, from: {ip_list: corp}, to: role == db, services: [tcp/5432]}
"""


def test_groups_split_where_ip_lists_tell_members_apart_and_the_output_names_it() -> None:
    """db-1 and db-2 share labels; only web-1 is in corp. One JSON document, rules listed once."""
    pol = load_policy_texts({"p.yaml": SPLIT_POLICY})
    inventory = [
        Workload(id="web-1", ips=["10.9.1.1", "fd09::1"], tags={"ringfence:role": "web"}),
        Workload(id="web-2", ips=["10.9.9.2"], tags={"ringfence:role": "web"}),  # the excluded /24
        Workload(id="db-1", ips=["10.0.0.3"], tags={"ringfence:role": "db"}),
    ]
    m = compute_inventory(pol, inventory)
    assert sorted((a, b) for a, b, _ in m.workload_pairs()) == [("web-1", "db-1")]
    buf = io.StringIO()
    write_json(m, pol, buf.write)
    doc = json.loads(buf.getvalue())
    names = [g["name"] for g in doc["groups"]]
    assert "role=web,@addresses=v4:any+corp v6:any+corp" in names and "role=web,@addresses=v4:any" in names
    assert all("@addresses" not in g["labels"] for g in doc["groups"])
    assert [r["id"] for r in doc["rules"]] == ["r/out", "r/in"] and doc["rule_sets"] == [[0, 1]]
    assert doc["allowed_workload_pairs"] == 1 and len(doc["edges"]) == 1
    text = io.StringIO()
    write_text(m, text.write, workloads=True)
    assert (
        text.getvalue()
        == "web-1  →  db-1: tcp/5432   [r/out, r/in]\n1 allowed workload pairs, 1 workload pairs in all\n"
    )
