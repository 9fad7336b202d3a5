"""The bitset-indexed connectivity matrix equals a brute-force evaluation over every group pair."""

from __future__ import annotations

from typing import Any

from hypothesis import HealthCheck, given, settings

from ringfence.engine import Engine
from ringfence.engine.connectivity import compute, label_key, normalise, subtract
from ringfence.model import Action
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
                if cm(cl) and pm(pl) and all(cl.get(d) == pl.get(d) for d in rule.same):
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
