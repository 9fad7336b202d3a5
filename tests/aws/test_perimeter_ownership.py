"""Which security groups are Ringfence's: only those whose ids it recorded in the state table when
it created them (``sg#<account>#<region>`` items, written only by the perimeter's role among the
event- and agent-fed roles: tests/aws/test_function_iam.py). The ``ringfence:perimeter`` tag and
a Ringfence name are what its groups look like, which anyone allowed to create a tagged group can
copy. The real perimeter function over moto."""

from __future__ import annotations

import json
import logging
from typing import Any

import pytest
from boto3.dynamodb.conditions import Key

from ringfence.clouds.aws.sg import TAG
from ringfence.perimeter import EGRESS, PerimeterRule
from tests.aws.conftest import ACCOUNT, REGION, Env
from tests.aws.test_handler_metrics import emitted
from tests.aws.test_pipeline import _ctx, _scheduled, boot

LAUNCH = {"transition": "autoscaling:EC2_INSTANCE_LAUNCHING", "hook_name": "rf-hook", "group_name": "rf-web-asg"}


def groups_of(env: Env, iid: str) -> set[str]:
    inst = env.ec2.describe_instances(InstanceIds=[iid])["Reservations"][0]["Instances"][0]
    return {g["GroupId"] for n in inst["NetworkInterfaces"] for g in n["Groups"]}


def records(env: Env) -> dict[str, dict[str, Any]]:
    items = env.ddb.Table("rf-state").query(KeyConditionExpression=Key("pk").eq(f"sg#{ACCOUNT}#{REGION}"))["Items"]
    return {str(i["sk"]): i for i in items}


def schedule(env: Env) -> list[dict[str, Any]]:
    return env.fn["perimeter"].handler(_scheduled(), _ctx())["results"]  # type: ignore[no-any-return]


def test_the_groups_ringfence_creates_are_recorded(env: Env) -> None:
    boot(env)
    made = env.ec2.describe_security_groups(Filters=[{"Name": "tag-key", "Values": [TAG]}])["SecurityGroups"]
    assert made and set(records(env)) == {g["GroupId"] for g in made}
    assert {r["how"] for r in records(env).values()} == {"created"}


def test_attack_a_look_alike_perimeter_group_is_never_attached(
    env: Env, caplog: pytest.LogCaptureFixture, capsys: pytest.CaptureFixture[str]
) -> None:
    """Someone who may create a tagged security group in a managed VPC (no right on any instance
    or interface) pre-creates rf-prod-boundary there, with the ringfence:perimeter tag and every
    protocol from 0.0.0.0/0. Before, the perimeter took it for its own by tag and name and attached
    it to every prod interface in that VPC (the event path never revokes), and handed the launch on
    with it. Now it is refused: not attached, named in the log, counted, and the instance's launch
    is not handed on; the scheduled full run does not adopt it (its rules are not Ringfence's)."""
    caplog.set_level(logging.INFO, logger="ringfence.aws.perimeter")
    est = boot(env)
    vpc = env.ec2.create_vpc(CidrBlock="10.9.0.0/16")["Vpc"]["VpcId"]
    sub = env.ec2.create_subnet(VpcId=vpc, CidrBlock="10.9.1.0/24", AvailabilityZone=f"{REGION}a")["Subnet"]
    evil = env.ec2.create_security_group(
        GroupName="rf-prod-boundary",
        Description="Ringfence prod boundary",
        VpcId=vpc,
        TagSpecifications=[
            {
                "ResourceType": "security-group",
                "Tags": [{"Key": TAG, "Value": "prod"}, {"Key": "Name", "Value": "rf-prod-boundary"}],
            }
        ],
    )["GroupId"]
    env.ec2.authorize_security_group_ingress(
        GroupId=evil, IpPermissions=[{"IpProtocol": "-1", "IpRanges": [{"CidrIp": "0.0.0.0/0"}]}]
    )
    (iid,) = est["run"]("web", sub["SubnetId"], 1)
    env.put(env.state_event(iid, "running"))
    env.drain("ingest", "ingest")
    env.sqs.send_message(
        QueueUrl=env.queues["perimeter"],
        MessageBody=json.dumps({"ids": [iid], "lifecycles": [LAUNCH | {"instance_id": iid, "token": "t"}]}),
    )
    capsys.readouterr()
    env.drain("perimeter", "perimeter")
    assert evil not in groups_of(env, iid), "the look-alike is on the prod interface"
    assert f"{evil} carries {TAG} and a Ringfence name, but Ringfence has no record of creating it" in caplog.text
    handed = [lc["instance_id"] for m in env.receive("compute") for lc in json.loads(m["Body"]).get("lifecycles", [])]
    assert iid not in handed, "the launch was handed on"
    metrics = emitted(capsys.readouterr().out)
    assert metrics.get("PerimeterGroupsRefused", 0) >= 1 and metrics.get("LifecycleLeftToTimeout") == 1
    # the full run neither adopts nor attaches it, and names it
    [here] = [r for r in schedule(env) if r["account"] == ACCOUNT]
    assert evil not in records(env) and evil not in groups_of(env, iid)
    assert any(evil in x for x in here["lookalikes"]), here
    assert any(evil in v for v in here["violations"]), here


def _forget_records(env: Env) -> None:
    """As a deployment before records: the groups are there, no record of them."""
    table = env.ddb.Table("rf-state")
    for gid in records(env):
        table.delete_item(Key={"pk": f"sg#{ACCOUNT}#{REGION}", "sk": gid})


def test_groups_made_before_records_are_adopted_by_the_full_run_only_if_exactly_ringfences(
    env: Env, caplog: pytest.LogCaptureFixture
) -> None:
    """Upgrading: the groups an earlier version made have no record. The event path refuses them
    (it never adopts); the scheduled full run adopts, and records, each that is exactly what
    Ringfence makes (tags, rules); one with a rule added by hand is refused until it is again."""
    caplog.set_level(logging.INFO, logger="ringfence.aws.perimeter")
    est = boot(env)
    made = {g["GroupName"]: g["GroupId"] for g in env.ec2.describe_security_groups(
        Filters=[{"Name": "tag-key", "Values": [TAG]}, {"Name": "vpc-id", "Values": [est["vpc"]]}]
    )["SecurityGroups"]}  # fmt: skip
    _forget_records(env)
    drift = [{"IpProtocol": "tcp", "FromPort": 22, "ToPort": 22, "IpRanges": [{"CidrIp": "0.0.0.0/0"}]}]
    env.ec2.authorize_security_group_ingress(GroupId=made["rf-prod-mgmt"], IpPermissions=drift)
    # the event path: not adopted, the new instance's interfaces left as they are
    (iid,) = est["run"]("web", est["subnets"]["web"], 1)
    env.put(env.state_event(iid, "running"))
    env.pump()
    assert records(env) == {} and not groups_of(env, iid) & set(made.values())
    # the full run: the boundary adopted and recorded, the drifted mgmt refused
    [here] = [r for r in schedule(env) if r["account"] == ACCOUNT]
    assert (
        set(records(env)) == {made["rf-prod-boundary"]} and records(env)[made["rf-prod-boundary"]]["how"] == "adopted"
    )
    assert [a.target for a in env.store.audit_log() if a.action == "perimeter.group-adopted"] == [
        made["rf-prod-boundary"]
    ]
    assert any(made["rf-prod-mgmt"] in x for x in here["lookalikes"]), here
    # an interface that needs a refused group is left as it is, all of it
    assert not groups_of(env, iid) & set(made.values())
    # once it is exactly Ringfence's again, the next full run adopts it too
    env.ec2.revoke_security_group_ingress(GroupId=made["rf-prod-mgmt"], IpPermissions=drift)
    schedule(env)
    assert set(records(env)) == set(made.values())
    assert set(made.values()) <= groups_of(env, iid)


def test_a_group_whose_record_cannot_be_written_is_not_left_behind(env: Env) -> None:
    """The record is what makes a created group ours: if it cannot be written, the group is deleted
    again (it would be a look-alike of its own) and the place fails, to be retried."""
    from botocore.exceptions import ClientError

    def refuse(params: dict[str, Any], **_: Any) -> None:
        item = params.get("Item", {})
        pk, sk = (str(v.get("S", "") if isinstance(v, dict) else v) for v in (item.get("pk"), item.get("sk")))
        if pk.startswith("sg#") and not sk.startswith("pending#"):  # the record, not the intent before it
            raise ClientError({"Error": {"Code": "AccessDeniedException", "Message": "no"}}, "PutItem")

    env.load_functions()
    env.hook("before-parameter-build.dynamodb.PutItem", refuse)
    calls: list[str] = []
    for op in ("CreateSecurityGroup", "DeleteSecurityGroup"):
        env.hook(f"before-parameter-build.ec2.{op}", lambda op=op, **_: calls.append(op))
    env.provision_example_policy()
    est = env.estate()
    for ids in est["ids"].values():
        for iid in ids:
            env.put(env.state_event(iid, "running"))
    env.drain("ingest", "ingest")
    env.drain("perimeter", "perimeter")
    assert calls[:2] == ["CreateSecurityGroup", "DeleteSecurityGroup"], calls
    assert env.ec2.describe_security_groups(Filters=[{"Name": "tag-key", "Values": [TAG]}])["SecurityGroups"] == []
    assert records(env) == {}, "an intent left behind"


class _Stopped(BaseException):
    """What a Lambda timeout does to the perimeter: the process stops, no ``except Exception`` runs."""


def _stopped_run(env: Env, monkeypatch: pytest.MonkeyPatch) -> tuple[dict[str, Any], str, str, str]:
    """The estate booted, a web instance launched in a new VPC, and the perimeter stopped between
    the CreateSecurityGroup of that VPC's rf-prod-boundary and the put of its record (its message
    dropped): (the estate, the VPC, the instance, the group left unrecorded)."""
    from ringfence.clouds.aws import sg as sgmod

    est = boot(env)
    vpc = env.ec2.create_vpc(CidrBlock="10.9.0.0/16")["Vpc"]["VpcId"]
    sub = env.ec2.create_subnet(VpcId=vpc, CidrBlock="10.9.1.0/24", AvailabilityZone=f"{REGION}a")["Subnet"]
    (iid,) = est["run"]("web", sub["SubnetId"], 1)
    env.put(env.state_event(iid, "running"))
    env.drain("ingest", "ingest")

    def stopped(self: Any, gid: str, network: str, name: str, how: str) -> None:
        raise _Stopped(gid)

    with monkeypatch.context() as m:
        m.setattr(sgmod.GroupRecords, "add", stopped)
        env.sqs.send_message(QueueUrl=env.queues["perimeter"], MessageBody=json.dumps({"ids": [iid]}))
        with pytest.raises(_Stopped) as k:
            env.drain("perimeter", "perimeter")
    orphan = str(k.value)
    assert orphan not in records(env)
    [g] = env.ec2.describe_security_groups(GroupIds=[orphan])["SecurityGroups"]
    assert g["VpcId"] == vpc and next(t["Value"] for t in g["Tags"] if t["Key"] == TAG).startswith("prod/")
    while env.receive("perimeter"):
        pass
    return est, vpc, iid, orphan


def test_a_group_made_by_a_run_stopped_before_its_record_is_taken_back(
    env: Env, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    """The perimeter is stopped between CreateSecurityGroup and the put of the group's record.
    Before, the group was left tagged and named as Ringfence's but unrecorded: a look-alike of its
    own making that the full run never adopted (only the default egress) and that held its name, so
    that VPC's interfaces were refused and their launches never handed on. Now an intent with a
    random nonce is recorded before the create and the nonce goes on the group (the
    ringfence:perimeter tag's value): the next run records it, gives it its rules and attaches it."""
    from ringfence.clouds.aws import sg as sgmod

    caplog.set_level(logging.INFO, logger="ringfence.aws.perimeter")
    est, vpc, iid, orphan = _stopped_run(env, monkeypatch)
    # the message is retried (the batch failed), with the launch this time
    env.sqs.send_message(
        QueueUrl=env.queues["perimeter"],
        MessageBody=json.dumps({"ids": [iid], "lifecycles": [LAUNCH | {"instance_id": iid, "token": "t"}]}),
    )
    env.drain("perimeter", "perimeter")
    assert records(env)[orphan]["how"] == "created"
    assert not [r for r in records(env) if r.startswith("pending#")]
    assert orphan in groups_of(env, iid)
    assert f"{orphan} (rf-prod-boundary) in {vpc}: made by a run stopped before recording it" in caplog.text
    handed = [lc["instance_id"] for m in env.receive("compute") for lc in json.loads(m["Body"]).get("lifecycles", [])]
    assert iid in handed, "the launch was not handed on"
    # its rules are the boundary's, the default "all outbound" gone unless the boundary wants it
    [ours] = [r for r in schedule(env) if r["account"] == ACCOUNT]
    assert not ours.get("lookalikes") and not ours.get("violations"), ours
    [same] = env.ec2.describe_security_groups(
        Filters=[{"Name": "vpc-id", "Values": [est["vpc"]]}, {"Name": "group-name", "Values": ["rf-prod-boundary"]}]
    )["SecurityGroups"]
    [now] = env.ec2.describe_security_groups(GroupIds=[orphan])["SecurityGroups"]
    everything = PerimeterRule(EGRESS, "-1", -1, -1, "cidr", "0.0.0.0/0")
    assert (everything in sgmod._rules_of(now, {})) == (everything in sgmod._rules_of(same, {}))
    assert len(sgmod._rules_of(now, {})) == len(sgmod._rules_of(same, {}))


@pytest.mark.slow
def test_a_group_taken_back_is_audited_before_its_record_and_counted(
    env: Env, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    """A group of a stopped run taken back becomes Ringfence's without a record of its creation:
    before, that showed in a log line only. Now it is audited (``perimeter.group-taken-back``,
    naming the group, its VPC and name) before its record is written, so an audit store that
    refuses the write leaves it unrecorded and the place failed, for the next run to try both
    again; and counted (``PerimeterGroupsTakenBack``). The real perimeter function over moto, its
    calls granted in both deployments."""
    from botocore.exceptions import ClientError

    from tests.aws.test_function_iam import Recorder, refusals

    _est, vpc, iid, orphan = _stopped_run(env, monkeypatch)
    env.load_functions()  # a cold container, whose clients carry the hooks below
    rec = Recorder(env)
    refusing: list[str] = []

    def refuse(params: dict[str, Any], **_: Any) -> None:
        tables = {next(iter(i.values()))["TableName"] for i in params.get("TransactItems", [])}
        if "rf-audit" in tables and not refusing:
            raise ClientError({"Error": {"Code": "ProvisionedThroughputExceededException", "Message": "x"}}, "Tx")

    env.hook("before-parameter-build.dynamodb.TransactWriteItems", refuse)
    capsys.readouterr()
    env.sqs.send_message(QueueUrl=env.queues["perimeter"], MessageBody=json.dumps({"ids": [iid]}))
    [out] = env.drain("perimeter", "perimeter")
    assert out["batchItemFailures"], "the message naming only the failed place is handed back"
    assert orphan not in records(env) and [k for k in records(env) if k.startswith("pending#")]
    assert emitted(capsys.readouterr().out).get("PerimeterPlacesFailed") == 1
    assert not [a for a in env.store.audit_log() if a.action == "perimeter.group-taken-back"]

    refusing.append("no more")
    while env.receive("perimeter"):
        pass
    env.sqs.send_message(QueueUrl=env.queues["perimeter"], MessageBody=json.dumps({"ids": [iid]}))
    env.drain("perimeter", "perimeter")
    assert records(env)[orphan]["how"] == "created" and orphan in groups_of(env, iid)
    [audit] = [a for a in env.store.audit_log() if a.action == "perimeter.group-taken-back"]
    assert (audit.principal, audit.target) == ("ringfence:perimeter", orphan)
    assert audit.detail == {"account": ACCOUNT, "region": REGION, "vpc": vpc, "name": "rf-prod-boundary"}
    assert emitted(capsys.readouterr().out).get("PerimeterGroupsTakenBack") == 1
    schedule(env)  # taken back once: the full run after it neither counts nor audits it again
    assert emitted(capsys.readouterr().out).get("PerimeterGroupsTakenBack") is None
    assert len([a for a in env.store.audit_log() if a.action == "perimeter.group-taken-back"]) == 1
    assert not refusals(rec, ["perimeter"])
