"""The launch lifecycle gate "agent" (RINGFENCE_LIFECYCLE_GATE): a new instance goes InService only
once BOTH its perimeter groups are on every ENI and its agent enforces a bundle. The agent API
only records the agent's report (and tells compute through the compute queue); compute, the one
function with autoscaling:CompleteLifecycleAction, completes the action. Against the moto server,
whose Auto Scaling holds a launch in Pending:Wait until CompleteLifecycleAction
(ringfence.local.moto_lifecycle)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from tests.aws.conftest import Env
from tests.aws.lifecycle_setup import scale_out_with_launch_hooks, send_compute
from tests.aws.test_pipeline import enroll_instance
from tests.aws.test_static import hcl, template

ROOT = Path(__file__).resolve().parents[2]


def state(env: Env, iid: str) -> str:
    got = env.asg.describe_auto_scaling_instances(InstanceIds=[iid])["AutoScalingInstances"]
    return str(got[0]["LifecycleState"]) if got else "gone"


def heartbeat(env: Env, wid: str, token: str, applied: int | None) -> None:
    body = {"applied_version": applied, "mode": "enforce" if applied is not None else None, "healthy": True}
    status, _, answer = env.rest(
        "agentapi", "POST", f"/v1/agents/{wid}/heartbeat", body, headers={"Authorization": f"Bearer {token}"}
    )
    assert status == 200, answer


def agent_enforces(env: Env, iid: str) -> tuple[int, str]:
    """``iid``'s agent enrolled and reporting that it enforces the bundle compute published for
    it: that bundle's version and the agent's token."""
    ptr = env.store.bundle_pointer(iid)
    assert ptr is not None, "compute published the instance's bundle"
    token = enroll_instance(env, iid)
    heartbeat(env, iid, token, ptr.version)
    return ptr.version, token


def rf_groups_on_enis(env: Env, iid: str) -> dict[str, set[str]]:
    inst = env.ec2.describe_instances(InstanceIds=[iid])["Reservations"][0]["Instances"][0]
    return {
        n["NetworkInterfaceId"]: {g["GroupName"] for g in n["Groups"] if g["GroupName"].startswith("rf-")}
        for n in inst["NetworkInterfaces"]
    }


class Calls:
    """Every Auto Scaling call the control plane's session makes, and what was in place at each
    CompleteLifecycleAction (the call still goes to moto)."""

    def __init__(self, env: Env) -> None:
        self.env = env
        self.ops: list[str] = []
        self.completed: list[dict[str, Any]] = []
        env.hook("before-parameter-build.auto-scaling", self._seen)

    def _seen(self, model: Any, params: dict[str, Any], **_: Any) -> None:
        self.ops.append(model.name)
        if model.name == "CompleteLifecycleAction":
            iid = params["InstanceId"]
            self.completed.append({"instance": iid, "enis": rf_groups_on_enis(self.env, iid)})


def launch(env: Env) -> str:
    """The estate booted, the web group scaled out by one: its new instance held in Pending:Wait
    and the launch lifecycle action (with moto's real token) put on EventBridge."""
    new, tokens = scale_out_with_launch_hooks(env, ("rf-hook",))
    assert state(env, new) == "Pending:Wait"
    ev = env.lifecycle_event(new, launching=True)
    ev["detail"]["LifecycleActionToken"] = tokens["rf-hook"]
    env.put(ev)
    return new


def test_perimeter_first_then_agent(gated: Env) -> None:
    env = gated
    new = launch(env)
    calls = Calls(env)
    env.pump()  # lifecycle → perimeter (groups) → compute (bundle, hand-off recorded)
    ptr = env.store.bundle_pointer(new)
    assert ptr is not None, "compute published the new instance's bundle"
    assert all(rf_groups_on_enis(env, new).values()), "every ENI carries its perimeter groups"
    hold = env.store.launch_hold(new)
    assert hold is not None and hold.perimeter == "attached" and hold.enforced_version is None
    assert state(env, new) == "Pending:Wait", "published and fenced is not enforced: the hook still waits"
    token = enroll_instance(env, new)
    heartbeat(env, new, token, None)  # enrolled, nothing applied yet
    assert env.count("compute") == 0 and state(env, new) == "Pending:Wait"
    heartbeat(env, new, token, ptr.version)  # its agent enforces: recorded, compute told
    assert state(env, new) == "Pending:Wait", "the agent API completes nothing"
    assert "CompleteLifecycleAction" not in calls.ops and env.count("compute") == 1
    env.drain("compute", "compute")
    assert state(env, new) == "InService"
    assert [c["instance"] for c in calls.completed] == [new]
    hold = env.store.launch_hold(new)
    assert hold is not None and hold.outcome == "continue" and hold.enforced_version == ptr.version
    assert hold.released_at is not None and hold.released_at >= max(hold.perimeter_at or 0, hold.enforced_at or 0)
    heartbeat(env, new, token, ptr.version)  # later heartbeats ask nothing more
    assert env.count("compute") == 0


def test_agent_first_then_perimeter(gated: Env) -> None:
    env = gated
    new = launch(env)
    calls = Calls(env)
    env.drain("lifecycle", "lifecycle")
    env.drain("ingest", "ingest")
    env.drain("compute", "compute")  # the bundle is published; the perimeter has not run yet
    version, _ = agent_enforces(env, new)  # the agent is first
    hold = env.store.launch_hold(new)
    assert hold is not None and hold.enforced_version == version and hold.lifecycle is None
    assert env.count("compute") == 0, "nothing to release yet: compute finds the fact when the action comes"
    assert state(env, new) == "Pending:Wait" and not any(rf_groups_on_enis(env, new).values())
    env.drain("perimeter", "perimeter")  # groups attached, the action handed on
    assert state(env, new) == "Pending:Wait"
    env.drain("compute", "compute")
    assert state(env, new) == "InService"
    (done,) = calls.completed
    assert done["instance"] == new and all(done["enis"].values()), "CONTINUE only with the groups on every ENI"
    assert "rf-prod-boundary" in next(iter(done["enis"].values()))


def test_a_duplicate_or_late_message_completes_nothing_twice(gated: Env) -> None:
    env = gated
    new = launch(env)
    env.pump()
    agent_enforces(env, new)
    env.drain("compute", "compute")
    assert state(env, new) == "InService"
    calls = Calls(env)
    hold = env.store.launch_hold(new)
    assert hold is not None and hold.lifecycle is not None
    # SQS delivers at least once: the same report and the same hand-off again, and a late one
    for body in (
        {"ids": [], "enforced": [new]},
        {"ids": [], "lifecycle": {**hold.lifecycle, "perimeter_at": hold.perimeter_at}},
        {"ids": [], "enforced": [new]},
    ):
        send_compute(env, body)
    env.drain("compute", "compute")
    assert calls.completed == [], "a released hold is never completed again"
    assert env.store.launch_hold(new).outcome == "continue"  # type: ignore[union-attr]
    assert state(env, new) == "InService"


def test_an_instance_terminated_meanwhile_is_not_completed(gated: Env) -> None:
    env = gated
    new = launch(env)
    env.pump()
    ptr = env.store.bundle_pointer(new)
    assert ptr is not None
    token = enroll_instance(env, new)
    calls = Calls(env)
    # the agent's report is on the compute queue when the instance goes away
    heartbeat(env, new, token, ptr.version)
    env.ec2.terminate_instances(InstanceIds=[new])
    env.put(env.state_event(new, "terminated"))
    env.drain("ingest", "ingest")
    env.drain("compute", "compute")
    assert calls.completed == []
    # and a later report from an agent whose instance is gone is refused outright (token revoked)
    status, _, _ = env.rest(
        "agentapi",
        "POST",
        f"/v1/agents/{new}/heartbeat",
        {"applied_version": ptr.version, "mode": "enforce", "healthy": True},
        headers={"Authorization": f"Bearer {token}"},
    )
    assert status == 401
    hold = env.store.launch_hold(new)
    assert hold is not None and hold.outcome == "not completed: instance terminated"


def test_attack_the_agent_api_cannot_complete_a_lifecycle_action(gated: Env) -> None:
    """An agent (or whoever holds its token) reporting enforcement makes no Auto Scaling call from
    the internet-facing agent API: not before the perimeter is in place, not after."""
    env = gated
    new = launch(env)
    calls = Calls(env)
    env.drain("lifecycle", "lifecycle")
    env.drain("ingest", "ingest")
    env.drain("compute", "compute")
    ptr = env.store.bundle_pointer(new)
    assert ptr is not None
    token = enroll_instance(env, new)
    for _ in range(3):
        heartbeat(env, new, token, ptr.version)
    assert calls.ops == [] and state(env, new) == "Pending:Wait", "no perimeter yet: nothing released"
    assert "autoscaling" not in (ROOT / "layers/core/ringfence/control/agents.py").read_text()


def _sam_actions(fn: str) -> set[str]:
    res = template()["Resources"][fn]["Properties"]["Policies"]
    # (a statement under a condition, Fn::If, grants nothing asked about here)
    return {a for p in res if isinstance(p, dict) for st in p["Statement"] for a in st.get("Action", [])}


def test_only_compute_may_complete_lifecycle_actions_in_both_deployments() -> None:
    res = template()["Resources"]
    fns = [n for n, r in res.items() if r["Type"] == "AWS::Serverless::Function"]
    holders = {f for f in fns if "autoscaling:CompleteLifecycleAction" in _sam_actions(f)}
    assert holders == {"ComputeFunction"}, holders
    # the others may only look (a terminate is confirmed with Auto Scaling before it counts;
    # reconcile lists the gated groups' hooks: tests/aws/test_lifecycle_hooks_unlisted.py)
    others = {a for f in fns if f != "ComputeFunction" for a in _sam_actions(f) if a.startswith("autoscaling:")}
    looks = {"DescribeAutoScalingInstances", "DescribeAutoScalingGroups", "DescribeLifecycleHooks"}
    assert others <= {f"autoscaling:{a}" for a in looks}, others
    assert {a for a in _sam_actions("ComputeFunction") if a.startswith("autoscaling:")} == {
        "autoscaling:CompleteLifecycleAction"
    }
    (stmt,) = [
        st
        for st in res["ComputeFunction"]["Properties"]["Policies"][0]["Statement"]
        if "autoscaling:CompleteLifecycleAction" in st.get("Action", [])
    ]
    assert stmt["Resource"]["Sub"].endswith(":autoScalingGroup:*:autoScalingGroupName/${GatedGroupNames}")
    params = template()["Parameters"]
    assert params["LifecycleGate"]["Default"] == "publish"
    assert params["LifecycleGate"]["AllowedValues"] == ["publish", "agent"]

    lam = hcl(ROOT / "infra/modules/ringfence/lambda.tf")
    loc: dict[str, Any] = {}
    for block in lam.get("locals", []):
        loc.update(block)
    # (a conditional statement list, concat(...), comes from hcl2 as one expression string)
    tf_holders = {fn for fn, stmts in loc["statements"].items() if "autoscaling:CompleteLifecycleAction" in str(stmts)}
    assert tf_holders == {"compute"}, tf_holders
    assert "RINGFENCE_LIFECYCLE_GATE" in loc["common_env"]
