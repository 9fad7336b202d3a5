"""Export a Ringfence policy and inventory as Calico ``HostEndpoint`` + ``GlobalNetworkPolicy`` YAML.

The output is a multi-document YAML stream (``projectcalico.org/v3``) that gives a Calico
host-endpoint deployment the same allowed connectivity as the Ringfence bundles, and that
analysers such as network-config-analyzer can read. Translation:

* **HostEndpoint** per workload: ``metadata.labels`` are the workload's resolved labels (role,
  app, env, loc, …) plus ``ringfence.io/mode``; ``spec.expectedIPs`` its addresses (Calico
  resolves other hosts' selectors to a host endpoint only through them), ``interfaceName: '*'``,
  ``node`` = the workload id. A quarantined workload keeps only ``ringfence.io/quarantined``
  as a label, so no policy selector can pick it (Ringfence drops it from every peer set).
* **One GlobalNetworkPolicy per compiled rule and direction**: ``<rule>-in`` selects the
  providers and carries ``ingress`` rules whose ``source`` is the consumer; ``<rule>-out``
  selects the consumers and carries ``egress`` rules whose ``destination`` is the provider.
  Both ends filter, as the agent does.
* **Precedence → order**: fail-safes 10, quarantine 20, idle/observe 30, override-deny 100,
  allow 200, deny 300, and a last ``rf-default-deny`` (order 10000, selects every endpoint, no
  rules) that makes "default deny" explicit (Calico already denies host-endpoint traffic no
  policy selects, except its own fail-safe ports). Ties within one order share an action, so
  Calico's tie-break by name does not change a verdict.
* **``same:`` pinning** (consumer and provider must share app/env/loc…) has no Calico
  equivalent: Calico selectors cannot compare two endpoints' labels. It is expanded per app
  group: one policy per distinct pinned-value combination present in the inventory on both
  sides, with the pinned equalities (``app == 'x' && env == 'prod' …``, or ``!has(dim)`` for an
  absent label) added to both the policy selector and the peer selector. The export is
  therefore a function of policy *and* inventory: a new app group needs a re-export, and the
  policy count grows with the number of app groups.
* **Selectors**: our AST printed in Calico syntax (label groups already expanded, values
  single-quoted). A selector that would also match an endpoint without labels (``all()``,
  ``!=``, ``not in``, ``!has``) gets ``&& !has(ringfence.io/quarantined)`` so it cannot pick a
  quarantined endpoint.
* **IP lists** become ``nets`` (the list's CIDRs) and ``notNets`` (its exclusions); ``any`` is
  no constraint. Calico refuses a rule mixing IPv4 and IPv6 CIDRs, so such a rule is split into
  one rule per family with ``ipVersion`` (:func:`split_families`). **Services** become one Calico rule per protocol with ``destination.ports``
  (``lo:hi`` ranges) or ``icmp.type``; ``any`` is a rule without ``protocol``.
* **Modes**: ``idle`` and ``observe`` endpoints get an allow-all policy (order 30). Calico has no
  "report would-drops but allow" outside its staged policies, so observe mode's reporting is
  lost. **Staged** rulesets become ``StagedGlobalNetworkPolicy`` (Calico evaluates and reports
  them without enforcing), same names and orders.
* **Fail-safes**: ingress from ``admin_cidrs`` on ``admin_ports``; egress to ``dns_resolvers``
  on 53 and to ``control_plane``. Loopback, established/related and DHCP are Calico's own.

Options (for comparing with the pure policy matrix of :mod:`ringfence.engine.connectivity`):
``modes=False`` exports every endpoint as enforced, ``failsafes=False`` leaves the fail-safe
policy out, ``staged=False`` leaves staged rulesets out.
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from typing import Any

import yaml

from ringfence import addresses, selectors
from ringfence.bundlewire import CONTROL_PLANE_PORT
from ringfence.engine.index import LabelIndex, iter_bits
from ringfence.model import Action, Mode, Workload
from ringfence.policy import CompiledRule, Peer, Policy
from ringfence.services import PortRange, parse_port_spec

API_VERSION = "projectcalico.org/v3"
QUARANTINE_LABEL = "ringfence.io/quarantined"
MODE_LABEL = "ringfence.io/mode"
ORDER = {"failsafes": 10, "quarantine": 20, "unenforced": 30, Action.OVERRIDE_DENY: 100, Action.ALLOW: 200}
ORDER[Action.DENY] = 300
DEFAULT_DENY_ORDER = 10000
_CALICO_ACTION = {Action.ALLOW: "Allow", Action.DENY: "Deny", Action.OVERRIDE_DENY: "Deny"}
_PROTO = {"tcp": "TCP", "udp": "UDP", "icmp": "ICMP", "icmpv6": "ICMPv6"}
_NAME_BAD = re.compile(r"[^a-z0-9.-]+")


@dataclass(frozen=True, slots=True)
class Endpoint:
    """A workload as Calico sees it: name, labels (already resolved), addresses, mode."""

    id: str
    name: str
    labels: dict[str, str]
    ips: tuple[str, ...]
    mode: Mode
    quarantined: bool


def endpoints(policy: Policy, workloads: Iterable[Workload]) -> list[Endpoint]:
    """Resolve labels and modes the way the engine does; names made Calico-safe and unique."""
    out: list[Endpoint] = []
    used: set[str] = set()
    for w in workloads:
        res = policy.labels.resolve(w)
        mode = w.mode if w.mode is not None else policy.mode_for(res.labels, res.unlabeled)
        name = resource_name(w.id)
        base, k = name, 1
        while name in used:
            k += 1
            name = f"{base}-{k}"
        used.add(name)
        out.append(Endpoint(w.id, name, dict(res.labels), tuple(w.ips), mode, w.quarantined))
    return out


def resource_name(text: str) -> str:
    """A Kubernetes-style resource name: lowercase alphanumerics, '-' and '.'."""
    name = _NAME_BAD.sub("-", text.lower()).strip("-.")
    return name[:253] or "x"


# --- selectors ---------------------------------------------------------------------------------


def selector_text(node: selectors.Node) -> str:
    """Our selector AST in Calico syntax (values single-quoted, sets as ``{'a', 'b'}``, terms sorted)."""
    if isinstance(node, selectors.All):
        return "all()"
    if isinstance(node, selectors.Has):
        return f"has({node.dim})"
    if isinstance(node, selectors.In):
        values = sorted(node.values)
        if len(values) == 1:
            return f"{node.dim} {'!=' if node.negate else '=='} {_quote(values[0])}"
        joined = ", ".join(_quote(v) for v in values)
        return f"{node.dim} {'not in' if node.negate else 'in'} {{{joined}}}"
    if isinstance(node, selectors.Not):
        return f"!{_wrapped(node.inner)}"
    op = " && " if isinstance(node, selectors.And) else " || "
    return op.join(sorted(_wrapped(p) for p in node.parts))


def _wrapped(node: selectors.Node) -> str:
    text = selector_text(node)
    return f"({text})" if isinstance(node, selectors.And | selectors.Or) else text


def _quote(value: str) -> str:
    return "'" + value.replace("'", "") + "'"


def _pin(dim: str, value: str | None) -> selectors.Node:
    if value is None:
        return selectors.Not(selectors.Has(dim))
    return selectors.In(dim, frozenset([value]))


def endpoint_selector(node: selectors.Node, guard: bool = True) -> str:
    """Calico text for a workload selector, kept from matching quarantined (label-less) endpoints."""
    if guard and selectors.matcher(node)({}):
        node = selectors.conjunction(node, selectors.Not(selectors.Has(QUARANTINE_LABEL)))
    return selector_text(node)


# --- services and IP lists ---------------------------------------------------------------------


def service_rules(services: Iterable[PortRange]) -> list[dict[str, Any]]:
    """Calico rule fragments (protocol, destination ports / icmp), one per protocol or ICMP type."""
    ports: dict[str, list[int | str]] = {}
    whole: set[str] = set()
    out: list[dict[str, Any]] = []
    for p in sorted(set(services)):
        if p.proto == "any":
            return [{}]
        if p.proto in ("tcp", "udp"):
            if p.is_whole():
                whole.add(p.proto)
            else:
                ports.setdefault(p.proto, []).append(p.lo if p.lo == p.hi else f"{p.lo}:{p.hi}")
        elif p.is_whole():
            out.append({"protocol": _PROTO[p.proto]})
        else:
            out.append({"protocol": _PROTO[p.proto], "icmp": {"type": p.lo}})
    for proto in ("tcp", "udp"):
        if proto in whole:
            out.append({"protocol": _PROTO[proto]})
        elif proto in ports:
            out.append({"protocol": _PROTO[proto], "destination": {"ports": ports[proto]}})
    return out


def ip_list_sources(policy: Policy) -> dict[str, tuple[list[str], list[str]]]:
    """IP list name → (cidrs, exclusions) as written in the policy files."""
    out: dict[str, tuple[list[str], list[str]]] = {}
    for text in policy.sources.values():
        try:
            doc = yaml.safe_load(text)
        except yaml.YAMLError:  # pragma: no cover - the policy loaded, so its files parse
            continue
        if not isinstance(doc, dict):
            continue
        for item in doc.get("ip_lists") or []:
            if isinstance(item, dict) and "name" in item:
                out[str(item["name"])] = (
                    [str(c) for c in item.get("cidrs") or []],
                    [str(c) for c in item.get("exclude") or []],
                )
    return out


def _net_match(peer: Peer, lists: Mapping[str, tuple[list[str], list[str]]]) -> dict[str, Any]:
    if peer.ip_list == "any":
        return {}
    if peer.ip_list is not None and peer.ip_list in lists:
        nets, excluded = lists[peer.ip_list]
        out: dict[str, Any] = {"nets": list(nets)}
        if excluded:
            out["notNets"] = list(excluded)
        return out
    return {"nets": [addresses.format_prefix(p) for p in peer.prefixes]}


# --- policies ----------------------------------------------------------------------------------


def _gnp(
    name: str, order: int, selector: str, direction: str, rules: list[dict[str, Any]], staged: bool
) -> dict[str, Any]:
    kind = "StagedGlobalNetworkPolicy" if staged else "GlobalNetworkPolicy"
    types = ["Ingress"] if direction == "ingress" else ["Egress"]
    rules = [part for r in rules for part in split_families(r)]
    return {
        "apiVersion": API_VERSION,
        "kind": kind,
        "metadata": {"name": name},
        "spec": {"order": order, "selector": selector, "types": types, direction: rules},
    }


def _is_v6(cidr: str) -> bool:
    return ":" in cidr


def split_families(rule: dict[str, Any]) -> list[dict[str, Any]]:
    """Calico rejects a rule whose nets/notNets mix IPv4 and IPv6: split it into one rule per family.

    Each part gets ``ipVersion`` and keeps only its family's CIDRs; a side whose ``nets`` have
    none of that family drops the part (it could only match the other family). ICMP parts are
    IPv4 only, ICMPv6 parts IPv6 only. The union of the parts matches what the rule meant.
    """
    families = {
        _is_v6(c)
        for side in ("source", "destination")
        for key in ("nets", "notNets")
        for c in (rule.get(side) or {}).get(key, [])
    }
    if len(families) < 2:
        return [rule]
    out: list[dict[str, Any]] = []
    for v6 in (False, True):
        if rule.get("protocol") == ("ICMP" if v6 else "ICMPv6"):
            continue
        part = dict(rule)
        keep = True
        for side in ("source", "destination"):
            match = rule.get(side)
            if not match:
                continue
            narrowed = dict(match)
            for key in ("nets", "notNets"):
                if key in match:
                    cidrs = [c for c in match[key] if _is_v6(c) == v6]
                    if cidrs:
                        narrowed[key] = cidrs
                    else:
                        del narrowed[key]
                        keep = keep and key != "nets"
            part[side] = narrowed
        if keep:
            part["ipVersion"] = 6 if v6 else 4
            out.append(part)
    return out


@dataclass(slots=True)
class _LabelSets:
    """Distinct label sets of the selectable endpoints, in a bitset index (one pass per rule, not per endpoint)."""

    sets: list[dict[str, str]]
    index: LabelIndex
    quarantined: bool

    @classmethod
    def of(cls, eps: list[Endpoint]) -> _LabelSets:
        distinct: dict[tuple[tuple[str, str], ...], dict[str, str]] = {}
        for ep in eps:
            if not ep.quarantined:
                distinct.setdefault(tuple(sorted(ep.labels.items())), ep.labels)
        index = LabelIndex()
        sets = list(distinct.values())
        for slot, labels in enumerate(sets):
            index.add(slot, labels)
        return cls(sets, index, any(ep.quarantined for ep in eps))


def _pinned_combos(rule: CompiledRule, groups: _LabelSets) -> list[tuple[str | None, ...]]:
    """Pinned-value combinations present among both the rule's consumers and its providers."""
    assert rule.consumer.selector is not None and rule.provider.selector is not None
    combos: list[set[tuple[str | None, ...]]] = []
    for node in (rule.consumer.selector, rule.provider.selector):
        bits = selectors.evaluate(node, groups.index)
        # a missing value is shared with nobody: such a workload instantiates no app group
        combos.append(
            {
                combo
                for slot in iter_bits(bits)
                if None not in (combo := tuple(groups.sets[slot].get(d) for d in rule.same))
            }
        )
    return sorted(combos[0] & combos[1], key=lambda c: tuple((v is None, v or "") for v in c))


def rule_policies(
    rule: CompiledRule,
    eps: list[Endpoint] | _LabelSets,
    lists: Mapping[str, tuple[list[str], list[str]]],
) -> list[dict[str, Any]]:
    """The Calico policies implementing one compiled rule (both directions, expanded per app group)."""
    groups = eps if isinstance(eps, _LabelSets) else _LabelSets.of(eps)
    guard = groups.quarantined
    action = _CALICO_ACTION[rule.action]
    order = ORDER[rule.action]
    base = resource_name(f"rf-{rule.id}")
    fragments = service_rules(rule.services)
    out: list[dict[str, Any]] = []
    if rule.same and rule.consumer.selector is not None and rule.provider.selector is not None:
        variants: list[tuple[str, selectors.Node, selectors.Node]] = []
        for combo in _pinned_combos(rule, groups):
            pins = [_pin(d, v) for d, v in zip(rule.same, combo, strict=True)]
            suffix = resource_name(".".join(v if v is not None else "none" for v in combo))
            variants.append(
                (
                    f"{base}-{suffix}",
                    selectors.conjunction(rule.consumer.selector, *pins),
                    selectors.conjunction(rule.provider.selector, *pins),
                )
            )
    else:
        variants = [(base, rule.consumer.selector or selectors.All(), rule.provider.selector or selectors.All())]
    for name, consumer, provider in variants:
        if rule.provider.selector is not None:
            src = (
                {"selector": endpoint_selector(consumer, guard)}
                if rule.consumer.selector is not None
                else _net_match(rule.consumer, lists)
            )
            ingress = [_with_peer(f, "source", src, action) for f in fragments]
            out.append(_gnp(f"{name}-in", order, endpoint_selector(provider, guard), "ingress", ingress, rule.staged))
        if rule.consumer.selector is not None:
            dst = (
                {"selector": endpoint_selector(provider, guard)}
                if rule.provider.selector is not None
                else _net_match(rule.provider, lists)
            )
            egress = [_with_peer(f, "destination", dst, action) for f in fragments]
            out.append(_gnp(f"{name}-out", order, endpoint_selector(consumer, guard), "egress", egress, rule.staged))
    return out


def _with_peer(fragment: dict[str, Any], side: str, match: dict[str, Any], action: str) -> dict[str, Any]:
    rule: dict[str, Any] = {"action": action}
    rule.update({k: v for k, v in fragment.items() if k != "destination"})
    if match:
        rule[side] = dict(match)
    if "destination" in fragment:
        rule.setdefault("destination", {}).update(fragment["destination"])
    return rule


def host_endpoint(ep: Endpoint, modes: bool) -> dict[str, Any]:
    labels = {QUARANTINE_LABEL: "true"} if ep.quarantined else dict(sorted(ep.labels.items()))
    if modes and not ep.quarantined:
        labels[MODE_LABEL] = ep.mode.value
    spec: dict[str, Any] = {"node": ep.name, "interfaceName": "*"}
    if ep.ips:
        spec["expectedIPs"] = list(ep.ips)
    return {
        "apiVersion": API_VERSION,
        "kind": "HostEndpoint",
        "metadata": {"name": ep.name, "labels": labels},
        "spec": spec,
    }


def _failsafe_policies(policy: Policy) -> list[dict[str, Any]]:
    fs = policy.defaults.failsafes
    out: list[dict[str, Any]] = []
    if fs.admin_cidrs:
        frags = service_rules(parse_port_spec(p) for p in fs.admin_ports)
        ingress = [_with_peer(f, "source", {"nets": list(fs.admin_cidrs)}, "Allow") for f in frags]
        out.append(_gnp("rf-failsafe-management", ORDER["failsafes"], "all()", "ingress", ingress, False))
    egress: list[dict[str, Any]] = []
    if fs.dns_resolvers:
        dns = [addresses.format_prefix(addresses.parse_prefix(r)) for r in fs.dns_resolvers]
        for proto in ("UDP", "TCP"):
            egress.append({"action": "Allow", "protocol": proto, "destination": {"nets": dns, "ports": [53]}})
    if fs.control_plane:
        # the control plane's port only, as the agent admits it (CONTROL_PLANE_PORT)
        cp = {"nets": list(fs.control_plane), "ports": [CONTROL_PLANE_PORT]}
        egress.append({"action": "Allow", "protocol": "TCP", "destination": cp})
    if egress:
        out.append(_gnp("rf-failsafe-egress", ORDER["failsafes"], "all()", "egress", egress, False))
    return out


def export_documents(
    policy: Policy,
    workloads: Iterable[Workload],
    *,
    modes: bool = True,
    failsafes: bool = True,
    staged: bool = True,
) -> list[dict[str, Any]]:
    """The Calico resources as dicts: host endpoints first, then policies by order."""
    eps = endpoints(policy, workloads)
    docs: list[dict[str, Any]] = [host_endpoint(ep, modes) for ep in eps]
    if failsafes:
        docs += _failsafe_policies(policy)
    if any(ep.quarantined for ep in eps):
        docs.append(
            _gnp(
                "rf-quarantine-in",
                ORDER["quarantine"],
                f"has({QUARANTINE_LABEL})",
                "ingress",
                [{"action": "Deny"}],
                False,
            )
        )
        docs.append(
            _gnp(
                "rf-quarantine-out",
                ORDER["quarantine"],
                f"has({QUARANTINE_LABEL})",
                "egress",
                [{"action": "Deny"}],
                False,
            )
        )
    if modes and any(ep.mode is not Mode.ENFORCE and not ep.quarantined for ep in eps):
        sel = f"{MODE_LABEL} in {{'idle', 'observe'}}"
        docs.append(_gnp("rf-unenforced-in", ORDER["unenforced"], sel, "ingress", [{"action": "Allow"}], False))
        docs.append(_gnp("rf-unenforced-out", ORDER["unenforced"], sel, "egress", [{"action": "Allow"}], False))
    lists = ip_list_sources(policy)
    groups = _LabelSets.of(eps)
    seen: set[str] = set()
    for rule in sorted(policy.rules, key=lambda r: ORDER[r.action]):
        if rule.staged and not staged:
            continue
        for doc in rule_policies(rule, groups, lists):
            name = doc["metadata"]["name"]
            k = 1
            while doc["metadata"]["name"] in seen:  # two rule ids that sanitise alike
                k += 1
                doc["metadata"]["name"] = f"{name}-{k}"
            seen.add(doc["metadata"]["name"])
            docs.append(doc)
    for direction in ("ingress", "egress"):
        doc = _gnp(f"rf-default-deny-{direction}", DEFAULT_DENY_ORDER, "all()", direction, [], False)
        docs.append(doc)
    return docs


def export_calico(
    policy: Policy,
    workloads: Iterable[Workload],
    *,
    modes: bool = True,
    failsafes: bool = True,
    staged: bool = True,
) -> str:
    """Multi-document Calico YAML (HostEndpoints, then GlobalNetworkPolicies) for ``policy`` over ``workloads``."""
    docs = export_documents(policy, workloads, modes=modes, failsafes=failsafes, staged=staged)
    dumper = getattr(yaml, "CSafeDumper", yaml.SafeDumper)  # libyaml when available: ~10x faster
    return str(yaml.dump_all(docs, Dumper=dumper, sort_keys=False, default_flow_style=False, width=200))
