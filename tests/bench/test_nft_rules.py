"""Grouped rules cut the nftables rules a bundle needs (counted on rendered text, no kernel)."""

from __future__ import annotations

from tests.bench.nft_rules import run


def test_grouped_bundles_need_fewer_nft_rules_than_their_expansion() -> None:
    r = run(300, 40)
    assert r["bundle_rules_grouped"]["mean"] < r["bundle_rules_expanded"]["mean"]
    assert r["nft_rules_grouped"]["mean"] < r["nft_rules_expanded"]["mean"]
    assert r["nft_rules_grouped"]["max"] <= r["nft_rules_expanded"]["max"]
