"""EventBridge rule patterns of the AWS control plane (template.yaml and infra/ carry the same;
a test checks they agree)."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

INGEST_RULES: dict[str, dict[str, Any]] = {
    "Ec2StateChange": {"source": ["aws.ec2"], "detail-type": ["EC2 Instance State-change Notification"]},
    "TagChange": {
        "source": ["aws.tag"],
        "detail-type": ["Tag Change on Resource"],
        "detail": {"service": ["ec2"], "resource-type": ["instance"]},
    },
    "AsgInstance": {
        "source": ["aws.autoscaling"],
        "detail-type": ["EC2 Instance Launch Successful", "EC2 Instance Terminate Successful"],
    },
    "CloudTrailEc2": {
        "source": ["aws.ec2"],
        "detail-type": ["AWS API Call via CloudTrail"],
        "detail": {"eventSource": ["ec2.amazonaws.com"], "eventName": ["CreateTags", "DeleteTags", "RunInstances"]},
    },
}


def lifecycle_rules(hook_names: Sequence[str]) -> dict[str, dict[str, Any]]:
    """The lifecycle rule: launch and terminate actions of Ringfence's own hooks only (exact
    names, LifecycleHookNames): another hook's action on the same group never reaches the
    lifecycle queue. (The lifecycle and compute functions refuse one that arrives anyway.)"""
    return {
        "AsgLifecycle": {
            "source": ["aws.autoscaling"],
            "detail-type": ["EC2 Instance-launch Lifecycle Action", "EC2 Instance-terminate Lifecycle Action"],
            "detail": {"LifecycleHookName": list(hook_names)},
        },
    }
