"""A flow's decision under a policy: allowed, potentially blocked (observe mode), blocked, unknown.

The decision is :func:`ringfence.engine.explain.decide`'s for the flow's endpoints as of the
flow's time (:mod:`ringfence.flows.resolve`): the same evaluator ``ringfence explain`` and the
policy tests use. ``unknown``: neither end is a managed workload, so no Ringfence rule decides
(an address no workload held, talking to another such address).
"""

from __future__ import annotations

import ipaddress
from dataclasses import dataclass
from typing import Literal

from ringfence import addresses
from ringfence.engine.explain import Decision, Endpoint, decide
from ringfence.flows.resolve import AddressBook, AddressOwner
from ringfence.model import Workload
from ringfence.policy import Policy

Outcome = Literal["allowed", "potentially-blocked", "blocked", "unknown"]
OUTCOMES: tuple[Outcome, ...] = ("allowed", "potentially-blocked", "blocked", "unknown")
_OF_VERDICT: dict[str, Outcome] = {"allow": "allowed", "would-deny": "potentially-blocked", "deny": "blocked"}

INTERNET = "internet"
UNKNOWN = "unknown"


@dataclass(frozen=True, slots=True)
class Classified:
    outcome: Outcome
    rule: str  # the rule(s) that decided, with file:line, or why (default deny, no managed end)

    @staticmethod
    def of(d: Decision) -> Classified:
        if not d.sides:
            return Classified("unknown", "neither end is a managed workload: no Ringfence rule decides")
        outcome = _OF_VERDICT[d.verdict]
        why = []
        for s in d.sides:
            if outcome == "allowed" or s.decision == "deny":
                if s.failsafe:
                    why.append(f"{s.direction}: fail-safe ({s.failsafe})")
                elif s.deciding is not None:
                    why.append(f"{s.direction}: {s.deciding.action.value} {s.deciding.id} ({s.deciding.location})")
                else:
                    why.append(f"{s.direction} on {s.endpoint.name}: no rule allows it (default deny)")
        return Classified(outcome, "; ".join(why))


def outside_name(address: str) -> str:
    """The map's node for an address no workload held: the internet, or an unknown address."""
    try:
        ip = ipaddress.ip_address(address)
    except ValueError:
        return UNKNOWN
    return INTERNET if ip.is_global else UNKNOWN


class Classifier:
    """Decides flows under one policy, resolving addresses with one address book.

    Decisions are memoised twice: per (addresses, their owners' intervals, proto, port), and,
    below that, per what :func:`decide` reads of the two ends — labels, mode, quarantine, and per
    address its *signature* (which of the policy's prefixes, fail-safe ranges and resolvers hold
    it: IP-list peers and fail-safes decide on the address) — with proto and port. A fleet's
    flows repeat per label pair, not per address pair. The one thing not carried over is the
    workload named in a "default deny" reason: it names the first workload of that label pair
    (a row's reason is its first flow's anyway)."""

    def __init__(self, policy: Policy, book: AddressBook) -> None:
        self.policy = policy
        self.book = book
        self._labels: dict[tuple[str, float], Endpoint] = {}
        self._memo: dict[tuple[object, ...], tuple[Endpoint, Endpoint, Classified]] = {}
        self._by_labels: dict[tuple[object, ...], Classified] = {}
        self._label_keys: dict[int, tuple[tuple[str, str], ...]] = {}
        self._sigs: dict[str, tuple[object, ...]] = {}
        fs = policy.failsafes
        peers = [p for r in policy.rules for peer in (r.consumer, r.provider) for p in peer.prefixes]
        self._prefixes = tuple(dict.fromkeys([*peers, *fs.admin_cidrs, *fs.control_plane]))
        self._resolvers = fs.dns_resolvers

    def trim(self, most: int) -> None:
        """Forget the per-address memos past ``most`` entries each (memory: an object of many
        distinct addresses); what decides stays (the endpoints per interval, label pairs)."""
        for memo in (self._memo, self._sigs, self._by_labels):
            if len(memo) > most:
                memo.clear()

    def _sig(self, address: str, ep: Endpoint) -> tuple[object, ...]:
        sig = self._sigs.get(address)
        if sig is None:
            a = ep.addrs[0] if ep.addrs else None
            if a is None:
                sig = ()
            else:
                held = tuple(i for i, p in enumerate(self._prefixes) if addresses.prefix_contains(p, a))
                sig = (held, a in self._resolvers)
            self._sigs[address] = sig
        return sig

    def _label_key(self, ep: Endpoint) -> object:
        if ep.labels is None:
            return None
        k = self._label_keys.get(id(ep.labels))  # one mapping per (workload, interval), held in _labels
        if k is None:
            k = self._label_keys[id(ep.labels)] = tuple(sorted(ep.labels.items()))
        return k

    def endpoint(self, address: str, owner: AddressOwner | None) -> Endpoint:
        addr = addresses.parse_address(address)
        if owner is None or owner.workload is None:
            return Endpoint(address, None, (addr,))
        key = (owner.workload_id, owner.since)
        ep = self._labels.get(key)
        if ep is None:
            ep = self._labels[key] = self.workload_endpoint(owner.workload)
        return Endpoint(ep.name, ep.labels, (addr,), ep.mode, ep.quarantined)

    def workload_endpoint(self, w: Workload) -> Endpoint:
        res = self.policy.labels.resolve(w)
        mode = w.mode if w.mode is not None else self.policy.mode_for(res.labels, res.unlabeled)
        return Endpoint(w.id, res.labels, (), mode, w.quarantined)

    def classify(
        self, src: str, dst: str, proto: str, port: int | None, at: float
    ) -> tuple[Endpoint, Endpoint, Classified]:
        so, do = self.book.owner(src, at), self.book.owner(dst, at)
        # keyed by the addresses too: IP-list peers and fail-safes decide on the address
        key = (src, so.since if so else None, dst, do.since if do else None, proto, port)
        hit = self._memo.get(key)
        if hit is None:
            s, d = self.endpoint(src, so), self.endpoint(dst, do)
            lkey = (
                self._label_key(s), s.mode, s.quarantined, self._sig(src, s),
                self._label_key(d), d.mode, d.quarantined, self._sig(dst, d),
                s.name == d.name, proto, port,
            )  # fmt: skip
            why = self._by_labels.get(lkey)
            if why is None:
                why = self._by_labels[lkey] = Classified.of(decide(self.policy, s, d, proto, port))
            hit = self._memo[key] = (s, d, why)
        return hit
