"""Issue 10, control plane: a terminate lifecycle action, a stale ``terminating`` and a tag-set
version are not taken on a message's word. Against the moto server, through the real handlers.

Whoever can put one message on the lifecycle or ingest queue (the queue policies now refuse
every sender but the stack's rules: tests/aws/test_queue_policies.py) used to drop a running
database from every peer set, for good."""

from __future__ import annotations

import json
import uuid
from typing import Any

from ringfence.store.base import InventoryRecord
from tests.aws.conftest import Env, ip_of
from tests.aws.test_pipeline import _ctx, _scheduled, boot, in_set

HOOK = {
    "LifecycleTransition": "autoscaling:EC2_INSTANCE_TERMINATING",
    "HeartbeatTimeout": 300,
    "DefaultResult": "CONTINUE",
}


def forged_terminate(env: Env, iid: str, group: str = "rf-web-asg") -> dict[str, Any]:
    ev = env.lifecycle_event(iid, launching=False)
    ev["id"] = str(uuid.uuid4())
    ev["detail"]["AutoScalingGroupName"] = group
    return ev


def send_raw(env: Env, queue: str, event: dict[str, Any]) -> None:
    """The attacker's way in: a message straight onto the queue, no EventBridge rule involved."""
    env.sqs.send_message(QueueUrl=env.queues[queue], MessageBody=json.dumps(event))


def refusals(env: Env) -> list[Any]:
    return [r for r in env.store.audit_log() if r.action == "workload.terminate-refused"]


def test_attack_forged_terminate_leaves_a_running_database_in_its_peers_sets(env: Env) -> None:
    est = boot(env)
    db, proc = est["ids"]["db"][0], est["ids"]["proc"][0]
    assert in_set(env.bundle(proc), ip_of(env, db))
    version = env.bundle(proc).version
    # through both queues a terminate action can arrive on
    send_raw(env, "lifecycle", forged_terminate(env, db))
    send_raw(env, "ingest", forged_terminate(env, db))
    completions: list[str] = []
    env.hook("before-call.auto-scaling.CompleteLifecycleAction", lambda **kw: completions.append("x"))
    env.pump()
    assert env.store.get(db).state == "running"
    assert in_set(env.bundle(proc), ip_of(env, db)) and env.bundle(proc).version == version
    assert completions == [], "a forged action is not completed either"
    refused = refusals(env)
    assert [r.target for r in refused] == [db, db]
    assert refused[0].reason == "Auto Scaling is not terminating it"


def test_attack_terminate_named_for_another_group_is_refused(env: Env) -> None:
    est = boot(env)
    env.asg.put_lifecycle_hook(AutoScalingGroupName="rf-web-asg", LifecycleHookName="rf-leave", **HOOK)
    env.asg.set_desired_capacity(AutoScalingGroupName="rf-web-asg", DesiredCapacity=1)
    (web,) = env.asg_instances()
    env.put(env.state_event(web, "running"))
    env.pump()
    env.asg.terminate_instance_in_auto_scaling_group(InstanceId=web, ShouldDecrementDesiredCapacity=True)
    # Auto Scaling does terminate it, but the message claims a group it is not in
    send_raw(env, "lifecycle", forged_terminate(env, web, group="rf-db-asg"))
    env.pump()
    assert env.store.get(web).state == "running"
    assert refusals(env)[0].reason == "Auto Scaling terminates it in rf-web-asg, not rf-db-asg"
    # the real action (its own group) is confirmed: the instance leaves its peers' sets
    env.put(env.lifecycle_event(web, launching=False))
    env.pump()
    assert env.store.get(web).state == "terminating"
    assert not in_set(env.bundle(est["ids"]["proc"][0]), ip_of(env, web))


def test_reconcile_clears_a_stale_terminating(env: Env) -> None:
    est = boot(env)
    db, proc = est["ids"]["db"][0], est["ids"]["proc"][0]
    # as a forged action left it before this fix (or an action Auto Scaling abandoned)
    old: InventoryRecord = env.store.get(db)
    # (observed just after the last observation, as mark_leaving does: a later reconcile is newer)
    env.store.observe(old.model_copy(update={"state": "terminating", "observed_at": old.observed_at + 0.001}))
    env.sqs.send_message(
        QueueUrl=env.queues["compute"],
        MessageBody=json.dumps({"ids": [db], "rebuild": False, "lifecycle": None, "publish": []}),
        MessageGroupId="compute",
        MessageDeduplicationId=uuid.uuid4().hex,
    )
    env.drain("compute", "compute")
    assert not in_set(env.bundle(proc), ip_of(env, db))
    # a plain observation keeps it (that is what holds a real Terminating:Wait)
    env.put(env.state_event(db, "running"))
    env.pump()
    assert env.store.get(db).state == "terminating"
    out = env.fn["reconcile"].handler(_scheduled(), _ctx())
    assert out["restored"] == [db]
    env.pump()
    assert env.store.get(db).state == "running"
    assert in_set(env.bundle(proc), ip_of(env, db))


def test_reconcile_keeps_terminating_while_auto_scaling_terminates(env: Env) -> None:
    boot(env)
    env.asg.put_lifecycle_hook(AutoScalingGroupName="rf-web-asg", LifecycleHookName="rf-leave", **HOOK)
    env.asg.set_desired_capacity(AutoScalingGroupName="rf-web-asg", DesiredCapacity=1)
    (web,) = env.asg_instances()
    env.put(env.state_event(web, "running"))
    env.pump()
    env.asg.terminate_instance_in_auto_scaling_group(InstanceId=web, ShouldDecrementDesiredCapacity=True)
    env.put(env.lifecycle_event(web, launching=False))
    env.pump()
    out = env.fn["reconcile"].handler(_scheduled(), _ctx())
    assert out["restored"] == []
    assert env.store.get(web).state == "terminating"


def test_attack_huge_tag_version_does_not_lock_out_later_changes(env: Env) -> None:
    est = boot(env)
    web = est["ids"]["web"][0]
    forged = env.tag_event(web, {"role": "web", "app": "ordering", "env": "prod"}, version=2**62)
    forged["id"] = str(uuid.uuid4())
    send_raw(env, "ingest", forged)
    env.pump()
    # the tags on the event are the live ones, so its version may be recorded: it decides nothing
    env.ec2.create_tags(Resources=[web], Tags=[{"Key": "env", "Value": "dev"}])
    env.put(env.tag_event(web, {"role": "web", "app": "ordering", "env": "dev"}, version=7))
    env.pump()
    rec = env.store.get(web)
    assert rec.workload.tags["env"] == "dev", "the real change was taken in"


def test_a_tag_version_the_live_instance_does_not_carry_is_not_recorded(env: Env) -> None:
    est = boot(env)
    web = est["ids"]["web"][0]
    before = env.store.get(web).workload.tags
    forged = env.tag_event(web, {"role": "jumpbox", "app": "admin", "env": "shared"}, version=10**9)
    send_raw(env, "ingest", forged)
    env.pump()
    rec = env.store.get(web)
    assert rec.tag_version is None and rec.workload.tags == before
