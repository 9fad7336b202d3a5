"""A new workload whose FIRST bundle job the publish worker refuses is rendered again.

The refusal (a staged job queued by the release before ``staged_sha256`` existed, or a staged copy
replaced in the bucket) leaves the workload with compute's pending mark and no bundle pointer. Its
agent's heartbeat, once that mark is ``PENDING_STALE_S`` old, asks compute to render it again
(the same stale-mark repair a workload with a previous bundle gets): the fresh job is published and
the agent gets its bundle. Before, the stale check needed a pointer, so such an agent got 404 on
every request until an unrelated change re-rendered the workload. Real compute, publish and agent
API handlers over moto server."""

from __future__ import annotations

import json
from typing import Any

import pytest

from .conftest import Env, LambdaContext
from .test_fanout import _message
from .test_lifecycle_gate import heartbeat
from .test_pipeline import boot, enroll_instance


@pytest.mark.parametrize("refusal", ["job-of-previous-release", "staged-copy-replaced"])
def test_first_bundle_refused_is_rendered_again_once_its_mark_is_stale(
    env: Env, monkeypatch: Any, refusal: str
) -> None:
    from ringfence.control import agents as agents_mod
    from ringfence.control import compute as compute_mod

    est = boot(env)
    monkeypatch.setattr(compute_mod, "MESSAGE_BUDGET", 100)  # every bundle staged, as a big estate's are
    new = est["run"]("web", est["subnets"]["web"], 1)[0]
    env.put(env.state_event(new, "running"))
    env.drain("ingest", "ingest")
    env.drain("perimeter", "perimeter")
    env._drain("compute", "compute")  # compute stages the new workload's first bundle, queues the job
    msgs = env.receive("publish")
    jobs = [json.loads(m["Body"]) for m in msgs]
    mine = [j for j in jobs if any(b["workload_id"] == new for b in j["bundles"])]
    assert len(mine) == 1, jobs
    for m in msgs:
        env.sqs.delete_message(QueueUrl=env.queues["publish"], ReceiptHandle=m["ReceiptHandle"])
    (job,) = [b for b in mine[0]["bundles"] if b["workload_id"] == new]
    real = json.loads(env.s3.get_object(Bucket=env.bucket, Key=job["staged"])["Body"].read())
    if refusal == "job-of-previous-release":
        for b in mine[0]["bundles"]:
            b.pop("staged_sha256", None)  # the job as the previous release's compute queued it
    else:  # whoever may write the bucket swaps the staged copy (same workload, version, digest)
        forged = dict(real, mode="idle")
        env.s3.put_object(Bucket=env.bucket, Key=job["staged"], Body=json.dumps(forged).encode())
    for _ in range(3):  # refused on every retry, then PublishDLQ
        out = env.fn["publish"].handler(
            env.sqs_event([_message(mine[0])], env.aws.queue_arn("publish")), LambdaContext()
        )
        assert len(out["batchItemFailures"]) == 1
    assert env.store.bundle_pointer(new) is None  # nothing published: only compute's mark
    assert env.store.bundle_pending(new) is not None

    token = enroll_instance(env, new)  # the agent comes up and enrolls
    auth = {"Authorization": f"Bearer {token}"}
    before = env.count("compute")
    heartbeat(env, new, token, None)  # the mark is fresh: its job may still be on its way
    assert env.count("compute") == before
    status, _, _ = env.rest("agentapi", "GET", f"/v1/agents/{new}/bundle", headers=auth)
    assert status == 404

    monkeypatch.setattr(agents_mod, "PENDING_STALE_S", 0.0)  # as if 15 minutes and more went by
    heartbeat(env, new, token, None)
    assert env.count("compute") == before + 1  # the heartbeat asked compute to render it again
    env.drain("compute", "compute")  # re-rendered, staged afresh with its hash, published

    ptr = env.store.bundle_pointer(new)
    assert ptr is not None and ptr.version == job["version"]
    status, _, body = env.rest("agentapi", "GET", f"/v1/agents/{new}/bundle", headers=auth)
    assert status == 200, body
    got = env.bundle(new)  # verified against the signing key: compute's render, not the forged copy
    assert got.version == job["version"] and got.mode.value == real["mode"] != "idle"
    assert env.count("publish") == 0


def test_a_terminating_workload_whose_mark_is_stale_does_not_ask_compute_at_every_heartbeat(
    env: Env, monkeypatch: Any
) -> None:
    """Compute renders only active workloads (pending, running): a terminating one (held by its
    terminate hook, its agent still up and holding its token) is out of the engine, so a render
    asked for it renders nothing and renews no mark. Its stale mark (a refused first bundle here)
    would have every heartbeat of the Terminating:Wait ask compute again, for nothing."""
    from ringfence.control import agents as agents_mod
    from ringfence.control import compute as compute_mod

    boot(env)
    monkeypatch.setattr(compute_mod, "MESSAGE_BUDGET", 100)  # every bundle staged
    env.asg.put_lifecycle_hook(
        AutoScalingGroupName="rf-web-asg",
        LifecycleHookName="rf-leave",
        LifecycleTransition="autoscaling:EC2_INSTANCE_TERMINATING",
        HeartbeatTimeout=300,
        DefaultResult="CONTINUE",
    )
    env.asg.set_desired_capacity(AutoScalingGroupName="rf-web-asg", DesiredCapacity=1)
    (web,) = env.asg_instances()
    env.put(env.state_event(web, "running"))
    env.drain("ingest", "ingest")
    env.drain("perimeter", "perimeter")
    env._drain("compute", "compute")  # its first bundle staged, the job queued
    msgs = env.receive("publish")
    mine = [json.loads(m["Body"]) for m in msgs]
    mine = [j for j in mine if any(b["workload_id"] == web for b in j["bundles"])]
    assert len(mine) == 1
    for m in msgs:
        env.sqs.delete_message(QueueUrl=env.queues["publish"], ReceiptHandle=m["ReceiptHandle"])
    for b in mine[0]["bundles"]:
        b.pop("staged_sha256", None)  # refused on every retry: only compute's mark stays
    for _ in range(3):
        env.fn["publish"].handler(env.sqs_event([_message(mine[0])], env.aws.queue_arn("publish")), LambdaContext())
    assert env.store.bundle_pointer(web) is None and env.store.bundle_pending(web) is not None
    token = enroll_instance(env, web)

    # scale-in: Auto Scaling terminates it, its terminate hook holds it (the agent runs on)
    env.asg.terminate_instance_in_auto_scaling_group(InstanceId=web, ShouldDecrementDesiredCapacity=True)
    env.put(env.lifecycle_event(web, launching=False))
    env.pump()
    assert env.store.get(web).state == "terminating"

    monkeypatch.setattr(agents_mod, "PENDING_STALE_S", 0.0)  # the mark long stale
    assert env.count("compute") == 0
    asked = 0
    for _ in range(3):
        heartbeat(env, web, token, None)  # accepted: a terminating workload keeps its token
        asked += env.count("compute")
        env.drain("compute", "compute")  # a render asked for it would renew no mark
    assert asked == 0
    assert env.store.get(web).state == "terminating"
    assert env.store.bundle_pointer(web) is None  # nothing rendered for it, as before
