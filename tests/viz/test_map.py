"""The dependency map: built from flows and from policy, as DOT and as HTML, and through the CLI
(the browser tests: test_map_browser.py)."""

from __future__ import annotations

import itertools
import re
import shutil
import xml.etree.ElementTree as ET
from pathlib import Path

import pytest

from ringfence.flows.aggregate import FlowRow
from ringfence.inventory import load_inventory
from ringfence.policy import load_policy
from ringfence.viz.depmap import MapFilter, build_map, from_policy
from ringfence.viz.render import render, to_dot, to_html

EXAMPLE = Path(__file__).parent.parent.parent / "examples" / "ordering"
WEB = "app=ordering,env=prod,loc=ca,role=web"
PROC = "app=ordering,env=prod,loc=ca,role=processing"
DEV_WEB = "app=ordering,env=dev,loc=ca,role=web"


def row(src: str, dst: str, port: int, decision: str, rule: str, flows: int = 3, **kw: object) -> FlowRow:
    return FlowRow.model_validate(
        {"day": "2026-12-02", "src": src, "dst": dst, "proto": "tcp", "port": port, "decision": decision,
         "rule": rule, "flows": flows, "first_seen": 1.0, "last_seen": 2.0, **kw}
    )  # fmt: skip


ROWS = [
    row(WEB, PROC, 8443, "allowed", "outbound: allow ordering/web-to-processing (ordering.yaml:17:9)", 40,
        sample_src="10.1.1.10", sample_dst="10.1.2.10"),
    row(DEV_WEB, PROC, 8443, "blocked", "outbound: override-deny boundaries/dev-never-reaches-prod (boundaries.yaml:8:9)",
        sample_src="10.2.1.10", sample_dst="10.1.2.10"),
    row(WEB, "internet", 443, "blocked", "outbound on ord-prod-web-1: no rule allows it (default deny)", 1,
        sample_src="10.1.1.10", sample_dst="93.184.216.34"),
    row(WEB, "app=core,env=shared,loc=ca,role=dns", 53, "allowed", "inbound: allow core-services/dns (core-services.yaml:9:9)",
        sample_src="10.1.1.10", sample_dst="10.0.0.2"),
]  # fmt: skip


@pytest.fixture(scope="module")
def policy():  # type: ignore[no-untyped-def]
    return load_policy(EXAMPLE / "policy")


def test_the_map_from_flows_has_groups_roles_core_and_internet(policy) -> None:  # type: ignore[no-untyped-def]
    m = build_map(policy, [], ROWS)
    assert m.source == "flows"
    assert m.nodes["g:app=ordering,env=prod,loc=ca"]["kind"] == "group"
    assert m.nodes[f"r:{WEB}"]["parent"] == "g:app=ordering,env=prod,loc=ca"
    assert {"core", "internet"} <= set(m.nodes) and not any("role=dns" in n for n in m.nodes)
    e = m.edges[f"r:{WEB}>r:{PROC}>allowed>"]
    assert e.ports == {"tcp/8443"} and e.flows == 40 and any("ordering.yaml:17:9" in r for r in e.rules)
    # filters: decision, app, env, volume
    assert {x.decision for x in build_map(policy, [], ROWS, MapFilter(decision="blocked")).edges.values()} == {
        "blocked"
    }
    assert len(build_map(policy, [], ROWS, MapFilter(min_flows=10)).edges) == 1
    assert len(build_map(policy, [], ROWS, MapFilter(env="dev")).edges) == 1
    assert build_map(policy, [], ROWS, MapFilter(app="payroll")).edges == {}


def test_the_map_from_policy_when_there_are_no_flows_and_a_draft_that_cuts(policy, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    inv = load_inventory(EXAMPLE / "inventory.yaml")
    m = build_map(policy, inv, [])
    assert m.source == "policy" and all(e.decision == "allowed" for e in m.edges.values())
    assert f"r:{WEB}>r:{PROC}>allowed>" in m.edges
    # the draft drops web → processing: that edge is cut
    draft_dir = tmp_path / "draft"
    draft_dir.mkdir()
    for f in (EXAMPLE / "policy").iterdir():
        text = f.read_text()
        if f.name == "ordering.yaml":
            text = re.sub(r"      - name: web-to-processing\n(        .*\n){3}", "", text)
        (draft_dir / f.name).write_text(text)
    d = from_policy(policy, inv, draft=load_policy(draft_dir))
    cut = d.edges[f"r:{WEB}>r:{PROC}>allowed>cuts"]
    assert cut.draft == "blocked"
    # from flows, the same draft says so too
    fm = build_map(policy, [], ROWS, draft=load_policy(draft_dir))
    assert fm.edges[f"r:{WEB}>r:{PROC}>allowed>cuts"].draft == "blocked"


def test_dot_names_clusters_edges_ports_and_colours(policy) -> None:  # type: ignore[no-untyped-def]
    dot = to_dot(build_map(policy, [], ROWS))
    assert dot.startswith("digraph ringfence {") and "subgraph cluster_" in dot
    assert f'"r:{DEV_WEB}" -> "r:{PROC}" [label="tcp/8443", color="#c62828"' in dot
    with pytest.raises(ValueError, match="unknown map format"):
        render(build_map(policy, [], ROWS), "png")


SVG = "{http://www.w3.org/2000/svg}"


def _svg(text: str) -> ET.Element:
    root = ET.fromstring(text.encode())  # well-formed XML, or this raises
    assert root.tag == f"{SVG}svg"
    return root


def test_the_svg_parses_and_holds_the_groups_roles_and_coloured_edges(policy, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    m = build_map(policy, [], ROWS)
    root = _svg(render(m, "svg"))
    nodes = {g.get("data-id"): g for g in root.iter(f"{SVG}g") if "node" in (g.get("class") or "").split()}
    assert set(nodes) == {"g:app=ordering,env=prod,loc=ca", "g:app=ordering,env=dev,loc=ca", "core", "internet"}
    prod = nodes["g:app=ordering,env=prod,loc=ca"]
    roles = {r.get("data-id") for r in prod.iter(f"{SVG}g") if r.get("class") == "role"}
    assert roles == {f"r:{WEB}", f"r:{PROC}"}, "the roles are drawn inside their app group's box"
    texts = {t.text for t in prod.iter(f"{SVG}text")}
    assert {"ordering / prod / ca", "web", "processing"} <= texts
    edges = {
        (g.get("data-source"), g.get("data-target")): g
        for g in root.iter(f"{SVG}g")
        if (g.get("class") or "").startswith("edge ")
    }
    assert set(edges) == {
        (f"r:{WEB}", f"r:{PROC}"),
        (f"r:{DEV_WEB}", f"r:{PROC}"),
        (f"r:{WEB}", "internet"),
        (f"r:{WEB}", "core"),
    }
    blocked = edges[(f"r:{DEV_WEB}", f"r:{PROC}")]
    assert blocked.get("data-decision") == "blocked"
    path = blocked.find(f"{SVG}path")
    assert path is not None and path.get("stroke") == "#c62828"
    assert edges[(f"r:{WEB}", f"r:{PROC}")].find(f"{SVG}path").get("stroke") == "#2e7d32"  # type: ignore[union-attr]
    title = blocked.find(f"{SVG}title")
    assert title is not None and "boundaries.yaml:8:9" in (title.text or "") and "tcp/8443" in (title.text or "")
    # left to right: the web tier's group is ranked before the processing it calls... both in one
    # group here; the internet, called by web, sits right of the group that calls it
    boxes = {i: g.find(f"{SVG}rect") for i, g in nodes.items()}
    assert float(boxes["internet"].get("x")) > float(boxes["g:app=ordering,env=prod,loc=ca"].get("x"))  # type: ignore[union-attr,arg-type]


def test_the_svg_escapes_labels_and_marks_draft_changes(policy, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    evil = 'app=<script>&"x",env=prod,loc=ca,role=web'
    m = build_map(policy, [], [*ROWS, row(evil, PROC, 9999, "blocked", "no rule <b>")])
    text = render(m, "svg")
    root = _svg(text)
    assert "<script>" not in text and any("<script>" in (t.text or "") for t in root.iter(f"{SVG}text"))
    draft_dir = tmp_path / "draft"
    shutil.copytree(EXAMPLE / "policy", draft_dir)
    text = (draft_dir / "ordering.yaml").read_text()
    (draft_dir / "ordering.yaml").write_text(re.sub(r"      - name: web-to-processing\n(        .*\n){3}", "", text))
    fm = build_map(policy, [], ROWS, draft=load_policy(draft_dir))
    changed = [g for g in _svg(render(fm, "svg")).iter(f"{SVG}g") if g.get("data-change")]
    assert [(g.get("data-source"), g.get("data-change")) for g in changed] == [(f"r:{WEB}", "cuts")]
    assert all(g.find(f"{SVG}path").get("stroke-dasharray") for g in changed)  # type: ignore[union-attr]


def test_the_svg_of_2000_app_groups_is_laid_out_without_overlaps() -> None:
    """A synthetic estate's map (the size of the benchmark): every box placed, none overlapping."""
    from ringfence.viz.depmap import DependencyMap, MapEdge
    from ringfence.viz.svg import layout

    m = DependencyMap("flows")
    for i in range(2000):
        gid = f"g:app=a{i},env=prod,loc=ca"
        m.nodes[gid] = {"id": gid, "label": f"a{i} / prod / ca", "kind": "group"}
        for role in ("web", "db"):
            rid = f"r:app=a{i},env=prod,loc=ca,role={role}"
            m.nodes[rid] = {"id": rid, "label": role, "kind": "role", "parent": gid}
    for i in range(2000):
        for j in (i * 7 + 1, i * 13 + 5):  # calls, some back into earlier groups (cycles)
            e = MapEdge(f"r:app=a{i},env=prod,loc=ca,role=web", f"r:app=a{j % 2000},env=prod,loc=ca,role=db", "allowed")
            m.edges[e.id] = e
    boxes, _, width, height = layout(m)
    assert len(boxes) == 2000
    by_column: dict[float, list[tuple[float, float]]] = {}
    for b in boxes.values():
        assert 0 <= b.x < width and 0 <= b.y < height
        by_column.setdefault(b.x, []).append((b.y, b.y + b.h))
    for spans in by_column.values():
        spans.sort()
        assert all(a[1] <= b[0] for a, b in itertools.pairwise(spans)), "boxes overlap"


def test_the_html_is_one_file_with_no_request_to_anywhere(policy) -> None:  # type: ignore[no-untyped-def]
    page = to_html(build_map(policy, [], ROWS))
    assert "cytoscape" in page and "dagre" in page
    assert not re.search(r"""(src|href)\s*=\s*["']?(https?:)?//""", page)
    assert "default-src 'none'" in page  # and the page's own CSP forbids fetching anything


def test_the_cli_ingests_a_flow_log_and_draws_the_map(tmp_path: Path) -> None:
    import gzip
    import subprocess
    import sys

    cli = str(Path(sys.executable).parent / "ringfence")
    log = tmp_path / "x.log.gz"
    log.write_bytes(
        gzip.compress(
            b"version srcaddr dstaddr dstport protocol start end action log-status\n"
            b"2 10.1.1.10 10.1.2.10 8443 6 1764680000 1764680060 ACCEPT OK\n"
            b"2 10.2.1.10 10.1.2.10 8443 6 1764680000 1764680060 REJECT OK\n"
            b"oops\n"
        )
    )
    store = f"sqlite:{tmp_path / 'flows.db'}"
    pol, inv = str(EXAMPLE / "policy"), str(EXAMPLE / "inventory.yaml")
    ing = subprocess.run(
        [cli, "flows", "ingest", "--create", "--store", store, "--policy", pol, "--inventory", inv, str(log)],
        capture_output=True, text=True, check=False,
    )  # fmt: skip
    assert ing.returncode == 0, ing.stderr
    assert "2 flows → 2 rows, 1 malformed lines" in ing.stdout and f"{log}:4: 1 fields" in ing.stderr
    dot = subprocess.run(
        [cli, "map", "--policy", pol, "--flows", store, "--format", "dot", "--decision", "blocked"],
        capture_output=True, text=True, check=True,
    ).stdout  # fmt: skip
    assert f'"r:{DEV_WEB}" -> "r:{PROC}"' in dot and f'"r:{WEB}" -> "r:{PROC}"' not in dot
    out = tmp_path / "map.svg"
    svg = subprocess.run(
        [cli, "map", "--policy", pol, "--flows", store, "--format", "svg", "--out", str(out)],
        capture_output=True, text=True, check=False,
    )  # fmt: skip
    assert svg.returncode == 0, svg.stderr
    edges = [g for g in _svg(out.read_text()).iter(f"{SVG}g") if (g.get("class") or "").startswith("edge ")]
    assert (f"r:{DEV_WEB}", f"r:{PROC}", "blocked") in {
        (g.get("data-source"), g.get("data-target"), g.get("data-decision")) for g in edges
    }
