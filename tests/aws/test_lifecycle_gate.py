"""The launch lifecycle gate "agent" (RINGFENCE_LIFECYCLE_GATE): compute publishes the new
instance's bundle and leaves the hook waiting; the instance's first heartbeat with a bundle applied
releases it (CONTINUE) — enforced before InService. Against the moto server, whose Auto Scaling
holds a launch in Pending:Wait until CompleteLifecycleAction (ringfence.local.moto_lifecycle)."""

from __future__ import annotations

import os
from collections.abc import Iterator

import pytest

from tests.aws.conftest import Env
from tests.aws.test_pipeline import boot, enroll_instance


@pytest.fixture
def gated(env: Env) -> Iterator[Env]:
    os.environ["RINGFENCE_LIFECYCLE_GATE"] = "agent"
    env.load_functions()  # cold start: the handlers read the setting
    try:
        yield env
    finally:
        os.environ.pop("RINGFENCE_LIFECYCLE_GATE", None)


def state(env: Env, iid: str) -> str:
    got = env.asg.describe_auto_scaling_instances(InstanceIds=[iid])["AutoScalingInstances"]
    return str(got[0]["LifecycleState"]) if got else "gone"


def heartbeat(env: Env, wid: str, token: str, applied: int | None) -> None:
    body = {"applied_version": applied, "mode": "enforce" if applied is not None else None, "healthy": True}
    status, _, answer = env.rest(
        "agentapi", "POST", f"/v1/agents/{wid}/heartbeat", body, headers={"Authorization": f"Bearer {token}"}
    )
    assert status == 200, answer


def test_a_launch_waits_for_its_agent_to_enforce(gated: Env) -> None:
    env = gated
    boot(env)
    env.asg.put_lifecycle_hook(
        LifecycleHookName="rf-hook",
        AutoScalingGroupName="rf-web-asg",
        LifecycleTransition="autoscaling:EC2_INSTANCE_LAUNCHING",
        HeartbeatTimeout=300,
        DefaultResult="ABANDON",
    )
    env.asg.set_desired_capacity(AutoScalingGroupName="rf-web-asg", DesiredCapacity=1)
    new = env.asg_instances()[0]
    assert state(env, new) == "Pending:Wait"
    env.put(env.lifecycle_event(new, launching=True))
    env.pump()
    ptr = env.store.bundle_pointer(new)
    assert ptr is not None, "compute published the new instance's bundle"
    assert state(env, new) == "Pending:Wait", "published is not enforced: the hook still waits"
    token = enroll_instance(env, new)
    heartbeat(env, new, token, None)  # enrolled, nothing applied yet
    assert state(env, new) == "Pending:Wait"
    heartbeat(env, new, token, ptr.version)  # its agent enforces
    assert state(env, new) == "InService"
    heartbeat(env, new, token, ptr.version)  # later heartbeats ask nothing more
