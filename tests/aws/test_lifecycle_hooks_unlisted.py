"""A Ringfence launch hook under a name not in LifecycleHookNames (an earlier deployment's: the docs
once said "whatever the hook's name"; the demo's was ringfence-enforce-before-inservice) is never
seen by the lifecycle rule, so with ABANDON every launch of its group is abandoned at its timeout.
The scheduled reconcile lists the gated groups' lifecycle hooks and reports such a hook on every run
(logged, counted LifecycleHooksUnlisted, alarmed): a launch hook that abandons, not listed, on a
gated group that has no launch hook that is. Another team's hook beside one of Ringfence's, a
CONTINUE hook and a group outside GatedGroupNames are not reported. Against the moto server through
the real reconcile handler."""

from __future__ import annotations

import logging
from typing import Any

import pytest

from tests.aws.conftest import Env, LambdaContext
from tests.aws.lifecycle_setup import GROUP, launch_action, pending, scale_out_with_launch_hooks
from tests.aws.test_function_iam import Recorder, refusals
from tests.aws.test_handler_metrics import emitted
from tests.aws.test_pipeline import _scheduled
from tests.aws.test_static import ROOT, hcl, template

OLD = "ringfence-enforce-before-inservice"  # the demo's hook before 46ba5e5 (not in the list)
OURS, THEIRS = "rf-hook", "team-bootstrap-hook"  # tests/conftest.py lists rf-hook as Ringfence's


def _reconcile(env: Env, capsys: pytest.CaptureFixture[str]) -> tuple[dict[str, Any], dict[str, float]]:
    capsys.readouterr()
    out = env.fn["reconcile"].handler(_scheduled(), LambdaContext())
    return out, emitted(capsys.readouterr().out)


def _hook(name: str, result: str, transition: str = "autoscaling:EC2_INSTANCE_LAUNCHING") -> dict[str, Any]:
    return {
        "LifecycleHookName": name,
        "AutoScalingGroupName": GROUP,
        "LifecycleTransition": transition,
        "HeartbeatTimeout": 300,
        "DefaultResult": result,
    }


def test_a_ringfence_hook_under_an_unlisted_name_is_reported_on_every_run(
    env: Env, capsys: pytest.CaptureFixture[str], caplog: pytest.LogCaptureFixture
) -> None:
    new, tokens = scale_out_with_launch_hooks(env, (OLD,))
    # what the reviewer saw: the rule drops its action, nothing counts it, the launch waits to be abandoned
    env.put(launch_action(env, new, OLD, tokens[OLD]))
    assert env.count("lifecycle") == 0
    env.pump()
    assert pending(env, new) == {OLD: tokens[OLD]}
    where = f"{env.aws.account}/{env.aws.region}"
    rec = Recorder(env)
    for _ in range(2):  # once per run, each run
        with caplog.at_level(logging.ERROR, logger="ringfence.clouds.aws.reconcile"):
            caplog.clear()
            out, m = _reconcile(env, capsys)
        assert out["hooks_unlisted"] == [f"{where}/{GROUP}/{OLD}"] and out["hooks_unchecked"] == []
        assert m.get("LifecycleHooksUnlisted") == 1 and "LifecycleHooksUnchecked" not in m
        assert caplog.text.count(f"lifecycle hook {OLD} of {GROUP} ({where}) holds every launch") == 1
        assert "add ringfence-enforce-before-inservice to LifecycleHookNames" in caplog.text
    # the two reads are granted to reconcile in both deployments (and only there: test_lifecycle_gate)
    calls = {a for a, _ in rec.other.get("reconcile", [])}
    assert {"autoscaling:DescribeAutoScalingGroups", "autoscaling:DescribeLifecycleHooks"} <= calls
    assert not refusals(rec, ["reconcile"])


def test_listed_names_another_teams_hook_beside_ours_continue_hooks_and_ungated_groups_are_not_reported(
    env: Env, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    scale_out_with_launch_hooks(env, (OURS, THEIRS))
    out, m = _reconcile(env, capsys)
    assert out["hooks_unlisted"] == [] and "LifecycleHooksUnlisted" not in m, "the two-owners case of 46ba5e5"
    # without a listed launch hook, a CONTINUE hook (delays, never abandons) and a terminate hook
    # (ends in termination either way) are not reported; the ABANDON launch hook is
    env.asg.delete_lifecycle_hook(LifecycleHookName=OURS, AutoScalingGroupName=GROUP)
    env.asg.put_lifecycle_hook(**_hook("team-warmup", "CONTINUE"))
    env.asg.put_lifecycle_hook(**_hook(OLD, "ABANDON", "autoscaling:EC2_INSTANCE_TERMINATING"))
    out, m = _reconcile(env, capsys)
    assert out["hooks_unlisted"] == [f"{env.aws.account}/{env.aws.region}/{GROUP}/{THEIRS}"]
    assert m.get("LifecycleHooksUnlisted") == 1
    # a group outside GatedGroupNames is not Ringfence's to gate: the operator's way to say so
    monkeypatch.setenv("RINGFENCE_GATED_GROUP_NAMES", "ord-*")
    out, m = _reconcile(env, capsys)
    assert out["hooks_unlisted"] == [] and "LifecycleHooksUnlisted" not in m
    monkeypatch.setenv("RINGFENCE_GATED_GROUP_NAMES", "rf-web-??g")  # IAM's ? is one character
    assert _reconcile(env, capsys)[0]["hooks_unlisted"] != []


def test_hooks_that_cannot_be_listed_leave_the_run_whole(
    env: Env, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    """A member role not given the two reads yet: logged and counted; the target still converges."""
    scale_out_with_launch_hooks(env, (OLD,))

    def refuse(**_: Any) -> None:
        raise RuntimeError("AccessDenied: autoscaling:DescribeLifecycleHooks")

    env.hook("before-call.auto-scaling.DescribeLifecycleHooks", refuse)
    out, m = _reconcile(env, capsys)
    assert out["hooks_unchecked"] == [f"{env.aws.account}/{env.aws.region}"] and out["hooks_unlisted"] == []
    assert m.get("LifecycleHooksUnchecked") == 1 and out["failed"] == [] and out["seen"] > 0


def test_reconcile_is_given_the_hook_names_and_gated_groups_and_the_alarm_in_both_deployments() -> None:
    doc = template()
    sam_env = doc["Resources"]["ReconcileFunction"]["Properties"]["Environment"]["Variables"]
    assert sam_env["RINGFENCE_LIFECYCLE_HOOK_NAMES"] == {"Join": [",", {"Ref": "LifecycleHookNames"}]}
    assert sam_env["RINGFENCE_GATED_GROUP_NAMES"] == {"Ref": "GatedGroupNames"}
    fns = {k: v for b in hcl(ROOT / "infra/modules/ringfence/lambda.tf")["locals"] for k, v in b.items()}["functions"]
    tf_env = fns["reconcile"]["env"]
    assert tf_env["RINGFENCE_LIFECYCLE_HOOK_NAMES"] == '${join(",", var.lifecycle_hook_names)}'
    assert tf_env["RINGFENCE_GATED_GROUP_NAMES"] == "${var.gated_group_names}"
    assert doc["Resources"]["LifecycleHooksUnlistedAlarm"]["Properties"]["MetricName"] == "LifecycleHooksUnlisted"
    alarms = {k: v for b in hcl(ROOT / "infra/modules/ringfence/alarms.tf")["locals"] for k, v in b.items()}["alarms"]
    assert alarms["lifecycle-unlisted"]["metric"] == "LifecycleHooksUnlisted"
