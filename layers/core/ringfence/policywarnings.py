"""Warnings about a policy that loads but cannot do what it says: never errors.

About the policy alone (:func:`policy_warnings`):

- ``no-ports``: a rule whose services hold no port (an empty ``services:``, a service with no ports).
- ``contradiction``: a side whose selector no workload can ever satisfy (``role == web && role ==
  db``), or consumer and provider selectors that can never share a ``same:`` dimension
  (``from: env == dev``, ``to: env == prod``, ``same: [env]``).
- ``shadowed``: an allow an override-deny covers entirely (its consumers, providers, ports and
  pinning all inside the override-deny's): no flow it allows can pass.

About the policy over an estate (:func:`estate_warnings`): the estate moves, so these are
re-checked when it does (``ringfence labels check``):

- ``no-workload``: a rule side whose selector matches no workload of the estate.
- ``no-pair``: both sides match workloads, but no consumer shares the ``same:`` dimensions with a
  provider, so the rule instantiates nowhere.

Selector questions (can it match? does one contain another?) are decided exactly by enumerating
the values of the dimensions the selectors name: a dimension's ``allowed`` values (or the values
selectors mention, plus one value none mentions) and "unset". Past :data:`MAX_CASES` cases a
question is left undecided and nothing is reported (a warning is never a guess).
"""

from __future__ import annotations

import itertools
from collections.abc import Iterable, Iterator, Mapping
from dataclasses import dataclass

from ringfence import selectors
from ringfence.model import Action, Workload
from ringfence.policy import CompiledRule, Location, Peer, Policy
from ringfence.services import PortRange

MAX_CASES = 50_000
_OTHER = "\x00other"  # a value no selector names


@dataclass(frozen=True, slots=True)
class PolicyWarning:
    location: Location
    rule: str
    kind: str  # no-ports | contradiction | shadowed | no-workload | no-pair
    message: str

    def __str__(self) -> str:
        return f"{self.location}: warning: {self.message}"

    def doc(self) -> dict[str, str]:
        return {"location": str(self.location), "rule": self.rule, "kind": self.kind, "message": self.message}


def _dims(node: selectors.Node) -> set[str]:
    if isinstance(node, selectors.Has | selectors.In):
        return {node.dim}
    if isinstance(node, selectors.Not):
        return _dims(node.inner)
    if isinstance(node, selectors.And | selectors.Or):
        return {d for p in node.parts for d in _dims(p)}
    return set()


def _values(node: selectors.Node, out: dict[str, set[str]]) -> None:
    if isinstance(node, selectors.In):
        out.setdefault(node.dim, set()).update(node.values)
    elif isinstance(node, selectors.Not):
        _values(node.inner, out)
    elif isinstance(node, selectors.And | selectors.Or):
        for p in node.parts:
            _values(p, out)


class _Space:
    """The label values worth trying per dimension, for one policy."""

    def __init__(self, policy: Policy) -> None:
        mentioned: dict[str, set[str]] = {}
        for r in policy.rules:
            for peer in (r.consumer, r.provider):
                if peer.selector is not None:
                    _values(peer.selector, mentioned)
        self.domain: dict[str, tuple[str | None, ...]] = {}
        for dim, spec in policy.labels.dimensions.items():
            if spec.allowed is not None:
                vals = {policy.labels.canonical_value(dim, v) for v in spec.allowed}
            else:
                vals = mentioned.get(dim, set()) | {_OTHER}
            self.domain[dim] = (None, *sorted(vals))
        self._match: dict[selectors.Node, selectors.Matcher] = {}

    def dom(self, dim: str) -> tuple[str | None, ...]:
        return self.domain.get(dim, (None, _OTHER))

    def match(self, node: selectors.Node) -> selectors.Matcher:
        m = self._match.get(node)
        if m is None:
            m = self._match[node] = selectors.matcher(node)
        return m

    def cases(self, dims: Iterable[str]) -> Iterator[dict[str, str]] | None:
        """Every assignment of ``dims`` (None: too many to try)."""
        ds = sorted(set(dims))
        n = 1
        for d in ds:
            n *= len(self.dom(d))
        if n > MAX_CASES:
            return None
        return (
            {d: v for d, v in zip(ds, combo, strict=True) if v is not None}
            for combo in itertools.product(*(self.dom(d) for d in ds))
        )

    def satisfiable(self, node: selectors.Node) -> bool | None:
        cases = self.cases(_dims(node))
        if cases is None:
            return None
        m = self.match(node)
        return any(m(c) for c in cases)

    def contains(self, outer: selectors.Node, inner: selectors.Node) -> bool | None:
        """Every workload ``inner`` matches, ``outer`` matches too."""
        if isinstance(outer, selectors.All) or outer == inner:
            return True
        cases = self.cases(_dims(outer) | _dims(inner))
        if cases is None:
            return None
        mo, mi = self.match(outer), self.match(inner)
        return all(mo(c) for c in cases if mi(c))

    def pinned(self, node: selectors.Node, same: tuple[str, ...]) -> set[tuple[str, ...]] | None:
        """The values of ``same`` a workload matching ``node`` can hold (each set: unset shares nothing)."""
        cases = self.cases(_dims(node) | set(same))
        if cases is None:
            return None
        m = self.match(node)
        return {tuple(c[d] for d in same) for c in cases if all(d in c for d in same) and m(c)}


def _ports_inside(outer: tuple[PortRange, ...], inner: tuple[PortRange, ...]) -> bool:
    def inside(r: PortRange) -> bool:
        return any(o.proto == "any" or (o.proto == r.proto and o.lo <= r.lo and r.hi <= o.hi) for o in outer)

    return all(inside(r) for r in inner)


def _peer_inside(space: _Space, outer: Peer, inner: Peer) -> bool:
    if outer.selector is not None and inner.selector is not None:
        return bool(space.contains(outer.selector, inner.selector))
    if outer.selector is None and inner.selector is None:
        return outer.prefixes == inner.prefixes
    return False


def _side(rule: CompiledRule, peer: Peer) -> str:
    return "from" if peer is rule.consumer else "to"


def policy_warnings(policy: Policy) -> list[PolicyWarning]:
    space = _Space(policy)
    out: list[PolicyWarning] = []
    overrides = [r for r in policy.rules if r.action is Action.OVERRIDE_DENY and not r.staged]
    for r in policy.rules:
        if not r.services:
            out.append(PolicyWarning(r.location, r.id, "no-ports", f"rule {r.id} names no port: it can never match"))
            continue
        dead = False
        for peer in (r.consumer, r.provider):
            if peer.selector is not None and space.satisfiable(peer.selector) is False:
                out.append(
                    PolicyWarning(
                        r.location,
                        r.id,
                        "contradiction",
                        f"rule {r.id}: `{_side(r, peer)}` selector {peer.describe()} can never match any workload",
                    )
                )
                dead = True
        if dead:
            continue
        if r.same and r.consumer.selector is not None and r.provider.selector is not None:
            cons = space.pinned(r.consumer.selector, r.same)
            prov = space.pinned(r.provider.selector, r.same)
            if cons is not None and prov is not None and not (cons & prov):
                out.append(
                    PolicyWarning(
                        r.location,
                        r.id,
                        "contradiction",
                        f"rule {r.id}: `from` ({r.consumer.describe()}) and `to` ({r.provider.describe()}) can never "
                        f"share {', '.join(r.same)} (same:): it can never match",
                    )
                )
                continue
        if r.action is not Action.ALLOW:
            continue
        for o in overrides:
            if (
                set(o.same) <= set(r.same)
                and _ports_inside(o.services, r.services)
                and _peer_inside(space, o.consumer, r.consumer)
                and _peer_inside(space, o.provider, r.provider)
            ):
                out.append(
                    PolicyWarning(
                        r.location,
                        r.id,
                        "shadowed",
                        f"rule {r.id} can never allow anything: override-deny {o.id} ({o.location}) covers it entirely",
                    )
                )
                break
    return out


def estate_warnings(policy: Policy, workloads: Iterable[Workload]) -> list[PolicyWarning]:
    """What the estate makes moot: selectors matching no workload, rules that pair none."""
    label_sets: dict[tuple[tuple[str, str], ...], Mapping[str, str]] = {}
    count = 0
    for w in workloads:
        count += 1
        labels = policy.labels.resolve(w).labels
        label_sets.setdefault(tuple(sorted(labels.items())), labels)
    estate = list(label_sets.values())
    space = _Space(policy)
    out: list[PolicyWarning] = []
    skip = {(w.rule, w.kind) for w in policy_warnings(policy)}
    for r in policy.rules:
        if (r.id, "contradiction") in skip or (r.id, "no-ports") in skip:
            continue
        matched: dict[str, list[Mapping[str, str]]] = {}
        for peer in (r.consumer, r.provider):
            if peer.selector is None:
                continue
            m = space.match(peer.selector)
            hits = matched[_side(r, peer)] = [ls for ls in estate if m(ls)]
            if not hits:
                out.append(
                    PolicyWarning(
                        r.location,
                        r.id,
                        "no-workload",
                        f"rule {r.id}: `{_side(r, peer)}` selector {peer.describe()} matches no workload of the "
                        f"estate ({count} workloads)",
                    )
                )
        if r.same and matched.get("from") and matched.get("to"):
            keys = {tuple(ls.get(d) for d in r.same) for ls in matched["from"] if all(d in ls for d in r.same)}
            if not any(
                tuple(ls.get(d) for d in r.same) in keys for ls in matched["to"] if all(d in ls for d in r.same)
            ):
                out.append(
                    PolicyWarning(
                        r.location,
                        r.id,
                        "no-pair",
                        f"rule {r.id}: no workload matching `from` shares {', '.join(r.same)} with one matching `to` "
                        "in the estate: it allows nothing today",
                    )
                )
    return out


def warnings(policy: Policy, workloads: Iterable[Workload] | None = None) -> list[PolicyWarning]:
    """Every warning, by file and line; the estate's too when ``workloads`` are given."""
    out = policy_warnings(policy)
    if workloads is not None:
        out += estate_warnings(policy, workloads)
    return sorted(out, key=lambda w: (w.location.file, w.location.line, w.location.column, w.rule, w.kind))
