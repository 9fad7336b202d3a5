"""``ringfence.control`` is what every cloud builds on: it imports no cloud SDK and nothing of
``ringfence.clouds`` (the import direction the layout keeps: clouds → control, never back)."""

from __future__ import annotations

import ast
from pathlib import Path

CONTROL = Path(__file__).resolve().parents[1] / "layers" / "core" / "ringfence" / "control"
FORBIDDEN = ("ringfence.clouds", "boto3", "botocore", "azure", "google", "moto")


def imports_of(path: Path) -> set[str]:
    out: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            out.update(a.name for a in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            out.add(node.module)
    return out


def test_control_imports_no_cloud() -> None:
    modules = sorted(CONTROL.glob("*.py"))
    assert len(modules) > 5
    bad = {
        f"{p.name}: {m}"
        for p in modules
        for m in imports_of(p)
        if any(m == f or m.startswith(f + ".") for f in FORBIDDEN)
    }
    assert bad == set()
