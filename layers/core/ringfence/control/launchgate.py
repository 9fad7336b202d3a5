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
its own, the one launch item the agent-API role may write: it cannot fake compute's release.) A duplicate or a
late message finds the hold released and does nothing; an instance terminated meanwhile is not
completed (its action is gone with it). Whatever never completes times out into the hook's default
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
    if hold.lifecycle is not None and hold.released_at is None:
        w.enqueue_compute(enforced=[instance_id])
    return hold


class LaunchGate:
    """Compute's half: record the perimeter hand-off, release a hold that has both facts."""

    def __init__(self, w: BaseWiring, metric: Metric = no_metric) -> None:
        self.w = w
        self.metric = metric

    def handed_on(self, lc: dict[str, Any]) -> str:
        """A launch action reached compute (its bundle is published): record it and release it if
        the agent already enforces. Without an event-path perimeter the action comes straight from
        the lifecycle function and there are no groups to wait for; a perimeter in dry run planned
        the groups and attached none (``lc["perimeter"]``). An action with another token than the
        hold's (a warm pool's second launch action) is a new action; the same one again changes
        nothing (:meth:`~ringfence.store.base.Store.hold_launch_action`)."""
        perimeter_at = lc.get("perimeter_at")
        hold = self.w.store.hold_launch_action(
            lc["instance_id"],
            {k: v for k, v in lc.items() if k not in HAND_OFF},
            perimeter_at=perimeter_at if perimeter_at is not None else time.time(),
            perimeter=str(lc.get("perimeter") or "attached") if perimeter_at is not None else "not managed",
        )
        return self.release(hold)

    def enforced(self, instance_id: str) -> str:
        """The agent API said the instance's agent enforces (a ``{"enforced": [...]}`` message)."""
        hold = self.w.store.launch_hold(instance_id)
        if hold is None:
            return "no hold"  # nothing recorded (expired): nothing to release
        return self.release(hold)

    def release(self, hold: LaunchHold) -> str:
        """CONTINUE if both facts are in; what is still missing otherwise."""
        iid = hold.instance_id
        if hold.released_at is not None:
            return f"already {hold.outcome}"  # a duplicate or late message
        if hold.lifecycle is None:
            return "awaiting perimeter"
        if hold.enforced_version is None:
            log.info("launch of %s: perimeter in place, waiting for its agent to enforce", iid)
            return "awaiting agent"
        lc = hold.lifecycle
        token = str(lc["token"])
        if not self.w.store.claim_launch_release(iid, token):
            return "already claimed"  # another copy of this action (or a newer action) has it
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
            hold.perimeter,
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
        by a retried batch) is not completed a second time: "completed", "failed", or "already"."""
        self.w.store.hold_launch_action(lc["instance_id"], {k: v for k, v in lc.items() if k not in HAND_OFF})
        if not self.w.store.claim_launch_release(lc["instance_id"], str(lc["token"])):
            return "already"
        return self.complete(lc)


# what the perimeter adds to an action it hands on: recorded in the hold's fields, not its action
HAND_OFF = frozenset({"perimeter_at", "perimeter"})
