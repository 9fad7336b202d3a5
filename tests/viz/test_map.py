"""The dependency map: built from flows and from policy, as DOT and as HTML; the HTML loaded in
headless Chromium (offline), its nodes and edges found in the DOM, an edge clicked for its rule,
no console error. 2,000 app groups load (the figure: docs/benchmarks.md, tests/bench/map_bench.py)."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

from ringfence.flows.aggregate import FlowRow
from ringfence.inventory import load_inventory
from ringfence.policy import load_policy
from ringfence.viz.depmap import MapFilter, build_map, from_policy
from ringfence.viz.render import render, to_dot, to_html

from . import browser

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


browser.require()


def test_the_html_map_in_headless_chromium(policy, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    from selenium.webdriver.common.by import By

    path = tmp_path / "map.html"
    path.write_text(to_html(build_map(policy, [], ROWS)))
    with browser.chromium() as d:
        browser.load(d, path)
        nodes = {e.get_attribute("data-node") for e in d.find_elements(By.CSS_SELECTOR, "#elements [data-node]")}
        assert {"g:app=ordering,env=prod,loc=ca", f"r:{WEB}", f"r:{PROC}", "core", "internet"} <= nodes
        edges = {e.get_attribute("data-edge") for e in d.find_elements(By.CSS_SELECTOR, "#elements [data-edge]")}
        assert f"r:{DEV_WEB}>r:{PROC}>blocked>" in edges and len(edges) == 4
        # the graph drew them: compound nodes, positioned by the layout
        assert d.execute_script(
            "return ringfenceMap.cy.getElementById(arguments[0]).isParent()", "g:app=ordering,env=prod,loc=ca"
        )
        assert d.execute_script("return ringfenceMap.cy.edges().length") == 4
        # click an edge: the panel names the rule with file:line
        d.execute_script("ringfenceMap.cy.getElementById(arguments[0]).emit('tap')", f"r:{WEB}>r:{PROC}>allowed>")
        assert "ordering.yaml:17:9" in d.find_element(By.ID, "details").text
        d.execute_script("ringfenceMap.cy.getElementById(arguments[0]).emit('tap')", f"r:{DEV_WEB}>r:{PROC}>blocked>")
        assert "dev-never-reaches-prod" in d.find_element(By.ID, "details").text
        # filter: unticking "blocked" hides the blocked edges
        d.find_element(By.CSS_SELECTOR, "#decisions input[value=blocked]").click()
        assert d.execute_script("return ringfenceMap.cy.edges('.hidden').length") == 2
        d.save_screenshot(str(tmp_path / "map.png"))
        assert (tmp_path / "map.png").stat().st_size > 10_000
        assert browser.console_errors(d) == []


def test_two_thousand_app_groups_load(tmp_path: Path) -> None:
    from selenium.webdriver.common.by import By

    from tests.viz.bigmap import big_map

    path = tmp_path / "big.html"
    path.write_text(to_html(big_map(2000)))
    with browser.chromium() as d:
        browser.load(d, path)
        assert d.execute_script("return ringfenceMap.cy.nodes('[kind = \"group\"]').length") == 2000
        assert d.execute_script("return ringfenceMap.collapsed")  # roles folded into their groups
        assert (
            len(d.find_elements(By.CSS_SELECTOR, "#elements [data-node]")) == 8001
        )  # 2,000 × (box + 3 roles) + internet
        assert browser.console_errors(d) == []


def test_attack_map_labels_and_rule_text_cannot_inject_script(tmp_path: Path) -> None:
    """Workload ids (a CMDB import names them), label values and rule text reach the map: each is
    inserted as text, and a "</script>" inside the data does not end the data's element."""
    from selenium.webdriver.common.by import By

    evil = "<img src=x onerror=\"document.title='pwned'\">"
    rows = [
        row(f"app=x{evil},env=prod,loc=ca,role=web</script><script>document.title='pwned'</script>",
            "internet", 443, "blocked", f"outbound on {evil}: no rule allows it (default deny)",
            sample_src="10.1.1.10", sample_dst="93.184.216.34"),
    ]  # fmt: skip
    path = tmp_path / "evil.html"
    path.write_text(to_html(build_map(load_policy(EXAMPLE / "policy"), [], rows)))
    with browser.chromium() as d:
        browser.load(d, path)
        (edge,) = d.execute_script("return ringfenceMap.cy.edges().map((e) => e.id())")
        d.execute_script("ringfenceMap.cy.getElementById(arguments[0]).emit('tap')", edge)
        assert evil in d.find_element(By.ID, "details").text  # shown as text
        assert d.find_elements(By.CSS_SELECTOR, "img") == []
        assert d.title != "pwned" and d.execute_script("return document.title") != "pwned"
        assert browser.console_errors(d) == []
