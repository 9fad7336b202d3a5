"""The SVG map (`ringfence map --format svg`, the real command) of a label holding C0 control
characters (a tag value of a dimension with no `allowed:` list is any text): still XML."""

from __future__ import annotations

import xml.etree.ElementTree as ET
from pathlib import Path

from tests.viz.test_attack_map_label_markup import map_file


def test_attack_control_characters_in_labels_keep_the_svg_map_xml(tmp_path: Path) -> None:
    path = map_file(tmp_path, "svg")
    root = ET.parse(path).getroot()  # well-formed XML
    text = "".join(root.itertext())
    assert "\x1b" not in text and "\ufffd" in text and "<!--<script>" in text
