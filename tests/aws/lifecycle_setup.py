"""An Auto Scaling group with two launch hooks, scaled out by one, over the moto server: Auto
Scaling holds the new instance in Pending:Wait until each hook's action is completed (each with its
own token; ringfence.local.moto_lifecycle). Shared by the lifecycle tests."""

from __future__ import annotations

import json
import os
import uuid
from typing import Any

from tests.aws.conftest import Env
from tests.aws.test_pipeline import boot

GROUP = "rf-web-asg"


def pending(env: Env, iid: str) -> dict[str, str]:
    """Hook name → token of the actions Auto Scaling (moto) waits on for ``iid``."""
    return {a.hook_name: a.token for a in env.aws.lifecycle_actions() if a.instance_id == iid}


def scale_out_with_launch_hooks(env: Env, hooks: tuple[str, ...]) -> tuple[str, dict[str, str]]:
    """The estate booted, ``hooks`` put on the web group as launch hooks (ABANDON after 300 s), the
    group scaled out by one: its new instance and, per hook, the token Auto Scaling waits on."""
    boot(env)
    for hook in hooks:
        env.asg.put_lifecycle_hook(
            LifecycleHookName=hook,
            AutoScalingGroupName=GROUP,
            LifecycleTransition="autoscaling:EC2_INSTANCE_LAUNCHING",
            HeartbeatTimeout=300,
            DefaultResult="ABANDON",
        )
    env.asg.set_desired_capacity(AutoScalingGroupName=GROUP, DesiredCapacity=1)
    (new,) = env.asg_instances(GROUP)
    tokens = pending(env, new)
    assert set(tokens) == set(hooks)
    return new, tokens


def launch_action(env: Env, iid: str, hook: str, token: str, **detail: Any) -> dict[str, Any]:
    """The launch lifecycle action event of ``hook`` for ``iid`` (an event id of its own), as
    Auto Scaling sends it to EventBridge."""
    ev = env.lifecycle_event(iid, launching=True)
    ev["id"] = str(uuid.uuid4())
    ev["detail"].update({"LifecycleHookName": hook, "LifecycleActionToken": token, **detail})
    return ev


def send_compute(env: Env, body: dict[str, Any]) -> None:
    """A message on compute's queue as its producers send one (a FIFO group of its own)."""
    env.sqs.send_message(
        QueueUrl=env.queues["compute"],
        MessageBody=json.dumps(body),
        MessageGroupId="compute",
        MessageDeduplicationId=os.urandom(8).hex(),
    )
