"""nftables: one table ``inet ringfence``, replaced in one atomic ``nft -f`` transaction.

Layout (see docs/agent.md): interval sets ``s_<set>_4`` / ``s_<set>_6`` per bundle set, fail-safe
sets ``fs_*``, a named counter per rule (``r_in_<i>``, ``r_out_<i>``) and per default (``d_in``,
``d_out``), and for every drop point a bounded dynamic set ``t_<counter>_4|6`` that the kernel fills
with (src . dst . l4proto . sport . dport) of what it dropped (or would drop, in observe mode), each
element with its own packet counter. The agent polls counters and tuple sets; nothing is parsed from logs.

A grouped rule is one rule per family and kind of service over a concatenated interval set
``g_<counter>_<family><kind>``: ``p`` holds address . protocol . port range (tcp/udp ranges short
of all ports), ``i`` address . ICMP type, ``l`` address . protocol (all ports of tcp/udp, all
ICMP types), ``a`` addresses (members with ``any``). Elements are, per service, the cover of the
members' prefixes (:func:`~ringfence_agent.plan.service_covers`): never overlapping within a set,
which nft 1.0.6 requires of concatenated interval sets (it refuses an element that overlaps
another). Port ranges of a group are identical or disjoint (the bundle contract); a whole
protocol may overlap them because it lives in its own set, and so does ``any``.

Only while it is small: concatenated interval sets (the kernel's pipapo) get slow to change as
they grow, so a grouped rule whose element count (:func:`~ringfence_agent.plan.group_load`, per
family, weighted by kernel entries) exceeds :attr:`NftRenderer.group_bound` is expanded like iptables does it: one plain rule
per member, family and joined service over the member's own ``s_<set>_*`` sets, under the group's
counter. A set delta then moves the bundle sets' elements only. A delta that takes a concatenated
group past the bound, or an expanded one below half of it (hysteresis), re-applies the whole plan
in one transaction instead (:meth:`NftBackend.group_delta`).
"""

from __future__ import annotations

import ctypes
import ctypes.util
import hashlib
import json
import os
import re
import select
import signal
import struct
import threading
import time
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Any

from ringfence import enforced
from ringfence.bundlewire import span_whole
from ringfence_agent.backends import (
    ABSENT,
    TUPLE_LINGER_S,
    ApplyError,
    DropTuple,
    ElementChange,
    Observation,
    ReadError,
    agent_uid,
    run,
    scratch,
)
from ringfence_agent.backends import nftables_netlink as nl
from ringfence_agent.backends.nftables_netlink import OWNER, TableInfo, table_info
from ringfence_agent.backends.sealkey import SealKey
from ringfence_agent.plan import (
    METADATA_PORTS,
    Direction,
    Match,
    Plan,
    PlanRule,
    PlanSet,
    Span,
    group_load,
    joined_ports,
    match_span,
    safe_comment,
    service_covers,
    span_families,
)

TABLE = "ringfence"
_BUNDLE_SET = re.compile(r"s_([A-Za-z0-9_]{1,24})_[46]h?")  # set_name(): a bundle set's four kernel sets
_RULE_COUNTER = re.compile(r"r_(in|out)_\d+|d_(in|out)")  # bundle rules and defaults (fail-safes: none)
_CHAIN_DIRECTION = {"input": "inbound", "output": "outbound"}
# what nft's JSON calls a rule's verdict statements (a counter-less one counts too: enforced());
# a verdict map decides too (the agent writes none in input/output)
_VERDICTS = frozenset({"accept", "drop", "reject", "queue", "jump", "goto", "return", "continue", "vmap"})
FAMILY = "inet"
# After every whole apply the agent adds an empty chain ``seal_<mac>`` naming an HMAC-SHA256 of
# the digest of what the kernel then holds of its own rules (see NftBackend.held): the table alone
# no longer says that the agent's rules are in force (``nft flush table`` keeps it and every set,
# removes every rule). Keyed (SealKey): an unkeyed digest could be recomputed and the seal renamed
# by any CAP_NET_ADMIN process in the namespace after loosening the table; the key is in the state
# directory (root, 0700), which such a process cannot read.
SEAL = "seal_"
_SEAL_CONTEXT = b"ringfence nft seal v1\n"
_FAILSAFE_SETS = tuple(f"{name}_{fam}" for name in ("fs_admin", "fs_dns", "fs_cp", "fs_meta") for fam in (4, 6))
# A read through libnftables (JSON listings) runs in a child process and must end within this:
# listing the table costs up to ~1.5 s at 100,000 set elements; a child that takes longer, or dies
# (libnftables 1.0.6 abort()s on a string that is not UTF-8), means the agent cannot tell.
LISTING_TIMEOUT = 30.0
# A whole apply whose read-back is not what it wrote (another process wrote to the table between
# the commit and the read) is done again this many times, then fails unsealed (NftBackend.apply).
APPLY_TRIES = 3
# What the held() digest keeps of the kernel's netlink attributes (the rest are handles, use
# counts, packet counters, transaction ids, the kernel's choice of set backend, element counts).
_CHAIN_ATTRS = (3, 4, 5, 7, 10, 12)  # NFTA_CHAIN_: NAME, HOOK, POLICY, TYPE, FLAGS, USERDATA
_RULE_ATTRS = (4, 5, 7)  # NFTA_RULE_: EXPRESSIONS, COMPAT, USERDATA
_SET_ATTRS = (2, 3, 4, 5, 6, 7, 8, 9, 11, 12, 13, 15, 17, 18)  # NFTA_SET_: NAME ... EXPRESSIONS (no TABLE/ID/HANDLE)
_CHAIN_HOOK = 4


# Group load (per family, in kernel entries: plan.group_load weighs a port range by the blocks the
# kernel stores it as) above which a grouped rule is expanded into plain rules. Measured
# (docs/benchmarks.md, "Large grouped rules"; tests/bench/group_bound.py): one element deleted
# from a concatenated interval set costs the commit floor (12-16 ms here, a hash set's too) up to
# 50,000 elements, but a workload's delta deletes one element per service piece, and a wide port
# range expands into many kernel entries: 7 such elements cost 16-22 ms of nft at 500 elements,
# 27-28 ms at 1,000, 45-61 ms at 2,000, 89-99 ms at 4,000, plus the covers recomputed in Python
# (8-14, 16-28, 35-52, 65-117 ms); expanded, the same delta is a hash set element: 10-16 ms
# whatever the size. A full apply loads ~13 ms per 1,000 group elements.
# RINGFENCE_NFT_GROUP_BOUND overrides it.
GROUP_BOUND = 1000
# Kernel-side bound per drop point and family. With the source port in the key every connection
# attempt is its own element, so a scan fills a set quickly: the size caps kernel memory, the short
# timeout frees it a minute after the last packet (the daemon polls every observe_interval, 10 s).
TUPLE_SIZE = 1024
_TUPLE_KEY = {
    4: "ip saddr . ip daddr . meta l4proto . th sport . th dport",
    6: "ip6 saddr . ip6 daddr . meta l4proto . th sport . th dport",
}
_TUPLE_TYPE = {
    4: "ipv4_addr . ipv4_addr . inet_proto . inet_service . inet_service",
    6: "ipv6_addr . ipv6_addr . inet_proto . inet_service . inet_service",
}
_GROUP_TYPE = {
    (4, "p"): "ipv4_addr . inet_proto . inet_service",
    (6, "p"): "ipv6_addr . inet_proto . inet_service",
    (4, "i"): "ipv4_addr . icmp_type",
    (6, "i"): "ipv6_addr . icmpv6_type",
    (4, "l"): "ipv4_addr . inet_proto",
    (6, "l"): "ipv6_addr . inet_proto",
    (4, "a"): "ipv4_addr",
    (6, "a"): "ipv6_addr",
}
_GROUP_KEY = {
    (4, "p"): " . meta l4proto . th dport",
    (6, "p"): " . meta l4proto . th dport",
    (4, "i"): " . icmp type",
    (6, "i"): " . icmpv6 type",
    (4, "l"): " . meta l4proto",
    (6, "l"): " . meta l4proto",
    (4, "a"): "",
    (6, "a"): "",
}
_ND_IN = "nd-neighbor-solicit, nd-neighbor-advert, nd-router-advert, nd-redirect"
_ND_OUT = "nd-neighbor-solicit, nd-neighbor-advert, nd-router-solicit"


def set_name(bundle_set: str, family: int, hosts: bool = False) -> str:
    """``s_<set>_4`` holds prefixes (interval set); ``s_<set>_4h`` single addresses (hash set).

    Host addresses live in a plain hash set because nft (1.0.x) reads a whole interval set back
    before changing it: one element added to a 100,000-element interval set costs ~1 s, to a
    hash set ~3 ms. Most set members are single workload addresses."""
    return f"s_{bundle_set}_{family}{'h' if hosts else ''}"


def _elements(items: Iterable[str]) -> str:
    return ", ".join(items)


def split_hosts(items: Iterable[str]) -> tuple[list[str], list[str]]:
    """(prefixes, host addresses without their /32 or /128)."""
    prefixes: list[str] = []
    hosts: list[str] = []
    for x in items:
        addr, _, length = x.partition("/")
        if not length or length == ("128" if ":" in addr else "32"):
            hosts.append(addr)
        else:
            prefixes.append(x)
    return prefixes, hosts


def group_set_name(counter: str, family: int, kind: str) -> str:
    return f"g_{counter}_{family}{kind}"


def span_kind(span: Span) -> str:
    """``a`` any protocol, ``l`` a whole protocol, ``i`` an ICMP type, ``p`` a tcp/udp port range."""
    if span[0] == "any":
        return "a"
    if span_whole(span):
        return "l"
    return "i" if span[0] in ("icmp", "icmpv6") else "p"


_L4PROTO = {"tcp": "tcp", "udp": "udp", "icmp": "icmp", "icmpv6": "ipv6-icmp"}  # nft's inet_proto names


def group_element(prefix: str, span: Span) -> str:
    """One element of a grouped rule's set: ``10.0.0.0/24 . tcp . 80-90``, ``10.0.0.1 . 8``,
    ``10.0.0.1 . udp`` (all ports), ``fd00::1``."""
    addr, _, length = prefix.partition("/")
    if length and length != ("128" if ":" in addr else "32"):
        addr = prefix
    proto, lo, hi = span
    value = str(lo) if lo == hi else f"{lo}-{hi}"
    kind = span_kind(span)
    if kind == "p":
        return f"{addr} . {proto} . {value}"
    if kind == "l":
        return f"{addr} . {_L4PROTO[proto]}"
    return f"{addr} . {value}" if kind == "i" else addr


def _group_kinds(r: PlanRule, family: int) -> list[str]:
    spans = {match_span(m) for part in r.members for m in part.services}
    return sorted({span_kind(x) for x in spans if family in span_families(x)})


def _set_decl(name: str, family: int, items: Iterable[str], interval: bool = True) -> str:
    kind = "ipv4_addr" if family == 4 else "ipv6_addr"
    text = _elements(items)
    elems = f" elements = {{ {text} }}" if text else ""
    flags = " flags interval;" if interval else ""
    return f"\tset {name} {{ type {kind};{flags}{elems} }}\n"


def _svc(m: Match) -> str:
    if m.proto is None:
        return ""
    if m.proto in ("tcp", "udp"):
        if m.ports is None:
            return f"meta l4proto {m.proto}"
        lo, hi = m.ports
        return f"{m.proto} dport {lo}" if lo == hi else f"{m.proto} dport {lo}-{hi}"
    if m.proto == "icmp":
        return f"icmp type {m.icmp_type}" if m.icmp_type is not None else "meta l4proto icmp"
    return f"icmpv6 type {m.icmp_type}" if m.icmp_type is not None else "meta l4proto ipv6-icmp"


def _families(m: Match) -> tuple[int, ...]:
    if m.proto == "icmp":
        return (4,)
    if m.proto == "icmpv6":
        return (6,)
    return (4, 6)


def _addr(direction: Direction, family: int) -> str:
    side = "saddr" if direction == "inbound" else "daddr"
    return f"{'ip' if family == 4 else 'ip6'} {side}"


def _join(*parts: str) -> str:
    return " ".join(p for p in parts if p)


def _env_bound() -> int:
    text = os.environ.get("RINGFENCE_NFT_GROUP_BOUND", "")
    return int(text) if text.isdigit() else GROUP_BOUND


def _loads(r: PlanRule, sets: dict[str, PlanSet]) -> int:
    return max(group_load(r, fam, sets) for fam in (4, 6))


class NftRenderer:
    """Pure text generation (unit-tested without a kernel)."""

    def __init__(self, group_bound: int | None = None) -> None:
        self.group_bound = _env_bound() if group_bound is None else group_bound

    def concatenated(self, plan: Plan) -> frozenset[str]:
        """Counters of the grouped rules realised as concatenated sets: those within the bound."""
        return frozenset(r.counter for r in plan.rules if r.members and _loads(r, plan.sets) <= self.group_bound)

    def render(self, plan: Plan) -> str:
        return self._render(plan, self.concatenated(plan))

    def _render(self, plan: Plan, concat: frozenset[str], bundle_elements: bool = True) -> str:
        """The whole table; without ``bundle_elements`` the bundle sets ``s_*`` are declared empty
        (what :meth:`NftBackend.held` reads is the same: it leaves them out)."""
        head = f"table {FAMILY} {TABLE}\ndelete table {FAMILY} {TABLE}\n"
        if plan.mode == "idle":
            return head
        out = [head, f"table {FAMILY} {TABLE} {{\n"]
        fs = plan.failsafes
        for name, items4, items6 in (
            ("fs_admin", fs.admin_v4, fs.admin_v6),
            ("fs_dns", fs.dns_v4, fs.dns_v6),
            ("fs_cp", fs.control_v4, fs.control_v6),
            ("fs_meta", fs.metadata_v4, fs.metadata_v6),
        ):
            out.append(_set_decl(f"{name}_4", 4, items4))
            out.append(_set_decl(f"{name}_6", 6, items6))
        for sname, s in sorted(plan.sets.items()):
            for fam, items in ((4, s.v4), (6, s.v6)):
                prefixes, hosts = split_hosts(items)
                if not bundle_elements:
                    prefixes, hosts = [], []
                out.append(_set_decl(set_name(sname, fam), fam, prefixes))
                out.append(_set_decl(set_name(sname, fam, hosts=True), fam, hosts, interval=False))
        for r in plan.rules:
            if r.counter in concat:
                out.extend(self._group_decls(plan, r))
        for r in plan.rules:
            out.append(f'\tcounter {r.counter} {{ comment "{safe_comment(r.action + " " + r.counted_as)}" }}\n')
        out.append('\tcounter d_in { comment "default inbound" }\n\tcounter d_out { comment "default outbound" }\n')
        for point in [r.counter for r in plan.rules if r.drops] + ["d_in", "d_out"]:
            for fam in (4, 6):
                out.append(
                    f"\tset t_{point}_{fam} {{ type {_TUPLE_TYPE[fam]}; flags dynamic,timeout; "
                    f"timeout {TUPLE_LINGER_S}s; size {TUPLE_SIZE}; counter; }}\n"
                )
        for direction, chain, hook in (("inbound", "input", "input"), ("outbound", "output", "output")):
            out.append(f"\tchain {chain} {{\n\t\ttype filter hook {hook} priority filter; policy accept;\n")
            out.extend(f"\t\t{line}\n" for line in self._failsafe_lines(plan, direction))  # type: ignore[arg-type]
            for r in plan.by_direction(direction):  # type: ignore[arg-type]
                out.extend(f"\t\t{line}\n" for line in self._rule_lines(plan, r, r.counter in concat))
            out.extend(f"\t\t{line}\n" for line in self._default_lines(plan, direction))  # type: ignore[arg-type]
            out.append("\t}\n")
        out.append("}\n")
        return "".join(out)

    @staticmethod
    def _failsafe_lines(plan: Plan, direction: Direction) -> list[str]:
        fs = plan.failsafes
        lines: list[str] = []
        if direction == "inbound":
            # from this host only: a packet another CAP_NET_ADMIN process forwards into lo (netdev
            # ingress `fwd to "lo"`) arrives with iif lo and an outside source (review r9)
            lines += ['iif "lo" fib saddr type local accept comment "failsafe loopback"']
            lines += ['ct state established,related accept comment "failsafe established"']
            lines += [f'icmpv6 type {{ {_ND_IN} }} accept comment "failsafe ipv6-nd"']
            if fs.dhcp:
                lines += ['udp sport 67 udp dport 68 accept comment "failsafe dhcp"']
                lines += ['udp sport 547 udp dport 546 accept comment "failsafe dhcpv6"']
            for m in fs.admin_ports:
                for fam in _families(m):
                    lines.append(f'{_addr("inbound", fam)} @fs_admin_{fam} {_svc(m)} accept comment "failsafe admin"')
        else:
            lines += ['oif "lo" accept comment "failsafe loopback"']
            lines += ['ct state established,related accept comment "failsafe established"']
            lines += [f'icmpv6 type {{ {_ND_OUT} }} accept comment "failsafe ipv6-nd"']
            if fs.dhcp:
                lines += ['udp sport 68 udp dport 67 accept comment "failsafe dhcp"']
                lines += ['udp sport 546 udp dport 547 accept comment "failsafe dhcpv6"']
            for fam in (4, 6):
                a = _addr("outbound", fam)
                lines.append(f'{a} @fs_dns_{fam} udp dport 53 accept comment "failsafe dns"')
                lines.append(f'{a} @fs_dns_{fam} tcp dport 53 accept comment "failsafe dns"')
                lines.extend(f'{a} @fs_meta_{fam} {_svc(m)} accept comment "failsafe metadata"' for m in METADATA_PORTS)
                # the control plane on its port(s) only, and only the agent's own connection to it:
                # a socket of the user the agent runs as (the unit's ringfence-agent; another
                # local user is not admitted)
                lines.extend(
                    f'{a} @fs_cp_{fam} {_svc(m)} meta skuid {agent_uid()} accept comment "failsafe control-plane"'
                    for m in fs.control_ports
                )
        return lines

    @staticmethod
    def _verdict(plan: Plan, r: PlanRule) -> str:
        if r.action == "allow":
            return "accept"
        return "drop" if plan.mode == "enforce" else "accept"

    @staticmethod
    def _group_decls(plan: Plan, r: PlanRule) -> list[str]:
        out: list[str] = []
        for fam in (4, 6):
            covers = service_covers(r, fam, plan.sets)
            for kind in _group_kinds(r, fam):
                elems = [
                    group_element(p, span)
                    for span, cover in sorted(covers.items())
                    if span_kind(span) == kind
                    for p in cover
                ]
                text = f" elements = {{ {_elements(elems)} }}" if elems else ""
                out.append(
                    f"\tset {group_set_name(r.counter, fam, kind)} {{ type {_GROUP_TYPE[fam, kind]}; flags interval;{text} }}\n"
                )
        return out

    def _rule_lines(self, plan: Plan, r: PlanRule, concatenated: bool = True) -> list[str]:
        verdict = self._verdict(plan, r)
        lines: list[str] = []
        if r.members and concatenated:  # one rule per family and kind of service, over the group's own set
            comment = f'comment "{safe_comment(r.rule_id)}"'
            for fam in (4, 6):
                for kind in _group_kinds(r, fam):
                    match = f"{_addr(r.direction, fam)}{_GROUP_KEY[fam, kind]} @{group_set_name(r.counter, fam, kind)}"
                    lines.append(_join(match, f"counter name {r.counter}", verdict, comment))
            return lines
        if r.members:  # expanded: each member's rules over its own sets, under the group's counter
            for part in r.members:
                lines.extend(self._plain_lines(r, part.set, joined_ports(part.services), verdict, part.rule_id))
            return lines
        return self._plain_lines(r, r.set, r.services, verdict, r.rule_id)

    @staticmethod
    def _plain_lines(
        r: PlanRule, peers: str | None, services: Iterable[Match], verdict: str, rule_id: str
    ) -> list[str]:
        comment = f'comment "{safe_comment(rule_id)}"'
        lines: list[str] = []
        for m in services:
            for fam in _families(m):
                if peers is not None:
                    matches = [
                        f"{_addr(r.direction, fam)} @{set_name(peers, fam, hosts=True)}",
                        f"{_addr(r.direction, fam)} @{set_name(peers, fam)}",
                    ]
                else:
                    matches = [f"meta nfproto {'ipv4' if fam == 4 else 'ipv6'}"]
                for match in matches:
                    if r.drops:
                        # its own rule: a dynset update into a full set ends the rule it sits in
                        # (NFT_BREAK), which would skip the drop after it (tested in the lab)
                        lines.append(_join(match, _svc(m), f"update @t_{r.counter}_{fam} {{ {_TUPLE_KEY[fam]} }}"))
                    lines.append(_join(match, _svc(m), f"counter name {r.counter}", verdict, comment))
        return lines

    @staticmethod
    def _default_lines(plan: Plan, direction: Direction) -> list[str]:
        point = "d_in" if direction == "inbound" else "d_out"
        verdict = "drop" if plan.mode == "enforce" else "accept"
        return [
            f"meta nfproto ipv4 update @t_{point}_4 {{ {_TUPLE_KEY[4]} }}",
            f"meta nfproto ipv6 update @t_{point}_6 {{ {_TUPLE_KEY[6]} }}",
            f'counter name {point} {verdict} comment "default {plan.mode}"',
        ]

    @staticmethod
    def render_delta(change: ElementChange) -> str:
        lines: list[str] = []
        # deletes first: one transaction, so a /32 → /31 merge never overlaps mid-way
        for verb, families in (
            ("delete", ((4, change.remove_v4), (6, change.remove_v6))),
            ("add", ((4, change.add_v4), (6, change.add_v6))),
        ):
            for fam, items in families:
                prefixes, hosts = split_hosts(items)
                for name, elems in (
                    (set_name(change.set, fam, hosts=True), hosts),
                    (set_name(change.set, fam), prefixes),
                ):
                    if elems:
                        lines.append(f"{verb} element {FAMILY} {TABLE} {name} {{ {_elements(elems)} }}")
            for g in change.groups:
                items = g.remove if verb == "delete" else g.add
                if items:
                    name = group_set_name(g.counter, g.family, span_kind(g.span))
                    text = _elements(group_element(x, g.span) for x in items)
                    lines.append(f"{verb} element {FAMILY} {TABLE} {name} {{ {text} }}")
        return "\n".join(lines) + "\n"


class LibNftables:
    """libnftables in-process (what the ``nft`` binary wraps) for transactions: no fork/exec per
    apply or delta. Listings (JSON output) run in a forked child (:meth:`listings`): libnftables
    1.0.6 abort()s on a string that is not UTF-8 (a chain name in another process's table, an
    ``iifname`` in a rule of Ringfence's own) and frees a table's only flag before printing it;
    in-process, either killed or corrupted the agent.

    A fresh context per call, so no cache outlives a transaction; one lock, so the observer
    thread and the apply path never share a context."""

    JSON = 1 << 4  # NFT_CTX_OUTPUT_JSON

    def __init__(self) -> None:
        lib = ctypes.CDLL(ctypes.util.find_library("nftables") or "libnftables.so.1")
        lib.nft_ctx_new.restype = ctypes.c_void_p
        lib.nft_ctx_new.argtypes = [ctypes.c_uint32]
        lib.nft_ctx_free.argtypes = [ctypes.c_void_p]
        lib.nft_ctx_buffer_output.argtypes = [ctypes.c_void_p]
        lib.nft_ctx_buffer_error.argtypes = [ctypes.c_void_p]
        lib.nft_ctx_get_output_buffer.restype = ctypes.c_char_p
        lib.nft_ctx_get_output_buffer.argtypes = [ctypes.c_void_p]
        lib.nft_ctx_get_error_buffer.restype = ctypes.c_char_p
        lib.nft_ctx_get_error_buffer.argtypes = [ctypes.c_void_p]
        lib.nft_ctx_output_set_flags.argtypes = [ctypes.c_void_p, ctypes.c_uint]
        lib.nft_run_cmd_from_buffer.argtypes = [ctypes.c_void_p, ctypes.c_char_p]
        lib.nft_run_cmd_from_buffer.restype = ctypes.c_int
        self.lib = lib
        self.lock = threading.Lock()  # held for the whole of a transaction (run)
        self.listing_pids: set[int] = set()  # listing children running now

    def run(self, script: str) -> tuple[int, str, str]:
        """A transaction (no output is printed: never a listing)."""
        with self.lock:
            rc, out, err = self._call(script, 0)
            return rc, out.decode(errors="replace"), err.decode(errors="replace")

    def _call(self, script: str, flags: int) -> tuple[int, bytes, bytes]:
        ctx = self.lib.nft_ctx_new(0)
        if not ctx:
            return 1, b"", b"nft_ctx_new failed"
        try:
            if flags:
                self.lib.nft_ctx_output_set_flags(ctx, flags)
            self.lib.nft_ctx_buffer_output(ctx)
            self.lib.nft_ctx_buffer_error(ctx)
            rc = self.lib.nft_run_cmd_from_buffer(ctx, script.encode())
            out = self.lib.nft_ctx_get_output_buffer(ctx) or b""
            err = self.lib.nft_ctx_get_error_buffer(ctx) or b""
            return rc, out, err
        finally:
            self.lib.nft_ctx_free(ctx)

    def listings(self, scripts: Sequence[str], timeout: float = LISTING_TIMEOUT) -> list[tuple[int, str]]:
        """(rc, JSON output) of each ``list ...`` command, run one after the other in ONE forked
        child (the library is loaded already: a fork costs a few ms, an exec of ``nft`` per
        listing far more) that writes them to a pipe. :class:`ReadError` when the child dies (a
        signal: libnftables' assertions abort()), exits otherwise than cleanly, or is not done
        within ``timeout`` seconds (then it is killed)."""
        what = "; ".join(x.strip() for x in scripts)[:200]
        rfd, wfd = os.pipe()
        efd, ewfd = os.pipe()  # the child's stderr: what libnftables says before it aborts
        try:
            pid = os.fork()
        except OSError:
            for fd in (rfd, wfd, efd, ewfd):
                os.close(fd)
            raise
        if pid == 0:  # the child: no lock taken (another thread may hold it), no Python-level I/O
            code = 70
            try:
                os.close(rfd)
                os.close(efd)
                os.dup2(ewfd, 2)
                for script in scripts:
                    rc, out, _ = self._call(script, self.JSON)
                    view = memoryview(struct.pack("=iQ", rc, len(out)) + out)
                    while view:
                        view = view[os.write(wfd, view) :]
                code = 0
            finally:
                os._exit(code)
        self.listing_pids.add(pid)  # the daemon's stop watchdog kills it rather than wait on it
        os.close(wfd)
        os.close(ewfd)
        chunks: list[bytes] = []
        errors: list[bytes] = []
        deadline = time.monotonic() + timeout
        timed_out = False
        try:
            open_fds = {rfd: chunks, efd: errors}
            while open_fds:
                left = deadline - time.monotonic()
                ready = select.select(list(open_fds), [], [], max(left, 0))[0] if left > 0 else []
                if not ready:
                    timed_out = True
                    os.kill(pid, signal.SIGKILL)
                    break
                for fd in ready:
                    chunk = os.read(fd, 1 << 20)
                    if chunk:
                        open_fds[fd].append(chunk)
                    else:
                        del open_fds[fd]
        finally:
            os.close(rfd)
            os.close(efd)
            _, status = os.waitpid(pid, 0)
            self.listing_pids.discard(pid)
        said = b"".join(errors).decode(errors="replace").strip().splitlines()
        if said:
            what += f": {said[-1][:200]}"
        if timed_out:
            raise ReadError(f"listing the kernel's rules took longer than {timeout:.0f} s ({what})")
        if os.WIFSIGNALED(status):
            name = signal.Signals(os.WTERMSIG(status)).name
            raise ReadError(f"libnftables died on {name} listing the kernel's rules ({what})")
        if os.WEXITSTATUS(status) != 0:
            raise ReadError(f"listing the kernel's rules failed (exit {os.WEXITSTATUS(status)}: {what})")
        data, at = b"".join(chunks), 0
        answers: list[tuple[int, str]] = []
        head = struct.Struct("=iQ")
        for _ in scripts:
            if at + head.size > len(data):
                raise ReadError(f"the listing process's answer is cut short ({what})")
            rc, size = head.unpack_from(data, at)
            at += head.size
            answers.append((rc, data[at : at + size].decode(errors="replace")))
            at += size
        return answers


def _load_lib() -> LibNftables | None:
    if os.environ.get("RINGFENCE_NFT_CLI") == "1":
        return None
    try:
        return LibNftables()
    except (OSError, AttributeError):
        return None


class NftBackend(NftRenderer):
    name = "nftables"

    def __init__(self, nft: str = "nft", group_bound: int | None = None, state_dir: Path | None = None) -> None:
        super().__init__(group_bound)
        self.nft = nft
        self.lib = _load_lib()
        self.seal_key = SealKey(state_dir, _SEAL_CONTEXT)
        # grouped rule counter → realised as concatenated sets, as the last apply of this process
        # left it (None: nothing applied by this process, see group_delta)
        self.realised: dict[str, bool] | None = None
        # the fingerprint of what the last apply's seal read back (:meth:`fingerprint` without
        # another read, which costs ~0.5 s at 100,000 set elements); None when not sealed
        self.applied_fingerprint: str | None = None
        # each concatenated group set ``g_*`` → the digest of its elements as the kernel listed them
        # right after this process last wrote it (whole apply or delta; None: that read failed);
        # None when this process applied nothing (see :meth:`group_problem`)
        self.group_held: dict[str, str | None] | None = None
        # why the last listing of this process that failed did (ReadError), until the daemon's
        # drift check takes it (and programs the table again: cannot tell is never intact)
        self.read_failure: str | None = None
        # why this apply's seal check could not run (no namespace of its own could be made)
        self._unchecked: str | None = None

    def _run(self, script: str) -> tuple[int, str, str]:
        """A transaction (in-process through libnftables, else the ``nft`` binary)."""
        if self.lib is not None:
            return self.lib.run(script)
        proc = run([self.nft, "-f", "-"], stdin=script, timeout=120)
        return proc.returncode, proc.stdout, proc.stderr

    def _listings(self, *scripts: str) -> list[list[dict[str, Any]]]:
        """The JSON items of each ``list ...`` command, never printed in this process (see
        :class:`LibNftables`): all in one forked child, or one ``nft -j`` each without the
        library. [] for a listing nft refuses (no such set); :class:`ReadError` when the
        listing process dies or times out, or prints what is not JSON: the agent cannot tell."""
        try:
            return self._listed(scripts)
        except ReadError as exc:
            self.read_failure = str(exc)
            raise

    def _listed(self, scripts: Sequence[str]) -> list[list[dict[str, Any]]]:
        if self.lib is not None:
            results = self.lib.listings(scripts)
        else:
            results = []
            for script in scripts:
                try:
                    proc = run([self.nft, "-j", *script.split()], timeout=LISTING_TIMEOUT)
                except ApplyError as exc:
                    raise ReadError(str(exc)) from None
                if proc.returncode < 0:
                    name = signal.Signals(-proc.returncode).name
                    raise ReadError(f"nft died on {name} listing the kernel's rules ({script.strip()})")
                results.append((proc.returncode, proc.stdout))
        out: list[list[dict[str, Any]]] = []
        for rc, text in results:
            if rc != 0:
                out.append([])
                continue
            try:
                items = json.loads(text or "{}").get("nftables", [])
            except (ValueError, AttributeError):
                raise ReadError("nft printed a listing that is not JSON") from None
            out.append(items if isinstance(items, list) else [])
        return out

    def _exec(self, script: str, what: str) -> None:
        rc, _, err = self._run(script)
        if rc != 0:
            detail = err.strip().splitlines()
            raise ApplyError(f"nft refused the {what} (previous rules still in force): {' | '.join(detail[:6])}")

    def apply(self, plan: Plan) -> None:
        """One transaction replacing the table, then the seal of what the kernel holds after it.

        Sealed only when what was read back is what this apply wrote, known apart from the live
        kernel: any CAP_NET_ADMIN process may insert a rule between the commit and the read-back
        (``nft monitor`` shows the commit), and a seal of that read would make its rule the
        agent's for good (status, heartbeat, "already applied", the daemon's drift baseline).
        Either the ruleset's generation moved by exactly one between just before the commit and
        just after the read-back (ours: nothing else was committed meanwhile, in any table), or
        the same table loaded into a fresh network namespace nobody else can write reads back the
        same (:meth:`_as_written`). Otherwise the apply is done again, and after
        :data:`APPLY_TRIES` it fails unsealed: "changed while applied", never sealed. Where no
        such namespace can be made the check cannot run: an apply whose generation moved is not
        sealed either (tried again; then it fails saying the check could not run, and why)."""
        self.applied_fingerprint = None
        self._unchecked = None
        concat = self.concatenated(plan)
        script = self._render(plan, concat)
        self.realised = {r.counter: r.counter in concat for r in plan.rules if r.members}
        names = [
            group_set_name(r.counter, fam, kind)
            for r in plan.rules
            if r.counter in concat
            for fam in (4, 6)
            for kind in _group_kinds(r, fam)
        ]
        if plan.mode == "idle":
            self._exec(script, "bundle")
            self.group_held = {}
            return
        for _ in range(APPLY_TRIES):
            before = _generation()
            self._exec(script, "bundle")
            groups = self._group_digests(names)
            try:
                held, _ = self.held()
            except OSError:
                held = None
            if held is None:  # cannot be read back: not sealed (the table reads as altered)
                self.group_held = groups
                self.seal_key.forget()  # the previous apply's seal no longer names what is in force
                return
            if _only_one_commit(before) or self._as_written(plan, concat, names, held, groups):
                self.group_held = groups
                self._seal(held)
                return
        self.group_held = dict.fromkeys(names)  # cannot tell: the drift check programs them again
        self.seal_key.forget()
        if self._unchecked is not None:
            raise ApplyError(
                f"the seal check could not run ({self._unchecked}): another process committed to nf_tables between "
                f"the agent's commit and its read-back ({APPLY_TRIES} times), and without a namespace of its own what "
                "was read back cannot be told from a rule inserted meanwhile: not sealed (the rules are in force)"
            )
        raise ApplyError(
            f"the kernel's rules changed while they were applied ({APPLY_TRIES} times, another process wrote to "
            "Ringfence's table between the agent's commit and its read-back): not sealed"
        )

    def _as_written(
        self, plan: Plan, concat: frozenset[str], names: Sequence[str], held: str, groups: dict[str, str | None]
    ) -> bool:
        """Whether ``held`` (and the group sets' digests) is what this plan's table reads back as
        when nobody else can write it: the same table (bundle sets empty: held() leaves them out)
        loaded by a forked child into a fresh network namespace of its own, read back there with
        the same readers. False when the child fails (the agent cannot tell: no seal), and when
        no namespace can be made on this host at all (neither CAP_SYS_ADMIN nor a user
        namespace): the check cannot run, so nothing tells what was read from what was written
        (why: ``_unchecked``, for :meth:`apply`'s error)."""
        script = self._render(plan, concat, bundle_elements=False)

        def work() -> bytes:  # in the child, in its own namespace
            if self.lib is not None:
                rc = self.lib._call(script, 0)[0]
            else:
                rc = run([self.nft, "-f", "-"], stdin=script, timeout=LISTING_TIMEOUT).returncode
            if rc != 0:
                raise ApplyError("the table could not be loaded in a fresh namespace")
            want, _ = self.held()
            listed = self._listed([f"list set {FAMILY} {TABLE} {name}\n" for name in names]) if names else []
            digests = {name: self._group_digest(name, items) for name, items in zip(names, listed, strict=True)}
            return json.dumps([want, digests]).encode()

        try:
            # a user namespace serves when CAP_SYS_ADMIN is not there (the nft binary, executed
            # without the library, keeps CAP_NET_ADMIN there as an ambient capability)
            lib = self.lib
            out = scratch.isolated(
                work, LISTING_TIMEOUT, lib.listing_pids if lib else None, user_ns=True, programs=lib is None
            )
        except scratch.Unavailable as exc:
            # cannot be checked on this host at all: not sealed (sealing what was read let a rule
            # inserted between commit and read-back be sealed: docs/agent.md)
            self._unchecked = str(exc)
            return False
        try:
            want, digests = json.loads(out) if out is not None else (None, {})
        except ValueError:
            return False
        # a group set whose live read failed is recorded as such (None: the drift check re-applies)
        return bool(want == held and all(groups[n] is None or groups[n] == digests.get(n) for n in names))

    def _group_digests(self, names: Sequence[str]) -> dict[str, str | None]:
        """Each group set's digest as the kernel lists it (one child for all: each is small, a
        group set is concatenated only while within the group bound); None for one that cannot
        be read (all of them, when the listing process fails)."""
        if not names:
            return {}
        try:
            listed = self._listings(*(f"list set {FAMILY} {TABLE} {name}\n" for name in names))
        except ReadError:
            return dict.fromkeys(names)
        return {name: self._group_digest(name, items) for name, items in zip(names, listed, strict=True)}

    @staticmethod
    def _group_digest(name: str, items: list[dict[str, Any]]) -> str | None:
        """The digest of group set ``name``'s elements as ``items`` (a listing) hold them; None
        when they do not hold it."""
        for item in items or []:
            s = item.get("set") if isinstance(item, dict) else None
            if isinstance(s, dict) and s.get("name") == name:
                elems = sorted(json.dumps(e, sort_keys=True) for e in s.get("elem", []))
                return hashlib.sha256(json.dumps(elems).encode()).hexdigest()
        return None

    def group_problem(self, items: list[dict[str, Any]] | None = None) -> str | None:
        """None when every group set ``g_*`` holds what this process last wrote to it (or this
        process applied nothing: it cannot tell); else what is wrong, in words. Neither the seal
        nor the enforced digest covers group sets (deltas change them), so an element added by
        another tool (``nft add element ... g_r_in_0_4p { 10.0.0.9 . tcp . 22 }``) is found here:
        the daemon's drift check asks and re-applies. A set nft cannot list now is skipped (the
        next check asks again); one whose baseline read failed counts as altered, and so does a
        listing process that died or timed out (the agent cannot tell: it programs them again)."""
        if not self.group_held:
            return None
        names = sorted(self.group_held)
        try:
            listed = (
                self._listings(*(f"list set {FAMILY} {TABLE} {name}\n" for name in names)) if items is None else None
            )
        except ReadError as exc:  # cannot tell: never taken for intact
            return f"group sets could not be read ({exc})"
        for i, (name, want) in enumerate(sorted(self.group_held.items())):
            now = self._group_digest(name, listed[i] if listed is not None else items or [])
            if want is None or (now is not None and now != want) or (now is None and items is not None):
                return f"group set {name} holds elements the agent did not put there (or lost some of its own)"
        return None

    def _seal(self, held: str) -> None:
        """Name what the kernel holds right after the apply (``held``, checked by :meth:`apply`):
        ``seal_<HMAC of the digest>`` (:meth:`held`, :class:`SealKey`; the key made here when
        there is none). A second transaction (the digest is of the kernel's own rendering of the
        rules, known only once they are in); should it fail, the table reads as altered and the
        next apply, or the daemon's drift check, programs it again: never reported as intact when
        it is not. A rule inserted after the read-back is not covered: the seal then mismatches."""
        # bound to this apply (a fresh nonce on record): an earlier table put back no longer checks
        seal = self.seal_key.new_seal(held)
        if seal is None:
            return
        if self._run(f"add chain {FAMILY} {TABLE} {SEAL}{seal}\n")[0] == 0:
            self.applied_fingerprint = self._fingerprint_of(held, seal)

    def group_delta(self, plan: Plan, set_name: str, new: PlanSet) -> frozenset[str] | None:
        """For a delta taking ``set_name`` from ``plan.sets[set_name]`` to ``new``: the counters of
        the grouped rules with a member on it that stay concatenated sets (their elements move
        with the delta; expanded ones need nothing beyond the set's own elements), or None when
        the delta moves a group across the bound: the caller re-applies the whole plan.

        Hysteresis: a concatenated group is expanded once past the bound, an expanded one is
        concatenated again only below half of it. A process that applied nothing yet (the CLI's
        apply-delta) knows a group's realisation from its size alone outside that band (listing
        the kernel's sets costs 0.3-1.4 s at 100,000 elements); inside it, it re-applies."""
        after = {**plan.sets, set_name: new}
        low = self.group_bound // 2
        keep: set[str] = set()
        for r in plan.rules:
            if not any(m.set == set_name for m in r.members):
                continue
            concat = self.realised.get(r.counter) if self.realised is not None else None
            if concat is None:
                before = _loads(r, plan.sets)
                if low <= before <= self.group_bound:
                    return None
                concat = before < low
            size = _loads(r, after)
            if (concat and size > self.group_bound) or (not concat and size < low):
                return None
            if concat:
                keep.add(r.counter)
        return frozenset(keep)

    def apply_delta(self, change: ElementChange) -> None:
        if change.add_v4 or change.add_v6 or change.remove_v4 or change.remove_v6 or change.groups:
            self._exec(self.render_delta(change), f"delta for set {change.set}")
        if self.group_held is not None:  # the new baseline of the group sets it moved (small reads)
            moved = sorted(
                {
                    name
                    for g in change.groups
                    if (name := group_set_name(g.counter, g.family, span_kind(g.span))) in self.group_held
                    and (g.add or g.remove)
                }
            )
            self.group_held.update(self._group_digests(moved))

    def flush(self) -> bool:
        present = self.table_present()
        if present:
            self._exec(f"delete table {FAMILY} {TABLE}\n", "flush")
        self.realised = None
        self.group_held = None
        return present

    def held(self) -> tuple[str | None, str | None]:
        """(the digest of what the kernel holds of Ringfence's own rules, the seal the agent wrote
        after its last apply): (None, None) when the table holds no chain (or is absent).

        Read over netlink (:mod:`.nftables_netlink`), the kernel's own bytes: a rule libnftables
        cannot render (an expression it does not know) is left out of every nft listing, never
        out of this. The digest covers every chain of the table (name, hook, priority, policy,
        type, flags) and every rule in it, in order, with all its expressions and user data
        (packet counters, handles and positions left out), the fail-safe sets ``fs_*`` and the
        anonymous sets the rules name, with their elements, and the table's flags. It leaves
        out the bundle sets and group sets (deltas change them; the enforced-policy digest covers
        the bundle sets against the control plane's, :meth:`group_problem` the group sets) and
        the drop-tuple sets (traffic). The seal is an empty chain without a hook named
        ``seal_<HMAC of the digest>`` (:class:`SealKey`: only a holder of the state directory's
        key can make it); one with a hook or a rule counts as a chain like any other. A few
        milliseconds at any bundle size (no set element of the bundle is read). OSError when the
        kernel cannot be asked."""
        for _ in range(3):
            read = self._read_kernel()
            if read is None:
                return None, None
            content, seals, generations = read
            if len(generations) <= 1:
                break  # one consistent generation (else the ruleset changed meanwhile: read again)
        digest = hashlib.sha256(json.dumps(content, sort_keys=True).encode()).hexdigest()
        return digest, (seals[0] if len(seals) == 1 else None)

    def _read_kernel(self) -> tuple[dict[str, Any], list[str], set[int]] | None:
        table = self.table()
        if table is None:
            return None
        chains = nl.chains(FAMILY, TABLE)
        if not chains:
            return None
        rules = nl.rules(FAMILY, TABLE)
        sets = nl.sets(FAMILY, TABLE)
        generations = {m.generation for m in (*chains, *rules, *sets)}
        by_chain: dict[bytes, list[Any]] = {}
        for r in rules:
            by_chain.setdefault(nl.text(r.attrs.get(nl.NFTA_RULE_CHAIN, b"")), []).append(_rule_content(r))
        content: dict[str, Any] = {"chain": {}, "set": {}, "table": table.flags}
        seals: list[str] = []
        for c in chains:
            name = nl.text(c.attrs.get(nl.NFTA_CHAIN_NAME, b""))
            held_rules = by_chain.pop(name, [])
            if name.startswith(SEAL.encode()) and not held_rules and _CHAIN_HOOK not in c.attrs:
                seals.append(name[len(SEAL) :].decode("latin-1"))
                continue
            attrs = [[k, c.attrs[k].hex()] for k in _CHAIN_ATTRS if k in c.attrs]
            content["chain"][name.hex()] = {"attrs": attrs, "rules": held_rules}
        if by_chain:  # rules of a chain the chain dump did not show: changed meanwhile
            generations.add(-1)
        for m in sets:
            name = nl.text(m.attrs.get(nl.NFTA_SET_NAME, b""))
            if name.decode("latin-1") not in _FAILSAFE_SETS and not name.startswith(b"__set"):
                continue
            elements, gens = nl.set_elements(FAMILY, TABLE, name)
            generations |= gens
            content["set"][name.hex()] = {
                "attrs": [[k, m.attrs[k].hex()] for k in _SET_ATTRS if k in m.attrs],
                "elem": sorted(e.hex() for e in elements),
            }
        return content, seals, generations

    def table(self) -> TableInfo | None:
        """Ringfence's table as the kernel holds it (its flags), None when absent. Asked over
        netlink, never listed through libnftables (see :mod:`.nftables_netlink`). A kernel that
        cannot be asked (no CAP_NET_ADMIN) counts as absent, as a listing nft refuses does."""
        try:
            return table_info(FAMILY, TABLE)
        except OSError:
            return None

    def kernel_problem(self) -> str | None:
        """None when the kernel holds Ringfence's rules as the agent applied them; else what is
        wrong, in words (``status`` shows it): also when it cannot be read (then the agent cannot
        tell, and ``apply`` programs it again)."""
        try:
            held, seal = self.held()
        except OSError as exc:
            return f"Ringfence's rules could not be read from the kernel ({exc})"
        if held is None:
            return ABSENT
        table = self.table()
        if table is not None and table.flags:
            owner = f" (netlink port {table.owner})" if table.flags & OWNER else ""
            return (
                f"Ringfence's table carries flags the agent never sets: {', '.join(table.flag_names())}{owner}"
                " (dormant: the kernel applies none of its rules; owner: only that process may change it)"
            )
        if seal is None:
            return "Ringfence's table carries no seal of the agent's (not programmed by it, or changed since)"
        if seal == held:  # what agents before the keyed seal wrote, or another process forged
            return "Ringfence's table carries an unkeyed seal (an older agent's, or forged): not trusted"
        if (missing := self.seal_key.missing()) is not None:
            return missing
        if not self.seal_key.sealed(held, seal):
            return (
                "Ringfence's rules do not carry this agent's seal: changed in the kernel since the agent applied them "
                "(a rule inserted, changed or removed, the chains flushed, or a fail-safe address added or removed), "
                "an earlier table of the agent's put back, or applied with another state directory (another key)"
            )
        return None

    def fingerprint(self) -> str | None:
        """A digest of the table's chains and rules and the fail-safe sets as the kernel holds
        them, and of the seal (:meth:`held`, over netlink); None when the table is absent.
        Compared with the one taken after the agent's own apply, it shows a rule inserted (one nft
        cannot render too), changed or deleted, a chain added or its policy changed, a fail-safe
        address added or removed, the table flushed or deleted."""
        held, seal = self.held()
        if held is None:
            return None
        return self._fingerprint_of(held, seal)

    @staticmethod
    def _fingerprint_of(held: str, seal: str | None) -> str:
        return hashlib.sha256(f"{held} {seal}".encode()).hexdigest()

    def enforced(self, set_names: Iterable[str] = ()) -> str:
        """The enforced-policy digest (:mod:`ringfence.enforced`) of what the kernel holds, read
        back with one ``nft list table`` (in a child process: :meth:`_listings`): the bundle
        rules' counters and verdicts in chain order, the defaults, and the bundle sets'
        addresses. What the agent meant to write plays no part; the control plane compares it
        with the digest of the bundle it published. Anything else in the table that differs from
        what the agent applied (its seal, :meth:`held`, read over netlink: a rule nft cannot
        render included) makes the document ``altered``: it never matches then. ``set_names``:
        unused (the kernel's set names carry the bundle's). :class:`ReadError` (an OSError) when
        the listing cannot be made: the agent cannot tell."""
        chains: dict[str, list[tuple[str, str]]] = {}
        sets: dict[str, list[str]] = {}
        table = self.table()
        if table is None:
            return enforced.digest(chains, sets)
        if table.flags:  # dormant or another's: enforces nothing of the agent's
            return enforced.digest(chains, sets, altered=True)
        held, seal = self.held()
        (items,) = self._listings(f"list table {FAMILY} {TABLE}\n")
        flagged = False  # made dormant since the netlink read: the listing shows it (in the child)
        unknown = False  # a bundle-set element in a form the agent cannot read
        for item in items:
            if "table" in item:
                flagged = flagged or bool(item["table"].get("flags"))
            elif "set" in item:
                s = item["set"]
                m = _BUNDLE_SET.fullmatch(str(s.get("name", "")))
                if m is None:
                    continue
                members = sets.setdefault(m.group(1), [])
                for e in s.get("elem", []):
                    member = _element(e)
                    if member is None:  # a form never written by the agent: never skipped silently
                        unknown = True
                    else:
                        members.append(member)
            elif "rule" in item:
                r = item["rule"]
                direction = _CHAIN_DIRECTION.get(str(r.get("chain")))
                if direction is None:
                    continue
                counter = verdict = None
                for x in r.get("expr", []):
                    if isinstance(x, dict) and isinstance(x.get("counter"), str):
                        counter = x["counter"]
                    elif isinstance(x, dict) and (found := _VERDICTS.intersection(x)):
                        verdict = min(found)
                if verdict is None:
                    continue  # the agent's drop-tuple updates: no verdict
                if counter is not None and _RULE_COUNTER.fullmatch(counter):
                    chains.setdefault(direction, []).append((counter, verdict))
                elif not str(r.get("comment", "")).startswith("failsafe "):
                    # a verdict rule the agent never writes (only its fail-safes have no bundle
                    # counter): in the document, so it never matches, seal or no seal
                    chains.setdefault(direction, []).append(("", verdict))
        altered = (
            (held is not None and not self.seal_key.sealed(held, seal))
            or flagged
            or unknown
            or self.group_problem(items) is not None
        )
        return enforced.digest(chains, sets, altered=altered)

    def programmed(self) -> bool:
        """Whether the kernel holds Ringfence's rules as the agent applied them (what ``apply``
        and ``status`` trust): the table, its chains and rules and fail-safe sets matching the
        seal written after the apply. A flushed table, an inserted or deleted rule, a fail-safe
        address added: not programmed, so ``apply`` programs it again."""
        return self.kernel_problem() is None

    def table_present(self) -> bool:
        return self.table() is not None

    def _json(self, *args: str) -> list[dict[str, Any]]:
        (items,) = self._listings("list " + " ".join(args) + "\n")
        return items

    def list_set(self, name: str) -> list[str]:
        out: list[str] = []
        for item in self._json("set", FAMILY, TABLE, name):
            for e in item.get("set", {}).get("elem", []):
                member = _element(e)
                out.append(str(e) if member is None else member)
        return out

    def observe(self, plan: Plan, previous: dict[str, int]) -> Observation:
        # The observer's reads fail as "no observation" (the daemon's observer logs it), never as
        # cannot-tell for the drift check (read_failure): only held() and enforced() say whether
        # the rules are intact, and a slow read elsewhere must not re-apply them every round.
        obs = Observation()
        # over netlink, filtered by table: `list counters table` fetched every table's set elements
        obs.counters.update(nl.counters(FAMILY, TABLE))
        drop_points = [r.counter for r in plan.rules if r.drops] + ["d_in", "d_out"]
        # nothing new dropped at a point: its set is not listed; the others in one child
        wanted = [
            (point, f"t_{point}_{fam}")
            for point in drop_points
            if obs.counters.get(point, 0) != previous.get(point, 0)
            for fam in (4, 6)
        ]
        listed = self._listed([f"list set {FAMILY} {TABLE} {name}\n" for _, name in wanted]) if wanted else []
        for (point, _), items in zip(wanted, listed, strict=True):
            for item in items:
                for e in item.get("set", {}).get("elem", []):
                    tup = _tuple(point, e)
                    if tup is not None:
                        obs.tuples.append(tup)
        return obs


def _generation() -> int | None:
    try:
        return nl.generation()
    except OSError:
        return None


def _only_one_commit(before: int | None) -> bool:
    """Whether exactly one commit changed the ruleset since generation ``before`` (read before
    the caller's own commit, which changed it): then what the caller read back since is its own
    commit's alone. A neighbour committing to its own table also counts (the caller then checks
    another way); 32 bits do not wrap within one apply."""
    after = _generation()
    return before is not None and after is not None and after == (before + 1) & 0xFFFFFFFF


def _element(e: Any) -> str | None:
    """One set element of an ``nft -j`` listing as the agent writes it (address, prefix, range);
    None for any other form. An element with a comment, a counter or a timeout is listed as
    ``{"elem": {"val": X, ...}}``: X is read (skipping it hid an address added with a comment)."""
    if isinstance(e, dict) and set(e) == {"elem"} and isinstance(e["elem"], dict):
        e = e["elem"].get("val")
    if isinstance(e, str):
        return e
    if isinstance(e, dict) and isinstance(e.get("prefix"), dict):
        p = e["prefix"]
        if isinstance(p.get("addr"), str) and isinstance(p.get("len"), int):
            return f"{p['addr']}/{p['len']}"
    if isinstance(e, dict) and isinstance(e.get("range"), list) and len(e["range"]) == 2:
        low, high = e["range"]
        if isinstance(low, str) and isinstance(high, str):
            return f"{low}-{high}"
    return None


def _rule_content(rule: nl.Message) -> list[Any]:
    return [
        [k, nl.expressions(rule.attrs[k]) if k == 4 else rule.attrs[k].hex()] for k in _RULE_ATTRS if k in rule.attrs
    ]


def _tuple(point: str, e: Any) -> DropTuple | None:
    if not isinstance(e, dict) or "elem" not in e:
        return None
    el = e["elem"]
    val = el.get("val", {}).get("concat")
    if not isinstance(val, list) or len(val) != 5:
        return None
    src, dst, proto, sport, dport = val
    proto = str(proto)
    if proto == "ipv6-icmp":
        proto = "icmpv6"
    packets = int(el.get("counter", {}).get("packets", 1))
    ports = proto in ("tcp", "udp")  # for anything else `th` reads other header bytes
    return DropTuple(
        point,
        str(src),
        str(dst),
        proto,
        int(dport) if ports and isinstance(dport, int) else None,
        packets,
        sport=int(sport) if ports and isinstance(sport, int) else None,
    )
