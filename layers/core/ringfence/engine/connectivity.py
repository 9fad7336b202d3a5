"""The estate's allowed-connectivity matrix, at label-group level (and workload level on demand).

Workloads with identical labels behave identically under label policy, so the matrix is
computed over *groups* (distinct label sets). Per allow rule, consumer and provider groups are
bucketed by the values its ``same:`` pins, so only pairs that can match are visited; the ports
that override-deny rules cover are then subtracted. Plain deny rules never remove an allow
(allow beats deny). Rules with an IP-list side do not connect workloads and are not in the
matrix; ``ringfence explain`` covers them.
"""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field

from ringfence.engine.compiler import WorkloadState
from ringfence.engine.index import LabelIndex, iter_bits
from ringfence.model import Action
from ringfence.policy import CompiledRule, Policy
from ringfence.selectors import evaluate
from ringfence.services import PortRange

LabelKey = tuple[tuple[str, str], ...]

_PROTO_LIMIT = {"tcp": 65535, "udp": 65535, "icmp": 255, "icmpv6": 255}


def label_key(labels: Mapping[str, str]) -> LabelKey:
    return tuple(sorted(labels.items()))


@dataclass(slots=True)
class Edge:
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
    groups: dict[LabelKey, list[str]] = defaultdict(list)
    labels_of: dict[LabelKey, dict[str, str]] = {}
    for ws in workloads:
        if ws.quarantined:
            continue
        key = label_key(ws.labels)
        groups[key].append(ws.id)
        labels_of[key] = ws.labels
    # groups get slots in a label index, so a rule's selectors are evaluated once over bitsets
    # and only the groups they match are visited
    keys = list(labels_of)
    index = LabelIndex()
    for slot, key in enumerate(keys):
        index.add(slot, labels_of[key])
    allow: dict[tuple[LabelKey, LabelKey], tuple[list[PortRange], list[str]]] = {}
    deny: dict[tuple[LabelKey, LabelKey], list[PortRange]] = defaultdict(list)
    overrides: list[CompiledRule] = []
    for rule in policy.rules:
        if rule.staged and not include_staged:
            continue
        if rule.action is Action.DENY or rule.consumer.selector is None or rule.provider.selector is None:
            continue
        if rule.action is Action.OVERRIDE_DENY:
            overrides.append(rule)
            continue
        for pair in _pairs(rule, keys, labels_of, index):
            services, rule_ids = allow.setdefault(pair, ([], []))
            services.extend(rule.services)
            rule_ids.append(rule.id)
    # override-deny only matters where something is allowed: a boundary such as non-prod ↛ prod
    # spans far more group pairs than there are allowed edges, so test the edges against it
    slot_of = {key: slot for slot, key in enumerate(keys)}
    for rule in overrides:
        assert rule.consumer.selector is not None and rule.provider.selector is not None
        consumers = set(iter_bits(evaluate(rule.consumer.selector, index)))
        providers = set(iter_bits(evaluate(rule.provider.selector, index)))
        if len(consumers) * len(providers) <= len(allow):
            pairs: Iterable[tuple[LabelKey, LabelKey]] = (p for p in _pairs(rule, keys, labels_of, index) if p in allow)
        else:
            pairs = [
                (c, p)
                for c, p in allow
                if slot_of[c] in consumers
                and slot_of[p] in providers
                and all(labels_of[c].get(d) == labels_of[p].get(d) for d in rule.same)
            ]
        for pair in pairs:
            deny[pair].extend(rule.services)
    edges: dict[tuple[LabelKey, LabelKey], Edge] = {}
    for pair, (services, rule_ids) in allow.items():
        remaining = normalise(subtract(services, deny[pair]) if pair in deny else services)
        if remaining:
            edges[pair] = Edge(pair[0], pair[1], remaining, rule_ids)
    return Matrix(dict(groups), edges)


def _pairs(
    rule: CompiledRule, keys: list[LabelKey], labels_of: Mapping[LabelKey, dict[str, str]], index: LabelIndex
) -> Iterable[tuple[LabelKey, LabelKey]]:
    assert rule.consumer.selector is not None and rule.provider.selector is not None
    provider_bits = evaluate(rule.provider.selector, index)
    if not provider_bits:
        return
    consumer_bits = evaluate(rule.consumer.selector, index)
    same = rule.same
    providers: dict[tuple[str | None, ...], list[LabelKey]] = defaultdict(list)
    for slot in iter_bits(provider_bits):
        key = keys[slot]
        labels = labels_of[key]
        providers[tuple(labels.get(d) for d in same)].append(key)
    for slot in iter_bits(consumer_bits):
        ckey = keys[slot]
        labels = labels_of[ckey]
        for pkey in providers.get(tuple(labels.get(d) for d in same), ()):
            yield ckey, pkey


def group_name(key: LabelKey) -> str:
    return ",".join(f"{d}={v}" for d, v in key) or "(no labels)"
