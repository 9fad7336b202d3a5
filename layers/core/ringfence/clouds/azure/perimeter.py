"""Coarse Azure perimeters from the provider-neutral plan (:mod:`ringfence.perimeter`): per VNet and
environment, the plan's groups are application security groups (ASGs) on the NICs' IP
configurations, and their rules are security rules of one network security group (NSG) per VNet
and environment, ``rf-<env>-nsg``, whose last rule (priority 4096) denies other inbound traffic to
the environment's boundary (Azure's default rules would allow the whole VNet in).

Azure's limits are checked before anything changes (:func:`azure_limits`): 1,000 rules per NSG,
priorities 100–4096, 10 ASGs per rule, 100 ASGs across one NSG's rules, 4,000 IP configurations
per ASG, 20 ASGs per IP configuration; over one, nothing is applied (QuotaExceeded). Changes are
the smallest diff: a rule is named by a digest of what it says, so only added and removed rules
are written, and only NICs whose ASGs change are written.
"""

from __future__ import annotations

import hashlib
from collections import defaultdict
from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import Any

from azure.mgmt.network.models import ApplicationSecurityGroup, NetworkInterface, NetworkSecurityGroup, SecurityRule

from ringfence.perimeter import (
    EGRESS,
    INGRESS,
    DesiredState,
    GroupSpec,
    Interface,
    Member,
    PerimeterConfig,
    PerimeterRule,
    Plan,
    QuotaExceeded,
    Scope,
    boundary_name,
    desired_state,
    plan,
)

from .arm import Arm, wire
from .model import ArmId, vnet_of

# every rule names one ASG or one address prefix per side (security_rule), so the per-rule limits
# on prefixes and ASGs are never approached: a CIDR list costs one rule each, counted here
RULES_PER_NSG = 1000
PRIORITY_FIRST, PRIORITY_LAST = 100, 4096
ASGS_PER_RULE = 10
ASGS_PER_NSG = 100
IPCONFIGS_PER_ASG = 4000
ASGS_PER_IPCONFIG = 20
DENY_PRIORITY = PRIORITY_LAST  # the boundary's closing rule
PREFIX = "rf-"
_PROTO = {"-1": "*", "tcp": "Tcp", "udp": "Udp", "icmp": "Icmp", "icmpv6": "Icmp"}


def nsg_name(env: str) -> str:
    return f"{PREFIX}{env}-nsg"


def rule_name(group: str, r: PerimeterRule) -> str:
    """A rule's name says what it is: the same rule is the same name, so the diff is by name."""
    digest = hashlib.sha256(repr((group, r)).encode()).hexdigest()[:16]
    return f"{PREFIX}{digest}"


def security_rule(group_id: str, r: PerimeterRule, asg_ids: dict[str, str], priority: int) -> dict[str, Any]:
    """A plan rule of the group whose ASG id is ``group_id`` as an ARM security rule (wire format)."""
    props: dict[str, Any] = {
        "protocol": _PROTO.get(r.proto, "*"),
        "access": "Allow",
        "priority": priority,
        "direction": "Inbound" if r.direction == INGRESS else "Outbound",
        "sourcePortRange": "*",
        "destinationPortRange": "*"
        if r.from_port < 0
        else (str(r.from_port) if r.to_port in (r.from_port, -1) else f"{r.from_port}-{r.to_port}"),
    }
    peer: dict[str, Any]
    if r.peer_kind == "group":
        peer = {"applicationSecurityGroups": [{"id": asg_ids[r.peer]}]}
    elif r.peer_kind == "cidr":
        peer = {"addressPrefix": r.peer}
    else:
        raise ValueError(f"{r.peer_kind} {r.peer}: Azure has no prefix lists (use control_plane_cidrs)")
    own = {"applicationSecurityGroups": [{"id": group_id}]}
    near, far = ("destination", "source") if r.direction == INGRESS else ("source", "destination")
    for side, what in ((near, own), (far, peer)):
        for k, v in what.items():
            props[side + k[0].upper() + k[1:]] = v
    return {"properties": props}


def deny_rule(boundary_id: str) -> dict[str, Any]:
    return {
        "properties": {
            "protocol": "*",
            "access": "Deny",
            "priority": DENY_PRIORITY,
            "direction": "Inbound",
            "sourcePortRange": "*",
            "destinationPortRange": "*",
            "sourceAddressPrefix": "*",
            "destinationApplicationSecurityGroups": [{"id": boundary_id}],
        }
    }


def azure_limits(ds: DesiredState, interfaces: dict[str, Interface], members_per_ipconfig: int = 1) -> list[str]:
    """Every Azure limit the desired state would exceed (empty: fits)."""
    out: list[str] = []
    per_nsg: dict[tuple[str, str], list[tuple[GroupSpec, PerimeterRule]]] = defaultdict(list)
    for (net, _), g in sorted(ds.groups.items()):
        for r in sorted(g.rules):
            per_nsg[(net, g.env)].append((g, r))
            if r.peer_kind == "prefix-list":
                out.append(f"{g.name} in {net}: prefix list {r.peer} (Azure has none; use CIDRs)")
    for (net, env), rules in sorted(per_nsg.items()):
        n = len(rules) + 1  # and the boundary's deny
        if n > RULES_PER_NSG:
            out.append(f"{nsg_name(env)} in {net}: {n} rules > {RULES_PER_NSG} (limit: rules per NSG)")
        if n > PRIORITY_LAST - PRIORITY_FIRST + 1:
            out.append(f"{nsg_name(env)} in {net}: {n} rules > the {PRIORITY_FIRST}–{PRIORITY_LAST} priorities")
        asgs = {g.name for g, _ in rules} | {r.peer for _, r in rules if r.peer_kind == "group"}
        if len(asgs) > ASGS_PER_NSG:
            out.append(f"{nsg_name(env)} in {net}: {len(asgs)} ASGs referenced > {ASGS_PER_NSG} (limit: ASGs per NSG)")
    members: dict[tuple[str, str], int] = defaultdict(int)
    for point, names in sorted(ds.attachments.items()):
        for name in names:
            members[(ds.networks[point], name)] += members_per_ipconfig
        itf = interfaces.get(point)
        total = len(names) + (itf.foreign if itf else 0)
        if total > ASGS_PER_IPCONFIG:
            out.append(f"{point}: {total} ASGs > {ASGS_PER_IPCONFIG} (limit: ASGs per IP configuration)")
    for (net, name), n in sorted(members.items()):
        if n > IPCONFIGS_PER_ASG:
            out.append(f"{name} in {net}: {n} IP configurations > {IPCONFIGS_PER_ASG} (limit: per ASG)")
    return out


@dataclass
class AzurePerimeterResult:
    plan: Plan
    writes: list[str] = field(default_factory=list)  # what was written, in order ("PUT asg rf-prod-boundary"…)
    warnings: list[str] = field(default_factory=list)


class AzurePerimeter:
    """One subscription's perimeter, kept in the resource group of each VNet."""

    def __init__(self, arm: Arm, config: PerimeterConfig) -> None:
        self.arm = arm
        self.config = config

    def reconcile(self, labels_of: dict[str, dict[str, str]], scope: Scope = Scope.FULL) -> AzurePerimeterResult:
        """``labels_of``: vmId → labels (the inventory's). Reads NICs, VMs, our ASGs and NSG rules,
        plans, checks limits (QuotaExceeded: nothing written), applies the smallest diff."""
        vm_ids = {v["id"].lower(): str(v.get("properties", {}).get("vmId", "")).lower() for v in self.arm.vms()}
        nics = self.arm.nics()
        members: list[Member] = []
        locations: dict[str, str] = {}
        by_nic: dict[str, dict[str, Any]] = {}
        asgs = self._asgs()
        interfaces: dict[str, Interface] = {}
        for nic in nics:
            props = nic.get("properties", {})
            configs = props.get("ipConfigurations") or []
            subnet = next(((c.get("properties") or {}).get("subnet", {}).get("id") for c in configs), None)
            net = vnet_of(subnet)
            owner = vm_ids.get(str((props.get("virtualMachine") or {}).get("id", "")).lower())
            if net is None:
                continue
            on = {
                a["id"].lower()
                for c in configs
                for a in (c.get("properties") or {}).get("applicationSecurityGroups") or []
            }
            ours = frozenset(n for n, aid in asgs.items() if aid.lower() in on)
            interfaces[nic["id"]] = Interface(
                nic["id"], net, owner if owner in labels_of else None, ours, len(on) - len(ours)
            )
            by_nic[nic["id"]] = nic
            locations[net] = nic.get("location") or locations.get(net, "")
            if owner in labels_of:
                members.append(Member(nic["id"], net, labels_of[owner]))
        existing_rules = self._rules()
        ds = desired_state(self.config, members, existing=[(net, n) for net in locations for n in asgs])
        actual = {key: {r for r, _ in rules.values()} for key, rules in existing_rules.items()}
        for name in asgs:  # an ASG of ours without rules yet is still ours
            for net in locations:
                actual.setdefault((net, name), set())
        p = plan(ds, actual, interfaces, scope)
        violations = azure_limits(ds, interfaces)
        if violations:
            raise QuotaExceeded(violations)
        res = AzurePerimeterResult(p)
        self._apply(p, ds, asgs, existing_rules, by_nic, locations, res)
        return res

    # --- reads

    def _asgs(self) -> dict[str, str]:
        """Our ASGs by name → id."""
        ops = self.arm.network.application_security_groups
        return {a.name: a.id for a in ops.list_all() if a.name and a.id and a.name.startswith(PREFIX)}

    def _rules(self) -> dict[tuple[str, str], dict[str, tuple[PerimeterRule, int]]]:
        """Our rules as the plan knows them: (network, group) → rule name → (rule, priority).
        Read back from the rules' names via the NSGs' tags (each NSG says which network it is for)."""
        out: dict[tuple[str, str], dict[str, tuple[PerimeterRule, int]]] = defaultdict(dict)
        for nsg in self.arm.network.network_security_groups.list_all():
            data = wire(nsg)
            tags = data.get("tags") or {}
            if not str(data.get("name", "")).startswith(PREFIX) or "ringfence-network" not in tags:
                continue
            rid = ArmId.parse(data["id"])
            for rule in self.arm.network.security_rules.list(rid.group, rid.names[0]):
                rw = wire(rule)
                key = (rw.get("properties") or {}).get("description", "")
                parsed = _parse_description(str(key))
                if parsed is not None:
                    group, r = parsed
                    out[(tags["ringfence-network"], group)][rw["name"]] = (r, int(rw["properties"]["priority"]))
        return out

    # --- writes

    def _apply(
        self,
        p: Plan,
        ds: DesiredState,
        asgs: dict[str, str],
        existing: dict[tuple[str, str], dict[str, tuple[PerimeterRule, int]]],
        nics: dict[str, dict[str, Any]],
        locations: dict[str, str],
        res: AzurePerimeterResult,
    ) -> None:
        net_ops = self.arm.network
        for g in p.create:
            if g.name not in asgs:
                group = ArmId.parse(g.network).group
                made = net_ops.application_security_groups.begin_create_or_update(
                    group,
                    g.name,
                    ApplicationSecurityGroup({"location": locations[g.network], "tags": {"ringfence": "perimeter"}}),
                ).result()
                asgs[g.name] = str(made.id)
                res.writes.append(f"PUT asg {g.name}")
        touched = {g.network for g in p.create} | {net for net, _ in p.authorize} | {net for net, _ in p.revoke}
        for net in sorted(touched):
            envs = {g.env for (n, _), g in ds.groups.items() if n == net}
            for env in sorted(envs):
                self._nsg(net, env, ds, asgs, existing, p, locations[net], res)
        for iid in sorted(set(p.attach) | set(p.detach)):
            self._nic(nics[iid], p.attach.get(iid, set()), p.detach.get(iid, set()), asgs, ds, res)
        for _net, name in p.delete:
            if name in asgs:
                net_ops.application_security_groups.begin_delete(ArmId.parse(asgs[name]).group, name).result()
                res.writes.append(f"DELETE asg {name}")

    def _nsg(
        self,
        net: str,
        env: str,
        ds: DesiredState,
        asgs: dict[str, str],
        existing: dict[tuple[str, str], dict[str, tuple[PerimeterRule, int]]],
        p: Plan,
        location: str,
        res: AzurePerimeterResult,
    ) -> None:
        ops = self.arm.network
        group = ArmId.parse(net).group
        name = nsg_name(env)
        if not any(key[0] == net and key[1].startswith(f"{PREFIX}{env}-") for key in existing):
            ops.network_security_groups.begin_create_or_update(
                group,
                name,
                NetworkSecurityGroup(
                    {"location": location, "tags": {"ringfence": "perimeter", "ringfence-network": net}}
                ),
            ).result()
            res.writes.append(f"PUT nsg {name}")
            ops.security_rules.begin_create_or_update(
                group, name, "rf-boundary-deny", SecurityRule(deny_rule(asgs[boundary_name(env)]))
            ).result()
            res.writes.append(f"PUT rule {name}/rf-boundary-deny")
        used = {prio for key, rules in existing.items() if key[0] == net for _, prio in rules.values()} | {
            DENY_PRIORITY
        }
        free = (n for n in range(PRIORITY_FIRST, PRIORITY_LAST) if n not in used)
        for (n, gname), rules in sorted(p.authorize.items()):
            if n != net or ds.groups[(n, gname)].env != env:
                continue
            for r in sorted(rules):
                body = security_rule(asgs[gname], r, asgs, next(free))
                body["properties"]["description"] = _describe(gname, r)
                ops.security_rules.begin_create_or_update(group, name, rule_name(gname, r), SecurityRule(body)).result()
                res.writes.append(f"PUT rule {name}/{rule_name(gname, r)}")
        for (n, gname), rules in sorted(p.revoke.items()):
            if n != net or not gname.startswith(f"{PREFIX}{env}-"):
                continue
            for r in sorted(rules):
                ops.security_rules.begin_delete(group, name, rule_name(gname, r)).result()
                res.writes.append(f"DELETE rule {name}/{rule_name(gname, r)}")

    def _nic(
        self,
        nic: dict[str, Any],
        on: set[str],
        off: set[str],
        asgs: dict[str, str],
        ds: DesiredState,
        res: AzurePerimeterResult,
    ) -> None:
        rid = ArmId.parse(nic["id"])
        body = {k: v for k, v in nic.items() if k in ("location", "tags", "properties")}
        props = body.setdefault("properties", {})
        drop = {asgs[n].lower() for n in off if n in asgs}
        for c in props.get("ipConfigurations") or []:
            cp = c.setdefault("properties", {})
            keep = [a for a in cp.get("applicationSecurityGroups") or [] if a["id"].lower() not in drop]
            have = {a["id"].lower() for a in keep}
            keep += [{"id": asgs[n]} for n in sorted(on) if asgs[n].lower() not in have]
            cp["applicationSecurityGroups"] = keep
        env = next((g.env for (_, gname), g in ds.groups.items() if gname in on), None)
        current = (props.get("networkSecurityGroup") or {}).get("id")
        if env is not None and current is None:
            props["networkSecurityGroup"] = {
                "id": f"/subscriptions/{rid.subscription}/resourceGroups/"
                f"{ArmId.parse(ds.networks[nic['id']]).group}/providers/"
                f"Microsoft.Network/networkSecurityGroups/{nsg_name(env)}"
            }
        elif env is not None and not ArmId.parse(str(current)).names[0].startswith(PREFIX):
            res.warnings.append(f"{nic['id']} has the NSG {current}: the {nsg_name(env)} rules do not apply to it")
        self.arm.network.network_interfaces.begin_create_or_update(
            rid.group, rid.names[0], NetworkInterface(body)
        ).result()
        res.writes.append(f"PUT nic {rid.names[0]}")


def _describe(group: str, r: PerimeterRule) -> str:
    """The rule as the plan states it, kept in the rule's description (read back on the next run)."""
    return "|".join(["ringfence", group, r.direction, r.proto, str(r.from_port), str(r.to_port), r.peer_kind, r.peer])


def _parse_description(text: str) -> tuple[str, PerimeterRule] | None:
    parts = text.split("|")
    if len(parts) != 8 or parts[0] != "ringfence":
        return None
    _, group, direction, proto, lo, hi, kind, peer = parts
    if direction not in (INGRESS, EGRESS):
        return None
    return group, PerimeterRule(direction, proto, int(lo), int(hi), kind, peer)


def members_of(records: Iterable[Any]) -> dict[str, dict[str, str]]:
    """vmId → labels of the active Azure workloads in inventory records."""
    return {r.id: dict(r.labels) for r in records if r.workload.cloud == "azure" and r.active}
