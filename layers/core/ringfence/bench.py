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
  ``bundle_bytes_total``; ``sets`` counts the sets some bundle holds (``sets_kept_unsent``: those
  only dropped deny entries name, kept by the engine to know when they come back);
* ``avg_necessary_per_change`` — the reference fan-out (:class:`NecessaryFanout`, untimed) beside
  ``avg_notified_per_change``: ``notified_vs_necessary`` is their ratio over the sampled changes;
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
from dataclasses import replace
from typing import Any

from ringfence import addresses, synth
from ringfence.addresses import Prefix
from ringfence.bundle import GroupMember, service_span
from ringfence.engine import Engine
from ringfence.engine.compiler import ANY_ADDRESS
from ringfence.engine.connectivity import Matrix, compute_inventory
from ringfence.engine.explain import Endpoint, _failsafe, _peer_matches, _same_ok
from ringfence.model import Action, Mode, Workload
from ringfence.policy import ACTION_RANK, CompiledRule, Policy, load_policy_texts

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


class NecessaryFanout:
    """The reference for fan-out: which agents' own decisions a single-workload change alters.

    Independent of the engine's sets and bundles: it follows :mod:`ringfence.engine.explain`'s
    rule-by-rule evaluation. A change to workload ``x`` leaves every other agent's own rules as
    they were (they depend on its labels only); what it alters is who stands at ``x``'s old and
    new addresses. So another agent ``w`` must hear of it exactly when, for one of those
    addresses, a direction and a service, the decision of ``w``'s side (override-deny > allow >
    deny > default deny, fail-safes first) differs before and after; the peer at an address is
    every workload holding it (a rule matches where it matches one of them: the dataplane's sets
    hold addresses), else an outside address. Idle and quarantined agents enforce nothing that changes. Services are
    compared on atoms: one port (or ICMP type) per interval between the boundaries of every
    rule's and fail-safe's ranges, plus one protocol no rule names. The changed workload itself
    counts when it is added or its labels, mode or quarantine change (unless it stays idle or
    stays quarantined, enforcing the same nothing or everything), not when removed; moved
    addresses alone leave its own rules as they were, and it is judged like any other agent.
    """

    def __init__(self, policy: Policy, inventory: list[Workload]) -> None:
        self.policy = policy
        self.rules = sorted((r for r in policy.rules if not r.staged), key=_rank)
        self.state: dict[str, Endpoint] = {}
        for w in inventory:
            self.state[w.id] = self._endpoint(w)
        self._own: dict[tuple[int, str, frozenset[tuple[str, str]]], bool] = {}
        self.atoms = _service_atoms(policy)
        self._sides: dict[tuple[tuple[int, ...], tuple[addresses.Address, ...], str], tuple[bool, ...]] = {}

    def _endpoint(self, w: Workload) -> Endpoint:
        res = self.policy.labels.resolve(w)
        mode = w.mode if w.mode is not None else self.policy.mode_for(res.labels, res.unlabeled)
        addrs = tuple(sorted({addresses.parse_address(ip) for ip in w.ips}))
        return Endpoint(w.id, res.labels, addrs, mode, w.quarantined)

    def _at(self, addr: addresses.Address) -> tuple[Endpoint, ...]:
        held = tuple(
            Endpoint(ep.name, ep.labels, (addr,), ep.mode, ep.quarantined)
            for ep in self.state.values()
            if addr in ep.addrs
        )
        return held or (Endpoint(addresses.format_address(addr), None, (addr,)),)

    def _owns(self, rule: CompiledRule, direction: str, labels: frozenset[tuple[str, str]]) -> bool:
        """Whether ``rule`` applies on ``direction``'s side of workloads with ``labels`` (memoised)."""
        key = (id(rule), direction, labels)
        hit = self._own.get(key)
        if hit is None:
            hit = self._own[key] = _peer_matches(
                _own_peer(rule, direction), Endpoint("", dict(labels), (), Mode.ENFORCE)
            )
        return hit

    def apply(self, change: Workload | str, count: bool = True) -> set[str]:
        """Apply one change to the reference's inventory; the agents it must reach (or, with
        ``count`` false, only apply it: sampling)."""
        wid = change if isinstance(change, str) else change.id
        old = self.state.get(wid)
        new = None if isinstance(change, str) else self._endpoint(change)
        if not count:
            if new is None:
                self.state.pop(wid, None)
            else:
                self.state[wid] = new
            return set()
        addrs = sorted({*(old.addrs if old else ()), *(new.addrs if new else ())})
        before = {a: self._at(a) for a in addrs}
        if new is None:
            self.state.pop(wid, None)
        else:
            self.state[wid] = new
        after = {a: self._at(a) for a in addrs}
        # its own rules change with its labels, mode or quarantine; moved addresses only change
        # who stands where, which it is judged on like every other agent
        moved_only = old is not None and new is not None and replace(old, addrs=new.addrs) == new
        inert = old is not None and new is not None and _inert(old) is not None and _inert(old) == _inert(new)
        out: set[str] = {wid} if new is not None and new != old and not moved_only and not inert else set()
        # rules whose peer side a changed address's endpoint matches, before or after
        # (no other rule can match across, so none other can decide; precedence order kept)
        touched = {
            d: [
                r
                for r in self.rules
                if any(_peer_matches(_other_peer(r, d), ep) for a in addrs for ep in (*before[a], *after[a]))
            ]
            for d in ("inbound", "outbound")
        }
        groups: dict[frozenset[tuple[str, str]], list[str]] = {}
        for ep in self.state.values():
            if (
                (ep.name != wid or moved_only)
                and not ep.quarantined
                and ep.mode is not Mode.IDLE
                and ep.labels is not None
            ):
                groups.setdefault(frozenset(ep.labels.items()), []).append(ep.name)
        for labels, members in groups.items():
            me = Endpoint("", dict(labels), (), Mode.ENFORCE)
            for d in ("inbound", "outbound"):
                rules = [r for r in touched[d] if self._owns(r, d, labels)]
                if not rules:
                    continue
                if any(self._differs(rules, me, before[a], after[a], d) for a in addrs):
                    out.update(members)
                    break
        return out

    def _differs(
        self, rules: list[CompiledRule], me: Endpoint, before: tuple[Endpoint, ...], after: tuple[Endpoint, ...], d: str
    ) -> bool:
        was, now = self._matched(rules, me, before, d), self._matched(rules, me, after, d)
        if was == now:
            return False  # the same rules match: the same decisions (the address is the same)
        return self._side(was, me, before[0], d) != self._side(now, me, after[0], d)

    def _side(self, matched: list[CompiledRule], me: Endpoint, peer: Endpoint, direction: str) -> tuple[bool, ...]:
        # decided by the matching rules, the direction and (fail-safes) the peer's address alone
        key = (tuple(id(r) for r in matched), peer.addrs, direction)
        hit = self._sides.get(key)
        if hit is None:
            hit = self._sides[key] = self._decide(matched, me, peer, direction)
        return hit

    def _matched(
        self, rules: list[CompiledRule], me: Endpoint, peers: tuple[Endpoint, ...], direction: str
    ) -> list[CompiledRule]:
        """The rules matching ``me`` and the address ``peers`` stand at: a rule matches where its
        peer matches one of them (the dataplane holds addresses, not workloads)."""
        out = []
        for r in rules:
            other = _other_peer(r, direction)
            for peer in peers:
                src, dst = (me, peer) if direction == "outbound" else (peer, me)
                if _peer_matches(other, peer) and (other.selector is None or _same_ok(r, src, dst)):
                    out.append(r)
                    break
        return out

    def _decide(self, matched: list[CompiledRule], me: Endpoint, peer: Endpoint, direction: str) -> tuple[bool, ...]:
        """The decision (allow?) of ``me``'s side for each service atom, with ``peer`` across and
        ``matched`` the rules matching both ends (precedence order)."""
        src, dst = (me, peer) if direction == "outbound" else (peer, me)
        out = []
        for proto, port in self.atoms:
            if _failsafe(self.policy, src, dst, proto, port, direction) is not None:
                out.append(True)
                continue
            first = next((r for r in matched if r.matches_service(proto, port)), None)
            out.append(first is not None and first.action is Action.ALLOW)
        return tuple(out)


def _inert(ep: Endpoint) -> str | None:
    """Quarantined (denies all) or idle (filters nothing): labels change nothing it enforces."""
    return "quarantined" if ep.quarantined else "idle" if ep.mode is Mode.IDLE else None


def _rank(r: CompiledRule) -> int:
    return ACTION_RANK[r.action]


def _own_peer(r: CompiledRule, direction: str) -> Any:
    return r.consumer if direction == "outbound" else r.provider


def _other_peer(r: CompiledRule, direction: str) -> Any:
    return r.provider if direction == "outbound" else r.consumer


def _service_atoms(policy: Policy) -> list[tuple[str, int | None]]:
    from ringfence.bundlewire import CONTROL_PLANE_PORT

    # the fail-safes' single ports (DNS, the control plane) are atoms of their own
    cp = CONTROL_PLANE_PORT
    bounds: dict[str, set[int]] = {"tcp": {0, 53, 54, cp, cp + 1}, "udp": {0, 53, 54}, "icmp": {0}, "icmpv6": {0}}
    ranges = [p for r in policy.rules for p in r.services] + list(policy.failsafes.admin_ports)
    for p in ranges:
        if p.proto in bounds:
            bounds[p.proto].update((p.lo, p.hi + 1))
    top = {"tcp": 65535, "udp": 65535, "icmp": 255, "icmpv6": 255}
    atoms: list[tuple[str, int | None]] = [
        (proto, b) for proto, bs in bounds.items() for b in sorted(bs) if b <= top[proto]
    ]
    atoms.append(("any", None))  # a protocol no rule names: only ``any`` services match it
    return atoms


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


def run_bench(
    workloads: int, seed: int = 1, changes: int = 200, apps: int | None = None, necessary_every: int = 1
) -> dict[str, Any]:
    """Generate an estate of ``workloads`` workloads, compile it, apply ``changes`` changes; figures as a dict.

    The necessary fan-out (:class:`NecessaryFanout`, untimed) is computed for every
    ``necessary_every``-th change (0: never), and the engine's notified count beside it on the
    same changes."""
    estate = synth.generate(workloads, seed=seed, apps=apps)
    t0 = time.perf_counter()
    policy = load_policy_texts(estate.policy_texts)
    policy_load_s = time.perf_counter() - t0

    engine = Engine(policy, policy_version=1)
    c0, t0 = time.process_time(), time.perf_counter()
    engine.load(estate.workloads)
    load_s = time.perf_counter() - t0
    load_cpu_s = time.process_time() - c0
    # render every bundle (timed); sizes are measured outside the timer and bundles are not kept
    render_s = render_cpu_s = 0.0
    compiled_rules = bundle_bytes = map_elements = 0
    grouped_rules = grouped_members = 0
    group_contents: set[str] = set()
    for wid in engine.workloads:
        c0, t0 = time.process_time(), time.perf_counter()
        doc: dict[str, Any] = engine.render(wid)
        render_s += time.perf_counter() - t0
        render_cpu_s += time.process_time() - c0
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
    # sets some bundle holds (a set only dropped deny entries name is kept by the engine, not sent)
    held = [s for s in engine.sets.values() if s.held]
    plain_set_elements = sum(len(s.elements) if s.static else len(s.elements.elements()) for s in held)
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
    cpu_timings: list[float] = []  # this process's CPU time over the same window (a loaded box inflates wall)
    by_kind: dict[str, list[float]] = {k: [] for k in CHANGE_KINDS}
    rebuilt_total = notified_total = 0
    # what a change costs to publish (untimed): signed set deltas, their elements, rebuilt bundles' bytes
    deltas_total = delta_elements = rebuilt_bytes = 0
    reference = NecessaryFanout(policy, estate.workloads) if necessary_every else None
    necessary_total = notified_sampled = sampled = missed = 0
    t_reference = 0.0
    for i in range(changes):
        kind, arg = random_change(rng, state, counter)
        c0, t0 = time.process_time(), time.perf_counter()
        upd = engine.remove(arg) if isinstance(arg, str) else engine.upsert(arg)
        for wid in upd.rebuilt:  # the Update carries the rebuilt bundles; render any it lacks
            if wid not in upd.bundles:
                engine.render(wid)
        # the change is done when its Update (bundles and all) is handed off and freed: freeing
        # thousands of rebuilt bundles is its own cost, not the next change's (it was timed there)
        rebuilt, notify = len(upd.rebuilt), upd.notify
        # what the change costs to publish, counted here but taken out of its time
        a0, ac0 = time.perf_counter(), time.process_time()
        deltas_total += len(upd.set_deltas)
        delta_elements += sum(len(a) + len(r) for _, a, r in upd.set_deltas.values())
        for wid in upd.rebuilt:
            if wid in engine.workloads:
                doc = upd.bundles.get(wid) or engine.render(wid)
                rebuilt_bytes += len(json.dumps(doc, separators=(",", ":")))
        counting, counting_cpu = time.perf_counter() - a0, time.process_time() - ac0
        del upd
        dt = time.perf_counter() - t0 - counting
        cpu_timings.append(time.process_time() - c0 - counting_cpu)
        timings.append(dt)
        by_kind[kind].append(dt)
        rebuilt_total += rebuilt
        notified_total += len(notify)
        if reference is not None:
            t0 = time.perf_counter()
            sample = i % necessary_every == 0
            necessary = reference.apply(arg, count=sample)
            t_reference += time.perf_counter() - t0
            if sample:
                sampled += 1
                necessary_total += len(necessary)
                notified_sampled += len(notify)
                missed += len(necessary - notify)  # 0 unless the engine misses an agent

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
        "full_compile_cpu_s": round(load_cpu_s + render_cpu_s, 4),
        "engine_load_s": round(load_s, 4),
        "render_all_s": round(render_s, 4),
        "changes": len(timings),
        "incremental_p50_s": round(p50, 6),
        "incremental_p99_s": round(p99, 6),
        "incremental_p50_cpu_s": round(statistics.median(cpu_timings), 6) if cpu_timings else 0.0,
        "incremental_p99_cpu_s": round(_percentile(cpu_timings, 0.99), 6) if cpu_timings else 0.0,
        "incremental_p50_by_kind_s": {k: round(statistics.median(v), 6) for k, v in by_kind.items() if v},
        "incremental_speedup_p50": round(full_compile_s / p50, 1) if p50 else None,
        "avg_rebuilt_per_change": round(rebuilt_total / max(1, len(timings)), 2),
        "avg_notified_per_change": round(notified_total / max(1, len(timings)), 2),
        "avg_set_deltas_per_change": round(deltas_total / max(1, len(timings)), 2),
        "avg_delta_elements_per_change": round(delta_elements / max(1, len(timings)), 2),
        "avg_rebuilt_bytes_per_change": round(rebuilt_bytes / max(1, len(timings))),
        "necessary_sampled_changes": sampled,
        "avg_necessary_per_change": round(necessary_total / sampled, 2) if sampled else None,
        "avg_notified_per_sampled_change": round(notified_sampled / sampled, 2) if sampled else None,
        "notified_vs_necessary": round(notified_sampled / necessary_total, 3) if necessary_total else None,
        "necessary_not_notified": missed,
        "necessary_reference_s": round(t_reference, 2),
        "sets": len(held),
        "sets_kept_unsent": len(engine.sets) - len(held),
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
        f"(engine load {r['engine_load_s']:.3f} s + render all bundles {r['render_all_s']:.3f} s); "
        f"CPU {r['full_compile_cpu_s']:.3f} s",
        f"incremental:      p50 {r['incremental_p50_s'] * 1e3:.2f} ms, p99 {r['incremental_p99_s'] * 1e3:.2f} ms "
        f"over {r['changes']} changes (p50 {r['incremental_speedup_p50']}x faster than full compile); "
        f"CPU p50 {r['incremental_p50_cpu_s'] * 1e3:.2f} ms, p99 {r['incremental_p99_cpu_s'] * 1e3:.2f} ms",
        f"per change:       {r['avg_rebuilt_per_change']} bundles rebuilt, {r['avg_notified_per_change']} agents nudged",
        f"necessary:        {r['avg_necessary_per_change']} agents whose decisions change per change "
        f"(reference over {r['necessary_sampled_changes']} changes; nudged there: "
        f"{r['avg_notified_per_sampled_change']}, {r['notified_vs_necessary']}x necessary)",
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
