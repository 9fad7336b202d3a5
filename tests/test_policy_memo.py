"""The memoised policy build (selectors parsed once per text, peers built once) gives the same
Policy and the same problems as the straightforward build (``memo=False``)."""

from __future__ import annotations

import inspect
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

import pytest

import tests.test_policy_errors as error_tests
from ringfence import addresses, selectors, synth
from ringfence.labels import LabelMapper
from ringfence.model import LabelsConfig
from ringfence.policy import CompiledRule, Peer, Policy, PolicyError, _Builder, _canonical_values

ROOT = Path(__file__).resolve().parents[1]


def _peer(p: Peer) -> tuple[Any, ...]:
    return (p.text, p.ip_list, p.prefixes, p.selector)


def _rule(r: CompiledRule) -> tuple[Any, ...]:
    return (
        r.id,
        r.ruleset,
        r.action,
        r.staged,
        _peer(r.consumer),
        _peer(r.provider),
        r.same,
        r.services,
        r.service_names,
        r.location,
    )


def dump(policy: Policy) -> dict[str, Any]:
    """Everything a Policy carries, in comparable form (a mode's matcher is a closure: its node stands in)."""
    return {
        "labels": policy.labels.config.model_dump(),
        "label_groups": policy.label_groups,
        "services": policy.services,
        "ip_lists": {k: [addresses.format_prefix(p) for p in v] for k, v in policy.ip_lists.items()},
        "rules": [_rule(r) for r in policy.rules],
        "modes": [(m.selector, m.selector.canonical(), m.mode) for m in policy.modes],
        "defaults": policy.defaults.model_dump(),
        "tests": [(t.name, t.spec.model_dump(), t.proto, t.port, t.location) for t in policy.tests],
        "failsafes": policy.failsafes,
        "sources": policy.sources,
    }


def outcome(sources: Mapping[str, str], memo: bool) -> dict[str, Any] | list[str]:
    try:
        return dump(_Builder(dict(sources), memo=memo).build())
    except PolicyError as exc:
        return [str(p) for p in exc.problems]


def _example_sources() -> dict[str, str]:
    return {str(p): p.read_text() for p in sorted((ROOT / "examples" / "ordering" / "policy").glob("*.yaml"))}


@pytest.mark.parametrize(
    "sources",
    [
        pytest.param(_example_sources, id="examples/ordering"),
        pytest.param(lambda: synth.generate(385, seed=1, apps=3).policy_texts, id="nca-estate"),
        pytest.param(lambda: synth.generate(1_000, seed=1).policy_texts, id="synth-1000"),
    ],
)
def test_memoised_build_gives_the_same_policy(sources: Callable[[], dict[str, str]]) -> None:
    texts = sources()
    fast, slow = outcome(texts, memo=True), outcome(texts, memo=False)
    assert isinstance(fast, dict), fast
    assert fast == slow


def test_every_error_test_input_gives_the_same_problems(monkeypatch: pytest.MonkeyPatch) -> None:
    """Run tests/test_policy_errors.py with each load checked both ways."""
    seen: list[bool] = []

    def both(sources: Mapping[str, str]) -> Policy:
        fast, slow = outcome(sources, memo=True), outcome(sources, memo=False)
        assert fast == slow
        seen.append(isinstance(fast, list))
        return _Builder(dict(sources)).build()

    monkeypatch.setattr(error_tests, "load_policy_texts", both)
    tests = [f for name, f in vars(error_tests).items() if name.startswith("test_") and inspect.isfunction(f)]
    for test in tests:
        assert not inspect.signature(test).parameters, test.__name__
        test()
    assert sum(seen) >= len(tests) - 3, "most error tests load an invalid policy"


def test_a_repeated_invalid_selector_is_reported_at_every_occurrence() -> None:
    rule = "      - {{name: {n}, from: tier == web, to: role == web, services: [all]}}\n"
    text = "rulesets:\n  - name: shop\n    scope: app == shop\n    rules:\n" + rule.format(n="a") + rule.format(n="b")
    problems = outcome({"p.yaml": text}, memo=True)
    assert problems == outcome({"p.yaml": text}, memo=False)
    assert [p[:9] for p in problems] == ["p.yaml:5:", "p.yaml:6:"]


def test_memo_shares_peers_for_a_repeated_selector() -> None:
    rule = "      - {{name: {n}, from: role == lb, to: role == web, services: [all]}}\n"
    text = "rulesets:\n  - name: shop\n    scope: app == shop\n    rules:\n" + rule.format(n="a") + rule.format(n="b")
    a, b = _Builder({"p.yaml": text}).build().rules
    assert a.consumer is b.consumer and a.provider is b.provider
    c, d = _Builder({"p.yaml": text}, memo=False).build().rules
    assert c.consumer is not d.consumer and c.consumer == a.consumer


def _reference_canonical_values(node: selectors.Node, mapper: LabelMapper) -> selectors.Node:
    """The previous ``_canonical_values``: always rebuilds."""
    if isinstance(node, selectors.In):
        return selectors.In(node.dim, frozenset(mapper.canonical_value(node.dim, v) for v in node.values), node.negate)
    if isinstance(node, selectors.Not):
        return selectors.Not(_reference_canonical_values(node.inner, mapper))
    if isinstance(node, selectors.And):
        return selectors.And(tuple(_reference_canonical_values(p, mapper) for p in node.parts))
    if isinstance(node, selectors.Or):
        return selectors.Or(tuple(_reference_canonical_values(p, mapper) for p in node.parts))
    return node


@pytest.mark.parametrize(
    "text",
    [
        "env == prod",
        "env == Prod",
        "env == ' prod '",
        "!(env == PROD) && role in {web, App}",
        "(env == prod || role == web) && !has(app)",
        "env == prod || !(role == Web)",
        "all()",
        "env in {production, dev}",
    ],
)
def test_canonical_values_equal_the_rebuilding_version(text: str) -> None:
    mapper = LabelMapper(LabelsConfig.model_validate({"dimensions": {"env": {"aliases": {"production": "prod"}}}}))
    node = selectors.parse(text)
    new, old = _canonical_values(node, mapper), _reference_canonical_values(node, mapper)
    assert new == old and new.canonical() == old.canonical()
    assert (new is node) == (new == node), "unchanged nodes come back as themselves"
