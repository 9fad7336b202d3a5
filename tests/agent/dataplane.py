"""The one gate for dataplane test modules: skip where root, namespaces or nftables are truly
absent, but fail in CI, where they are present and the tests must run."""

from __future__ import annotations

import os

import pytest

from ringfence.local.lab import prerequisites


def require() -> None:
    """Call at module level, before the tests are defined."""
    why = prerequisites()
    if why is None:
        return
    if os.environ.get("CI") == "true":
        raise RuntimeError(f"dataplane tests must run in CI but cannot: {why}")
    pytest.skip(f"dataplane tests skipped: {why}", allow_module_level=True)
