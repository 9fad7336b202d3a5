"""A member account's lifecycle actions are completed in that account: compute assumes the
account's lifecycle role (MemberLifecycleRoleName, CompleteLifecycleAction only, trusted by
compute only) and completes the action in the event's Region. Never with the control account's
own credentials, where the action does not exist (the member's instance would wait in
Pending:Wait until its hook's default result, ABANDON, killed it). Against the moto server
through the real handlers, with a member account of moto's own (AccountRoles and
PerimeterAccountRoles as docs/deploy-aws.md "Cross-account" describes)."""

from __future__ import annotations

import json
from typing import Any

import boto3
import pytest

from ringfence.local.estate import lab_image
from tests.aws.conftest import ACCOUNT, REGION, Env
from tests.aws.test_handler_metrics import emitted
from tests.aws.test_pipeline import boot

MEMBER = "210987654321"
READ_ONLY = f"arn:aws:iam::{MEMBER}:role/ringfence-member-readonly"
PERIMETER = f"arn:aws:iam::{MEMBER}:role/ringfence-member-perimeter"
LIFECYCLE = f"arn:aws:iam::{MEMBER}:role/ringfence-member-lifecycle"


def _member(env: Env) -> tuple[Any, Any]:
    """EC2 and Auto Scaling of the member account (its administrator's)."""
    c = boto3.client("sts").assume_role(RoleArn=f"arn:aws:iam::{MEMBER}:role/admin", RoleSessionName="admin")
    creds = c["Credentials"]
    s = boto3.Session(
        aws_access_key_id=creds["AccessKeyId"],
        aws_secret_access_key=creds["SecretAccessKey"],
        aws_session_token=creds["SessionToken"],
        region_name=REGION,
    )
    return s.client("ec2"), s.client("autoscaling")


def _member_launch(env: Env, monkeypatch: pytest.MonkeyPatch, lifecycle_role: str) -> tuple[str, Any]:
    """A labelled group of the member account scaled out by one behind a launch hook; its
    lifecycle action forwarded to the control account's bus as the member's rule does."""
    monkeypatch.setenv("RINGFENCE_ACCOUNT_ROLES", json.dumps({MEMBER: READ_ONLY}))
    monkeypatch.setenv("RINGFENCE_PERIMETER_ACCOUNT_ROLES", json.dumps({MEMBER: PERIMETER}))
    monkeypatch.setenv("RINGFENCE_MEMBER_LIFECYCLE_ROLE", lifecycle_role)
    boot(env)
    env.load_functions()
    ec2, asg = _member(env)
    vpc = ec2.create_vpc(CidrBlock="10.7.0.0/16")["Vpc"]["VpcId"]
    sub = ec2.create_subnet(VpcId=vpc, CidrBlock="10.7.1.0/24", AvailabilityZone=f"{REGION}a")["Subnet"]["SubnetId"]
    ami = lab_image(ec2)
    lt = ec2.create_launch_template(
        LaunchTemplateName="m-web", LaunchTemplateData={"ImageId": ami, "InstanceType": "t3.micro"}
    )["LaunchTemplate"]["LaunchTemplateId"]
    labels = {"ringfence:role": "web", "ringfence:app": "ordering", "ringfence:env": "prod"}
    asg.create_auto_scaling_group(
        AutoScalingGroupName="m-web-asg",
        LaunchTemplate={"LaunchTemplateId": lt, "Version": "$Latest"},
        MinSize=0,
        MaxSize=10,
        DesiredCapacity=0,
        VPCZoneIdentifier=sub,
        Tags=[
            {
                "Key": k,
                "Value": v,
                "PropagateAtLaunch": True,
                "ResourceId": "m-web-asg",
                "ResourceType": "auto-scaling-group",
            }
            for k, v in labels.items()
        ],
    )
    asg.put_lifecycle_hook(
        LifecycleHookName="rf-hook",
        AutoScalingGroupName="m-web-asg",
        LifecycleTransition="autoscaling:EC2_INSTANCE_LAUNCHING",
        HeartbeatTimeout=300,
        DefaultResult="ABANDON",
    )
    asg.set_desired_capacity(AutoScalingGroupName="m-web-asg", DesiredCapacity=1)
    (inst,) = asg.describe_auto_scaling_groups(AutoScalingGroupNames=["m-web-asg"])["AutoScalingGroups"][0]["Instances"]
    new = inst["InstanceId"]
    assert inst["LifecycleState"] == "Pending:Wait"
    # the token as AWS puts it in the member's event
    acts = env.aws._extension(f"/_ringfence/lifecycle-actions?account={MEMBER}&region={REGION}")
    (act,) = [a for a in acts if a["instance_id"] == new]
    ev = env.lifecycle_event(new, launching=True)
    ev["account"] = MEMBER
    ev["detail"].update({"AutoScalingGroupName": "m-web-asg", "LifecycleActionToken": act["token"]})
    env.sqs.send_message(QueueUrl=env.queues["lifecycle"], MessageBody=json.dumps(ev))
    return new, asg


def _state(asg: Any, iid: str) -> str:
    got = asg.describe_auto_scaling_instances(InstanceIds=[iid])["AutoScalingInstances"]
    return str(got[0]["LifecycleState"]) if got else "gone"


@pytest.mark.slow
def test_a_member_accounts_launch_is_completed_through_its_lifecycle_role(
    env: Env, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    new, asg = _member_launch(env, monkeypatch, "ringfence-member-lifecycle")
    assumed: list[dict[str, Any]] = []
    env.hook("before-parameter-build.sts.AssumeRole", lambda params, **_: assumed.append(dict(params)))
    capsys.readouterr()
    env.pump()
    rec = env.store.get(new)
    assert rec is not None and rec.workload.account == MEMBER
    assert env.store.bundle_pointer(new) is not None
    assert _state(asg, new) == "InService", "completed in the member account"
    roles = {(a["RoleArn"], a["RoleSessionName"]) for a in assumed}
    assert (LIFECYCLE, "ringfence-lifecycle") in roles, roles
    assert emitted(capsys.readouterr().out).get("LifecycleLeftToTimeout", 0) == 0
    hold = env.store.launch_hold(new)
    assert hold is not None and hold.outcome == "continue" and hold.lifecycle is not None
    assert (hold.lifecycle["account"], hold.lifecycle["region"]) == (MEMBER, REGION)
    assert boto3.client("sts").get_caller_identity()["Account"] == ACCOUNT


def test_a_member_account_without_a_lifecycle_role_is_counted_not_completed_here(
    env: Env, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    """No lifecycle role configured: nothing is completed with the control account's credentials;
    the action is left to its hook's default result and counted (LifecycleLeftToTimeout, alarmed)."""
    new, asg = _member_launch(env, monkeypatch, "")
    calls: list[dict[str, Any]] = []
    env.hook(
        "before-parameter-build.auto-scaling.CompleteLifecycleAction", lambda params, **_: calls.append(dict(params))
    )
    capsys.readouterr()
    env.pump()
    assert env.store.bundle_pointer(new) is not None
    assert calls == [], "never with the control account's own credentials"
    assert _state(asg, new) == "Pending:Wait"
    assert emitted(capsys.readouterr().out).get("LifecycleLeftToTimeout") == 1
    hold = env.store.launch_hold(new)
    assert hold is not None and "MemberLifecycleRoleName" in (hold.outcome or "")
