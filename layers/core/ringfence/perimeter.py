"""Coarse cloud perimeters: provider-neutral desired state, quota checks, smallest diff.

Per network (VPC) and environment, a handful of groups:

* ``rf-<env>-boundary`` — inbound from members of the same environment (a self reference) and
  from the environments configured as allowed to reach it; outbound open (fine-grained egress is
  the agent's job);
* ``rf-<env>-mgmt`` — control-plane access: admin ports from the admin ranges, outbound HTTPS to
  the control plane (CIDRs or a managed prefix list);
* ``rf-<env>-published`` — internet ingress, only to workloads whose labels match a published
  service, only on its ports.

Everything per workload stays in the agent. The plan is checked against the provider's quotas
*before* anything is changed (:func:`check_quotas`); over a quota, nothing is applied and the
error names the limit. No cloud SDK here: ``ringfence.clouds.aws.sg`` reads and applies.
"""

from __future__ import annotations

import ipaddress
from collections import defaultdict
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field

from pydantic import BaseModel, ConfigDict, Field

from ringfence.services import parse_port_spec

INGRESS, EGRESS = "ingress", "egress"
ANY_V4, ANY_V6 = "0.0.0.0/0", "::/0"


class PerimeterError(ValueError):
    pass


class QuotaExceeded(PerimeterError):
    """The plan would exceed a provider quota: nothing was changed."""

    def __init__(self, violations: list[str]) -> None:
        super().__init__("perimeter plan exceeds quotas, nothing changed: " + "; ".join(violations))
        self.violations = violations


# --- configuration -------------------------------------------------------------------------------


class _Cfg(BaseModel):
    model_config = ConfigDict(extra="forbid")


class PrefixListRef(_Cfg):
    id: str
    max_entries: int = Field(ge=1, description="a prefix list costs its max entries in every rule referencing it")
    family: str = Field("ipv4", pattern="^ipv[46]$")


class PublishedService(_Cfg):
    name: str
    match: dict[str, str] = Field(description="labels a workload must have, e.g. {role: lb}")
    ports: list[str] = Field(description="proto/port specs, e.g. tcp/443")
    sources: list[str] = Field(default_factory=lambda: [ANY_V4, ANY_V6])


class Quotas(_Cfg):
    """AWS defaults (adjustable per account): 60 rules per SG per direction per IP family, 5 SGs per ENI."""

    rules_per_group: int = 60
    groups_per_interface: int = 5


class PerimeterConfig(_Cfg):
    admin_cidrs: list[str] = Field(default_factory=list)
    admin_ports: list[str] = Field(default_factory=lambda: ["tcp/22", "tcp/3389"])
    control_plane_cidrs: list[str] = Field(default_factory=list)
    control_plane_prefix_list: PrefixListRef | None = None
    published: list[PublishedService] = Field(default_factory=list)
    reachable_from: dict[str, list[str]] = Field(
        default_factory=dict, description="env → other envs allowed into its boundary (e.g. shared: [prod, dev])"
    )
    quotas: Quotas = Field(default_factory=Quotas)


# --- desired state -------------------------------------------------------------------------------


@dataclass(frozen=True, order=True)
class PerimeterRule:
    direction: str  # ingress | egress
    proto: str  # tcp | udp | icmp | icmpv6 | -1 (all)
    from_port: int  # -1 for all
    to_port: int
    peer_kind: str  # cidr | group | prefix-list
    peer: str  # CIDR, group name (ours) / group id (foreign), prefix-list id

    def cost(self, prefix_lists: Mapping[str, PrefixListRef]) -> dict[str, int]:
        """Rule-quota cost per IP family."""
        if self.peer_kind == "cidr":
            fam = "ipv6" if ipaddress.ip_network(self.peer, strict=False).version == 6 else "ipv4"
            return {fam: 1}
        if self.peer_kind == "prefix-list":
            pl = prefix_lists.get(self.peer)
            return {pl.family: pl.max_entries} if pl else {"ipv4": 1}
        return {"ipv4": 1}  # a group reference costs one rule


@dataclass
class GroupSpec:
    name: str
    network: str
    env: str
    description: str
    rules: set[PerimeterRule] = field(default_factory=set)


@dataclass
class DesiredState:
    groups: dict[tuple[str, str], GroupSpec] = field(default_factory=dict)  # (network, name) → spec
    attachments: dict[str, set[str]] = field(default_factory=dict)  # interface/instance → group names
    networks: dict[str, str] = field(default_factory=dict)  # interface → network


@dataclass(frozen=True)
class Member:
    """A workload as the perimeter sees it."""

    id: str  # the attachment point (instance or interface id)
    network: str
    labels: Mapping[str, str]


def _ports(spec: str) -> tuple[str, int, int]:
    pr = parse_port_spec(spec)
    if pr.proto == "any":
        return "-1", -1, -1
    if pr.proto in ("tcp", "udp"):
        return pr.proto, pr.lo, pr.hi
    return pr.proto, (-1 if pr.is_whole() else pr.lo), -1


def desired_state(config: PerimeterConfig, members: Iterable[Member]) -> DesiredState:
    ds = DesiredState()
    by_net_env: dict[tuple[str, str], list[Member]] = defaultdict(list)
    for m in members:
        env = m.labels.get("env")
        if env:
            by_net_env[(m.network, env)].append(m)
    for (net, env), ms in sorted(by_net_env.items()):
        boundary = GroupSpec(f"rf-{env}-boundary", net, env, f"Ringfence {env} boundary")
        boundary.rules.add(PerimeterRule(INGRESS, "-1", -1, -1, "group", boundary.name))
        for other in config.reachable_from.get(env, []):
            boundary.rules.add(PerimeterRule(INGRESS, "-1", -1, -1, "group", f"rf-{other}-boundary"))
        boundary.rules.add(PerimeterRule(EGRESS, "-1", -1, -1, "cidr", ANY_V4))
        boundary.rules.add(PerimeterRule(EGRESS, "-1", -1, -1, "cidr", ANY_V6))
        mgmt = GroupSpec(f"rf-{env}-mgmt", net, env, f"Ringfence {env} control-plane access")
        for spec in config.admin_ports:
            proto, lo, hi = _ports(spec)
            for cidr in config.admin_cidrs:
                mgmt.rules.add(PerimeterRule(INGRESS, proto, lo, hi, "cidr", cidr))
        for cidr in config.control_plane_cidrs:
            mgmt.rules.add(PerimeterRule(EGRESS, "tcp", 443, 443, "cidr", cidr))
        if config.control_plane_prefix_list:
            mgmt.rules.add(PerimeterRule(EGRESS, "tcp", 443, 443, "prefix-list", config.control_plane_prefix_list.id))
        groups = [boundary, mgmt]
        published = GroupSpec(f"rf-{env}-published", net, env, f"Ringfence {env} published services")
        publishers: set[str] = set()
        for svc in config.published:
            matched = [m for m in ms if all(m.labels.get(k) == v for k, v in svc.match.items())]
            if not matched:
                continue
            publishers.update(m.id for m in matched)
            for spec in svc.ports:
                proto, lo, hi = _ports(spec)
                for src in svc.sources:
                    published.rules.add(PerimeterRule(INGRESS, proto, lo, hi, "cidr", src))
        if published.rules:
            groups.append(published)
        for g in groups:
            ds.groups[(net, g.name)] = g
        for m in ms:
            names = {boundary.name, mgmt.name} | ({published.name} if m.id in publishers else set())
            ds.attachments[m.id] = names
            ds.networks[m.id] = net
    return ds


def check_quotas(
    ds: DesiredState,
    config: PerimeterConfig,
    foreign_groups: Mapping[str, int] | None = None,
) -> list[str]:
    """Every quota the desired state would exceed (empty: fits). ``foreign_groups``: how many
    groups that are not ours each attachment point already has (they stay attached)."""
    q = config.quotas
    pls = (
        {config.control_plane_prefix_list.id: config.control_plane_prefix_list}
        if config.control_plane_prefix_list
        else {}
    )
    out: list[str] = []
    for (net, name), g in sorted(ds.groups.items()):
        used: dict[tuple[str, str], int] = defaultdict(int)
        for r in g.rules:
            for fam, n in r.cost(pls).items():
                used[(r.direction, fam)] += n
        for (direction, fam), n in sorted(used.items()):
            if n > q.rules_per_group:
                way = "inbound" if direction == INGRESS else "outbound"
                out.append(
                    f"{name} in {net}: {n} {way} {fam} rules > {q.rules_per_group} "
                    f"(limit: rules per security group per direction per IP family)"
                )
    for point, names in sorted(ds.attachments.items()):
        total = len(names) + (foreign_groups or {}).get(point, 0)
        if total > q.groups_per_interface:
            out.append(
                f"{point}: {total} security groups > {q.groups_per_interface} "
                f"(limit: security groups per network interface)"
            )
    return out


@dataclass
class Plan:
    create: list[GroupSpec] = field(default_factory=list)
    authorize: dict[tuple[str, str], set[PerimeterRule]] = field(default_factory=dict)
    revoke: dict[tuple[str, str], set[PerimeterRule]] = field(default_factory=dict)
    attach: dict[str, set[str]] = field(default_factory=dict)  # point → our group names to add

    @property
    def empty(self) -> bool:
        return not (self.create or self.authorize or self.revoke or self.attach)

    def summary(self) -> dict[str, int]:
        return {
            "create": len(self.create),
            "authorize": sum(len(v) for v in self.authorize.values()),
            "revoke": sum(len(v) for v in self.revoke.values()),
            "attach": sum(len(v) for v in self.attach.values()),
        }


def plan(
    ds: DesiredState,
    actual_rules: Mapping[tuple[str, str], set[PerimeterRule]],
    actual_attachments: Mapping[str, set[str]],
) -> Plan:
    """The smallest diff: only missing groups, missing/extra rules and missing attachments.

    A group that exists only in ``actual_rules`` is left alone (removing groups still attached
    somewhere is an operator decision); our groups are never detached here."""
    p = Plan()
    for key, g in sorted(ds.groups.items()):
        have = actual_rules.get(key)
        if have is None:
            p.create.append(g)
            have = set()
        add = g.rules - have
        rem = have - g.rules
        if add:
            p.authorize[key] = add
        if rem:
            p.revoke[key] = rem
    for point, names in sorted(ds.attachments.items()):
        missing = names - actual_attachments.get(point, set())
        if missing:
            p.attach[point] = missing
    return p
