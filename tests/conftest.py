from __future__ import annotations

from pathlib import Path

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
