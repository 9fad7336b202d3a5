"""Security groups as the perimeter's AWS backend: read actual state, apply a checked plan.

Every network interface of a workload carries its groups (not only the primary one). A group is
ours only if Ringfence recorded its id when it created it (:class:`GroupRecords`, in the state
table, which only the perimeter's role writes): the ``ringfence:perimeter``
tag and one of the names Ringfence gives (``rf-<env>-boundary|mgmt``,
``rf-<env>-published.<service>`` — one per published service, so a workload gets only the ports of
the services it matches; ``rf-<env>-published``, the older shared one; and ``rf-empty``: no rule at
all, what replaces ours on an interface that needs none of them and has no other group, as EC2 needs
one) are only what such a group looks like, which anyone allowed to create a tagged group can copy.
A look-alike (tag and name, no record) is never attached: it holds its name, so the interfaces that
need that group are left as they are and named (their launches not handed on). Groups made before
records existed are adopted once, by the scheduled full run only, if they are exactly what
Ringfence would have made — the same tags, description and rules — or are the older shared
``rf-<env>-published`` (never attached any more: adopted only to be detached and deleted). Anything
else is foreign and never changed, detached or deleted. Interfaces are modified with their whole group list
(that is how EC2 takes it), read again just before each write, so foreign groups are always written
back as they are then, in their order.

What breaks a limit is skipped, not the whole plan: an interface over the groups-per-interface
quota, one whose workload's env cannot name a group, or one that needs a group that cannot be made
(its rules over quota, its name held by a group that is not ours) is left exactly as it is, with a
violation naming it; everything else — revokes of drift on our groups first of all — is applied."""

from __future__ import annotations

import logging
import re
import secrets
import time
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any

from botocore.exceptions import ClientError

from ringfence.control.fanout import in_parallel
from ringfence.perimeter import (
    EGRESS,
    INGRESS,
    DesiredState,
    Interface,
    Member,
    PerimeterConfig,
    PerimeterRule,
    Plan,
    Scope,
    desired_state,
    group_quota_violations,
    interface_quota_violations,
    plan,
)

from . import ec2 as ec2mod

log = logging.getLogger("ringfence.aws.perimeter")
TAG = "ringfence:perimeter"
ENV_CHARS = "A-Za-z0-9_.:+=@-"
SERVICE_CHARS = "A-Za-z0-9_"  # no "-" or ".": rf-<env>-published.<service> is no other env's name
OUR_NAME = re.compile(
    rf"^rf-(?:[{ENV_CHARS}]+-(?:boundary|mgmt|published)|[{ENV_CHARS}]+-published\.[{SERVICE_CHARS}]+|empty)$"
)
SERVICE_OK = re.compile(rf"^[{SERVICE_CHARS}]+$")
# the older shared published group: never attached any more, only detached and deleted
LEGACY_PUBLISHED = re.compile(rf"^rf-[{ENV_CHARS}]+-published$")
MAX_NAME = 255  # EC2's limit on a group name
EMPTY = "rf-empty"  # no rule in either direction: the closed stand-in for "none of ours"
# an env must give names OUR_NAME recognises, within EC2's 255 characters ("rf-" + env + "-published")
ENV_OK = re.compile(rf"^[{ENV_CHARS}]{{1,242}}$")
GONE_STATES = frozenset({"shutting-down", "terminated"})
PENDING = "pending#"  # GroupRecords: an intent to create, not a group id
# an intent older than this with no group carrying its nonce is from a create that failed or was
# stopped before EC2 made it (a Lambda runs 15 minutes at most)
PENDING_STALE_S = 3600
# (how: "taken-back" or "adopted", group id, VPC, name): told before a group Ringfence has no record
# of becomes its own, so that the change is audited first; raising stops the run before the record
Owned = Callable[[str, str, str, str], None]
# told what a run is about to change (:func:`changes_of`) before it changes anything, so that the
# changes are audited first; raising stops the run with nothing changed
Applying = Callable[[dict[str, Any]], None]
# what one audit record lists of each kind of change (the counts are always whole): a full run of
# a large estate, or a scale-out's batch, stays one record of a few tens of KiB
AUDIT_ITEMS = 100
AUDIT_INSTANCES = 20  # instance ids per group attached or detached
DEFAULT_EGRESS = PerimeterRule(EGRESS, "-1", -1, -1, "cidr", "0.0.0.0/0")  # what EC2 gives a new group


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


def looks_ours(group: Mapping[str, Any]) -> bool:
    """Our tag and one of our names: what Ringfence's groups look like, not proof it made them
    (anyone who may create a tagged group can copy both; :class:`GroupRecords` is the proof)."""
    tagged = any(t.get("Key") == TAG for t in group.get("Tags", []))
    return tagged and bool(OUR_NAME.match(str(group.get("GroupName", ""))))


class GroupRecords:
    """The ids of the security groups Ringfence created in one account and Region: state-table
    items ``pk = sg#<account>#<region>``, ``sk`` the group id, written right after each
    ``CreateSecurityGroup`` (and dropped after its delete). In both deployments only the perimeter
    function's role may write ``sg#*`` keys (tests/aws/test_function_iam.py,
    tests/aws/test_sg_record_writers.py), so a group someone else made with our tag and name is
    never taken for ours.

    Before each create an intent is written (``sk = pending#<epoch>#<nonce>``, how ``pending``) and
    its random nonce goes on the group, in the ``ringfence:perimeter`` tag's value: a run stopped
    between the create and the record (a Lambda timeout runs no ``except``) leaves a group the next
    run recognises as its own by that nonce, instead of a look-alike holding the name for good
    (audited and counted as taken back: :class:`ringfence.clouds.aws.perimeter.Perimeter`)."""

    def __init__(self, table: Any, account: str, region: str) -> None:
        self.table = table
        self.pk = f"sg#{account}#{region}"

    def read(self) -> tuple[set[str], dict[str, tuple[str, str, str, float]]]:
        """The recorded group ids, and the intents not cleared: nonce → (intent key, network,
        name, when written)."""
        ids: set[str] = set()
        intents: dict[str, tuple[str, str, str, float]] = {}
        kwargs: dict[str, Any] = {
            "KeyConditionExpression": "pk = :pk",
            "ExpressionAttributeValues": {":pk": self.pk},
            "ConsistentRead": True,
        }
        while True:
            page = self.table.query(**kwargs)
            for i in page.get("Items", []):
                sk = str(i["sk"])
                if sk.startswith(PENDING):
                    at, _, nonce = sk[len(PENDING) :].partition("#")
                    intents[nonce] = (sk, str(i.get("network", "")), str(i.get("name", "")), float(at or 0))
                else:
                    ids.add(sk)
            if "LastEvaluatedKey" not in page:
                return ids, intents
            kwargs["ExclusiveStartKey"] = page["LastEvaluatedKey"]

    def ids(self) -> set[str]:
        return self.read()[0]

    def add(self, gid: str, network: str, name: str, how: str) -> None:
        self.table.put_item(Item={"pk": self.pk, "sk": gid, "network": network, "name": name, "how": how})

    def drop(self, gid: str) -> None:
        self.table.delete_item(Key={"pk": self.pk, "sk": gid})

    def intend(self, network: str, name: str) -> tuple[str, str]:
        """Record that ``name`` is about to be created in ``network``: (the intent's key, the
        random nonce to put on the group). The time is in the key: the item may hold only the
        attributes a record has (the perimeter role's dynamodb:Attributes condition)."""
        nonce = secrets.token_hex(16)
        sk = f"{PENDING}{int(time.time())}#{nonce}"
        self.table.put_item(Item={"pk": self.pk, "sk": sk, "network": network, "name": name, "how": "pending"})
        return sk, nonce

    def clear(self, intent: str) -> None:
        self.table.delete_item(Key={"pk": self.pk, "sk": intent})


def nonce_of(group: Mapping[str, Any]) -> str | None:
    """The intent nonce a group carries in its ``ringfence:perimeter`` value (``<env>/<nonce>``);
    None for groups made before intents were recorded (value ``<env>`` alone: no "/" in an env)."""
    for t in group.get("Tags", []):
        if t.get("Key") == TAG and "/" in str(t.get("Value", "")):
            return str(t["Value"]).rpartition("/")[2] or None
    return None


@dataclass
class PerimeterResult:
    applied: bool
    plan: dict[str, int] = field(default_factory=dict)
    violations: list[str] = field(default_factory=list)
    changes: list[dict[str, Any]] = field(default_factory=list)  # what was (or, dry run, would be) done
    kept: list[dict[str, str]] = field(default_factory=list)  # groups without purpose kept, and why
    refused: list[str] = field(default_factory=list)  # workloads with an interface left as it was (violations)
    lookalikes: list[str] = field(default_factory=list)  # groups with our tag and name, no record: refused
    adopted: list[str] = field(default_factory=list)  # groups made before records, exactly ours: recorded now
    taken_back: list[str] = field(default_factory=list)  # made by a run stopped before its record: recorded now


@dataclass
class _Eni:
    id: str
    network: str
    instance: str | None
    groups: list[str]  # ids, in the interface's order
    fixed: bool


class SecurityGroupPerimeter:
    def __init__(
        self, ec2: Any, records: GroupRecords, owned: Owned | None = None, applying: Applying | None = None
    ) -> None:
        self.ec2 = ec2
        self.records = records
        self.owned = owned
        self.applying = applying

    # --- reading -----------------------------------------------------------------------------

    def _groups(
        self, networks: Iterable[str] | None, recorded: set[str]
    ) -> tuple[list[dict[str, Any]], list[dict[str, Any]]]:
        """Our groups in ``networks`` (None: in the whole region), and the look-alikes there (our
        tag and name, but not ``recorded`` as made by Ringfence)."""
        filters = [{"Name": "tag-key", "Values": [TAG]}]
        if networks is not None:
            nets = sorted(set(networks))
            if not nets:
                return [], []
            filters.append({"Name": "vpc-id", "Values": nets})
        pages = self.ec2.get_paginator("describe_security_groups").paginate(Filters=filters)
        ours, lookalikes = [], []
        for page in pages:
            for g in page.get("SecurityGroups", []):
                if not looks_ours(g):
                    log.warning(
                        "%s (%s) carries %s but not a Ringfence name: left alone", g["GroupId"], g.get("GroupName"), TAG
                    )
                elif g["GroupId"] in recorded:
                    ours.append(g)
                else:
                    lookalikes.append(g)
        return ours, lookalikes

    def _reclaim(
        self,
        lookalikes: list[dict[str, Any]],
        intents: dict[str, tuple[str, str, str, float]],
        scope: Scope,
        dry_run: bool,
    ) -> list[dict[str, Any]]:
        """Of the look-alikes, those an earlier run made and was stopped before recording: they
        carry the nonce of an intent still there, for their VPC and name, and are as EC2 made them
        (our two tags, the default "all outbound" and nothing else). Recorded now (not in a dry
        run), their intents cleared. Under :attr:`Scope.FULL` (every group of the Region read),
        intents older than :data:`PENDING_STALE_S` that no group carries are dropped."""
        out: list[dict[str, Any]] = []
        default = {PerimeterRule(EGRESS, "-1", -1, -1, "cidr", "0.0.0.0/0")}
        carried: set[str] = set()
        for la in lookalikes:
            nonce = nonce_of(la)
            if nonce is None or nonce not in intents:
                continue
            carried.add(nonce)
            intent, network, name, _at = intents[nonce]
            tags = {t.get("Key"): t.get("Value") for t in la.get("Tags", [])}
            gid = str(la["GroupId"])
            if (network, name) != (la.get("VpcId"), la.get("GroupName")) or set(tags) != {TAG, "Name"}:
                continue
            if tags["Name"] != name or _rules_of(la, {}) != default:
                log.warning(
                    "perimeter: %s (%s) in %s was made by a run stopped before recording it, but has been "
                    "changed since: not taken back, refused as a look-alike",
                    gid,
                    name,
                    network,
                )
                continue
            if not dry_run:
                if self.owned is not None:
                    self.owned("taken-back", gid, network, name)
                self.records.add(gid, network, name, "created")
                self.records.clear(intent)
            log.warning(
                "perimeter: %s (%s) in %s: made by a run stopped before recording it (its intent's nonce): "
                "recorded now",
                gid,
                name,
                network,
            )
            out.append(la)
        if scope is Scope.FULL and not dry_run:
            for nonce, (intent, _net, _name, at) in intents.items():
                if nonce not in carried and time.time() - at > PENDING_STALE_S:
                    self.records.clear(intent)
        return out

    @staticmethod
    def _adoptable(
        lookalikes: list[dict[str, Any]], ds: DesiredState, key_of: dict[str, tuple[str, str]]
    ) -> list[dict[str, Any]]:
        """Of the look-alikes, those a Ringfence without records made: exactly what it would make
        now (our tags and nothing else, the desired rules — references resolved through ours and
        the others adopted — or none for the rule-less stand-in), or the older shared published
        group (adopted only to be detached and deleted: no plan attaches that name)."""
        cand = {str(g["GroupId"]): g for g in lookalikes}
        while True:
            names = {gid: k[1] for gid, k in key_of.items()} | {gid: str(g["GroupName"]) for gid, g in cand.items()}
            keep = {}
            for gid, g in cand.items():
                name = str(g["GroupName"])
                if LEGACY_PUBLISHED.match(name):
                    keep[gid] = g
                    continue
                spec = ds.groups.get((g["VpcId"], name))
                want = spec.rules if spec is not None else (set() if name == EMPTY else None)
                env = spec.env if spec is not None else ""
                tags = {t.get("Key"): t.get("Value") for t in g.get("Tags", [])}
                # the value is "<env>", or "<env>/<nonce>" since intents (a record lost with its intent)
                tags[TAG] = str(tags.get(TAG, "")).partition("/")[0]
                made = tags in ({TAG: env or "-", "Name": name}, {TAG: env or "-"})
                if want is not None and made and _rules_of(g, names) == want:
                    keep[gid] = g
            if keep.keys() == cand.keys():
                return list(keep.values())
            cand = keep

    @staticmethod
    def _eni(e: dict[str, Any], instance: str | None) -> _Eni:
        return _Eni(
            id=e["NetworkInterfaceId"],
            network=e.get("VpcId", ""),
            instance=instance or e.get("Attachment", {}).get("InstanceId"),
            groups=[g["GroupId"] for g in e.get("Groups", [])],
            fixed=bool(e.get("RequesterManaged")),
        )

    def _instance_enis(self, instance_ids: list[str]) -> dict[str, list[_Eni]]:
        """Every interface of each live instance (terminated ones have none left to guard)."""
        out: dict[str, list[_Eni]] = {}
        for iid, inst in ec2mod.describe(self.ec2, instance_ids).items():
            if inst.get("State", {}).get("Name") in GONE_STATES:
                continue
            enis = sorted(
                inst.get("NetworkInterfaces", []), key=lambda e: e.get("Attachment", {}).get("DeviceIndex", 0)
            )
            out[iid] = [self._eni(e, iid) for e in enis]
        return out

    def _carriers(self, group_ids: list[str]) -> list[_Eni]:
        """Every interface in the region that carries one of ``group_ids``. One query per group:
        our groups are a handful per VPC, and moto 5.2 answers a multi-valued ``group-id`` filter
        with subset/superset matches instead of EC2's "any of"."""
        seen: dict[str, _Eni] = {}
        for gid in group_ids:
            pages = self.ec2.get_paginator("describe_network_interfaces").paginate(
                Filters=[{"Name": "group-id", "Values": [gid]}]
            )
            for page in pages:
                for e in page.get("NetworkInterfaces", []):
                    seen.setdefault(e["NetworkInterfaceId"], self._eni(e, None))
        return list(seen.values())

    def _names_taken(self, want: set[tuple[str, str]], ours: set[str]) -> dict[tuple[str, str], str]:
        """Of the (network, name) groups to create, those whose name a group that is not ours
        (``ours``: the ids Ringfence recorded) already holds in that VPC (names are unique per
        VPC), with why: never taken over — a look-alike of ours least of all."""
        if not want:
            return {}
        pages = self.ec2.get_paginator("describe_security_groups").paginate(
            Filters=[
                {"Name": "vpc-id", "Values": sorted({n for n, _ in want})},
                {"Name": "group-name", "Values": sorted({g for _, g in want})},
            ]
        )
        return {
            (g["VpcId"], g["GroupName"]): (
                f"{g['GroupName']} in {g['VpcId']}: {g['GroupId']} carries {TAG} and a Ringfence name, but "
                f"Ringfence has no record of creating it: refused, never attached (a look-alike; delete it, "
                f"or see docs/deploy-aws.md for groups made before records)"
                if looks_ours(g)
                else f"{g['GroupName']} in {g['VpcId']}: the name is held by {g['GroupId']}, "
                f"which Ringfence did not create (rename it, or delete it if it is unused)"
            )
            for page in pages
            for g in page.get("SecurityGroups", [])
            if (g.get("VpcId"), g.get("GroupName")) in want and g["GroupId"] not in ours
        }

    # --- reconcile -----------------------------------------------------------------------------

    def reconcile(
        self,
        config: PerimeterConfig,
        workloads: Mapping[str, Mapping[str, str]],
        scope: Scope = Scope.FULL,
        dry_run: bool = False,
        gone: Iterable[str] = (),
    ) -> PerimeterResult:
        """Bring the interfaces of ``workloads`` (instance id → labels; every live workload of the
        account/region under :attr:`Scope.FULL`) and our groups to the desired state. ``gone``:
        workloads the inventory knows have terminated; an interface still attached to one needs
        none of our groups. What would break a limit (a quota, a name taken by a group that is not
        ours, an env no group can be named after) is left as it is and listed in ``violations``
        (its workloads in ``refused``); the rest is applied."""
        ended = set(gone) - set(workloads)
        by_instance = self._instance_enis(sorted(workloads))
        enis: dict[str, _Eni] = {e.id: e for lst in by_instance.values() for e in lst}
        violations: list[str] = []
        held: dict[str, str] = {}  # interface → why it is left exactly as it is this run

        def hold(iid: str, why: str) -> None:
            held.setdefault(iid, why)

        def violation(why: str) -> None:
            if why not in violations:
                log.warning("perimeter: skipped: %s", why)
                violations.append(why)

        for iid, labels in sorted(workloads.items()):
            env = labels.get("env")
            if env and not ENV_OK.match(env):
                why = (
                    f"{iid}: env {env!r} cannot name a security group (only letters, digits and {ENV_CHARS[9:]}, "
                    f"at most 242 characters): its interfaces are left as they are"
                )
                violation(why)
                for e in by_instance.get(iid, []):
                    hold(e.id, why)
        bad_services = [svc.name for svc in config.published if not SERVICE_OK.match(svc.name)]
        for name in bad_services:
            violation(
                f"published service {name!r} cannot name a security group (only letters, digits and _): "
                f"no workload gets its ports"
            )
        if bad_services:
            config = config.model_copy(
                update={"published": [s for s in config.published if s.name not in bad_services]}
            )
        members = [
            Member(e.id, e.network, workloads[iid])
            for iid, lst in sorted(by_instance.items())
            for e in lst
            if e.id not in held
        ]
        recorded, intents = self.records.read()
        groups, lookalikes = self._groups(None if scope is Scope.FULL else {e.network for e in enis.values()}, recorded)
        # groups of an earlier run stopped between its create and its record: ours by their nonce
        reclaimed = self._reclaim(lookalikes, intents, scope, dry_run)
        taken_back = [f"{g['GroupId']} ({g['GroupName']}) in {g['VpcId']}" for g in reclaimed]
        groups += reclaimed
        lookalikes = [la for la in lookalikes if la not in reclaimed]
        key_of = {g["GroupId"]: (g["VpcId"], g["GroupName"]) for g in groups}
        names_by_id = {gid: key[1] for gid, key in key_of.items()}
        actual_rules = {key_of[g["GroupId"]]: _rules_of(g, names_by_id) for g in groups}
        # the event path may reference existing groups it does not itself need; the full run
        # references only wanted ones, so a group without members loses its references too
        ds: DesiredState = desired_state(
            config, members, existing=actual_rules if scope is Scope.WORKLOADS else (), per_service=True
        )
        adopted: list[str] = []
        if scope is Scope.FULL and lookalikes:
            # made before Ringfence recorded its groups: adopted once, here only (where the whole
            # desired state is known), if exactly what it would make; recorded, so never asked again
            for sg in self._adoptable(lookalikes, ds, key_of):
                gid, key = str(sg["GroupId"]), (str(sg["VpcId"]), str(sg["GroupName"]))
                if not dry_run:
                    if self.owned is not None:
                        self.owned("adopted", gid, key[0], key[1])
                    self.records.add(gid, key[0], key[1], "adopted")
                log.warning(
                    "perimeter: adopted %s (%s) in %s: made before Ringfence recorded its groups, as it makes them",
                    gid,
                    *key[::-1],
                )
                adopted.append(f"{gid} ({key[1]}) in {key[0]}")
                groups.append(sg)
                key_of[gid] = key
            lookalikes = [la for la in lookalikes if la["GroupId"] not in key_of]
            names_by_id = {gid: key[1] for gid, key in key_of.items()}
            actual_rules = {key_of[o["GroupId"]]: _rules_of(o, names_by_id) for o in groups}
        for la in lookalikes:
            log.warning(
                "perimeter: %s (%s) in %s carries %s and a Ringfence name but Ringfence has no record of creating "
                "it: never attached, its name refused",
                la["GroupId"],
                la["GroupName"],
                la["VpcId"],
                TAG,
            )
        if scope is Scope.FULL and key_of:
            for e in self._carriers(sorted(key_of)):
                if e.id not in enis:  # not an interface of a live workload
                    enis[e.id] = e

        def judged(e: _Eni) -> bool:
            return bool(e.instance in by_instance or e.instance in ended) and not e.fixed and e.id not in held

        foreign = {e.id: len([g for g in e.groups if g not in key_of]) for e in enis.values()}
        # limits: an interface over the groups-per-interface quota is left as it is
        for iid, why in interface_quota_violations(ds, config, foreign).items():
            violation(why)
            hold(iid, why)
        # held for this quota only: it still sheds the groups of ours it must not carry (the older
        # shared rf-<env>-published, every service's ports from the internet, was kept for good)
        quota_held = {
            iid: config.quotas.groups_per_interface - foreign[iid]
            for iid, why in held.items()
            if iid in enis and why == interface_quota_violations(ds, config, foreign).get(iid)
        }
        # groups that cannot be made: rules over quota, or a name held by a group that is not ours;
        # the rule-less stand-in where an interface needs none of ours and has no other group
        over = group_quota_violations(ds, config)
        for why in (w for ws in over.values() for w in ws):
            violation(why)
        missing = {key for key in ds.groups if key not in actual_rules}
        for net, name in sorted(key for key in missing if len(key[1]) > MAX_NAME):
            over.setdefault((net, name), []).append(f"{name[:40]}… in {net}: name longer than {MAX_NAME} characters")
            violation(over[(net, name)][-1])
        stand_in = {
            (e.network, EMPTY)
            for e in enis.values()
            if judged(e) and not ds.attachments.get(e.id) and not foreign[e.id] and e.groups
        } - set(actual_rules)
        taken = self._names_taken(missing | stand_in, set(key_of))
        for why in taken.values():
            violation(why)
        unmakeable = (missing & set(over)) | set(taken)
        for iid, names in sorted(ds.attachments.items()):
            need = sorted(n for n in names if (ds.networks[iid], n) in unmakeable)
            if need and iid not in held:
                hold(iid, f"{iid}: needs {', '.join(need)}, which cannot be created (see above)")
        for e in enis.values():
            if (e.network, EMPTY) in taken and judged(e) and not ds.attachments.get(e.id) and not foreign[e.id]:
                hold(e.id, taken[(e.network, EMPTY)])
        # a group not there yet is made only for an interface that gets it
        used = {(ds.networks[i], n) for i, names in ds.attachments.items() if i not in held for n in names}
        dropped = {key for key in missing if key in unmakeable or key not in used}
        for key in dropped:
            del ds.groups[key]
        for (net, _name), g in ds.groups.items():  # no reference to a group that will not be there
            g.rules = {r for r in g.rules if not (r.peer_kind == "group" and (net, r.peer) in dropped)}
        for iid in held:
            if iid in enis and iid in ds.attachments:
                how = "sheds what it must not carry, gets no more groups" if iid in quota_held else "left as it is"
                log.warning("perimeter: %s %s: %s", iid, how, held[iid])
        interfaces = {
            e.id: Interface(
                id=e.id,
                network=e.network,
                workload=e.instance if e.instance in by_instance or e.instance in ended else None,
                ours=frozenset(names_by_id[g] for g in e.groups if g in key_of),
                foreign=foreign[e.id],
                fixed=e.fixed,
                held=held.get(e.id),
                room=quota_held.get(e.id),
            )
            for e in enis.values()
        }
        p = plan(ds, actual_rules, interfaces, scope, placeholder=EMPTY)
        for sg in reclaimed:  # as if made by this run: the default "all outbound" goes on any path
            key = key_of[sg["GroupId"]]
            if key in ds.groups and actual_rules[key] - ds.groups[key].rules:
                p.revoke.setdefault(key, set()).update(actual_rules[key] - ds.groups[key].rules)
        for key in over:  # an existing group over quota: its revokes apply, not its additions
            p.authorize.pop(key, None)
        refused = sorted({str(e.instance) for e in enis.values() if e.id in held and e.instance in workloads})
        summary = p.summary()  # what the plan asks; ``changes`` says what was done

        def kept() -> list[dict[str, str]]:
            return [{"group": _id_of(key_of, k), "name": k[1], "network": k[0], "reason": r} for k, r in p.kept.items()]

        if dry_run or p.empty:
            return PerimeterResult(
                applied=False,
                plan=summary,
                violations=violations,
                changes=self._describe(p, key_of, enis, {}),
                kept=kept(),
                refused=refused,
                lookalikes=[f"{la['GroupId']} ({la['GroupName']}) in {la['VpcId']}" for la in lookalikes],
                adopted=adopted,
                taken_back=taken_back,
            )
        _as_created(p)
        if self.applying is not None:  # audited before the first change: a failure changes nothing
            self.applying(changes_of(p, key_of, enis))
        created = self._apply(p, key_of, enis)
        return PerimeterResult(
            applied=True,
            plan=summary,
            violations=violations,
            changes=self._describe(p, key_of, enis, created),
            kept=kept(),
            refused=refused,
            lookalikes=[f"{la['GroupId']} ({la['GroupName']}) in {la['VpcId']}" for la in lookalikes],
            adopted=adopted,
            taken_back=taken_back,
        )

    def _apply(self, p: Plan, key_of: dict[str, tuple[str, str]], enis: dict[str, _Eni]) -> dict[tuple[str, str], str]:
        ids: dict[tuple[str, str], str] = {key: gid for gid, key in key_of.items()}
        created: dict[tuple[str, str], str] = {}
        for g in p.create:
            # the intent first: if this run is stopped between the create and the record, the next
            # one knows the group by the nonce it carries (the label guard lets the perimeter write
            # only ringfence:perimeter and Name at creation, so the nonce is in the former's value)
            intent, nonce = self.records.intend(g.network, g.name)
            # a failed create keeps its intent: EC2 may have made the group all the same (an answer
            # lost); an intent no group carries is dropped by a full run an hour later
            gid = self.ec2.create_security_group(
                GroupName=g.name,
                Description=g.description,
                VpcId=g.network,
                TagSpecifications=[
                    {
                        "ResourceType": "security-group",
                        "Tags": [
                            {"Key": TAG, "Value": f"{g.env or '-'}/{nonce}"},
                            {"Key": "Name", "Value": g.name},
                        ],
                    }
                ],
            )["GroupId"]
            try:
                # the record is what makes it ours: without one it would be refused as a look-alike
                self.records.add(gid, g.network, g.name, "created")
            except Exception:
                self.ec2.delete_security_group(GroupId=gid)  # not ours without it: none left behind
                self.records.clear(intent)
                raise
            self.records.clear(intent)
            ids[(g.network, g.name)] = created[(g.network, g.name)] = gid
        for key, rules in p.revoke.items():
            names = {n: gid for (net, n), gid in ids.items() if net == key[0]}
            self._change(ids[key], rules, names, revoke=True)
        for key, rules in p.authorize.items():
            names = {n: gid for (net, n), gid in ids.items() if net == key[0]}
            self._change(ids[key], rules, names, revoke=False)

        # interfaces: one call each, foreign groups written back unchanged and in their order;
        # several at once (each writes another interface's list, so their order does not matter,
        # and a scale-out's batch was one EC2 round trip per ENI after another)
        def modify(iid: str) -> None:
            e = enis[iid]
            drop = {ids[(e.network, n)] for n in p.detach.get(iid, set())}
            add = [ids[(e.network, n)] for n in sorted(p.attach.get(iid, set()))]
            try:
                # the list as it is now, not as it was read at the start: a group someone else
                # removed (or added) meanwhile stays removed (or added); only ours change
                cur = self.ec2.describe_network_interfaces(NetworkInterfaceIds=[iid])["NetworkInterfaces"]
                now = [g["GroupId"] for g in cur[0].get("Groups", [])] if cur else []
                new = list(dict.fromkeys([g for g in now if g not in drop] + add))
                if not cur or new == now:
                    return
                if not new:  # its other groups went meanwhile: EC2 needs one, the next run decides
                    log.warning("%s: left as it is, it would have no security group left", iid)
                    return
                self.ec2.modify_network_interface_attribute(NetworkInterfaceId=iid, Groups=new)
            except ClientError as exc:
                # gone with its terminated instance: nothing left to guard (a delete re-checks)
                if exc.response.get("Error", {}).get("Code") != "InvalidNetworkInterfaceID.NotFound":
                    raise
                log.info("%s vanished before its groups changed", iid)

        # a few at once: EC2 throttles each API per account (the clients retry it)
        in_parallel(modify, sorted(set(p.attach) | set(p.detach)))
        # groups without purpose, now on no interface: re-checked live just before each delete
        pending: list[tuple[str, str]] = []
        for key in p.delete:
            still = self._carriers([ids[key]])
            if still:
                self._keep(p, ids[key], key, "still attached: " + ", ".join(sorted(e.id for e in still)))
            else:
                pending.append(key)
        # one unused group may still reference another (a boundary reachable from another env):
        # what DependencyViolation refuses is retried while the others' deletes make progress
        while pending:
            refused: dict[tuple[str, str], str] = {}
            for key in pending:
                try:
                    self.ec2.delete_security_group(GroupId=ids[key])
                except ClientError as exc:
                    code = exc.response.get("Error", {}).get("Code", "error")
                    if code == "InvalidGroup.NotFound":
                        self.records.drop(ids[key])
                        continue  # already gone
                    if code != "DependencyViolation":
                        raise
                    refused[key] = f"{code}: {exc}"  # e.g. a group that is not ours references it
                    continue
                self.records.drop(ids[key])
            if len(refused) == len(pending):
                for key, why in refused.items():
                    self._keep(p, ids[key], key, why)
                break
            pending = list(refused)
        p.delete = [k for k in p.delete if k not in p.kept]
        return created

    @staticmethod
    def _keep(p: Plan, gid: str, key: tuple[str, str], why: str) -> None:
        p.kept[key] = why
        log.warning("not deleting %s (%s): %s", gid, key[1], why)

    def _change(self, gid: str, rules: set[PerimeterRule], names: dict[str, str], revoke: bool) -> None:
        for direction in (INGRESS, EGRESS):
            perms = [_permission(r, names) for r in sorted(rules) if r.direction == direction]
            if not perms:
                continue
            verb = "revoke" if revoke else "authorize"
            fn = getattr(self.ec2, f"{verb}_security_group_{direction}")
            fn(GroupId=gid, IpPermissions=perms)

    # --- reporting ---------------------------------------------------------------------------

    @staticmethod
    def _describe(
        p: Plan, key_of: dict[str, tuple[str, str]], enis: dict[str, _Eni], created: dict[tuple[str, str], str]
    ) -> list[dict[str, Any]]:
        """What the plan did, one entry per group created/deleted and per workload and group set
        attached/detached (its interfaces listed), each with a one-line ``text``."""
        ids = {key: gid for gid, key in key_of.items()} | created
        out: list[dict[str, Any]] = []
        for g in p.create:
            gid = ids.get((g.network, g.name), "(new)")
            out.append(
                {"action": "create", "group": gid, "name": g.name, "network": g.network,
                 "text": f"perimeter: created {gid} ({g.name}) in {g.network}"}
            )  # fmt: skip
        for action, changes in (("attach", p.attach), ("detach", p.detach)):
            per: dict[tuple[str, tuple[str, ...]], list[str]] = {}
            for iid, names in sorted(changes.items()):
                e = enis[iid]
                gids = tuple(f"{ids.get((e.network, n), '(new)')} ({n})" for n in sorted(names))
                per.setdefault((e.instance or iid, gids), []).append(iid)
            for (owner, gids), itfs in sorted(per.items()):
                verb = "attached to" if action == "attach" else "detached from"
                n = f"{len(itfs)} ENI" + ("s" if len(itfs) != 1 else "")
                out.append(
                    {"action": action, "workload": owner, "interfaces": itfs, "groups": [g.split(" ")[0] for g in gids],
                     "text": f"perimeter: {', '.join(gids)} {verb} {owner} ({n})"}
                )  # fmt: skip
        for net, name in p.delete:
            gid = ids.get((net, name), "?")
            out.append(
                {"action": "delete", "group": gid, "name": name, "network": net,
                 "text": f"perimeter: deleted {gid} ({name}) in {net}: no workload needs it"}
            )  # fmt: skip
        return out


def _as_created(p: Plan) -> None:
    """A group to create starts with EC2's "all outbound": its rules become what it lacks of its
    wanted rules, and that default revoked if not wanted (before the audit, so that the record
    lists the rules the run writes)."""
    for g in p.create:
        key = (g.network, g.name)
        p.authorize[key] = g.rules - {DEFAULT_EGRESS}
        if DEFAULT_EGRESS not in g.rules:
            p.revoke.setdefault(key, set()).add(DEFAULT_EGRESS)


def rule_doc(r: PerimeterRule) -> dict[str, str]:
    """A rule as an audit record names it: direction, protocol, ports (ICMP: type/code) and the
    peer (``cidr``, ``group`` — a name of ours in the same VPC, or a foreign group's id — or
    ``prefix_list``)."""
    doc = {"direction": r.direction, "protocol": "all" if r.proto == "-1" else r.proto}
    if r.proto in ("tcp", "udp"):
        whole = r.from_port == -1 or (r.from_port, r.to_port) == (0, 65535)
        doc["ports"] = (
            "all" if whole else str(r.from_port) if r.from_port == r.to_port else f"{r.from_port}-{r.to_port}"
        )
    elif r.proto != "-1" and r.from_port != -1:
        doc["icmp"] = f"{r.from_port}/{r.to_port}"
    doc[r.peer_kind.replace("-", "_")] = r.peer
    return doc


def changes_of(p: Plan, key_of: dict[str, tuple[str, str]], enis: dict[str, _Eni]) -> dict[str, Any]:
    """What applying ``p`` changes, as an audit record's detail: groups created (VPC and name: EC2
    gives the id only when it makes one) and deleted, rules added and removed per group, and per
    group the instances (an interface's id where it has none) it is attached to or detached from.
    Each list keeps its first :data:`AUDIT_ITEMS` entries, each group's instances their first
    :data:`AUDIT_INSTANCES`; ``counts`` is always the whole."""
    ids = {key: gid for gid, key in key_of.items()}

    def group(key: tuple[str, str]) -> dict[str, str]:
        return {"group": ids.get(key, "(new)"), "name": key[1], "vpc": key[0]}

    def rules(changes: Mapping[tuple[str, str], set[PerimeterRule]]) -> list[dict[str, str]]:
        return [group(key) | rule_doc(r) for key in sorted(changes) for r in sorted(changes[key])]

    def carriers(changes: Mapping[str, set[str]]) -> list[dict[str, Any]]:
        per: dict[tuple[str, str], dict[str, None]] = {}
        for iid in sorted(changes):
            e = enis[iid]
            for name in changes[iid]:
                per.setdefault((e.network, name), {})[e.instance or iid] = None
        return [
            group(key) | {"instances": list(owners)[:AUDIT_INSTANCES], "count": len(owners)}
            for key, owners in sorted(per.items())
        ]

    def owners(changes: Mapping[str, set[str]]) -> int:
        return len({enis[iid].instance or iid for iid, names in changes.items() if names})

    out: dict[str, Any] = {
        "groups_created": [
            {"name": g.name, "vpc": g.network} for g in sorted(p.create, key=lambda g: (g.network, g.name))
        ],
        "groups_deleted": [group(key) for key in sorted(p.delete)],
        "rules_added": rules(p.authorize),
        "rules_removed": rules(p.revoke),
        "attached": carriers(p.attach),
        "detached": carriers(p.detach),
    }
    counts = {k: len(v) for k, v in out.items()}
    counts["instances_attached"], counts["instances_detached"] = owners(p.attach), owners(p.detach)
    return {k: v[:AUDIT_ITEMS] for k, v in out.items()} | {"counts": counts}


def _id_of(key_of: dict[str, tuple[str, str]], key: tuple[str, str]) -> str:
    return next((gid for gid, k in key_of.items() if k == key), "?")
