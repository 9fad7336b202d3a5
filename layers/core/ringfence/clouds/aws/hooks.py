"""Launch hooks that hold a gated group's launches for Ringfence under a name it is not given.

Ringfence completes the actions of its own hooks only (``LifecycleHookNames``), and its rule
passes no other's: a Ringfence hook under a name not in the list (an earlier deployment's, when
the docs said "whatever the hook's name") is never seen, and with ``ABANDON`` every launch of its
group times out into abandonment, silently. The scheduled reconcile lists the gated groups' hooks
(:func:`unlisted_launch_hooks`) and reports such a hook each run (logged, counted, alarmed).

Which hooks: a launch hook whose default result is ``ABANDON`` and whose name is not listed, on a
gated group that carries no launch hook that is. A group that carries one of Ringfence's launch
hooks has had its hooks named for Ringfence; an ``ABANDON`` hook beside it is another team's step
(a bootstrap, a log drain), which its owner completes: reporting it would alarm on a correct setup
for good. A ``CONTINUE`` hook delays a launch but never abandons it; a terminate hook ends in
termination whatever its result.
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

LAUNCHING = "autoscaling:EC2_INSTANCE_LAUNCHING"


@dataclass(frozen=True)
class UnlistedHook:
    group: str
    hook: str
    heartbeat_timeout: int


def iam_wildcard(pattern: str) -> re.Pattern[str]:
    """``GatedGroupNames`` as IAM reads it in a resource ARN: ``*`` any run, ``?`` any one character."""
    return re.compile("".join(".*" if c == "*" else "." if c == "?" else re.escape(c) for c in pattern))


def unlisted_launch_hooks(asg: Any, gated: str, ours: Sequence[str]) -> list[UnlistedHook]:
    """The launch hooks of the groups matching ``gated`` that abandon launches Ringfence will not
    complete (see the module). One DescribeAutoScalingGroups page per 100 groups, and one
    DescribeLifecycleHooks per gated group (it takes one group)."""
    match = iam_wildcard(gated)
    out: list[UnlistedHook] = []
    pages = asg.get_paginator("describe_auto_scaling_groups").paginate(PaginationConfig={"PageSize": 100})
    for page in pages:
        for group in page["AutoScalingGroups"]:
            name = group["AutoScalingGroupName"]
            if not match.fullmatch(name):
                continue
            hooks = asg.describe_lifecycle_hooks(AutoScalingGroupName=name)["LifecycleHooks"]
            launch = [h for h in hooks if h.get("LifecycleTransition") == LAUNCHING]
            if any(h["LifecycleHookName"] in ours for h in launch):
                continue
            out += [
                UnlistedHook(name, h["LifecycleHookName"], int(h.get("HeartbeatTimeout", 0)))
                for h in launch
                if h.get("DefaultResult", "ABANDON") == "ABANDON"  # AWS's default too
            ]
    return out
