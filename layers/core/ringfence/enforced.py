"""The enforced-policy digest: one hash of what a workload's firewall holds of its bundle.

The agent computes it from what it reads back out of the kernel after applying
(``ringfence_agent.backends.nft.NftBackend.enforced``), the control plane from the bundle (and
the set deltas) it published (:func:`expected`). Both go through :func:`digest` over the same
canonical document, so a kernel that holds what was published gives the same digest, and one
that lost a rule, an address or its default verdict does not (docs/visibility.md, "Effective
policy, checked").

What the document holds, and why only that:

- per direction, the bundle's rules as the chain holds them, in order: the rule's counter name
  (``r_in_<i>``: its position) and its verdict, then the default (``d_in``/``d_out``) with its
  verdict (``drop`` in enforce, ``accept`` in observe); the nftables agent also lists any other
  rule with a verdict that is not one of its fail-safes, with ``""`` for its counter: never in
  :func:`expected`, so such a rule is a mismatch whatever the seal says;
- per bundle address set, its addresses as a collapsed CIDR cover (how nft stores them, as
  prefixes, ranges or single hosts, does not matter).

- ``altered: true``, only when the agent finds its own rules changed in the kernel since it
  applied them: a rule inserted, changed or deleted in its chains (fail-safe rules included), an
  element added to or removed from a fail-safe set, a chain's hook or policy changed, the table
  flushed (nftables: the seal the agent writes after each apply, keyed by its state directory's
  secret, no longer matches; iptables: a
  jump into its chains that is not the first rule, a family without its chains, or its ``RF-S-``
  seal, keyed the same way, no longer matching). The control
  plane's :func:`expected` never has it, so such a kernel never matches the published digest.

Left out: the local fail-safes (the agent's own configuration: the control plane cannot know
them; the agent checks them itself, ``altered``), counters (traffic), and the elements of
concatenated group sets (derived from the bundle sets by the agent's plan; the group's rules are
covered).
"""

from __future__ import annotations

import hashlib
import ipaddress
import json
from collections.abc import Iterable, Mapping, Sequence

from ringfence.bundlewire import Bundle, SetDelta

FORMAT = "ringfence.enforced/v1"

Chain = Sequence[tuple[str, str]]  # (counter, verdict), chain order


def cover(items: Iterable[str]) -> list[str]:
    """The collapsed CIDR cover of addresses, prefixes and ``a-b`` ranges, IPv4 then IPv6."""
    v4: list[ipaddress.IPv4Network] = []
    v6: list[ipaddress.IPv6Network] = []
    for item in items:
        if "-" in item:
            lo, _, hi = item.partition("-")
            nets: Iterable[ipaddress.IPv4Network | ipaddress.IPv6Network] = ipaddress.summarize_address_range(
                ipaddress.ip_address(lo.strip()), ipaddress.ip_address(hi.strip())
            )
        else:
            nets = (ipaddress.ip_network(item.strip(), strict=False),)
        for n in nets:
            (v4 if n.version == 4 else v6).append(n)  # type: ignore[arg-type]
    return [str(n) for n in ipaddress.collapse_addresses(v4)] + [str(n) for n in ipaddress.collapse_addresses(v6)]


def document(
    chains: Mapping[str, Chain], sets: Mapping[str, Iterable[str]], altered: bool = False
) -> dict[str, object]:
    """The canonical document (an absent table: no chains, no sets)."""
    out_chains: dict[str, list[list[str]]] = {}
    for direction, rules in chains.items():
        seq: list[list[str]] = []
        for counter, verdict in rules:
            if not seq or seq[-1] != [counter, verdict]:  # one rule per family/service: one entry
                seq.append([counter, verdict])
        out_chains[direction] = seq
    doc: dict[str, object] = {
        "format": FORMAT,
        "chains": out_chains,
        "sets": {name: cover(items) for name, items in sets.items()},
    }
    if altered:
        doc["altered"] = True
    return doc


def digest(chains: Mapping[str, Chain], sets: Mapping[str, Iterable[str]], altered: bool = False) -> str:
    doc = document(chains, sets, altered)
    return hashlib.sha256(json.dumps(doc, sort_keys=True, separators=(",", ":")).encode()).hexdigest()


def with_deltas(bundle: Bundle, deltas: Iterable[SetDelta]) -> dict[str, list[str]]:
    """The bundle's sets moved on by its set deltas (in order), as address lists."""
    sets = {name: [*s.v4, *s.v6] for name, s in bundle.sets.items()}
    for d in deltas:
        if d.set not in sets:
            continue
        gone = set(d.remove)
        sets[d.set] = [x for x in sets[d.set] if x not in gone] + list(d.add)
    return sets


def expected(bundle: Bundle, deltas: Iterable[SetDelta] = ()) -> str:
    """The digest of what an agent's kernel holds once it enforces this bundle (and these deltas).

    The same rendering rules as the agent's plan (``ringfence_agent.plan``/``backends.nft``): an
    allow accepts, a deny or override-deny drops in ``enforce`` and accepts (counted) in
    ``observe``; a rule without any service renders no kernel rule; ``idle`` holds no table."""
    mode = bundle.mode.value
    if mode == "idle":
        return digest({}, {})
    drop = "drop" if mode == "enforce" else "accept"
    chains: dict[str, list[tuple[str, str]]] = {}
    for direction, short, rules in (("inbound", "in", bundle.inbound), ("outbound", "out", bundle.outbound)):
        seq = [
            (f"r_{short}_{i}", "accept" if r.action == "allow" else drop)
            for i, r in enumerate(rules)
            if any(part.services for part in r.parts())
        ]
        seq.append((f"d_{short}", drop))
        chains[direction] = seq
    return digest(chains, with_deltas(bundle, deltas))
