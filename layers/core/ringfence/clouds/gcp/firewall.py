"""Coarse perimeters on GCP: one global network firewall policy per VPC network (``rf-<network>``),
from the provider-neutral plan (:func:`ringfence.perimeter.desired_state`), limits checked before
any change, smallest diff.

AWS attaches security groups to interfaces; GCP targets rules at *secure tags* bound to the VMs
(IAM-governed, the label source we prefer): each environment's group becomes rules whose
``targetSecureTags`` is that environment's tag value (``ringfence-env/prod`` → ``tagValues/N``,
configured in :class:`GcpPerimeterConfig`), so there is nothing to attach — a VM is in the
perimeter its env tag says. Per environment:

* ``boundary``: allow ingress from the same env tag and from the envs ``reachable_from`` names
  (``srcSecureTags``), then a deny of all other ingress to the env tag (the policy's last word,
  priorities 60000+);
* ``mgmt``: admin ports from the admin ranges; egress HTTPS to the control plane;
* ``published``: internet ingress on a published service's ports, targeted at the service's own
  secure tag value.

A rule's identity is its content (direction, action, matches, targets): what exists and is
wanted keeps its priority; only the missing is added (lowest free priority of its band) and, in a
full run, the unwanted removed. A rule read back is compared whole: disabled, a second
layer4Config or any field Ringfence does not write makes it equal to no wanted rule (replaced).
A full run also empties of allows every policy Ringfence made (name and description) whose
network has no member left, leaving it the boundary denies (as :func:`translate` writes them) of
every env tag its ingress denies target. GCP's predefined rules (the four ``goto_next`` rules it
adds, above :data:`MAX_RULE_PRIORITY`, to a policy created through the API, which cannot be
modified or removed) are not read: no plan, limit or audit record counts them. Each network's
plan is applied on its own: one that fails does not keep the others from being applied
(:class:`ApplyFailed` names it). Limits (:class:`GcpLimits`) are checked
on the whole plan first: over one, nothing is changed and the error names it. The defaults are
placeholders to be set from https://cloud.google.com/firewall/docs/quotas for the organization
(not verified here).
"""

from __future__ import annotations

import ipaddress
import json
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field, replace
from typing import Any

from google.api_core.exceptions import GoogleAPICallError, NotFound, RetryError
from pydantic import BaseModel, ConfigDict, Field

from ringfence.perimeter import (
    ANY_V4,
    ANY_V6,
    EGRESS,
    INGRESS,
    GroupSpec,
    Member,
    NameTaken,
    PerimeterConfig,
    PerimeterError,
    PerimeterRule,
    PlanRefused,
    QuotaExceeded,
    Scope,
    boundary_name,
    desired_state,
)
from ringfence.store.base import InventoryRecord

from .clients import RETRY, Endpoints
from .instances import as_dict

ALLOW_BAND = (1000, 59999)
DENY_BAND = (60000, 64999)
# the lowest priority a rule of a firewall policy may be given; GCP's predefined goto_next rules sit
# above it (2147483644-2147483647) and cannot be modified or removed, so Ringfence never reads them
# (https://cloud.google.com/firewall/docs/firewall-policies-rule-details, .../pre-defined-rules)
MAX_RULE_PRIORITY = 2147483547


class ApplyFailed(PerimeterError):
    """Applying the plans of some networks failed (each is applied on its own: the others were)."""

    def __init__(self, failures: dict[str, str]) -> None:
        super().__init__(
            "perimeter apply failed for "
            + "; ".join(f"network {network}: {why}" for network, why in sorted(failures.items()))
        )
        self.failures = failures


class GcpLimits(BaseModel):
    """Per-policy and per-rule limits checked before any change (placeholders: set them from your
    organization's quotas page)."""

    model_config = ConfigDict(extra="forbid")
    rules_per_policy: int = Field(500, ge=1)
    rule_attributes_per_policy: int = Field(2000, ge=1, description="Google's 'rule tuple' count of a policy")
    ranges_per_rule: int = Field(256, ge=1)
    secure_tags_per_rule: int = Field(256, ge=1)


class GcpPerimeterConfig(BaseModel):
    model_config = ConfigDict(extra="forbid")
    env_tags: dict[str, str] = Field(default_factory=dict, description="env → its secure tag value (tagValues/N)")
    published_tags: dict[str, str] = Field(
        default_factory=dict, description="published service name → the secure tag value its VMs carry"
    )
    limits: GcpLimits = Field(default_factory=GcpLimits)


@dataclass(frozen=True, order=True)
class FwRule:
    """A firewall policy rule by content (its priority is where it sits, not what it is)."""

    direction: str  # INGRESS | EGRESS
    action: str  # allow | deny
    protocol: str  # all | tcp | udp | icmp | ipv6-icmp
    ports: tuple[str, ...]
    src_ranges: tuple[str, ...] = ()
    dest_ranges: tuple[str, ...] = ()
    src_tags: tuple[str, ...] = ()
    target_tags: tuple[str, ...] = ()
    group: str = ""  # the perimeter group it serves (its description)
    # the rule as read, when it is not exactly what :meth:`resource` writes (disabled, a second
    # layer4Config, any match or target field Ringfence does not write): equal to no wanted rule,
    # so a full run replaces it
    foreign: str = ""

    def attributes(self) -> int:
        """This rule's share of the policy's attribute ("tuple") count, as an estimate."""
        return (
            len(self.src_ranges)
            + len(self.dest_ranges)
            + len(self.src_tags)
            + len(self.target_tags)
            + max(1, len(self.ports))
        )

    def resource(self, priority: int) -> dict[str, Any]:
        l4: dict[str, Any] = {"ipProtocol": self.protocol}
        if self.ports:
            l4["ports"] = list(self.ports)
        match: dict[str, Any] = {"layer4Configs": [l4]}
        if self.src_ranges:
            match["srcIpRanges"] = list(self.src_ranges)
        if self.dest_ranges:
            match["destIpRanges"] = list(self.dest_ranges)
        if self.src_tags:
            match["srcSecureTags"] = [{"name": t} for t in self.src_tags]
        out: dict[str, Any] = {
            "priority": priority,
            "direction": self.direction,
            "action": self.action,
            "description": self.group,
            "match": match,
        }
        if self.target_tags:
            out["targetSecureTags"] = [{"name": t} for t in self.target_tags]
        return out

    @classmethod
    def from_resource(cls, r: Mapping[str, Any]) -> tuple[int, FwRule]:
        m = r.get("match", {}) or {}
        l4 = (m.get("layer4Configs") or [{}])[0]
        prio = int(r["priority"])
        rule = cls(
            direction=str(r.get("direction", "")),
            action=str(r.get("action", "")),
            protocol=str(l4.get("ipProtocol", "all")),
            ports=tuple(l4.get("ports", []) or []),
            src_ranges=tuple(m.get("srcIpRanges", []) or []),
            dest_ranges=tuple(m.get("destIpRanges", []) or []),
            src_tags=tuple(t["name"] for t in m.get("srcSecureTags", []) or []),
            target_tags=tuple(t["name"] for t in r.get("targetSecureTags", []) or []),
            group=str(r.get("description", "")),
        )
        read = _written(r)
        if read != _written(rule.resource(prio)):
            rule = replace(rule, foreign=json.dumps(read, sort_keys=True))
        return prio, rule


def read_rules(resources: Iterable[Mapping[str, Any]]) -> dict[int, FwRule]:
    """A policy's rules as Ringfence plans with them (priority → rule), GCP's predefined rules
    (above :data:`MAX_RULE_PRIORITY`) left out: they are not Ringfence's to change."""
    return dict(FwRule.from_resource(r) for r in resources if int(r["priority"]) <= MAX_RULE_PRIORITY)


# what the API adds to a rule and Ringfence does not write (a secure tag's ``state``: EFFECTIVE
# or INEFFECTIVE); ``priority`` is where a rule is, compared apart
_OUTPUT_ONLY = frozenset({"kind", "ruleTupleCount", "state", "priority"})


def _written(value: Any) -> Any:
    """A rule resource as it was written: output-only fields and unset (empty, false) values
    dropped, so what the API or the SDK adds or leaves at its default compares equal."""
    if isinstance(value, Mapping):
        out = {k: _written(v) for k, v in value.items() if k not in _OUTPUT_ONLY}
        return {k: v for k, v in out.items() if v not in (None, False, "", [], {})}
    if isinstance(value, list | tuple):
        return [_written(v) for v in value]
    return value


def members(records: Iterable[InventoryRecord], project: str) -> list[Member]:
    """The project's live VMs as the perimeter plan sees them (network: the VPC of nic0)."""
    return [
        Member(r.id, r.workload.vpc, dict(r.labels))
        for r in records
        if r.workload.cloud == "gcp" and r.workload.account == project and r.active and r.workload.vpc
    ]


def policy_name(network: str) -> str:
    return f"rf-{network}"


def policy_description(network: str) -> str:
    """What Ringfence writes as its policy's description: with the name, how it knows a policy is
    its own (network firewall policies carry no labels)."""
    return f"Ringfence perimeter of network {network}"


def owned_network(policy: Mapping[str, Any]) -> str | None:
    """The network of a policy Ringfence made (``rf-<network>`` with its description), else None."""
    name = str(policy.get("name", ""))
    network = name.removeprefix("rf-")
    if network == name or not network or policy.get("description") != policy_description(network):
        return None
    return network


def boundary_denies(group: str, env_tag: str) -> set[FwRule]:
    """An env's boundary denies: all other ingress to its tag stops (IPv4 and IPv6)."""
    return {
        FwRule("INGRESS", "deny", "all", (), src_ranges=(src,), target_tags=(env_tag,), group=group)
        for src in (ANY_V4, ANY_V6)
    }


def closed(existing: Mapping[int, FwRule], env_tags: Mapping[str, str]) -> set[FwRule]:
    """What an owned policy of a network without members keeps: no allow, and the boundary denies
    of every env tag an ingress deny of it targets, built as :func:`translate` writes them (not
    from the rules read: one narrowed, disabled or deleted by hand comes back whole) — a VM tagged
    into the env later is closed until the next pass plans its perimeter. ``env_tags``: env →
    tag value (the boundary group of a tag no longer configured is taken from its deny)."""
    env_of = {tag: env for env, tag in env_tags.items()}
    out: set[FwRule] = set()
    for r in existing.values():
        if r.action != "deny" or r.direction != "INGRESS":
            continue
        for tag in r.target_tags:
            if tag in env_of:
                out |= boundary_denies(boundary_name(env_of[tag]), tag)
            elif r.group.endswith("-boundary"):
                out |= boundary_denies(r.group, tag)
    return out


def _protocol(rule: PerimeterRule) -> tuple[str, tuple[str, ...]]:
    if rule.proto == "-1":
        return "all", ()
    proto = "ipv6-icmp" if rule.proto == "icmpv6" else rule.proto
    if rule.proto in ("tcp", "udp") and rule.from_port >= 0:
        ports = str(rule.from_port) if rule.from_port == rule.to_port else f"{rule.from_port}-{rule.to_port}"
        return proto, (ports,)
    return proto, ()


def translate(
    groups: Iterable[GroupSpec], gcfg: GcpPerimeterConfig, published: Mapping[str, str]
) -> tuple[dict[str, set[FwRule]], list[str]]:
    """The neutral groups → wanted rules per network, and what cannot be expressed (refusals).
    ``published``: group name → the service tag for ``rf-<env>-published`` groups (one service's
    rules: the groups of :func:`desired_state` with that service alone published)."""
    wanted: dict[str, set[FwRule]] = {}
    problems: list[str] = []
    for g in groups:
        rules = wanted.setdefault(g.network, set())
        env_tag = gcfg.env_tags.get(g.env)
        if env_tag is None:
            problems.append(
                f"env {g.env!r} has no secure tag value (gcp perimeter env_tags): {g.name} cannot target it"
            )
            continue
        if g.name.endswith("-published"):
            # internet ingress goes to the service's own tag only, never to the whole env
            if g.name not in published:
                problems.append(f"{g.name}: no published service's secure tag value to target")
                continue
            target = published[g.name]
        else:
            target = env_tag
        for r in sorted(g.rules):
            proto, ports = _protocol(r)
            base: dict[str, Any] = {"protocol": proto, "ports": ports, "target_tags": (target,), "group": g.name}
            if r.peer_kind == "group":
                other = r.peer.removeprefix("rf-").removesuffix("-boundary")
                tag = gcfg.env_tags.get(other)
                if tag is None:
                    problems.append(f"{g.name}: env {other!r} has no secure tag value (gcp perimeter env_tags)")
                    continue
                rules.add(FwRule(INGRESS.upper(), "allow", src_tags=(tag,), **base))
            elif r.peer_kind == "cidr":
                if r.direction == EGRESS and r.peer in (ANY_V4, ANY_V6) and proto == "all":
                    continue  # GCP allows all egress unless denied: open egress needs no rule
                ipaddress.ip_network(r.peer, strict=False)
                if r.direction == INGRESS:
                    rules.add(FwRule("INGRESS", "allow", src_ranges=(r.peer,), **base))
                else:
                    rules.add(FwRule("EGRESS", "allow", dest_ranges=(r.peer,), **base))
            else:
                problems.append(f"{g.name}: a {r.peer_kind} peer ({r.peer}) has no GCP firewall equivalent")
        if g.name.endswith("-boundary"):
            # everything the allows above did not admit stops at the env's boundary
            rules |= boundary_denies(g.name, env_tag)
    return wanted, problems


def check_limits(policy: str, rules: Iterable[FwRule], limits: GcpLimits) -> list[str]:
    out: list[str] = []
    rules = list(rules)
    if len(rules) > limits.rules_per_policy:
        out.append(f"{policy}: {len(rules)} rules > {limits.rules_per_policy} (limit: rules per firewall policy)")
    attrs = sum(r.attributes() for r in rules)
    if attrs > limits.rule_attributes_per_policy:
        out.append(
            f"{policy}: {attrs} rule attributes > {limits.rule_attributes_per_policy} "
            "(limit: rule attributes per firewall policy)"
        )
    for r in sorted(rules):
        n = len(r.src_ranges) + len(r.dest_ranges)
        if n > limits.ranges_per_rule:
            out.append(f"{policy} ({r.group}): {n} ranges in one rule > {limits.ranges_per_rule}")
        t = len(r.src_tags) + len(r.target_tags)
        if t > limits.secure_tags_per_rule:
            out.append(f"{policy} ({r.group}): {t} secure tags in one rule > {limits.secure_tags_per_rule}")
    return out


@dataclass
class PolicyPlan:
    network: str
    policy: str
    create: bool = False
    add: list[tuple[int, FwRule]] = field(default_factory=list)
    remove: list[tuple[int, FwRule]] = field(default_factory=list)
    # the policy is not (or not yet) associated with its network: an unassociated policy enforces nothing
    associate: bool = False

    @property
    def empty(self) -> bool:
        return not (self.create or self.associate or self.add or self.remove)


# what one audit record lists of rules added and of rules removed (its counts are always whole)
AUDIT_ITEMS = 100


def rule_doc(priority: int, rule: FwRule) -> dict[str, Any]:
    """A rule as an audit record names it: its priority and what it matches, empty fields left out."""
    doc: dict[str, Any] = {"priority": priority} | {
        k: list(v) if isinstance(v, tuple) else v for k, v in vars(rule).items() if v not in ((), "") and k != "foreign"
    }
    if rule.foreign:  # as read, when it was not what Ringfence writes (what the removal takes away)
        doc["as_read"] = json.loads(rule.foreign)
    return doc


def changes_of(plans: Iterable[PolicyPlan]) -> dict[str, Any]:
    """What applying ``plans`` changes, as an audit record's detail: the policies created and
    associated, and the rules added and removed (each list its first :data:`AUDIT_ITEMS`)."""
    plans = [p for p in plans if not p.empty]
    out: dict[str, Any] = {
        "policies_created": [{"policy": p.policy, "network": p.network} for p in plans if p.create],
        "policies_associated": [{"policy": p.policy, "network": p.network} for p in plans if p.associate],
        "rules_added": [{"policy": p.policy} | rule_doc(prio, r) for p in plans for prio, r in p.add],
        "rules_removed": [{"policy": p.policy} | rule_doc(prio, r) for p in plans for prio, r in p.remove],
    }
    return {k: v[:AUDIT_ITEMS] for k, v in out.items()} | {"counts": {k: len(v) for k, v in out.items()}}


def diff(
    network: str, wanted: set[FwRule], existing: Mapping[int, FwRule] | None, scope: Scope = Scope.FULL
) -> PolicyPlan:
    """The smallest change from ``existing`` (priority → rule; None: no policy yet) to ``wanted``."""
    p = PolicyPlan(network, policy_name(network), create=existing is None)
    # GCP's predefined rules are never Ringfence's to remove (read_rules leaves them out already)
    have = {prio: r for prio, r in (existing or {}).items() if prio <= MAX_RULE_PRIORITY}
    present = set(have.values())
    used = set(have)
    if scope is Scope.FULL:
        for prio, rule in sorted(have.items()):
            if rule not in wanted:
                p.remove.append((prio, rule))
    for rule in sorted(wanted - present):
        lo, hi = DENY_BAND if rule.action == "deny" else ALLOW_BAND
        prio = next(i for i in range(lo, hi + 1) if i not in used)
        used.add(prio)
        p.add.append((prio, rule))
    return p


def _network_ref(target: Any) -> str:
    """An association's ``attachmentTarget`` (a full URL or a relative name) as
    ``projects/P/global/networks/N``."""
    text = str(target or "")
    return text[text.find("projects/") :] if "projects/" in text else text


class FirewallPolicyPerimeter:
    """Reads and applies ``rf-<network>`` network firewall policies through the SDK client."""

    def __init__(self, endpoints: Endpoints, project: str) -> None:
        self.project = project
        self.client = endpoints.firewall_policies()

    def target(self, network: str) -> str:
        return f"projects/{self.project}/global/networks/{network}"

    def existing(self, network: str) -> dict[int, FwRule] | None:
        return self.read(network)[0]

    def read(self, network: str) -> tuple[dict[int, FwRule] | None, bool]:
        """``rf-<network>``'s rules (None: no such policy) and whether it is associated with the
        network. Raises :class:`NameTaken` if a policy of that name is not Ringfence's (its
        description is not :func:`policy_description`): it is never read as ours nor changed."""
        name = policy_name(network)
        try:
            policy = as_dict(self.client.get(project=self.project, firewall_policy=name, retry=RETRY))
        except NotFound:
            return None, False
        if owned_network(policy) != network:
            raise NameTaken(
                [
                    f"{name} (project {self.project}) is held by a firewall policy Ringfence did not make "
                    f"(description {policy.get('description', '')!r}, not {policy_description(network)!r}); "
                    f"network {network} has no Ringfence perimeter until it is renamed or removed"
                ]
            )
        associated = any(
            _network_ref(a.get("attachmentTarget")) == self.target(network)
            for a in policy.get("associations", []) or []
        )
        return read_rules(policy.get("rules", []) or []), associated

    def holders(self) -> dict[str, str]:
        """Network resource name (projects/P/global/networks/N) → the name of the project's global
        network firewall policy associated with it (GCP allows one per network)."""
        out: dict[str, str] = {}
        for policy in self.client.list(project=self.project, retry=RETRY):
            p = as_dict(policy)
            for a in p.get("associations", []) or []:
                out[_network_ref(a.get("attachmentTarget"))] = str(p.get("name", ""))
        return out

    def owned(self) -> set[str]:
        """The networks of the project's policies Ringfence made."""
        out: set[str] = set()
        for policy in self.client.list(project=self.project, retry=RETRY):
            network = owned_network(as_dict(policy))
            if network is not None:
                out.add(network)
        return out

    def reconcile(
        self,
        config: PerimeterConfig,
        gcfg: GcpPerimeterConfig,
        members: Iterable[Member],
        scope: Scope = Scope.FULL,
        dry_run: bool = False,
        applying: Callable[[list[PolicyPlan]], None] | None = None,
    ) -> list[PolicyPlan]:
        """Plan every network's policy, check it whole, then apply (unless ``dry_run``). Raises
        :class:`PlanRefused` / :class:`QuotaExceeded` with nothing changed. ``applying`` is told
        the plans that change something before the first change (to audit them): raising there
        changes nothing. Each network's plan is applied on its own: if any fails, the others are
        still applied and :class:`ApplyFailed` is raised after, naming each that failed."""
        members = list(members)
        ds = desired_state(config, members)
        # the neutral plan merges every published service of an env into one group: GCP targets
        # each service's rules at that service's own secure tag, so each is planned on its own
        groups = [g for g in ds.groups.values() if not g.name.endswith("-published")]
        wanted, problems = translate(groups, gcfg, {})
        for svc in config.published:
            alone = config.model_copy(update={"published": [svc]})
            mine = [g for g in desired_state(alone, members).groups.values() if g.name.endswith("-published")]
            if not mine:
                continue
            tag = gcfg.published_tags.get(svc.name)
            if tag is None:
                problems.append(
                    f"published service {svc.name!r} has no secure tag value (gcp perimeter published_tags)"
                )
                continue
            more, why = translate(mine, gcfg, {g.name: tag for g in mine})
            problems += [p for p in why if p not in problems]
            for network, rules in more.items():
                wanted.setdefault(network, set()).update(rules)
        if problems:
            raise PlanRefused(problems)
        plans: list[PolicyPlan] = []
        over: list[str] = []
        held: dict[str, str] | None = None
        for network in sorted(wanted):
            existing, associated = self.read(network)
            plan = diff(network, wanted[network], existing, scope)
            if not associated:
                # checked on every run: a policy whose association failed (or was removed) would
                # otherwise be converged forever and enforce nothing
                plan.associate = True
                held = self.holders() if held is None else held
                other = held.get(self.target(network))
                if other is not None and other != plan.policy:
                    problems.append(
                        f"network {network} (project {self.project}) has firewall policy {other!r} associated: "
                        f"{plan.policy} cannot be associated (GCP allows one global network firewall policy "
                        "per network), so it would enforce nothing"
                    )
            # the additions are made before the removals: the policy is at its largest in between
            largest = set((existing or {}).values()) | {r for _, r in plan.add}
            over += check_limits(plan.policy, largest, gcfg.limits)
            plans.append(plan)
        if problems:
            raise PlanRefused(problems)
        if scope is Scope.FULL:
            # a network whose last member left keeps no allow (they target secure tags: a VM
            # tagged later would get them); only policies Ringfence made, known by name and description
            for network in sorted(self.owned() - set(wanted)):
                existing, _ = self.read(network)
                if existing is None:
                    continue
                plan = diff(network, closed(existing, gcfg.env_tags), existing, scope)
                if not plan.empty:
                    plans.append(plan)
        if over:
            raise QuotaExceeded(over)
        if not dry_run:
            todo = [p for p in plans if not p.empty]
            if todo and applying is not None:
                applying(todo)
            failed: dict[str, str] = {}
            for plan in todo:
                # one network's refused write must not leave the networks after it (name order)
                # without their adds and removals: a retired service's internet allow kept open
                try:
                    self.apply(plan)
                except (GoogleAPICallError, RetryError) as exc:
                    failed[plan.network] = f"{type(exc).__name__}: {exc}"
            if failed:
                raise ApplyFailed(failed)
        return plans

    def apply(self, plan: PolicyPlan) -> None:
        from google.cloud import compute_v1

        fp = plan.policy
        if plan.create:
            self.client.insert(
                project=self.project,
                firewall_policy_resource=compute_v1.FirewallPolicy(
                    name=fp, description=policy_description(plan.network)
                ),
                retry=RETRY,
            ).result()
        # additions first (diff never gives an add the priority of a rule still there): a failed add
        # leaves the rule it replaces in place, never a network without its boundary deny
        for prio, rule in plan.add:
            self.client.add_rule(
                project=self.project,
                firewall_policy=fp,
                firewall_policy_rule_resource=compute_v1.FirewallPolicyRule.from_json(json.dumps(rule.resource(prio))),
                retry=RETRY,
            ).result()
        for prio, _ in plan.remove:
            self.client.remove_rule(
                request={"project": self.project, "firewall_policy": fp, "priority": prio}, retry=RETRY
            ).result()
        # associated last: an unassociated policy enforces nothing, so its rules are made what
        # the plan says first (a stale allow it still held, or a failed add, is never enforced)
        if plan.associate:
            self.client.add_association(
                project=self.project,
                firewall_policy=fp,
                firewall_policy_association_resource=compute_v1.FirewallPolicyAssociation(
                    name=f"{fp}-{plan.network}", attachment_target=self.target(plan.network)
                ),
                retry=RETRY,
            ).result()
