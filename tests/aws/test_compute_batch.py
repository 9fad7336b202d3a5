"""Compute publishes one set delta per set for a whole batch: the merge of consecutive updates'
edits, exact (an element added then removed within the batch is in neither list)."""

from __future__ import annotations

from ringfence.addresses import parse_prefix
from ringfence.control.compute import merge_set_deltas
from ringfence.engine.compiler import Update


def p(text: str) -> tuple[int, int, int]:
    return parse_prefix(text)


def test_merge_set_deltas_nets_the_edits_of_a_batch() -> None:
    updates = [
        Update(revision=11, set_deltas={"web": (7, [p("10.0.0.1/32")], [p("10.0.0.9/32")])}),
        Update(revision=12, set_deltas={"db": (9, [p("10.1.0.1/32")], [])}),
        Update(revision=13, set_deltas={"web": (11, [p("10.0.0.2/32")], [p("10.0.0.1/32")])}),
        Update(revision=14, set_deltas={"web": (13, [p("10.0.0.9/32")], [p("10.0.0.3/32")])}),
    ]
    merged = merge_set_deltas(updates)
    # web: .1 added then removed (gone), .9 removed then added back (unchanged), .2 added, .3 removed
    assert merged["web"] == (7, 14, {p("10.0.0.2/32")}, {p("10.0.0.3/32")})
    assert merged["db"] == (9, 12, {p("10.1.0.1/32")}, set())
    # applying the merged delta to the set before the batch gives the set after every update
    before = {p("10.0.0.9/32"), p("10.0.0.3/32"), p("10.0.0.5/32")}
    after = set(before)
    for u in updates:
        _, add, rem = u.set_deltas.get("web", (0, [], []))
        after = (after - set(rem)) | set(add)
    _, _, add, rem = merged["web"]
    assert (before - rem) | add == after
    assert merge_set_deltas([]) == {}
