"""The dependency map: built from flows and from policy, as DOT and as HTML, and through the CLI
(the browser tests: test_map_browser.py)."""

from __future__ import annotations

import re
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
    with pytest.raises(ValueError, match="planned"):
        render(build_map(policy, [], ROWS), "svg")


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
        [cli, "flows", "ingest", "--store", store, "--policy", pol, "--inventory", inv, str(log)],
        capture_output=True, text=True, check=False,
    )  # fmt: skip
    assert ing.returncode == 0, ing.stderr
    assert "2 flows → 2 rows, 1 malformed lines" in ing.stdout and f"{log}:4: 1 fields" in ing.stderr
    dot = subprocess.run(
        [cli, "map", "--policy", pol, "--flows", store, "--format", "dot", "--decision", "blocked"],
        capture_output=True, text=True, check=True,
    ).stdout  # fmt: skip
    assert f'"r:{DEV_WEB}" -> "r:{PROC}"' in dot and f'"r:{WEB}" -> "r:{PROC}"' not in dot
    svg = subprocess.run([cli, "map", "--policy", pol, "--format", "svg"], capture_output=True, text=True, check=False)
    assert svg.returncode != 0 and "planned" in svg.stderr
