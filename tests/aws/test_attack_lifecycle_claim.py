"""Lifecycle gate "agent": a launch is released on its agent's word that it enforces the
workload's bundle. The word is checked against what was published for the workload: a negative
version is refused (422), and one never published, or older than the stored bundle, releases
nothing."""

from __future__ import annotations

from tests.aws.conftest import Env
from tests.aws.test_lifecycle_gate import launch, state
from tests.aws.test_pipeline import enroll_instance


def _heartbeat(env: Env, wid: str, token: str, applied: int) -> int:
    body = {"applied_version": applied, "mode": "enforce", "healthy": True}
    status, _, _ = env.rest(
        "agentapi", "POST", f"/v1/agents/{wid}/heartbeat", body, headers={"Authorization": f"Bearer {token}"}
    )
    return int(status)


def test_attack_a_version_never_published_does_not_release_the_launch(gated: Env) -> None:
    env = gated
    new = launch(env)
    env.pump()
    ptr = env.store.bundle_pointer(new)
    assert ptr is not None and state(env, new) == "Pending:Wait"
    token = enroll_instance(env, new)
    assert _heartbeat(env, new, token, -42) == 422  # before: 200, the launch released on it
    assert _heartbeat(env, new, token, ptr.version + 10**9) == 200  # answered, believed nothing
    assert ptr.version > 0 and _heartbeat(env, new, token, ptr.version - 1) == 200  # older than its bundle
    hold = env.store.launch_hold(new)
    assert hold is not None and hold.enforced_version is None
    env.drain("compute", "compute")
    assert state(env, new) == "Pending:Wait"
    # the bundle it was given: released
    assert _heartbeat(env, new, token, ptr.version) == 200
    env.drain("compute", "compute")
    assert state(env, new) == "InService"
