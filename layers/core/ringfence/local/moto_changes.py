"""A change counter for the embedded moto: what lets the lab's watchers look only when there is news.

The event router's watcher and the lab's fleet (the "hypervisor" booting a namespace per
instance) learn what changed in moto by describing every instance and Auto Scaling group and
comparing with their previous look. Polled every 0.15–0.2 s, those looks were most of what moto
did during a scale-out: a py-spy profile of the moto process found a third of its CPU serializing
``DescribeInstances`` answers, and every handler's call queued behind them. This extension counts
the calls that change what those looks see (EC2 calls on instances and their tags, every Auto
Scaling call that is not a read, moto's reset), and :func:`wait_after` lets a watcher block until
the count moves, so it looks right after a change and not in between.

Changes moto makes on its own clock (a lifecycle hook timing out, applied when it is next read)
are not counted: the watchers still take a look every second or so without news.
"""

from __future__ import annotations

import threading
import time
from typing import Any

# EC2 calls that change an instance's state or tags (what the watchers compare); interface,
# group and subnet calls do not, and the perimeter makes many of them during a scale-out
EC2_ACTIONS = frozenset(
    {
        "RunInstances", "TerminateInstances", "StopInstances", "StartInstances", "RebootInstances",
        "CreateTags", "DeleteTags",
    }
)  # fmt: skip
READ_PREFIXES = ("Describe", "Get", "List")

_cond = threading.Condition()
_count = 0
_installed = False


def bump() -> None:
    """One change more; wakes every waiter."""
    global _count
    with _cond:
        _count += 1
        _cond.notify_all()


def current() -> int:
    with _cond:
        return _count


def wait_after(seq: int, timeout: float) -> int:
    """The count once it is above ``seq``, or as it is after ``timeout`` seconds."""
    deadline = time.monotonic() + max(timeout, 0.0)
    with _cond:
        while _count <= seq:
            left = deadline - time.monotonic()
            if left <= 0:
                break
            _cond.wait(left)
        return _count


def counts(service: str, action: str) -> bool:
    """Whether a served ``action`` of ``service`` is a change the watchers look for."""
    if service == "ec2":
        return action in EC2_ACTIONS
    return service == "autoscaling" and not action.startswith(READ_PREFIXES)


def install() -> None:
    """Count EC2's and Auto Scaling's changing calls as moto serves them (once per process)."""
    global _installed
    with _cond:
        if _installed:
            return
        from moto.autoscaling.responses import AutoScalingResponse
        from moto.ec2.responses import EC2Response

        for cls, service in ((EC2Response, "ec2"), (AutoScalingResponse, "autoscaling")):
            cls.call_action = _counting(cls.call_action, service)  # type: ignore[method-assign]
        _installed = True


def _counting(orig: Any, service: str) -> Any:
    def call_action(self: Any) -> Any:
        action = str(self._get_action())
        try:
            return orig(self)
        finally:  # a failed call may have changed part of what it named: a look costs little
            if counts(service, action):
                bump()

    return call_action
