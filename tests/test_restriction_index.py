"""RestrictionIndex: candidates are a duplicate-free superset of the selectors that match."""

from __future__ import annotations

from typing import Any

from hypothesis import given, settings
from hypothesis import strategies as st

from ringfence.engine.index import RestrictionIndex, required_values
from ringfence.selectors import matcher, parse

DIMS = ["app", "role", "env"]
VALUES = ["a", "b", "c"]


@st.composite
def atoms(draw: Any) -> str:
    dim, v = draw(st.sampled_from(DIMS)), draw(st.sampled_from(VALUES))
    kind = draw(st.sampled_from(["eq", "ne", "in", "notin", "has", "nothas", "all"]))
    return {
        "eq": f"{dim} == {v}",
        "ne": f"{dim} != {v}",
        "in": f"{dim} in {{{v}, {draw(st.sampled_from(VALUES))}}}",
        "notin": f"{dim} not in {{{v}}}",
        "has": f"has({dim})",
        "nothas": f"!has({dim})",
        "all": "all()",
    }[kind]


@st.composite
def selector_texts(draw: Any) -> str:
    conj = [" && ".join(draw(st.lists(atoms(), min_size=1, max_size=3))) for _ in range(draw(st.integers(1, 2)))]
    return " || ".join(f"({c})" for c in conj)


labels_st = st.dictionaries(st.sampled_from(DIMS), st.sampled_from(VALUES))


@settings(max_examples=200, deadline=None)
@given(st.lists(selector_texts(), min_size=1, max_size=8), st.lists(labels_st, min_size=1, max_size=6))
def test_candidates_cover_every_match(texts: list[str], label_sets: list[dict[str, str]]) -> None:
    nodes = [parse(t) for t in texts]
    index = RestrictionIndex(list(enumerate(nodes)))
    for labels in label_sets:
        cands = index.candidates(labels)
        assert len(cands) == len(set(cands)), "no selector is offered twice"
        for i, node in enumerate(nodes):
            if matcher(node)(labels):
                assert i in cands, f"{texts[i]!r} matches {labels} but is not a candidate"


def test_restricted_selectors_are_filed_under_the_finest_dimension() -> None:
    nodes = {
        "x": parse("app == a && role == web"),
        "y": parse("app == b && role in {web, db}"),
        "z": parse("role == db"),
        "w": parse("env != prod"),
    }
    index = RestrictionIndex(list(nodes.items()))
    assert sorted(index.candidates({"app": "a", "role": "web"})) == ["w", "x"]
    assert sorted(index.candidates({"app": "c", "role": "db"})) == ["w", "z"]
    assert required_values(parse("app == a && !(role == b)")) == [("app", frozenset({"a"}))]
    assert required_values(parse("app == a || role == b")) == []
