"""The dependency map as one static SVG, laid out server-side (no browser, no JavaScript).

Why a layout of our own: the HTML map's layout library (dagre, inside cytoscape-dagre) is
JavaScript and cannot run in Python without a JS engine; networkx is not a runtime dependency of
the package or the Lambda layer (only of the dev tools), and its layered layout needs the layers
given anyway. So this is the same family of layout as dagre's, reduced to what a map needs
(Sugiyama): cycles broken by a depth-first search (back edges reversed for ranking only), ranks
by longest path, the order within a rank by barycentre sweeps to cut crossings, ranks left to
right (DOT's ``rankdir=LR``). A rank taller than :data:`COLUMN_MAX` boxes wraps into several
columns, so 2,000 app groups stay a readable page rather than one endless column.

App groups are boxes with their roles inside; the internet, unknown addresses and the collapsed
core services are nodes of their own. Edges are coloured by decision (as in the HTML and DOT),
labelled with their ports, dashed when a draft would open or cut them; every element carries a
``<title>`` (hover in a viewer) with the decision, ports, flows and the deciding rule. Every
label is XML-escaped text.
"""

from __future__ import annotations

import functools
import re
from collections import defaultdict
from dataclasses import dataclass, field
from xml.sax.saxutils import escape

from ringfence.viz.depmap import DependencyMap, MapEdge

COLOURS = {"allowed": "#2e7d32", "potentially-blocked": "#ef6c00", "blocked": "#c62828", "unknown": "#757575"}
COLUMN_MAX = 40  # boxes per column before a rank wraps
CHAR_W = 7.0  # px per character of the 12 px sans-serif labels (an estimate: no font metrics here)
HEAD_H, ROLE_H, PAD, GAP_Y, GAP_X, MARGIN = 24.0, 20.0, 8.0, 18.0, 140.0, 20.0
SWEEPS = 4
PORTS_SHOWN = 3
LEGEND_H = 44.0


# what XML 1.0 cannot hold at all, not even as a character reference (C0 but tab, newline and
# carriage return; surrogates; U+FFFE, U+FFFF): one in a label would make the file no SVG
_NOT_XML = re.compile("[\x00-\x08\x0b\x0c\x0e-\x1f\ud800-\udfff\ufffe\uffff]")


def _a(text: object) -> str:
    """An attribute value or text node, escaped (quotes too); a character XML cannot hold is
    shown as U+FFFD."""
    return escape(_NOT_XML.sub("\ufffd", str(text)), {'"': "&quot;"})


@dataclass(slots=True)
class _Box:
    id: str
    label: str
    kind: str
    roles: list[tuple[str, str]] = field(default_factory=list)  # (node id, label)
    x: float = 0.0
    y: float = 0.0
    w: float = 0.0
    h: float = 0.0
    rank: int = 0
    order: float = 0.0


def _boxes(m: DependencyMap) -> tuple[dict[str, _Box], dict[str, str]]:
    """Top-level boxes, and every node id → the id of the box it is drawn in."""
    boxes: dict[str, _Box] = {}
    owner: dict[str, str] = {}
    for n in sorted(m.nodes.values(), key=lambda n: str(n["id"])):
        if n["kind"] != "role":
            boxes[n["id"]] = _Box(n["id"], str(n["label"]), str(n["kind"]))
            owner[n["id"]] = n["id"]
    for n in sorted(m.nodes.values(), key=lambda n: (str(n.get("parent")), str(n["label"]))):
        if n["kind"] == "role":
            parent = boxes.setdefault(n["parent"], _Box(n["parent"], n["parent"], "group"))
            parent.roles.append((n["id"], str(n["label"])))
            owner[n["id"]] = parent.id
    for b in boxes.values():
        widest = max([len(b.label), *(len(label) for _, label in b.roles)])
        b.w = max(120.0, widest * CHAR_W + 2 * PAD + 8)
        b.h = HEAD_H + len(b.roles) * ROLE_H + (PAD if b.roles else 0)
    return boxes, owner


def _ranks(ids: list[str], succ: dict[str, list[str]]) -> dict[str, int]:
    """Longest-path ranks over the graph with its back edges (found by an iterative DFS) left out."""
    state: dict[str, int] = {}  # 1 on the stack, 2 done
    order: list[str] = []  # post-order
    dag: dict[str, list[str]] = defaultdict(list)
    for root in ids:
        if root in state:
            continue
        state[root] = 1
        stack = [(root, iter(succ.get(root, ())))]
        while stack:
            node, it = stack[-1]
            nxt = next(it, None)
            if nxt is None:
                state[node] = 2
                order.append(node)
                stack.pop()
            elif nxt not in state:
                dag[node].append(nxt)
                state[nxt] = 1
                stack.append((nxt, iter(succ.get(nxt, ()))))
            elif state[nxt] == 2:
                dag[node].append(nxt)  # forward or cross edge; a back edge (state 1) is left out
    rank = dict.fromkeys(ids, 0)
    for node in reversed(order):  # reverse post-order is a topological order of the DAG
        for nxt in dag[node]:
            if rank[nxt] < rank[node] + 1:
                rank[nxt] = rank[node] + 1
    return rank


def _barycentre(i: str, nbrs: dict[str, list[str]], boxes: dict[str, _Box]) -> tuple[float, float]:
    ns = nbrs.get(i, [])
    return (sum(boxes[n].order for n in ns) / len(ns) if ns else boxes[i].order, boxes[i].order)


def layout(m: DependencyMap) -> tuple[dict[str, _Box], dict[str, str], float, float]:
    boxes, owner = _boxes(m)
    succ: dict[str, list[str]] = defaultdict(list)
    pred: dict[str, list[str]] = defaultdict(list)
    for e in sorted(m.edges.values(), key=lambda e: e.id):
        a, b = owner[e.source], owner[e.target]
        if a != b and b not in succ[a]:
            succ[a].append(b)
            pred[b].append(a)
    ids = sorted(boxes)
    rank = _ranks(ids, succ)
    layers: dict[int, list[str]] = defaultdict(list)
    for i in ids:
        boxes[i].rank = rank[i]
        layers[rank[i]].append(i)
    for r in layers:
        for pos, i in enumerate(layers[r]):
            boxes[i].order = pos
    # barycentre sweeps: forward on predecessors, backward on successors
    for sweep in range(SWEEPS):
        seq = sorted(layers) if sweep % 2 == 0 else sorted(layers, reverse=True)
        nbrs = pred if sweep % 2 == 0 else succ
        for r in seq:
            layers[r].sort(key=functools.partial(_barycentre, nbrs=nbrs, boxes=boxes))
            for pos, i in enumerate(layers[r]):
                boxes[i].order = pos
    # place: each rank one or more columns of at most COLUMN_MAX boxes, top to bottom
    x = MARGIN
    height = 0.0
    for r in sorted(layers):
        members = layers[r]
        for start in range(0, len(members), COLUMN_MAX):
            column = members[start : start + COLUMN_MAX]
            y = MARGIN + LEGEND_H  # below the legend
            width = max(boxes[i].w for i in column)
            for i in column:
                boxes[i].x, boxes[i].y = x, y
                y += boxes[i].h + GAP_Y
            height = max(height, y)
            x += width + GAP_X
    return boxes, owner, x - GAP_X + MARGIN + 60, height + MARGIN  # 60: the loops right of the last column


def _anchor(boxes: dict[str, _Box], owner: dict[str, str], node: str, side: str) -> tuple[float, float]:
    b = boxes[owner[node]]
    x = b.x + (b.w if side == "out" else 0.0)
    for pos, (rid, _) in enumerate(b.roles):
        if rid == node:
            return x, b.y + HEAD_H + pos * ROLE_H + ROLE_H / 2
    return x, b.y + b.h / 2


def _ports_label(e: MapEdge) -> str:
    """At most three ports on the line (the rest in its title): long lists made the map unreadable."""
    ports = sorted(e.ports)
    text = ", ".join(ports[:PORTS_SHOWN]) + (f" +{len(ports) - PORTS_SHOWN}" if len(ports) > PORTS_SHOWN else "")
    return text + (f" ({e.change})" if e.change else "")


def _edge_title(e: MapEdge) -> str:
    parts = [f"{e.source} → {e.target}", f"{e.decision}: {', '.join(sorted(e.ports)) or 'any'}"]
    if e.flows:
        parts.append(f"{e.flows} flows")
    if e.change:
        parts.append(f"the draft would {e.change} it ({e.draft})")
    parts.extend(sorted(e.rules))
    return "\n".join(parts)


def to_svg(m: DependencyMap, title: str = "Ringfence: application dependency map") -> str:
    boxes, owner, width, height = layout(m)
    width = max(width, MARGIN * 2 + 170 * len(COLOURS))
    out: list[str] = [
        '<?xml version="1.0" encoding="UTF-8"?>',
        f'<svg xmlns="http://www.w3.org/2000/svg" width="{width:.0f}" height="{height:.0f}" '
        f'viewBox="0 0 {width:.0f} {height:.0f}" font-family="sans-serif" font-size="12">',
        f"<title>{_a(title)}</title>",
        "<defs>",
    ]
    for decision, colour in COLOURS.items():
        out.append(
            f'<marker id="arrow-{decision}" viewBox="0 0 10 10" refX="10" refY="5" markerWidth="7" '
            f'markerHeight="7" orient="auto-start-reverse"><path d="M0,0 L10,5 L0,10 z" fill="{colour}"/></marker>'
        )
    out.append("</defs>")
    out.append('<rect width="100%" height="100%" fill="#ffffff"/>')
    out.append(
        f'<g class="legend"><text x="{MARGIN}" y="{MARGIN + 4}" font-weight="bold">{_a(title)} (from {m.source})</text>'
    )
    for i, (decision, colour) in enumerate(COLOURS.items()):
        x = MARGIN + i * 170
        out.append(
            f'<line x1="{x}" y1="{MARGIN + 18}" x2="{x + 24}" y2="{MARGIN + 18}" stroke="{colour}" stroke-width="2"/>'
            f'<text x="{x + 30}" y="{MARGIN + 22}">{_a(decision)}</text>'
        )
    out.append("</g>")
    # edges first: boxes and their labels drawn over them stay readable
    out.append('<g class="edges" fill="none">')
    for e in sorted(m.edges.values(), key=lambda e: e.id):
        colour = COLOURS.get(e.decision, "#000000")
        x1, y1 = _anchor(boxes, owner, e.source, "out")
        x2, y2 = _anchor(boxes, owner, e.target, "in")
        if owner[e.source] == owner[e.target]:  # within one group: a loop out and back on its right
            b = boxes[owner[e.source]]
            x2, bend = b.x + b.w, 40.0
            d = f"M{x1:.1f},{y1:.1f} C{x1 + bend:.1f},{y1:.1f} {x2 + bend:.1f},{y2:.1f} {x2:.1f},{y2:.1f}"
            mx, my = x1 + bend * 0.8, (y1 + y2) / 2
        else:
            bend = max(40.0, abs(x2 - x1) / 2)
            if x2 <= x1:  # backwards (a cycle, or a wrapped column): swing out and back in
                bend = 80.0
            d = f"M{x1:.1f},{y1:.1f} C{x1 + bend:.1f},{y1:.1f} {x2 - bend:.1f},{y2:.1f} {x2:.1f},{y2:.1f}"
            mx, my = (x1 + x2) / 2, (y1 + y2) / 2
        dash = ' stroke-dasharray="6 4"' if e.change else ""
        out.append(
            f'<g class="edge {_a(e.decision)}" data-source="{_a(e.source)}" data-target="{_a(e.target)}" '
            f'data-decision="{_a(e.decision)}"' + (f' data-change="{_a(e.change)}"' if e.change else "") + ">"
            f"<title>{_a(_edge_title(e))}</title>"
            f'<path d="{d}" stroke="{colour}" stroke-width="{2.5 if e.change else 1.6}"{dash} '
            f'marker-end="url(#arrow-{_a(e.decision if e.decision in COLOURS else "unknown")})"/>'
            f'<text x="{mx:.1f}" y="{my - 4:.1f}" fill="{colour}" stroke="none" text-anchor="middle">'
            f"{_a(_ports_label(e))}</text></g>"
        )
    out.append("</g>")
    out.append('<g class="nodes">')
    for b in sorted(boxes.values(), key=lambda b: b.id):
        fill = {"internet": "#e3f2fd", "unknown": "#eeeeee", "core": "#f3e5f5"}.get(b.kind, "#ffffff")
        rx = b.h / 2 if b.kind == "internet" else 6
        out.append(f'<g class="node {_a(b.kind)}" id="{_a("n-" + b.id)}" data-id="{_a(b.id)}">')
        out.append(f"<title>{_a(b.label)}" + (f" ({len(b.roles)} roles)" if b.roles else "") + "</title>")
        out.append(
            f'<rect x="{b.x:.1f}" y="{b.y:.1f}" width="{b.w:.1f}" height="{b.h:.1f}" rx="{rx:.1f}" '
            f'fill="{fill}" stroke="#5c6bc0" stroke-width="1.5"/>'
        )
        out.append(f'<text x="{b.x + PAD:.1f}" y="{b.y + 16:.1f}" font-weight="bold">{_a(b.label)}</text>')
        for pos, (rid, label) in enumerate(b.roles):
            ry = b.y + HEAD_H + pos * ROLE_H
            out.append(
                f'<g class="role" data-id="{_a(rid)}"><title>{_a(rid[2:])}</title>'
                f'<rect x="{b.x + PAD:.1f}" y="{ry:.1f}" width="{b.w - 2 * PAD:.1f}" height="{ROLE_H - 3:.1f}" '
                f'rx="3" fill="#e8eaf6" stroke="#9fa8da"/>'
                f'<text x="{b.x + 2 * PAD:.1f}" y="{ry + 13:.1f}">{_a(label)}</text></g>'
            )
        out.append("</g>")
    out.append("</g>")
    out.append("</svg>")
    return "\n".join(out) + "\n"
