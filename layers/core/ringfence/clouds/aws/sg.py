"""Security groups as the perimeter's AWS backend: read actual state, apply a checked plan."""

from __future__ import annotations

import logging
from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import Any

from ringfence.perimeter import (
    EGRESS,
    INGRESS,
    DesiredState,
    Member,
    PerimeterConfig,
    PerimeterRule,
    Plan,
    QuotaExceeded,
    check_quotas,
    desired_state,
    plan,
)

log = logging.getLogger(__name__)
TAG = "ringfence:perimeter"


def _rules_of(sg: dict[str, Any], names_by_id: dict[str, str]) -> set[PerimeterRule]:
    out: set[PerimeterRule] = set()
    for direction, perms in ((INGRESS, sg.get("IpPermissions", [])), (EGRESS, sg.get("IpPermissionsEgress", []))):
        for p in perms:
            proto = str(p.get("IpProtocol", "-1"))
            lo, hi = int(p.get("FromPort", -1)), int(p.get("ToPort", -1))
            if proto == "-1":
                lo, hi = -1, -1
            for r in p.get("IpRanges", []):
                out.add(PerimeterRule(direction, proto, lo, hi, "cidr", r["CidrIp"]))
            for r in p.get("Ipv6Ranges", []):
                out.add(PerimeterRule(direction, proto, lo, hi, "cidr", r["CidrIpv6"]))
            for r in p.get("UserIdGroupPairs", []):
                out.add(PerimeterRule(direction, proto, lo, hi, "group", names_by_id.get(r["GroupId"], r["GroupId"])))
            for r in p.get("PrefixListIds", []):
                out.add(PerimeterRule(direction, proto, lo, hi, "prefix-list", r["PrefixListId"]))
    return out


def _permission(r: PerimeterRule, ids_by_name: dict[str, str]) -> dict[str, Any]:
    p: dict[str, Any] = {"IpProtocol": r.proto}
    if r.proto != "-1":
        p["FromPort"], p["ToPort"] = r.from_port, r.to_port
    if r.peer_kind == "cidr":
        if ":" in r.peer:
            p["Ipv6Ranges"] = [{"CidrIpv6": r.peer}]
        else:
            p["IpRanges"] = [{"CidrIp": r.peer}]
    elif r.peer_kind == "group":
        p["UserIdGroupPairs"] = [{"GroupId": ids_by_name.get(r.peer, r.peer)}]
    else:
        p["PrefixListIds"] = [{"PrefixListId": r.peer}]
    return p


@dataclass
class PerimeterResult:
    applied: bool
    plan: dict[str, int] = field(default_factory=dict)
    violations: list[str] = field(default_factory=list)


class SecurityGroupPerimeter:
    def __init__(self, ec2: Any) -> None:
        self.ec2 = ec2

    def _groups(self, networks: Iterable[str]) -> list[dict[str, Any]]:
        nets = sorted(set(networks))
        if not nets:
            return []
        pages = self.ec2.get_paginator("describe_security_groups").paginate(
            Filters=[{"Name": "vpc-id", "Values": nets}, {"Name": "tag-key", "Values": [TAG]}]
        )
        return [g for page in pages for g in page.get("SecurityGroups", [])]

    def _interfaces(self, instance_ids: list[str]) -> dict[str, list[dict[str, Any]]]:
        out: dict[str, list[dict[str, Any]]] = {}
        if not instance_ids:
            return out
        for page in self.ec2.get_paginator("describe_instances").paginate(InstanceIds=instance_ids):
            for res in page.get("Reservations", []):
                for inst in res.get("Instances", []):
                    enis = sorted(
                        inst.get("NetworkInterfaces", []), key=lambda e: e.get("Attachment", {}).get("DeviceIndex", 0)
                    )
                    out[inst["InstanceId"]] = enis[:1]  # the primary interface carries the perimeter
        return out

    def reconcile(self, config: PerimeterConfig, members: list[Member], dry_run: bool = False) -> PerimeterResult:
        ds: DesiredState = desired_state(config, members)
        groups = self._groups(ds.networks.values())
        key_of = {g["GroupId"]: (g["VpcId"], g["GroupName"]) for g in groups}
        names_by_id = {gid: key[1] for gid, key in key_of.items()}
        actual_rules = {key_of[g["GroupId"]]: _rules_of(g, names_by_id) for g in groups}
        enis = self._interfaces(sorted(ds.attachments))
        ours = set(names_by_id)
        actual_att: dict[str, set[str]] = {}
        foreign: dict[str, int] = {}
        eni_groups: dict[str, tuple[str, list[str]]] = {}
        for iid, lst in enis.items():
            if not lst:
                continue
            eni = lst[0]
            gids = [g["GroupId"] for g in eni.get("Groups", [])]
            eni_groups[iid] = (eni["NetworkInterfaceId"], gids)
            actual_att[iid] = {names_by_id[g] for g in gids if g in ours}
            foreign[iid] = len([g for g in gids if g not in ours])
        violations = check_quotas(ds, config, foreign)
        if violations:
            for v in violations:
                log.error("perimeter quota: %s", v)
            raise QuotaExceeded(violations)
        p = plan(ds, actual_rules, actual_att)
        if dry_run or p.empty:
            return PerimeterResult(applied=False, plan=p.summary())
        self._apply(p, ds, key_of, eni_groups)
        return PerimeterResult(applied=True, plan=p.summary())

    def _apply(
        self,
        p: Plan,
        ds: DesiredState,
        key_of: dict[str, tuple[str, str]],
        eni_groups: dict[str, tuple[str, list[str]]],
    ) -> None:
        ids: dict[tuple[str, str], str] = {key: gid for gid, key in key_of.items()}
        for g in p.create:
            gid = self.ec2.create_security_group(
                GroupName=g.name,
                Description=g.description,
                VpcId=g.network,
                TagSpecifications=[
                    {
                        "ResourceType": "security-group",
                        "Tags": [{"Key": TAG, "Value": g.env}, {"Key": "Name", "Value": g.name}],
                    }
                ],
            )["GroupId"]
            ids[(g.network, g.name)] = gid
            # a new group starts with "all outbound": that rule is now actual state for the diff
            default = {PerimeterRule(EGRESS, "-1", -1, -1, "cidr", "0.0.0.0/0")}
            want = ds.groups[(g.network, g.name)].rules
            p.authorize[(g.network, g.name)] = want - default
            if default - want:
                p.revoke.setdefault((g.network, g.name), set()).update(default - want)
        for key, rules in p.revoke.items():
            names = {n: gid for (net, n), gid in ids.items() if net == key[0]}
            self._change(ids[key], rules, names, revoke=True)
        for key, rules in p.authorize.items():
            names = {n: gid for (net, n), gid in ids.items() if net == key[0]}
            self._change(ids[key], rules, names, revoke=False)
        for point, add in p.attach.items():
            eni, gids = eni_groups[point]
            net = ds.networks[point]
            new = list(dict.fromkeys(gids + [ids[(net, n)] for n in sorted(add)]))
            self.ec2.modify_network_interface_attribute(NetworkInterfaceId=eni, Groups=new)

    def _change(self, gid: str, rules: set[PerimeterRule], names: dict[str, str], revoke: bool) -> None:
        for direction in (INGRESS, EGRESS):
            perms = [_permission(r, names) for r in sorted(rules) if r.direction == direction]
            if not perms:
                continue
            verb = "revoke" if revoke else "authorize"
            fn = getattr(self.ec2, f"{verb}_security_group_{direction}")
            fn(GroupId=gid, IpPermissions=perms)
