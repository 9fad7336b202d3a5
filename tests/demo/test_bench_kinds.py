"""``ringfence demo --bench --bench-only KINDS``: which kinds of change the bench runs."""

from __future__ import annotations

import pytest

from ringfence.demo.bench import KINDS, bench_kinds


def test_bench_only_picks_kinds_in_the_bench_order_and_names_an_unknown_one() -> None:
    assert bench_kinds(None) == list(KINDS)
    assert bench_kinds("scale50, launch") == ["launch", "scale50"]
    with pytest.raises(ValueError, match="unknown kind scale5 "):
        bench_kinds("scale5")
