"""The estate's allowed-connectivity matrix, at label-group level (and workload level on demand).

Workloads with identical labels behave identically under label policy, so the matrix is
computed over *groups* (distinct label sets). Per allow rule, consumer and provider groups are
bucketed by the values its ``same:`` pins, so only pairs that can match are visited; the ports
that override-deny rules cover are then subtracted. Plain deny rules never remove an allow
(allow beats deny). Rules with an IP-list side do not connect workloads and are not in the
matrix; ``ringfence explain`` covers them.

Two entry points build the same matrix: :func:`compute_inventory` from inventory records
(labels resolved here; no bundles, rule entries or address sets are built, which is what makes
it fast), and :func:`compute` from an engine's compiled workload states (after incremental
changes). The matrix stays at group level; :meth:`Matrix.workload_pairs` expands it lazily.
"""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field

from ringfence.engine.compiler import WorkloadState
from ringfence.engine.index import LabelIndex, iter_bits
from ringfence.model import Action, Workload
from ringfence.policy import CompiledRule, Policy
from ringfence.selectors import evaluate
from ringfence.services import PortRange

LabelKey = tuple[tuple[str, str], ...]

_PROTO_LIMIT = {"tcp": 65535, "udp": 65535, "icmp": 255, "icmpv6": 255}


def label_key(labels: Mapping[str, str]) -> LabelKey:
    return tuple(sorted(labels.items()))


@dataclass(slots=True)
class Edge:
    """One allowed group pair. Edges allowed by the same rules share their lists: read them, do not mutate."""

    source: LabelKey
    destination: LabelKey
    services: list[PortRange]
    rules: list[str] = field(default_factory=list)


@dataclass(slots=True)
class Matrix:
    groups: dict[LabelKey, list[str]]  # label set → workload ids
    edges: dict[tuple[LabelKey, LabelKey], Edge]

    def workload_pairs(self) -> Iterable[tuple[str, str, Edge]]:
        for (src, dst), edge in self.edges.items():
            for a in self.groups[src]:
                for b in self.groups[dst]:
                    if a != b:
                        yield a, b, edge

    def allowed_pair_count(self) -> int:
        """(source workload, destination workload) pairs with at least one allowed service."""
        n = 0
        for (src, dst), _ in self.edges.items():
            k = len(self.groups[src]) * len(self.groups[dst])
            n += k - (len(self.groups[src]) if src == dst else 0)
        return n


def subtract(allowed: list[PortRange], denied: list[PortRange]) -> list[PortRange]:
    """Port ranges of ``allowed`` not covered by ``denied`` (``any`` expands to each protocol)."""

    def expand(ranges: list[PortRange]) -> list[PortRange]:
        out: list[PortRange] = []
        for r in ranges:
            if r.proto == "any":
                out.extend(PortRange(p, 0, hi) for p, hi in _PROTO_LIMIT.items())
            else:
                out.append(r)
        return out

    if any(d.proto == "any" for d in denied):
        return []
    result = expand(allowed)
    for d in denied:
        nxt: list[PortRange] = []
        for a in result:
            if a.proto != d.proto or d.hi < a.lo or d.lo > a.hi:
                nxt.append(a)
                continue
            if a.lo < d.lo:
                nxt.append(PortRange(a.proto, a.lo, d.lo - 1))
            if a.hi > d.hi:
                nxt.append(PortRange(a.proto, d.hi + 1, a.hi))
        result = nxt
    return result


def normalise(ranges: list[PortRange]) -> list[PortRange]:
    """Sorted, merged ranges (``any`` kept as is when present)."""
    if any(r.proto == "any" for r in ranges):
        return [PortRange("any")]
    by_proto: dict[str, list[tuple[int, int]]] = defaultdict(list)
    for r in ranges:
        by_proto[r.proto].append((r.lo, r.hi))
    out: list[PortRange] = []
    for proto in sorted(by_proto):
        spans = sorted(by_proto[proto])
        lo, hi = spans[0]
        for a, b in spans[1:]:
            if a <= hi + 1:
                hi = max(hi, b)
            else:
                out.append(PortRange(proto, lo, hi))
                lo, hi = a, b
        out.append(PortRange(proto, lo, hi))
    return out


def compute(policy: Policy, workloads: Iterable[WorkloadState], include_staged: bool = False) -> Matrix:
    """The matrix over compiled workload states (an :class:`~ringfence.engine.Engine`'s, after changes)."""
    groups: dict[LabelKey, list[str]] = defaultdict(list)
    labels_of: dict[LabelKey, dict[str, str]] = {}
    for ws in workloads:
        if ws.quarantined:
            continue
        key = label_key(ws.labels)
        groups[key].append(ws.id)
        labels_of[key] = ws.labels
    return _group_matrix(policy, dict(groups), labels_of, include_staged)


def compute_inventory(policy: Policy, inventory: Iterable[Workload], include_staged: bool = False) -> Matrix:
    """The matrix straight from inventory records, without compiling bundles (no ``Engine.load``).

    Labels are resolved once per distinct set of label inputs (tags, direct labels, derivation
    sources): workloads of one app tier share them, so most records cost a dictionary lookup.
    """
    mapper = policy.labels
    key_of: dict[tuple[object, ...], LabelKey] = {}
    groups: dict[LabelKey, list[str]] = {}
    labels_of: dict[LabelKey, dict[str, str]] = {}
    seen: set[str] = set()
    for w in inventory:
        if w.id in seen:
            raise ValueError(f"duplicate workload id {w.id!r} in inventory")
        seen.add(w.id)
        if w.quarantined:
            continue
        inputs = mapper.inputs(w)
        key = key_of.get(inputs)
        if key is None:
            labels = mapper.resolve(w).labels
            key = key_of[inputs] = label_key(labels)
            if key not in groups:
                groups[key] = []
                labels_of[key] = labels
        groups[key].append(w.id)
    return _group_matrix(policy, groups, labels_of, include_staged)


def _group_matrix(
    policy: Policy, groups: dict[LabelKey, list[str]], labels_of: dict[LabelKey, dict[str, str]], include_staged: bool
) -> Matrix:
    # groups get slots in a label index, so a rule's selectors are evaluated once over bitsets
    # and only the groups they match are visited; a group pair is the int c * n + p and what
    # allows (or override-denies) it a bitmask of rule positions, so the per-pair work is one
    # dict update per matching rule and each distinct rule combination is resolved once
    keys = list(labels_of)
    n = len(keys)
    index = LabelIndex()
    for slot, key in enumerate(keys):
        index.add(slot, labels_of[key])
    pins = _Pins(keys, labels_of)
    rules = policy.rules
    allow: dict[int, int] = {}
    overrides: list[int] = []
    for pos, rule in enumerate(rules):
        if rule.staged and not include_staged:
            continue
        if rule.action is Action.DENY or rule.consumer.selector is None or rule.provider.selector is None:
            continue
        if rule.action is Action.OVERRIDE_DENY:
            overrides.append(pos)
            continue
        bit = 1 << pos
        get = allow.get
        for code in _pair_codes(rule, n, index, pins):
            allow[code] = get(code, 0) | bit
    # override-deny only matters where something is allowed: a boundary such as non-prod ↛ prod
    # spans far more group pairs than there are allowed edges, so test the edges against it
    deny: dict[int, int] = {}
    for pos in overrides:
        rule = rules[pos]
        assert rule.consumer.selector is not None and rule.provider.selector is not None
        bit = 1 << pos
        consumers = evaluate(rule.consumer.selector, index)
        providers = evaluate(rule.provider.selector, index)
        if not consumers or not providers:
            continue
        if consumers.bit_count() * providers.bit_count() <= len(allow):
            hits: Iterable[int] = [code for code in _pair_codes(rule, n, index, pins) if code in allow]
        else:
            values = pins.values(rule.same)
            hits = [
                code
                for code in allow
                if consumers >> (code // n) & 1
                and providers >> (code % n) & 1
                and values[code // n] == values[code % n]
                and None not in values[code // n]
            ]
        for code in hits:
            deny[code] = deny.get(code, 0) | bit
    resolved: dict[tuple[int, int], tuple[list[PortRange], list[str]]] = {}
    edges: dict[tuple[LabelKey, LabelKey], Edge] = {}
    for code, allowed in allow.items():
        denied = deny.get(code, 0)
        hit = resolved.get((allowed, denied))
        if hit is None:
            hit = resolved[(allowed, denied)] = _edge_content(rules, allowed, denied)
        services, rule_ids = hit
        if services:
            src, dst = keys[code // n], keys[code % n]
            edges[(src, dst)] = Edge(src, dst, services, rule_ids)  # shared: fewer objects for the GC
    return Matrix(groups, edges)


def _edge_content(rules: list[CompiledRule], allowed: int, denied: int) -> tuple[list[PortRange], list[str]]:
    """(remaining services, allowing rule ids in policy order) of a pair allowed and denied by these rules."""
    services = [s for pos in iter_bits(allowed) for s in rules[pos].services]
    rule_ids = [rules[pos].id for pos in iter_bits(allowed)]
    if denied:
        services = subtract(services, [s for pos in iter_bits(denied) for s in rules[pos].services])
    return normalise(services), rule_ids


class _Pins:
    """Per ``same:`` dimensions, each group slot's values of them (computed once per distinct ``same``)."""

    __slots__ = ("_by_same", "_keys", "_labels_of")

    def __init__(self, keys: list[LabelKey], labels_of: Mapping[LabelKey, dict[str, str]]) -> None:
        self._keys = keys
        self._labels_of = labels_of
        self._by_same: dict[tuple[str, ...], list[tuple[str | None, ...]]] = {}

    def values(self, same: tuple[str, ...]) -> list[tuple[str | None, ...]]:
        out = self._by_same.get(same)
        if out is None:
            out = self._by_same[same] = [tuple(self._labels_of[k].get(d) for d in same) for k in self._keys]
        return out


def _pair_codes(rule: CompiledRule, n: int, index: LabelIndex, pins: _Pins) -> list[int]:
    """Group pairs (``consumer * n + provider``) the rule's selectors and ``same:`` pins match."""
    assert rule.consumer.selector is not None and rule.provider.selector is not None
    provider_bits = evaluate(rule.provider.selector, index)
    if not provider_bits:
        return []
    consumer_bits = evaluate(rule.consumer.selector, index)
    if not consumer_bits:
        return []
    if not rule.same:
        providers = list(iter_bits(provider_bits))
        return [c * n + p for c in iter_bits(consumer_bits) for p in providers]
    values = pins.values(rule.same)
    by_pin: dict[tuple[str | None, ...], list[int]] = defaultdict(list)
    for p in iter_bits(provider_bits):
        if None not in values[p]:  # a missing value is shared with nobody
            by_pin[values[p]].append(p)
    out: list[int] = []
    for c in iter_bits(consumer_bits):
        matched = by_pin.get(values[c])
        if matched:
            base = c * n
            out.extend([base + p for p in matched])
    return out


def group_name(key: LabelKey) -> str:
    return ",".join(f"{d}={v}" for d, v in key) or "(no labels)"
