"""YAML with positions: the libyaml event composer (yamlevents) gives exactly the pure-Python path's
data, positions and errors; depth, size and tag limits are clear errors with line and column."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
import yaml
from hypothesis import HealthCheck, assume, given, settings
from hypothesis import strategies as st
from yaml.events import (
    AliasEvent,
    DocumentEndEvent,
    DocumentStartEvent,
    MappingEndEvent,
    MappingStartEvent,
    ScalarEvent,
    SequenceEndEvent,
    SequenceStartEvent,
    StreamEndEvent,
    StreamStartEvent,
)

from ringfence import synth, yamlevents, yamlpos
from ringfence.yamlpos import MAX_DEPTH, Position, YamlError
from tests.test_policy_errors import GOOD

ROOT = Path(__file__).resolve().parents[1]

pytestmark = pytest.mark.skipif(not yamlpos.HAVE_LIBYAML, reason="PyYAML without libyaml: only the pure path exists")


def outcome(load: Any, text: str) -> tuple[Any, ...]:
    """What a loader makes of ``text``: data as repr (tells 1 from 1.0 from True; nan equals nan), or the error."""
    try:
        r = load(text)
    except YamlError as exc:
        return ("error", exc.message, exc.line, exc.column)
    return ("ok", repr(r.data), r.positions, r.key_positions)


def assert_same(text: str) -> tuple[Any, ...]:
    pure, fast = outcome(yamlpos.load_pure, text), outcome(yamlevents.load, text)
    if pure[0] == fast[0] == "error" and pure[1].startswith("YAML syntax:"):
        # libyaml words its syntax errors its own way; the place and the kind must agree
        assert fast[1].startswith("YAML syntax:") and fast[2:] == pure[2:], (text, pure, fast)
    else:
        assert fast == pure, text
    return fast


def shipped_texts() -> list[tuple[str, str]]:
    out = [(str(p.relative_to(ROOT)), p.read_text()) for p in sorted((ROOT / "examples").rglob("*.yaml"))]
    out += [(str(p.relative_to(ROOT)), p.read_text()) for p in sorted((ROOT / "tests").rglob("*.json"))]
    estate = synth.generate(300, seed=3)
    out += [(f"synth/{name}", text) for name, text in estate.policy_texts.items()]
    records = [w.model_dump(mode="json", exclude_defaults=True) for w in estate.workloads]
    out += [("synth/inventory.yaml", yaml.safe_dump({"workloads": records})), ("policy GOOD", GOOD)]
    return out


@pytest.mark.parametrize(("name", "text"), shipped_texts(), ids=lambda v: v if "/" in v or " " in v else "")
def test_shipped_and_fixture_files_load_identically(name: str, text: str) -> None:
    assert assert_same(text)[0] == "ok", name


EDGE_CASES = [
    "",
    "---\n",
    "~\n",
    "'quoted root'\n",
    "# only a comment\n",
    "a: &x [1, 'b', \"c\", {d: &y 2.5}]\nb: *x\nc: [*y, *x, *y]\n",
    "a: &m {k: [1, 2], l: {m: n}}\nb: {c: *m, d: [*m, *m]}\n",
    "? &k key\n: 1\nother: *k\n",
    "a: &k key\n*k : 2\n",
    "a: |\n  literal\n   text\nb: >-\n  folded\n  text\nc: 'it''s'\nd: \"tab\\there\"\n",
    "x: 2001-12-14t21:59:43.10-05:00\ny: 0o17\nz: [.inf, -.Inf, .nan, 0x1F, 1_000, 017]\nw: [~, null, yes, No, off]\n",
    "d: 2002-12-14\ns: !!str 3\ni: !!int '7'\nf: !!float 1\n",
    "flow: {a: [1, {b: c}], 'q': \"r\", e: }\nmulti: this is\n  a folded plain scalar\n",
    "é: ü\nkey with spaces: value with:colon # comment\n",
    "- a\n- - b\n  - c\n- {d: e}\n-\n",
    "a: !!map {b: 1}\nc: !!seq [1]\nd: ! 5\n",
    # empty flow values: libyaml marks them at the next token, PyYAML just after the ':'
    "{a: , b: }",
    "{ a :   }",
    '{"a": }',
    "a: {b:\n }\n",
    "[a: ]",
    "[a:\n ]",
    "a: {b: # comment\n  , c: 1}\n",
    "{a, b: c}",
]

ERROR_CASES = [
    ("a: !foo x\n", "constructor for the tag '!foo'", 1, 4),
    ("a: !!python/object:os.system {}\n", "tag !!python/object:os.system is not supported", 1, 4),
    ("a: !!python/name:os.system ''\n", "could not determine a constructor", 1, 4),
    ("a: !!set {x: null}\n", "tag !!set is not supported", 1, 4),
    ("a: !!omap [{x: 1}]\n", "tag !!omap is not supported", 1, 4),
    ("a: !!int abc\n", "'abc' is not a valid !!int", 1, 4),
    # bytes: every field would have read their repr (an id "b'hello'"); refused as !!set is
    ("id: !!binary aGVsbG8=\n", "tag !!binary is not supported", 1, 5),
    # a value past Python's int limit is named by its start and length, not echoed whole
    ("port: " + "1" * 50_000 + "\n", f"'{'1' * 60}'… (50,000 characters) is not a valid !!int", 1, 7),
    ("a: !!seq x\n", "expected a sequence node", 1, 4),
    ("base: &b {x: 1}\nc:\n  <<: *b\n", "merge keys (<<) are not supported", 3, 3),
    ("rulesets: &a [*a]\n", "a cycle", 1, 11),
    ("&a " + "[" * 99 + "*a" + "]" * 99, "a cycle", 1, 1),
    ("&a " + "[" * 100 + "*a" + "]" * 100, "nests more than", 1, 1),  # the cycle would go one level too deep first
    ("a: 1\n---\nb: 2\n", "another document", 2, 1),
    ("a: &x 1\nb: &x 2\n", "duplicate anchor 'x'", 2, 4),
    ("a: *nope\n", "undefined alias 'nope'", 1, 4),
    ("? [1]\n: 2\n", "a key must be a string, not a sequence", 1, 3),
    ("? {a: 1}\n: 2\n", "a key must be a string, not a mapping", 1, 3),
    ("a: &s [1]\n*s : 2\n", "a key must be a string, not a sequence", 1, 4),
    ("labels:\n  on: {}\n", "key True is not a string", 2, 3),
    ("{? }", "key None is not a string", 1, 3),  # an empty flow key: placed as PyYAML places it
    ("a: 1\nb: 2\na: 3\n", "duplicate key 'a'", 3, 1),
    ("a: b\nc: \x07\n", "character U+0007 is not allowed", 2, 4),
    ("é: b\nc: \x07\n", "character U+0007 is not allowed", 2, 4),
    ("rulesets:\n  - name: x\n    rules: [\n", "YAML syntax", 4, 1),
    # a syntax error after a conversion error wins, as in the pure path (which composes first)
    ("a: 1\na: 2\nb: [\n", "YAML syntax", 4, 1),
    ("a: !foo x\nb: *nope\n", "undefined alias 'nope'", 2, 4),
    ("a: &n !!int yes\nb: *n\n", "'yes' is not a valid !!int", 1, 4),  # the anchor exists though its value failed
    ("a: !foo x\nb: &k 1\nc: &k 2\n", "duplicate anchor 'k'", 3, 4),
    ("- !foo x\n- 1\n---\n- 2\n", "another document", 3, 1),
]


@pytest.mark.parametrize("text", EDGE_CASES)
def test_edge_cases_load_identically(text: str) -> None:
    assert assert_same(text)[0] == "ok"


@pytest.mark.parametrize(("text", "message", "line", "column"), ERROR_CASES)
def test_refusals_are_yaml_errors_with_position(text: str, message: str, line: int, column: int) -> None:
    kind, got, got_line, got_column = assert_same(text)
    assert kind == "error" and message in got and (got_line, got_column) == (line, column), got


def test_aliases_repeat_the_anchor_values_and_positions() -> None:
    r = yamlevents.load("a: &x {k: [1, 'q']}\nb: *x\n")
    assert r.data == {"a": {"k": [1, "q"]}, "b": {"k": [1, "q"]}}
    assert r.data["b"] is not r.data["a"] and r.data["b"]["k"] is not r.data["a"]["k"]  # copies, as before
    assert r.positions[("b", "k", 1)] == Position(1, 15, quoted=True) == r.positions[("a", "k", 1)]
    assert r.positions[("b",)] == Position(1, 4) and r.key_positions[("b", "k")] == Position(1, 8)
    assert r.key_positions[("b",)] == Position(2, 1)


def test_quoted_scalars_are_flagged() -> None:
    r = yamlevents.load("a: 'x'\nb: \"y\"\nc: z\nd: |\n  w\n'e': 1\n")
    assert [r.positions[(k,)].quoted for k in "abcd"] == [True, True, False, False]
    assert r.key_positions[("e",)] == Position(6, 1, quoted=True)


def chain(levels: int, kind: str) -> str:
    return {"[": "[" * levels + "]" * levels, "{": "{a: " * levels + "1" + "}" * levels}[kind]


@pytest.mark.parametrize("kind", ["[", "{"])
def test_depth_bound_is_exact_and_named(kind: str) -> None:
    assert assert_same(chain(MAX_DEPTH, kind))[0] == "ok"
    for levels in (MAX_DEPTH + 1, 300):  # the pure path composes 300 levels, then refuses them like we do
        err = assert_same(chain(levels, kind))
        step = 1 if kind == "[" else 4
        assert err == ("error", f"YAML nests more than {MAX_DEPTH} collections deep", 1, MAX_DEPTH * step + 1)


def test_depth_counts_what_aliases_expand_to() -> None:
    inner = "[" * 60 + "1" + "]" * 60
    text = f"a: &d {inner}\nb: {'[' * 50}*d{']' * 50}\n"
    err = assert_same(text)
    assert err[0] == "error" and "nests more than" in err[1] and err[2] == 1


def test_alias_bomb_is_refused_where_it_overflows() -> None:
    bomb = "a: &a [x, x, x, x, x, x, x, x, x, x]\n" + "".join(
        f"{c}: &{c} [{', '.join(['*' + p] * 10)}]\n" for p, c in zip("abcde", "bcdef", strict=True)
    )
    assert assert_same(bomb) == (
        "error",
        "document expands to more than 200,000 values (a file this large, or aliases repeating parts of it)",
        1,
        32,
    )


def test_without_libyaml_load_takes_the_pure_path(monkeypatch: pytest.MonkeyPatch) -> None:
    def fail(text: str) -> None:
        raise AssertionError("libyaml used")

    monkeypatch.setattr(yamlevents, "load", fail)
    monkeypatch.setattr(yamlpos, "HAVE_LIBYAML", False)
    assert yamlpos.load("a: [1]\n").data == {"a": [1]}
    monkeypatch.setattr(yamlpos, "HAVE_LIBYAML", True)
    with pytest.raises(AssertionError, match="libyaml used"):
        yamlpos.load("a: [1]\n")


# -- deep nesting: libyaml's own composer segfaults; ours must stop early, in a child process --

_DEEP = """
import json, sys
from ringfence import yamlpos
kind, n = sys.argv[1], int(sys.argv[2])
if sys.argv[3] == "pure":
    yamlpos.HAVE_LIBYAML = False
text = {
    "[": lambda: "[" * n,
    "{": lambda: "{a: " * n,
    "compact": lambda: "- " * n + "x\\n",
    "block": lambda: "".join(" " * i + "-\\n" for i in range(n)),
    "blockmap": lambda: "".join(" " * (2 * i) + "a:\\n" for i in range(n)),
}[kind]()
try:
    yamlpos.load(text)
    print(json.dumps(None))
except yamlpos.YamlError as exc:
    print(json.dumps([exc.message, exc.line, exc.column]))
"""


@pytest.mark.parametrize(
    ("kind", "levels", "line", "column"),
    [
        ("[", 100_000, 1, MAX_DEPTH + 1),
        ("[", 1_000_000, 1, MAX_DEPTH + 1),
        ("{", 100_000, 1, 4 * MAX_DEPTH + 1),
        ("{", 1_000_000, 1, 4 * MAX_DEPTH + 1),
        ("compact", 1_000_000, 1, 2 * MAX_DEPTH + 1),
        ("block", 5_000, MAX_DEPTH + 1, MAX_DEPTH + 1),
        ("blockmap", 5_000, MAX_DEPTH + 1, 2 * MAX_DEPTH + 1),
    ],
)
def test_deep_nesting_is_refused_without_crashing(kind: str, levels: int, line: int, column: int) -> None:
    proc = subprocess.run(
        [sys.executable, "-c", _DEEP, kind, str(levels), "fast"], capture_output=True, text=True, timeout=600
    )
    assert proc.returncode == 0, proc.stderr[-2000:]  # a segfault is -11
    message, got_line, got_column = json.loads(proc.stdout)
    assert "nests more than" in message and (got_line, got_column) == (line, column)


@pytest.mark.parametrize("kind", ["[", "{", "block"])
def test_pure_path_refuses_deep_nesting_too(kind: str) -> None:
    levels = 5_000 if kind == "block" else 1_000_000
    proc = subprocess.run(
        [sys.executable, "-c", _DEEP, kind, str(levels), "pure"], capture_output=True, text=True, timeout=600
    )
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert "nests" in json.loads(proc.stdout)[0]


# -- generated documents: libyaml's emitter writes random event streams in random styles --

_KEYS = st.sampled_from(["a", "b", "name", "on", "1", "x y", "é", "<<", "~", ""]) | st.text(max_size=6)
_TEXT = st.sampled_from(
    [
        *["yes", "No", "off", "null", "~", "", "0", "-12", "0x1f", "0o17", "017", "1_000", "1.5", "-.5e3", ".inf"],
        *[".NaN", "2001-12-14", "2001-12-14t21:59:43.10-05:00", "10.0.0.1", "tcp/443", "a b", "a: b", "- x", "#x"],
        *["=", "<<", "multi\nline\n", " lead", "trail ", "'q'", '"dq"', "a\tb", "é\u2028x", "x\x85y", "\x07bell"],
        "\ufeffbom",
    ]
) | st.text(st.characters(blacklist_categories=("Cs",)), max_size=10)
_SCALAR_TAGS = [
    "tag:yaml.org,2002:str",
    "tag:yaml.org,2002:int",
    "tag:yaml.org,2002:bool",
    "tag:yaml.org,2002:null",
    "tag:yaml.org,2002:timestamp",
    "!local",
    "tag:yaml.org,2002:python/object:os.system",
]
_COLLECTION_TAGS = ["tag:yaml.org,2002:set", "tag:yaml.org,2002:omap", "!local", "tag:yaml.org,2002:map"]


@st.composite
def yaml_documents(draw: st.DrawFn) -> str:
    events: list[Any] = [StreamStartEvent(), DocumentStartEvent(explicit=draw(st.booleans()))]
    closed: list[str] = []
    opened: list[str] = []

    def anchor() -> str | None:
        return f"n{len(closed) + len(opened)}" if draw(st.integers(0, 5)) == 0 else None

    def scalar(text_strategy: st.SearchStrategy[str]) -> None:
        name = anchor()
        style = draw(st.sampled_from([None, None, "'", '"', "|", ">"]))
        if draw(st.integers(0, 9)) == 0:
            events.append(
                ScalarEvent(name, draw(st.sampled_from(_SCALAR_TAGS)), (False, False), draw(_TEXT), style=style)
            )
        else:
            events.append(ScalarEvent(name, None, (True, True), draw(text_strategy), style=style))
        if name:
            closed.append(name)

    def node(depth: int) -> None:
        choice = draw(st.integers(0, 19))
        if closed and choice == 0:
            events.append(AliasEvent(draw(st.sampled_from(closed))))
            return
        if opened and choice == 1 and draw(st.integers(0, 4)) == 0:  # rarely: an alias into itself
            events.append(AliasEvent(draw(st.sampled_from(opened))))
            return
        if depth >= 4 or choice < 12:
            scalar(_TEXT)
            return
        name = anchor()
        tag = draw(st.sampled_from(_COLLECTION_TAGS)) if draw(st.integers(0, 14)) == 0 else None
        flow = draw(st.booleans())
        if name:
            opened.append(name)
        if choice < 16:
            events.append(SequenceStartEvent(name, tag, tag is None, flow_style=flow))
            for _ in range(draw(st.integers(0, 4))):
                node(depth + 1)
            events.append(SequenceEndEvent())
        else:
            events.append(MappingStartEvent(name, tag, tag is None, flow_style=flow))
            for key in draw(st.lists(_KEYS, max_size=4, unique=True)):
                rare = draw(st.integers(0, 29))
                if rare == 0:
                    node(depth + 1)  # a key that may be a collection or an alias
                elif rare == 1 and closed:
                    events.append(AliasEvent(draw(st.sampled_from(closed))))
                else:
                    scalar(st.just(key))
                node(depth + 1)
            events.append(MappingEndEvent())
        if name:
            opened.remove(name)
            closed.append(name)

    node(0)
    events += [DocumentEndEvent(explicit=draw(st.booleans())), StreamEndEvent()]
    try:
        return yaml.emit(
            events,
            canonical=draw(st.integers(0, 7)) == 0,
            indent=draw(st.sampled_from([2, 4])),
            width=draw(st.sampled_from([12, 80, 1000])),
            allow_unicode=draw(st.booleans()),
        )
    except yaml.emitter.EmitterError:
        assume(False)
        raise


@settings(
    max_examples=int(os.environ.get("YAMLPOS_EXAMPLES", "400")),
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.filter_too_much],
)
@given(yaml_documents())
def test_generated_documents_load_identically(text: str) -> None:
    assert_same(text)
