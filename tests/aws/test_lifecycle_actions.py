"""Each lifecycle action is completed once, the one Auto Scaling waits on: a second launch action of
the same instance (a warm pool's, with a token of its own) is completed too; a copy of an action
(SQS delivers at least once; a retried batch hands its actions on again) is not completed twice,
whether it comes in the same batch or a later one; and a perimeter in dry run is recorded as such
in the hold. Against the moto server through the real handlers (ringfence.local.moto_lifecycle
holds an instance in Pending:Wait until every launch hook's action is completed)."""

from __future__ import annotations

import uuid

import pytest

from tests.aws.conftest import REGION, Env
from tests.aws.lifecycle_setup import launch_action, pending, scale_out_with_launch_hooks, send_compute
from tests.aws.test_handler_metrics import emitted
from tests.aws.test_lifecycle_gate import Calls, agent_enforces, heartbeat, launch, rf_groups_on_enis, state
from tests.aws.test_pipeline import boot, enroll_instance


def test_a_second_launch_action_of_the_same_instance_is_completed(gated: Env) -> None:
    """A warm pool sends EC2_INSTANCE_LAUNCHING when the instance enters the pool and again, with
    a new token, when it leaves it. Here the group has two launch hooks, so Auto Scaling holds the
    instance until both actions are completed; the second action reaches Ringfence only after the
    first was released (as a warm pool's does)."""
    env = gated
    second, tokens = scale_out_with_launch_hooks(env, ("rf-hook", "rf-hook-warm"))
    first = env.lifecycle_event(second, launching=True)
    first["detail"].update({"LifecycleActionToken": tokens["rf-hook"], "Destination": "WarmPool"})
    env.put(first)
    env.pump()
    agent_enforces(env, second)
    env.drain("compute", "compute")
    hold = env.store.launch_hold(second)
    assert hold is not None and hold.outcome == "continue" and hold.token == tokens["rf-hook"]
    assert set(pending(env, second)) == {"rf-hook-warm"} and state(env, second) == "Pending:Wait"

    calls = Calls(env)
    ev = launch_action(
        env, second, "rf-hook-warm", tokens["rf-hook-warm"], Origin="WarmPool", Destination="AutoScalingGroup"
    )
    env.put(ev)
    env.pump()  # its agent enforces already: the perimeter's hand-off releases it
    assert [c["instance"] for c in calls.completed] == [second]
    assert state(env, second) == "InService"
    hold = env.store.launch_hold(second)
    assert hold is not None and hold.token == tokens["rf-hook-warm"] and hold.outcome == "continue"
    assert hold.lifecycle is not None and hold.lifecycle["hook_name"] == "rf-hook-warm"
    # and that action's copy, later, completes nothing again
    env.put(ev)
    env.pump()
    assert len(calls.completed) == 1


def test_a_duplicated_action_in_one_batch_is_completed_once(gated: Env, capsys: pytest.CaptureFixture[str]) -> None:
    env = gated
    new = launch(env)
    env.drain("lifecycle", "lifecycle")
    env.drain("ingest", "ingest")
    env.drain("compute", "compute")
    agent_enforces(env, new)  # the agent first
    # the perimeter's message delivered twice (at least once): both copies hand the action on
    (m,) = env.receive("perimeter")
    env.sqs.send_message(QueueUrl=env.queues["perimeter"], MessageBody=m["Body"])
    env.sqs.change_message_visibility(
        QueueUrl=env.queues["perimeter"], ReceiptHandle=m["ReceiptHandle"], VisibilityTimeout=0
    )
    calls = Calls(env)
    capsys.readouterr()
    env.drain("perimeter", "perimeter")
    env.drain("compute", "compute")
    metrics = emitted(capsys.readouterr().out)
    assert calls.ops.count("CompleteLifecycleAction") == 1
    assert state(env, new) == "InService"
    assert env.store.launch_hold(new).outcome == "continue"  # type: ignore[union-attr]
    assert metrics.get("LifecycleLeftToTimeout", 0) == 0, "nothing failed: no alarm"


def test_a_copy_of_an_action_in_a_later_batch_is_not_completed_again(
    env: Env, capsys: pytest.CaptureFixture[str]
) -> None:
    """The lifecycle gate "publish" (the default): compute completes an action once the bundle is
    published. A copy handed on again later (a retried batch) finds it claimed."""
    new = launch(env)
    calls = Calls(env)
    env.pump()
    assert calls.ops.count("CompleteLifecycleAction") == 1 and state(env, new) == "InService"
    hold = env.store.launch_hold(new)
    assert hold is not None and hold.outcome == "continue" and hold.lifecycle is not None
    capsys.readouterr()
    send_compute(env, {"ids": [new], "lifecycle": {**hold.lifecycle, "perimeter_at": 1.0}})
    env.drain("compute", "compute")
    assert calls.ops.count("CompleteLifecycleAction") == 1, "the copy completes nothing"
    assert emitted(capsys.readouterr().out).get("LifecycleLeftToTimeout", 0) == 0
    assert env.store.launch_hold(new).outcome == "continue"  # type: ignore[union-attr]


def test_a_failed_completion_is_counted_and_never_overwrites_continue(
    env: Env, capsys: pytest.CaptureFixture[str]
) -> None:
    """An action Auto Scaling no longer holds (timed out, an unknown token) is counted
    LifecycleLeftToTimeout, the alarmed metric, under the default gate too."""
    (iid, *_) = boot(env)["ids"]["web"]
    capsys.readouterr()
    lc = {
        "hook_name": "rf-hook",
        "group_name": "rf-web-asg",
        "token": str(uuid.uuid4()),
        "instance_id": iid,
        "transition": "autoscaling:EC2_INSTANCE_LAUNCHING",
        "region": REGION,
    }
    send_compute(env, {"ids": [iid], "lifecycle": lc})
    env.drain("compute", "compute")
    assert emitted(capsys.readouterr().out).get("LifecycleLeftToTimeout") == 1
    hold = env.store.launch_hold(iid)
    assert hold is not None and (hold.outcome or "").startswith("not completed")


def test_a_perimeter_in_dry_run_is_recorded_as_dry_run(gated: Env, monkeypatch: pytest.MonkeyPatch) -> None:
    """PerimeterDryRun=true (the default): the perimeter attaches nothing and still hands launches
    on; the hold says "dry run", never "attached"."""
    env = gated
    monkeypatch.setenv("RINGFENCE_PERIMETER_DRY_RUN", "true")
    new = launch(env)
    env.pump()
    hold = env.store.launch_hold(new)
    assert hold is not None and hold.perimeter == "dry run"
    assert not any(rf_groups_on_enis(env, new).values())
    token = enroll_instance(env, new)
    heartbeat(env, new, token, env.store.bundle_pointer(new).version)  # type: ignore[union-attr]
    env.drain("compute", "compute")
    assert state(env, new) == "InService"
    hold = env.store.launch_hold(new)
    assert hold is not None and hold.perimeter == "dry run" and hold.outcome == "continue"
