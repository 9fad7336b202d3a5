"""Two launch hooks of Ringfence's on one gated group: Auto Scaling sends one action per hook at
the same moment, each with its own token, and both reach compute in one batch, where they run side
by side. Each is recorded, claimed and completed under its own token in the instance's hold: neither
displaces the other (an earlier version kept one action per instance, so the one written first lost
its claim, was taken for a copy and never completed: the instance timed out into ABANDON on every
launch, uncounted). Against the moto server through the real handlers, under both lifecycle gates.
(Another team's hook on the group is not Ringfence's to complete: test_lifecycle_hook_names.py.)"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest

from tests.aws.conftest import Env
from tests.aws.lifecycle_setup import launch_action, pending, scale_out_with_launch_hooks
from tests.aws.test_handler_metrics import emitted
from tests.aws.test_lifecycle_gate import Calls, agent_enforces, state
from tests.aws.test_store import make_dynamo

HOOKS = ("rf-hook", "rf-hook-warm")  # both Ringfence's (tests/conftest.py's lifecycle_hook_names)


def _launch_with_two_hooks(env: Env) -> tuple[str, dict[str, str]]:
    """Scale out a group with two launch hooks and queue both actions at once."""
    new, tokens = scale_out_with_launch_hooks(env, HOOKS)
    for hook, tok in tokens.items():
        env.put(launch_action(env, new, hook, tok))
    return new, tokens


@pytest.mark.parametrize("attempt", range(3))  # the two run side by side: more than one interleaving
def test_two_launch_hooks_at_once_are_both_completed(
    env: Env, capsys: pytest.CaptureFixture[str], attempt: int
) -> None:
    new, tokens = _launch_with_two_hooks(env)
    calls = Calls(env)
    capsys.readouterr()
    env.pump()
    m = emitted(capsys.readouterr().out)
    assert not pending(env, new), f"an action was never completed (instance {state(env, new)})"
    assert state(env, new) == "InService"
    assert calls.ops.count("CompleteLifecycleAction") == 2, "each action completed once"
    assert m.get("LifecycleLeftToTimeout", 0) == 0
    hold = env.store.launch_hold(new)
    assert hold is not None and set(hold.actions) == set(tokens.values())
    assert {a.outcome for a in hold.actions.values()} == {"continue"}
    # a copy of either action later completes nothing again
    for hook, tok in tokens.items():
        ev = env.lifecycle_event(new, launching=True)
        ev["detail"].update({"LifecycleHookName": hook, "LifecycleActionToken": tok})
        env.put(ev)
    env.pump()
    assert calls.ops.count("CompleteLifecycleAction") == 2


def test_two_launch_hooks_at_once_are_both_completed_under_the_gate_agent(gated: Env) -> None:
    env = gated
    new, tokens = _launch_with_two_hooks(env)
    env.pump()
    hold = env.store.launch_hold(new)
    assert hold is not None and sorted(hold.pending()) == sorted(tokens.values()), "both recorded, waiting"
    assert set(pending(env, new)) == set(HOOKS), "nothing completed before the agent enforces"
    calls = Calls(env)
    agent_enforces(env, new)
    env.drain("compute", "compute")
    assert not pending(env, new), f"an action was never completed (instance {state(env, new)})"
    assert state(env, new) == "InService"
    assert calls.ops.count("CompleteLifecycleAction") == 2
    hold = env.store.launch_hold(new)
    assert hold is not None and not hold.pending()
    assert {a.outcome for a in hold.actions.values()} == {"continue"}


@pytest.fixture(params=["dynamodb", "sqlite"])
def either_store(request: pytest.FixtureRequest, tmp_path: Path, moto_url: str) -> Any:
    if request.param == "sqlite":
        from ringfence.store.sqlite import SqliteStore

        return SqliteStore(tmp_path / "rf.db")
    return make_dynamo(moto_url)


def test_store_claims_each_action_of_an_instance_on_its_own(either_store: Any) -> None:
    """Both stores: two actions of one instance are recorded side by side, each claimed once; a
    late copy of the older one displaces nothing; a claim of an unknown action fails."""
    st = either_store
    st.hold_launch_action("i-9", {"hook_name": "a", "token": "t1"}, perimeter_at=1.0, perimeter="attached")
    hold = st.hold_launch_action("i-9", {"hook_name": "b", "token": "t2"}, perimeter_at=2.0, perimeter="attached")
    assert hold.pending() == ["t1", "t2"] and hold.token == "t2"
    assert st.claim_launch_release("i-9", "t2") and st.claim_launch_release("i-9", "t1")
    assert not st.claim_launch_release("i-9", "t1"), "claimed once"
    assert st.settle_launch_release("i-9", "t1", "continue")
    again = st.hold_launch_action("i-9", {"hook_name": "a", "token": "t1"})  # a late copy
    assert again.actions["t1"].outcome == "continue" and again.actions["t2"].outcome == "completing"
    assert st.settle_launch_release("i-9", "t2", "continue")
    assert not st.settle_launch_release("i-9", "t2", "not completed: late"), "never over an outcome"
    assert not st.claim_launch_release("i-9", "t3")
    got = st.launch_hold("i-9")
    assert {t: a.outcome for t, a in got.actions.items()} == {"t1": "continue", "t2": "continue"}
