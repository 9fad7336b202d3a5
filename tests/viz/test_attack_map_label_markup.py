"""A tag value of a dimension with no `allowed:` list is any text, and it reaches the map (`ringfence
map`, the real command, in headless Chromium): in the HTML map's inline data, ``<!--<script>``
kept the page's scripts from running (a blank map)."""

from __future__ import annotations

import subprocess
from pathlib import Path

from tests.agentproc import BIN
from tests.test_attack_text_output import open_estate

from . import browser

LABEL = "<!--<script>"


def map_file(tmp_path: Path, fmt: str) -> Path:
    pol, inv = open_estate(tmp_path)  # an app tag of "<!--<script>", ESC, OSC 52, CR, LF
    out = tmp_path / f"map.{fmt}"
    p = subprocess.run(
        [
            str(BIN / "ringfence"),
            "map",
            "--policy",
            str(pol),
            "--inventory",
            str(inv),
            "--format",
            fmt,
            "--out",
            str(out),
        ],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert p.returncode == 0, p.stderr
    return out


def test_attack_a_comment_opening_label_does_not_blank_the_html_map(tmp_path: Path) -> None:
    from selenium.webdriver.common.by import By

    browser.require()
    path = map_file(tmp_path, "html")
    assert LABEL not in path.read_text()  # the inlined data holds no markup at all
    with browser.chromium() as d:
        browser.load(d, path)  # drawn: data-ready set by the map's own script
        labels = d.execute_script("return ringfenceMap.cy.nodes().map((n) => n.data('label'))")
        assert any(LABEL in str(x) for x in labels), labels
        listed = [e.get_attribute("textContent") for e in d.find_elements(By.CSS_SELECTOR, "#elements [data-node]")]
        assert any(LABEL in x for x in listed), listed  # shown as text
        assert browser.console_errors(d) == []
