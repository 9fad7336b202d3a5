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


_PIECES = st.sampled_from(
    ["role", "env", "all", "has", "not", "in", "a-b.c", "web", "'w&&b'", '"x y"', "'", '"', "''", "@g", "@", "==", "!=",
     "=", "===", "&&", "&", "&&&", "||", "!", "(", ")", "{", "}", ",", " ", "\t", "\u00a0", "é", ""]
)  # fmt: skip


def _outcome(fn: object, text: str) -> object:
    groups = {"g": frozenset({"web", "db"})}
    try:
        return fn(text, lambda name, dim: groups.get(name))  # type: ignore[operator]
    except selectors.SelectorSyntaxError as exc:
        return ("error", exc.message, exc.column, exc.hint)


_WORD = st.sampled_from(["role", "env", "all", "not", "in", "a-b.c", "web", "x/y:z"])
_SP = st.sampled_from(["", " ", "  ", "\t"])
_VALUE = st.one_of(_WORD, _WORD.map(lambda w: f"'{w}'"), _WORD.map(lambda w: f'"{w}"'), _PIECES)
_CMP = st.tuples(_SP, _WORD, _SP, st.sampled_from(["==", "!=", "==", "="]), _SP, _VALUE, _SP).map("".join)
# near-simple selectors: comparisons joined by && (sometimes another piece), so the fast path is taken often
_NEAR = st.lists(st.one_of(_CMP, _CMP, _PIECES), min_size=1, max_size=4).flatmap(
    lambda cs: st.lists(st.sampled_from(["&&", "&&", "||", "&&&", ""]), min_size=len(cs), max_size=len(cs)).map(
        lambda js: "".join(c + j for c, j in zip(cs, js, strict=True))[: -len(js[-1]) or None]
    )
)


@given(st.one_of(st.lists(_PIECES, max_size=12).map("".join), _NEAR))
def test_simple_comparison_fast_path_matches_the_parser(text: str) -> None:
    def full(t: str, g: selectors.GroupResolver) -> selectors.Node:
        return selectors._Parser(t, g).parse()

    assert _outcome(selectors.parse, text) == _outcome(full, text)


@pytest.mark.parametrize(
    "text",
    ["role == web", " a==b&&c!='d'&& e == \"f\" ", "a == b && a == b", "all == x", "role == 'w&&b'", "a == b &&"],
)
def test_simple_comparison_fast_path_examples(text: str) -> None:
    assert _outcome(selectors.parse, text) == _outcome(lambda t, g: selectors._Parser(t, g).parse(), text)
