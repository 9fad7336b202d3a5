"""Explain one flow: the decision and every rule that contributed, with file:line.

This evaluator works rule by rule on labels and addresses, independently of the compiled
sets, so it doubles as the oracle the compiled bundles are tested against.

A flow between two managed workloads passes two firewalls: the source's outbound and the
destination's inbound. Each side decides by precedence (override-deny > allow > deny >
default deny) and then by its mode: ``enforce`` blocks, ``observe`` reports a would-drop,
``idle`` filters nothing. Quarantined workloads match no rule and no peer selector.
"""

from __future__ import annotations

import functools
from collections.abc import Mapping
from dataclasses import dataclass, field, replace
from typing import Literal

from ringfence import addresses
from ringfence.addresses import Address, format_address
from ringfence.bundlewire import CONTROL_PLANE_PORT
from ringfence.engine.compiler import WorkloadState
from ringfence.model import Action, Mode, Workload
from ringfence.policy import ACTION_RANK, CompiledRule, Peer, Policy
from ringfence.selectors import matcher
from ringfence.textsafe import line as one_line

Verdict = Literal["allow", "deny", "would-deny"]


@dataclass(frozen=True, slots=True)
class Endpoint:
    """A workload, a hypothetical labelled workload, or an outside address."""

    name: str
    labels: Mapping[str, str] | None  # None: not a workload (an IP address)
    addrs: tuple[Address, ...] = ()
    mode: Mode | None = None  # None: nothing enforced on this endpoint
    quarantined: bool = False

    @property
    def managed(self) -> bool:
        return self.labels is not None and self.mode is not None


@dataclass(frozen=True, slots=True)
class Contribution:
    rule: CompiledRule
    side: Literal["outbound", "inbound"]

    def describe(self) -> str:
        staged = " [staged]" if self.rule.staged else ""
        return f"{self.side:8} {self.rule.action.value:13} {self.rule.id}{staged} ({self.rule.location})"


@dataclass(slots=True)
class Side:
    direction: Literal["outbound", "inbound"]
    endpoint: Endpoint
    decision: Literal["allow", "deny"]
    deciding: CompiledRule | None  # None: the default action (or a fail-safe)
    matched: list[CompiledRule]
    failsafe: str | None = None

    @property
    def effective(self) -> Verdict:
        mode = Mode.ENFORCE if self.endpoint.quarantined else self.endpoint.mode
        if self.decision == "allow" or mode is Mode.IDLE:
            return "allow"
        return "would-deny" if mode is Mode.OBSERVE else "deny"


@dataclass(slots=True)
class Decision:
    source: Endpoint
    destination: Endpoint
    proto: str
    port: int | None
    verdict: Verdict
    sides: list[Side] = field(default_factory=list)
    staged_verdict: Verdict | None = None  # what staged rulesets would make of it, when different
    # when the endpoints' addresses are not all decided alike (an IP-list peer or fail-safe range
    # covers some of them): (source address, destination address, verdict) for each pair
    by_address: list[tuple[Address | None, Address | None, Verdict]] = field(default_factory=list)
    # an end with several addresses: each pair of one family and its own decision (a packet carries
    # one address of each end); ``sides`` are then the pair's that decides the verdict (``shown``)
    pairs: list[tuple[Address | None, Address | None, Decision]] = field(default_factory=list, repr=False)
    shown: tuple[Address | None, Address | None] | None = None

    @property
    def policy_verdict(self) -> Literal["allow", "deny"]:
        """The verdict as if every side were enforced (what policy tests assert)."""
        return "allow" if all(s.decision == "allow" for s in self.sides) else "deny"

    def contributions(self) -> list[Contribution]:
        return [Contribution(r, s.direction) for s in self.sides for r in s.matched]


_matcher = functools.lru_cache(maxsize=4096)(matcher)


def _peer_matches(peer: Peer, ep: Endpoint) -> bool:
    if peer.selector is not None:
        return ep.labels is not None and not ep.quarantined and _matcher(peer.selector)(ep.labels)
    return any(any(addresses.prefix_contains(p, a) for p in peer.prefixes) for a in ep.addrs)


def _same_ok(rule: CompiledRule, consumer: Endpoint, provider: Endpoint) -> bool:
    if not rule.same:
        return True
    assert consumer.labels is not None and provider.labels is not None
    # a missing value is shared with nobody: two workloads both lacking env do not share one
    return all(d in consumer.labels and consumer.labels.get(d) == provider.labels.get(d) for d in rule.same)


def rules_between(
    policy: Policy,
    src: Endpoint,
    dst: Endpoint,
    proto: str,
    port: int | None,
    direction: Literal["outbound", "inbound"],
) -> list[CompiledRule]:
    """Rules on ``direction``'s side that match this flow (staged ones too), in precedence order."""
    own = src if direction == "outbound" else dst
    if not own.managed or own.quarantined:
        return []
    out = []
    for rule in policy.rules:
        own_peer, other_peer = (
            (rule.consumer, rule.provider) if direction == "outbound" else (rule.provider, rule.consumer)
        )
        if own_peer.selector is None or not _peer_matches(own_peer, own):
            continue
        if not _peer_matches(other_peer, dst if direction == "outbound" else src):
            continue
        if other_peer.selector is not None and not _same_ok(rule, src, dst):
            continue
        if not rule.matches_service(proto, port):
            continue
        out.append(rule)
    return sorted(out, key=lambda r: ACTION_RANK[r.action])


def _failsafe(policy: Policy, src: Endpoint, dst: Endpoint, proto: str, port: int | None, direction: str) -> str | None:
    fs = policy.failsafes
    if direction == "inbound":
        if any(p.matches(proto, port) for p in fs.admin_ports) and any(
            addresses.prefix_contains(p, a) for p in fs.admin_cidrs for a in src.addrs
        ):
            return "management from an admin range"
    else:
        if proto in ("udp", "tcp") and port == 53 and any(a in fs.dns_resolvers for a in dst.addrs):
            return "DNS to a configured resolver"
        if (
            proto == "tcp"
            and port == CONTROL_PLANE_PORT
            and any(addresses.prefix_contains(p, a) for p in fs.control_plane for a in dst.addrs)
        ):
            return "the control-plane endpoint"
    return None


def _side(
    policy: Policy,
    src: Endpoint,
    dst: Endpoint,
    proto: str,
    port: int | None,
    direction: Literal["outbound", "inbound"],
    staged: bool,
) -> Side | None:
    own = src if direction == "outbound" else dst
    if not own.managed:
        return None
    fs = _failsafe(policy, src, dst, proto, port, direction)
    # staged rules are always listed (tagged), but decide only when ``staged`` asks for them
    matched = rules_between(policy, src, dst, proto, port, direction)
    if fs is not None:
        return Side(direction, own, "allow", None, matched, failsafe=fs)
    deciding = next((r for r in matched if staged or not r.staged), None)
    decision: Literal["allow", "deny"] = "allow" if deciding is not None and deciding.action is Action.ALLOW else "deny"
    return Side(direction, own, decision, deciding, matched)


def _combine(sides: list[Side]) -> Verdict:
    verdicts = {s.effective for s in sides}
    if "deny" in verdicts:
        return "deny"
    return "would-deny" if "would-deny" in verdicts else "allow"


def decide(policy: Policy, src: Endpoint, dst: Endpoint, proto: str, port: int | None) -> Decision:
    """The decision for the flow. A packet carries one address of each end, so when an end has
    several, each (source address, destination address) pair of one family is decided on its own:
    ``verdict`` is the best any pair gets (allow > would-deny > deny), ``policy_verdict`` is allow
    iff some pair's is (what the connectivity matrix and the kernel let through), ``sides`` are the
    sides of the first pair that decides both (``shown``), and ``by_address`` lists every pair when
    some pair is decided otherwise. Ends without a pair of one family are judged whole."""
    if len(src.addrs) <= 1 and len(dst.addrs) <= 1:
        return _decide(policy, src, dst, proto, port)
    pairs = [
        (sa, da, _decide(policy, _only(src, sa), _only(dst, da), proto, port))
        for sa in src.addrs or (None,)
        for da in dst.addrs or (None,)
        if sa is None or da is None or sa[0] == da[0]  # one packet, one family
    ]
    if not pairs:
        return _decide(policy, src, dst, proto, port)
    # the first of the best, by verdict, then policy verdict, then staged verdict: the sides shown
    # are those of a pair that decides all three whenever one does (a staged rule is seen)
    sa, da, best = max(
        pairs,
        key=lambda p: (_RANK[p[2].verdict], p[2].policy_verdict == "allow", _RANK[p[2].staged_verdict or p[2].verdict]),
    )
    staged = max((p.staged_verdict or p.verdict for _, _, p in pairs), key=_RANK.__getitem__)
    decision = Decision(
        src,
        dst,
        proto,
        port,
        best.verdict,
        best.sides,
        staged if staged != best.verdict else None,
        pairs=pairs,
        shown=(sa, da),
    )
    top = (decision.verdict, decision.policy_verdict, staged)
    if any((p.verdict, p.policy_verdict, p.staged_verdict or p.verdict) != top for _, _, p in pairs):
        decision.by_address = [(a, b, p.verdict) for a, b, p in pairs]
    return decision


_RANK: dict[Verdict, int] = {"deny": 0, "would-deny": 1, "allow": 2}


def _only(ep: Endpoint, addr: Address | None) -> Endpoint:
    return ep if addr is None else replace(ep, addrs=(addr,))


def _decide(policy: Policy, src: Endpoint, dst: Endpoint, proto: str, port: int | None) -> Decision:
    sides = [
        s for s in (_side(policy, src, dst, proto, port, d, False) for d in ("outbound", "inbound")) if s is not None
    ]
    decision = Decision(src, dst, proto, port, _combine(sides), sides)
    if any(r.staged for r in policy.rules):
        staged_sides = [
            s for s in (_side(policy, src, dst, proto, port, d, True) for d in ("outbound", "inbound")) if s is not None
        ]
        staged = _combine(staged_sides)
        if staged != decision.verdict:
            decision.staged_verdict = staged
    return decision


def format_decision(d: Decision) -> str:
    lines = [
        f"{one_line(d.source.name)} → {one_line(d.destination.name)} {d.proto}/{d.port if d.port is not None else '*'}: {d.verdict.upper()}"
    ]
    if not d.sides:
        lines.append("  neither end is a managed workload: Ringfence filters nothing here")
    for s in d.sides:
        mode = "quarantined" if s.endpoint.quarantined else (s.endpoint.mode.value if s.endpoint.mode else "-")
        head = f"  {s.direction} on {one_line(s.endpoint.name)} ({mode}): {s.effective}"
        if s.failsafe:
            head += f" — fail-safe: {s.failsafe}"
        elif s.deciding is not None:
            head += f" — decided by {s.deciding.id} ({s.deciding.location})"
        else:
            head += " — no rule matches: default deny"
        lines.append(head)
        for r in s.matched:
            tag = " [staged]" if r.staged else ""
            lines.append(
                f"      {r.action.value:13} {r.id}{tag} at {r.location}: "
                f"from {r.consumer.describe()} to {r.provider.describe()} "
                f"on {', '.join(r.service_names)}"
            )
    # several addresses: per pair when the pairs' verdicts differ, or their sides do (then the
    # sides above, one pair's, do not tell the others')
    if d.by_address or per_pair(d):
        head = "differs by address" if d.by_address else "alike for every address pair"
        shown = f"; the sides above are {_pair_name(d, *d.shown)}'s" if d.shown is not None else ""
        lines.append(f"  {head} (each packet carries one{shown}):")
        if d.pairs:
            for sa, da, p in d.pairs:
                line = f"      {_pair_name(d, sa, da)}: {p.verdict.upper()}"
                if p.policy_verdict == "deny" and p.verdict != "deny":
                    line += " (policy: DENY)"
                if p.staged_verdict is not None:
                    line += f" (staged: {p.staged_verdict.upper()})"
                why = _why_denied(p)
                lines.append(line + (f" — {why}" if why else ""))
        else:
            for sa, da, v in d.by_address:
                lines.append(f"      {_pair_name(d, sa, da)}: {v.upper()}")
    if d.staged_verdict is not None:
        lines.append(f"  staged rulesets would make this: {d.staged_verdict.upper()}")
    return "\n".join(lines)


def per_pair(d: Decision) -> list[tuple[Address | None, Address | None, Decision]]:
    """Every address pair's own decision when the pairs are not all told by the sides shown (their
    verdicts differ, or the rules deciding them do); else none."""
    if d.shown is None or not (d.by_address or len({_sides_key(p) for _, _, p in d.pairs}) > 1):
        return []
    return list(d.pairs)


def why_denied(d: Decision) -> str | None:
    """What denies ``d`` (a rule, a side's default deny), in words; None when it is allowed."""
    return _why_denied(d) or None


def _pair_name(d: Decision, sa: Address | None, da: Address | None) -> str:
    src = format_address(sa) if sa is not None else d.source.name
    dst = format_address(da) if da is not None else d.destination.name
    return f"{src} → {dst}"


def _why_denied(d: Decision) -> str:
    """The sides that deny this (one pair's) flow, as policy: the rule or the default deny."""
    why = []
    for s in d.sides:
        if s.decision == "deny":
            if s.deciding is not None:
                why.append(f"{s.direction}: {s.deciding.action.value} {s.deciding.id} ({s.deciding.location})")
            else:
                why.append(f"{s.direction} on {s.endpoint.name}: no rule allows it (default deny)")
    return "; ".join(why)


def _sides_key(d: Decision) -> tuple[object, ...]:
    return tuple(
        (s.direction, s.decision, s.deciding.id if s.deciding else None, s.failsafe, tuple(r.id for r in s.matched))
        for s in d.sides
    )


# --- naming endpoints (CLI arguments, policy tests) ---------------------------------------------


class EndpointError(ValueError):
    pass


def workload_endpoint(ws: WorkloadState) -> Endpoint:
    return Endpoint(ws.id, ws.labels, ws.addrs, ws.mode, ws.quarantined)


def labels_endpoint(policy: Policy, labels: Mapping[str, str]) -> Endpoint:
    """A hypothetical workload with these labels, judged by the same hygiene as a real one."""
    for dim in labels:
        if dim not in policy.labels.dimensions:
            raise EndpointError(f"unknown label dimension {dim!r}")
    res = policy.labels.resolve(Workload(id="(labels)", labels=dict(labels)))
    name = "{" + ",".join(f"{k}={v}" for k, v in sorted(res.labels.items())) + "}"
    return Endpoint(name, res.labels, (), policy.mode_for(res.labels, res.unlabeled), False)


def ip_endpoint(text: str, workloads: Mapping[str, WorkloadState]) -> Endpoint:
    addr = addresses.parse_address(text)
    for ws in workloads.values():
        if addr in ws.addrs:  # that workload, as a packet from this one of its addresses
            return replace(workload_endpoint(ws), addrs=(addr,))
    return Endpoint(text, None, (addr,))


def parse_endpoint(text: str, policy: Policy, workloads: Mapping[str, WorkloadState]) -> Endpoint:
    """``i-0abc`` (workload id), ``role=web,app=ordering`` (a label set) or ``10.1.2.3`` (an address)."""
    text = text.strip()
    if text in workloads:
        return workload_endpoint(workloads[text])
    if "=" in text:
        pairs = {}
        for part in text.split(","):
            key, sep, value = part.partition("=")
            if not sep or not key.strip() or not value.strip():
                raise EndpointError(f"label set must look like role=web,app=ordering (got {text!r})")
            pairs[key.strip()] = value.strip()
        return labels_endpoint(policy, pairs)
    try:
        return ip_endpoint(text, workloads)
    except ValueError:
        raise EndpointError(
            f"{text!r} is not a workload id in the inventory, a label set (role=web,app=x) or an IP address"
        ) from None
