"""The core-engine benchmark behind ``ringfence bench``.

One run on a :mod:`ringfence.synth` estate measures:

* ``policy_load_s`` — YAML → compiled :class:`~ringfence.policy.Policy` (reported, not in compile);
* ``full_compile_s`` — :meth:`Engine.load` plus rendering every bundle as a dict;
* ``incremental_p50_s`` / ``incremental_p99_s`` — single-workload changes (relabel, re-IP, add,
  remove, mode change, quarantine): :meth:`Engine.upsert` / :meth:`Engine.remove`, which also
  render the bundles the change rebuilt (``Update.bundles``; peers receive set deltas);
* ``connectivity_s`` — inventory → labels → the group-level connectivity matrix
  (:func:`~ringfence.engine.connectivity.compute_inventory`; no engine, not expanded to pairs);
* size figures: ``naive_pair_rules`` (allowed (source, destination, port range) triples a
  per-pair firewall would need, counted from the connectivity matrix, never materialised)
  against ``compiled_rules`` (inbound + outbound rules over all bundles; a grouped rule is one)
  and ``compiled_set_elements`` (CIDR elements over distinct sets, plus
  ``compiled_map_elements``: the (address, service) elements the dataplane holds for grouped
  rules, over distinct grouped-rule contents, see :func:`grouped_rule_elements`),
  ``bundle_bytes_total``;
* ``peak_rss_mb`` — the process's peak resident set (``ru_maxrss``), so it includes whatever the
  process did before; run it in a fresh process for a clean figure.
"""

from __future__ import annotations

import json
import random
import resource
import statistics
import sys
import time
from typing import Any

from ringfence import addresses, synth
from ringfence.addresses import Prefix
from ringfence.bundle import GroupMember, service_span
from ringfence.engine import Engine
from ringfence.engine.compiler import ANY_ADDRESS
from ringfence.engine.connectivity import Matrix, compute_inventory
from ringfence.model import Mode, Workload
from ringfence.policy import load_policy_texts

CHANGE_KINDS = ("relabel", "re-ip", "add", "remove", "mode", "quarantine")


def naive_pair_rules(matrix: Matrix) -> int:
    """Σ over allowed group edges of (source workloads × destination workloads − self pairs) × port ranges."""
    total = 0
    for (src, dst), edge in matrix.edges.items():
        a, b = len(matrix.groups[src]), len(matrix.groups[dst])
        pairs = a * b - (a if src == dst else 0)
        total += pairs * len(edge.services)
    return total


def grouped_rule_elements(engine: Engine, members: list[dict[str, Any]]) -> int:
    """Elements an agent's dataplane holds for one grouped rule: per address family and distinct
    service of the group, the CIDR cover of the union of the prefixes of the members carrying
    that service (nftables: one concatenated ``address . protocol . port`` interval set per
    family, plus ``address . icmp type``, ``address . protocol`` and plain address sets for ICMP
    types, whole protocols and ``any``). A whole protocol counts its cover once per protocol, a
    port range the engine cut counts it once per piece: what the agent loads."""
    union: dict[tuple[int, tuple[str, int, int]], list[Prefix]] = {}
    for m in map(GroupMember.model_validate, members):
        if m.set is None:
            prefixes: list[Prefix] = sorted(ANY_ADDRESS)
        else:
            s = engine.sets_by_name[m.set]
            prefixes = s.elements.elements()
        for svc in m.services:
            span = service_span(svc)
            families = (
                (addresses.V4,)
                if span[0] == "icmp"
                else (addresses.V6,)
                if span[0] == "icmpv6"
                else (addresses.V4, addresses.V6)
            )
            for p in prefixes:
                if p[0] in families:
                    union.setdefault((p[0], span), []).append(p)
    return sum(len(addresses.collapse(ps)) for ps in union.values())


def _compact_size(doc: dict[str, object]) -> int:
    return len(json.dumps(doc, separators=(",", ":"), sort_keys=True).encode())


def _peak_rss_mb() -> float:
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return round(peak / (1024 * 1024) if sys.platform == "darwin" else peak / 1024, 1)


def _percentile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    k = min(len(ordered) - 1, max(0, round(q * (len(ordered) - 1))))
    return ordered[k]


def random_change(rng: random.Random, state: dict[str, Workload], counter: list[int]) -> tuple[str, Workload | str]:
    """One realistic single-workload change over ``state`` (which it updates): (kind, workload or removed id)."""
    kind = rng.choice(CHANGE_KINDS)
    wid = rng.choice(list(state))
    w = state[wid]
    if kind == "remove" and len(state) > 1:
        del state[wid]
        return kind, wid
    if kind == "add" or kind == "remove":
        counter[0] += 1
        ips = [_bump(ip, 250 + counter[0] % 5) for ip in w.ips]
        new = w.model_copy(update={"id": f"{wid}-new{counter[0]}", "ips": ips})
        kind = "add"
    elif kind == "relabel":
        tags = dict(w.tags)
        if rng.random() < 0.5 or synth.label_key("env") not in tags:
            tags[synth.label_key("role")] = rng.choice(synth.ROLES)
        else:
            tags[synth.label_key("env")] = rng.choice(synth.ENVS)
        new = w.model_copy(update={"tags": tags})
    elif kind == "re-ip":
        counter[0] += 1
        new = w.model_copy(update={"ips": [_bump(ip, 1 + counter[0] % 3) for ip in w.ips]})
    elif kind == "mode":
        new = w.model_copy(update={"mode": rng.choice([Mode.OBSERVE, Mode.IDLE, Mode.ENFORCE, None])})
    else:
        new = w.model_copy(update={"quarantined": not w.quarantined})
    state[new.id] = new
    return kind, new


def _bump(ip: str, by: int) -> str:
    import ipaddress

    addr = ipaddress.ip_address(ip)
    return str(addr + by)


def run_bench(workloads: int, seed: int = 1, changes: int = 200, apps: int | None = None) -> dict[str, Any]:
    """Generate an estate of ``workloads`` workloads, compile it, apply ``changes`` changes; figures as a dict."""
    estate = synth.generate(workloads, seed=seed, apps=apps)
    t0 = time.perf_counter()
    policy = load_policy_texts(estate.policy_texts)
    policy_load_s = time.perf_counter() - t0

    engine = Engine(policy, policy_version=1)
    t0 = time.perf_counter()
    engine.load(estate.workloads)
    load_s = time.perf_counter() - t0
    # render every bundle (timed); sizes are measured outside the timer and bundles are not kept
    render_s = 0.0
    compiled_rules = bundle_bytes = map_elements = 0
    grouped_rules = grouped_members = 0
    group_contents: set[str] = set()
    for wid in engine.workloads:
        t0 = time.perf_counter()
        doc: dict[str, Any] = engine.render(wid)
        render_s += time.perf_counter() - t0
        compiled_rules += len(doc["inbound"]) + len(doc["outbound"])
        bundle_bytes += _compact_size(doc)
        for rule in (*doc["inbound"], *doc["outbound"]):
            if "members" not in rule:
                continue
            grouped_rules += 1
            grouped_members += len(rule["members"])
            # contents are shared like sets: count each distinct one once (ids do not matter)
            content = json.dumps([[m["set"], m["services"]] for m in rule["members"]], sort_keys=True)
            if content not in group_contents:
                group_contents.add(content)
                map_elements += grouped_rule_elements(engine, rule["members"])
    full_compile_s = load_s + render_s
    plain_set_elements = sum(len(s.elements) if s.static else len(s.elements.elements()) for s in engine.sets.values())
    set_elements = plain_set_elements + map_elements

    t0 = time.perf_counter()
    matrix = compute_inventory(policy, estate.workloads)  # inventory → labels → group matrix
    connectivity_s = time.perf_counter() - t0
    naive = naive_pair_rules(matrix)
    allowed_pairs = matrix.allowed_pair_count()
    groups, edges = len(matrix.groups), len(matrix.edges)
    del matrix

    rng = random.Random(seed * 7919 + 1)  # noqa: S311 - reproducible benchmark input, not security
    state = {w.id: w for w in estate.workloads}
    counter = [0]
    timings: list[float] = []
    by_kind: dict[str, list[float]] = {k: [] for k in CHANGE_KINDS}
    rebuilt_total = notified_total = 0
    for _ in range(changes):
        kind, arg = random_change(rng, state, counter)
        t0 = time.perf_counter()
        upd = engine.remove(arg) if isinstance(arg, str) else engine.upsert(arg)
        for wid in upd.rebuilt:  # the Update carries the rebuilt bundles; render any it lacks
            if wid not in upd.bundles:
                engine.render(wid)
        dt = time.perf_counter() - t0
        timings.append(dt)
        by_kind[kind].append(dt)
        rebuilt_total += len(upd.rebuilt)
        notified_total += len(upd.notify)

    p50 = statistics.median(timings) if timings else 0.0
    p99 = _percentile(timings, 0.99) if timings else 0.0
    compiled_total = compiled_rules + set_elements
    return {
        "workloads": len(estate.workloads),
        "apps": len(estate.apps),
        "rules": len(policy.rules),
        "seed": seed,
        "policy_load_s": round(policy_load_s, 4),
        "full_compile_s": round(full_compile_s, 4),
        "engine_load_s": round(load_s, 4),
        "render_all_s": round(render_s, 4),
        "changes": len(timings),
        "incremental_p50_s": round(p50, 6),
        "incremental_p99_s": round(p99, 6),
        "incremental_p50_by_kind_s": {k: round(statistics.median(v), 6) for k, v in by_kind.items() if v},
        "incremental_speedup_p50": round(full_compile_s / p50, 1) if p50 else None,
        "avg_rebuilt_per_change": round(rebuilt_total / max(1, len(timings)), 2),
        "avg_notified_per_change": round(notified_total / max(1, len(timings)), 2),
        "sets": len(engine.sets),
        "label_groups": groups,
        "group_edges": edges,
        "connectivity_s": round(connectivity_s, 4),
        "allowed_workload_pairs": allowed_pairs,
        "naive_pair_rules": naive,
        "compiled_rules": compiled_rules,
        "compiled_set_elements": set_elements,
        "compiled_address_set_elements": plain_set_elements,
        "compiled_map_elements": map_elements,
        "grouped_rules": grouped_rules,
        "grouped_rule_members": grouped_members,
        "distinct_grouped_rules": len(group_contents),
        "compiled_vs_naive": round(naive / compiled_total, 1) if compiled_total else None,
        "bundle_bytes_total": bundle_bytes,
        "peak_rss_mb": _peak_rss_mb(),
    }


def format_text(result: dict[str, Any]) -> str:
    """A human-readable summary of :func:`run_bench`'s result."""
    r = result
    lines = [
        f"estate: {r['workloads']:,} workloads, {r['apps']:,} apps, {r['rules']:,} rules (seed {r['seed']})",
        f"policy load:      {r['policy_load_s']:.3f} s (not in compile)",
        f"full compile:     {r['full_compile_s']:.3f} s "
        f"(engine load {r['engine_load_s']:.3f} s + render all bundles {r['render_all_s']:.3f} s)",
        f"incremental:      p50 {r['incremental_p50_s'] * 1e3:.2f} ms, p99 {r['incremental_p99_s'] * 1e3:.2f} ms "
        f"over {r['changes']} changes (p50 {r['incremental_speedup_p50']}x faster than full compile)",
        f"per change:       {r['avg_rebuilt_per_change']} bundles rebuilt, {r['avg_notified_per_change']} agents nudged",
        f"naive pair rules: {r['naive_pair_rules']:,} ({r['allowed_workload_pairs']:,} allowed workload pairs)",
        f"compiled:         {r['compiled_rules']:,} rules + {r['compiled_set_elements']:,} set elements "
        f"({r['compiled_address_set_elements']:,} in {r['sets']:,} address sets + "
        f"{r['compiled_map_elements']:,} in {r['distinct_grouped_rules']:,} distinct grouped rules) "
        f"= {r['compiled_vs_naive']}x smaller than naive",
        f"grouped rules:    {r['grouped_rules']:,} in bundles, standing for {r['grouped_rule_members']:,} policy rules",
        f"bundles:          {r['bundle_bytes_total'] / 1e6:.1f} MB compact JSON in total",
        f"connectivity:     {r['connectivity_s']:.3f} s ({r['label_groups']:,} label groups, {r['group_edges']:,} edges)",
        f"peak RSS:         {r['peak_rss_mb']:.0f} MB",
    ]
    return "\n".join(lines)
