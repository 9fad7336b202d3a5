"""Label hygiene from flow evidence (``ringfence labels check --flows``).

Flow rows name their ends by label set (:mod:`ringfence.flows.aggregate`), so what they reveal is
about label groups, each named with the estate's workloads that hold those labels:

- ``flows/unknown-address``: a private address seen in flows that no workload held (the end
  ``unknown``): an unmanaged host, or a workload the inventory does not know. Public addresses
  are the internet, not findings. A row keeps one sample address per end, so an address is named
  when it is a row's sample.
- ``flows/unexpected-port``: a workload of the estate reaches a role on a port no allow rule of
  the policy gives that role (as provider) and the flow was not allowed: either the caller is
  misconfigured or the receiver is not what its ``role`` label says (a ``role=db`` host serving
  HTTP). A port the role does serve, from a peer not allowed to use it, is a policy matter (the
  map shows it), not a label one.
- ``flows/outbound-fanout``: a role whose workloads connect out, on flows policy does not allow,
  to at least ``fanout`` distinct peers (label groups, the internet, unknown addresses): a database does not call many peers; a host that
  does is mislabelled or misbehaving.
- ``flows/unconfirmed``: flows only their destination's agent reported, from a label group that
  runs an agent (``agents``) which did not, and no flow log saw (as ``ringfence suggest`` flags
  them): the destination's word about its peer. Such a row feeds neither of the two findings
  above (it would accuse the peer, or the destination's own role, on one host's claim); it is
  listed with the reporting workloads instead: a host reporting what its peer did not send is
  compromised or its peer's agent misses flows.
"""

from __future__ import annotations

import ipaddress
from collections.abc import Collection, Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any

from ringfence.flows.aggregate import FlowRow, merge
from ringfence.flows.classify import UNKNOWN
from ringfence.flows.suggest import Observation, unconfirmed
from ringfence.model import Action, Workload
from ringfence.policy import Policy
from ringfence.selectors import matcher

DEFAULT_FANOUT = 3


def _labels(name: str) -> dict[str, str] | None:
    if "=" not in name:
        return None
    return dict(part.split("=", 1) for part in name.split(","))


def _port(r: FlowRow) -> str:
    return r.proto if r.port is None else f"{r.proto}/{r.port}"


@dataclass(slots=True)
class _Unknown:
    flows: int = 0
    peers: set[str] = field(default_factory=set)


def flow_findings(
    policy: Policy,
    workloads: Iterable[Workload],
    rows: Iterable[FlowRow],
    fanout: int = DEFAULT_FANOUT,
    agents: Collection[str] | None = None,
) -> list[dict[str, Any]]:
    """The findings flow rows support, as documents (``kind``, ``message`` and the evidence).
    ``agents``: the label groups running an agent (:func:`ringfence.flows.suggest.agent_groups`);
    None: no row is judged unconfirmed."""
    by_group: dict[str, list[str]] = {}
    by_address: dict[str, str] = {}
    for w in workloads:
        labels = policy.labels.resolve(w).labels
        name = ",".join(f"{k}={v}" for k, v in sorted(labels.items())) or "(no labels)"
        by_group.setdefault(name, []).append(w.id)
        for ip in w.ips:
            by_address[str(ip)] = w.id

    def who(group: str) -> str:
        ids = by_group.get(group, [])
        shown = ", ".join(ids[:5]) + (f", … {len(ids) - 5} more" if len(ids) > 5 else "")
        return f"{group} ({shown})" if ids else group

    allows = [r for r in policy.rules if r.action is Action.ALLOW and not r.staged and r.provider.selector is not None]
    served: dict[tuple[str, str, int | None], bool] = {}

    def role_serves(labels: Mapping[str, str], group: str, proto: str, port: int | None) -> bool:
        key = (group, proto, port)
        hit = served.get(key)
        if hit is None:
            hit = served[key] = any(
                r.matches_service(proto, port)
                and r.provider.selector is not None
                and matcher(r.provider.selector)(labels)
                for r in allows
            )
        return hit

    out: list[dict[str, Any]] = []
    unknown: dict[str, _Unknown] = {}
    fan: dict[str, dict[str, set[str]]] = {}  # source group → peer → ports
    for r in merge(rows):
        for end, sample, peer in ((r.src, r.sample_src, r.dst), (r.dst, r.sample_dst, r.src)):
            if end != UNKNOWN or not sample:
                continue
            try:
                private = not ipaddress.ip_address(sample).is_global
            except ValueError:
                continue
            if private:
                u = unknown.setdefault(sample, _Unknown())
                u.flows += r.flows
                u.peers.add(f"{peer} {_port(r)}")
        if r.decision == "allowed":
            continue
        o = Observation.of(r)
        why = unconfirmed(o, agents) if agents is not None else None
        if why is not None:
            out.append(
                {
                    "kind": "flows/unconfirmed",
                    "group": r.src,
                    "peer": r.dst,
                    "port": _port(r),
                    "flows": r.flows,
                    "decision": r.decision,
                    "reported_by": o.reported_by,
                    "reporters": o.reporters,
                    "message": f"{r.dst} ({', '.join(o.reporters) or '?'}) reports {r.flows} flows on {_port(r)} from "
                    f"{who(r.src)}: {why}; not counted against either group",
                }
            )
            continue
        src, dst = _labels(r.src), _labels(r.dst)
        if src is not None:
            fan.setdefault(r.src, {}).setdefault(r.dst, set()).add(_port(r))
        if src is not None and dst is not None and "role" in dst and not role_serves(dst, r.dst, r.proto, r.port):
            out.append(
                {
                    "kind": "flows/unexpected-port",
                    "group": r.dst,
                    "workloads": by_group.get(r.dst, []),
                    "port": _port(r),
                    "peer": r.src,
                    "flows": r.flows,
                    "decision": r.decision,
                    "message": f"{who(r.dst)} receives on {_port(r)} from {r.src} ({r.flows} flows, {r.decision}): "
                    f"no rule gives role {dst['role']} that port — a wrong role label, or a misdirected caller",
                }
            )
    for addr, u in sorted(unknown.items()):
        now = by_address.get(addr)
        note = f"; {now} holds it now (it did not when the flows were seen)" if now else ""
        out.append(
            {
                "kind": "flows/unknown-address",
                "address": addr,
                "flows": u.flows,
                "peers": sorted(u.peers),
                "message": f"{addr} (a private address no known workload held) in {u.flows} flows with "
                f"{', '.join(sorted(u.peers)[:3])}{' …' if len(u.peers) > 3 else ''}{note}",
            }
        )
    for group, peers in sorted(fan.items()):
        if len(peers) < fanout:
            continue
        labels = _labels(group) or {}
        listed = [f"{d} {', '.join(sorted(ps))}" for d, ps in sorted(peers.items())]
        shown = "; ".join(listed[:4]) + (" …" if len(listed) > 4 else "")
        out.append(
            {
                "kind": "flows/outbound-fanout",
                "group": group,
                "workloads": by_group.get(group, []),
                "peers": listed,
                "message": f"{who(group)} connects out to {len(peers)} peers policy does not allow it to reach "
                f"(role {labels.get('role', '(none)')}): {shown}",
            }
        )
    return out
