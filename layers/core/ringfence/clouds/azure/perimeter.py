"""Coarse Azure perimeters from the provider-neutral plan (:mod:`ringfence.perimeter`): per VNet and
environment, the plan's groups are application security groups (ASGs) on the NICs' IP
configurations, and their rules are security rules of one network security group (NSG) per VNet
and environment, ``rf-<env>-nsg``, whose last rule (priority 4096) denies other inbound traffic to
the environment's boundary (Azure's default rules would allow the whole VNet in).

Azure's limits are checked before anything changes (:func:`azure_limits`): 1,000 rules per NSG,
priorities 100–4096, 10 ASGs per rule, 100 ASGs across one NSG's rules, 4,000 IP configurations
per ASG, 20 ASGs per IP configuration; over one, nothing is applied (QuotaExceeded). So are the
configured CIDRs (CidrInvalid) and the names to create (NameTaken: an rf-* ASG or NSG without our
tag is another team's, never taken over).

Ours are only what we write: ASGs tagged ``ringfence: perimeter`` and named
``rf-<env>-(boundary|mgmt)`` or ``rf-<env>-published.<service>`` (one per published service, on
the NICs of the VMs it matches only; the older shared ``rf-<env>-published`` is still recognised, so
the full run swaps it out and deletes it), NSGs tagged so and named ``rf-<env>-nsg``, each kept by
(resource group, name). Every run compares each of our NSGs whole, by what its rules say (protocol,
ports, prefixes, ASGs, access, direction, priority; not the description): a missing or changed rule
of ours is written again, the boundary's deny among them; a full run also deletes every other rule
in it (the event path deletes nothing, and picks priorities no rule in the NSG holds). A NIC gets exactly
its environment's ASGs (none when it has no environment: Azure needs none) and its environment's
NSG where it has none or another environment's of ours; a NIC of a known VM without an environment
loses our ASGs and, where its NSG is ours (or none while it had our ASGs), gets ``rf-none`` (every
inbound denied: the env NSG's deny names an ASG it no longer has). An env that gives a name ARM
refuses leaves that VM's NICs as they are (a warning), the run goes on. The NSG is per resource
group and env: the VNets of one resource group share it, their rules merged. Changes are the smallest diff: a rule is
named by a digest of what it says, and only rules and NICs that differ are written.

Before the first write a run can tell its caller everything it is about to write (``applying``,
:func:`changes_of`: ASGs and NSGs created and deleted, rules written and deleted with what they say,
each NIC's ASGs added and removed and its NSG), found by the same code over copies with every write
left out, so that the changes are audited first; raising there writes nothing.

A NIC is written last, minutes after the run read it in a large subscription, and ARM replaces it
whole: so it is read again just before, only our changes (our ASGs on or off, our NSG) are applied
to what it holds then, and it is written with ``If-Match`` its etag. Another team's change made
meanwhile is kept; one made between that read and the write is refused by ARM (412) and the NIC is
read and tried once more. A NIC that now needs a change the audit record does not list (or is
gone, or keeps changing) is left for the next run, with a warning (:attr:`AzurePerimeterResult.skipped`).

An ASG or NSG is created with ``If-None-Match: *`` (:meth:`AzurePerimeter._create`): one of the same
name made by someone else after the run read the resource group is never replaced nor taken over.
ARM refuses the create (412); the resource is read, used if it is ours (another run's: tagged and
named so; an NSG's rules it does not want are left for the next run, not in this run's record),
else the run stops there, before any NIC is written (NameTaken). A rule is written with ``If-Match``
the etag it was read with (``If-None-Match: *`` where there was none): changed in between, it is read
again and written over what it is then, or after a second refusal left for the next run (a warning).
An NSG one of whose rule writes was refused so gets no NIC this run (those NICs are left as they
are: the NSG may let in what its rules, the deny among them, should not), and the run reports both
in :attr:`AzurePerimeterResult.not_done` (its caller fails the subscription and audits them).
"""

from __future__ import annotations

import copy
import hashlib
import ipaddress
import re
from collections import defaultdict
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from typing import Any

from azure.core.exceptions import HttpResponseError, ResourceModifiedError, ResourceNotFoundError
from azure.mgmt.network.models import ApplicationSecurityGroup, NetworkInterface, NetworkSecurityGroup, SecurityRule

from ringfence.perimeter import (
    INGRESS,
    DesiredState,
    Interface,
    Member,
    NameTaken,
    PerimeterConfig,
    PerimeterRule,
    Plan,
    PlanRefused,
    QuotaExceeded,
    Scope,
    boundary_name,
    desired_state,
    plan,
    published_name,
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


def deny_all_rule() -> dict[str, Any]:
    """rf-none's only rule: every inbound denied (Azure's default AllowVnetInBound comes after it)."""
    deny = deny_rule("")
    props = deny["properties"]
    del props["destinationApplicationSecurityGroups"]
    props["destinationAddressPrefix"] = "*"
    return deny


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
    # one NSG per resource group and env: the VNets of one resource group share it
    per_nsg: dict[tuple[str, str], set[tuple[str, PerimeterRule]]] = defaultdict(set)
    for (net, _), g in sorted(ds.groups.items()):
        for r in sorted(g.rules):
            per_nsg[(_nsg_place(net), g.env)].add((g.name, r))
            if r.peer_kind == "prefix-list":
                out.append(f"{g.name} in {net}: prefix list {r.peer} (Azure has none; use CIDRs)")
    for (net, env), rules in sorted(per_nsg.items()):
        n = len(rules) + 1  # and the boundary's deny
        if n > RULES_PER_NSG:
            out.append(f"{nsg_name(env)} in {net}: {n} rules > {RULES_PER_NSG} (limit: rules per NSG)")
        if n > PRIORITY_LAST - PRIORITY_FIRST + 1:
            out.append(f"{nsg_name(env)} in {net}: {n} rules > the {PRIORITY_FIRST}–{PRIORITY_LAST} priorities")
        asgs = {g for g, _ in rules} | {r.peer for _, r in rules if r.peer_kind == "group"}
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
    changes: list[dict[str, Any]] = field(default_factory=list)  # each write, as an audit record names it
    skipped: list[str] = field(default_factory=list)  # NICs left for the next run (each one a warning too)
    # what the audit record lists but this run did not do because a rule write was refused (the
    # rules, and the NICs not put on their NSG), as :attr:`changes` names them: the run failed
    not_done: list[dict[str, Any]] = field(default_factory=list)
    refused_nsgs: set[str] = field(default_factory=set)  # ids (lower case) of NSGs with a rule refused


# what one audit record lists of each kind of change (its counts are always whole)
AUDIT_ITEMS = 100


class CidrInvalid(PlanRefused):
    """A configured address range is not one: nothing was changed."""

    what = "perimeter CIDRs invalid"


DENY_NAME = "rf-boundary-deny"
# the NSG of a known VM's NIC that has no env (any more): every inbound denied, no ASG needed. Not
# rf-<something>-nsg, so no env's NSG can have its name
NONE_NSG = "rf-none"
DENY_ALL_NAME = "rf-deny-all"
# ARM's rule for ASG and NSG names: 1-80 characters, alphanumerics, _ . -, starting alphanumeric,
# ending alphanumeric or _ (ARM refuses another with InvalidResourceName)
ARM_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,78}[A-Za-z0-9_]$")
TAG = {"ringfence": "perimeter"}
SERVICE_CHARS = "A-Za-z0-9_"  # no "-" or ".": rf-<env>-published.<service> is no other env's name
SERVICE_OK = re.compile(rf"^[{SERVICE_CHARS}]+$")
# rf-<env>-published.<service>: one per published service; rf-<env>-published, the older shared one,
# is still recognised as ours, so the full run swaps it out on each NIC and deletes it
_OUR_ASG = re.compile(rf"^rf-.+-(boundary|mgmt|published|published\.[{SERVICE_CHARS}]+)$")
_OUR_NSG = re.compile(r"^rf-.+-nsg$")
# the properties that decide what a security rule lets through (description and state do not)
_RULE_FIELDS = (
    "protocol",
    "access",
    "direction",
    "sourcePortRange",
    "sourcePortRanges",
    "destinationPortRange",
    "destinationPortRanges",
    "sourceAddressPrefix",
    "sourceAddressPrefixes",
    "destinationAddressPrefix",
    "destinationAddressPrefixes",
    "sourceApplicationSecurityGroups",
    "destinationApplicationSecurityGroups",
)


def _rule_key(props: dict[str, Any]) -> tuple[Any, ...]:
    """What a rule says, comparable: absent, empty and None are the same; ids and cases as ARM compares."""
    out: list[Any] = []
    for f in _RULE_FIELDS:
        v = props.get(f)
        if f.endswith("ApplicationSecurityGroups"):
            v = tuple(sorted(str(a.get("id", "")).lower() for a in v or []))
        elif isinstance(v, list):
            v = tuple(sorted(str(x).lower() for x in v))
        elif isinstance(v, str):
            v = v.lower()
        out.append(v or None)
    return tuple(out)


def check_cidrs(config: PerimeterConfig) -> list[str]:
    """Every configured address range that is not a CIDR (empty: all parse)."""
    out = []
    named = [("admin_cidrs", c) for c in config.admin_cidrs]
    named += [("control_plane_cidrs", c) for c in config.control_plane_cidrs]
    named += [(f"published {s.name} sources", c) for s in config.published for c in s.sources]
    for where, cidr in named:
        try:
            ipaddress.ip_network(cidr, strict=False)
        except ValueError:
            out.append(f"{where}: {cidr!r} is not a CIDR")
    return out


class AzurePerimeter:
    """One subscription's perimeter, kept in the resource group of each VNet."""

    def __init__(self, arm: Arm, config: PerimeterConfig) -> None:
        self.arm = arm
        self.config = config
        self._ahead = False  # finding what a run would write: every write left out
        self._etags: dict[tuple[str, str, str], str] = {}  # (resource group, NSG, rule) → etag as read

    def reconcile(
        self,
        labels_of: dict[str, dict[str, str]],
        scope: Scope = Scope.FULL,
        applying: Callable[[dict[str, Any]], None] | None = None,
    ) -> AzurePerimeterResult:
        """``labels_of``: vmId → labels (the inventory's). Reads NICs, VMs, our ASGs and NSGs with all
        their rules, plans, checks CIDRs, names and limits (PlanRefused: nothing written), applies the
        smallest diff. Every run compares each of our NSGs whole (the boundary's deny included) by what
        its rules say; a full run also deletes every rule in them Ringfence does not want.
        ``applying`` is told what the run will write (:func:`changes_of`) before the first write, if
        it writes anything: raising there writes nothing."""
        bad = check_cidrs(self.config)
        if bad:
            raise CidrInvalid(bad)
        warnings: list[str] = []
        cfg = self.config
        bad_services = [s.name for s in cfg.published if not SERVICE_OK.match(s.name)]
        for name in bad_services:
            warnings.append(
                f"published service {name!r} cannot name an ASG (only letters, digits and _): no workload gets its ports"
            )
        if bad_services:
            cfg = cfg.model_copy(update={"published": [s for s in cfg.published if s.name not in bad_services]})
        vm_ids = {
            v["id"].lower(): str(v.get("properties", {}).get("vmId", "")).lower()
            for p in self.arm.vms()
            for v in p.items
        }
        nics = self.arm.nics()
        members: list[Member] = []
        locations: dict[str, str] = {}
        by_nic: dict[str, dict[str, Any]] = {}
        asgs, taken = self._asgs()
        interfaces: dict[str, Interface] = {}
        planned: dict[str, Interface] = {}
        unnamable = {owner: why for owner, labels in labels_of.items() if (why := _unnamable(cfg, labels))}
        for vm, why in sorted(unnamable.items()):
            warnings.append(f"VM {vm}: its NICs are left as they are: {why}")
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
            rg = _rg(net)
            ours = frozenset(n for (g, n), aid in asgs.items() if g == rg and aid.lower() in on)
            held = unnamable.get(owner) if owner else None
            itf = Interface(nic["id"], net, owner if owner in labels_of else None, ours, len(on) - len(ours), held=held)
            interfaces[nic["id"]] = itf
            # Azure needs no ASG on a NIC (EC2 needs a group: the plan keeps ours on an interface that
            # wants none and has nothing else); the plan sees one foreign ASG so ours come off
            planned[nic["id"]] = Interface(
                itf.id, net, itf.workload, ours, max(itf.foreign, 1), itf.fixed, held=itf.held
            )
            by_nic[nic["id"]] = nic
            locations[net] = nic.get("location") or locations.get(net, "")
            if owner in labels_of and not held:
                members.append(Member(nic["id"], net, labels_of[owner]))
        nsgs, rules = self._nsgs(taken)
        ours_in = [(net, n) for net in locations for (g, n) in asgs if g == _rg(net)]
        ds, want, p = self._plan(cfg, members, ours_in, asgs, rules, planned, locations, scope)
        if p.delete:  # an ASG about to go must not be named by a rule this run writes (reachable_from)
            ds, want, p = self._plan(
                cfg, members, [k for k in ours_in if k not in set(p.delete)], asgs, rules, planned, locations, scope
            )
        violations = azure_limits(ds, interfaces)
        if violations:
            raise QuotaExceeded(violations)
        closing = self._closing(ds, interfaces, by_nic, nsgs)
        for iid in sorted(closing):
            net = interfaces[iid].network
            want.setdefault((_rg(net), NONE_NSG), ({DENY_ALL_NAME: ("", None, _no_priority(deny_all_rule()))}, net))
        for rg, name in nsgs:  # an rf-none no NIC needs now is still kept closed
            if name == NONE_NSG and (rg, name) not in want:
                want[(rg, name)] = ({DENY_ALL_NAME: ("", None, _no_priority(deny_all_rule()))}, "")
        clash = [
            f"ASG {g.name} in {_rg(g.network)}" for g in p.create if g.name in taken.get(_rg(g.network), set())
        ] + [f"NSG {name} in {rg}" for rg, name in want if name in taken.get(rg, set()) and (rg, name) not in nsgs]
        if clash:
            raise NameTaken([f"{c} is held by a resource without the ringfence=perimeter tag" for c in clash])
        res = AzurePerimeterResult(p, warnings=warnings)
        if applying is not None:
            # the writes found by the apply itself over copies (it updates what it read as it goes)
            ahead = AzurePerimeterResult(p)
            self._ahead = True
            try:
                p2, asgs2, nsgs2, rules2, want2, nics2 = copy.deepcopy((p, asgs, nsgs, rules, want, by_nic))
                self._apply(p2, ds, asgs2, nsgs2, rules2, want2, nics2, interfaces, closing, locations, scope, ahead)
            finally:
                self._ahead = False
            if ahead.changes:
                applying(changes_of(ahead.changes))
        self._apply(p, ds, asgs, nsgs, rules, want, by_nic, interfaces, closing, locations, scope, res)
        return res

    def _plan(
        self,
        cfg: PerimeterConfig,
        members: list[Member],
        existing: list[tuple[str, str]],
        asgs: dict[tuple[str, str], str],
        rules: dict[tuple[str, str], dict[str, dict[str, Any]]],
        planned: dict[str, Interface],
        locations: dict[str, str],
        scope: Scope,
    ) -> tuple[DesiredState, Want, Plan]:
        """The desired state, each NSG's rules as wanted, and the plan: a plan rule exists when the
        NSG holds a rule of its name that says what it should."""
        ds = desired_state(cfg, members, existing=existing, per_service=True)
        want = self._want(ds, asgs, locations)
        actual: dict[tuple[str, str], set[PerimeterRule]] = {
            (net, n): set() for net in locations for (g, n) in asgs if g == _rg(net)
        }
        for (net, gname), g in ds.groups.items():
            key = (_rg(net), nsg_name(g.env))
            have, wanted = rules.get(key, {}), want[key][0]
            for r in g.rules:
                rname = rule_name(gname, r)
                if rname in have and _rule_key(have[rname]) == _rule_key(wanted[rname][2]["properties"]):
                    actual.setdefault((net, gname), set()).add(r)
        p = plan(ds, actual, planned, scope)
        # an ASG is one per resource group, the plan's groups are per VNet: one that another VNet of
        # its resource group still wants, or whose NICs still carry it, has a purpose
        used = {(_rg(net), n) for net, n in ds.groups}
        for iid, itf in planned.items():
            used |= {(_rg(itf.network), n) for n in (itf.ours | p.attach.get(iid, set())) - p.detach.get(iid, set())}
        p.delete = [(net, n) for net, n in p.delete if (_rg(net), n) not in used]
        return ds, want, p

    # --- reads

    def _asgs(self) -> tuple[dict[tuple[str, str], str], dict[str, set[str]]]:
        """Our ASGs, (resource group, name) → id: tagged ``ringfence: perimeter`` (what we write) and
        named as the plan names groups. And the names of the rf-* ASGs and NSGs that are not ours, by
        resource group (we must not take them over)."""
        ours: dict[tuple[str, str], str] = {}
        taken: dict[str, set[str]] = defaultdict(set)
        for a in self.arm.network.application_security_groups.list_all():
            if not (a.name and a.id and a.name.startswith(PREFIX)):
                continue
            rg = ArmId.parse(a.id).group.lower()
            if (a.tags or {}).get("ringfence") == "perimeter" and _OUR_ASG.match(a.name):
                ours[(rg, a.name)] = a.id
            else:
                taken[rg].add(a.name)
        return ours, taken

    def _nsgs(
        self, taken: dict[str, set[str]]
    ) -> tuple[dict[tuple[str, str], str], dict[tuple[str, str], dict[str, dict[str, Any]]]]:
        """Our NSGs, (resource group, name) → id (tagged and named ``rf-<env>-nsg``), and every rule
        in each, rule name → properties as stored."""
        nsgs: dict[tuple[str, str], str] = {}
        rules: dict[tuple[str, str], dict[str, dict[str, Any]]] = {}
        for nsg in self.arm.network.network_security_groups.list_all():
            data = wire(nsg)
            name = str(data.get("name", ""))
            if not name.startswith(PREFIX):
                continue
            rid = ArmId.parse(data["id"])
            rg = rid.group.lower()
            tags = data.get("tags") or {}
            if tags.get("ringfence") != "perimeter" or not (_OUR_NSG.match(name) or name == NONE_NSG):
                taken[rg].add(name)
                continue
            nsgs[(rg, name)] = data["id"]
            rules[(rg, name)] = self._rules(rid.group, name)
        return nsgs, rules

    def _rules(self, group: str, nsg: str) -> dict[str, dict[str, Any]]:
        """Every rule in the NSG, rule name → properties as stored (each one's etag kept for its
        write: :meth:`_put_rule`)."""
        out: dict[str, dict[str, Any]] = {}
        for rw in (wire(r) for r in self.arm.network.security_rules.list(group, nsg)):
            out[str(rw["name"])] = rw.get("properties") or {}
            if rw.get("etag"):
                self._etags[(group.lower(), nsg.lower(), str(rw["name"]).lower())] = str(rw["etag"])
        return out

    def _want(self, ds: DesiredState, asgs: dict[tuple[str, str], str], locations: dict[str, str]) -> Want:
        """Per (resource group, NSG name): the NSG's rules as they must be, name → (group, plan rule,
        body without priority), the boundary's deny among them (group ""), and a network of it. The
        VNets of one resource group with the same env share its NSG: their rules are merged (a rule
        is named by what it says, and an ASG is the same one in every VNet of the resource group)."""
        out: Want = {}
        for (net, gname), g in sorted(ds.groups.items()):
            # ARM ids are known before a resource exists: those of ASGs this run creates too (in this
            # subscription, in the VNet's resource group)
            ids = {n: f"{_asg_prefix(self.arm.subscription, net)}{n}" for (nn, n) in ds.groups if nn == net}
            ids.update({n: aid for (rg, n), aid in asgs.items() if rg == _rg(net)})
            for r in sorted(g.rules):
                body = security_rule(ids[gname], r, ids, 0)
                del body["properties"]["priority"]
                body["properties"]["description"] = _describe(gname, r)
                out.setdefault((_rg(net), nsg_name(g.env)), ({}, net))[0][rule_name(gname, r)] = (gname, r, body)
            if gname == boundary_name(g.env):
                out.setdefault((_rg(net), nsg_name(g.env)), ({}, net))[0][DENY_NAME] = (
                    "",
                    None,
                    _no_priority(deny_rule(ids[gname])),
                )
        return out

    def _closing(
        self,
        ds: DesiredState,
        interfaces: dict[str, Interface],
        nics: dict[str, dict[str, Any]],
        nsgs: dict[tuple[str, str], str],
    ) -> set[str]:
        """The NICs that get rf-none: of a known VM without an env, whose NSG is one of ours (an env's,
        whose deny names an ASG the NIC no longer has, so Azure's AllowVnetInBound would admit the
        VNet), or none while it still carries ASGs of ours. A VM Ringfence never segmented is left."""
        ours = {v.lower() for v in nsgs.values()}
        out = set()
        for iid, itf in interfaces.items():
            if itf.workload is None or itf.fixed or itf.held or iid in ds.attachments:
                continue
            current = ((nics[iid].get("properties") or {}).get("networkSecurityGroup") or {}).get("id")
            if (current is None and itf.ours) or (current is not None and str(current).lower() in ours):
                out.add(iid)
        return out

    # --- writes

    def _apply(
        self,
        p: Plan,
        ds: DesiredState,
        asgs: dict[tuple[str, str], str],
        nsgs: dict[tuple[str, str], str],
        rules: dict[tuple[str, str], dict[str, dict[str, Any]]],
        want: Want,
        nics: dict[str, dict[str, Any]],
        interfaces: dict[str, Interface],
        closing: set[str],
        locations: dict[str, str],
        scope: Scope,
        res: AzurePerimeterResult,
    ) -> None:
        net_ops = self.arm.network
        for g in p.create:
            key = (_rg(g.network), g.name)
            if key not in asgs:
                if self._ahead:  # ARM ids are known before a resource exists
                    asgs[key] = f"{_asg_prefix(self.arm.subscription, g.network)}{g.name}"
                else:
                    asgs[key], created = self._create(
                        "ASG",
                        net_ops.application_security_groups,
                        ArmId.parse(g.network).group,
                        g.name,
                        ApplicationSecurityGroup({"location": locations[g.network], "tags": dict(TAG)}),
                        res,
                    )
                    if not created:
                        continue
                res.writes.append(f"PUT asg {g.name}")
                res.changes.append({"kind": "asg-created", "name": g.name, "resource_group": key[0]})
        for key, (wanted, net) in sorted(want.items()):
            self._nsg(key, net, nsgs, rules, wanted, locations.get(net, ""), scope, res)
        still_on: set[tuple[str, str]] = set()  # our ASGs a NIC left for the next run may still carry
        for iid, itf in sorted(interfaces.items()):
            if itf.workload is None or itf.fixed or itf.held:
                continue
            on, off = p.attach.get(iid, set()), p.detach.get(iid, set())
            left = len(res.skipped)
            nic_plan = _NicPlan(itf.network, on, off, asgs, nsgs, ds, close=iid in closing)
            self._nic(nics[iid], nic_plan, res, vm=itf.workload)
            if len(res.skipped) > left:
                still_on |= {(_rg(itf.network), n) for n in off}
        if p.delete:
            self._unreference(p, asgs, nsgs, rules, want, res)
        for net, name in p.delete:
            key = (_rg(net), name)
            if key in still_on:  # ARM refuses to delete an ASG a NIC holds: the next run deletes it
                res.warnings.append(f"ASG {name} in {key[0]} not deleted: a NIC left for the next run may hold it")
                continue
            if key in asgs:
                if not self._ahead:
                    net_ops.application_security_groups.begin_delete(ArmId.parse(net).group, name).result()
                del asgs[key]
                res.writes.append(f"DELETE asg {name}")
                res.changes.append({"kind": "asg-deleted", "name": name, "resource_group": key[0]})

    def _unreference(
        self,
        p: Plan,
        asgs: dict[tuple[str, str], str],
        nsgs: dict[tuple[str, str], str],
        rules: dict[tuple[str, str], dict[str, dict[str, Any]]],
        want: Want,
        res: AzurePerimeterResult,
    ) -> None:
        """Before ASGs are deleted, the rules of our NSGs no environment wants any more that name them
        go (ARM refuses to delete an ASG a security rule names)."""
        gone = {asgs[(_rg(net), name)].lower() for net, name in p.delete if (_rg(net), name) in asgs}
        kept = set(want)
        for key, nid in sorted(nsgs.items()):
            if key in kept:
                continue
            rid = ArmId.parse(nid)
            for rname, props in sorted(rules.get(key, {}).items()):
                named = {
                    str(a.get("id", "")).lower()
                    for side in ("source", "destination")
                    for a in props.get(f"{side}ApplicationSecurityGroups") or []
                }
                if named & gone:
                    if not self._ahead:
                        self.arm.network.security_rules.begin_delete(rid.group, rid.names[0], rname).result()
                    res.writes.append(f"DELETE rule {rid.names[0]}/{rname}")
                    res.changes.append(_rule_change("rule-deleted", key, rname, props))

    def _nsg(
        self,
        key: tuple[str, str],
        net: str,
        nsgs: dict[tuple[str, str], str],
        rules: dict[tuple[str, str], dict[str, dict[str, Any]]],
        wanted: dict[str, tuple[str, PerimeterRule | None, dict[str, Any]]],
        location: str,
        scope: Scope,
        res: AzurePerimeterResult,
    ) -> None:
        """The NSG ``key`` (resource group, name; ``net``: a network of it) exactly as wanted: missing
        or changed rules (the deny among them) written, and under a full run every other rule deleted."""
        ops = self.arm.network
        name = key[1]
        group = ArmId.parse(nsgs.get(key, net)).group
        adopted = False
        if key not in nsgs:
            created = True
            if self._ahead:
                nsgs[key] = (
                    f"/subscriptions/{self.arm.subscription}/resourceGroups/{group}/providers/"
                    f"Microsoft.Network/networkSecurityGroups/{name}"
                )
            else:
                nsgs[key], created = self._create(
                    "NSG",
                    ops.network_security_groups,
                    group,
                    name,
                    NetworkSecurityGroup({"location": location, "tags": {**TAG, "ringfence-network": net}}),
                    res,
                )
            if created:
                rules[key] = {}
                res.writes.append(f"PUT nsg {name}")
                res.changes.append({"kind": "nsg-created", "name": name, "resource_group": key[0]})
            else:  # ours, made by another run meanwhile: its rules as they are now
                rules[key] = self._rules(group, name)
                adopted = True
        have = dict(rules.get(key, {}))
        if scope is Scope.FULL and adopted:
            # the audit record was found for an NSG created empty: deleting what the other run put
            # in it is not in the record, so the next run does it under its own
            extra = sorted(set(have) - set(wanted))
            if extra:
                res.warnings.append(
                    f"NSG {name} in {key[0]}: {len(extra)} rule(s) not wanted left for the next run "
                    "(the NSG was created by another run during this one)"
                )
        elif scope is Scope.FULL:
            for rname in sorted(set(have) - set(wanted)):
                if not self._ahead:
                    ops.security_rules.begin_delete(group, name, rname).result()
                res.changes.append(_rule_change("rule-deleted", key, rname, have[rname]))
                del have[rname]
                res.writes.append(f"DELETE rule {name}/{rname}")
        used: dict[int, int] = defaultdict(int)
        for props in have.values():
            used[int(props.get("priority") or 0)] += 1
        for rname, (_, _, body) in sorted(wanted.items(), key=lambda kv: kv[0] not in (DENY_NAME, DENY_ALL_NAME)):
            current = have.get(rname)
            prio = int((current or {}).get("priority") or 0)
            right = DENY_PRIORITY if rname in (DENY_NAME, DENY_ALL_NAME) else None
            ok_prio = prio == right if right else PRIORITY_FIRST <= prio < DENY_PRIORITY and used[prio] == 1
            if current is not None and ok_prio and _rule_key(current) == _rule_key(body["properties"]):
                continue
            if current is not None:
                used[prio] -= 1
            if right is None:
                right = next(n for n in range(PRIORITY_FIRST, DENY_PRIORITY) if not used[n])
            used[right] += 1
            full = {"properties": {**body["properties"], "priority": right}}
            if not self._ahead:
                written = self._put_rule(group, name, rname, full, res)
                if written is None:  # refused: no NIC goes onto this NSG this run (_nic)
                    res.refused_nsgs.add(nsgs[key].lower())
                    res.not_done.append(_rule_change("rule-written", key, rname, full["properties"]))
                if not written:
                    continue
            res.writes.append(f"PUT rule {name}/{rname}")
            res.changes.append(_rule_change("rule-written", key, rname, full["properties"]))

    def _put_rule(
        self, group: str, nsg: str, rname: str, full: dict[str, Any], res: AzurePerimeterResult
    ) -> bool | None:
        """Writes our rule ``rname`` as ``full`` says, conditionally on the rule as the run read it:
        ``If-Match`` its etag, or ``If-None-Match: *`` where there was none. Refused (412: changed,
        made or deleted since), it is read again and, unless it now says what we want, written
        once more over what it is now (the NSG is ours whole, and the record lists this write);
        refused each time, it is left for the next run with a warning. Whether it was written (False:
        it says what we want already), None: refused each time."""
        ops = self.arm.network.security_rules
        etag = self._etags.get((group.lower(), nsg.lower(), rname.lower()))
        for tried in range(1, RULE_WRITE_TRIES + 1):
            condition = {"If-Match": etag} if etag else {"If-None-Match": "*"}
            try:
                ops.begin_create_or_update(group, nsg, rname, SecurityRule(full), headers=condition).result()
                return True
            except HttpResponseError as exc:
                if exc.status_code != 412:
                    raise
            if tried == RULE_WRITE_TRIES:
                break
            try:
                now = wire(ops.get(group, nsg, rname))
            except ResourceNotFoundError:
                etag = None
                continue
            props = now.get("properties") or {}
            if props.get("priority") == full["properties"]["priority"] and _rule_key(props) == _rule_key(
                full["properties"]
            ):
                return False  # someone made it so already
            etag = now.get("etag")
        res.warnings.append(
            f"rule {nsg}/{rname} in {group.lower()} not written: it changed between each of "
            f"{RULE_WRITE_TRIES} reads and the write after it; left for the next run"
        )
        return None

    def _create(
        self, kind: str, ops: Any, group: str, name: str, body: Any, res: AzurePerimeterResult
    ) -> tuple[str, bool]:
        """Creates the ASG or NSG ``name`` (``kind``; ``ops``: its SDK operations) only if there is
        none: the PUT carries ``If-None-Match: *``, so one made by someone else since the run read
        the resource group (another team, a second run) is never replaced by ours (its tags, an
        NSG's rules) nor taken over. ARM refuses such a PUT (412): the resource is read and used if
        it is ours as a run's read decides (tagged ``ringfence: perimeter``, named as we name ours),
        else the run stops as for any rf-* name it holds (NameTaken; nothing is written to a NIC).
        Its id, and whether this run created it."""
        ours = _OUR_ASG if kind == "ASG" else _OUR_NSG
        for _ in range(CREATE_TRIES):
            try:
                made = ops.begin_create_or_update(group, name, body, headers={"If-None-Match": "*"}).result()
                return str(made.id), True
            except HttpResponseError as exc:
                if exc.status_code != 412:
                    raise
            try:
                there = wire(ops.get(group, name))
            except ResourceNotFoundError:
                continue  # deleted again since: try to create it once more
            tags = there.get("tags") or {}
            if tags.get("ringfence") == "perimeter" and (ours.match(name) or name == NONE_NSG):
                res.warnings.append(
                    f"{kind} {name} in {group.lower()} was created by another run during this one: used"
                )
                return str(there["id"]), False
            raise NameTaken(
                [
                    f"{kind} {name} in {group.lower()} is held by a resource without the ringfence=perimeter tag "
                    "(created during this run)"
                ]
            )
        raise NameTaken([f"{kind} {name} in {group.lower()} kept appearing and disappearing during this run"])

    def _nic(self, nic: dict[str, Any], plan: _NicPlan, res: AzurePerimeterResult, vm: str | None = None) -> None:
        """The NIC's ASGs as planned, and the NSG of its environment where it has none or another
        environment's of ours (whose deny would name an ASG the NIC no longer has); ``plan.close``:
        no env, rf-none (in the same PUT that takes our ASGs off).

        ``nic`` is the copy read at the start of the run, minutes before this write in a large
        subscription (ASGs, NSGs and rules are written first, each waiting for ARM): what is found
        on it is what the audit record lists. The write itself is made to the NIC as it is now (read
        again, with only our changes applied to it, written with ``If-Match`` its etag), so that
        nothing another team changed on it meanwhile (its own ASGs, an NSG, IP configurations) is
        undone; and only if what it needs now is within what the record lists."""
        planned = plan.change(nic, res.warnings)
        if planned is None:
            return
        name = ArmId.parse(nic["id"]).names[0]
        if planned.nsg is not None and planned.nsg.lower() in res.refused_nsgs:
            # a rule of that NSG could not be written (it may allow what it should deny): the NIC is
            # not put on it, nor written at all this run
            self._leave(nic["id"], f"a rule write of its NSG {planned.nsg.rsplit('/', 1)[-1]} was refused", res)
            res.not_done.append(_nic_record(name, vm, planned))
            return
        done: _NicChange | None = planned
        if not self._ahead:
            done = self._write_nic(nic["id"], plan, planned, res)
        if done is None:
            return
        res.writes.append(f"PUT nic {name}")
        res.changes.append(_nic_record(name, vm, done))

    def _write_nic(
        self, nic_id: str, plan: _NicPlan, planned: _NicChange, res: AzurePerimeterResult
    ) -> _NicChange | None:
        """Reads the NIC, applies our changes to what it holds now and writes that with ``If-Match``
        its etag; a write refused because it changed after that read (412) is tried once more from a
        fresh read. What was written, or None: nothing to write any more, or the NIC left as it is
        for the next run (gone, moved, needing what the record does not list, or changed again)."""
        rid = ArmId.parse(nic_id)
        ops = self.arm.network.network_interfaces
        for _ in range(NIC_WRITE_TRIES):
            live = self.arm.nic(rid.group, rid.names[0])
            configs = (live or {}).get("properties", {}).get("ipConfigurations") or []
            subnet = next(((c.get("properties") or {}).get("subnet", {}).get("id") for c in configs), None)
            etag = (live or {}).get("etag")
            if live is None or str(vnet_of(subnet) or "").lower() != plan.net.lower() or not etag:
                return self._leave(nic_id, "it is gone or moved since it was read", res)
            now = plan.change(live, [])
            if now is None:
                return None  # someone made it so already
            if not now.within(planned):
                return self._leave(
                    nic_id, "it changed since it was read and now needs what the audit record does not list", res
                )
            try:
                ops.begin_create_or_update(
                    rid.group,
                    rid.names[0],
                    NetworkInterface(now.body),
                    headers={"If-Match": str(etag)},
                    error_map={412: ResourceModifiedError},
                ).result()
            except ResourceModifiedError:
                continue  # written by someone else between our read and our write: read it again
            return now
        return self._leave(nic_id, f"it changed between each of {NIC_WRITE_TRIES} reads and the write after it", res)

    def _leave(self, nic_id: str, why: str, res: AzurePerimeterResult) -> _NicChange | None:
        """The NIC left as it is for the next run (nothing written: None), counted and said why."""
        res.skipped.append(nic_id)
        res.warnings.append(f"{nic_id} not written: {why}; left for the next run")
        return None


NIC_WRITE_TRIES = 2  # a NIC changed between our read and our write is read and tried once more
RULE_WRITE_TRIES = 2  # a rule of ours changed between our read and our write is read and tried once more
CREATE_TRIES = 2  # an ASG or NSG found by the 412 of our create but gone when read: created once more


@dataclass(frozen=True)
class _NicPlan:
    """What a run wants of one NIC in the VNet ``net``: our ASGs ``on`` put on and ``off`` taken off
    (by name), and the NSG of its environment in ``ds`` or, ``close``, rf-none; ``asgs`` and
    ``nsgs`` are the run's ids of ours by (resource group, name)."""

    net: str
    on: set[str]
    off: set[str]
    asgs: dict[tuple[str, str], str]
    nsgs: dict[tuple[str, str], str]
    ds: DesiredState
    close: bool

    def change(self, nic: dict[str, Any], warnings: list[str]) -> _NicChange | None:
        """``nic`` (wire format) with our ASGs ``on`` put on and ``off`` taken off each IP
        configuration and, where it must change, its NSG: the body to PUT and what changes (None:
        nothing). Everything else in it is kept as it is."""
        net, asgs, nsgs = self.net, self.asgs, self.nsgs
        body = copy.deepcopy({k: v for k, v in nic.items() if k in ("location", "tags", "properties")})
        props = body.setdefault("properties", {})
        rg = _rg(net)
        drop = {asgs[(rg, n)].lower(): n for n in self.off if (rg, n) in asgs}
        added: set[str] = set()
        removed: set[str] = set()
        for c in props.get("ipConfigurations") or []:
            cp = c.setdefault("properties", {})
            held = cp.get("applicationSecurityGroups") or []
            keep = [a for a in held if a["id"].lower() not in drop]
            removed |= {drop[a["id"].lower()] for a in held if a["id"].lower() in drop}
            have = {a["id"].lower() for a in keep}
            for n in sorted(self.on):
                if asgs[(rg, n)].lower() not in have:
                    keep.append({"id": asgs[(rg, n)]})
                    added.add(n)
            cp["applicationSecurityGroups"] = keep
        names = self.ds.attachments.get(nic["id"], set())
        env = next((self.ds.groups[(net, n)].env for n in sorted(names) if (net, n) in self.ds.groups), None)
        current = (props.get("networkSecurityGroup") or {}).get("id")
        nsg: str | None = None
        if env is not None:
            target = nsgs[(rg, nsg_name(env))]
            ours = {v.lower() for v in nsgs.values()}
            if current is None or (str(current).lower() in ours and str(current).lower() != target.lower()):
                nsg = target
            elif str(current).lower() != target.lower():
                warnings.append(f"{nic['id']} has the NSG {current}: the {nsg_name(env)} rules do not apply to it")
        elif self.close:
            target = nsgs[(rg, NONE_NSG)]
            if str(current or "").lower() != target.lower():
                nsg = target
        if nsg is not None:
            props["networkSecurityGroup"] = {"id": nsg}
        if not (added or removed or nsg):
            return None
        return _NicChange(body, frozenset(added), frozenset(removed), nsg)


@dataclass(frozen=True)
class _NicChange:
    """One NIC's write: the body to PUT and what it changes (our ASGs by name, the NSG id set)."""

    body: dict[str, Any]
    added: frozenset[str]
    removed: frozenset[str]
    nsg: str | None

    def within(self, other: _NicChange) -> bool:
        """Changes nothing ``other`` does not (so a record that lists ``other`` lists it whole)."""
        same_nsg = self.nsg is None or (other.nsg is not None and self.nsg.lower() == other.nsg.lower())
        return self.added <= other.added and self.removed <= other.removed and same_nsg


def _nic_record(name: str, vm: str | None, change: _NicChange) -> dict[str, Any]:
    """A NIC's write as an audit record names it."""
    return (
        {"kind": "nic", "nic": name, "vm": vm, "asgs_added": sorted(change.added)}
        | {"asgs_removed": sorted(change.removed)}
        | ({"nsg": change.nsg.rsplit("/", 1)[-1]} if change.nsg is not None else {})
    )


def _rule_change(kind: str, nsg: tuple[str, str], name: str, props: dict[str, Any]) -> dict[str, Any]:
    """A rule written or deleted as an audit record names it: its NSG, name and what it says (an
    ASG by its name)."""
    out: dict[str, Any] = {"kind": kind, "nsg": nsg[1], "resource_group": nsg[0], "rule": name}
    for f in ("priority", *_RULE_FIELDS):
        v = props.get(f)
        if f.endswith("ApplicationSecurityGroups") and v:
            v = [str(a.get("id", "")).rsplit("/", 1)[-1] for a in v]
        if v not in (None, "", []):
            out[f] = v
    return out


def changes_of(changes: list[dict[str, Any]]) -> dict[str, Any]:
    """A run's writes (:attr:`AzurePerimeterResult.changes`) as an audit record's detail, by kind:
    each list its first :data:`AUDIT_ITEMS`, ``counts`` whole."""
    kinds = {
        "asgs_created": "asg-created",
        "nsgs_created": "nsg-created",
        "rules_written": "rule-written",
        "rules_deleted": "rule-deleted",
        "nics": "nic",
        "asgs_deleted": "asg-deleted",
    }
    out = {
        k: [{f: v for f, v in c.items() if f != "kind"} for c in changes if c["kind"] == kind]
        for k, kind in kinds.items()
    }
    return {k: v[:AUDIT_ITEMS] for k, v in out.items()} | {"counts": {k: len(v) for k, v in out.items()}}


Wanted = dict[str, tuple[str, PerimeterRule | None, dict[str, Any]]]
Want = dict[tuple[str, str], tuple[Wanted, str]]  # (resource group, NSG name) → (rules, a network of it)


def _no_priority(rule: dict[str, Any]) -> dict[str, Any]:
    del rule["properties"]["priority"]
    return rule


def _unnamable(config: PerimeterConfig, labels: dict[str, str]) -> str | None:
    """Why a VM with ``labels`` cannot be given its ASGs and NSG (a name ARM refuses), or None."""
    env = labels.get("env")
    if not env:
        return None
    names = [boundary_name(env), f"{PREFIX}{env}-mgmt", nsg_name(env)]
    names += [
        published_name(env, s.name) for s in config.published if all(labels.get(k) == v for k, v in s.match.items())
    ]
    bad = [n for n in names if not ARM_NAME.match(n)]
    if not bad:
        return None
    return (
        f"env {env[:40]!r} gives {bad[0][:60]!r}, not an ASG/NSG name Azure takes "
        f"(1-80 of letters, digits, _ . -, starting alphanumeric, ending alphanumeric or _)"
    )


def _nsg_place(net: str) -> str:
    """Where a network's NSGs are: its resource group (a network not named by an ARM id: itself)."""
    try:
        return _rg(net)
    except ValueError:
        return net


def _rg(net: str) -> str:
    return ArmId.parse(net).group.lower()


def _asg_prefix(subscription: str, net: str) -> str:
    group = ArmId.parse(net).group
    return (
        f"/subscriptions/{subscription}/resourceGroups/{group}/providers/Microsoft.Network/applicationSecurityGroups/"
    )


def _describe(group: str, r: PerimeterRule) -> str:
    """The rule as the plan states it, kept in the rule's description (read back on the next run)."""
    return "|".join(["ringfence", group, r.direction, r.proto, str(r.from_port), str(r.to_port), r.peer_kind, r.peer])


def members_of(records: Iterable[Any]) -> dict[str, dict[str, str]]:
    """vmId → labels of the active Azure workloads in inventory records."""
    return {r.id: dict(r.labels) for r in records if r.workload.cloud == "azure" and r.active}
