"""libyaml's event stream → :class:`~ringfence.yamlpos.Located`, without recursion.

``yaml.CSafeLoader`` is several times faster than the pure-Python loader, but its C composer
recurses per nesting level and overflows the C stack (a segfault) near 100,000 levels: a denial
of service from one bad file. libyaml's *parser* keeps its own heap stacks and does not crash, but
its scanner re-checks every open flow level at each token, so it is quadratic in flow nesting
(100,000 ``[``: 34 s). So we pull events from the C parser one at a time and compose them here
with an explicit stack, stopping at :data:`~ringfence.yamlpos.MAX_DEPTH`: no input is read much
past that depth, and no pre-scan is needed.

The result is :func:`ringfence.yamlpos.load_pure`'s, value for value and position for position:

* scalars are resolved and constructed by PyYAML's own resolver and ``SafeConstructor``;
* an alias repeats its anchor's values with the anchor's positions, each repetition counted
  towards :data:`~ringfence.yamlpos.MAX_NODES` (alias bombs);
* errors come in the same order: the pure path composes the whole document before it converts,
  so a syntax error anywhere wins over a conversion error (a bad key, too many values) before it.
  Here the first conversion error is held while the rest of the document is parsed, not built,
  then raised.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import yaml
from yaml.events import (
    AliasEvent,
    MappingEndEvent,
    MappingStartEvent,
    ScalarEvent,
    SequenceEndEvent,
    SequenceStartEvent,
    StreamEndEvent,
)

from ringfence.yamlpos import (
    MAP_TAG,
    MAX_DEPTH,
    MAX_NODES,
    SEQ_TAG,
    STR_TAG,
    Located,
    Path,
    Position,
    YamlError,
    check_collection_tag,
    check_key,
    collection_key,
    cycle,
    scalar_value,
    syntax_error,
    too_deep,
    too_many,
)

_QUOTED = ("'", '"')
_BREAKS = "\r\n\x85\u2028\u2029"
_NO_KEY = object()  # a mapping frame waiting for its next key

# A node as recorded for replaying aliases, parents before children:
# (depth, key in its parent mapping or None in a sequence, scalar value or an empty [] / {}, position, key position)
_Op = tuple[int, Any, Any, Position, Position | None]


class _Frame:
    __slots__ = ("anchor", "container", "flow", "is_map", "key", "key_pos", "path", "value_path")

    def __init__(self, container: Any, is_map: bool, flow: bool, path: Path, anchor: str | None) -> None:
        self.container = container
        self.is_map = is_map
        self.flow = flow
        self.path = path
        self.anchor = anchor
        self.key: Any = _NO_KEY
        self.key_pos: Position | None = None
        self.value_path: Path = ()


class _Held(Exception):
    """A conversion error, to be raised once the rest of the document has parsed."""

    def __init__(self, error: YamlError, depth: int) -> None:
        super().__init__(error.message)
        self.error = error
        self.depth = depth  # collections open in the parser when it happened


def load(text: str) -> Located:
    loader = yaml.CSafeLoader(text)
    try:
        return _Composer(loader, text).run()
    except yaml.YAMLError as exc:
        cut = _libyaml_depth_cut(exc)
        if cut is not None:
            # libyaml (0.2.6+) bounds nesting itself, at 1,000 levels, while its scanner looks ahead
            # for simple keys; our bound is lower but its scanner reads ahead of our composer. The
            # text before its refusal nests past our bound too, so composing it refuses with our
            # own message and position.
            try:
                load(text[:cut])
            except YamlError as ours:
                if "nests more than" in ours.message:
                    raise ours from None
        raise syntax_error(exc, text) from None
    finally:
        loader.dispose()


def _libyaml_depth_cut(exc: yaml.YAMLError) -> int | None:
    """Where libyaml refused a document for nesting (a character index), or None."""
    if not isinstance(exc, yaml.MarkedYAMLError) or "maximum nesting depth" not in (exc.problem or ""):
        return None
    mark = exc.problem_mark or exc.context_mark
    index = getattr(mark, "index", None)
    return index if isinstance(index, int) and index > 0 else None


def _pos(event: Any) -> Position:
    mark = event.start_mark
    return Position(mark.line + 1, mark.column + 1, event.style in _QUOTED)


def _kind(value: Any) -> str:
    return "mapping" if isinstance(value, dict) else "sequence"


class _Composer:
    """One document's events → data and positions. One per load: nothing is kept between loads."""

    def __init__(self, loader: Any, text: str) -> None:
        self.loader = loader
        self.text = text
        self.next: Callable[[], Any] = loader.get_event
        self.positions: dict[Path, Position] = {}
        self.key_positions: dict[Path, Position] = {}
        self.count = 0
        self.stack: list[_Frame] = []
        self.anchors: dict[str, list[_Op] | int] = {}  # name → its ops, or its first op's index while open
        self.anchor_marks: dict[str, Any] = {}
        self.ops: list[_Op] = []  # nodes composed while an anchored collection is open
        self.recording = 0  # anchored collections open
        self.plain_tags: dict[str, str] = {}  # text → resolved tag
        self.other_tags: dict[str, str] = {}
        self.constructed: dict[tuple[str, str], Any] = {}  # (tag, text) → value, for non-string scalars
        self.root_mark: Any = None
        self.root: Any = None  # the root collection, once open

    def run(self) -> Located:
        self.next()  # StreamStartEvent
        if type(self.next()) is StreamEndEvent:  # else DocumentStartEvent
            return Located({}, {(): Position(1, 1)}, {})
        try:
            data = self.compose()
        except _Held as held:
            self.drain(held)
            raise held.error from None
        self.finish()
        return Located(data, self.positions, self.key_positions)

    def finish(self) -> None:
        self.next()  # DocumentEndEvent
        event = self.next()
        if type(event) is not StreamEndEvent:  # as PyYAML's get_single_node says it
            raise yaml.composer.ComposerError(
                "expected a single document in the stream",
                self.root_mark,
                "but found another document",
                event.start_mark,
            )

    def drain(self, held: _Held) -> None:
        """Parse the rest of the document without building it: syntax and anchor errors come first."""
        depth = held.depth
        while depth:
            event = self.next()
            kind = type(event)
            if kind is SequenceStartEvent or kind is MappingStartEvent:
                depth += 1
                if depth > MAX_DEPTH:
                    raise held.error from None  # no further: the scanner is quadratic in nesting
                if event.anchor is not None:
                    self.define(event)
            elif kind is SequenceEndEvent or kind is MappingEndEvent:
                depth -= 1
            elif kind is ScalarEvent:
                if event.anchor is not None:
                    self.define(event)
            else:
                self.target(event)
        self.finish()

    def held(self, error: YamlError, opening: bool = False) -> _Held:
        return _Held(error, len(self.stack) + opening)

    def compose(self) -> Any:
        """Events → the root value. Keys and values are placed into the open collection on top."""
        positions = self.positions
        top: _Frame | None = None
        event = prev = self.next()
        self.root_mark = event.start_mark
        while True:
            kind = type(event)
            if top is not None and top.is_map and top.key is _NO_KEY:
                if kind is MappingEndEvent:
                    top = self.close()
                    if top is None:
                        return self.root
                else:
                    self.key(top, event, kind, prev)
                prev, event = event, self.next()
                continue
            if kind is SequenceEndEvent:
                top = self.close()
                if top is None:
                    return self.root
                prev, event = event, self.next()
                continue
            if top is None:
                path: Path = ()
            elif top.is_map:
                path = top.value_path
            else:
                path = (*top.path, len(top.container))
            if kind is ScalarEvent:
                if event.anchor is not None:
                    self.define(event)
                self.count += 1
                pos = _pos(event) if event.value or top is None or not top.flow else self.flow_empty(prev, event)
                if self.count > MAX_NODES:
                    raise self.held(too_many(pos.line, pos.column))
                positions[path] = pos
                value = self.scalar(event)
                if event.anchor is not None:
                    self.anchors[event.anchor] = [(0, None, value, pos, None)]
                if self.recording:
                    self.record(value, pos)
                if top is None:
                    return value
                if top.is_map:
                    top.container[top.key] = value
                    top.key = _NO_KEY
                else:
                    top.container.append(value)
            elif kind is AliasEvent:
                value = self.replay(self.target(event), path, top)
                if top is None:
                    return value
            else:
                top = self.open(event, kind, path, top)
            prev, event = event, self.next()

    def open(self, event: Any, kind: type, path: Path, top: _Frame | None) -> _Frame:
        if event.anchor is not None:
            self.define(event)
        self.count += 1
        mark = event.start_mark
        line, column = mark.line + 1, mark.column + 1
        if self.count > MAX_NODES:
            raise self.held(too_many(line, column), opening=True)
        if len(self.stack) >= MAX_DEPTH:
            raise self.held(too_deep(line, column), opening=True)
        pos = Position(line, column)
        self.positions[path] = pos
        is_map = kind is MappingStartEvent
        try:
            check_collection_tag(event.tag, MAP_TAG if is_map else SEQ_TAG, line, column)
        except YamlError as exc:
            raise self.held(exc, opening=True) from None
        container: Any = {} if is_map else []
        if event.anchor is not None:
            self.anchors[event.anchor] = len(self.ops)
            self.record(container, pos)
            self.recording += 1
        elif self.recording:
            self.record(container, pos)
        if top is None:
            self.root = container
        elif top.is_map:
            top.container[top.key] = container
            top.key = _NO_KEY
        else:
            top.container.append(container)
        frame = _Frame(container, is_map, bool(event.flow_style), path, event.anchor)
        self.stack.append(frame)
        return frame

    def close(self) -> _Frame | None:
        frame = self.stack.pop()
        if frame.anchor is not None:
            start = self.anchors[frame.anchor]
            assert isinstance(start, int)
            self.anchors[frame.anchor] = self.ops[start:]
            self.recording -= 1
            if not self.recording:
                self.ops.clear()  # no open anchor refers to them any more
        return self.stack[-1] if self.stack else None

    def key(self, top: _Frame, event: Any, kind: type, prev: Any) -> None:
        if kind is ScalarEvent:
            if event.anchor is not None:
                self.define(event)
            pos = _pos(event) if event.value or not top.flow else self.flow_empty(prev, event)
            value = self.scalar(event)
            if event.anchor is not None:
                self.anchors[event.anchor] = [(0, None, value, pos, None)]
        elif kind is AliasEvent:
            ops = self.target(event)
            op = self.ops[ops] if isinstance(ops, int) else ops[0]
            value, pos = op[2], op[3]
            if isinstance(value, (dict, list)):
                raise self.held(collection_key(_kind(value), pos.line, pos.column))
        else:  # a collection as a key
            if event.anchor is not None:
                self.define(event)
            mark = event.start_mark
            kind_name = "mapping" if kind is MappingStartEvent else "sequence"
            raise self.held(collection_key(kind_name, mark.line + 1, mark.column + 1), opening=True)
        try:
            check_key(value, top.container, pos.line, pos.column)
        except YamlError as exc:
            raise self.held(exc) from None
        top.key = value
        top.key_pos = pos
        top.value_path = path = (*top.path, value)
        self.key_positions[path] = pos

    def scalar(self, event: Any) -> Any:
        tag = event.tag
        text = event.value
        if tag is None or tag == "!":
            # the resolver's answer depends only on the text and whether it may be implicit (plain)
            implicit = event.implicit
            tags = self.plain_tags if implicit[0] else self.other_tags
            tag = tags.get(text)
            if tag is None:
                tag = tags[text] = self.loader.resolve(yaml.ScalarNode, text, implicit)
        if tag == STR_TAG:
            return text  # what SafeConstructor.construct_yaml_str returns
        key = (tag, text)
        if key in self.constructed:
            return self.constructed[key]
        node = yaml.ScalarNode(tag, text, event.start_mark, event.end_mark, event.style)
        try:
            value = scalar_value(self.loader, node)
        except YamlError as exc:
            raise self.held(exc) from None
        self.constructed[key] = value
        return value

    def flow_empty(self, prev: Any, event: Any) -> Position:
        """Where PyYAML puts an empty flow value or key: right after its ``:`` or ``?`` (libyaml: at the next token)."""
        if event.style or event.tag is not None or event.start_mark.index != event.end_mark.index:
            return _pos(event)  # written out: '' or !!str
        text, end = self.text, event.start_mark.index
        i, line, column = prev.end_mark.index, prev.end_mark.line, prev.end_mark.column
        while i < end:
            c = text[i]
            if c == ":" or c == "?":
                return Position(line + 1, column + 2)
            if c == "#":  # a comment runs to the end of its line
                while i < end and text[i] not in _BREAKS:
                    i += 1
                continue
            if c in _BREAKS:
                i += 2 if text.startswith("\r\n", i) else 1
                line, column = line + 1, 0
                continue
            if c not in " \t,":
                break
            i += 1
            column += 1
        return _pos(event)

    def record(self, value: Any, pos: Position) -> None:
        top = self.stack[-1] if self.stack else None
        if top is not None and top.is_map:
            self.ops.append((len(self.stack), top.key, value, pos, top.key_pos))
        else:
            self.ops.append((len(self.stack), None, value, pos, None))

    # -- anchors and aliases --

    def define(self, event: Any) -> None:
        name = event.anchor
        if name in self.anchor_marks:  # PyYAML's composer refuses a redefinition
            raise yaml.composer.ComposerError(
                f"found duplicate anchor {name!r}; first occurrence",
                self.anchor_marks[name],
                "second occurrence",
                event.start_mark,
            )
        self.anchor_marks[name] = event.start_mark
        self.anchors[name] = []  # until its node is built; an alias must find it even if building fails

    def target(self, event: Any) -> list[_Op] | int:
        try:
            return self.anchors[event.anchor]
        except KeyError:
            raise yaml.composer.ComposerError(
                None, None, f"found undefined alias {event.anchor!r}", event.start_mark
            ) from None

    def replay(self, ops: list[_Op] | int, path: Path, top: _Frame | None) -> Any:
        """An alias: its anchor's values again, at the anchor's positions, each counted as the pure path does."""
        depth = len(self.stack)
        if isinstance(ops, int):  # the anchor is still open: it contains this alias
            pos = self.ops[ops][3]
            self.count += 1
            if self.count > MAX_NODES:
                raise self.held(too_many(pos.line, pos.column))
            if depth >= MAX_DEPTH:
                raise self.held(too_deep(pos.line, pos.column))
            raise self.held(cycle(pos.line, pos.column))
        base = ops[0][0]
        parents: list[tuple[Any, Path]] = []
        root: Any = None
        for op_depth, key, value, pos, key_pos in ops:
            d = op_depth - base
            self.count += 1
            if self.count > MAX_NODES:
                raise self.held(too_many(pos.line, pos.column))
            if d == 0:
                p = path
            else:
                parent, parent_path = parents[d - 1]
                if key_pos is None:
                    p = (*parent_path, len(parent))
                else:
                    p = (*parent_path, key)
                    self.key_positions[p] = key_pos
            if isinstance(value, (dict, list)):
                if depth + d >= MAX_DEPTH:
                    raise self.held(too_deep(pos.line, pos.column))
                value = {} if isinstance(value, dict) else []
                del parents[d:]
                parents.append((value, p))
            self.positions[p] = pos
            if d == 0:
                root = value
                if self.recording:
                    self.record(value, pos)
                if top is not None:
                    if top.is_map:
                        top.container[top.key] = value
                        top.key = _NO_KEY
                    else:
                        top.container.append(value)
            else:
                if self.recording:
                    self.ops.append((depth + d, key, value, pos, key_pos))
                if key_pos is None:
                    parent.append(value)
                else:
                    parent[key] = value
        return root
