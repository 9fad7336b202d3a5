"""iptables + ipset for hosts without nftables: same plan, same order, same semantics.

A bundle is all or nothing across ipset, iptables and ip6tables. The new generation's ipsets
(suffix ``a`` / ``b``, alternating) are built first; one ``iptables-restore --noflush`` then
replaces the ``RF-IN`` / ``RF-OUT`` chains in a single commit that references them, then one
``ip6tables-restore --noflush`` does the same for IPv6. If the IPv6 commit fails, the IPv4
chains are restored from the ``iptables-save -c`` taken before (the previous generation's sets
still exist), and the new sets are destroyed; only after both commits succeed are the previous
generation's sets destroyed. Between the two commits IPv4 runs the new bundle and IPv6 the
previous one for a few milliseconds: two tables cannot be committed in one transaction.

A set delta is one change to the live generation's sets, in-process through libipset (the
``ipset`` binary when the library is missing); ipset keeps the lines before a failing one, so a
failed delta is undone by its inverse. Only Ringfence's chains, the two jumps into them and
``rf*`` ipsets are ever touched: a bundle set ``S`` lives in ``rf-s-S-4a`` (:func:`ipset_name`).

A grouped rule (bundle ``members``) is expanded into its members' rules, one after another under
the group's counter: each matches its member's ipset and services, exactly as a plain rule.

After every whole apply the agent adds an empty chain ``RF-S-<mac>`` to IPv4's filter table: an
HMAC-SHA256 (keyed by the state directory's ``seal.key``, :class:`SealKey`, shared with nftables)
of what the kernel then holds of Ringfence's rules in both families (:meth:`IptablesBackend.held`).
``status``, ``apply`` and the heartbeat trust the chains only while a fresh read-back matches it.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import hashlib
import ipaddress
import json
import os
import re
import threading
from collections.abc import Iterable
from pathlib import Path
from typing import Any

from ringfence import enforced
from ringfence_agent.backends import (
    ABSENT,
    TUPLE_LINGER_S,
    ApplyError,
    DropTuple,
    ElementChange,
    Observation,
    agent_uid,
    run,
    scratch,
)
from ringfence_agent.backends import nftables_netlink as nl
from ringfence_agent.backends.sealkey import SealKey
from ringfence_agent.plan import METADATA_PORTS, Direction, Match, Plan, PlanRule, joined_ports, safe_comment

CHAINS = {"inbound": ("RF-IN", "INPUT"), "outbound": ("RF-OUT", "OUTPUT")}
_GEN = re.compile(r'--comment "?ringfence gen=([ab])')
# a bundle rule or default as iptables-save prints it: chain, counter (from the comment), verdict
_RULE = re.compile(r'^-A (RF-IN|RF-OUT) .*--comment "?(r_(?:in|out)_\d+|d_in|d_out)\b.* -j (ACCEPT|DROP)\b')
_BUNDLE_IPSET = re.compile(r"rf-[sh]-(.+)-[46]([ab])")
# The seal: an empty chain named by a MAC of what the kernel held right after the apply. Keyed: a
# digest alone could be recomputed after loosening the chains by any CAP_NET_ADMIN process in the
# namespace (a --net=host container, a CNI plugin), which cannot read the state directory's key.
SEAL = "RF-S-"
_SEAL_HEX = 23  # a chain name holds 28 characters: 92 bits of the MAC
_SEAL_CONTEXT = b"ringfence iptables seal v1\n"
_SEAL_CHAIN = re.compile(r"^:(RF-S-\S*) ", re.M)
_FAILSAFE_IPSETS = ("rf-fs-admin", "rf-fs-dns", "rf-fs-cp", "rf-fs-meta")
# A whole apply whose read-back is not what it wrote (another process changed Ringfence's chains
# between the commit and the read) is done again this many times, then fails unsealed.
APPLY_TRIES = 3
_SCRATCH_TIMEOUT = 60.0  # loading the rules, sets and all, into a fresh namespace and reading them


def _first(lines: Iterable[str], parent: str) -> str | None:
    """The first rule of a built-in chain in an ``iptables-save`` (``-c`` counters stripped)."""
    for line in lines:
        line = re.sub(r"^\[\d+:\d+\] ", "", line)
        if line.startswith(f"-A {parent} "):
            return line
    return None


def _chain_rules(lines: Iterable[str], chain: str) -> list[str]:
    return [x for x in lines if x.startswith(f"-A {chain} ")]


def _nf_rules(family: int) -> dict[str, list[nl.Message]] | None:
    """iptables-nft: the rules of table ``filter`` by chain as nf_tables holds them (netlink,
    the kernel's own bytes); None when nf_tables has no such table (iptables-legacy: then
    iptables-save shows everything). OSError when the kernel cannot be asked."""
    fam = "ip" if family == 4 else "ip6"
    if nl.table_info(fam, "filter") is None:
        return None
    out: dict[str, list[nl.Message]] = {}
    for r in nl.rules(fam, "filter"):
        out.setdefault(nl.text(r.attrs.get(nl.NFTA_RULE_CHAIN, b"")).decode("latin-1"), []).append(r)
    return out


def _unshown(family: int, lines: list[str]) -> str | None:
    """What iptables-save (iptables-nft 1.8.9) cannot show and decides before or inside
    Ringfence's chains: a rule holding an expression it does not know is left out of its output
    whole and silently, so an ``accept`` put before the jump, or into RF-IN/RF-OUT, was invisible.
    Over netlink: the first rule of INPUT/OUTPUT must be the jump, and RF-IN/RF-OUT must hold
    as many rules as iptables-save shows. Other software's rules after the jump are its own."""
    name = "IPv4" if family == 4 else "IPv6"
    try:
        held = _nf_rules(family)
    except OSError as exc:  # cannot tell: never intact
        return f"{name}: the kernel's rules could not be read over netlink ({exc})"
    if held is None:
        return None
    for chain, parent in CHAINS.values():
        first = held.get(parent, [])
        if not first or not nl.jumps_only_to(first[0].attrs.get(4, b""), chain):
            return f"{name}: a rule iptables-save does not show comes before the jump from {parent} to {chain}"
        if len(held.get(chain, [])) != len(_chain_rules(lines, chain)):
            return f"{name}: {chain} holds rules iptables-save does not show"
    return None


def _jump_first(family: int, parent: str, chain: str) -> bool:
    """Whether nf_tables holds the jump to ``chain`` as the first rule of ``parent`` (True on
    iptables-legacy; False when it cannot be asked: moving the jump first again is harmless)."""
    try:
        held = _nf_rules(family)
    except OSError:
        return False
    if held is None:
        return True
    first = held.get(parent, [])
    return bool(first) and nl.jumps_only_to(first[0].attrs.get(4, b""), chain)


def _kernel_rules(family: int, portable: bool = False) -> str | None:
    """iptables-nft: a digest of RF-IN/RF-OUT and the first rule of INPUT/OUTPUT as nf_tables
    holds them (expressions and user data, no counts); None on iptables-legacy. ``portable``:
    with the ipset index in each ``-m set`` match zeroed (the kernel's slot number of the set,
    which differs from one network namespace to another; iptables-save shows the set's name)."""
    try:
        held = _nf_rules(family)
    except OSError as exc:
        raise ApplyError(f"the kernel's rules could not be read over netlink: {exc}") from None
    if held is None:
        return None

    def exprs(r: nl.Message) -> list[object]:
        out = nl.expressions(r.attrs.get(4, b""))
        return [_portable_match(x) for x in out] if portable else out

    content: dict[str, list[Any]] = {
        chain: [[exprs(r), r.attrs.get(7, b"").hex()] for r in rules]
        for chain, rules in held.items()
        if chain in ("RF-IN", "RF-OUT")
    }
    for _, parent in CHAINS.values():
        content[f"first {parent}"] = [exprs(r) for r in held.get(parent, [])[:1]]
    return hashlib.sha256(json.dumps(content, sort_keys=True).encode()).hexdigest()


def _fingerprinted(text: str) -> list[str]:
    """The lines of one family's ``iptables-save`` a fingerprint covers: RF-IN/RF-OUT's rules and
    the jumps into them."""
    return [
        x
        for x in text.splitlines()
        if x.startswith(("-A RF-IN ", "-A RF-OUT ")) or x in ("-A INPUT -j RF-IN", "-A OUTPUT -j RF-OUT")
    ]


def _fingerprint_of(texts: dict[int, str], kernel: dict[int, str | None], seals: dict[int, list[str]]) -> str:
    """:meth:`IptablesBackend.fingerprint` of one read: each family's ``iptables-save -t filter``
    (``texts``), its :func:`_kernel_rules` (``kernel``) and its seal chains' lines (``seals``)."""
    lines: list[str] = []
    for family in (4, 6):
        lines += [f"{family} {line}" for line in _fingerprinted(texts[family])]
        if lines:  # a rule put before a jump decides before Ringfence's chain does
            lines += [
                f"{family} first {parent}: {_first(texts[family].splitlines(), parent)}"
                for _, parent in CHAINS.values()
            ]
    # iptables-nft: the same rules as the kernel holds them, what iptables-save cannot show too
    lines += [f"{family} kernel {held}" for family in (4, 6) if (held := kernel[family]) is not None]
    lines += [f"{family} {line}" for family in (4, 6) for line in seals[family]]
    return hashlib.sha256("\n".join(lines).encode()).hexdigest()


def _portable_match(expr: object) -> object:
    """An ``xt`` expression naming ipsets (the ``set`` match, the ``SET`` target) with each
    ipset index in its info (struct xt_set_info: a 16-bit index first, every 4 bytes; the match
    has one, the target up to three) zeroed; any other expression as it is."""
    if not isinstance(expr, list) or len(expr) != 2 or expr[0] not in (b"match".hex(), b"target".hex()):
        return expr
    attrs = nl.attributes(bytes.fromhex(str(expr[1])))
    name = next((nl.text(v) for k, v in attrs if k == 1), b"")  # NFTA_MATCH_NAME / NFTA_TARGET_NAME
    slots = {b"set": 1, b"SET": 3}.get(name, 0)
    if not slots:
        return expr
    kept: list[list[object]] = []
    for k, v in attrs:
        if k == 3:  # NFTA_MATCH_INFO / NFTA_TARGET_INFO
            info = bytearray(v)
            for at in range(0, min(4 * slots, len(info) - 1), 4):
                info[at : at + 2] = b"\0\0"
            v = bytes(info)
        kept.append([k, v.hex()])
    return [expr[0], kept]


def _rule_order(item: tuple[str, str]) -> tuple[int, int]:
    """Chain order: the rules by their position, the default last."""
    counter = item[0]
    return (1, 0) if counter.startswith("d_") else (0, int(counter.rsplit("_", 1)[1]))


_COUNTER = re.compile(r"^\[(\d+):(\d+)\] -A (RF-IN|RF-OUT) .*--comment \"?(r_(?:in|out)_\d+|d_in|d_out)\b")


IPSET_MAXNAMELEN = 31  # the kernel's IPSET_MAXNAMELEN (32) less the NUL


def ipset_name(bundle_set: str, family: int, gen: str) -> str:
    """The ipset of a bundle set: ``rf-s-<set>-4a``, inside the ``rf-`` namespace the agent owns
    (a bundle set named like another program's ipset must never flush or refill it). A name too
    long for ipset (a set name may have 24 characters) becomes ``rf-h-<16 hex of its SHA-256>``:
    stable, so bundles, deltas and drops all derive the same name without a stored mapping."""
    name = f"rf-s-{bundle_set}-{family}{gen}"
    if len(name) <= IPSET_MAXNAMELEN:
        return name
    return f"rf-h-{hashlib.sha256(bundle_set.encode()).hexdigest()[:16]}-{family}{gen}"


# Drop tuples: ipset has no type with two ports, so each drop point feeds two sets from the same
# packet, (src, proto:dport, dst) and (src, proto:sport, dst); observe() pairs them where exact.
TUPLE_SIZE = 1024  # maxelem: kernel memory bound per set (a full set only stops recording)


def dport_set(point: str, family: int, gen: str) -> str:
    return f"rf-t-{point}-{family}{gen}"


def sport_set(point: str, family: int, gen: str) -> str:
    return f"rf-ts-{point}-{family}{gen}"


def _track(point: str, family: int, gen: str) -> list[str]:
    """SET targets (non-terminating; a full set only fails to add). The dport set is fed first."""
    return [
        f"-j SET --add-set {dport_set(point, family, gen)} src,dst,dst --exist",
        f"-j SET --add-set {sport_set(point, family, gen)} src,src,dst --exist",
    ]


def _split_zero(items: Iterable[str]) -> list[str]:
    """hash:net refuses a /0: cover it with two /1 halves. Plan elements are canonical CIDRs, so
    only a prefix length of 0 is parsed (``ipaddress`` on every element cost ~0.3 s per 100,000)."""
    out: list[str] = []
    for x in items:
        _, slash, plen = x.rpartition("/")
        if slash and plen.isdigit() and int(plen) == 0:
            out.extend(str(s) for s in ipaddress.ip_network(x).subnets(1))
        else:
            out.append(x)
    return out


def _svc(m: Match, family: int) -> str:
    if m.proto is None:
        return ""
    if m.proto in ("tcp", "udp"):
        if m.ports is None:
            return f"-p {m.proto}"
        lo, hi = m.ports
        return f"-p {m.proto} --dport {lo}" if lo == hi else f"-p {m.proto} --dport {lo}:{hi}"
    if m.proto == "icmp":
        return "-p icmp" + (f" --icmp-type {m.icmp_type}" if m.icmp_type is not None else "")
    return "-p ipv6-icmp" + (f" --icmpv6-type {m.icmp_type}" if m.icmp_type is not None else "")


def _fams(m: Match) -> tuple[int, ...]:
    return (4,) if m.proto == "icmp" else (6,) if m.proto == "icmpv6" else (4, 6)


def _j(*parts: str) -> str:
    return " ".join(p for p in parts if p)


class IptablesRenderer:
    def sets_script(self, plan: Plan, gen: str, bundle_elements: bool = True) -> str:
        """``ipset restore`` input creating the generation's sets; without ``bundle_elements`` the
        bundle sets are created empty (what :meth:`IptablesBackend.held` reads is the same: it
        leaves them out)."""
        lines: list[str] = []

        def create(name: str, family: int, items: Iterable[str]) -> None:
            fam = "inet" if family == 4 else "inet6"
            lines.append(f"create {name} hash:net family {fam} hashsize 1024 maxelem 1048576 -exist")
            lines.append(f"flush {name}")
            lines.extend(f"add {name} {x}" for x in _split_zero(items))

        fs = plan.failsafes
        for label, v4, v6 in (
            ("rf-fs-admin", fs.admin_v4, fs.admin_v6),
            ("rf-fs-dns", fs.dns_v4, fs.dns_v6),
            ("rf-fs-cp", fs.control_v4, fs.control_v6),
            ("rf-fs-meta", fs.metadata_v4, fs.metadata_v6),
        ):
            create(f"{label}-4{gen}", 4, v4)
            create(f"{label}-6{gen}", 6, v6)
        owners: dict[str, str] = {}
        for name, s in sorted(plan.sets.items()):
            other = owners.setdefault(ipset_name(name, 4, gen), name)
            if other != name:  # two names with one 64-bit hash: refuse rather than merge them
                raise ApplyError(f"sets {other} and {name} map to one ipset name {ipset_name(name, 4, gen)}")
            create(ipset_name(name, 4, gen), 4, s.v4 if bundle_elements else ())
            create(ipset_name(name, 6, gen), 6, s.v6 if bundle_elements else ())
        for point in self.drop_points(plan):
            for fam in (4, 6):
                f = "inet" if fam == 4 else "inet6"
                for name in (dport_set(point, fam, gen), sport_set(point, fam, gen)):
                    lines.append(
                        f"create {name} hash:ip,port,ip family {f} timeout {TUPLE_LINGER_S} maxelem {TUPLE_SIZE} -exist"
                    )
                    lines.append(f"flush {name}")
        return "\n".join(lines) + "\n"

    @staticmethod
    def drop_points(plan: Plan) -> list[str]:
        return [r.counter for r in plan.rules if r.drops] + ["d_in", "d_out"]

    def rules_script(
        self,
        plan: Plan,
        family: int,
        gen: str,
        add_jumps: Iterable[str],
        move_jumps: Iterable[str] = (),
        unseal: Iterable[str] = (),
    ) -> str:
        """``move_jumps``: parents whose jump into our chain is not their first rule: moved first
        (a rule before it would decide before Ringfence's chain does). ``unseal``: the seal chains
        held before, removed in the same commit (the new rules are sealed once read back)."""
        out = ["*filter"]
        out += [f"-X {name}" for name in unseal]
        for chain, _ in CHAINS.values():
            out.append(f":{chain} - [0:0]")
        for parent in move_jumps:
            out.append(f"-D {parent} -j {'RF-IN' if parent == 'INPUT' else 'RF-OUT'}")
        for parent in [*add_jumps, *move_jumps]:
            chain = "RF-IN" if parent == "INPUT" else "RF-OUT"
            out.append(f"-I {parent} 1 -j {chain}")
        for direction in ("inbound", "outbound"):
            chain = CHAINS[direction][0]
            out.append(f'-A {chain} -m comment --comment "ringfence gen={gen} version={plan.version} mode={plan.mode}"')
            out.extend(f"-A {chain} {line}" for line in self._failsafes(plan, direction, family, gen))
            for r in plan.by_direction(direction):
                out.extend(f"-A {chain} {line}" for line in self._rule(plan, r, family, gen))
            point = "d_in" if direction == "inbound" else "d_out"
            verdict = "DROP" if plan.mode == "enforce" else "ACCEPT"
            out.extend(f"-A {chain} {track}" for track in _track(point, family, gen))
            out.append(f'-A {chain} -m comment --comment "{point} default {plan.mode}" -j {verdict}')
        out.append("COMMIT")
        return "\n".join(out) + "\n"

    @staticmethod
    def _failsafes(plan: Plan, direction: Direction, family: int, gen: str) -> list[str]:
        fs = plan.failsafes
        # inbound from this host only (nft.py's loopback fail-safe says why)
        io = "-i lo -m addrtype --src-type LOCAL" if direction == "inbound" else "-o lo"
        lines = [f"{io} -j ACCEPT", "-m conntrack --ctstate ESTABLISHED,RELATED -j ACCEPT"]
        if family == 6:
            types = (
                ("neighbour-solicitation", "neighbour-advertisement", "router-advertisement", "redirect")
                if direction == "inbound"
                else ("neighbour-solicitation", "neighbour-advertisement", "router-solicitation")
            )
            lines += [f"-p ipv6-icmp --icmpv6-type {t} -j ACCEPT" for t in types]
        if fs.dhcp:
            if family == 4:
                lines.append(
                    "-p udp --sport 67 --dport 68 -j ACCEPT"
                    if direction == "inbound"
                    else "-p udp --sport 68 --dport 67 -j ACCEPT"
                )
            else:
                lines.append(
                    "-p udp --sport 547 --dport 546 -j ACCEPT"
                    if direction == "inbound"
                    else "-p udp --sport 546 --dport 547 -j ACCEPT"
                )
        if direction == "inbound":
            for m in fs.admin_ports:
                if family in _fams(m):
                    lines.append(_j(_svc(m, family), f"-m set --match-set rf-fs-admin-{family}{gen} src -j ACCEPT"))
        else:
            dns = f"rf-fs-dns-{family}{gen}"
            lines.append(f"-p udp --dport 53 -m set --match-set {dns} dst -j ACCEPT")
            lines.append(f"-p tcp --dport 53 -m set --match-set {dns} dst -j ACCEPT")
            meta = f"-m set --match-set rf-fs-meta-{family}{gen} dst"
            lines.extend(f"{_svc(m, family)} {meta} -j ACCEPT" for m in METADATA_PORTS)
            # the agent's own connection only: a socket of the user it runs as (backends.agent_uid)
            cp = f"-m set --match-set rf-fs-cp-{family}{gen} dst -m owner --uid-owner {agent_uid()}"
            lines.extend(f"{_svc(m, family)} {cp} -j ACCEPT" for m in fs.control_ports if family in _fams(m))
        return lines

    @staticmethod
    def _rule(plan: Plan, r: PlanRule, family: int, gen: str) -> list[str]:
        side = "src" if r.direction == "inbound" else "dst"
        verdict = "ACCEPT" if r.action == "allow" or plan.mode != "enforce" else "DROP"
        lines: list[str] = []
        for part in r.parts():  # a grouped rule: its members one after another, under its counter
            for m in joined_ports(part.services) if r.members else part.services:
                if family not in _fams(m):
                    continue
                match = f"-m set --match-set {ipset_name(part.set, family, gen)} {side}" if part.set is not None else ""
                comment = f'-m comment --comment "{r.counter} {safe_comment(part.rule_id, 200)}"'
                if r.drops:
                    lines.extend(_j(_svc(m, family), match, track) for track in _track(r.counter, family, gen))
                lines.append(_j(_svc(m, family), match, comment, f"-j {verdict}"))
        return lines

    def render(self, plan: Plan) -> str:
        if plan.mode == "idle":
            return "# idle: Ringfence chains and sets removed\n"
        gen = "a"
        return (
            f"# ipset restore\n{self.sets_script(plan, gen)}"
            f"# iptables-restore --noflush\n{self.rules_script(plan, 4, gen, ['INPUT', 'OUTPUT'])}"
            f"# ip6tables-restore --noflush\n{self.rules_script(plan, 6, gen, ['INPUT', 'OUTPUT'])}"
        )

    @staticmethod
    def delta_script(change: ElementChange, gen: str) -> str:
        lines = [f"del {ipset_name(change.set, 4, gen)} {x}" for x in _split_zero(change.remove_v4)]
        lines += [f"del {ipset_name(change.set, 6, gen)} {x}" for x in _split_zero(change.remove_v6)]
        lines += [f"add {ipset_name(change.set, 4, gen)} {x}" for x in _split_zero(change.add_v4)]
        lines += [f"add {ipset_name(change.set, 6, gen)} {x}" for x in _split_zero(change.add_v6)]
        return "\n".join(lines) + "\n"

    def render_delta(self, change: ElementChange) -> str:
        return self.delta_script(change, "a")


_ERRFN = ctypes.CFUNCTYPE(ctypes.c_int, ctypes.c_void_p, ctypes.c_void_p, ctypes.c_int, ctypes.c_char_p)
_STDERRFN = ctypes.CFUNCTYPE(ctypes.c_int, ctypes.c_void_p, ctypes.c_void_p)
_OUTFN = ctypes.CFUNCTYPE(ctypes.c_int, ctypes.c_void_p, ctypes.c_void_p, ctypes.c_char_p)


class LibIpset:
    """libipset in-process for set deltas (what the ``ipset`` binary wraps): one element costs
    ~10 µs instead of a fork/exec of ``ipset`` (1–7 ms, more on a busy host). Whole bundles still
    go through ``ipset restore``, which batches.

    The library's default error handlers print and call ``exit()``: ours record the message. They
    are declared without the C variadic tail, which the Linux x86-64 and arm64 calling conventions
    pass in the same registers as fixed arguments. A fresh handle per call; one lock."""

    def __init__(self) -> None:
        lib = ctypes.CDLL(ctypes.util.find_library("ipset") or "libipset.so.13")
        lib.ipset_load_types.restype = None
        lib.ipset_init.restype = ctypes.c_void_p
        lib.ipset_fini.argtypes = [ctypes.c_void_p]
        lib.ipset_session.restype = ctypes.c_void_p
        lib.ipset_session.argtypes = [ctypes.c_void_p]
        lib.ipset_session_report_msg.restype = ctypes.c_char_p
        lib.ipset_session_report_msg.argtypes = [ctypes.c_void_p]
        lib.ipset_session_report_reset.argtypes = [ctypes.c_void_p]
        lib.ipset_custom_printf.argtypes = [ctypes.c_void_p, _ERRFN, _STDERRFN, _OUTFN, ctypes.c_void_p]
        lib.ipset_parse_line.argtypes = [ctypes.c_void_p, ctypes.c_char_p]
        lib.ipset_parse_line.restype = ctypes.c_int
        lib.ipset_load_types()
        self.lib = lib
        self.lock = threading.Lock()
        self.errors: list[str] = []
        self.callbacks = (_ERRFN(self._custom_error), _STDERRFN(self._standard_error), _OUTFN(self._output))

    def _report(self, handle: int | None, fallback: bytes | None) -> int:
        session = self.lib.ipset_session(handle) if handle else None
        msg = self.lib.ipset_session_report_msg(session) if session else None
        self.errors.append((msg or fallback or b"unknown ipset error").decode(errors="replace").strip())
        if session:
            self.lib.ipset_session_report_reset(session)
        return -1

    def _custom_error(self, handle: int | None, _p: int | None, status: int, msg: bytes | None) -> int:
        return self._report(handle, msg) if status else 0

    def _standard_error(self, handle: int | None, _p: int | None) -> int:
        return self._report(handle, None)

    @staticmethod
    def _output(_session: int | None, _p: int | None, _fmt: bytes | None) -> int:
        return 0

    def run(self, lines: list[str]) -> tuple[int, str]:
        """Run ipset commands in order, stopping at the first error: (lines done, error or "")."""
        with self.lock:
            handle = self.lib.ipset_init()
            if not handle:
                return 0, "ipset_init failed"
            try:
                if self.lib.ipset_custom_printf(handle, *self.callbacks, None) != 0:
                    return 0, "ipset_custom_printf failed"
                for done, line in enumerate(lines):
                    self.errors.clear()
                    rc = self.lib.ipset_parse_line(handle, ctypes.create_string_buffer(line.encode()))
                    if rc != 0 or self.errors:  # some errors are reported with rc 0
                        return done, "; ".join(self.errors) or f"ipset_parse_line returned {rc}"
                return len(lines), ""
            finally:
                self.lib.ipset_fini(handle)


def _load_lib() -> LibIpset | None:
    if os.environ.get("RINGFENCE_IPSET_CLI") == "1":
        return None
    try:
        return LibIpset()
    except (OSError, AttributeError):
        return None


class IptablesBackend(IptablesRenderer):
    name = "iptables"

    def __init__(self, state_dir: Path | None = None) -> None:
        """``state_dir``: the agent's, where the key of the seal is (without one, a seal only
        this process can check: any other reads the rules as altered)."""
        self._sports: dict[_DropKey, int | None] = {}  # dport tuple → the sport paired with it
        # the generation this process committed last: a delta then needs no iptables-save
        self._gen: str | None = None
        self.lib = _load_lib()
        self.seal_key = SealKey(state_dir, _SEAL_CONTEXT, _SEAL_HEX)
        # the fingerprint of what the last apply's seal read back (:meth:`fingerprint` of that
        # read, the seal's name with it): the daemon's drift baseline; None when not sealed
        self.applied_fingerprint: str | None = None
        # why the last apply's seal check could not run (no namespace of its own on this host):
        # that apply was sealed as read (see :meth:`apply`); None when it was checked
        self.seal_unchecked: str | None = None

    def _save(self, family: int, counters: bool = False) -> str:
        cmd = ["iptables-save" if family == 4 else "ip6tables-save", "-t", "filter"]
        if counters:
            cmd.append("-c")
        proc = run(cmd)
        return proc.stdout if proc.returncode == 0 else ""

    def fingerprint(self) -> str | None:
        """A digest of Ringfence's chains and the jumps into them, both families, as the kernel
        holds them, of the first rule of INPUT/OUTPUT and of the seal's name (no counters; ipset
        contents left out: deltas change them); None when absent (a seal left alone counts as
        absent: ``flush`` removes it last)."""
        texts: dict[int, str] = {}
        for family in (4, 6):
            proc = run(["iptables-save" if family == 4 else "ip6tables-save", "-t", "filter"])
            if proc.returncode != 0:  # cannot tell: never reported as a tamper
                raise ApplyError(f"iptables-save failed: {proc.stderr.strip()[:200]}")
            texts[family] = proc.stdout
        seals = {family: [x for x in texts[family].splitlines() if x.startswith(f":{SEAL}")] for family in (4, 6)}
        if not any(_fingerprinted(texts[family]) for family in (4, 6)):
            return None
        return _fingerprint_of(texts, {family: _kernel_rules(family) for family in (4, 6)}, seals)

    def _family_problem(self, family: int, text: str) -> str | None:
        """None when one family holds Ringfence's chains as the agent applies them: the jumps
        into RF-IN/RF-OUT are the first rules of INPUT/OUTPUT, each chain starts with the marker of
        one generation and ends with its default."""
        lines = text.splitlines()
        name = "IPv4" if family == 4 else "IPv6"
        gens = set()
        for direction, (chain, parent) in CHAINS.items():
            if _first(lines, parent) != f"-A {parent} -j {chain}":
                return f"{name}: the first rule of {parent} is not the jump to {chain}"
            rules = _chain_rules(lines, chain)
            m = _GEN.search(rules[0]) if rules else None
            if m is None:
                return f"{name}: {chain} does not start with Ringfence's marker"
            gens.add(m.group(1))
            point = "d_in" if direction == "inbound" else "d_out"
            if f'--comment "{point} default' not in rules[-1]:
                return f"{name}: {chain} does not end with its default ({point})"
        if len(gens) != 1:
            return f"{name}: RF-IN and RF-OUT are of different generations"
        return _unshown(family, lines)

    def kernel_problem(self) -> str | None:
        """None when both families hold Ringfence's chains as the agent applies them
        (:meth:`_family_problem`), of one generation, and as the agent sealed them (every rule
        inside them, the jumps, the fail-safe ipsets: :meth:`held`); :data:`ABSENT` when neither
        holds any of them; else what is wrong, in words (``status`` shows it)."""
        return self._problem({family: self._save(family) for family in (4, 6)})

    def _problem(self, texts: dict[int, str]) -> str | None:
        """:meth:`kernel_problem` of ``texts`` (each family's ``iptables-save -t filter``)."""
        if not any(re.search(r"^(:RF-(IN|OUT) |-A \w+ -j RF-(IN|OUT)$)", t, re.M) for t in texts.values()):
            return ABSENT
        problems = [p for p in (self._family_problem(f, texts[f]) for f in (4, 6)) if p is not None]
        if problems:
            return "; ".join(problems)
        gens = {m.group(1) for m in (_GEN.search(texts[f]) for f in (4, 6)) if m is not None}
        if len(gens) != 1:
            return "IPv4 and IPv6 run different generations"
        return self._seal_problem(texts, gens.pop())

    def _seal_problem(self, texts: dict[int, str], gen: str) -> str | None:
        """None when IPv4's filter table carries this agent's seal of what both families hold."""
        seals = _SEAL_CHAIN.findall(texts[4])
        if not seals:
            return "Ringfence's chains carry no seal of the agent's (not programmed by it, or changed since)"
        if len(seals) > 1:
            return f"Ringfence's chains carry {len(seals)} seals: not as the agent applied them"
        try:
            held = self.held(texts, gen)
        except (ApplyError, OSError) as exc:  # cannot tell: never intact
            return f"Ringfence's rules could not be read back to check their seal ({exc})"
        if (missing := self.seal_key.missing()) is not None:
            return missing
        if not self.seal_key.sealed(held, seals[0][len(SEAL) :]):
            return (
                "Ringfence's rules do not carry this agent's seal: changed in the kernel since the agent applied them "
                "(a rule inserted, changed or removed in RF-IN/RF-OUT, a jump moved, or a fail-safe address added or "
                "removed), earlier rules of the agent's put back, or applied with another state directory (another key)"
            )
        return None

    def held(
        self, texts: dict[int, str], gen: str, portable: bool = False, kernel: dict[int, str | None] | None = None
    ) -> str:
        """A digest of what the kernel holds of Ringfence's rules, what the seal is a MAC of: per
        family, RF-IN/RF-OUT as iptables-save prints them (no counters), where the jumps into
        them are in INPUT/OUTPUT, on iptables-nft the same chains as nf_tables holds them
        (:func:`_kernel_rules`: what iptables-save cannot show), and the generation's fail-safe
        ipsets (type and members). Bundle and drop-tuple ipsets are left out: deltas and traffic
        change them (the enforced digest covers the bundle's). ApplyError or OSError when the
        kernel cannot be asked. ``portable``: the same read as another network namespace holding
        the same rules reads it (:func:`_kernel_rules`): what :meth:`_as_written` compares.
        ``kernel``: each family's :func:`_kernel_rules` as already read (not portable)."""
        doc: dict[str, object] = {"gen": gen}
        for family in (4, 6):
            lines = texts[family].splitlines()
            doc[f"{family} rules"] = [x for x in lines if x.startswith(("-A RF-IN ", "-A RF-OUT "))]
            doc[f"{family} jumps"] = {
                parent: [i for i, x in enumerate(_chain_rules(lines, parent)) if x == f"-A {parent} -j {chain}"]
                for chain, parent in CHAINS.values()
            }
            doc[f"{family} kernel"] = kernel[family] if kernel is not None else _kernel_rules(family, portable)
        doc["failsafe ipsets"] = _failsafe_ipsets(gen)
        return hashlib.sha256(json.dumps(doc, sort_keys=True).encode()).hexdigest()

    def _seal(self, held: str, texts: dict[int, str], kernel: dict[int, str | None]) -> None:
        """Name what the kernel holds right after the apply (``held``, checked by :meth:`apply`):
        ``RF-S-<MAC>`` (:meth:`held`; the key made here when there is none). A commit of its own,
        once the rules are in (the digest is of iptables' own rendering of them); should it fail,
        the chains read as altered and the next apply, or the daemon's drift check, programs
        them again: never intact when not. Once written, the drift baseline is the fingerprint
        of that same read (``texts``, ``kernel``) and the seal: a second read after the seal
        would take in a rule inserted in between."""
        # bound to this apply (a fresh nonce on record): earlier rules put back no longer check
        seal = self.seal_key.new_seal(held)
        if seal is None:
            return
        if run(["iptables-restore", "--noflush"], stdin=f"*filter\n:{SEAL}{seal} - [0:0]\nCOMMIT\n").returncode == 0:
            self.applied_fingerprint = _fingerprint_of(texts, kernel, {4: [f":{SEAL}{seal} - [0:0]"], 6: []})

    def enforced(self, set_names: Iterable[str] = ()) -> str:
        """The enforced-policy digest (:mod:`ringfence.enforced`) of what the kernel holds: the
        counters and verdicts of the rules in ``RF-IN``/``RF-OUT``, in rule order, and the members
        of the live generation's ipsets of the bundle sets. A family whose chains are not reached
        first, or lack their marker (:meth:`_family_problem`), holds nothing; a rule counts only if
        every family that should hold it does (both, unless all its lines are ICMP of one family),
        and any such problem makes the document ``altered``. ``set_names``: the bundle's set
        names, to find the sets whose ipset name is a hash (``rf-h-…``); the contents are the
        kernel's."""
        texts = {family: self._save(family) for family in (4, 6)}
        found = [m.group(1) for m in (_GEN.search(texts[f]) for f in (4, 6)) if m is not None]
        if not found:
            return enforced.digest({}, {})
        gen = found[0]
        problem = self._problem(texts)
        # counter → (verdicts, whether some line of it is not ICMP of this family only), per family
        held: dict[int, dict[str, dict[str, tuple[set[str], bool]]]] = {}
        for family in (4, 6):
            held[family] = {"inbound": {}, "outbound": {}}
            if self._family_problem(family, texts[family]) is not None:
                continue  # not reached, or not ours: this family holds none of the rules
            icmp = " -p icmp " if family == 4 else " -p ipv6-icmp "
            for line in texts[family].splitlines():
                m = _RULE.match(line)
                if m is not None:
                    direction = "inbound" if m.group(1) == "RF-IN" else "outbound"
                    verdicts, both = held[family][direction].get(m.group(2), (set(), False))
                    verdicts.add(m.group(3).lower())
                    held[family][direction][m.group(2)] = (verdicts, both or icmp not in f" {line} ")
        chains: dict[str, list[tuple[str, str]]] = {}
        for direction in ("inbound", "outbound"):
            rules: dict[str, str] = {}
            for counter in {*held[4][direction], *held[6][direction]}:
                in4, in6 = held[4][direction].get(counter), held[6][direction].get(counter)
                if (in4 is not None and in4[1] and in6 is None) or (in6 is not None and in6[1] and in4 is None):
                    continue  # one family should hold it and does not: the rule is not enforced
                verdicts = (in4[0] if in4 else set()) | (in6[0] if in6 else set())
                rules[counter] = verdicts.pop() if len(verdicts) == 1 else "mixed"
            chains[direction] = sorted(rules.items(), key=_rule_order)
        by_ipset = {ipset_name(n, fam, gen): n for n in set_names for fam in (4, 6)}
        sets: dict[str, list[str]] = {}
        for name in self._ipsets():
            m = _BUNDLE_IPSET.fullmatch(name)
            if m is None or m.group(2) != gen:
                continue
            bundle_set = by_ipset.get(name) or (m.group(1) if name.startswith("rf-s-") else None)
            if bundle_set is None:
                continue
            proc = run(["ipset", "list", name])
            if proc.returncode != 0:
                raise ApplyError(f"ipset list {name} failed: {proc.stderr.strip()[:200]}")
            members = sets.setdefault(bundle_set, [])
            for row in proc.stdout.split("Members:", 1)[-1].splitlines():
                if row.strip():
                    members.append(row.split()[0])
        return enforced.digest(chains, sets, altered=problem is not None)

    def programmed(self) -> bool:
        """Whether the kernel holds Ringfence's chains as the agent applies them, in both families
        (what ``apply`` and ``status`` trust): a jump removed or not first, one family flushed,
        and it is not programmed, so ``apply`` programs it again."""
        return self.kernel_problem() is None

    def active_gen(self) -> str | None:
        m = _GEN.search(self._save(4))
        return m.group(1) if m else None

    def _ipsets(self) -> list[str]:
        """The ``rf*`` ipsets (the documented namespace: ``rf-`` now; older agents named bundle
        sets after the set, ``rf_<hex>`` from the engine, so an upgrade still cleans those up)."""
        proc = run(["ipset", "list", "-n"])
        return [n for n in proc.stdout.split() if n.startswith("rf")] if proc.returncode == 0 else []

    def _destroy(self, gen: str) -> None:
        names = [n for n in self._ipsets() if n.endswith(gen) and re.search(r"-[46][ab]$", n)]
        if names:
            run(["ipset", "restore"], stdin="".join(f"destroy {n}\n" for n in names))

    def apply(self, plan: Plan) -> None:
        """All or nothing across ipset, iptables and ip6tables: on any failure the previous
        generation's rules and sets are what the kernel enforces, in both families. Then the seal
        of what was read back, only when that is what this apply wrote: any CAP_NET_ADMIN process
        may insert a rule into RF-IN between the commit and the read-back, and a seal of that read
        made it the agent's. The same rules and sets loaded into a fresh network namespace nobody
        else can write must read back the same (:meth:`_as_written`); otherwise the apply is done
        again, and after :data:`APPLY_TRIES` it fails unsealed. Where no such namespace can be
        made the check cannot run: sealed as read, why in :attr:`seal_unchecked`.
        :attr:`applied_fingerprint`: the drift baseline, of the read sealed."""
        self.applied_fingerprint = self.seal_unchecked = None
        if plan.mode == "idle":
            self.flush()
            return
        for _ in range(APPLY_TRIES):
            gen = self._commit(plan)
            try:
                texts = {family: self._save(family) for family in (4, 6)}
                kernel = {family: _kernel_rules(family) for family in (4, 6)}
                held, portable = self.held(texts, gen, kernel=kernel), self.held(texts, gen, portable=True)
            except (ApplyError, OSError):
                self.seal_key.forget()  # the previous apply's seal no longer names what is in force
                return
            try:
                same = self._as_written(plan, gen, portable)
            except scratch.Unavailable as exc:
                # No namespace on this host (user namespaces refused; root without CAP_SYS_ADMIN),
                # and iptables has no generation to prove the read ours: every apply would fail,
                # no bundle would ever be in force as the last known good, and a start would hold
                # the boot posture. So sealed as read, and said (status: seal_unchecked): a rule
                # inserted between the commit and the read-back is sealed with it (docs/agent.md).
                self.seal_unchecked, same = str(exc), True
            if same:
                self._seal(held, texts, kernel)
                return
        self.seal_key.forget()
        raise ApplyError(
            f"the kernel's rules changed while they were applied ({APPLY_TRIES} times, another process changed "
            "Ringfence's chains or fail-safe ipsets between the agent's commit and its read-back): not sealed"
        )

    def _as_written(self, plan: Plan, gen: str, held: str) -> bool:
        """Whether ``held`` (portable: :meth:`held`) is what this plan's rules and sets of generation ``gen`` read back as
        when nobody else can write them: loaded by a forked child into a fresh network namespace
        of its own (ipset, iptables-restore, ip6tables-restore there, the jumps added first; the
        bundle ipsets empty: held() leaves them out, the rules name them only),
        read back there with the same readers. False when the child fails (not sealed).
        Without CAP_SYS_ADMIN a user namespace holds it, the agent's own uid mapped there (the
        control-plane fail-safe names it) and CAP_NET_ADMIN CAP_NET_RAW ambient for the programs
        (:func:`scratch.isolated`); :class:`scratch.Unavailable` when neither can be made."""

        def work() -> bytes:  # in the child, in its own namespace
            if run(["ipset", "restore"], stdin=self.sets_script(plan, gen, bundle_elements=False)).returncode != 0:
                raise ApplyError("ipset restore failed in a fresh namespace")
            for family in (4, 6):
                tool = "iptables-restore" if family == 4 else "ip6tables-restore"
                script = self.rules_script(plan, family, gen, [parent for _, parent in CHAINS.values()])
                if run([tool, "--noflush"], stdin=script).returncode != 0:
                    raise ApplyError(f"{tool} failed in a fresh namespace")
            return self.held({family: self._save(family) for family in (4, 6)}, gen, portable=True).encode()

        return scratch.isolated(work, _SCRATCH_TIMEOUT, user_ns=True, programs=True) == held.encode()

    def _commit(self, plan: Plan) -> str:
        """The all-or-nothing commit of :meth:`apply`; the generation it made live."""
        saved = {family: self._save(family, counters=True) for family in (4, 6)}
        m = _GEN.search(saved[4])
        old = m.group(1) if m else None
        gen = "b" if old == "a" else "a"
        self._destroy(gen)  # leftovers of an interrupted apply
        proc = run(["ipset", "restore"], stdin=self.sets_script(plan, gen))
        if proc.returncode != 0:
            self._destroy(gen)
            raise ApplyError(f"ipset restore failed (previous rules still in force): {proc.stderr.strip()[:400]}")
        added: dict[int, list[str]] = {}
        for family in (4, 6):
            tool = "iptables" if family == 4 else "ip6tables"
            lines = saved[family].splitlines()
            added[family] = [p for c, p in CHAINS.values() if not any(x.endswith(f"-A {p} -j {c}") for x in lines)]
            # not first (or, iptables-nft, a rule iptables-save cannot show is before it): moved first
            moved = [
                p
                for c, p in CHAINS.values()
                if p not in added[family] and (_first(lines, p) != f"-A {p} -j {c}" or not _jump_first(family, p, c))
            ]
            # IPv4's commit removes the seal of the rules it replaces (sealed again below)
            unseal = _SEAL_CHAIN.findall(saved[4]) if family == 4 else []
            script = self.rules_script(plan, family, gen, added[family], moved, unseal)
            proc = run([f"{tool}-restore", "--noflush"], stdin=script)
            if proc.returncode == 0:
                continue
            why = f"{tool}-restore failed: {proc.stderr.strip()[:400]}"
            if family == 6:
                # IPv4 already runs the new generation: put its previous chains back
                back = run(["iptables-restore", "-c", "--noflush"], stdin=self.restore_script(saved[4], added[4]))
                if back.returncode != 0:
                    self._gen = gen  # IPv4 references the new sets: keep them
                    raise ApplyError(
                        f"{why}; rolling IPv4 back failed too, so IPv4 runs the new bundle and IPv6 the "
                        f"previous one: {back.stderr.strip()[:400]}"
                    )
            self._destroy(gen)
            raise ApplyError(f"{why} (previous rules still in force)")
        self._gen = gen
        if old is not None:
            self._destroy(old)
        return gen

    @staticmethod
    def restore_script(saved: str, added_jumps: list[str]) -> str:
        """``iptables-restore -c --noflush`` input putting Ringfence's chains back as ``saved``
        (an ``iptables-save -c`` of before the commit) had them, counters included."""
        out = ["*filter"]
        had = [chain for chain, _ in CHAINS.values() if f":{chain} " in saved]
        out += [f":{chain} - [0:0]" for chain in had]
        out += [f":{name} - [0:0]" for name in _SEAL_CHAIN.findall(saved)]  # the previous rules' seal, still theirs
        out += [line for line in saved.splitlines() if re.match(r"^\[\d+:\d+\] -A RF-(IN|OUT) ", line)]
        for chain, parent in CHAINS.values():
            if parent in added_jumps:
                out.append(f"-D {parent} -j {chain}")
            if chain not in had:
                out += [f"-F {chain}", f"-X {chain}"]
        out.append("COMMIT")
        return "\n".join(out) + "\n"

    def _ipset_change(self, change: ElementChange, gen: str) -> str:
        """Apply one change to the generation's sets: "" or the error. -exist: the agent checked
        membership, so an element re-added or re-deleted (by an undo) is not an error."""
        script = self.delta_script(change, gen)
        if self.lib is not None:
            _, err = self.lib.run([f"{line} -exist" for line in script.splitlines()])
            return err
        proc = run(["ipset", "-exist", "restore"], stdin=script)
        if proc.returncode != 0:
            return proc.stderr.strip() or "ipset restore failed"
        return ""

    def apply_delta(self, change: ElementChange) -> None:
        """Just the change, in one libipset call (or one ``ipset restore``); a failure half-way is
        undone by the inverse change."""
        if not (change.add_v4 or change.add_v6 or change.remove_v4 or change.remove_v6):
            return
        gen = self._gen or self.active_gen()
        if gen is None:
            raise ApplyError("no Ringfence chains are loaded: apply a bundle first")
        err = self._ipset_change(change, gen)
        if err:
            self._ipset_change(change.inverse(), gen)
            live = self.active_gen()
            if self._gen is not None and live is not None and live != gen:
                # another agent process committed a bundle since: its generation is the live one
                self._gen = None
                self.apply_delta(change)
                return
            raise ApplyError(f"ipset refused the delta for {change.set}: {err[:400]}")
        self._gen = gen

    def flush(self) -> bool:
        present = False
        # the seals, read before anything is removed (one read per family, not one in between)
        seals = {family: _SEAL_CHAIN.findall(self._save(family)) for family in (4, 6)}
        for family in (4, 6):
            tool = "iptables" if family == 4 else "ip6tables"
            for chain, parent in CHAINS.values():
                while run([tool, "-D", parent, "-j", chain]).returncode == 0:
                    present = True
                if run([tool, "-F", chain]).returncode == 0:
                    present = True
                    run([tool, "-X", chain])
            for name in seals[family]:
                run([tool, "-X", name])
        for gen in ("a", "b"):
            self._destroy(gen)
        self._gen = None
        return present

    def observe(self, plan: Plan, previous: dict[str, int]) -> Observation:
        obs = Observation()
        for family in (4, 6):
            for line in self._save(family, counters=True).splitlines():
                m = _COUNTER.match(line)
                if m:
                    obs.counters[m.group(4)] = obs.counters.get(m.group(4), 0) + int(m.group(1))
        gen = self.active_gen()
        if gen is None:
            return obs
        listed: set[str] = set()
        sports: dict[_DropKey, int | None] = {}
        for point in self.drop_points(plan):
            if obs.counters.get(point, 0) == previous.get(point, 0):
                continue
            listed.add(point)
            for family in (4, 6):
                # the sport set is listed before the dport set (and fed after it): every sport
                # listed then has its packet's dport in the dport listing
                by_sport, n_sport = _members(sport_set(point, family, gen))
                by_dport, n_dport = _members(dport_set(point, family, gen))
                full = max(n_sport, n_dport) >= TUPLE_SIZE  # a full set may lack a partner: no pairing
                for (src, dst, proto), dports in by_dport.items():
                    for dport in dports:
                        key = (point, src, dst, proto, dport)
                        if key in self._sports:
                            sport = self._sports[key]  # decided when first seen: keeps the event's identity
                        else:
                            ports = by_sport.get((src, dst, proto), [])
                            one_to_one = not full and len(dports) == 1 and len(ports) == 1
                            sport = ports[0] if one_to_one and proto in ("tcp", "udp") else None
                        sports[key] = sport
                        obs.tuples.append(DropTuple(point, src, dst, proto, dport, 1, sport=sport))
        # forget only what a listed point no longer holds; unlisted points keep their decisions
        self._sports = {k: v for k, v in self._sports.items() if k[0] not in listed} | sports
        return obs


_DropKey = tuple[str, str, str, str, int | None]


def _failsafe_ipsets(gen: str) -> dict[str, list[str]]:
    """The generation's fail-safe ipsets: name → their type, then their members sorted (one
    ``ipset restore`` of ``list`` commands for all eight). ApplyError when one cannot be listed."""
    names = [f"{label}-{family}{gen}" for label in _FAILSAFE_IPSETS for family in (4, 6)]
    proc = run(["ipset", "restore"], stdin="".join(f"list {n}\n" for n in names))
    if proc.returncode != 0:
        raise ApplyError(f"the fail-safe ipsets could not be listed: {proc.stderr.strip()[:200]}")
    out: dict[str, list[str]] = {}
    kind, current, listing = "", None, False
    members: list[str] = []
    for line in [*proc.stdout.splitlines(), "Name: "]:
        if line.startswith("Name: "):
            if current is not None:
                out[current] = [kind, *sorted(members)]
            current, kind, members, listing = line[6:].strip(), "", [], False
        elif line.startswith("Type: ") and not members:
            kind = line[6:].strip()
        elif line == "Members:":
            listing = True
        elif line.strip() and current is not None and listing:
            members.append(line.strip())
    if sorted(out) != sorted(names):
        raise ApplyError(f"the fail-safe ipsets listed are {sorted(out)}, not {sorted(names)}")
    return out


def _members(name: str) -> tuple[dict[tuple[str, str, str], list[int | None]], int]:
    """A ``hash:ip,port,ip`` tuple set: (src, dst, proto) → the ports it holds; and its size."""
    proc = run(["ipset", "list", name])
    rows = proc.stdout.split("Members:", 1)[-1].splitlines() if proc.returncode == 0 else []
    out: dict[tuple[str, str, str], list[int | None]] = {}
    n = 0
    for row in rows:
        parts = row.split()
        fields = parts[0].split(",") if parts else []
        if len(fields) != 3:
            continue
        src, pp, dst = fields
        proto, _, port = pp.partition(":")
        proto = {"ipv6-icmp": "icmpv6"}.get(proto, proto)
        out.setdefault((src, dst, proto), []).append(int(port) if proto in ("tcp", "udp") and port.isdigit() else None)
        n += 1
    return out, n
