"""EventBridge rule patterns of the AWS control plane (template.yaml and infra/ carry the same;
a test checks they agree)."""

from __future__ import annotations

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

LIFECYCLE_RULES: dict[str, dict[str, Any]] = {
    "AsgLifecycle": {
        "source": ["aws.autoscaling"],
        "detail-type": ["EC2 Instance-launch Lifecycle Action", "EC2 Instance-terminate Lifecycle Action"],
    },
}
