"""Ringfence completes its own lifecycle hooks only (LifecycleHookNames, RINGFENCE_LIFECYCLE_HOOK_NAMES).
A gated group may carry another team's launch hook too (a bootstrap step, a log drain), which its
owner completes when its step is done: Ringfence's rule does not pass that hook's actions, and one
that reaches the lifecycle or compute function anyway (an older rule without the filter, an earlier
version's hand-off or launch hold, a redrive) is neither held nor completed, only logged and counted
(LifecycleActionsNotOurs). Against the moto server through the real handlers; what Auto Scaling
still waits on is read from moto (ringfence.local.moto_lifecycle), not from Ringfence's store."""

from __future__ import annotations

import json
import logging
import re
import time
from typing import Any

import pytest

from tests.aws.conftest import Env
from tests.aws.lifecycle_setup import GROUP, launch_action, pending, scale_out_with_launch_hooks, send_compute
from tests.aws.test_handler_metrics import emitted
from tests.aws.test_lifecycle_gate import Calls, agent_enforces, heartbeat, state
from tests.aws.test_pipeline import enroll_instance
from tests.aws.test_static import ROOT, SAM_HOOK_NAMES, TF_HOOK_NAMES, hcl, template

OURS, THEIRS = "rf-hook", "team-bootstrap-hook"  # tests/conftest.py names rf-hook Ringfence's, not the other


def _theirs_completes_its_own(env: Env, iid: str, token: str) -> None:
    """The other team's step is done: it completes its action itself (moto refuses an action
    that is not pending), and only then does the instance go InService."""
    assert state(env, iid) == "Pending:Wait"
    env.asg.complete_lifecycle_action(
        LifecycleHookName=THEIRS,
        AutoScalingGroupName=GROUP,
        LifecycleActionToken=token,
        LifecycleActionResult="CONTINUE",
        InstanceId=iid,
    )
    assert not pending(env, iid) and state(env, iid) == "InService"


def test_ours_is_completed_and_another_teams_hook_is_left_to_its_owner(env: Env) -> None:
    new, tokens = scale_out_with_launch_hooks(env, (OURS, THEIRS))
    for hook, tok in tokens.items():
        env.put(launch_action(env, new, hook, tok))
    assert env.count("lifecycle") == 1, "the rule passes Ringfence's hook only"
    calls = Calls(env)
    env.pump()
    assert calls.ops.count("CompleteLifecycleAction") == 1
    assert pending(env, new) == {THEIRS: tokens[THEIRS]}, "the other team's action is still pending"
    hooks = env.asg.describe_lifecycle_hooks(AutoScalingGroupName=GROUP)["LifecycleHooks"]
    assert {h["LifecycleHookName"] for h in hooks} == {OURS, THEIRS}
    _theirs_completes_its_own(env, new, tokens[THEIRS])


def test_another_hooks_action_delivered_anyway_is_neither_held_nor_completed(
    gated: Env,
    capsys: pytest.CaptureFixture[str],
    caplog: pytest.LogCaptureFixture,
) -> None:
    """An older rule without the hook filter still routes every action of the group to the
    lifecycle queue: the lifecycle function drops the other hook's, once, counted; under the gate
    "agent" it is not held either, so the agent's report releases Ringfence's action alone."""
    env = gated
    old_rule = "rf-lifecycle-before-hook-names"
    env.events.put_rule(
        Name=old_rule,
        EventPattern=json.dumps(
            {
                "source": ["aws.autoscaling"],
                "detail-type": ["EC2 Instance-launch Lifecycle Action", "EC2 Instance-terminate Lifecycle Action"],
            }
        ),
    )
    env.events.put_targets(
        Rule=old_rule,
        Targets=[
            {
                "Id": "lifecycle",
                "Arn": env.aws.queue_arn("lifecycle"),
                "InputTransformer": {"InputPathsMap": {}, "InputTemplate": "<aws.events.event.json>"},
            }
        ],
    )
    new, tokens = scale_out_with_launch_hooks(env, (OURS, THEIRS))
    env.put(launch_action(env, new, THEIRS, tokens[THEIRS]))
    assert env.count("lifecycle") == 1, "the old rule delivered the other team's action"
    env.put(launch_action(env, new, OURS, tokens[OURS]))
    calls = Calls(env)
    capsys.readouterr()
    with caplog.at_level(logging.WARNING, logger="ringfence.aws"):
        env.pump()
    assert emitted(capsys.readouterr().out).get("LifecycleActionsNotOurs") == 1
    assert caplog.text.count(f"hook {THEIRS} of {GROUP} is not Ringfence's") == 1, "logged once"
    hold = env.store.launch_hold(new)
    assert hold is not None and list(hold.actions) == [tokens[OURS]], "the other hook's action is not held"
    agent_enforces(env, new)
    env.drain("compute", "compute")
    assert calls.ops.count("CompleteLifecycleAction") == 1
    assert pending(env, new) == {THEIRS: tokens[THEIRS]}
    _theirs_completes_its_own(env, new, tokens[THEIRS])


def test_another_hooks_action_handed_to_compute_is_not_completed(env: Env, capsys: pytest.CaptureFixture[str]) -> None:
    """A hand-off an earlier version queued for compute (or a compute DLQ redrive) carries the
    other hook's action: compute, which alone may complete it, does not."""
    new, tokens = scale_out_with_launch_hooks(env, (OURS, THEIRS))
    env.put(launch_action(env, new, OURS, tokens[OURS]))
    env.pump()
    assert pending(env, new) == {THEIRS: tokens[THEIRS]}
    calls = Calls(env)
    capsys.readouterr()
    theirs = {
        "hook_name": THEIRS,
        "group_name": GROUP,
        "token": tokens[THEIRS],
        "instance_id": new,
        "transition": "autoscaling:EC2_INSTANCE_LAUNCHING",
        "account": env.aws.account,
        "region": env.aws.region,
        "perimeter_at": time.time(),
    }
    send_compute(env, {"ids": [new], "lifecycle": theirs})
    env.drain("compute", "compute")
    m = emitted(capsys.readouterr().out)
    assert "CompleteLifecycleAction" not in calls.ops
    assert m.get("LifecycleActionsNotOurs") == 1 and m.get("LifecycleLeftToTimeout", 0) == 0
    assert pending(env, new) == {THEIRS: tokens[THEIRS]}
    _theirs_completes_its_own(env, new, tokens[THEIRS])


def test_another_hooks_action_an_earlier_version_held_is_not_released(
    gated: Env,
    capsys: pytest.CaptureFixture[str],
) -> None:
    """Under the gate "agent" an earlier version held every hook's action in the launch hold:
    the agent's report releases Ringfence's and settles the other's without completing it."""
    env = gated
    new, tokens = scale_out_with_launch_hooks(env, (OURS, THEIRS))
    env.put(launch_action(env, new, OURS, tokens[OURS]))
    env.pump()
    lc = {"hook_name": THEIRS, "group_name": GROUP, "token": tokens[THEIRS], "instance_id": new}
    lc |= {"transition": "autoscaling:EC2_INSTANCE_LAUNCHING", "account": env.aws.account, "region": env.aws.region}
    env.store.hold_launch_action(new, lc, perimeter_at=time.time(), perimeter="attached")  # as it was written
    calls = Calls(env)
    capsys.readouterr()
    heartbeat(env, new, enroll_instance(env, new), env.store.bundle_pointer(new).version)  # type: ignore[union-attr]
    env.drain("compute", "compute")
    assert emitted(capsys.readouterr().out).get("LifecycleActionsNotOurs") == 1
    assert calls.ops.count("CompleteLifecycleAction") == 1, "Ringfence's own action only"
    assert pending(env, new) == {THEIRS: tokens[THEIRS]}
    hold = env.store.launch_hold(new)
    assert hold is not None and not hold.pending(), "settled: a later report does not try it again"
    assert (hold.actions[tokens[THEIRS]].outcome or "").startswith("not completed")
    _theirs_completes_its_own(env, new, tokens[THEIRS])


def test_the_lifecycle_rule_and_functions_take_the_same_hook_names_in_both_deployments() -> None:
    """SAM and Terraform filter the lifecycle rule on the hook names the lifecycle and compute
    functions are given, with the same default, the library's (the name docs/deploy-aws.md has
    users give their hooks)."""
    from ringfence.control.wiring import DEFAULT_LIFECYCLE_HOOK_NAMES, Config

    doc = template()
    rule = doc["Resources"]["AsgLifecycleRule"]["Properties"]["EventPattern"]
    assert rule["detail"] == {"LifecycleHookName": SAM_HOOK_NAMES}
    param = doc["Parameters"]["LifecycleHookNames"]
    assert param["Type"] == "CommaDelimitedList"
    assert param["Default"].split(",") == list(DEFAULT_LIFECYCLE_HOOK_NAMES)
    for fn in ("LifecycleFunction", "ComputeFunction"):
        env = doc["Resources"][fn]["Properties"]["Environment"]["Variables"]
        assert env["RINGFENCE_LIFECYCLE_HOOK_NAMES"] == {"Join": [",", SAM_HOOK_NAMES]}, fn

    def tf(name: str) -> dict[str, Any]:
        return hcl(ROOT / "infra/modules/ringfence" / name)

    rules = {k: v for block in tf("main.tf")["locals"] for k, v in block.items()}["lifecycle_rules"]
    assert rules["asg-lifecycle"]["detail"] == {"LifecycleHookName": TF_HOOK_NAMES}
    (var,) = [v["lifecycle_hook_names"] for v in tf("variables.tf")["variable"] if "lifecycle_hook_names" in v]
    assert var["default"] == list(DEFAULT_LIFECYCLE_HOOK_NAMES)
    fns = {k: v for block in tf("lambda.tf")["locals"] for k, v in block.items()}["functions"]
    for fn in ("lifecycle", "compute"):
        assert fns[fn]["env"]["RINGFENCE_LIFECYCLE_HOOK_NAMES"] == '${join(",", var.lifecycle_hook_names)}', fn
    # what the functions make of it: the names, in order; none at all is no name (not a failure:
    # test_no_hook_names_stop_lifecycle_completion_only)
    got = Config.from_env({"RINGFENCE_LIFECYCLE_HOOK_NAMES": "a-hook, b/hook"}).lifecycle_hook_names
    assert got == ["a-hook", "b/hook"]
    assert Config.from_env({}).lifecycle_hook_names == list(DEFAULT_LIFECYCLE_HOOK_NAMES)
    assert Config.from_env({"RINGFENCE_LIFECYCLE_HOOK_NAMES": " , "}).lifecycle_hook_names == []


def _sam_refuses(value: str) -> bool:
    """Whether CloudFormation refuses ``LifecycleHookNames=value``: a CommaDelimitedList is the
    value split at commas ("" is [""]); AllowedPattern must match each element, and each Rules
    assertion naming the parameter must hold (the two functions they use, evaluated here)."""
    doc = template()
    param = doc["Parameters"]["LifecycleHookNames"]
    names = value.split(",")
    if not all(re.fullmatch(param["AllowedPattern"], n) for n in names):
        return True

    def ev(x: Any) -> Any:
        if isinstance(x, dict) and "Not" in x:
            return not ev(x["Not"][0])
        if isinstance(x, dict) and "Contains" in x:
            return ev(x["Contains"][1]) in ev(x["Contains"][0])
        if x == {"Ref": "LifecycleHookNames"}:
            return names
        assert isinstance(x, str), x
        return x

    rules = [r for r in doc["Rules"].values() if "LifecycleHookNames" in json.dumps(r)]
    assert rules and not any("RuleCondition" in r for r in rules), "asserted whatever else is set"
    return not all(ev(a["Assert"]) for r in rules for a in r["Assertions"])


def test_an_empty_hook_list_is_refused_by_sam_as_by_terraform() -> None:
    """SAM took LifecycleHookNames="" (review r3 F3) where Terraform's validation refuses it: now
    the same names pass and fail in both (the parameter's pattern is Terraform's regex)."""
    (var,) = [
        v["lifecycle_hook_names"]
        for v in hcl(ROOT / "infra/modules/ringfence/variables.tf")["variable"]
        if "lifecycle_hook_names" in v
    ]
    condition = var["validation"][0]["condition"]
    tf_regex = re.search(r'regex\("(.+?)", n\)', condition)
    assert tf_regex and "length(var.lifecycle_hook_names) > 0" in condition
    assert template()["Parameters"]["LifecycleHookNames"]["AllowedPattern"] == tf_regex[1]

    def tf_refuses(value: str) -> bool:  # Terraform's list is SAM's value split at commas
        names = value.split(",") if value else []
        return not (names and all(re.fullmatch(tf_regex[1], n) for n in names))

    for value in ("", ",", "a,,b", "ringfence-launch,", "has space", "x" * 256):
        assert _sam_refuses(value) and tf_refuses(value), value
    for value in ("ringfence-launch,ringfence-terminate", "a/b_c-1", "x" * 255):
        assert not _sam_refuses(value) and not tf_refuses(value), value


def test_no_hook_names_stop_lifecycle_completion_only(
    env: Env, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str], caplog: pytest.LogCaptureFixture
) -> None:
    """RINGFENCE_LIFECYCLE_HOOK_NAMES empty (what SAM gave the functions for LifecycleHookNames=""
    before the rule above; a hand edit): compute used to fail every batch at its configuration, so
    no bundle was ever published and every launch was abandoned. Now only completion stops: the
    batch publishes, the launch action is not completed, logged and counted LifecycleLeftToTimeout
    (alarmed), and no batch fails. The real lifecycle and compute handlers, fresh containers."""
    new, tokens = scale_out_with_launch_hooks(env, (OURS,))
    monkeypatch.setenv("RINGFENCE_LIFECYCLE_HOOK_NAMES", "")
    for fn in ("lifecycle", "compute"):
        env.fn[fn]._svc.clear()  # fresh containers: each builds its service on its first batch
    env.put(launch_action(env, new, OURS, tokens[OURS]))
    env.put(env.state_event(new, "running"))
    calls = Calls(env)
    capsys.readouterr()
    with caplog.at_level(logging.ERROR, logger="ringfence.aws"):
        env.pump()
    m = emitted(capsys.readouterr().out)
    assert "ComputeFailures" not in m and m.get("BundlesPublished", 0) >= 1, m
    assert env.store.bundle_pointer(new) is not None, "the new instance's bundle is published"
    assert env.count("compute") == 0 and env.count("compute_dlq") == 0
    assert "CompleteLifecycleAction" not in calls.ops and pending(env, new) == {OURS: tokens[OURS]}
    assert m.get("LifecycleLeftToTimeout") == 1
    assert f"RINGFENCE_LIFECYCLE_HOOK_NAMES names no hook; NOT completing — the hook {OURS}" in caplog.text
