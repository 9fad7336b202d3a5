"""Label selectors: parse, canonicalise, evaluate.

Grammar (Calico-like; precedence match ops > ``!`` > ``&&`` > ``||``)::

    expr    := and ('||' and)*
    and     := unary ('&&' unary)*
    unary   := '!' unary | primary
    primary := '(' expr ')' | 'all()' | 'has(' DIM ')'
             | DIM ('==' | '!=') value | DIM ('in' | 'not in') '{' value (',' value)* '}'
    value   := 'quoted' | "quoted" | bare-word | '@group'

``!=`` and ``not in`` are also true when the dimension is absent (as in Calico).
``@group`` names a label group; it expands to the group's (nested) values.

A selector compiles to a small AST. The AST has one canonical string (sorted value sets,
groups expanded) which names address sets by content, so identical selectors written in
different rulesets share one set.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Mapping
from dataclasses import dataclass

Labels = Mapping[str, str]


class SelectorSyntaxError(ValueError):
    """A selector that does not parse. ``column`` is 1-based within the selector text."""

    def __init__(self, message: str, column: int, hint: str = "") -> None:
        super().__init__(message)
        self.message = message
        self.column = column
        self.hint = hint


# --- AST -------------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class All:
    def canonical(self) -> str:
        return "all()"


@dataclass(frozen=True, slots=True)
class Has:
    dim: str

    def canonical(self) -> str:
        return f"has({self.dim})"


@dataclass(frozen=True, slots=True)
class In:
    """``dim in {values}``; ``negate`` gives ``not in`` (true when absent too)."""

    dim: str
    values: frozenset[str]
    negate: bool = False

    def canonical(self) -> str:
        vals = ",".join(repr(v) for v in sorted(self.values))
        if len(self.values) == 1:
            return f"{self.dim} {'!=' if self.negate else '=='} {vals}"
        return f"{self.dim} {'not in' if self.negate else 'in'} {{{vals}}}"


@dataclass(frozen=True, slots=True)
class Not:
    inner: Node

    def canonical(self) -> str:
        return f"!{_wrap(self.inner)}"


@dataclass(frozen=True, slots=True)
class And:
    parts: tuple[Node, ...]

    def canonical(self) -> str:
        return " && ".join(sorted(_wrap(p) for p in self.parts))


@dataclass(frozen=True, slots=True)
class Or:
    parts: tuple[Node, ...]

    def canonical(self) -> str:
        return " || ".join(sorted(_wrap(p) for p in self.parts))


Node = All | Has | In | Not | And | Or


def _wrap(node: Node) -> str:
    text = node.canonical()
    return f"({text})" if isinstance(node, And | Or) else text


def conjunction(*nodes: Node) -> Node:
    """``a && b && …`` with ``all()`` dropped and nested ands flattened."""
    parts: list[Node] = []
    for n in nodes:
        if isinstance(n, All):
            continue
        parts.extend(n.parts if isinstance(n, And) else (n,))
    if not parts:
        return All()
    if len(parts) == 1:
        return parts[0]
    return And(tuple(dict.fromkeys(parts)))


# --- evaluation --------------------------------------------------------------------------------

Matcher = Callable[[Labels], bool]


def matcher(node: Node) -> Matcher:
    """A closure that evaluates ``node`` on one workload's labels (the hot path of incremental updates)."""
    if isinstance(node, All):
        return lambda labels: True
    if isinstance(node, Has):
        dim = node.dim
        return lambda labels: dim in labels
    if isinstance(node, In):
        dim, values = node.dim, node.values
        if node.negate:
            return lambda labels: labels.get(dim) not in values
        if len(values) == 1:
            (only,) = values
            return lambda labels: labels.get(dim) == only
        return lambda labels: labels.get(dim) in values
    if isinstance(node, Not):
        inner = matcher(node.inner)
        return lambda labels: not inner(labels)
    subs = [matcher(p) for p in node.parts]
    if isinstance(node, And):
        return lambda labels: all(m(labels) for m in subs)
    return lambda labels: any(m(labels) for m in subs)


class BitsetIndex:
    """What selector evaluation over an index needs: members per (dim, value), and the universe."""

    def universe(self) -> int:  # pragma: no cover - interface
        raise NotImplementedError

    def members(self, dim: str, value: str) -> int:  # pragma: no cover - interface
        raise NotImplementedError

    def having(self, dim: str) -> int:  # pragma: no cover - interface
        raise NotImplementedError


def evaluate(node: Node, index: BitsetIndex) -> int:
    """Members matching ``node`` as an integer bitset over the index's workload slots."""
    if isinstance(node, All):
        return index.universe()
    if isinstance(node, Has):
        return index.having(node.dim)
    if isinstance(node, In):
        hit = 0
        for v in node.values:
            hit |= index.members(node.dim, v)
        return index.universe() & ~hit if node.negate else hit
    if isinstance(node, Not):
        return index.universe() & ~evaluate(node.inner, index)
    if isinstance(node, And):
        acc = index.universe()
        for p in node.parts:
            acc &= evaluate(p, index)
            if not acc:
                break
        return acc
    acc = 0
    for p in node.parts:
        acc |= evaluate(p, index)
    return acc


# --- parsing -----------------------------------------------------------------------------------

_TOKEN = re.compile(
    r"""\s*(?:
      (?P<op>==|!=|&&|\|\||[!(){},=])
    | (?P<str>'[^']*'|"[^"]*")
    | (?P<group>@[A-Za-z0-9_.:/-]+)
    | (?P<word>[A-Za-z0-9_.:/-]+)
    | (?P<bad>\S)
    )""",
    re.VERBOSE,
)


@dataclass(slots=True)
class _Tok:
    kind: str  # op | str | group | word | end
    text: str
    col: int  # 1-based


def _tokenize(text: str) -> list[_Tok]:
    toks: list[_Tok] = []
    pos = 0
    while pos < len(text):
        m = _TOKEN.match(text, pos)
        if not m or m.end() == pos:
            break
        kind = m.lastgroup or "bad"
        if kind == "bad":
            raise SelectorSyntaxError(f"unexpected character {m.group(kind)!r}", m.start(kind) + 1)
        tok_text = m.group(kind)
        if kind == "str":
            tok_text = tok_text[1:-1]
        toks.append(_Tok(kind, tok_text, m.start(kind) + 1))
        pos = m.end()
    toks.append(_Tok("end", "", len(text) + 1))
    return toks


GroupResolver = Callable[[str, str], frozenset[str] | None]
"""(group name, dimension) → expanded values, or None when no such group exists."""


class _Parser:
    def __init__(self, text: str, groups: GroupResolver | None) -> None:
        self.text = text
        self.toks = _tokenize(text)
        self.i = 0
        self.groups = groups

    def peek(self) -> _Tok:
        return self.toks[self.i]

    def take(self) -> _Tok:
        tok = self.toks[self.i]
        self.i += 1
        return tok

    def expect(self, text: str) -> _Tok:
        tok = self.take()
        if tok.text != text or tok.kind not in ("op", "word"):
            found = tok.text or "end of selector"
            raise SelectorSyntaxError(f"expected {text!r}, found {found!r}", tok.col)
        return tok

    def parse(self) -> Node:
        if self.peek().kind == "end":
            raise SelectorSyntaxError("empty selector", 1, "use all() to select every workload")
        node = self.parse_or()
        tok = self.peek()
        if tok.kind != "end":
            raise SelectorSyntaxError(
                f"unexpected {tok.text!r}", tok.col, "join conditions with && or ||, group with ( )"
            )
        return node

    def parse_or(self) -> Node:
        parts = [self.parse_and()]
        while self.peek().kind == "op" and self.peek().text == "||":
            self.take()
            parts.append(self.parse_and())
        return parts[0] if len(parts) == 1 else Or(tuple(parts))

    def parse_and(self) -> Node:
        parts = [self.parse_unary()]
        while self.peek().kind == "op" and self.peek().text == "&&":
            self.take()
            parts.append(self.parse_unary())
        return conjunction(*parts) if len(parts) > 1 else parts[0]

    def parse_unary(self) -> Node:
        tok = self.peek()
        if tok.kind == "op" and tok.text == "!":
            self.take()
            return Not(self.parse_unary())
        return self.parse_primary()

    def parse_primary(self) -> Node:
        tok = self.take()
        if tok.kind == "op" and tok.text == "(":
            node = self.parse_or()
            self.expect(")")
            return node
        if tok.kind != "word":
            found = tok.text or "end of selector"
            raise SelectorSyntaxError(
                f"expected a label dimension, all() or has(), found {found!r}",
                tok.col,
                "example: role == 'web' && env in {'dev','test'}",
            )
        if tok.text in ("all", "has") and self.peek().text == "(":
            self.take()
            if tok.text == "all":
                self.expect(")")
                return All()
            dim = self.take()
            if dim.kind != "word":
                raise SelectorSyntaxError("has() takes a label dimension", dim.col)
            self.expect(")")
            return Has(dim.text)
        dim_tok = tok
        op = self.take()
        if op.kind == "op" and op.text in ("==", "!="):
            values = self.parse_value(dim_tok.text)
            return In(dim_tok.text, values, negate=op.text == "!=")
        negate = False
        if op.kind == "word" and op.text == "not":
            negate = True
            op = self.take()
        if op.kind == "word" and op.text == "in":
            return In(dim_tok.text, self.parse_set(dim_tok.text), negate=negate)
        found = op.text or "end of selector"
        raise SelectorSyntaxError(
            f"expected ==, !=, in or not in after {dim_tok.text!r}, found {found!r}",
            op.col,
            "write role == 'web' (one = is not an operator)" if op.text == "=" else "",
        )

    def parse_set(self, dim: str) -> frozenset[str]:
        self.expect("{")
        values: set[str] = set()
        while True:
            values |= self.parse_value(dim)
            tok = self.take()
            if tok.text == "}":
                return frozenset(values)
            if tok.text != ",":
                raise SelectorSyntaxError(f"expected ',' or '}}' in value set, found {tok.text!r}", tok.col)

    def parse_value(self, dim: str) -> frozenset[str]:
        tok = self.take()
        if tok.kind in ("str", "word"):
            return frozenset([tok.text])
        if tok.kind == "group":
            name = tok.text[1:]
            expanded = self.groups(name, dim) if self.groups else None
            if expanded is None:
                raise SelectorSyntaxError(
                    f"unknown label group {name!r} for dimension {dim!r}",
                    tok.col,
                    "define it under label_groups with that dimension",
                )
            return expanded
        found = tok.text or "end of selector"
        raise SelectorSyntaxError(f"expected a value, found {found!r}", tok.col)


# Most selectors are ``dim == value`` comparisons joined by ``&&``. Such a text parses to
# exactly what _Parser builds for it (In leaves, conjunction), at a fraction of the tokenizer's
# cost; anything else (quotes holding ``&&``, groups, ``!``, ``in``, errors) takes _Parser.
_SIMPLE = re.compile(r"""\s*([A-Za-z0-9_.:/-]+)\s*(==|!=)\s*([A-Za-z0-9_.:/-]+|'[^']*'|"[^"]*")\s*""")


def _parse_simple(text: str) -> Node | None:
    parts: list[Node] = []
    for piece in text.split("&&"):
        m = _SIMPLE.fullmatch(piece)
        if m is None:
            return None
        dim, op, value = m.groups()
        if value[0] in "'\"":
            value = value[1:-1]
        parts.append(In(dim, frozenset([value]), negate=op == "!="))
    return conjunction(*parts) if len(parts) > 1 else parts[0]


def parse(text: str, groups: GroupResolver | None = None) -> Node:
    """Parse a selector; raises :class:`SelectorSyntaxError` with a column and a hint."""
    node = _parse_simple(text)
    return node if node is not None else _Parser(text, groups).parse()
