"""A small evaluator of the Calico subset ``ringfence.export.calico`` emits (test oracle).

Host endpoints with labels and expectedIPs; GlobalNetworkPolicies (staged ones are ignored) with
``order``, ``selector``, ``types`` and ingress/egress rules matching ``protocol``,
``source``/``destination`` ``selector``/``nets``/``notNets``/``ports`` and ``icmp.type``.
Semantics as documented by Calico: a flow passes the source's egress and the destination's
ingress; on each side the policies selecting the endpoint are walked by (order, name); the first
rule that matches decides (Allow/Deny); if none does, the traffic is denied (tier default
action, or no policy at all for a host endpoint).
"""

from __future__ import annotations

import ipaddress
from dataclasses import dataclass, field
from typing import Any

import yaml

from ringfence import selectors


@dataclass
class Hep:
    name: str
    labels: dict[str, str]
    ips: list[Any]


@dataclass
class Gnp:
    name: str
    order: float
    match: selectors.Matcher
    ingress: list[dict[str, Any]] | None
    egress: list[dict[str, Any]] | None


@dataclass
class CalicoModel:
    heps: dict[str, Hep] = field(default_factory=dict)
    policies: list[Gnp] = field(default_factory=list)
    _sel_cache: dict[str, selectors.Matcher] = field(default_factory=dict)
    _applicable: dict[tuple[str, str], list[Gnp]] = field(default_factory=dict)

    @classmethod
    def load(cls, text: str) -> CalicoModel:
        model = cls()
        for doc in yaml.safe_load_all(text):
            if not doc:
                continue
            if doc["kind"] == "HostEndpoint":
                meta = doc["metadata"]
                ips = [ipaddress.ip_address(ip) for ip in doc["spec"].get("expectedIPs", [])]
                model.heps[meta["name"]] = Hep(meta["name"], dict(meta.get("labels", {})), ips)
            elif doc["kind"] == "GlobalNetworkPolicy":
                spec = doc["spec"]
                types = spec.get("types", ["Ingress"])
                model.policies.append(
                    Gnp(
                        doc["metadata"]["name"],
                        spec.get("order", float("inf")),
                        model.matcher(spec.get("selector", "all()")),
                        spec.get("ingress", []) if "Ingress" in types else None,
                        spec.get("egress", []) if "Egress" in types else None,
                    )
                )
        model.policies.sort(key=lambda p: (p.order, p.name))
        return model

    def matcher(self, text: str) -> selectors.Matcher:
        if text not in self._sel_cache:
            self._sel_cache[text] = selectors.matcher(selectors.parse(text))
        return self._sel_cache[text]

    def _policies_for(self, hep: Hep, direction: str) -> list[Gnp]:
        key = (hep.name, direction)
        if key not in self._applicable:
            self._applicable[key] = [
                p for p in self.policies if getattr(p, direction) is not None and p.match(hep.labels)
            ]
        return self._applicable[key]

    def _peer_ok(self, match: dict[str, Any] | None, peer: Hep, ip: Any) -> bool:
        if not match:
            return True
        if ip is None:  # an endpoint without addresses is in no IP set and no net
            return False
        if "selector" in match and not self.matcher(match["selector"])(peer.labels):
            return False
        if "nets" in match and not any(ip in ipaddress.ip_network(n) for n in match["nets"]):
            return False
        return not any(ip in ipaddress.ip_network(n) for n in match.get("notNets", []))

    def _rule_matches(self, rule: dict[str, Any], src: Hep, dst: Hep, proto: str, port: int) -> bool:
        version = rule.get("ipVersion")
        flow_ip = src.ips[0] if src.ips else None
        if version is not None and (flow_ip is None or flow_ip.version != version):
            return False
        want = rule.get("protocol")
        if want is not None and want.lower() != proto:
            return False
        if "icmp" in rule and rule["icmp"].get("type") != port:
            return False
        dst_match = rule.get("destination") or {}
        ports = dst_match.get("ports")
        if ports is not None and not any(_port_in(p, port) for p in ports):
            return False
        peer_match = {k: v for k, v in dst_match.items() if k != "ports"}
        if not self._peer_ok(peer_match, dst, dst.ips[0] if dst.ips else None):
            return False
        return self._peer_ok(rule.get("source"), src, src.ips[0] if src.ips else None)

    def side_allows(self, own: Hep, src: Hep, dst: Hep, direction: str, proto: str, port: int) -> bool:
        for pol in self._policies_for(own, direction):
            for rule in getattr(pol, direction):
                if self._rule_matches(rule, src, dst, proto, port):
                    return bool(rule["action"] == "Allow")
        return False

    def allowed(self, src: str, dst: str, proto: str, port: int) -> bool:
        a, b = self.heps[src], self.heps[dst]
        return self.side_allows(a, a, b, "egress", proto, port) and self.side_allows(b, a, b, "ingress", proto, port)


def _port_in(spec: int | str, port: int) -> bool:
    if isinstance(spec, int):
        return spec == port
    lo, _, hi = str(spec).partition(":")
    return int(lo) <= port <= int(hi or lo)
