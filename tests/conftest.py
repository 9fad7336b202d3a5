from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest

ROOT = Path(__file__).resolve().parents[1]
EXAMPLE = ROOT / "examples" / "ordering"
GOLDEN = ROOT / "tests" / "golden"


@pytest.fixture(scope="session")
def example_policy():  # type: ignore[no-untyped-def]
    from ringfence.policy import load_policy

    return load_policy(EXAMPLE / "policy")


@pytest.fixture(scope="session")
def example_inventory():  # type: ignore[no-untyped-def]
    from ringfence.inventory import load_inventory

    return load_inventory(EXAMPLE / "inventory.yaml")


def rule_parts(rules: list[Any]) -> list[Any]:
    """A bundle direction's rules with grouped rules replaced by their members (which carry
    ``id``, ``set`` and ``services`` but no ``action``: members are always allows)."""
    out: list[Any] = []
    for r in rules:
        out.extend({**m, "action": "allow"} for m in r["members"]) if r.get("members") else out.append(r)
    return out
