"""The bitset-indexed connectivity matrix equals a brute-force evaluation over every group pair, and the
inventory-only path (:func:`compute_inventory`, no ``Engine.load``) equals the one over compiled states."""

from __future__ import annotations

from typing import Any

import pytest
from hypothesis import HealthCheck, given, settings

from ringfence.engine import Engine
from ringfence.engine.connectivity import Matrix, compute, compute_inventory, label_key, normalise, subtract
from ringfence.model import Action, Workload
from ringfence.policy import load_policy_texts
from ringfence.selectors import matcher
from ringfence.services import PortRange
from tests.test_engine_properties import policy, scenarios


def _brute_force(engine: Engine) -> dict[tuple[Any, Any], list[PortRange]]:
    pol = engine.policy
    labels_of = {label_key(ws.labels): ws.labels for ws in engine.workloads.values() if not ws.quarantined}
    allow: dict[tuple[Any, Any], list[PortRange]] = {}
    deny: dict[tuple[Any, Any], list[PortRange]] = {}
    for rule in pol.rules:
        if rule.staged or rule.action is Action.DENY:
            continue
        if rule.consumer.selector is None or rule.provider.selector is None:
            continue
        cm, pm = matcher(rule.consumer.selector), matcher(rule.provider.selector)
        for ck, cl in labels_of.items():
            for pk, pl in labels_of.items():
                if cm(cl) and pm(pl) and all(d in cl and cl.get(d) == pl.get(d) for d in rule.same):
                    target = deny if rule.action is Action.OVERRIDE_DENY else allow
                    target.setdefault((ck, pk), []).extend(rule.services)
    out = {}
    for pair, services in allow.items():
        remaining = normalise(subtract(services, deny[pair]) if pair in deny else services)
        if remaining:
            out[pair] = remaining
    return out


@settings(max_examples=100, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(scenarios())
def test_indexed_matrix_equals_brute_force(scenario: tuple[list[Any], Any]) -> None:
    initial, _ = scenario
    engine = Engine(policy())
    engine.load(initial)
    matrix = compute(engine.policy, engine.workloads.values())
    assert {pair: edge.services for pair, edge in matrix.edges.items()} == _brute_force(engine)
    assert sum(len(ids) for ids in matrix.groups.values()) == sum(
        1 for ws in engine.workloads.values() if not ws.quarantined
    )


def _content(m: Matrix) -> tuple[dict[Any, list[str]], dict[Any, tuple[list[PortRange], list[str]]]]:
    return m.groups, {pair: (edge.services, edge.rules) for pair, edge in m.edges.items()}


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(scenarios())
def test_inventory_matrix_equals_compiled_states_matrix(scenario: tuple[list[Any], Any]) -> None:
    initial, _ = scenario
    engine = Engine(policy())
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
