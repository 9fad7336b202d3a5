"""YAML with source positions: every value's (line, column) by its path of keys and indices.

Errors in policy files must say file:line:column. PyYAML's composer keeps marks on nodes; we
convert the node tree ourselves and keep a side table path → position, so pydantic's error
``loc`` tuples map straight back to the text.
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


def load(text: str) -> Located:
    try:
        node = yaml.compose(text, Loader=yaml.SafeLoader)
    except yaml.MarkedYAMLError as exc:
        mark = exc.problem_mark or exc.context_mark
        line, col = (mark.line + 1, mark.column + 1) if mark else (1, 1)
        raise YamlError(f"YAML syntax: {exc.problem or exc}", line, col) from None
    except RecursionError:
        raise YamlError("YAML nests too deeply", 1, 1) from None
    if node is None:
        return Located({}, {(): Position(1, 1)}, {})
    converter = _Converter()
    try:
        data = converter.convert(node, ())
    except RecursionError:
        raise YamlError("YAML nests too deeply", 1, 1) from None
    return Located(data, converter.positions, converter.key_positions)


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

    def convert(self, node: yaml.Node, path: Path) -> Any:
        self.count += 1
        if self.count > MAX_NODES:
            raise YamlError(f"document expands to more than {MAX_NODES} values (aliases?)", *_line_col(node))
        self.positions[path] = _pos(node)
        if isinstance(node, yaml.ScalarNode):
            return self.constructor.construct_object(node, deep=True)
        if id(node) in self.stack:
            raise YamlError("an alias refers to a node that contains it (a cycle)", *_line_col(node))
        self.stack.add(id(node))
        try:
            if isinstance(node, yaml.SequenceNode):
                return [self.convert(v, (*path, i)) for i, v in enumerate(node.value)]
            out: dict[str, Any] = {}
            for key_node, value_node in node.value:
                key = self.constructor.construct_object(key_node, deep=True)
                if not isinstance(key, str):
                    raise YamlError(
                        f"key {key!r} is not a string (YAML reads bare on/off/yes/no as booleans: quote it)",
                        *_line_col(key_node),
                    )
                if key in out:
                    raise YamlError(f"duplicate key {key!r}", *_line_col(key_node))
                self.key_positions[(*path, key)] = _pos(key_node)
                out[key] = self.convert(value_node, (*path, key))
            return out
        finally:
            self.stack.discard(id(node))
