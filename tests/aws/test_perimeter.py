"""Perimeter: desired state → quota check → smallest diff, against moto EC2 — on the event path
(ingest/lifecycle → perimeter queue → perimeter function → compute) and on the schedule."""

from __future__ import annotations

import logging
from typing import Any
from urllib.parse import parse_qs

import pytest
from botocore.awsrequest import AWSResponse

from ringfence.clouds.aws.perimeter import recorded_changes
from ringfence.perimeter import (
    Interface,
    Member,
    PerimeterConfig,
    Scope,
    check_quotas,
    desired_state,
    plan,
)
from tests.aws.conftest import REGION, Env
from tests.aws.test_pipeline import _ctx, _scheduled, _xml

CONFIG = {
    "admin_cidrs": ["10.99.0.0/24"],
    "control_plane_cidrs": ["10.200.0.0/24"],
    "published": [{"name": "web", "match": {"role": "web"}, "ports": ["tcp/443"]}],
}
PROD = {"rf-prod-boundary", "rf-prod-mgmt"}
NO_CHANGE = {"create": 0, "authorize": 0, "revoke": 0, "attach": 0, "detach": 0, "delete": 0}


@pytest.fixture
def configured(env: Env, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture) -> Env:
    """The estate's events travel with CONFIG in force (as the deployed function's environment)."""
    monkeypatch.setenv("RINGFENCE_PERIMETER_CONFIG", PerimeterConfig.model_validate(CONFIG).model_dump_json())
    caplog.set_level(logging.INFO, logger="ringfence.aws.perimeter")
    return env


def boot(env: Env) -> dict[str, Any]:
    from tests.aws.test_pipeline import boot as pipeline_boot

    return pipeline_boot(env)


def schedule(env: Env) -> list[dict[str, Any]]:
    return env.fn["perimeter"].handler(_scheduled(), _ctx())["results"]  # type: ignore[no-any-return]


def rf_groups(env: Env) -> dict[str, dict[str, Any]]:
    sgs = env.ec2.describe_security_groups(Filters=[{"Name": "tag-key", "Values": ["ringfence:perimeter"]}])
    return {g["GroupName"]: g for g in sgs["SecurityGroups"]}


def enis(env: Env, iid: str) -> dict[str, list[str]]:
    """Interface id → names of its groups, in the interface's order."""
    inst = env.ec2.describe_instances(InstanceIds=[iid])["Reservations"][0]["Instances"][0]
    return {e["NetworkInterfaceId"]: [g["GroupName"] for g in e["Groups"]] for e in inst["NetworkInterfaces"]}


def second_eni(env: Env, iid: str) -> str:
    inst = env.ec2.describe_instances(InstanceIds=[iid])["Reservations"][0]["Instances"][0]
    eni = env.ec2.create_network_interface(SubnetId=inst["SubnetId"])["NetworkInterface"]["NetworkInterfaceId"]
    env.ec2.attach_network_interface(NetworkInterfaceId=eni, InstanceId=iid, DeviceIndex=1)
    return str(eni)


def foreign_group(env: Env, vpc: str, name: str, tags: dict[str, str] | None = None) -> str:
    kw: dict[str, Any] = {}
    if tags:
        kw["TagSpecifications"] = [
            {"ResourceType": "security-group", "Tags": [{"Key": k, "Value": v} for k, v in tags.items()]}
        ]
    gid = env.ec2.create_security_group(GroupName=name, Description="not Ringfence's", VpcId=vpc, **kw)["GroupId"]
    env.ec2.authorize_security_group_ingress(
        GroupId=gid,
        IpPermissions=[
            {"IpProtocol": "tcp", "FromPort": 8080, "ToPort": 8080, "IpRanges": [{"CidrIp": "192.0.2.0/24"}]}
        ],
    )
    return str(gid)


# --- the event path ----------------------------------------------------------------------------


def test_events_give_every_eni_its_groups_and_the_schedule_is_then_a_no_op(
    configured: Env, caplog: Any, monkeypatch: pytest.MonkeyPatch
) -> None:
    env = configured
    env.provision_example_policy()
    est = env.estate()
    web = est["ids"]["web"][0]
    extra = second_eni(env, web)
    for ids in est["ids"].values():
        for iid in ids:
            env.put(env.state_event(iid, "running"))
    with recorded_changes() as changes:
        env.pump()  # ingest → perimeter queue → perimeter, no schedule involved
    groups = rf_groups(env)
    assert set(groups) == PROD | {"rf-prod-published.web"}
    pub = groups["rf-prod-published.web"]["IpPermissions"]
    assert {(p["FromPort"], r["CidrIp"]) for p in pub for r in p.get("IpRanges", [])} == {(443, "0.0.0.0/0")}
    web_enis = enis(env, web)
    assert len(web_enis) == 2 and extra in web_enis
    for names in web_enis.values():
        assert PROD | {"rf-prod-published.web"} <= set(names), "every ENI, not only the primary one"
        assert names[0] == "default", "the groups already there stay, first"
    db = est["ids"]["db"][0]
    for names in enis(env, db).values():
        assert set(names) >= PROD and "rf-prod-published.web" not in names, (
            "internet ingress only to published services"
        )
    # what changed, as the demo shows it
    line = next(r.getMessage() for r in caplog.records if f"attached to {web}" in r.getMessage())
    assert line.startswith("perimeter: sg-") and "(rf-prod-boundary)" in line and line.endswith("(2 ENIs)")
    web_change = next(c for c in changes if c["action"] == "attach" and c["workload"] == web)
    assert sorted(web_change["interfaces"]) == sorted(web_enis) and len(web_change["groups"]) == 3
    assert [c["name"] for c in changes if c["action"] == "create"] == sorted(PROD | {"rf-prod-published.web"})
    out = schedule(env)
    assert len(out) == 1 and out[0]["scope"] == "full"
    assert out[0]["applied"] is False and out[0]["plan"] == NO_CHANGE, out[0]
    # a changed admin range: the smallest diff (one revoke + one authorize per admin port)
    changed = PerimeterConfig.model_validate(dict(CONFIG, admin_cidrs=["10.98.0.0/24"]))
    monkeypatch.setenv("RINGFENCE_PERIMETER_CONFIG", changed.model_dump_json())
    assert schedule(env)[0]["plan"] == dict(NO_CHANGE, authorize=2, revoke=2)


def test_scale_out_instances_get_their_groups_before_the_lifecycle_action_completes(configured: Env) -> None:
    env = configured
    boot(env)
    completed: list[dict[str, Any]] = []

    def complete(request: Any, **_: Any) -> AWSResponse:
        # moto does not implement CompleteLifecycleAction: stand in for it at the HTTP layer and
        # record what was in place at the moment the action was completed
        raw = request.body.decode() if isinstance(request.body, bytes) else request.body
        params = {k: v[0] for k, v in parse_qs(raw).items()}
        iid = params["InstanceId"]
        completed.append({"instance": iid, "enis": enis(env, iid), "ptr": env.store.bundle_pointer(iid)})
        return _xml(
            200,
            "<CompleteLifecycleActionResponse><CompleteLifecycleActionResult/><ResponseMetadata><RequestId>x"
            "</RequestId></ResponseMetadata></CompleteLifecycleActionResponse>",
        )

    env.hook("before-send.auto-scaling.CompleteLifecycleAction", complete)
    env.asg.set_desired_capacity(AutoScalingGroupName="rf-web-asg", DesiredCapacity=3)
    new = env.asg_instances()
    assert len(new) == 3
    for iid in new:
        env.put(env.lifecycle_event(iid, launching=True))
    env.drain("lifecycle", "lifecycle")
    assert env.count("perimeter") == 1, "the batch's launches are handed to the perimeter first, in one message"
    env.drain("compute", "compute")  # the bundles are published meanwhile ...
    assert completed == [], "... but nothing completes before the perimeter is in place"
    env.drain("perimeter", "perimeter")
    env.drain("compute", "compute")
    assert sorted(c["instance"] for c in completed) == sorted(new)
    for c in completed:
        assert c["ptr"] is not None, "the bundle was published before CONTINUE"
        for names in c["enis"].values():
            assert PROD | {"rf-prod-published.web"} <= set(names), f"{c['instance']} had its groups before CONTINUE"


def test_without_a_perimeter_queue_launches_go_straight_to_compute(
    configured: Env, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A deployment (or a local wiring) without the queue keeps the old path: the schedule alone
    reconciles the perimeter and compute completes launches after publishing."""
    env = configured
    boot(env)
    monkeypatch.delenv("RINGFENCE_PERIMETER_QUEUE_URL")
    env.load_functions()
    completed: list[str] = []
    env.hook("before-send.auto-scaling.CompleteLifecycleAction", lambda **kw: completed.append("x"))
    env.asg.set_desired_capacity(AutoScalingGroupName="rf-web-asg", DesiredCapacity=1)
    new = env.asg_instances()[0]
    env.put(env.lifecycle_event(new, launching=True))
    env.drain("lifecycle", "lifecycle")
    assert env.count("perimeter") == 0
    env.drain("compute", "compute")
    assert completed == ["x"]
    assert not any("rf-prod-boundary" in n for n in enis(env, new).values()), "the schedule's job now"
    schedule(env)
    assert all(set(n) >= PROD for n in enis(env, new).values())


def test_retag_moves_the_interfaces_and_the_schedule_deletes_groups_left_without_purpose(configured: Env) -> None:
    env = configured
    est = boot(env)
    dev = est["run"]("processing", est["subnets"]["app"], 1, env="dev")[0]
    dev_eni2 = second_eni(env, dev)
    env.put(env.state_event(dev, "running"))
    env.pump()
    assert {"rf-dev-boundary", "rf-dev-mgmt"} <= set(rf_groups(env))
    assert all({"rf-dev-boundary", "rf-dev-mgmt"} <= set(n) for n in enis(env, dev).values())
    # retag dev → prod: the event path makes that instance's interfaces exact at once
    env.ec2.create_tags(Resources=[dev], Tags=[{"Key": "ringfence:env", "Value": "prod"}])
    env.put(
        env.tag_event(
            dev, {"ringfence:role": "processing", "ringfence:app": "ordering", "ringfence:env": "prod"}, version=7
        )
    )
    env.pump()
    for names in enis(env, dev).values():
        assert set(names) >= PROD and not {"rf-dev-boundary", "rf-dev-mgmt"} & set(names)
    dev_ids = {rf_groups(env)[n]["GroupId"] for n in ("rf-dev-boundary", "rf-dev-mgmt")}
    assert dev_ids, "the event path deletes nothing: the schedule does"
    # an operator re-attaches one of them by hand to a known workload's ENI: it is detached first
    cur = env.ec2.describe_network_interfaces(NetworkInterfaceIds=[dev_eni2])["NetworkInterfaces"][0]
    boundary = rf_groups(env)["rf-dev-boundary"]["GroupId"]
    env.ec2.modify_network_interface_attribute(
        NetworkInterfaceId=dev_eni2, Groups=[g["GroupId"] for g in cur["Groups"]] + [boundary]
    )
    at_delete: dict[str, list[str]] = {}

    def on_delete(params: dict[str, Any], **_: Any) -> None:
        gid = params["GroupId"]
        nis = env.ec2.describe_network_interfaces(Filters=[{"Name": "group-id", "Values": [gid]}])
        at_delete[gid] = [n["NetworkInterfaceId"] for n in nis["NetworkInterfaces"]]

    env.hook("provide-client-params.ec2.DeleteSecurityGroup", on_delete)
    out = schedule(env)[0]
    assert out["plan"]["delete"] == 2 and out["plan"]["detach"] == 1, out["plan"]
    assert at_delete == {g: [] for g in dev_ids}, "deleted only once no ENI carried it"
    assert not {"rf-dev-boundary", "rf-dev-mgmt"} & set(rf_groups(env))
    texts = [c["text"] for c in out["changes"]]
    assert any(t.startswith("perimeter: deleted sg-") and "(rf-dev-boundary)" in t for t in texts), texts
    assert schedule(env)[0]["plan"] == NO_CHANGE


def test_a_group_without_purpose_is_kept_while_an_eni_ringfence_cannot_judge_carries_it(configured: Env) -> None:
    env = configured
    est = boot(env)
    dev = est["run"]("processing", est["subnets"]["app"], 1, env="dev")[0]
    env.put(env.state_event(dev, "running"))
    env.pump()
    boundary = rf_groups(env)["rf-dev-boundary"]["GroupId"]
    # an instance the inventory has never seen (no event yet) carries it
    stranger = env.ec2.run_instances(
        ImageId=env.ami, MinCount=1, MaxCount=1, SubnetId=est["subnets"]["app"], SecurityGroupIds=[boundary]
    )["Instances"][0]["InstanceId"]
    env.ec2.terminate_instances(InstanceIds=[dev])
    env.put(env.state_event(dev, "terminated"))
    env.pump()
    out = schedule(env)[0]
    assert "rf-dev-boundary" in rf_groups(env), "kept: an ENI may still need it"
    assert "rf-dev-mgmt" not in rf_groups(env)
    kept = {k["name"]: k["reason"] for k in out["kept"]}
    assert "belongs to no workload Ringfence knows" in kept["rf-dev-boundary"]
    assert set(enis(env, stranger).popitem()[1]) == {"rf-dev-boundary"}, "and left where it is"


@pytest.mark.parametrize("refusal", ["while-the-other-exists", "always"])
def test_deletes_retry_what_another_unused_group_still_references(configured: Env, refusal: str) -> None:
    env = configured
    est = boot(env)
    dev = est["run"]("processing", est["subnets"]["app"], 1, env="dev")[0]
    env.put(env.state_event(dev, "running"))
    env.pump()
    boundary, mgmt = (rf_groups(env)[n]["GroupId"] for n in ("rf-dev-boundary", "rf-dev-mgmt"))
    env.ec2.terminate_instances(InstanceIds=[dev])
    env.put(env.state_event(dev, "terminated"))
    env.pump()
    attempts: list[str] = []

    def delete(request: Any, **_: Any) -> AWSResponse | None:
        raw = request.body.decode() if isinstance(request.body, bytes) else request.body
        gid = parse_qs(raw)["GroupId"][0]
        attempts.append(gid)
        other_left = "rf-dev-mgmt" in rf_groups(env)
        if gid == boundary and (refusal == "always" or other_left):
            # what EC2 answers while another group's rule references this one
            return _xml(
                400,
                "<Response><Errors><Error><Code>DependencyViolation</Code><Message>resource "
                f"{gid} has a dependent object</Message></Error></Errors><RequestID>x</RequestID></Response>",
            )
        return None

    env.hook("before-send.ec2.DeleteSecurityGroup", delete)
    out = schedule(env)[0]
    if refusal == "always":
        assert attempts == [boundary, mgmt, boundary]
        assert "rf-dev-boundary" in rf_groups(env) and "rf-dev-mgmt" not in rf_groups(env)
        assert [k["name"] for k in out["kept"]] == ["rf-dev-boundary"] and "DependencyViolation" in out["kept"][0][
            "reason"
        ]
        assert out["plan"]["delete"] == 2 and [c["name"] for c in out["changes"] if c["action"] == "delete"] == [
            "rf-dev-mgmt"
        ]
    else:
        assert attempts == [boundary, mgmt, boundary]
        assert not {"rf-dev-boundary", "rf-dev-mgmt"} & set(rf_groups(env)) and out["kept"] == []


def test_foreign_groups_are_never_touched(configured: Env, caplog: Any) -> None:
    env = configured
    est = boot(env)
    vpc = est["vpc"]
    plain = foreign_group(env, vpc, "ops-monitoring")
    lookalike = foreign_group(env, vpc, "rf-shared-boundary")  # our kind of name, not our tag
    tagged = foreign_group(env, vpc, "legacy-fw", {"ringfence:perimeter": "prod"})  # our tag, not our name
    proc = est["ids"]["proc"][0]  # two of ours + three foreign = the 5 an ENI may have
    eni = next(iter(enis(env, proc)))
    cur = env.ec2.describe_network_interfaces(NetworkInterfaceIds=[eni])["NetworkInterfaces"][0]
    ids = [g["GroupId"] for g in cur["Groups"]]
    env.ec2.modify_network_interface_attribute(NetworkInterfaceId=eni, Groups=[plain, *ids, tagged])

    def snapshot() -> list[Any]:
        return env.ec2.describe_security_groups(GroupIds=[plain, lookalike, tagged])["SecurityGroups"]

    before = snapshot()
    env.ec2.create_tags(Resources=[proc], Tags=[{"Key": "ringfence:env", "Value": "dev"}])
    env.put(
        env.tag_event(
            proc, {"ringfence:role": "processing", "ringfence:app": "ordering", "ringfence:env": "dev"}, version=9
        )
    )
    env.pump()
    names = enis(env, proc)[eni]
    assert names[0] == "ops-monitoring" and "legacy-fw" in names, "foreign attachments stay, in their order"
    assert {"rf-dev-boundary", "rf-dev-mgmt"} <= set(names) and not {"rf-prod-boundary", "rf-prod-mgmt"} & set(names)
    # a workload whose group name a foreign group holds: left as it is, the name never taken over
    db = est["ids"]["db"][0]
    db_before = enis(env, db)
    env.ec2.create_tags(Resources=[db], Tags=[{"Key": "ringfence:env", "Value": "shared"}])
    env.put(
        env.tag_event(
            db, {"ringfence:role": "database", "ringfence:app": "ordering", "ringfence:env": "shared"}, version=9
        )
    )
    env.pump()
    assert enis(env, db) == db_before and "rf-shared-mgmt" not in rf_groups(env)
    assert (
        f"rf-shared-boundary in {vpc}: the name is held by {lookalike}, which Ringfence did not create" in caplog.text
    )
    out = schedule(env)[0]
    assert out["applied"] is False and any(lookalike in v for v in out["violations"])
    # back in prod, the schedule converges: legacy-fw and the look-alike serve no workload, yet stay
    env.ec2.create_tags(Resources=[db], Tags=[{"Key": "ringfence:env", "Value": "prod"}])
    env.put(
        env.tag_event(
            db, {"ringfence:role": "database", "ringfence:app": "ordering", "ringfence:env": "prod"}, version=10
        )
    )
    env.pump()
    out = schedule(env)[0]
    assert "violations" not in out and out["plan"] == NO_CHANGE, out
    assert snapshot() == before, "foreign groups: no rule changed, none deleted or detached"


# --- quotas ----------------------------------------------------------------------------------------


def test_over_quota_rules_change_nothing(configured: Env, monkeypatch: pytest.MonkeyPatch) -> None:
    env = configured
    env.provision_example_policy()
    est = env.estate()
    before = env.ec2.describe_security_groups()["SecurityGroups"]
    too_many = dict(CONFIG, admin_cidrs=[f"10.98.{i}.0/24" for i in range(31)])  # 31 ranges x 2 ports = 62
    monkeypatch.setenv("RINGFENCE_PERIMETER_CONFIG", PerimeterConfig.model_validate(too_many).model_dump_json())
    for iid in est["ids"]["web"]:
        env.put(env.state_event(iid, "running"))
    env.pump()
    assert env.ec2.describe_security_groups()["SecurityGroups"] == before, "the event path changed nothing"
    out = schedule(env)[0]
    assert out["applied"] is False
    assert any("rf-prod-mgmt" in v and "62 inbound ipv4 rules > 60" in v for v in out["violations"])
    assert env.ec2.describe_security_groups()["SecurityGroups"] == before


def test_over_quota_interface_changes_nothing_and_leaves_the_launch_to_time_out(configured: Env, caplog: Any) -> None:
    env = configured
    est = boot(env)
    completed: list[str] = []
    env.hook("before-send.auto-scaling.CompleteLifecycleAction", lambda **kw: completed.append("x"))
    env.asg.set_desired_capacity(AutoScalingGroupName="rf-web-asg", DesiredCapacity=1)
    new = env.asg_instances()[0]
    eni = next(iter(enis(env, new)))
    crowd = [foreign_group(env, est["vpc"], f"team-{i}") for i in range(3)]
    cur = env.ec2.describe_network_interfaces(NetworkInterfaceIds=[eni])["NetworkInterfaces"][0]
    env.ec2.modify_network_interface_attribute(
        NetworkInterfaceId=eni, Groups=[g["GroupId"] for g in cur["Groups"]] + crowd
    )
    groups_before = env.ec2.describe_security_groups()["SecurityGroups"]
    enis_before = enis(env, new)
    env.put(env.lifecycle_event(new, launching=True))
    env.pump()
    assert enis(env, new) == enis_before and env.ec2.describe_security_groups()["SecurityGroups"] == groups_before
    assert completed == [], "not CONTINUE without its perimeter"
    assert f"{eni}: 7 security groups > 5 (limit: security groups per network interface)" in caplog.text
    assert "will time out into its configured default result" in caplog.text


# --- the plan, without a cloud -----------------------------------------------------------------------


def test_prefix_list_costs_its_max_entries_and_eni_limit() -> None:
    cfg = PerimeterConfig.model_validate(
        {"control_plane_prefix_list": {"id": "pl-1", "max_entries": 61}, "admin_cidrs": ["10.0.0.0/8"]}
    )
    ds = desired_state(cfg, [Member("eni-1", "vpc-1", {"env": "prod"})])
    v = check_quotas(ds, cfg, {"eni-1": 4})
    assert any("61 outbound ipv4 rules > 60" in x for x in v)
    assert any("eni-1: 6 security groups > 5" in x for x in v)


def test_quotas_are_checked_for_sense() -> None:
    with pytest.raises(ValueError, match="1200 > 1000"):
        PerimeterConfig.model_validate({"quotas": {"rules_per_group": 120, "groups_per_interface": 10}})
    with pytest.raises(ValueError, match="groups_per_interface"):
        PerimeterConfig.model_validate({"quotas": {"groups_per_interface": 17}})


@pytest.mark.parametrize("n,ok", [(30, True), (31, False)])
def test_quota_boundary(n: int, ok: bool) -> None:
    cfg = PerimeterConfig.model_validate({"admin_cidrs": [f"10.{i}.0.0/16" for i in range(n)]})
    ds = desired_state(cfg, [Member("eni-1", "vpc-1", {"env": "prod"})])
    assert (check_quotas(ds, cfg) == []) is ok


def _itf(iid: str, ours: set[str], foreign: int = 1, workload: str | None = "i-1", fixed: bool = False) -> Interface:
    return Interface(iid, "vpc-1", workload, frozenset(ours), foreign, fixed)


def test_plan_scopes_and_the_rules_of_removal() -> None:
    cfg = PerimeterConfig.model_validate({"reachable_from": {"prod": ["shared"]}})
    ds = desired_state(cfg, [Member("eni-1", "vpc-1", {"env": "prod"})])
    boundary = ds.groups[("vpc-1", "rf-prod-boundary")]
    assert not any(r.peer == "rf-shared-boundary" for r in boundary.rules), "no reference to a group nobody needs"
    actual = {k: set(g.rules) for k, g in ds.groups.items()}
    stale = next(iter(boundary.rules))
    actual[("vpc-1", "rf-prod-boundary")] = boundary.rules - {stale} | {
        type(stale)("ingress", "tcp", 1, 1, "cidr", "192.0.2.1/32")
    }
    actual[("vpc-1", "rf-dev-boundary")] = set()
    itfs = {"eni-1": _itf("eni-1", {"rf-prod-boundary", "rf-prod-mgmt", "rf-dev-boundary"})}
    scoped = plan(ds, actual, itfs, Scope.WORKLOADS)
    assert scoped.authorize and not scoped.revoke and not scoped.delete, "the event path only adds rules"
    assert scoped.detach == {"eni-1": {"rf-dev-boundary"}}, "but makes the changed interfaces exact"
    full = plan(ds, actual, itfs, Scope.FULL)
    assert full.revoke and full.delete == [("vpc-1", "rf-dev-boundary")]
    # the same group on an interface nobody can judge, on a service's interface, or as an ENI's only group
    for other, why in [
        (_itf("eni-9", {"rf-dev-boundary"}, workload=None), "belongs to no workload"),
        (_itf("eni-9", {"rf-dev-boundary"}, fixed=True), "managed by another service"),
        (_itf("eni-9", {"rf-dev-boundary"}, foreign=0, workload="i-9"), "has no other security group"),
    ]:
        p = plan(ds, actual, itfs | {"eni-9": other}, Scope.FULL)
        assert p.delete == [] and why in p.kept[("vpc-1", "rf-dev-boundary")]
        assert "eni-9" not in p.detach
    # the other environment's boundary is referenced once it exists (event path) or is wanted
    both = desired_state(cfg, [Member("eni-1", "vpc-1", {"env": "prod"})], existing=[("vpc-1", "rf-shared-boundary")])
    assert any(r.peer == "rf-shared-boundary" for r in both.groups[("vpc-1", "rf-prod-boundary")].rules)


def test_each_launch_action_travels_with_its_instance_and_old_messages_still_parse(env: Env) -> None:
    """``enqueue_perimeter`` splits a long batch into messages of 500 instances: an action rides in
    the message naming its instance (the perimeter hands it on after that instance's groups), and a
    message of the previous shape (one ``lifecycle``) is still understood."""
    import json

    from ringfence.clouds.aws.perimeter import PerimeterMessage
    from ringfence.clouds.aws.wiring import Wiring
    from ringfence.control.wiring import Config

    w = Wiring(Config.from_env())
    ids = [f"i-{n:05d}" for n in range(1001)]
    early, late = {"instance_id": "i-00007"}, {"instance_id": "i-01000"}
    assert w.enqueue_perimeter(ids, lifecycles=[late, early])
    bodies = [json.loads(m["Body"]) for m in env.receive("perimeter")]
    placed = {lc["instance_id"]: len(b["ids"]) for b in bodies for lc in b["lifecycles"]}
    assert sorted(len(b["ids"]) for b in bodies) == [1, 500, 500]
    assert placed == {"i-00007": 500, "i-01000": 1}
    assert all(lc["instance_id"] in b["ids"] for b in bodies for lc in b["lifecycles"])
    old = PerimeterMessage.model_validate({"ids": ["i-a"], "lifecycle": {"instance_id": "i-a"}})
    assert old.actions() == [{"instance_id": "i-a"}]


def test_a_member_accounts_perimeter_goes_through_its_own_role_only(
    configured: Env, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Security-group writes in a member account are made with the perimeter's role there
    (``RINGFENCE_PERIMETER_ACCOUNT_ROLES``), never with the read-only member role that ingest,
    reconcile and the internet-facing agent API assume: the real perimeter function's schedule,
    over moto, assumes the perimeter role alone, and works in the member account with it."""
    import json

    member = "210987654321"
    read_only = f"arn:aws:iam::{member}:role/ringfence-member-readonly"
    perimeter_role = f"arn:aws:iam::{member}:role/ringfence-member-perimeter"
    monkeypatch.setenv("RINGFENCE_ACCOUNT_ROLES", json.dumps({member: read_only}))
    monkeypatch.setenv("RINGFENCE_PERIMETER_ACCOUNT_ROLES", json.dumps({member: perimeter_role}))
    targets = [{"account": member, "region": REGION, "role_arn": read_only}]
    monkeypatch.setenv("RINGFENCE_RECONCILE_TARGETS", json.dumps(targets))
    configured.load_functions()  # cold starts read the environment; their clients carry the hook
    assumed: list[str] = []
    configured.hook("before-parameter-build.sts.AssumeRole", lambda params, **_: assumed.append(params["RoleArn"]))
    results = schedule(configured)
    assert assumed == [perimeter_role]
    [in_member] = [r for r in results if r["account"] == member]
    assert in_member["region"] == REGION and in_member.get("violations") is None, in_member


def test_a_member_account_without_a_perimeter_role_is_refused_not_managed_as_this_account(
    configured: Env, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    """An upgrade that lists a member account in ``AccountRoles`` but not yet in
    ``PerimeterAccountRoles``: the perimeter must not manage it with the control account's own
    credentials (it would describe the wrong account, take the member's instances for gone and hand
    their launches on without groups). The real perimeter function refuses that place's plan: no
    role assumed, no group made, and the launch's lifecycle action is left to time out."""
    import json

    from ringfence.model import Workload
    from ringfence.store.base import InventoryRecord

    member = "210987654321"
    read_only = f"arn:aws:iam::{member}:role/ringfence-member-readonly"
    monkeypatch.setenv("RINGFENCE_ACCOUNT_ROLES", json.dumps({member: read_only}))
    monkeypatch.setenv("RINGFENCE_RECONCILE_TARGETS", json.dumps([{"account": member, "region": REGION}]))
    configured.load_functions()
    assumed: list[str] = []
    configured.hook("before-parameter-build.sts.AssumeRole", lambda params, **_: assumed.append(params["RoleArn"]))
    iid = "i-0123456789abcdef0"
    w = Workload(id=iid, ips=["10.1.0.5"], tags={"ringfence:env": "prod"}, cloud="aws", account=member, region=REGION)
    configured.store.observe(InventoryRecord(id=iid, workload=w, state="pending", observed_at=1.0))
    groups_before = configured.ec2.describe_security_groups()["SecurityGroups"]
    lc = {"instance_id": iid, "transition": "autoscaling:EC2_INSTANCE_LAUNCHING", "hook_name": "h", "group_name": "g"}
    configured.sqs.send_message(
        QueueUrl=configured.queues["perimeter"], MessageBody=json.dumps({"ids": [iid], "lifecycles": [lc]})
    )
    configured.drain("perimeter", "perimeter")
    [in_member] = [r for r in schedule(configured) if r["account"] == member]
    assert assumed == [], "no role of the member account's was assumed for security-group work"
    assert in_member["applied"] is False
    assert "no perimeter role in PerimeterAccountRoles" in in_member["violations"][0], in_member
    assert configured.ec2.describe_security_groups()["SecurityGroups"] == groups_before, "nothing made here instead"
    assert configured.receive("compute") == [], "the launch is not handed on without its groups"
    assert "will time out into its configured default result" in caplog.text
