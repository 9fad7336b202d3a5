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
  against ``compiled_rules`` (inbound + outbound rules over all bundles) and
  ``compiled_set_elements`` (CIDR elements over distinct sets), ``bundle_bytes_total``;
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

from ringfence import synth
from ringfence.engine import Engine
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
        if rng.random() < 0.5 or "env" not in tags:
            tags["role"] = rng.choice(synth.ROLES)
        else:
            tags["env"] = rng.choice(synth.ENVS)
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
    compiled_rules = bundle_bytes = 0
    for wid in engine.workloads:
        t0 = time.perf_counter()
        doc = engine.render(wid)
        render_s += time.perf_counter() - t0
        compiled_rules += len(doc["inbound"]) + len(doc["outbound"])  # type: ignore[arg-type]
        bundle_bytes += _compact_size(doc)
    full_compile_s = load_s + render_s
    set_elements = sum(len(s.elements) if s.static else len(s.elements.elements()) for s in engine.sets.values())

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
        f"in {r['sets']:,} sets ({r['compiled_vs_naive']}x smaller than naive)",
        f"bundles:          {r['bundle_bytes_total'] / 1e6:.1f} MB compact JSON in total",
        f"connectivity:     {r['connectivity_s']:.3f} s ({r['label_groups']:,} label groups, {r['group_edges']:,} edges)",
        f"peak RSS:         {r['peak_rss_mb']:.0f} MB",
    ]
    return "\n".join(lines)
