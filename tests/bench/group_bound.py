"""Measurements behind the nftables group bound (docs/benchmarks.md, "Large grouped rules").

Run as root inside a network namespace of its own::

    ip netns add rfbench
    ip netns exec rfbench .venv/bin/python -m tests.bench.group_bound curve 1000 2000 5000 10000 20000
    ip netns exec rfbench .venv/bin/python -m tests.bench.group_bound repro 5000 20 grouped

``curve``: a concatenated interval set of (prefix . tcp . piece) elements, the pieces of
tcp/1024-65535 cut at 20 single ports (41 per prefix), alone in a table: how long loading it,
deleting one element, 8 and 41 elements (one prefix's pieces) take.

``repro``: the review's reproducer. N workloads scattered in 10.20.0.0/16, K single-port rules
``to: all()`` and ``wide: env == prod -> all() tcp/1024-65535``; the agent's nft backend applies
one workload's bundle, then three prod workloads are removed and each set delta is routed the
way the agent's core routes it (``group_delta``: the group's elements, or a whole re-apply).
Modes: ``grouped`` (as shipped), ``uncapped`` (the engine's cut bound lifted), ``ungrouped``.
``RINGFENCE_NFT_GROUP_BOUND`` sets the agent's bound (a huge value: the old realisation).
"""

from __future__ import annotations

import dataclasses
import ipaddress
import itertools
import json
import random
import statistics
import sys
import time

from ringfence import addresses, bundlewire
from ringfence.engine import Engine
from ringfence.engine import compiler as engine_compiler
from ringfence.model import Workload
from ringfence.policy import load_policy_texts
from ringfence_agent.backends import ElementChange
from ringfence_agent.backends.nft import LibNftables, NftBackend
from ringfence_agent.plan import LocalFailsafes, PlanSet, compile_plan, group_changes, group_load, split_cidrs


def _ms(t: float) -> str:
    return f"{(time.perf_counter() - t) * 1000:.1f} ms"


def curve(sizes: list[int]) -> None:
    lib = LibNftables()

    def run(script: str) -> float:
        t = time.perf_counter()
        rc, _, err = lib.run(script)
        assert rc == 0, err[:500]
        return (time.perf_counter() - t) * 1000

    rng = random.Random(1)
    cuts = sorted({1024, 65536, *[p for i in range(20) for p in (9100 + 10 * i, 9101 + 10 * i)]})
    pieces = [f"{a}-{b - 1}" if b - 1 > a else str(a) for a, b in itertools.pairwise(cuts)]
    for n in sizes:
        nprefix = max(1, n // len(pieces))
        addrs = sorted(rng.sample(range(1 << 16), nprefix * 2))
        nets = list(ipaddress.collapse_addresses(ipaddress.IPv4Address((10 << 24) | (20 << 16) | a) for a in addrs))
        el = [f"{p} . tcp . {q}" for p in nets[:nprefix] for q in pieces]
        decl = "set g { type ipv4_addr . inet_proto . inet_service; flags interval; elements = { "
        load = run(f"table inet cv\ndelete table inet cv\ntable inet cv {{\n {decl}{', '.join(el)} }} }}\n}}\n")
        one, eight, all41 = [], [], []
        for i in list(range(0, nprefix - 1, 2))[:9]:  # prefix i: 1 piece, then 8; prefix i + 1: all 41
            base = i * len(pieces)
            one.append(run(f"delete element inet cv g {{ {el[base]} }}\n"))
            eight.append(run(f"delete element inet cv g {{ {', '.join(el[base + 1 : base + 9])} }}\n"))
            nxt = (i + 1) * len(pieces)
            all41.append(run(f"delete element inet cv g {{ {', '.join(el[nxt : nxt + len(pieces)])} }}\n"))
        print(
            f"{len(el):7d} elements: load {load:7.1f} ms, delete 1 {statistics.median(one):6.1f} ms, "
            f"8 {statistics.median(eight):6.1f} ms, 41 {statistics.median(all41):6.1f} ms",
            flush=True,
        )
    run("delete table inet cv\n")


def repro(n: int, k: int, mode: str) -> None:
    if mode == "uncapped":
        engine_compiler.MAX_PIECES = 10**6  # type: ignore[misc]
    ports = [9100 + 10 * i for i in range(k)]
    rules = [
        f"      - {{name: exp{i}, from: role == mon, to: all(), services: [tcp/{p}]}}" for i, p in enumerate(ports)
    ]
    rules.append("      - {name: wide, from: env == prod, to: all(), services: [tcp/1024-65535]}")
    text = "rulesets:\n  - name: core\n    scope: all()\n    same: []\n    rules:\n" + "\n".join(rules) + "\n"
    rng = random.Random(1)
    inv = [
        Workload(
            id=f"w{i}",
            ips=[f"10.20.{a >> 8}.{a & 255}"],
            tags={"ringfence:role": "mon" if i < 3 else "web", "ringfence:env": "prod" if i % 5 < 3 else "dev"},
        )
        for i, a in enumerate(rng.sample(range(1 << 16), n))
    ]
    e = Engine(load_policy_texts({"p.yaml": text}))
    if mode == "ungrouped":
        e._group_layout = lambda d, pos: [(i,) for i in range(len(pos))]  # type: ignore[method-assign]
    e.load(inv)
    plan = compile_plan(bundlewire.bundle_from_json(json.loads(json.dumps(e.render("w10")))), LocalFailsafes())
    be = NftBackend()
    t = time.perf_counter()
    be.apply(plan)
    groups = [
        (
            r.counter,
            len(r.members),
            max(group_load(r, f, plan.sets) for f in (4, 6)),
            r.counter in be.concatenated(plan),
        )
        for r in plan.rules
        if r.members
    ]
    print(f"{mode}: full apply {_ms(t)}; groups (counter, members, load, concatenated): {groups}")
    for victim in ("w20", "w40", "w60"):  # prod workloads
        upd = e.remove(victim)
        for name, (_, added, removed) in upd.set_deltas.items():
            if name not in plan.sets:
                continue
            add = tuple(addresses.format_prefix(p) for p in added)
            rem = tuple(addresses.format_prefix(p) for p in removed)
            cur = [*plan.sets[name].v4, *plan.sets[name].v6]
            new = PlanSet(*split_cidrs([x for x in cur if x not in rem] + list(add), "x"))
            a4, a6 = split_cidrs(add, "a")
            r4, r6 = split_cidrs(rem, "r")
            t = time.perf_counter()
            counters = be.group_delta(plan, name, new)
            if counters is None:
                be.apply(dataclasses.replace(plan, sets={**plan.sets, name: new}))
                what = "whole plan re-applied"
            else:
                gcs = group_changes(plan, name, new, add, rem, counters)
                covers = _ms(t)
                be.apply_delta(ElementChange(name, a4, a6, r4, r6, gcs))
                what = f"-{sum(len(g.remove) for g in gcs)} +{sum(len(g.add) for g in gcs)} group elements (covers {covers})"
            print(f"  remove {victim}, set {name}: -{len(rem)} +{len(add)} set elements, {what}: {_ms(t)}")
            plan.sets[name] = new


if __name__ == "__main__":
    if sys.argv[1] == "curve":
        curve([int(x) for x in sys.argv[2:]])
    else:
        repro(int(sys.argv[2]), int(sys.argv[3]), sys.argv[4])
