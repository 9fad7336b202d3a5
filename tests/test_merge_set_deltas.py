"""compute.merge_set_deltas: one delta per set for a batch of engine updates, never one that
spans a set's death and its re-creation under the same name."""

from __future__ import annotations

from typing import Any

from ringfence.addresses import format_prefix
from ringfence.control.compute import merge_set_deltas
from ringfence.engine import Engine
from ringfence.model import Workload


def _w(wid: str, ip: str, role: str, env: str = "dev") -> Workload:
    tags = {"ringfence:role": role, "ringfence:app": "ordering", "ringfence:env": env}
    return Workload(id=wid, ips=[ip], cloud="aws", region="ca-central-1", tags=tags)


def _content(e: Engine, name: str) -> set[str]:
    v4, v6 = e.sets_by_name[name].cover_text()
    return set(v4) | set(v6)


def test_a_set_that_dies_and_is_made_again_in_one_batch_gets_no_delta_spanning_both_copies(
    example_policy: Any, example_inventory: Any
) -> None:
    """Before the fix the merged delta ran from the old copy's version to the new copy's and,
    folded onto the old copy, kept a terminated instance's address (10.2.2.10) in the set."""
    inv = [w for w in example_inventory if w.id not in ("ord-dev-web-1", "ord-dev-proc-1")]
    inv.append(_w("ord-dev-proc-1", "10.2.2.10", "processing"))  # the dev db: the set's only holder
    e = Engine(example_policy, policy_version=1, revision=0)
    e.load(inv)
    sets = e.render("ord-dev-db-1")["sets"]
    name = next(n for n, s in sets.items() if "10.2.2.10/32" in s["v4"])
    old_version = sets[name]["version"]
    ups = [
        e.upsert(_w("p1", "10.2.2.21", "processing")),  # the old copy changes
        e.upsert(_w("ord-dev-db-1", "10.2.3.10", "database", env="prod")),  # its last holder leaves
    ]
    assert name not in e.sets_by_name
    ups.append(e.remove("ord-dev-proc-1"))  # while no set tracks it
    ups.append(e.upsert(_w("d2", "10.2.3.20", "database")))  # a new dev db: the set made again
    assert name in e.sets_by_name
    made_at = e.sets_by_name[name].version
    made = _content(e, name)
    ups.append(e.upsert(_w("p3", "10.2.2.23", "processing")))  # the new copy changes
    frm, to, add, rem = merge_set_deltas([u for u in ups if u.changed])[name]
    assert frm != old_version  # nothing bridges the old copy: its holders get whole bundles
    assert (frm, to) == (made_at, e.sets_by_name[name].version)
    folded = (made - {format_prefix(p) for p in rem}) | {format_prefix(p) for p in add}
    assert folded == _content(e, name)
    assert "10.2.2.10/32" not in folded


def test_consecutive_deltas_of_one_set_still_merge(example_policy: Any, example_inventory: Any) -> None:
    e = Engine(example_policy, policy_version=1, revision=0)
    e.load(example_inventory)
    first = e.upsert(_w("p0", "10.2.2.30", "processing"))
    name = next(iter(first.set_deltas))
    before_version = first.set_deltas[name][0]
    ups = [first, *(e.upsert(_w(f"p{i}", f"10.2.2.{40 + 2 * i}", "processing")) for i in range(1, 3))]
    after = _content(e, name)
    frm, to, add, rem = merge_set_deltas(ups)[name]
    assert frm == before_version
    assert to == ups[-1].revision == e.sets_by_name[name].version
    folded_back = (after - {format_prefix(p) for p in add}) | {format_prefix(p) for p in rem}
    assert "10.2.2.30/32" not in folded_back and "10.2.2.30/32" in after
