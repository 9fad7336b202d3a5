"""The launch gate ``agent``: a new instance of an Auto Scaling group goes InService only once its
perimeter groups are on every ENI **and** its agent enforces a bundle.

Two facts, from two functions, arriving in either order:

* the perimeter hand-off: the perimeter function attaches the groups, then hands the lifecycle
  action on to compute (``lifecycle["perimeter_at"]``), which records it (:meth:`LaunchGate.handed_on`);
* the agent's report: the agent API, on the instance's first heartbeat with a bundle applied,
  records the version in the instance's :class:`~ringfence.store.base.LaunchHold` and, if the hold
  already has its lifecycle action, puts ``{"enforced": [id]}`` on the compute queue
  (:func:`report_enforcing`). The agent API holds no Auto Scaling right at all.

Compute (the one function allowed ``autoscaling:CompleteLifecycleAction``; serialized by its FIFO
queue) completes the action with CONTINUE once the hold has both (:meth:`LaunchGate.release`).
Each writer records its fact, then reads the other's (consistently), so whichever of the two comes
second sees the first: nothing is lost between them. (In DynamoDB the agent's fact is an item of
its own, the one launch item the agent-API role may write: it cannot fake compute's release.)
Each action is recorded and claimed under its own token (an instance may have several at once:
one per launch hook of its group). A duplicate or a late message finds its action released and
does nothing; an instance terminated meanwhile is not completed (its action is gone with it). Whatever never completes times out into the hook's default
result (ABANDON: an instance that was not segmented in time never serves).
"""

from __future__ import annotations

import time
from typing import Any

from ringfence.store.base import ACTIVE_STATES, LaunchHold

from .wiring import BaseWiring, Metric, log, no_metric


def report_enforcing(w: BaseWiring, instance_id: str, version: int) -> LaunchHold:
    """The agent API's half: the instance's agent enforces ``version`` (first report wins). If the
    hold already carries the lifecycle action (the perimeter was first), compute is asked to
    release it; otherwise compute will find this fact when the action reaches it."""
    hold = w.store.hold_launch(instance_id, enforced_version=version, enforced_at=time.time())
    if hold.pending():
        w.enqueue_compute(enforced=[instance_id])
    return hold


class LaunchGate:
    """Compute's half: record the perimeter hand-off, release a hold that has both facts."""

    def __init__(self, w: BaseWiring, metric: Metric = no_metric) -> None:
        self.w = w
        self.metric = metric

    def ours(self, lc: dict[str, Any]) -> bool:
        """Whether the action is of one of Ringfence's hooks (``RINGFENCE_LIFECYCLE_HOOK_NAMES``).
        Another hook's action (another team's, on a gated group) reached compute anyway (an older
        rule or version, a redrive): logged and counted here, and neither held nor completed —
        its owner completes it, or it times out into its hook's default result. With no names at
        all (a misconfiguration both deployments refuse) no action is known to be ours: none is
        completed, each is logged and counted LifecycleLeftToTimeout (alarmed)."""
        names = self.w.cfg.lifecycle_hook_names
        if lc.get("hook_name") in names:
            return True
        if not names:
            log.error(
                "lifecycle %s for %s: RINGFENCE_LIFECYCLE_HOOK_NAMES names no hook; NOT completing — the hook "
                "%s of %s will time out into its configured default result",
                lc.get("transition"),
                lc.get("instance_id"),
                lc.get("hook_name"),
                lc.get("group_name"),
            )
            self.metric("LifecycleLeftToTimeout", 1)
            return False
        log.warning(
            "lifecycle %s for %s: hook %s of %s is not Ringfence's (RINGFENCE_LIFECYCLE_HOOK_NAMES); NOT completing",
            lc.get("transition"),
            lc.get("instance_id"),
            lc.get("hook_name"),
            lc.get("group_name"),
        )
        self.metric("LifecycleActionsNotOurs", 1)
        return False

    def handed_on(self, lc: dict[str, Any]) -> str:
        """A launch action reached compute (its bundle is published): record it and release it if
        the agent already enforces. Without an event-path perimeter the action comes straight from
        the lifecycle function and there are no groups to wait for; a perimeter in dry run planned
        the groups and attached none (``lc["perimeter"]``). Each action is recorded under its own
        token beside the instance's others (one per launch hook of its group, sent at once; a warm
        pool's second launch action); the same one again changes nothing
        (:meth:`~ringfence.store.base.Store.hold_launch_action`)."""
        perimeter_at = lc.get("perimeter_at")
        hold = self.w.store.hold_launch_action(
            lc["instance_id"],
            {k: v for k, v in lc.items() if k not in HAND_OFF},
            perimeter_at=perimeter_at if perimeter_at is not None else time.time(),
            perimeter=str(lc.get("perimeter") or "attached") if perimeter_at is not None else "not managed",
        )
        return self.release(hold, str(lc["token"]))

    def enforced(self, instance_id: str) -> str:
        """The agent API said the instance's agent enforces (a ``{"enforced": [...]}`` message):
        release each of its actions still pending; "completed" if one was."""
        hold = self.w.store.launch_hold(instance_id)
        if hold is None:
            return "no hold"  # nothing recorded (expired): nothing to release
        outcomes = [self.release(hold, token) for token in hold.pending()]
        if not outcomes:
            return f"already {hold.outcome}" if hold.actions else "awaiting perimeter"
        return "completed" if "completed" in outcomes else outcomes[0]

    def release(self, hold: LaunchHold, token: str) -> str:
        """CONTINUE the hold's action ``token`` if both facts are in; what is still missing
        otherwise."""
        iid = hold.instance_id
        action = hold.actions.get(token)
        if action is None:
            return self._lost(iid, token, "not in its hold")
        if action.released_at is not None:
            return f"already {action.outcome}"  # a duplicate or late message
        if not self.ours(action.lifecycle):
            if not self.w.cfg.lifecycle_hook_names:
                return "lost"  # no hook named ours (logged, counted): not settled, it may be ours
            # held by an earlier version, which took every hook's action: settled, never completed
            if self.w.store.claim_launch_release(iid, token):
                self.w.store.settle_launch_release(iid, token, "not completed: not Ringfence's hook")
            return "not ours"
        if hold.enforced_version is None:
            log.info("launch of %s: perimeter in place, waiting for its agent to enforce", iid)
            return "awaiting agent"
        lc = action.lifecycle
        if not self.w.store.claim_launch_release(iid, token):
            return self._not_claimed(iid, token)
        rec = self.w.store.get(iid)
        if rec is None or rec.state not in ACTIVE_STATES:
            state = rec.state if rec is not None else "unknown"
            log.warning("launch of %s: the instance is %s; its lifecycle action is not completed", iid, state)
            self.w.store.settle_launch_release(iid, token, f"not completed: instance {state}")
            self.metric("LifecycleGone", 1)
            return f"instance {state}"
        if self.complete(lc) != "completed":
            return "failed"
        log.info(
            "launch of %s released: perimeter %s, agent enforces v%s (hook %s)",
            iid,
            action.perimeter,
            hold.enforced_version,
            lc["hook_name"],
        )
        self.metric("LaunchesReleased", 1)
        return "completed"

    def complete(self, lc: dict[str, Any]) -> str:
        """CONTINUE the claimed action ``lc`` and record how that went: "completed", or "failed"
        (counted LifecycleLeftToTimeout: the hook times out into its default result)."""
        iid, token = lc["instance_id"], str(lc["token"])
        try:
            self.w.complete_lifecycle(lc, iid)
        except Exception as exc:  # e.g. the hook timed out already: its default result stands
            log.error("CompleteLifecycleAction for %s failed (%s): the hook times out into its default", iid, exc)
            self.w.store.settle_launch_release(iid, token, f"not completed: {exc}")
            self.metric("LifecycleLeftToTimeout", 1)
            return "failed"
        self.w.store.settle_launch_release(iid, token, "continue")
        return "completed"

    def complete_once(self, lc: dict[str, Any]) -> str:
        """An action compute completes now (the lifecycle gate "publish", a terminate): recorded
        and claimed first, so that a copy of it (SQS delivers at least once; a hand-off sent again
        by a retried batch) is not completed a second time: "completed", "failed", "already" (a
        copy was), or "lost" (not claimable, yet not completed: logged, counted)."""
        iid, token = lc["instance_id"], str(lc["token"])
        self.w.store.hold_launch_action(iid, {k: v for k, v in lc.items() if k not in HAND_OFF})
        if not self.w.store.claim_launch_release(iid, token):
            return self._not_claimed(iid, token)
        return self.complete(lc)

    def _not_claimed(self, iid: str, token: str) -> str:
        """The claim of action ``token`` failed: "already" if the action is claimed or settled (a
        copy of it has it: nothing to do), else it is lost (:meth:`_lost`)."""
        hold = self.w.store.launch_hold(iid)
        action = hold.actions.get(token) if hold is not None else None
        if action is None or action.released_at is None:
            return self._lost(iid, token, "its claim failed")
        log.info("lifecycle action %s of %s: a copy of it has it already (%s)", token, iid, action.outcome)
        return "already"

    def _lost(self, iid: str, token: str, why: str) -> str:
        """An action compute will not complete although nothing completed it (its hold expired
        or was written by an earlier version): its hook times out into its default result."""
        log.error(
            "lifecycle action %s of %s is %s: NOT completing, the hook will time out into its default result",
            token,
            iid,
            why,
        )
        self.metric("LifecycleLeftToTimeout", 1)
        return "lost"


# what the perimeter adds to an action it hands on: recorded in the hold's fields, not its action
HAND_OFF = frozenset({"perimeter_at", "perimeter"})
