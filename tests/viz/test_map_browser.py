"""The dependency map's HTML in headless Chromium (offline): its nodes and edges in the DOM, an
edge clicked for its rule, filters, no console error, no injected script; 2,000 app groups load
(the figure: docs/benchmarks.md, tests/bench/map_bench.py)."""

from __future__ import annotations

from pathlib import Path

import pytest

from ringfence.policy import load_policy
from ringfence.viz.depmap import build_map
from ringfence.viz.render import to_html

from . import browser
from .test_map import DEV_WEB, EXAMPLE, PROC, ROWS, WEB, policy, row

__all__ = ["policy"]  # the module-scoped fixture, shared

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


@pytest.mark.slow
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
