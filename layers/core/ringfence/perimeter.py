"""Coarse cloud perimeters: provider-neutral desired state, quota checks, smallest diff.

Per network (VPC) and environment, a handful of groups:

* ``rf-<env>-boundary`` — inbound from members of the same environment (a self reference) and
  from the environments configured as allowed to reach it; outbound open (fine-grained egress is
  the agent's job);
* ``rf-<env>-mgmt`` — control-plane access: admin ports from the admin ranges, outbound HTTPS to
  the control plane (CIDRs or a managed prefix list);
* ``rf-<env>-published`` — internet ingress, only to workloads whose labels match a published
  service, only on its ports (on AWS one such group per service, ``rf-<env>-published.<service>``,
  so a workload gets only the ports of the services it matches).

Everything per workload stays in the agent. The plan is checked against the provider's quotas
*before* anything is changed (:func:`check_quotas`); over a quota, nothing is applied and the
error names the limit. No cloud SDK here: ``ringfence.clouds.aws.sg`` reads and applies.

Two kinds of run (:class:`Scope`): the event path reconciles the interfaces of the workloads an
event changed (groups created, missing rules added, those interfaces' attachments made exact);
the scheduled full run converges everything, revokes extra rules and removes groups that lost
their purpose — detached first, never a group that is not ours, never while an interface needs
it or cannot be judged.
"""

from __future__ import annotations

import ipaddress
from collections import Counter, defaultdict
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from enum import StrEnum

from pydantic import BaseModel, ConfigDict, Field, model_validator

from ringfence.services import parse_port_spec

INGRESS, EGRESS = "ingress", "egress"
ANY_V4, ANY_V6 = "0.0.0.0/0", "::/0"


class PerimeterError(ValueError):
    pass


class PlanRefused(PerimeterError):
    """The plan cannot be applied as a whole: nothing was changed."""

    what = "perimeter plan refused"

    def __init__(self, violations: list[str]) -> None:
        super().__init__(f"{self.what}, nothing changed: " + "; ".join(violations))
        self.violations = violations


class PerimeterRoleMissing(PlanRefused):
    """The place has no role the perimeter may manage it with: nothing was changed."""

    what = "perimeter not managed here"


class AuditNotWritten(PlanRefused):
    """The audit record of what a perimeter run was about to change could not be written: nothing
    was changed (a cloud's reconcile fails that subscription or project, and the next run tries again)."""

    what = "perimeter audit record not written"


class QuotaExceeded(PlanRefused):
    """The plan would exceed a provider quota: nothing was changed."""

    what = "perimeter plan exceeds quotas"


class NameTaken(PlanRefused):
    """A group the plan must create has a name another (not Ringfence's) group already holds."""

    what = "perimeter group names taken"


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
    """AWS defaults (adjustable per account): 60 rules per SG per direction per IP family, 5 SGs per ENI
    (at most 16), and the two multiplied at most 1,000."""

    rules_per_group: int = Field(60, ge=1)
    groups_per_interface: int = Field(5, ge=1, le=16)

    @model_validator(mode="after")
    def _combined(self) -> Quotas:
        if self.rules_per_group * self.groups_per_interface > 1000:
            raise ValueError(
                f"quotas: rules_per_group × groups_per_interface = "
                f"{self.rules_per_group * self.groups_per_interface} > 1000, which AWS never grants"
            )
        return self


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

    @model_validator(mode="after")
    def _unique_services(self) -> PerimeterConfig:
        # a published service's name names its group (AWS rf-<env>-published.<name>, Azure's ASG)
        # and its secure tag (GCP published_tags): two of one name would share one, and its ports
        counts = Counter(s.name for s in self.published)
        dup = sorted(name for name, n in counts.items() if n > 1)
        if dup:
            raise ValueError(
                "published: service names must be unique (a name is its group and its tag; two services "
                f"of one name would share them and each other's ports): {', '.join(map(repr, dup))} "
                "given more than once"
            )
        return self


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
    attachments: dict[str, set[str]] = field(default_factory=dict)  # interface → group names
    networks: dict[str, str] = field(default_factory=dict)  # interface → network


@dataclass(frozen=True)
class Member:
    """A workload as the perimeter sees it."""

    id: str  # the attachment point (a network interface: every interface of a workload is one)
    network: str
    labels: Mapping[str, str]


def _ports(spec: str) -> tuple[str, int, int]:
    pr = parse_port_spec(spec)
    if pr.proto == "any":
        return "-1", -1, -1
    if pr.proto in ("tcp", "udp"):
        return pr.proto, pr.lo, pr.hi
    return pr.proto, (-1 if pr.is_whole() else pr.lo), -1


def boundary_name(env: str) -> str:
    return f"rf-{env}-boundary"


def published_name(env: str, service: str | None = None) -> str:
    """``rf-<env>-published``, or per service ``rf-<env>-published.<service>``."""
    return f"rf-{env}-published" + (f".{service}" if service is not None else "")


def desired_state(
    config: PerimeterConfig,
    members: Iterable[Member],
    existing: Iterable[tuple[str, str]] = (),
    per_service: bool = False,
) -> DesiredState:
    """The groups and attachments ``members`` need. A boundary references another environment's
    boundary only where that group is wanted too or in ``existing`` ((network, name) pairs): a
    reference to a group that does not exist cannot be written, and a group kept alive only by
    a reference would never lose its purpose. ``per_service``: one published group per
    environment and service (:func:`published_name`), each on the workloads that service
    matches only; otherwise one per environment, with every published service's ports, on every
    workload any of them matches."""
    ds = DesiredState()
    by_net_env: dict[tuple[str, str], list[Member]] = defaultdict(list)
    for m in members:
        env = m.labels.get("env")
        if env:
            by_net_env[(m.network, env)].append(m)
    present = set(existing) | {(net, boundary_name(env)) for net, env in by_net_env}
    for (net, env), ms in sorted(by_net_env.items()):
        boundary = GroupSpec(boundary_name(env), net, env, f"Ringfence {env} boundary")
        boundary.rules.add(PerimeterRule(INGRESS, "-1", -1, -1, "group", boundary.name))
        for other in config.reachable_from.get(env, []):
            if (net, boundary_name(other)) in present:
                boundary.rules.add(PerimeterRule(INGRESS, "-1", -1, -1, "group", boundary_name(other)))
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
        published: dict[str, GroupSpec] = {}
        publishers: dict[str, set[str]] = defaultdict(set)  # member → published group names
        for svc in config.published:
            matched = [m for m in ms if all(m.labels.get(k) == v for k, v in svc.match.items())]
            if not matched:
                continue
            name = published_name(env, svc.name if per_service else None)
            what = f"published service {svc.name}" if per_service else "published services"
            pub = published.setdefault(name, GroupSpec(name, net, env, f"Ringfence {env} {what}"))
            for m in matched:
                publishers[m.id].add(name)
            for spec in svc.ports:
                proto, lo, hi = _ports(spec)
                for src in svc.sources:
                    pub.rules.add(PerimeterRule(INGRESS, proto, lo, hi, "cidr", src))
        groups += [g for g in published.values() if g.rules]
        for g in groups:
            ds.groups[(net, g.name)] = g
        for m in ms:
            names = {boundary.name, mgmt.name} | {n for n in publishers.get(m.id, ()) if published[n].rules}
            ds.attachments[m.id] = names
            ds.networks[m.id] = net
    return ds


def group_quota_violations(ds: DesiredState, config: PerimeterConfig) -> dict[tuple[str, str], list[str]]:
    """The groups of ``ds`` whose rules would exceed the rules-per-group quota, each with why."""
    q = config.quotas
    pls = (
        {config.control_plane_prefix_list.id: config.control_plane_prefix_list}
        if config.control_plane_prefix_list
        else {}
    )
    out: dict[tuple[str, str], list[str]] = {}
    for (net, name), g in sorted(ds.groups.items()):
        used: dict[tuple[str, str], int] = defaultdict(int)
        for r in g.rules:
            for fam, n in r.cost(pls).items():
                used[(r.direction, fam)] += n
        for (direction, fam), n in sorted(used.items()):
            if n > q.rules_per_group:
                way = "inbound" if direction == INGRESS else "outbound"
                out.setdefault((net, name), []).append(
                    f"{name} in {net}: {n} {way} {fam} rules > {q.rules_per_group} "
                    f"(limit: rules per security group per direction per IP family)"
                )
    return out


def interface_quota_violations(
    ds: DesiredState, config: PerimeterConfig, foreign_groups: Mapping[str, int] | None = None
) -> dict[str, str]:
    """The attachment points whose groups (ours wanted + ``foreign_groups`` staying) would exceed
    the groups-per-interface quota, each with why."""
    q = config.quotas
    out: dict[str, str] = {}
    for point, names in sorted(ds.attachments.items()):
        total = len(names) + (foreign_groups or {}).get(point, 0)
        if total > q.groups_per_interface:
            out[point] = (
                f"{point}: {total} security groups > {q.groups_per_interface} "
                f"(limit: security groups per network interface)"
            )
    return out


def check_quotas(
    ds: DesiredState,
    config: PerimeterConfig,
    foreign_groups: Mapping[str, int] | None = None,
) -> list[str]:
    """Every quota the desired state would exceed (empty: fits). ``foreign_groups``: how many
    groups that are not ours each attachment point already has (they stay attached)."""
    out = [v for vs in group_quota_violations(ds, config).values() for v in vs]
    return out + list(interface_quota_violations(ds, config, foreign_groups).values())


# --- the diff ------------------------------------------------------------------------------------


class Scope(StrEnum):
    WORKLOADS = "workloads"  # the event path: only the interfaces of the changed workloads
    FULL = "full"  # the scheduled reconcile: everything, including removing groups without purpose


@dataclass(frozen=True)
class Interface:
    """A network interface as the perimeter finds it."""

    id: str
    network: str
    workload: str | None  # the inventory workload it belongs to; None: not ours to judge
    ours: frozenset[str]  # names of our groups attached
    foreign: int  # how many attached groups are not ours (they stay)
    fixed: bool = False  # cannot be modified by us (e.g. requester-managed by another service)
    held: str | None = None  # left exactly as it is this run, and why (e.g. it would break a quota)
    # held for the groups-per-interface quota only: how many of our groups it may carry. It still
    # loses the groups of ours it must not carry (e.g. an older, wider group), each replaced by one
    # it wants, by name, while there is room: never more groups than it has, nothing it does not want
    room: int | None = None


@dataclass
class Plan:
    create: list[GroupSpec] = field(default_factory=list)
    authorize: dict[tuple[str, str], set[PerimeterRule]] = field(default_factory=dict)
    revoke: dict[tuple[str, str], set[PerimeterRule]] = field(default_factory=dict)
    attach: dict[str, set[str]] = field(default_factory=dict)  # interface → our group names to add
    detach: dict[str, set[str]] = field(default_factory=dict)  # interface → our group names to remove
    delete: list[tuple[str, str]] = field(default_factory=list)  # (network, name): no purpose left
    kept: dict[tuple[str, str], str] = field(default_factory=dict)  # purposeless but kept, and why

    @property
    def empty(self) -> bool:
        return not (self.create or self.authorize or self.revoke or self.attach or self.detach or self.delete)

    def summary(self) -> dict[str, int]:
        return {
            "create": len(self.create),
            "authorize": sum(len(v) for v in self.authorize.values()),
            "revoke": sum(len(v) for v in self.revoke.values()),
            "attach": sum(len(v) for v in self.attach.values()),
            "detach": sum(len(v) for v in self.detach.values()),
            "delete": len(self.delete),
        }


def plan(
    ds: DesiredState,
    actual_rules: Mapping[tuple[str, str], set[PerimeterRule]],
    interfaces: Mapping[str, Interface],
    scope: Scope = Scope.FULL,
    placeholder: str | None = None,
) -> Plan:
    """The smallest diff from what is (``actual_rules`` of our groups, ``interfaces``) to ``ds``.

    An interface that belongs to a workload (``workload`` set) gets exactly the groups ``ds``
    wants for it (none if it wants none), except that an interface is never left without any
    group (EC2 requires one). There, with a ``placeholder`` (the name of a group of ours without
    any rule), that group replaces ours: it is created in that network where missing, kept while
    an interface carries it, and deleted (full run) once none does; without one, ours stay. Under
    :attr:`Scope.WORKLOADS` rules are only added. An interface ``held`` with a ``room`` (over the
    groups-per-interface quota) loses the groups of ours it does not want, each replaced by one it
    wants (name order, within ``room``), so it never has more groups nor any access the plan does not
    give it. Under :attr:`Scope.FULL` extra rules are revoked
    and a group that exists but is not wanted is deleted once no interface carries it after this
    plan; a group still on an interface we must not judge or change (``workload`` None, ``fixed``,
    ``held``) is kept, with the reason."""
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
        if rem and scope is Scope.FULL:
            p.revoke[key] = rem
    after: dict[str, frozenset[str]] = {}
    for iid, itf in sorted(interfaces.items()):
        after[iid] = itf.ours
        if itf.held and itf.room is not None and itf.workload is not None and not itf.fixed:
            want = frozenset(ds.attachments.get(iid, set()))
            off = itf.ours - want
            keep = itf.ours & want
            candidates = sorted(n for n in want - itf.ours if (ds.networks.get(iid, itf.network), n) in ds.groups)
            on = frozenset(candidates[: max(0, min(len(off), itf.room - len(keep)))])
            if not (keep or on or itf.foreign):
                continue  # EC2 needs one group: as it is
            if on:
                p.attach[iid] = set(on)
            if off:
                p.detach[iid] = set(off)
            after[iid] = (itf.ours | on) - off
            continue
        if itf.workload is None or itf.fixed or itf.held:
            continue
        want = frozenset(ds.attachments.get(iid, set()))
        if not want and not itf.foreign and itf.ours:
            # the interface's only groups: EC2 needs one, so the rule-less placeholder replaces
            # ours (one write) — or, without a placeholder, ours stay
            want = frozenset({placeholder}) if placeholder else itf.ours
        on = want - itf.ours
        off = itf.ours - want
        if on:
            p.attach[iid] = set(on)
        if off:
            p.detach[iid] = set(off)
        after[iid] = (itf.ours | on) - off
    wanted = set(ds.groups)
    if placeholder:
        for net in sorted({interfaces[iid].network for iid, names in after.items() if placeholder in names}):
            key = (net, placeholder)
            wanted.add(key)
            have = actual_rules.get(key)
            if have is None:
                p.create.append(GroupSpec(placeholder, net, "", "Ringfence: no access (an interface's only group)"))
            elif have and scope is Scope.FULL:
                p.revoke[key] = set(have)
    if scope is Scope.FULL:
        for key in sorted(set(actual_rules) - wanted):
            net, name = key
            holders = sorted(iid for iid, names in after.items() if name in names and interfaces[iid].network == net)
            if not holders:
                p.delete.append(key)
                continue
            why = []
            for iid in holders:
                itf = interfaces[iid]
                if itf.workload is None:
                    why.append(f"{iid} belongs to no workload Ringfence knows")
                elif itf.fixed:
                    why.append(f"{iid} is managed by another service")
                elif itf.held:
                    why.append(f"{iid} ({itf.workload}) is left as it is: {itf.held}")
                else:
                    why.append(f"{iid} ({itf.workload}) has no other security group")
            p.kept[key] = "still attached: " + "; ".join(why)
    return p
