"""YAML with source positions: every value's (line, column) by its path of keys and indices.

Errors in policy files must say file:line:column. We keep a side table path → position, so
pydantic's error ``loc`` tuples map straight back to the text.

Two ways to build it, with the same result: :mod:`ringfence.yamlevents` composes libyaml's event
stream without recursion (fast, depth-bounded); where PyYAML has no libyaml, :func:`load_pure`
converts PyYAML's pure-Python node tree (slow; its composer recurses).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import yaml

Path = tuple[str | int, ...]


@dataclass(frozen=True, slots=True)
class Position:
    line: int  # 1-based
    column: int  # 1-based
    quoted: bool = False  # the scalar is quoted: its text starts one column later


class YamlError(ValueError):
    def __init__(self, message: str, line: int, column: int) -> None:
        super().__init__(message)
        self.message = message
        self.line = line
        self.column = column


@dataclass(slots=True)
class Located:
    data: Any
    positions: dict[Path, Position]
    key_positions: dict[Path, Position]

    def position(self, path: Path) -> Position:
        """Closest known position for ``path`` (a missing key points at its parent)."""
        p = tuple(path)
        while p:
            if p in self.positions:
                return self.positions[p]
            p = p[:-1]
        return self.positions.get((), Position(1, 1))


MAX_NODES = 200_000
"""A policy or inventory file expanding past this many values is refused (alias bombs)."""

MAX_DEPTH = 100
"""Collections nested deeper than this are refused: real files nest < 10; deep nesting is an attack
(libyaml's C composer overflows the C stack, its scanner is quadratic in flow nesting)."""

HAVE_LIBYAML: bool = bool(getattr(yaml, "__with_libyaml__", False))

STR_TAG = "tag:yaml.org,2002:str"
MAP_TAG = "tag:yaml.org,2002:map"
SEQ_TAG = "tag:yaml.org,2002:seq"
_MERGE_TAG = "tag:yaml.org,2002:merge"
_BINARY_TAG = "tag:yaml.org,2002:binary"


def load(text: str) -> Located:
    if HAVE_LIBYAML:
        from ringfence import yamlevents  # imported here: it builds on this module's types

        return yamlevents.load(text)
    return load_pure(text)


def load_pure(text: str) -> Located:
    """The pure-Python path: PyYAML composes a node tree (recursively), we convert it."""
    try:
        node = yaml.compose(text, Loader=yaml.SafeLoader)
    except yaml.YAMLError as exc:
        raise syntax_error(exc, text) from None
    except RecursionError:
        raise YamlError("YAML nests too deeply", 1, 1) from None
    if node is None:
        return Located({}, {(): Position(1, 1)}, {})
    converter = _Converter()
    try:
        data = converter.convert(node, (), 1)
    except RecursionError:
        raise YamlError("YAML nests too deeply", 1, 1) from None
    return Located(data, converter.positions, converter.key_positions)


# -- what both paths share: error texts and scalar construction, so their results are identical --


def syntax_error(exc: yaml.YAMLError, text: str) -> YamlError:
    if isinstance(exc, yaml.MarkedYAMLError):
        mark = exc.problem_mark or exc.context_mark
        line, col = (mark.line + 1, mark.column + 1) if mark else (1, 1)
        message = exc.problem or str(exc)
        if exc.context:  # "while parsing a flow sequence", "expected a single document", ...
            cm = exc.context_mark
            message += f" ({exc.context}" + (f" at line {cm.line + 1}, column {cm.column + 1})" if cm else ")")
        return YamlError(f"YAML syntax: {message}", line, col)
    if isinstance(exc, yaml.reader.ReaderError):  # a character YAML forbids; no mark, an offset
        offset = exc.position
        if exc.encoding != "unicode":  # libyaml counts UTF-8 bytes
            offset = len(text.encode("utf-8")[:offset].decode("utf-8", errors="ignore"))
        before = text[:offset]
        line = before.count("\n") + 1
        col = offset - (before.rfind("\n") + 1) + 1
        char = f"U+{exc.character:04X}" if isinstance(exc.character, int) else repr(exc.character)
        return YamlError(f"YAML syntax: character {char} is not allowed", line, col)
    return YamlError(f"YAML syntax: {exc}", 1, 1)


def too_many(line: int, column: int) -> YamlError:
    return YamlError(
        f"document expands to more than {MAX_NODES:,} values (a file this large, or aliases repeating parts of it)",
        line,
        column,
    )


def too_deep(line: int, column: int) -> YamlError:
    return YamlError(f"YAML nests more than {MAX_DEPTH} collections deep", line, column)


def cycle(line: int, column: int) -> YamlError:
    return YamlError("an alias refers to a node that contains it (a cycle)", line, column)


def collection_key(kind: str, line: int, column: int) -> YamlError:
    return YamlError(f"a key must be a string, not a {kind}", line, column)


def check_key(key: Any, seen: dict[str, Any], line: int, column: int) -> None:
    if not isinstance(key, str):
        raise YamlError(
            f"key {key!r} is not a string (YAML reads bare on/off/yes/no as booleans: quote it)", line, column
        )
    if key in seen:
        raise YamlError(f"duplicate key {key!r}", line, column)


def check_collection_tag(tag: str | None, default: str, line: int, column: int) -> None:
    """Only plain mappings and sequences: a set, an ordered map or an object tag is refused, not dropped."""
    if tag is not None and tag != "!" and tag != default:
        raise YamlError(f"tag {_short(tag)} is not supported here", line, column)


def scalar_value(constructor: yaml.constructor.SafeConstructor, node: yaml.ScalarNode) -> Any:
    """SafeLoader's value for a resolved scalar node; what it refuses is a YamlError at the node."""
    line, col = node.start_mark.line + 1, node.start_mark.column + 1
    if node.tag == _MERGE_TAG:
        raise YamlError("merge keys (<<) are not supported: write the keys out", line, col)
    if node.tag == _BINARY_TAG:  # bytes, which every field would read as their repr: refused as !!set is
        raise YamlError(f"tag {_short(node.tag)} is not supported here", line, col)
    try:
        return constructor.construct_object(node, deep=True)
    except yaml.constructor.ConstructorError as exc:
        raise YamlError(f"YAML: {exc.problem}", line, col) from None
    except Exception:  # e.g. `!!int abc`, `!!int ""`: the constructor's own parsing failed on the text
        raise YamlError(f"{_clipped(node.value)} is not a valid {_short(node.tag)}", line, col) from None


def _clipped(text: str, most: int = 60) -> str:
    """``text`` quoted, cut to its first ``most`` characters when longer (a 100,000-digit number
    is named, not echoed)."""
    return repr(text) if len(text) <= most else f"{text[:most]!r}… ({len(text):,} characters)"


def _short(tag: str) -> str:
    return "!!" + tag.removeprefix("tag:yaml.org,2002:") if tag.startswith("tag:yaml.org,2002:") else tag


def _pos(node: yaml.Node) -> Position:
    quoted = isinstance(node, yaml.ScalarNode) and node.style in ("'", '"')
    return Position(node.start_mark.line + 1, node.start_mark.column + 1, quoted)


def _line_col(node: yaml.Node) -> tuple[int, int]:
    return node.start_mark.line + 1, node.start_mark.column + 1


class _Converter:
    """Node tree → plain data, with positions. One per document: nothing is kept between loads."""

    def __init__(self) -> None:
        self.positions: dict[Path, Position] = {}
        self.key_positions: dict[Path, Position] = {}
        self.constructor = yaml.SafeLoader("")
        self.count = 0
        self.stack: set[int] = set()  # nodes being converted: an alias back into one is a cycle

    def convert(self, node: yaml.Node, path: Path, depth: int) -> Any:
        self.count += 1
        if self.count > MAX_NODES:
            raise too_many(*_line_col(node))
        if isinstance(node, yaml.ScalarNode):
            self.positions[path] = _pos(node)
            return scalar_value(self.constructor, node)
        if depth > MAX_DEPTH:
            raise too_deep(*_line_col(node))
        self.positions[path] = _pos(node)
        is_map = isinstance(node, yaml.MappingNode)
        check_collection_tag(node.tag, MAP_TAG if is_map else SEQ_TAG, *_line_col(node))
        if id(node) in self.stack:
            raise cycle(*_line_col(node))
        self.stack.add(id(node))
        try:
            if not is_map:
                return [self.convert(v, (*path, i), depth + 1) for i, v in enumerate(node.value)]
            out: dict[str, Any] = {}
            for key_node, value_node in node.value:
                if not isinstance(key_node, yaml.ScalarNode):
                    kind = "mapping" if isinstance(key_node, yaml.MappingNode) else "sequence"
                    raise collection_key(kind, *_line_col(key_node))
                key = scalar_value(self.constructor, key_node)
                check_key(key, out, *_line_col(key_node))
                self.key_positions[(*path, key)] = _pos(key_node)
                out[key] = self.convert(value_node, (*path, key), depth + 1)
            return out
        finally:
            self.stack.discard(id(node))
