"""Warnings about a policy that loads but cannot do what it says: never errors.

About the policy alone (:func:`policy_warnings`):

- ``no-ports``: a rule whose services hold no port (an empty ``services:``, a service with no ports).
- ``contradiction``: a side whose selector no workload can ever satisfy (``role == web && role ==
  db``), or consumer and provider selectors that can never share a ``same:`` dimension
  (``from: env == dev``, ``to: env == prod``, ``same: [env]``).
- ``shadowed``: an allow an override-deny covers entirely (its consumers, providers, ports and
  pinning all inside the override-deny's): no flow it allows can pass.
- ``any-account-tagger``: a ``labels.taggers`` pattern whose AWS account is a wildcard
  (``arn:aws:iam::*:role/x``): a role of that name created by any account's administrator, a
  member account's included, may approve privileged values.

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

from ringfence import selectors, yamlpos
from ringfence.labels import any_account_taggers
from ringfence.model import Action, Workload
from ringfence.policy import CompiledRule, Location, Peer, Policy
from ringfence.services import PortRange

MAX_CASES = 50_000
_OTHER = "\x00other"  # a value no selector names


@dataclass(frozen=True, slots=True)
class PolicyWarning:
    location: Location
    rule: str
    kind: str  # no-ports | contradiction | shadowed | any-account-tagger | no-workload | no-pair
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
    """The label values worth trying per dimension, for one policy.

    Selectors only test values for membership, so the values two selectors do not name behave
    alike for both: one of them (a legal one) stands for all, beside the named ones and "unset"."""

    def __init__(self, policy: Policy) -> None:
        self.legal: dict[str, frozenset[str] | None] = {}
        for dim, spec in policy.labels.dimensions.items():
            self.legal[dim] = (
                frozenset(policy.labels.canonical_value(dim, v) for v in spec.allowed)
                if spec.allowed is not None
                else None
            )
        self._match: dict[selectors.Node, selectors.Matcher] = {}
        self._dims: dict[selectors.Node, dict[str, set[str]]] = {}
        self._contains: dict[tuple[selectors.Node, selectors.Node], bool | None] = {}

    def named(self, node: selectors.Node) -> dict[str, set[str]]:
        """The dimensions ``node`` tests, each with the values it names."""
        got = self._dims.get(node)
        if got is None:
            got = {d: set() for d in _dims(node)}
            _values(node, got)
            self._dims[node] = got
        return got

    def dom(self, dim: str, named: set[str]) -> tuple[str | None, ...]:
        legal = self.legal.get(dim)
        if legal is None:
            return (None, *sorted(named), _OTHER)
        rest = sorted(legal - named)
        return (None, *sorted(named & legal), *rest[:1])

    def match(self, node: selectors.Node) -> selectors.Matcher:
        m = self._match.get(node)
        if m is None:
            m = self._match[node] = selectors.matcher(node)
        return m

    def cases(self, *nodes: selectors.Node, extra: Iterable[str] = ()) -> Iterator[dict[str, str]] | None:
        """Every assignment of the dimensions ``nodes`` test (and ``extra``); None: too many to try."""
        named: dict[str, set[str]] = {d: set() for d in extra}
        for node in nodes:
            for d, vs in self.named(node).items():
                named.setdefault(d, set()).update(vs)
        ds = sorted(named)
        doms = [self.dom(d, named[d]) for d in ds]
        n = 1
        for dom in doms:
            n *= len(dom)
        if n > MAX_CASES:
            return None
        return ({d: v for d, v in zip(ds, combo, strict=True) if v is not None} for combo in itertools.product(*doms))

    def satisfiable(self, node: selectors.Node) -> bool | None:
        cases = self.cases(node)
        if cases is None:
            return None
        m = self.match(node)
        return any(m(c) for c in cases)

    def contains(self, outer: selectors.Node, inner: selectors.Node) -> bool | None:
        """Every workload ``inner`` matches, ``outer`` matches too."""
        if isinstance(outer, selectors.All) or outer == inner:
            return True
        key = (outer, inner)
        if key in self._contains:
            return self._contains[key]
        cases = self.cases(outer, inner)
        got = None
        if cases is not None:
            mo, mi = self.match(outer), self.match(inner)
            got = all(mo(c) for c in cases if mi(c))
        self._contains[key] = got
        return got

    def pinned(self, node: selectors.Node, other: selectors.Node, same: tuple[str, ...]) -> set[tuple[str, ...]] | None:
        """The values of ``same`` a workload matching ``node`` can hold (each set: unset shares
        nothing), over the values ``other`` names too (the two sets are compared)."""
        cases = self.cases(node, other, extra=same)
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


def _tagger_warnings(policy: Policy) -> list[PolicyWarning]:
    wide = any_account_taggers(policy.labels.config.taggers)
    if not wide:
        return []
    where = Location("labels", 0, 0)
    for file, text in policy.sources.items():  # the file that holds them (one: a policy error else)
        if "taggers" not in text:
            continue
        try:
            located = yamlpos.load(text)
            taggers = located.data["labels"]["taggers"]
        except (yamlpos.YamlError, KeyError, TypeError):
            continue
        if isinstance(taggers, list):
            pos = located.position(("labels", "taggers", taggers.index(wide[0]) if wide[0] in taggers else 0))
            where = Location(file, pos.line, pos.column)
            break
    return [
        PolicyWarning(
            where,
            "",
            "any-account-tagger",
            f"tagger {p!r} names any AWS account: a role of that name created by any account's administrator "
            "(a member account's too) may approve privileged values; name the account that owns the tagging role",
        )
        for p in wide
    ]


def policy_warnings(policy: Policy) -> list[PolicyWarning]:
    space = _Space(policy)
    out: list[PolicyWarning] = _tagger_warnings(policy)
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
            cons = space.pinned(r.consumer.selector, r.provider.selector, r.same)
            prov = space.pinned(r.provider.selector, r.consumer.selector, r.same)
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


class _Estate(selectors.BitsetIndex):
    """The estate's distinct label sets as bit slots, for evaluating selectors over all at once."""

    def __init__(self, label_sets: list[Mapping[str, str]]) -> None:
        self.sets = label_sets
        self._all = (1 << len(label_sets)) - 1
        self._members: dict[tuple[str, str], int] = {}
        self._having: dict[str, int] = {}
        for i, labels in enumerate(label_sets):
            bit = 1 << i
            for d, v in labels.items():
                self._members[(d, v)] = self._members.get((d, v), 0) | bit
                self._having[d] = self._having.get(d, 0) | bit
        self._keys: dict[tuple[str, ...], list[int]] = {}

    def universe(self) -> int:
        return self._all

    def members(self, dim: str, value: str) -> int:
        return self._members.get((dim, value), 0)

    def having(self, dim: str) -> int:
        return self._having.get(dim, 0)

    def share_groups(self, same: tuple[str, ...]) -> list[int]:
        """The label sets per value of ``same`` (those lacking one share nothing: left out)."""
        got = self._keys.get(same)
        if got is None:
            by: dict[tuple[str, ...], int] = {}
            for i, labels in enumerate(self.sets):
                if all(d in labels for d in same):
                    key = tuple(labels[d] for d in same)
                    by[key] = by.get(key, 0) | (1 << i)
            got = self._keys[same] = list(by.values())
        return got


def estate_warnings(
    policy: Policy, workloads: Iterable[Workload], known: list[PolicyWarning] | None = None
) -> list[PolicyWarning]:
    """What the estate makes moot: selectors matching no workload, rules that pair none
    (``known``: :func:`policy_warnings`, if already computed; rules they name are not checked)."""
    label_sets: dict[tuple[tuple[str, str], ...], Mapping[str, str]] = {}
    count = 0
    for w in workloads:
        count += 1
        labels = policy.labels.resolve(w).labels
        label_sets.setdefault(tuple(sorted(labels.items())), labels)
    estate = _Estate(list(label_sets.values()))
    out: list[PolicyWarning] = []
    skip = {w.rule for w in (policy_warnings(policy) if known is None else known) if w.kind != "shadowed"}
    hits: dict[selectors.Node, int] = {}
    for r in policy.rules:
        if r.id in skip:
            continue
        matched: dict[str, int] = {}
        for peer in (r.consumer, r.provider):
            if peer.selector is None:
                continue
            bits = hits.get(peer.selector)
            if bits is None:
                bits = hits[peer.selector] = selectors.evaluate(peer.selector, estate)
            matched[_side(r, peer)] = bits
            if not bits:
                out.append(
                    PolicyWarning(
                        r.location,
                        r.id,
                        "no-workload",
                        f"rule {r.id}: `{_side(r, peer)}` selector {peer.describe()} matches no workload of the "
                        f"estate ({count} workloads)",
                    )
                )
        cons, prov = matched.get("from", 0), matched.get("to", 0)
        if r.same and cons and prov and not any(g & cons and g & prov for g in estate.share_groups(r.same)):
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
        out = out + estate_warnings(policy, workloads, out)
    return sorted(out, key=lambda w: (w.location.file, w.location.line, w.location.column, w.rule, w.kind))
