"""Backend-neutral enforcement plan: a verified bundle plus the local fail-safes.

Every backend renders the same :class:`Plan`, so nftables, iptables, the Windows plan and the
dry-run agree on order and meaning:

1. fail-safes (never removable by a bundle): loopback, established/related, ICMPv6 neighbour
   discovery, DHCP, DNS to the resolvers, the cloud metadata endpoint, the control plane on its
   port only (outbound: the agent's own connection), management ports from the admin ranges
   (bundle fail-safes ∪ local configuration; no prefix wider than ``FAILSAFE_WIDEST``);
2. the bundle's rules in bundle order (override-deny, allow, deny), first match wins;
3. the mode's default: drop in ``enforce``, accept (counted as would-drop) in ``observe``.

A grouped allow rule (bundle ``members``) is one :class:`PlanRule` with :attr:`PlanRule.members`.
nftables realises it with concatenated (address . service) sets whose elements
:func:`service_covers` computes while the group is small (:func:`group_load`), and expands it
into its members' rules past a bound; iptables and the Windows plan always expand it.
"""

from __future__ import annotations

import ipaddress
import itertools
import re
import socket
from collections.abc import Collection, Iterable, Mapping
from dataclasses import dataclass, field
from typing import Literal

from ringfence.bundlewire import (
    CONTROL_PLANE_PORT,
    Bundle,
    FailsafeDoc,
    ServiceMatch,
    failsafe_total_problem,
    failsafe_width_problem,
)
from ringfence.enums import Mode

Direction = Literal["inbound", "outbound"]
Proto = Literal["tcp", "udp", "icmp", "icmpv6"]

METADATA_V4 = ("169.254.169.254/32",)
METADATA_V6 = ("fd00:ec2::254/128",)
_SET_NAME = re.compile(r"[A-Za-z0-9_]{1,24}")  # fullmatch: `$` would let a trailing newline through
_PORT_SPEC = re.compile(r"^(tcp|udp)/(\d{1,5})(?:-(\d{1,5}))?$")


class PlanError(ValueError):
    """The bundle cannot be turned into firewall rules (names the offending field)."""


@dataclass(frozen=True, slots=True)
class Match:
    """One service: ``proto`` None means any protocol."""

    proto: Proto | None
    ports: tuple[int, int] | None = None
    icmp_type: int | None = None

    def describe(self) -> str:
        if self.proto is None:
            return "any"
        if self.ports is not None:
            lo, hi = self.ports
            return f"{self.proto}/{lo}" if lo == hi else f"{self.proto}/{lo}-{hi}"
        if self.icmp_type is not None:
            return f"{self.proto}/{self.icmp_type}"
        return self.proto


# What the metadata fail-safe opens to METADATA_V4/V6, and nothing else there: the instance
# metadata service is HTTP on port 80 (AWS, Azure, GCP); GCP's metadata server is also the VPC's
# DNS resolver and NTP server.
METADATA_PORTS = (Match("tcp", (80, 80)), Match("udp", (53, 53)), Match("tcp", (53, 53)), Match("udp", (123, 123)))


Span = tuple[str, int, int]
"""(protocol, low, high) a service covers: ``any`` is ("any", 0, 0), all ports 0-65535, all ICMP types 0-255."""


def match_span(m: Match) -> Span:
    if m.proto is None:
        return ("any", 0, 0)
    if m.proto in ("tcp", "udp"):
        return (m.proto, *(m.ports if m.ports is not None else (0, 65535)))
    return (m.proto, *((m.icmp_type, m.icmp_type) if m.icmp_type is not None else (0, 255)))


def span_families(span: Span) -> tuple[int, ...]:
    return (4,) if span[0] == "icmp" else (6,) if span[0] == "icmpv6" else (4, 6)


def joined_ports(services: Iterable[Match]) -> tuple[Match, ...]:
    """Services with overlapping or adjacent tcp/udp port ranges joined (each protocol's where
    it first appears). The engine cuts a member's port range into pieces at its group's range
    boundaries, for nftables' disjoint elements; backends that expand members into rules of
    their own (iptables, Windows) join the pieces back rather than pay a rule per piece."""
    ranges: dict[str, list[tuple[int, int]]] = {}
    order: list[Match | str] = []
    for m in services:
        if m.proto in ("tcp", "udp") and m.ports is not None:
            if m.proto not in ranges:
                ranges[m.proto] = []
                order.append(m.proto)
            ranges[m.proto].append(m.ports)
        else:
            order.append(m)
    out: list[Match] = []
    for item in order:
        if not isinstance(item, str):
            out.append(item)
            continue
        merged: list[tuple[int, int]] = []
        for lo, hi in sorted(ranges[item]):
            if merged and lo <= merged[-1][1] + 1:
                merged[-1] = (merged[-1][0], max(hi, merged[-1][1]))
            else:
                merged.append((lo, hi))
        out.extend(Match(item, r) for r in merged)  # type: ignore[arg-type]
    return tuple(out)


@dataclass(frozen=True, slots=True)
class PlanMember:
    """One policy rule inside a grouped rule: its peers on its services."""

    rule_id: str
    set: str | None
    services: tuple[Match, ...]


@dataclass(frozen=True, slots=True)
class PlanRule:
    direction: Direction
    index: int  # position within its direction, bundle order
    rule_id: str
    action: Literal["allow", "deny", "override-deny"]
    set: str | None  # peer set (source inbound, destination outbound); None = any address
    services: tuple[Match, ...]
    members: tuple[PlanMember, ...] = ()  # a grouped allow rule: set None, services ()

    def parts(self) -> tuple[PlanMember, ...]:
        """What this rule allows or drops, member by member (a plain rule is its only member)."""
        return self.members or (PlanMember(self.rule_id, self.set, self.services),)

    @property
    def counter(self) -> str:
        return f"r_{'in' if self.direction == 'inbound' else 'out'}_{self.index}"

    @property
    def counted_as(self) -> str:
        """What the rule's one counter counts: a grouped rule's counter counts every member, so
        it names them all (``a+b+c``), never only the first (traffic of ``core/monitoring``
        was reported under ``admin/jumpbox-ssh``, the group's first member)."""
        if not self.members:
            return self.rule_id
        return "+".join(dict.fromkeys(m.rule_id for m in self.members))

    @property
    def drops(self) -> bool:
        return self.action != "allow"


@dataclass(frozen=True, slots=True)
class Failsafes:
    admin_v4: tuple[str, ...] = ()
    admin_v6: tuple[str, ...] = ()
    admin_ports: tuple[Match, ...] = ()
    dns_v4: tuple[str, ...] = ()
    dns_v6: tuple[str, ...] = ()
    control_v4: tuple[str, ...] = ()
    control_v6: tuple[str, ...] = ()
    control_ports: tuple[Match, ...] = (Match("tcp", (CONTROL_PLANE_PORT, CONTROL_PLANE_PORT)),)
    metadata_v4: tuple[str, ...] = METADATA_V4
    metadata_v6: tuple[str, ...] = METADATA_V6
    dhcp: bool = True


@dataclass(frozen=True, slots=True)
class LocalFailsafes:
    """The agent's own configuration: merged with (never replaced by) the bundle's fail-safes.

    ``admin_ports``: ports the host's operator adds to the bundle's; none by default, so that
    the policy's ``admin_ports`` are the host's (a local default would widen every policy).
    ``control_ports``: the control plane's port(s), from the agent's URL; none: tcp/443."""

    admin_cidrs: tuple[str, ...] = ()
    admin_ports: tuple[str, ...] = ()
    dns_resolvers: tuple[str, ...] = ()
    control_plane: tuple[str, ...] = ()
    control_ports: tuple[str, ...] = ()
    metadata: bool = True
    dhcp: bool = True


@dataclass(frozen=True, slots=True)
class PlanSet:
    v4: tuple[str, ...]
    v6: tuple[str, ...]


@dataclass(slots=True)
class Plan:
    workload_id: str
    version: int
    mode: Literal["idle", "observe", "enforce"]
    quarantined: bool
    sets: dict[str, PlanSet] = field(default_factory=dict)
    rules: list[PlanRule] = field(default_factory=list)
    failsafes: Failsafes = field(default_factory=Failsafes)

    def by_direction(self, direction: Direction) -> list[PlanRule]:
        return [r for r in self.rules if r.direction == direction]

    def counter_map(self) -> dict[str, tuple[Direction, str | None, str]]:
        """counter name → (direction, rule id or None for the default, action)."""
        out: dict[str, tuple[Direction, str | None, str]] = {}
        for r in self.rules:
            out[r.counter] = (r.direction, r.counted_as, r.action)
        out["d_in"] = ("inbound", None, "default")
        out["d_out"] = ("outbound", None, "default")
        return out


def _fast_cidr(text: str) -> tuple[int, str] | None:
    """(family, text) for a CIDR already in canonical form, via the C parser; None → slow path."""
    if not text.isascii():
        return None  # the slow path names it (int() and str.isdigit() take non-ASCII digits)
    addr, sep, plen = text.partition("/")
    fam, bits = (socket.AF_INET6, 128) if ":" in addr else (socket.AF_INET, 32)
    if bits == 128 and "." in addr:
        return None  # embedded IPv4 notation: ipaddress and inet_ntop disagree on the canonical text
    try:
        packed = socket.inet_pton(fam, addr)
    except (OSError, ValueError):  # ValueError: an embedded NUL
        return None
    if sep:
        if not plen.isdigit() or len(plen) > 3 or plen != str(int(plen)):
            return None  # not a canonical decimal (e.g. a leading zero): the slow path decides
        n = int(plen)
        if n > bits or (n < bits and int.from_bytes(packed, "big") & ((1 << (bits - n)) - 1)):
            return None
    if socket.inet_ntop(fam, packed) != addr:
        return None
    return (6 if bits == 128 else 4), (text if sep else f"{addr}/{bits}")


def split_cidrs(items: list[str] | tuple[str, ...], what: str) -> tuple[tuple[str, ...], tuple[str, ...]]:
    """Normalise CIDRs/addresses into (v4, v6) lists; raise :class:`PlanError` naming ``what``.

    Canonical input (what the engine emits) takes a C fast path: 100,000 elements in ~0.1 s."""
    v4: list[str] = []
    v6: list[str] = []
    for text in items:
        fast = _fast_cidr(text)
        if fast is not None:
            (v4 if fast[0] == 4 else v6).append(fast[1])
            continue
        if not text.isascii():
            raise PlanError(f"{what}: {text!r} is not a CIDR (only ASCII digits and hex digits)")
        if "%" in text:  # ipaddress takes `fe80::1%<anything>`: a zone id is no firewall address
            raise PlanError(f"{what}: {text!r} is not a CIDR (IPv6 scope ids are not allowed)")
        try:
            net = ipaddress.ip_network(text.strip(), strict=True)
        except ValueError as exc:
            raise PlanError(f"{what}: {text!r} is not a CIDR ({exc})") from None
        (v4 if net.version == 4 else v6).append(str(net))
    return tuple(v4), tuple(v6)


def parse_port_spec(spec: str) -> Match:
    m = _PORT_SPEC.match(spec.strip())
    if m is None:
        raise PlanError(f"admin port {spec!r} must look like tcp/22 or tcp/8000-8080")
    lo = int(m.group(2))
    hi = int(m.group(3) or lo)
    if not (0 < lo <= hi <= 65535):
        raise PlanError(f"admin port {spec!r} is out of range")
    return Match(m.group(1), (lo, hi))  # type: ignore[arg-type]


def _match(s: ServiceMatch, where: str) -> Match:
    if s.ports is not None:
        lo, hi = s.ports
        if s.proto not in ("tcp", "udp"):
            raise PlanError(f"{where}: ports given for protocol {s.proto}")
        if not (0 <= lo <= hi <= 65535):
            raise PlanError(f"{where}: port range {lo}-{hi} is invalid")
    if s.icmp_type is not None and (s.proto not in ("icmp", "icmpv6") or not 0 <= s.icmp_type <= 255):
        raise PlanError(f"{where}: icmp_type {s.icmp_type} invalid for {s.proto}")
    return Match(None if s.proto == "any" else s.proto, s.ports, s.icmp_type)


# the management ports of the boot posture (no bundle yet) when the local configuration names
# none: the policy language's default admin_ports
POSTURE_ADMIN_PORTS = ("tcp/22", "tcp/3389")


def bounded_cidrs(items: list[str], what: str) -> tuple[tuple[str, ...], tuple[str, ...]]:
    """:func:`split_cidrs` for a fail-safe list: a prefix wider than ``FAILSAFE_WIDEST`` is a
    :class:`PlanError` (the policy refuses them; a bundle or a local setting must not sneak one in)."""
    v4, v6 = split_cidrs(items, what)
    for family, cidrs in ((4, v4), (6, v6)):
        for cidr in cidrs:
            why = failsafe_width_problem(family, int(cidr.partition("/")[2]))
            if why is not None:
                raise PlanError(f"{what}: {cidr}: {why}")
        nets = [ipaddress.ip_network(c, strict=False) for c in cidrs]
        why = failsafe_total_problem(family, [(int(n.network_address), n.prefixlen) for n in nets])
        if why is not None:  # the bundle's and the local list together: many /8s are everything
            raise PlanError(f"{what}: {why}")
    return v4, v6


def merge_failsafes(doc: FailsafeDoc, local: LocalFailsafes) -> Failsafes:
    admin4, admin6 = bounded_cidrs([*doc.admin_cidrs, *local.admin_cidrs], "failsafes.admin_cidrs")
    dns4, dns6 = bounded_cidrs(
        [_host(x) for x in (*doc.dns_resolvers, *local.dns_resolvers)], "failsafes.dns_resolvers"
    )
    cp4, cp6 = bounded_cidrs([_host(x) for x in (*doc.control_plane, *local.control_plane)], "failsafes.control_plane")
    ports: list[Match] = [_match(p, "failsafes.admin_ports") for p in doc.admin_ports]
    ports.extend(parse_port_spec(p) for p in local.admin_ports)
    control_ports = tuple(
        dict.fromkeys(parse_port_spec(p) for p in local.control_ports or (f"tcp/{CONTROL_PLANE_PORT}",))
    )
    # the bundle's and the local lists may overlap (192.0.2.1/32 and 192.0.2.0/24): nft refuses
    # overlapping elements in an interval set, so each list is its CIDR cover
    return Failsafes(
        admin_v4=_cover(admin4, 4),
        admin_v6=_cover(admin6, 6),
        admin_ports=tuple(dict.fromkeys(ports)),
        dns_v4=_cover(dns4, 4),
        dns_v6=_cover(dns6, 6),
        control_v4=_cover(cp4, 4),
        control_v6=_cover(cp6, 6),
        control_ports=control_ports,
        metadata_v4=METADATA_V4 if local.metadata else (),
        metadata_v6=METADATA_V6 if local.metadata else (),
        dhcp=local.dhcp,
    )


def _host(text: str) -> str:
    """An address or CIDR; a bare address becomes a host prefix."""
    text = text.strip()
    if "/" in text:
        return text
    try:
        ip = ipaddress.ip_address(text)
    except ValueError:
        return text  # let split_cidrs name it
    return f"{ip}/{ip.max_prefixlen}"


def _cover(items: tuple[str, ...], family: int) -> tuple[str, ...]:
    """The CIDR cover of canonical CIDRs of one family: disjoint, sorted, duplicates gone."""
    if family == 4:
        return tuple(str(n) for n in ipaddress.collapse_addresses(ipaddress.IPv4Network(x) for x in items))
    return tuple(str(n) for n in ipaddress.collapse_addresses(ipaddress.IPv6Network(x) for x in items))


def _interval(cidr: str) -> tuple[int, int]:
    """(first, last) address of a canonical CIDR as integers (the C parser: ~1 µs)."""
    addr, _, plen = cidr.partition("/")
    six = ":" in addr
    bits = 128 if six else 32
    first = int.from_bytes(socket.inet_pton(socket.AF_INET6 if six else socket.AF_INET, addr), "big")
    return first, first | ((1 << (bits - int(plen or bits))) - 1)


def first_overlap(items: Iterable[str]) -> tuple[str, str] | None:
    """Two elements that overlap (or repeat) among canonical CIDRs of one family, or None.

    A bundle set is a CIDR cover (disjoint prefixes): nft refuses overlapping elements in an
    interval set ("conflicting intervals") and ``ipset restore`` a repeated one, so an overlap
    found only by the kernel would fail every later bundle or a delta the agent had accepted."""
    items = list(items)
    if all(x.endswith(("/32", "/128")) for x in items):  # hosts only (the usual set): repeats only
        if len(set(items)) == len(items):
            return None
        seen: set[str] = set()
        for x in items:
            if x in seen:
                return x, x
            seen.add(x)
    spans = sorted((*_interval(x), x) for x in items)
    for (_, hi, a), (lo, _, b) in itertools.pairwise(spans):
        if lo <= hi:  # sorted by first address: any overlap shows between neighbours of a cover
            return a, b
    return None


def delta_overlap(members: Collection[str], remove: Collection[str], add: Iterable[str]) -> tuple[str, str] | None:
    """An element of ``add`` that would overlap the set (``members`` less ``remove``) or another
    added element: (added, the other), or None. ``add`` and the set's elements are canonical.

    O(delta) for host addresses: the set holds a prefix covering one only if one of its at most
    128 supernets is a member. A shorter prefix added is checked against every member (O(set))."""
    adds = list(add)
    for fam in (4, 6):
        mine = [x for x in adds if (":" in x) == (fam == 6)]
        hit = first_overlap(mine)
        if hit is not None:
            return hit
    gone = set(remove)
    wide: list[tuple[int, int, str]] = []
    for x in adds:
        addr, _, plen = x.partition("/")
        six = ":" in addr
        bits = 128 if six else 32
        length = int(plen or bits)
        first, last = _interval(x)
        if length < bits:
            wide.append((first, last, x))
        fam = socket.AF_INET6 if six else socket.AF_INET
        for n in range(length):  # the set's prefixes that would contain x
            net = first & ~((1 << (bits - n)) - 1)
            sup = f"{socket.inet_ntop(fam, net.to_bytes(bits // 8, 'big'))}/{n}"
            if sup in members and sup not in gone:
                return x, sup
    if wide:
        for m in members:
            if m in gone:
                continue
            try:
                lo, hi = _interval(m)
            except (OSError, ValueError):
                continue
            for first, last, x in wide:
                if (":" in x) == (":" in m) and lo <= last and first <= hi:
                    return x, m
    return None


def compile_plan(bundle: Bundle, local: LocalFailsafes) -> Plan:
    """Turn a verified bundle into a plan; every name and address is validated here, so backends
    can render text without escaping surprises."""
    sets: dict[str, PlanSet] = {}
    for name, s in bundle.sets.items():
        if not _SET_NAME.fullmatch(name):
            raise PlanError(f"set name {name!r} is not [A-Za-z0-9_]{{1,24}}")
        v4, v6 = split_cidrs(s.v4, f"sets.{name}.v4")
        w4, w6 = split_cidrs(s.v6, f"sets.{name}.v6")
        if v6 or w4:
            raise PlanError(f"set {name}: address family mixed up between v4 and v6 lists")
        for elements in (v4, w6):
            hit = first_overlap(elements)
            if hit is not None:
                raise PlanError(
                    f"set {name}: elements {hit[0]} and {hit[1]} overlap (a set must be disjoint prefixes, "
                    "as the engine's CIDR covers are)"
                )
        sets[name] = PlanSet(v4, w6)
    rules: list[PlanRule] = []
    for direction, items in (("inbound", bundle.inbound), ("outbound", bundle.outbound)):
        for i, r in enumerate(items):
            where = f"{direction}[{i}] ({r.id})"
            members: list[PlanMember] = []
            for part in r.members or ():
                member_where = f"{where} member {part.id}"
                if part.set is not None and part.set not in sets:
                    raise PlanError(f"{member_where}: undefined set {part.set}")
                members.append(PlanMember(part.id, part.set, tuple(_match(s, member_where) for s in part.services)))
            if r.set is not None and r.set not in sets:
                raise PlanError(f"{where}: undefined set {r.set}")
            rules.append(
                PlanRule(
                    direction=direction,  # type: ignore[arg-type]
                    index=i,
                    rule_id=r.id,
                    action=r.action,
                    set=r.set,
                    services=tuple(_match(s, where) for s in r.services),
                    members=tuple(members),
                )
            )
    return Plan(
        workload_id=bundle.workload_id,
        version=bundle.version,
        mode=Mode(bundle.mode).value,
        quarantined=bundle.quarantined,
        sets=sets,
        rules=rules,
        failsafes=merge_failsafes(bundle.failsafes, local),
    )


def safe_comment(text: str, limit: int = 120) -> str:
    """Rule ids in comments: printable, no quotes or backslashes, at most ``limit`` bytes in UTF-8
    (nft's comment limit is 128 bytes, iptables' 255: a character limit lets CJK ids overflow)."""
    cleaned = "".join(c if c.isalnum() or c in "/_#.:-=+@ ()," else "_" for c in text)
    return cleaned.encode()[:limit].decode(errors="ignore")  # a character cut in half is dropped


# --- grouped rules: (address, service) elements -------------------------------------------------

ANY_V4, ANY_V6 = "0.0.0.0/0", "::/0"


def _member_prefixes(member: PlanMember, family: int, sets: Mapping[str, PlanSet]) -> tuple[str, ...]:
    if member.set is None:
        return (ANY_V4,) if family == 4 else (ANY_V6,)
    s = sets[member.set]
    return s.v4 if family == 4 else s.v6


def _union(parts: list[tuple[str, ...]], family: int) -> tuple[str, ...]:
    """The CIDR cover of several canonical covers of one family (one is returned as it is)."""
    nonempty = [p for p in parts if p]
    if len(nonempty) <= 1:
        return nonempty[0] if nonempty else ()
    if family == 4:
        return tuple(
            str(n) for n in ipaddress.collapse_addresses(ipaddress.IPv4Network(x) for p in nonempty for x in p)
        )
    return tuple(str(n) for n in ipaddress.collapse_addresses(ipaddress.IPv6Network(x) for p in nonempty for x in p))


def service_covers(
    rule: PlanRule, family: int, sets: Mapping[str, PlanSet], only: Iterable[Span] | None = None
) -> dict[Span, tuple[str, ...]]:
    """Per distinct service of a grouped rule (one address family): the CIDR cover of the union of
    the prefixes of the members carrying that service. A group's port ranges are identical or
    disjoint (the bundle contract), a whole protocol and ``any`` each go to a set of their own
    (:func:`~ringfence_agent.backends.nft.span_kind`), and a cover's prefixes are disjoint, so the
    (prefix, service) elements within one set never overlap: what nftables' concatenated interval
    sets need."""
    wanted = set(only) if only is not None else None
    contributors: dict[Span, list[PlanMember]] = {}
    for m in rule.parts():
        for svc in m.services:
            span = match_span(svc)
            if family in span_families(span) and (wanted is None or span in wanted):
                contributors.setdefault(span, []).append(m)
    return {
        span: _union([_member_prefixes(m, family, sets) for m in dict.fromkeys(members)], family)
        for span, members in contributors.items()
    }


def span_entries(span: Span) -> int:
    """What one (address . service) element of this span weighs in a concatenated interval set:
    a tcp/udp port range short of all ports as the aligned power-of-two blocks covering it (the
    kernel's pipapo stores a range as such blocks, and a delta touching the element touches them
    all: a wide range cut into pieces is many), anything else (one port, a whole protocol,
    ``any``, an ICMP type) as one."""
    proto, lo, hi = span
    if proto not in ("tcp", "udp") or lo == hi or (lo, hi) == (0, 65535):
        return 1
    blocks = 0
    while lo <= hi:
        size = lo & -lo if lo else 1 << 16
        while lo + size - 1 > hi:
            size >>= 1
        blocks += 1
        lo += size
    return blocks


def group_load(rule: PlanRule, family: int, sets: Mapping[str, PlanSet]) -> int:
    """An upper bound of what a grouped rule's concatenated sets hold for one family, in kernel
    entries: per member, its prefixes times the weight of its services of that family
    (:func:`span_entries`: a single port or a whole protocol is one, a port range its blocks).
    :func:`service_covers` can only merge elements (a cover of a union is never longer than the
    parts), and this costs O(members), not O(elements): cheap enough to decide on every delta."""
    total = 0
    for m in dict.fromkeys(rule.members):
        spans = {match_span(svc) for svc in m.services if family in span_families(match_span(svc))}
        if spans:
            total += sum(span_entries(s) for s in spans) * len(_member_prefixes(m, family, sets))
    return total


@dataclass(frozen=True, slots=True)
class GroupChange:
    """Elements of one grouped rule's (family, service) cover to delete and add."""

    counter: str
    family: int
    span: Span
    add: tuple[str, ...]
    remove: tuple[str, ...]


def group_changes(
    plan: Plan,
    set_name: str,
    new: PlanSet,
    add: tuple[str, ...] = (),
    remove: tuple[str, ...] = (),
    counters: Collection[str] | None = None,
) -> tuple[GroupChange, ...]:
    """How the grouped rules using ``set_name`` change when it goes from ``plan.sets[set_name]``
    to ``new``; ``add`` / ``remove`` are the delta's own elements (a service only this member
    carries takes them as they are, without recomputing a cover). ``counters``: only these
    grouped rules (those the backend keeps as (address . service) elements); None, all."""
    out: list[GroupChange] = []
    after = {**plan.sets, set_name: new}
    for rule in plan.rules:
        if counters is not None and rule.counter not in counters:
            continue
        users = [m for m in rule.members if m.set == set_name]
        if not users:
            continue
        spans = {match_span(svc) for m in users for svc in m.services}
        carriers: dict[Span, int] = {}
        for m in dict.fromkeys(rule.members):
            for span in {match_span(svc) for svc in m.services} & spans:
                carriers[span] = carriers.get(span, 0) + 1
        for family in (4, 6):
            fam_spans = [x for x in spans if family in span_families(x)]
            alone = [x for x in fam_spans if carriers[x] == 1]
            if alone:
                mine_add = tuple(x for x in add if (":" in x) == (family == 6))
                mine_remove = tuple(x for x in remove if (":" in x) == (family == 6))
                if mine_add or mine_remove:
                    out.extend(GroupChange(rule.counter, family, x, mine_add, mine_remove) for x in sorted(alone))
            shared = [x for x in fam_spans if carriers[x] > 1]
            if shared:
                old_covers = service_covers(rule, family, plan.sets, shared)
                new_covers = service_covers(rule, family, after, shared)
                for x in sorted(shared):
                    before, now = set(old_covers.get(x, ())), set(new_covers.get(x, ()))
                    if before != now:
                        out.append(
                            GroupChange(
                                rule.counter, family, x, tuple(sorted(now - before)), tuple(sorted(before - now))
                            )
                        )
    return tuple(out)


# --- admission: what the rendered rules would do with a connection's first packet ---------------


@dataclass(frozen=True, slots=True)
class Flow:
    """A connection's first packet as this host's input or output hook sees it: ``peer`` is the
    remote address (source inbound, destination outbound), ports are the packet's own."""

    direction: Direction
    peer: str
    proto: str  # tcp, udp, icmp, icmpv6 or another protocol's name
    sport: int | None = None
    dport: int | None = None
    icmp_type: int | None = None


@dataclass(frozen=True, slots=True)
class Admission:
    admitted: bool
    by: str  # "failsafe dns", a rule id, "default"


class _Prefixes:
    """Membership of an address in a CIDR cover: per prefix length, the set of network numbers
    (a cover has few distinct lengths, so a lookup is a handful of hash probes)."""

    def __init__(self, items: Iterable[str]) -> None:
        self.by_len: dict[tuple[int, int], set[int]] = {}  # (family bits, length) → networks
        for cidr in items:
            first, _ = _interval(cidr)
            bits = 128 if ":" in cidr else 32
            _, _, plen = cidr.partition("/")
            n = int(plen or bits)
            self.by_len.setdefault((bits, n), set()).add(first >> (bits - n))

    def __contains__(self, addr: tuple[int, int]) -> bool:
        bits, value = addr
        return any(b == bits and (value >> (bits - n)) in nets for (b, n), nets in self.by_len.items())


def _service_admits(m: Match, flow: Flow) -> bool:
    if m.proto is None:
        return True
    if m.proto != flow.proto:
        return False
    if m.proto in ("tcp", "udp"):
        return m.ports is None or (flow.dport is not None and m.ports[0] <= flow.dport <= m.ports[1])
    return m.icmp_type is None or m.icmp_type == flow.icmp_type


class Admitter:
    """The plan's verdict on a connection's first packet, in the order every backend renders it:
    fail-safes, then the bundle's rules (first match wins), then the mode's default. Used to find
    the established connections a new plan would no longer admit (:mod:`ringfence_agent.sessions`);
    the dataplane tests check it against nftables and iptables. Loopback, established/related and
    neighbour discovery are not connections to judge here: callers skip local-to-local traffic."""

    def __init__(self, plan: Plan) -> None:
        self.plan = plan
        self._sets: dict[str, _Prefixes] = {}
        self._rules = {d: plan.by_direction(d) for d in ("inbound", "outbound")}

    def _in(self, name: str, items: tuple[str, ...], addr: tuple[int, int]) -> bool:
        """``items``: the family of ``addr`` (cached per name and family)."""
        key = f"{name}/{addr[0]}"
        s = self._sets.get(key)
        if s is None:
            s = self._sets[key] = _Prefixes(items)
        return addr in s

    def _in_bundle_set(self, name: str | None, addr: tuple[int, int]) -> bool:
        if name is None:
            return True
        s = self.plan.sets[name]
        return self._in(f"s:{name}", s.v4 if addr[0] == 32 else s.v6, addr)

    def _failsafe(self, flow: Flow, addr: tuple[int, int]) -> str | None:
        fs = self.plan.failsafes
        v4 = addr[0] == 32
        udp = flow.proto == "udp"
        if flow.direction == "inbound":
            if fs.dhcp and udp and (flow.sport, flow.dport) in ((67, 68), (547, 546)):
                return "failsafe dhcp"
            admin = fs.admin_v4 if v4 else fs.admin_v6
            if any(_service_admits(m, flow) for m in fs.admin_ports) and self._in("fs:admin", admin, addr):
                return "failsafe admin"
            return None
        if fs.dhcp and udp and (flow.sport, flow.dport) in ((68, 67), (546, 547)):
            return "failsafe dhcp"
        if (
            flow.proto in ("udp", "tcp")
            and flow.dport == 53
            and self._in("fs:dns", fs.dns_v4 if v4 else fs.dns_v6, addr)
        ):
            return "failsafe dns"
        meta = fs.metadata_v4 if v4 else fs.metadata_v6
        if any(_service_admits(m, flow) for m in METADATA_PORTS) and self._in("fs:meta", meta, addr):
            return "failsafe metadata"
        if any(_service_admits(m, flow) for m in fs.control_ports) and self._in(
            "fs:cp", fs.control_v4 if v4 else fs.control_v6, addr
        ):
            return "failsafe control-plane"
        return None

    def admits(self, flow: Flow) -> Admission:
        plan = self.plan
        if plan.mode == "idle":
            return Admission(True, "idle")
        packed = socket.inet_pton(socket.AF_INET6 if ":" in flow.peer else socket.AF_INET, flow.peer)
        addr = (len(packed) * 8, int.from_bytes(packed, "big"))
        why = self._failsafe(flow, addr)
        if why is not None:
            return Admission(True, why)
        for r in self._rules[flow.direction]:
            for part in r.parts():
                if self._in_bundle_set(part.set, addr) and any(_service_admits(m, flow) for m in part.services):
                    return Admission(r.action == "allow" or plan.mode != "enforce", r.rule_id)
        return Admission(plan.mode != "enforce", "default")
