"""The estate's allowed-connectivity matrix, at group level (and workload level on demand).

Workloads with identical labels behave identically under label policy, so the matrix is
computed over *groups*. Per allow rule, consumer and provider groups are bucketed by the values
its ``same:`` pins, so only pairs that can match are visited; the ports that override-deny rules
cover are then subtracted. Plain deny rules never remove an allow (allow beats deny).

Rules with an IP-list side decide by address, as the dataplane and ``explain`` do: a rule
``from: role == web → to: {ip_list: any}`` allows web's outbound to every workload whose address
is in the list, ``from: {ip_list: corp} → to: role == db`` allows db's inbound from every
workload with an address in ``corp``. A flow crosses two firewalls, so a pair is open on a
service when the source's outbound *and* the destination's inbound allow it (override-deny >
allow > deny > default deny on each side); a selector-to-selector rule speaks for both sides at
once. A packet carries one address of each end, so the sides are decided per (source address,
destination address) pair of one family, and a workload pair is open on a service when some
such address pair is. Workloads without an address pair of one family are judged as wholes (an
IP list matches a workload when it holds any of its addresses), as ``explain`` does. Groups are
therefore label sets, split where the IP lists that rules name hold the addresses of some
members and not of others (the split is named in the group: ``@addresses=v4:corp+any``).

Fail-safes (admin ranges, DNS resolvers, the control plane) and modes are not in the matrix: it
is the policy verdict, every side as if enforced (``explain``'s ``policy_verdict``).

Two entry points build the same matrix: :func:`compute_inventory` from inventory records
(labels resolved here; no bundles, rule entries or address sets are built, which is what makes
it fast), and :func:`compute` from an engine's compiled workload states (after incremental
changes). The matrix stays at group level; :meth:`Matrix.workload_pairs` expands it lazily.
"""

from __future__ import annotations

import bisect
import itertools
import json
from collections import defaultdict
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

from ringfence import addresses
from ringfence.addresses import Address
from ringfence.engine.index import LabelIndex, iter_bits
from ringfence.model import Action, Workload
from ringfence.policy import CompiledRule, Peer, Policy
from ringfence.selectors import evaluate
from ringfence.services import PortRange
from ringfence.textsafe import line

if TYPE_CHECKING:  # the compiler (bundles, sets) is not needed to compute the matrix from an inventory
    from ringfence.engine.compiler import WorkloadState

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


Member = tuple[str, dict[str, str], tuple[Address, ...]]  # workload id, labels, addresses

ADDRESSES = "@addresses"
"""The pseudo-dimension naming a group's address classes when IP lists split a label set (never a
dimension name: those match ``[a-z][a-z0-9_]*``)."""


def compute(policy: Policy, workloads: Iterable[WorkloadState], include_staged: bool = False) -> Matrix:
    """The matrix over compiled workload states (an :class:`~ringfence.engine.Engine`'s, after changes)."""
    members = [(ws.id, ws.labels, ws.addrs) for ws in workloads if not ws.quarantined]
    return _matrix(policy, members, include_staged)


def compute_inventory(policy: Policy, inventory: Iterable[Workload], include_staged: bool = False) -> Matrix:
    """The matrix straight from inventory records, without compiling bundles (no ``Engine.load``).

    Labels are resolved once per distinct set of label inputs (tags, direct labels, derivation
    sources): workloads of one app tier share them, so most records cost a dictionary lookup.
    Addresses are parsed only when some rule has an IP-list side.
    """
    mapper = policy.labels
    by_inputs: dict[tuple[object, ...], dict[str, str]] = {}
    parse = _address_parser(policy, include_staged)
    members: list[Member] = []
    seen: set[str] = set()
    for w in inventory:
        if w.id in seen:
            raise ValueError(f"duplicate workload id {w.id!r} in inventory")
        seen.add(w.id)
        if w.quarantined:
            continue
        inputs = mapper.inputs(w)
        labels = by_inputs.get(inputs)
        if labels is None:
            labels = by_inputs[inputs] = mapper.resolve(w).labels
        members.append((w.id, labels, parse(w.ips)))
    return _matrix(policy, members, include_staged)


def _live(rule: CompiledRule, include_staged: bool) -> bool:
    return include_staged or not rule.staged


def _address_parser(policy: Policy, include_staged: bool) -> Callable[[list[str]], tuple[Address, ...]]:
    if not any(
        _live(r, include_staged) and (r.consumer.selector is None) != (r.provider.selector is None)
        for r in policy.rules
    ):
        return lambda ips: ()  # label rules only: addresses decide nothing
    return lambda ips: tuple(sorted({_parse_address(ip) for ip in ips}))


def _parse_address(text: str) -> Address:
    family, value, length = addresses.parse_prefix(text)  # dotted quads without ipaddress objects
    if length != (32 if family == addresses.V4 else 128):
        raise ValueError(f"not an address: {text!r}")
    return (family, value)


class _IpLists:
    """The IP lists that rules name on their IP side, numbered, and which of them hold an address."""

    __slots__ = ("_number", "_spans", "names")

    def __init__(self) -> None:
        self.names: list[str] = []
        self._number: dict[str, int] = {}
        self._spans: list[dict[int, tuple[list[int], list[int]]]] = []

    def number(self, peer: Peer) -> int:
        name = peer.ip_list or peer.text
        i = self._number.get(name)
        if i is None:
            i = self._number[name] = len(self.names)
            self.names.append(name)
            spans: dict[int, tuple[list[int], list[int]]] = {}
            for family in (addresses.V4, addresses.V6):
                bits = 32 if family == addresses.V4 else 128
                ranges = sorted((net, net + (1 << (bits - ln)) - 1) for f, net, ln in peer.prefixes if f == family)
                merged: list[list[int]] = []
                for lo, hi in ranges:
                    if merged and lo <= merged[-1][1] + 1:
                        merged[-1][1] = max(merged[-1][1], hi)
                    else:
                        merged.append([lo, hi])
                spans[family] = ([lo for lo, _ in merged], [hi for _, hi in merged])
            self._spans.append(spans)
        return i

    def holding(self, addr: Address) -> int:
        """Bitmask of the lists that hold ``addr``."""
        mask = 0
        family, value = addr
        for i, spans in enumerate(self._spans):
            los, his = spans[family]
            k = bisect.bisect_right(los, value) - 1
            if k >= 0 and value <= his[k]:
                mask |= 1 << i
        return mask

    def describe(self, mask: int) -> str:
        return "+".join(self.names[i] for i in iter_bits(mask)) or "none"


# A group's addresses as the IP lists see them: (family, lists holding the address) per address,
# and family 0 for the whole workload (lists holding any of its addresses), used when a pair has
# no address pair of one family.
AddressClasses = tuple[tuple[int, int], ...]


def _classes(addrs: tuple[Address, ...], lists: _IpLists) -> AddressClasses:
    per = {(a[0], lists.holding(a)) for a in addrs}
    whole = 0
    for _, mask in per:
        whole |= mask
    return (*sorted(per), (0, whole))


def _matrix(policy: Policy, members: list[Member], include_staged: bool) -> Matrix:
    rules = policy.rules
    lists = _IpLists()
    ip_out: list[tuple[int, int]] = []  # (rule position, list number): consumer selector → IP list
    ip_in: list[tuple[int, int]] = []  # IP list → provider selector
    for pos, rule in enumerate(rules):
        if not _live(rule, include_staged) or rule.action is Action.DENY:
            continue
        if rule.consumer.selector is not None and rule.provider.selector is None:
            ip_out.append((pos, lists.number(rule.provider)))
        elif rule.consumer.selector is None and rule.provider.selector is not None:
            ip_in.append((pos, lists.number(rule.consumer)))
    # groups: label sets, split by address classes only where the IP lists tell members apart
    by_labels: dict[LabelKey, dict[AddressClasses, list[str]]] = {}
    labels_of_key: dict[LabelKey, dict[str, str]] = {}
    for wid, labels, addrs in members:
        key = label_key(labels)
        classes = _classes(addrs, lists) if lists.names else ()
        split = by_labels.get(key)
        if split is None:
            split = by_labels[key] = {}
            labels_of_key[key] = labels
        split.setdefault(classes, []).append(wid)
    keys: list[LabelKey] = []
    classes_of: list[AddressClasses] = []
    groups: dict[LabelKey, list[str]] = {}
    labels_of: dict[LabelKey, dict[str, str]] = {}
    for key, split in by_labels.items():
        for classes, ids in split.items():
            gkey = key
            if len(split) > 1:
                text = " ".join(f"{'v4' if f == addresses.V4 else 'v6'}:{lists.describe(m)}" for f, m in classes if f)
                gkey = (*key, (ADDRESSES, text or "none"))
            keys.append(gkey)
            classes_of.append(classes)
            groups[gkey] = ids
            labels_of[gkey] = labels_of_key[key]
    return _group_matrix(rules, keys, groups, labels_of, classes_of, lists, ip_out, ip_in, include_staged)


def _group_matrix(
    rules: list[CompiledRule],
    keys: list[LabelKey],
    groups: dict[LabelKey, list[str]],
    labels_of: dict[LabelKey, dict[str, str]],
    classes_of: list[AddressClasses],
    lists: _IpLists,
    ip_out: list[tuple[int, int]],
    ip_in: list[tuple[int, int]],
    include_staged: bool,
) -> Matrix:
    # groups get slots in a label index, so a rule's selectors are evaluated once over bitsets
    # and only the groups they match are visited; a group pair is the int c * n + p and what
    # allows (or override-denies) it a bitmask of rule positions, so the per-pair work is one
    # dict update per matching rule and each distinct rule combination is resolved once
    n = len(keys)
    index = LabelIndex()
    for slot, key in enumerate(keys):
        index.add(slot, labels_of[key])
    pins = _Pins(keys, labels_of)
    allow: dict[int, int] = {}
    overrides: list[int] = []
    for pos, rule in enumerate(rules):
        if not _live(rule, include_staged):
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
    ip = _IpSides(rules, n, index, classes_of, lists, ip_out, ip_in)
    for code in ip.candidates():
        if code not in allow:
            allow[code] = 0  # open only if IP-list rules allow both sides
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
    resolved: dict[tuple[int, int, int], tuple[list[PortRange], list[str]]] = {}
    edges: dict[tuple[LabelKey, LabelKey], Edge] = {}
    content = _Content(rules, ip.allow_mask)
    sides_id = ip.sides_id if ip.active else None
    deny_get = deny.get
    for code, allowed in allow.items():
        c, p = divmod(code, n)
        combo = (allowed, deny_get(code, 0), sides_id(c, p) if sides_id is not None else 0)
        hit = resolved.get(combo)
        if hit is None:
            hit = resolved[combo] = content.edge(allowed, combo[1], ip.sides[combo[2]])
        if hit[0]:
            src, dst = keys[c], keys[p]
            edges[(src, dst)] = Edge(src, dst, hit[0], hit[1])  # shared: fewer objects for the GC
    return Matrix(groups, edges)


class _IpSides:
    """What IP-list rules add to each side of a group pair, per address pair of one family."""

    def __init__(
        self,
        rules: list[CompiledRule],
        n: int,
        index: LabelIndex,
        classes_of: list[AddressClasses],
        lists: _IpLists,
        ip_out: list[tuple[int, int]],
        ip_in: list[tuple[int, int]],
    ) -> None:
        self.active = bool(ip_out or ip_in)
        self._n = n
        self._classes_of = classes_of
        self.allow_mask = 0
        self._out_of_slot = [0] * n  # IP-out rules whose consumer selector matches the slot
        self._in_of_slot = [0] * n
        self._out_of_list = [0] * len(lists.names)  # IP-out rules naming the list
        self._in_of_list = [0] * len(lists.names)
        # allowing rules only, per list: their owners (for candidate pairs)
        self._out_owners = [0] * len(lists.names)
        self._in_owners = [0] * len(lists.names)
        for table, of_slot, of_list, owners, own in (
            (ip_out, self._out_of_slot, self._out_of_list, self._out_owners, "consumer"),
            (ip_in, self._in_of_slot, self._in_of_list, self._in_owners, "provider"),
        ):
            for pos, number in table:
                rule = rules[pos]
                selector = getattr(rule, own).selector
                assert selector is not None
                bit = 1 << pos
                slots = evaluate(selector, index)
                for slot in iter_bits(slots):
                    of_slot[slot] |= bit
                of_list[number] |= bit
                if rule.action is Action.ALLOW:
                    self.allow_mask |= bit
                    owners[number] |= slots
        # slots with an address (or, as a whole, the workload) in each list
        self._holding = [0] * len(lists.names)
        for slot, classes in enumerate(classes_of):
            for _, mask in classes:
                for number in iter_bits(mask):
                    self._holding[number] |= 1 << slot
        self._by_classes: dict[tuple[int, int], tuple[tuple[int, int], ...]] = {}
        self._class_ids: dict[AddressClasses, int] = {}
        self._class_id = [self._class_ids.setdefault(c, len(self._class_ids)) for c in classes_of]
        self._rules_of_mask: dict[tuple[int, int], int] = {}
        # a pair's sides depend on the source's (address classes, IP-out rules) and the
        # destination's (address classes, IP-in rules): few distinct values, numbered per slot
        c_keys: dict[tuple[int, int], int] = {}
        p_keys: dict[tuple[int, int], int] = {}
        self._c_key = [c_keys.setdefault((self._class_id[s], self._out_of_slot[s]), len(c_keys)) for s in range(n)]
        self._p_key = [p_keys.setdefault((self._class_id[s], self._in_of_slot[s]), len(p_keys)) for s in range(n)]
        self._k = max(len(p_keys), 1)
        self._sides_of_key: dict[int, int] = {}
        self._sides_number: dict[tuple[tuple[int, int], ...], int] = {(): 0}
        self.sides: list[tuple[tuple[int, int], ...]] = [()]

    def candidates(self) -> Iterable[int]:
        """Group pairs that IP-list rules may open on both sides (a superset)."""
        n = self._n
        seen: set[int] = set()
        for l1, consumers_any in enumerate(self._out_owners):
            if not consumers_any:
                continue
            for l2, providers_any in enumerate(self._in_owners):
                if not providers_any:
                    continue
                consumers = consumers_any & self._holding[l2]
                providers = providers_any & self._holding[l1]
                if not consumers or not providers:
                    continue
                prov = list(iter_bits(providers))
                for c in iter_bits(consumers):
                    base = c * n
                    seen.update([base + p for p in prov])
        return seen

    def _rules(self, of_list: list[int], mask: int, which: int) -> int:
        key = (which, mask)
        out = self._rules_of_mask.get(key)
        if out is None:
            out = 0
            for number in iter_bits(mask):
                out |= of_list[number]
            self._rules_of_mask[key] = out
        return out

    def sides_id(self, c: int, p: int) -> int:
        """The number, in :attr:`sides`, of what IP-list rules add to the pair's two sides."""
        k = self._c_key[c] * self._k + self._p_key[p]
        out = self._sides_of_key.get(k)
        if out is None:
            found = self._sides(c, p)
            out = self._sides_number.get(found)
            if out is None:
                out = self._sides_number[found] = len(self.sides)
                self.sides.append(found)
            self._sides_of_key[k] = out
        return out

    def _sides(self, c: int, p: int) -> tuple[tuple[int, int], ...]:
        """Per address pair of one family: (IP-list rules on the source's outbound, on the
        destination's inbound) that match it."""
        pairs = self._by_classes.get((self._class_id[c], self._class_id[p]))
        if pairs is None:
            cc, pc = self._classes_of[c], self._classes_of[p]
            found = [(cm, pm) for cf, cm in cc for pf, pm in pc if cf == pf and cf]
            if not found:  # as explain: an end without addresses is judged whole against each address
                c_whole, p_whole = cc[-1][1] if cc else 0, pc[-1][1] if pc else 0
                c_addrs, p_addrs = [m for f, m in cc if f], [m for f, m in pc if f]
                if c_addrs and not p_addrs:
                    found = [(cm, p_whole) for cm in c_addrs]
                elif p_addrs and not c_addrs:
                    found = [(c_whole, pm) for pm in p_addrs]
                else:
                    found = [(c_whole, p_whole)]
            pairs = self._by_classes[(self._class_id[c], self._class_id[p])] = tuple(found)
        out_c, in_p = self._out_of_slot[c], self._in_of_slot[p]
        if not out_c and not in_p:
            return ()
        return tuple(
            {
                (out_c & self._rules(self._out_of_list, pm, 0), in_p & self._rules(self._in_of_list, cm, 1))
                for cm, pm in pairs
            }
        )


class _Atoms:
    """The port space cut at every boundary a rule's services draw, so a set of services is an int
    over the pieces: union, override-deny and the meeting of two sides are bit operations."""

    def __init__(self, rules: list[CompiledRule]) -> None:
        cuts: dict[str, set[int]] = {p: {0, hi + 1} for p, hi in _PROTO_LIMIT.items()}
        for rule in rules:
            for s in rule.services:
                if s.proto != "any":
                    cuts[s.proto].update((s.lo, s.hi + 1))
        self._first: dict[str, int] = {}  # proto → its first piece's bit
        self._starts: dict[str, list[int]] = {}
        self._pieces: list[tuple[str, int, int]] = []
        for proto in sorted(cuts):  # normalise's order
            bounds = sorted(cuts[proto])
            self._first[proto] = len(self._pieces)
            self._starts[proto] = bounds[:-1]
            self._pieces.extend((proto, lo, nxt - 1) for lo, nxt in itertools.pairwise(bounds))
        self.full = (1 << len(self._pieces)) - 1
        self._of_rule: dict[int, int] = {}
        self._ranges: dict[int, list[PortRange]] = {}

    def of(self, r: PortRange) -> int:
        if r.proto == "any":
            return self.full
        starts = self._starts[r.proto]
        i = bisect.bisect_left(starts, r.lo)
        j = bisect.bisect_right(starts, r.hi)
        return ((1 << (j - i)) - 1) << (self._first[r.proto] + i)

    def of_rule(self, pos: int, rule: CompiledRule) -> int:
        out = self._of_rule.get(pos)
        if out is None:
            out = 0
            for s in rule.services:
                out |= self.of(s)
            self._of_rule[pos] = out
        return out

    def ranges(self, mask: int) -> list[PortRange]:
        """Sorted, merged ranges (``any`` for everything), as :func:`normalise` gives them."""
        out = self._ranges.get(mask)
        if out is None:
            if mask == self.full:
                out = [PortRange("any")]
            else:
                out = []
                last: tuple[str, int, int] | None = None
                for i in iter_bits(mask):
                    proto, lo, hi = self._pieces[i]
                    if last is not None and last[0] == proto and last[2] + 1 == lo:
                        last = (proto, last[1], hi)
                        continue
                    if last is not None:
                        out.append(PortRange(*last))
                    last = (proto, lo, hi)
                if last is not None:
                    out.append(PortRange(*last))
            self._ranges[mask] = out
        return out


class _Content:
    """Services and allowing rules of one combination of matching rules."""

    def __init__(self, rules: list[CompiledRule], ip_allow: int) -> None:
        self._rules = rules
        self._ip_allow = ip_allow
        self._atoms = _Atoms(rules)
        self._by_mask: dict[int, int] = {}

    def _services(self, mask: int) -> int:
        out = self._by_mask.get(mask)
        if out is None:
            out = 0
            for pos in iter_bits(mask):
                out |= self._atoms.of_rule(pos, self._rules[pos])
            self._by_mask[mask] = out
        return out

    def _side(self, allowed: int, denied: int) -> int:
        """What one firewall lets through: allowed services minus override-denied ones."""
        if not allowed:
            return 0
        return self._services(allowed) & ~self._services(denied) if denied else self._services(allowed)

    def edge(self, allowed: int, denied: int, sides: tuple[tuple[int, int], ...]) -> tuple[list[PortRange], list[str]]:
        """(remaining services, allowing rule ids in policy order) of a group pair."""
        if not sides:
            services = self._atoms.ranges(self._side(allowed, denied))
            return services, [self._rules[pos].id for pos in iter_bits(allowed)]
        atoms = 0
        used = allowed
        ip_allow = self._ip_allow
        for out_rules, in_rules in sides:
            out = self._side(allowed | (out_rules & ip_allow), denied | (out_rules & ~ip_allow))
            both = out & self._side(allowed | (in_rules & ip_allow), denied | (in_rules & ~ip_allow)) if out else 0
            if both:
                atoms |= both
                used |= (out_rules | in_rules) & ip_allow
        if not atoms:
            return [], []
        return self._atoms.ranges(atoms), [self._rules[pos].id for pos in iter_bits(used)]


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


# --- output: rules and their combinations listed once, rows refer to them; written as it goes ---


def _tables(matrix: Matrix) -> tuple[list[LabelKey], dict[LabelKey, int], list[str], dict[int, int], list[list[int]]]:
    """Groups by name, each edge's allowing-rule list numbered once (edges share the lists)."""
    names = sorted(matrix.groups, key=group_name)
    number = {key: i for i, key in enumerate(names)}
    rule_ids: dict[str, int] = {}
    rule_set_of: dict[int, int] = {}  # id() of an edge's shared rule list → its number
    numbered: dict[tuple[str, ...], int] = {}
    rule_sets: list[list[int]] = []
    for edge in matrix.edges.values():
        if id(edge.rules) not in rule_set_of:
            content = tuple(edge.rules)
            k = numbered.get(content)
            if k is None:
                k = numbered[content] = len(rule_sets)
                rule_sets.append([rule_ids.setdefault(r, len(rule_ids)) for r in content])
            rule_set_of[id(edge.rules)] = k
    return names, number, list(rule_ids), rule_set_of, rule_sets


def _sorted_edges(matrix: Matrix, number: dict[LabelKey, int]) -> list[Edge]:
    n = len(number)
    by_id = {id(k): i for k, i in number.items()}  # edges hold the groups' own key objects: no tuple hashing
    return sorted(matrix.edges.values(), key=lambda e: by_id[id(e.source)] * n + by_id[id(e.destination)])


def write_json(matrix: Matrix, policy: Policy, write: Callable[[str], object], workloads: bool = False) -> None:
    """The matrix as one JSON document, written piece by piece (docs/policy.md, *Connectivity output*)."""
    names, number, rule_ids, rule_set_of, rule_sets = _tables(matrix)
    location: dict[str, str] = {}
    for r in policy.rules:
        location.setdefault(r.id, str(r.location))
    dumps = json.dumps
    write('{"format": 2, "level": ' + dumps("workloads" if workloads else "groups") + ',\n"rules": [')
    write(",".join(dumps({"id": r, "location": location.get(r)}) for r in rule_ids))
    write('],\n"rule_sets": [')
    write(",".join(dumps(s) for s in rule_sets))
    write('],\n"groups": [')
    for i, key in enumerate(names):
        labels = {d: v for d, v in key if d != ADDRESSES}
        row: dict[str, object] = {"name": group_name(key), "labels": labels}
        row["workloads"] = sorted(matrix.groups[key]) if workloads else len(matrix.groups[key])
        write(("," if i else "") + "\n" + dumps(row))
    edges = _sorted_edges(matrix, number)
    tails: dict[tuple[int, int], str] = {}  # edges share their lists: each (services, rules) written once

    def tail(e: Edge) -> str:
        k = (id(e.services), id(e.rules))
        out = tails.get(k)
        if out is None:
            out = tails[k] = (
                f', "services": {dumps([str(s) for s in e.services])}, "rule_set": {rule_set_of[id(e.rules)]}}}'
            )
        return out

    if not workloads:
        write('],\n"edges": [')
        rows = [f'{{"from": {number[e.source]}, "to": {number[e.destination]}{tail(e)}' for e in edges]
        for i in range(0, len(rows), 4096):
            write(("\n" if not i else ",\n") + ",\n".join(rows[i : i + 4096]))
    else:
        write('],\n"pairs": [')
        members = {key: [dumps(w) for w in sorted(ids)] for key, ids in matrix.groups.items()}
        sep = "\n"
        for e in edges:
            end = tail(e)
            dst = members[e.destination]
            pairs = ['{"from": ' + a + ', "to": ' + b + end for a in members[e.source] for b in dst if a != b]
            if pairs:
                write(sep + ",\n".join(pairs))
                sep = ",\n"
    write(
        f'],\n"allowed_group_pairs": {len(matrix.edges)}, "allowed_workload_pairs": {matrix.allowed_pair_count()}}}\n'
    )


def write_text(matrix: Matrix, write: Callable[[str], object], workloads: bool = False) -> None:
    """One line per allowed group (or workload) pair; a pair allowed by more than three rules names
    its rule set (``R4``), and the sets are listed once at the end."""
    names, number, rule_ids, rule_set_of, rule_sets = _tables(matrix)
    # group names and ids come from tags: shown escaped, one pair per line whatever they hold
    label = [line(group_name(k)) for k in names]
    shown: dict[int, int] = {}  # rule set → its number in this output, in order of first use

    def rules_text(e: Edge) -> str:
        if len(e.rules) <= 3:
            return ", ".join(e.rules)
        k = shown.setdefault(rule_set_of[id(e.rules)], len(shown))
        return f"R{k}: {len(e.rules)} rules"

    rows = 0
    for e in _sorted_edges(matrix, number):
        tail = f": {', '.join(str(s) for s in e.services)}   [{rules_text(e)}]\n"
        if not workloads:
            write(f"{label[number[e.source]]}  →  {label[number[e.destination]]}{tail}")
            rows += 1
            continue
        dst = sorted(matrix.groups[e.destination])
        lines = [f"{line(a)}  →  {line(b)}{tail}" for a in sorted(matrix.groups[e.source]) for b in dst if a != b]
        rows += len(lines)
        write("".join(lines))
    for rule_set, k in shown.items():
        write(f"R{k} = {', '.join(rule_ids[r] for r in rule_sets[rule_set])}\n")
    what = "workload pairs" if workloads else "group pairs"
    write(f"{rows} allowed {what}, {matrix.allowed_pair_count()} workload pairs in all\n")
