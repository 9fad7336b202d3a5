"""The dependency map as DOT text and as one self-contained, interactive HTML file.

The HTML inlines the vendored cytoscape.js and cytoscape-dagre (``vendor/``, versions and
sha256 in ``vendor/VERSIONS``) and the map's data: no CDN, no request, it works offline.
SVG is laid out and drawn server-side by :mod:`ringfence.viz.svg` (no browser); DOT is written here (a text format, no graphviz
needed to produce it; ``dot -Tsvg`` renders it where graphviz is installed).
"""

from __future__ import annotations

import html
import json
from functools import cache
from importlib import resources
from typing import Any

from ringfence.viz.depmap import DependencyMap

COLOURS = {"allowed": "#2e7d32", "potentially-blocked": "#ef6c00", "blocked": "#c62828", "unknown": "#757575"}


def _q(s: str) -> str:
    return '"' + s.replace("\\", "\\\\").replace('"', '\\"') + '"'


def to_dot(m: DependencyMap) -> str:
    out = ["digraph ringfence {", "  rankdir=LR;", '  node [shape=box, style="rounded,filled", fillcolor="#ffffff"];']
    children: dict[str, list[dict[str, Any]]] = {}
    for n in m.nodes.values():
        if n.get("parent"):
            children.setdefault(n["parent"], []).append(n)
    for i, n in enumerate(sorted(m.nodes.values(), key=lambda n: str(n["id"]))):
        if n["kind"] == "group":
            out.append(f"  subgraph cluster_{i} {{")
            out.append(f'    label={_q(n["label"])}; style="rounded"; color="#5c6bc0";')
            for c in sorted(children.get(n["id"], []), key=lambda c: str(c["id"])):
                out.append(f"    {_q(c['id'])} [label={_q(c['label'])}];")
            out.append("  }")
        elif n["kind"] != "role":
            shape = {"internet": "ellipse", "unknown": "octagon", "core": "component"}.get(n["kind"], "box")
            out.append(f"  {_q(n['id'])} [label={_q(n['label'])}, shape={shape}];")
    for e in sorted(m.edges.values(), key=lambda e: e.id):
        attrs = [f"label={_q(', '.join(sorted(e.ports)))}", f"color={_q(COLOURS.get(e.decision, '#000000'))}"]
        attrs.append(f"tooltip={_q(e.decision + ': ' + '; '.join(sorted(e.rules)))}")
        if e.change:
            attrs.append('style="dashed", penwidth=2')
            attrs.append(f"xlabel={_q(e.change)}")
        out.append(f"  {_q(e.source)} -> {_q(e.target)} [{', '.join(attrs)}];")
    out.append("}")
    return "\n".join(out) + "\n"


@cache
def _asset(name: str) -> str:
    return (resources.files("ringfence.viz") / name).read_text(encoding="utf-8")


def _script_safe(text: str) -> str:
    # inside <script>: "</" would end the element early
    return text.replace("</", "<\\/")


def _data_safe(data: str) -> str:
    """JSON for inside ``<script>``, with no ``<``, ``>`` nor ``&``: JSON's ``\\u`` escapes read back
    as the same string. The HTML parser reads a script's text before JavaScript does, and
    ``<!--<script>`` in a tag value would make it run past this script's ``</script>`` (the page's
    scripts never run, the map stays blank); ``</`` would end it early."""
    return data.replace("<", "\\u003c").replace(">", "\\u003e").replace("&", "\\u0026")


def to_html(m: DependencyMap, title: str = "Ringfence: application dependency map") -> str:
    page = _asset("map.html")
    data = json.dumps(m.to_json(), sort_keys=True)
    return (
        page.replace("__TITLE__", html.escape(title))
        .replace("/*__CYTOSCAPE__*/", _script_safe(_asset("vendor/cytoscape.min.js")))
        .replace("/*__DAGRE__*/", _script_safe(_asset("vendor/cytoscape-dagre.min.js")))
        .replace("/*__DATA__*/null", _data_safe(data))
    )


def render(m: DependencyMap, fmt: str) -> str:
    if fmt == "dot":
        return to_dot(m)
    if fmt == "html":
        return to_html(m)
    if fmt == "svg":
        from ringfence.viz.svg import to_svg

        return to_svg(m)
    raise ValueError(f"unknown map format {fmt!r}: expected html, svg or dot")
