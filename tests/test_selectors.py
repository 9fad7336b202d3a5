from __future__ import annotations

import pytest
from hypothesis import given
from hypothesis import strategies as st

from ringfence import selectors
from ringfence.engine.index import LabelIndex, iter_bits


def m(text: str, labels: dict[str, str]) -> bool:
    return selectors.matcher(selectors.parse(text))(labels)


@pytest.mark.parametrize(
    ("text", "labels", "expected"),
    [
        ("all()", {}, True),
        ("role == web", {"role": "web"}, True),
        ("role == 'web'", {"role": "db"}, False),
        ('role != "web"', {}, True),  # != is true when the label is absent (Calico)
        ("env not in {dev, test}", {}, True),
        ("env in {'dev','test'}", {"env": "test"}, True),
        ("has(app)", {"app": "x"}, True),
        ("!has(app)", {"app": "x"}, False),
        ("role == web || role == db && env == prod", {"role": "web", "env": "dev"}, True),  # && binds tighter
        ("(role == web || role == db) && env == prod", {"role": "web", "env": "dev"}, False),
        ("!(role == web) && has(role)", {"role": "db"}, True),
    ],
)
def test_semantics(text: str, labels: dict[str, str], expected: bool) -> None:
    assert m(text, labels) is expected


def test_canonical_form_is_order_independent() -> None:
    a = selectors.parse("env in {b, a} && role == web")
    b = selectors.parse("role == 'web' && env in {'a','b'}")
    assert a.canonical() == b.canonical() == "env in {'a','b'} && role == 'web'"


def test_groups_expand_and_unknown_group_errors() -> None:
    groups = {("np", "env"): frozenset({"dev", "test"})}
    node = selectors.parse("env in {@np, qa}", lambda n, d: groups.get((n, d)))
    assert node.canonical() == "env in {'dev','qa','test'}"
    with pytest.raises(selectors.SelectorSyntaxError) as exc:
        selectors.parse("role == @np", lambda n, d: groups.get((n, d)))
    assert exc.value.column == 9 and "unknown label group 'np' for dimension 'role'" in exc.value.message


@pytest.mark.parametrize(
    ("text", "column", "fragment"),
    [
        ("", 1, "empty selector"),
        ("role ==", 8, "expected a value"),
        ("role == web &&", 15, "expected a label dimension"),
        ("role = web", 6, "expected ==, !=, in or not in"),
        ("(role == web", 13, "expected ')'"),
        ("role == web env == x", 13, "unexpected 'env'"),
        ("role in {a b}", 12, "expected ',' or '}'"),
        ("role == w$b", 10, "unexpected character '$'"),
    ],
)
def test_syntax_errors_have_columns(text: str, column: int, fragment: str) -> None:
    with pytest.raises(selectors.SelectorSyntaxError) as exc:
        selectors.parse(text)
    assert exc.value.column == column
    assert fragment in exc.value.message


LABELS = st.dictionaries(st.sampled_from(["role", "app", "env"]), st.sampled_from(["a", "b", "c"]))
ATOMS = st.sampled_from(["role == a", "app != b", "env in {a, c}", "role not in {b}", "has(env)", "all()", "!has(app)"])
EXPRS = st.recursive(
    ATOMS,
    lambda inner: st.one_of(
        st.tuples(inner, inner).map(lambda t: f"({t[0]}) && ({t[1]})"),
        st.tuples(inner, inner).map(lambda t: f"({t[0]}) || ({t[1]})"),
        inner.map(lambda e: f"!({e})"),
    ),
    max_leaves=6,
)


@given(EXPRS, st.lists(LABELS, max_size=12))
def test_bitset_evaluation_equals_per_workload_matching(expr: str, estate: list[dict[str, str]]) -> None:
    node = selectors.parse(expr)
    index = LabelIndex()
    for slot, labels in enumerate(estate):
        index.add(slot, labels)
    expected = {slot for slot, labels in enumerate(estate) if selectors.matcher(node)(labels)}
    assert set(iter_bits(selectors.evaluate(node, index))) == expected
    # canonical text parses back to the same meaning
    again = selectors.parse(node.canonical())
    assert all(selectors.matcher(again)(lab) == selectors.matcher(node)(lab) for lab in estate)
