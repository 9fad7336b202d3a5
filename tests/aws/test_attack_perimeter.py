"""Attacks on the security-group perimeter: the real SecurityGroupPerimeter against moto (server
mode), driven directly (the function around it: tests/aws/test_perimeter.py).

moto merges an instance's launch groups into its primary ENI's list, so where an interface's exact
list matters these tests use a secondary ENI (moto keeps its list exact)."""

from __future__ import annotations

import json
from collections.abc import Iterator
from typing import Any

import boto3
import pytest
from pydantic import ValidationError

from ringfence.clouds.aws.sg import EMPTY, GroupRecords, SecurityGroupPerimeter
from ringfence.local.estate import lab_image
from ringfence.perimeter import PerimeterConfig, Scope
from tests.aws.conftest import ACCOUNT, REGION, Env

CFG = PerimeterConfig.model_validate(
    {
        "admin_cidrs": ["10.99.0.0/24"],
        "control_plane_cidrs": ["10.200.0.0/24"],
        "published": [{"name": "web", "match": {"role": "web"}, "ports": ["tcp/443"]}],
    }
)
WORLD_SSH = [{"IpProtocol": "tcp", "FromPort": 22, "ToPort": 22, "IpRanges": [{"CidrIp": "0.0.0.0/0"}]}]


class Vpc:
    def __init__(self, env: Env) -> None:
        self.ec2 = env.ec2
        self.ami = lab_image(self.ec2)
        self.id = self.ec2.create_vpc(CidrBlock="10.7.0.0/16")["Vpc"]["VpcId"]
        self.subnet = self.ec2.create_subnet(VpcId=self.id, CidrBlock="10.7.1.0/24")["Subnet"]["SubnetId"]

    def launch(self, groups: list[str] | None = None) -> str:
        kw: dict[str, Any] = {"SecurityGroupIds": groups} if groups else {}
        inst = self.ec2.run_instances(ImageId=self.ami, MinCount=1, MaxCount=1, SubnetId=self.subnet, **kw)
        return str(inst["Instances"][0]["InstanceId"])

    def second_eni(self, iid: str, groups: list[str]) -> str:
        eni = self.ec2.create_network_interface(SubnetId=self.subnet, Groups=groups)["NetworkInterface"]
        self.ec2.attach_network_interface(NetworkInterfaceId=eni["NetworkInterfaceId"], InstanceId=iid, DeviceIndex=1)
        return str(eni["NetworkInterfaceId"])

    def group(self, name: str) -> dict[str, Any]:
        f = [{"Name": "vpc-id", "Values": [self.id]}, {"Name": "group-name", "Values": [name]}]
        sgs = self.ec2.describe_security_groups(Filters=f)["SecurityGroups"]
        return sgs[0] if sgs else {}

    def foreign(self, name: str, perms: list[dict[str, Any]] | None = None) -> str:
        gid = str(
            self.ec2.create_security_group(GroupName=name, Description="not Ringfence's", VpcId=self.id)["GroupId"]
        )
        if perms:
            self.ec2.authorize_security_group_ingress(GroupId=gid, IpPermissions=perms)
        return gid

    def legacy_published(self) -> str:
        """The one published group per env an earlier version made (``rf-prod-published``, ours by tag)."""
        return str(
            self.ec2.create_security_group(
                GroupName="rf-prod-published",
                Description="Ringfence prod published services",
                VpcId=self.id,
                TagSpecifications=[
                    {"ResourceType": "security-group", "Tags": [{"Key": "ringfence:perimeter", "Value": "prod"}]}
                ],
            )["GroupId"]
        )

    def names_on(self, eni: str) -> list[str]:
        e = self.ec2.describe_network_interfaces(NetworkInterfaceIds=[eni])["NetworkInterfaces"][0]
        return [g["GroupName"] for g in e["Groups"]]

    def world_ssh_on(self, name: str) -> bool:
        perms = self.group(name)["IpPermissions"]
        return any(p.get("FromPort") == 22 and {"CidrIp": "0.0.0.0/0"} in p.get("IpRanges", []) for p in perms)


@pytest.fixture
def vpc(env: Env) -> Iterator[Vpc]:
    yield Vpc(env)


@pytest.fixture
def sgp(env: Env) -> Iterator[SecurityGroupPerimeter]:
    client = boto3.client("ec2")  # its own client: a test may hook its calls
    yield SecurityGroupPerimeter(client, GroupRecords(env.ddb.Table("rf-state"), ACCOUNT, REGION))
    client.close()


def test_attack_a_workload_that_loses_its_env_loses_prod_and_internet_ingress_even_as_its_only_groups(
    vpc: Vpc, sgp: SecurityGroupPerimeter
) -> None:
    web = vpc.launch()
    wl: dict[str, dict[str, str]] = {web: {"env": "prod", "role": "web"}}
    sgp.reconcile(CFG, wl, Scope.FULL)
    ours = [vpc.group(n)["GroupId"] for n in ("rf-prod-boundary", "rf-prod-mgmt", "rf-prod-published.web")]
    # an interface whose only groups are ours (a launch template naming them, its own group removed)
    lone = vpc.second_eni(web, ours)
    assert sgp.reconcile(CFG, wl, Scope.FULL).plan["attach"] == 0
    wl[web] = {"role": "web"}  # the env label is withdrawn
    res = sgp.reconcile(CFG, wl, Scope.WORKLOADS)
    assert vpc.names_on(lone) == [EMPTY], "prod boundary and 0.0.0.0/0 ingress gone, a rule-less group instead"
    empty = vpc.group(EMPTY)
    assert empty["IpPermissions"] == [] and empty["IpPermissionsEgress"] == [], "closed: no rule either way"
    assert res.violations == []
    full = sgp.reconcile(CFG, wl, Scope.FULL)
    assert full.kept == [] and vpc.names_on(lone) == [EMPTY]
    # drift on the stand-in is revoked like on any group of ours
    vpc.ec2.authorize_security_group_ingress(GroupId=empty["GroupId"], IpPermissions=WORLD_SSH)
    sgp.reconcile(CFG, wl, Scope.FULL)
    assert vpc.group(EMPTY)["IpPermissions"] == []
    # back in prod: ours return, the stand-in goes, and with no interface left on it the full run deletes it
    wl[web] = {"env": "prod", "role": "web"}
    sgp.reconcile(CFG, wl, Scope.WORKLOADS)
    assert sorted(vpc.names_on(lone)) == ["rf-prod-boundary", "rf-prod-mgmt", "rf-prod-published.web"]
    assert sgp.reconcile(CFG, wl, Scope.FULL).plan["delete"] == 1 and vpc.group(EMPTY) == {}


def test_attack_drift_is_revoked_although_another_teams_interface_is_over_the_group_quota(
    vpc: Vpc, sgp: SecurityGroupPerimeter
) -> None:
    web = vpc.launch()
    wl = {web: {"env": "prod"}}
    sgp.reconcile(CFG, wl, Scope.FULL)
    vpc.ec2.authorize_security_group_ingress(GroupId=vpc.group("rf-prod-mgmt")["GroupId"], IpPermissions=WORLD_SSH)
    crowd = [vpc.foreign(f"team-{i}") for i in range(4)]
    other = vpc.launch(crowd)  # 4 groups of its own + 2 of ours = 6 > 5
    other_eni = vpc.ec2.describe_instances(InstanceIds=[other])["Reservations"][0]["Instances"][0]["NetworkInterfaces"][
        0
    ]["NetworkInterfaceId"]
    wl[other] = {"env": "dev"}
    res = sgp.reconcile(CFG, wl, Scope.FULL)
    assert not vpc.world_ssh_on("rf-prod-mgmt"), "the hand-added 0.0.0.0/0 is revoked"
    assert res.applied and res.refused == [other]
    assert any(v.startswith(f"{other_eni}: 6 security groups > 5") for v in res.violations), res.violations
    assert sorted(vpc.names_on(other_eni)) == [f"team-{i}" for i in range(4)], "left exactly as it was"
    assert vpc.group("rf-dev-boundary") == {}, "no group made for an interface that cannot take it"


def test_attack_an_env_no_group_can_be_named_after_or_a_taken_name_does_not_stop_the_run(
    vpc: Vpc, sgp: SecurityGroupPerimeter
) -> None:
    web = vpc.launch()
    wl = {web: {"env": "prod"}}
    sgp.reconcile(CFG, wl, Scope.FULL)
    odd, dev = vpc.launch(), vpc.launch()
    lookalike = vpc.foreign("rf-dev-boundary")
    wl |= {odd: {"env": "team a"}, dev: {"env": "dev"}}
    first = sgp.reconcile(CFG, wl, Scope.FULL)
    assert not [g for g in vpc.ec2.describe_security_groups()["SecurityGroups"] if "team" in g["GroupName"]]
    vpc.ec2.authorize_security_group_ingress(GroupId=vpc.group("rf-prod-mgmt")["GroupId"], IpPermissions=WORLD_SSH)
    res = sgp.reconcile(CFG, wl, Scope.FULL)
    assert not vpc.world_ssh_on("rf-prod-mgmt"), "the full run still revokes drift"
    for r in (first, res):
        assert r.refused == sorted([odd, dev])
        assert any(v.startswith(f"{odd}: env 'team a' cannot name a security group") for v in r.violations)
        assert any(f"rf-dev-boundary in {vpc.id}: the name is held by {lookalike}" in v for v in r.violations)
    assert vpc.group("rf-dev-mgmt") == {}, "the env's other group is not made for nobody"
    assert vpc.group("rf-dev-boundary")["GroupId"] == lookalike, "never taken over"


def test_attack_a_foreign_group_removed_during_a_run_is_not_written_back(vpc: Vpc, sgp: SecurityGroupPerimeter) -> None:
    debug = vpc.foreign("debug-allow-all", [{"IpProtocol": "-1", "IpRanges": [{"CidrIp": "0.0.0.0/0"}]}])
    default = vpc.group("default")["GroupId"]
    victim = vpc.launch()
    eni = vpc.second_eni(victim, [debug])
    pulled: list[str] = []

    def responder(**_: Any) -> None:
        # an incident responder pulls the allow-all group after the perimeter read the interface,
        # before it writes it (the perimeter is creating the groups it will attach)
        if not pulled:
            vpc.ec2.modify_network_interface_attribute(NetworkInterfaceId=eni, Groups=[default])
            pulled.append(eni)

    sgp.ec2.meta.events.register("before-call.ec2.CreateSecurityGroup", responder)
    sgp.reconcile(CFG, {victim: {"env": "prod"}}, Scope.WORKLOADS)
    assert pulled == [eni]
    assert vpc.names_on(eni) == ["default", "rf-prod-boundary", "rf-prod-mgmt"], "debug-allow-all stays removed"


def test_attack_a_published_service_does_not_get_another_services_ports(vpc: Vpc, sgp: SecurityGroupPerimeter) -> None:
    cfg = CFG.model_copy(
        update={
            "published": [
                *CFG.published,
                PerimeterConfig.model_validate(
                    {"published": [{"name": "bastion", "match": {"role": "jumpbox"}, "ports": ["tcp/22"]}]}
                ).published[0],
            ]
        }
    )
    web, jump = vpc.launch(), vpc.launch()
    # the older shared group, as a previous version made it, on an interface of the web tier
    old = vpc.legacy_published()
    vpc.ec2.authorize_security_group_ingress(GroupId=old, IpPermissions=WORLD_SSH)
    web_eni = vpc.second_eni(web, [vpc.group("default")["GroupId"], old])
    jump_eni = vpc.second_eni(jump, [vpc.group("default")["GroupId"]])
    wl = {web: {"env": "prod", "role": "web"}, jump: {"env": "prod", "role": "jumpbox"}}
    sgp.reconcile(cfg, wl, Scope.FULL)

    def ports(eni: str) -> set[int]:
        e = vpc.ec2.describe_network_interfaces(NetworkInterfaceIds=[eni])["NetworkInterfaces"][0]
        gids = [g["GroupId"] for g in e["Groups"]]
        sgs = vpc.ec2.describe_security_groups(GroupIds=gids)["SecurityGroups"]
        return {
            p["FromPort"]
            for g in sgs
            for p in g["IpPermissions"]
            if any(r["CidrIp"] == "0.0.0.0/0" for r in p.get("IpRanges", []))
        }

    assert ports(web_eni) == {443}, "the web tier is not open on the bastion's tcp/22"
    assert ports(jump_eni) == {22}
    assert "rf-prod-published.web" in vpc.names_on(web_eni) and "rf-prod-published.bastion" in vpc.names_on(jump_eni)
    assert vpc.group("rf-prod-published") == {}, "the older shared group: detached, then deleted"
    assert sgp.reconcile(cfg, wl, Scope.FULL).plan == dict.fromkeys(
        ("create", "authorize", "revoke", "attach", "detach", "delete"), 0
    )


def test_attack_an_interface_over_the_group_quota_still_sheds_the_older_shared_published_group(
    vpc: Vpc, sgp: SecurityGroupPerimeter
) -> None:
    """A web interface that matches two services carries two groups of another team and the older
    shared rf-prod-published (every service's ports, the bastion's tcp/22 included, from 0.0.0.0/0).
    Its per-service groups would make 6 > 5: it is still reported and refused, but it sheds the old
    shared group (one wanted group in its place, never more groups than it had), which is then
    deleted (it used to be left as it was, keeping tcp/22 from the internet for good)."""
    cfg = PerimeterConfig.model_validate(
        {
            "admin_cidrs": ["10.99.0.0/24"],
            "published": [
                {"name": "web", "match": {"role": "web"}, "ports": ["tcp/443"]},
                {"name": "api", "match": {"tier": "edge"}, "ports": ["tcp/8443"]},
                {"name": "bastion", "match": {"role": "jumpbox"}, "ports": ["tcp/22"]},
            ],
        }
    )
    old = vpc.legacy_published()
    for port in (443, 8443, 22):
        vpc.ec2.authorize_security_group_ingress(
            GroupId=old,
            IpPermissions=[
                {"IpProtocol": "tcp", "FromPort": port, "ToPort": port, "IpRanges": [{"CidrIp": "0.0.0.0/0"}]}
            ],
        )
    web, jump = vpc.launch(), vpc.launch()
    eni = vpc.second_eni(web, [vpc.foreign("app-sg"), vpc.foreign("monitoring-sg"), old])
    wl = {web: {"env": "prod", "role": "web", "tier": "edge"}, jump: {"env": "prod", "role": "jumpbox"}}
    for _ in range(2):
        res = sgp.reconcile(cfg, wl, Scope.FULL)
        assert res.refused == [web]
        assert any(v.startswith(f"{eni}: 6 security groups > 5") for v in res.violations), res.violations
    on = vpc.names_on(eni)
    assert "rf-prod-published" not in on and len(on) == 3, on
    assert sorted(on) == ["app-sg", "monitoring-sg", "rf-prod-boundary"], "in its place: a group it wants"
    assert vpc.group("rf-prod-published") == {}, "the older shared group: detached, then deleted"
    assert res.plan == dict.fromkeys(("create", "authorize", "revoke", "attach", "detach", "delete"), 0)


def test_attack_two_published_services_of_one_name_are_refused_by_name(
    vpc: Vpc, sgp: SecurityGroupPerimeter, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Two published services named 'public' (the LBs on tcp/443, the jumpboxes on tcp/22) would
    share rf-<env>-published.public and each other's ports: the configuration is refused, naming the
    name, where every perimeter loads it (RINGFENCE_PERIMETER_CONFIG as the functions and serve
    read it, and the GCP perimeter's from_env), and nothing is planned from it."""
    raw = json.dumps(
        {
            "published": [
                {"name": "public", "match": {"role": "web"}, "ports": ["tcp/443"]},
                {"name": "api", "match": {"role": "api"}, "ports": ["tcp/8443"]},
                {"name": "public", "match": {"role": "jumpbox"}, "ports": ["tcp/22"]},
            ]
        }
    )
    with pytest.raises(ValidationError, match=r"service names must be unique.*'public' given more than once"):
        PerimeterConfig.model_validate_json(raw)
    from ringfence.clouds.gcp.reconcile import GcpPerimeter

    env = {"RINGFENCE_PERIMETER_CONFIG": raw, "RINGFENCE_GCP_PERIMETER": "{}"}
    with pytest.raises(ValueError, match=r"(?s)RINGFENCE_PERIMETER_CONFIG: .*'public' given more than once"):
        GcpPerimeter.from_env(env)
    # the same services with names of their own: each its own group, its own port
    fixed = PerimeterConfig.model_validate_json(
        raw.replace('"public", "match": {"role": "jumpbox"}', '"ssh", "match": {"role": "jumpbox"}')
    )
    web, jump = vpc.launch(), vpc.launch()
    web_eni = vpc.second_eni(web, [vpc.group("default")["GroupId"]])
    sgp.reconcile(fixed, {web: {"env": "prod", "role": "web"}, jump: {"env": "prod", "role": "jumpbox"}}, Scope.FULL)
    assert not vpc.world_ssh_on("rf-prod-published.public") and "rf-prod-published.public" in vpc.names_on(web_eni)
