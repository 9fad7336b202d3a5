"""Auto Scaling lifecycle hooks in the embedded moto (ringfence.local.moto_lifecycle), through boto3
against the moto server: instances wait in Pending:Wait / Terminating:Wait for CompleteLifecycleAction."""

from __future__ import annotations

import threading
import time
from typing import Any

import pytest
from botocore.exceptions import ClientError

from ringfence.local import moto_lifecycle
from ringfence.local.aws import EmbeddedAws
from ringfence.local.estate import lab_image

GROUP = "rf-web-asg"


def group(aws: EmbeddedAws, name: str = GROUP, hooks: dict[str, dict[str, Any]] | None = None) -> Any:
    ec2, asg = aws.client("ec2"), aws.client("autoscaling")
    vpc = ec2.create_vpc(CidrBlock="10.9.0.0/16")["Vpc"]["VpcId"]
    subnet = ec2.create_subnet(VpcId=vpc, CidrBlock="10.9.1.0/24", AvailabilityZone=f"{aws.region}a")["Subnet"]
    ami = lab_image(ec2)
    lt = ec2.create_launch_template(
        LaunchTemplateName=f"{name}-lt", LaunchTemplateData={"ImageId": ami, "InstanceType": "t3.micro"}
    )["LaunchTemplate"]["LaunchTemplateId"]
    asg.create_auto_scaling_group(
        AutoScalingGroupName=name,
        LaunchTemplate={"LaunchTemplateId": lt, "Version": "$Latest"},
        MinSize=0,
        MaxSize=20,
        DesiredCapacity=0,
        VPCZoneIdentifier=subnet["SubnetId"],
    )
    for hook, opts in (hooks or {}).items():
        asg.put_lifecycle_hook(AutoScalingGroupName=name, LifecycleHookName=hook, **opts)
    return asg


def launching(timeout: int = 300, default: str = "ABANDON") -> dict[str, Any]:
    return {
        "LifecycleTransition": moto_lifecycle.LAUNCHING,
        "HeartbeatTimeout": timeout,
        "DefaultResult": default,
    }


def terminating(timeout: int = 300, default: str = "CONTINUE") -> dict[str, Any]:
    return {
        "LifecycleTransition": moto_lifecycle.TERMINATING,
        "HeartbeatTimeout": timeout,
        "DefaultResult": default,
    }


def states(asg: Any, name: str = GROUP) -> dict[str, str]:
    g = asg.describe_auto_scaling_groups(AutoScalingGroupNames=[name])["AutoScalingGroups"][0]
    return {i["InstanceId"]: i["LifecycleState"] for i in g["Instances"]}


def ec2_state(aws: EmbeddedAws, iid: str) -> str:
    r = aws.client("ec2").describe_instances(InstanceIds=[iid])["Reservations"][0]["Instances"][0]
    return str(r["State"]["Name"])


def token_of(aws: EmbeddedAws, iid: str) -> str:
    (action,) = [a for a in aws.lifecycle_actions() if a.instance_id == iid]
    return action.token


def test_without_hooks_moto_is_unchanged(aws: EmbeddedAws) -> None:
    asg = group(aws)
    asg.set_desired_capacity(AutoScalingGroupName=GROUP, DesiredCapacity=2)
    assert sorted(states(asg).values()) == ["InService", "InService"]
    asg.set_desired_capacity(AutoScalingGroupName=GROUP, DesiredCapacity=1)
    assert list(states(asg).values()) == ["InService"]


def test_launch_hook_holds_pending_wait_until_continue_or_abandon(aws: EmbeddedAws) -> None:
    asg = group(aws, hooks={"rf-hook": launching()})
    asg.set_desired_capacity(AutoScalingGroupName=GROUP, DesiredCapacity=2)
    waiting = states(asg)
    assert sorted(waiting.values()) == ["Pending:Wait", "Pending:Wait"]
    a, b = sorted(waiting)
    assert ec2_state(aws, a) == "running", "EC2 runs the instance while the group holds it"
    # capacity counts the waiting instances: asking again launches nothing more
    asg.set_desired_capacity(AutoScalingGroupName=GROUP, DesiredCapacity=2)
    assert set(states(asg)) == {a, b}

    asg.complete_lifecycle_action(
        AutoScalingGroupName=GROUP, LifecycleHookName="rf-hook", LifecycleActionResult="CONTINUE", InstanceId=a
    )
    assert states(asg)[a] == "InService" and states(asg)[b] == "Pending:Wait"

    asg.complete_lifecycle_action(
        AutoScalingGroupName=GROUP,
        LifecycleHookName="rf-hook",
        LifecycleActionResult="ABANDON",
        LifecycleActionToken=token_of(aws, b),
    )
    after = states(asg)
    assert b not in after and ec2_state(aws, b) == "terminated"
    (replacement,) = set(after) - {a}
    assert after[replacement] == "Pending:Wait", "the group replaces an abandoned launch, which waits again"


def test_a_hooked_launch_is_never_seen_in_service_before_its_action_completes(aws: EmbeddedAws) -> None:
    """Readers that do not take the extension's lock (moto's describe responses, the router's
    estate read) once saw a new member InService for an instant: moto adds members InService and
    the hook moved them to Pending:Wait afterwards, and the router announced a launch success."""
    asg = group(aws, hooks={"rf-hook": launching()})
    seen_in_service: set[str] = set()
    done = threading.Event()

    def watch() -> None:
        while not done.is_set():
            for g in aws.instances().groups.values():
                seen_in_service.update(i for i, s in g.members.items() if s == "InService")

    readers = [threading.Thread(target=watch) for _ in range(2)]
    for t in readers:
        t.start()
    try:
        for size in (20, 40, 60):
            asg.set_desired_capacity(AutoScalingGroupName=GROUP, DesiredCapacity=size)
    finally:
        done.set()
        for t in readers:
            t.join()
    assert len(states(asg)) == 60 and set(states(asg).values()) == {"Pending:Wait"}
    assert seen_in_service == set(), "members seen InService while their launch hook was waiting"


def test_every_launch_hook_must_continue(aws: EmbeddedAws) -> None:
    asg = group(aws, hooks={"h1": launching(), "h2": launching()})
    asg.set_desired_capacity(AutoScalingGroupName=GROUP, DesiredCapacity=1)
    (iid,) = states(asg)
    asg.complete_lifecycle_action(
        AutoScalingGroupName=GROUP, LifecycleHookName="h1", LifecycleActionResult="CONTINUE", InstanceId=iid
    )
    assert states(asg)[iid] == "Pending:Wait"
    asg.complete_lifecycle_action(
        AutoScalingGroupName=GROUP, LifecycleHookName="h2", LifecycleActionResult="CONTINUE", InstanceId=iid
    )
    assert states(asg)[iid] == "InService"


def test_terminate_hook_holds_terminating_wait(aws: EmbeddedAws) -> None:
    asg = group(aws, hooks={"rf-leave": terminating()})
    asg.set_desired_capacity(AutoScalingGroupName=GROUP, DesiredCapacity=2)
    assert len(states(asg)) == 2
    asg.set_desired_capacity(AutoScalingGroupName=GROUP, DesiredCapacity=1)
    now = states(asg)
    (leaving,) = [i for i, s in now.items() if s == "Terminating:Wait"]
    assert ec2_state(aws, leaving) == "running" and len(now) == 2
    asg.complete_lifecycle_action(
        AutoScalingGroupName=GROUP, LifecycleHookName="rf-leave", LifecycleActionResult="CONTINUE", InstanceId=leaving
    )
    assert leaving not in states(asg) and ec2_state(aws, leaving) == "terminated"
    assert list(states(asg).values()) == ["InService"]

    # TerminateInstanceInAutoScalingGroup goes through the hook too, and ABANDON also terminates
    (last,) = states(asg)
    asg.terminate_instance_in_auto_scaling_group(InstanceId=last, ShouldDecrementDesiredCapacity=True)
    assert states(asg) == {last: "Terminating:Wait"}
    asg.complete_lifecycle_action(
        AutoScalingGroupName=GROUP, LifecycleHookName="rf-leave", LifecycleActionResult="ABANDON", InstanceId=last
    )
    assert states(asg) == {} and ec2_state(aws, last) == "terminated"


def test_timeout_applies_the_default_result_and_heartbeats_extend_it(aws: EmbeddedAws) -> None:
    asg = group(aws, hooks={"rf-hook": launching(timeout=1, default="CONTINUE")})
    asg.set_desired_capacity(AutoScalingGroupName=GROUP, DesiredCapacity=1)
    (iid,) = states(asg)
    time.sleep(0.6)
    asg.record_lifecycle_action_heartbeat(AutoScalingGroupName=GROUP, LifecycleHookName="rf-hook", InstanceId=iid)
    time.sleep(0.6)
    assert states(asg)[iid] == "Pending:Wait", "the heartbeat restarted the timeout"
    time.sleep(0.6)
    assert states(asg)[iid] == "InService", "timed out into the default result, CONTINUE"


def test_unknown_action_is_refused(aws: EmbeddedAws) -> None:
    asg = group(aws, hooks={"rf-hook": launching()})
    asg.set_desired_capacity(AutoScalingGroupName=GROUP, DesiredCapacity=1)
    with pytest.raises(ClientError, match="No active Lifecycle Action found with token"):
        asg.complete_lifecycle_action(
            AutoScalingGroupName=GROUP,
            LifecycleHookName="rf-hook",
            LifecycleActionResult="CONTINUE",
            LifecycleActionToken="00000000-0000-0000-0000-000000000000",
        )
    (iid,) = states(asg)
    with pytest.raises(ClientError, match="CONTINUE or ABANDON"):
        asg.complete_lifecycle_action(
            AutoScalingGroupName=GROUP, LifecycleHookName="rf-hook", LifecycleActionResult="MAYBE", InstanceId=iid
        )
    assert states(asg)[iid] == "Pending:Wait"


def test_target_groups_reach_only_instances_in_service(aws: EmbeddedAws) -> None:
    asg = group(aws, hooks={"rf-hook": launching(), "rf-leave": terminating()})
    elb = aws.client("elbv2")
    vpc = aws.client("ec2").describe_vpcs(Filters=[{"Name": "cidr", "Values": ["10.9.0.0/16"]}])["Vpcs"][0]["VpcId"]
    tg = elb.create_target_group(Name="web", Protocol="HTTP", Port=80, VpcId=vpc, TargetType="instance")
    arn = tg["TargetGroups"][0]["TargetGroupArn"]
    asg.attach_load_balancer_target_groups(AutoScalingGroupName=GROUP, TargetGroupARNs=[arn])

    def targets() -> set[str]:
        return {t["Target"]["Id"] for t in elb.describe_target_health(TargetGroupArn=arn)["TargetHealthDescriptions"]}

    asg.set_desired_capacity(AutoScalingGroupName=GROUP, DesiredCapacity=2)
    a, b = sorted(states(asg))
    assert targets() == set(), "nothing reaches an instance a launch hook holds"
    asg.complete_lifecycle_action(
        AutoScalingGroupName=GROUP, LifecycleHookName="rf-hook", LifecycleActionResult="CONTINUE", InstanceId=a
    )
    assert targets() == {a}
    asg.complete_lifecycle_action(
        AutoScalingGroupName=GROUP, LifecycleHookName="rf-hook", LifecycleActionResult="CONTINUE", InstanceId=b
    )
    assert targets() == {a, b}
    asg.terminate_instance_in_auto_scaling_group(InstanceId=a, ShouldDecrementDesiredCapacity=True)
    assert targets() == {b}, "deregistered as it starts leaving, before the terminate hook completes"
