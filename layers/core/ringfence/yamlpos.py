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


def load(text: str) -> Located:
    try:
        node = yaml.compose(text, Loader=yaml.SafeLoader)
    except yaml.MarkedYAMLError as exc:
        mark = exc.problem_mark or exc.context_mark
        line, col = (mark.line + 1, mark.column + 1) if mark else (1, 1)
        raise YamlError(f"YAML syntax: {exc.problem or exc}", line, col) from None
    positions: dict[Path, Position] = {}
    key_positions: dict[Path, Position] = {}
    if node is None:
        return Located({}, {(): Position(1, 1)}, {})
    data = _convert(node, (), positions, key_positions)
    return Located(data, positions, key_positions)


def _pos(node: yaml.Node) -> Position:
    quoted = isinstance(node, yaml.ScalarNode) and node.style in ("'", '"')
    return Position(node.start_mark.line + 1, node.start_mark.column + 1, quoted)


_constructor = yaml.SafeLoader("")


def _convert(node: yaml.Node, path: Path, positions: dict[Path, Position], key_positions: dict[Path, Position]) -> Any:
    positions[path] = _pos(node)
    if isinstance(node, yaml.MappingNode):
        out: dict[Any, Any] = {}
        for key_node, value_node in node.value:
            key = _constructor.construct_object(key_node, deep=True)
            if not isinstance(key, str):
                key = str(key)
            if key in out:
                raise YamlError(f"duplicate key {key!r}", *_line_col(key_node))
            key_positions[(*path, key)] = _pos(key_node)
            out[key] = _convert(value_node, (*path, key), positions, key_positions)
        return out
    if isinstance(node, yaml.SequenceNode):
        return [_convert(v, (*path, i), positions, key_positions) for i, v in enumerate(node.value)]
    value = _constructor.construct_object(node, deep=True)
    return value


def _line_col(node: yaml.Node) -> tuple[int, int]:
    return node.start_mark.line + 1, node.start_mark.column + 1
