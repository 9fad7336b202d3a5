"""A CloudTrail for the embedded moto: the EC2 calls the control plane listens to, and who made them.

In AWS, a trail turns ``CreateTags`` / ``DeleteTags`` / ``RunInstances`` into ``AWS API Call via
CloudTrail`` events carrying the caller's ``userIdentity`` (the stack's ``CloudTrailEc2`` rule routes
them to ingest; governing who may set label tags rests on that principal). moto keeps no trail, so
this extension records those calls as moto's EC2 API serves them, with the caller resolved the way
moto's own ``sts:GetCallerIdentity`` resolves the request's access key (an IAM user's key → that
user, an assumed role's → the role session, moto's dummy keys → moto's default user). Launches by
Auto Scaling (moto calls EC2 internally) are recorded as AWS records them: ``invokedBy``
``autoscaling.amazonaws.com`` under the Auto Scaling service-linked role.

:func:`install` applies it (idempotent, process-wide); :func:`records_since` hands the event router
what was recorded after a sequence number. Failed calls are recorded with ``errorCode``, as
CloudTrail does.
"""

from __future__ import annotations

import datetime as dt
import itertools
import re
import threading
import uuid
from dataclasses import dataclass
from typing import Any

EVENTS = ("CreateTags", "DeleteTags", "RunInstances")

_lock = threading.Lock()
_seq = itertools.count(1)
_installed = False
_ATTR = "_ringfence_trail"  # on the region's EC2 backend: moto's reset drops it with the backend
_INSTANCE = re.compile(r"<instanceId>(i-[0-9a-f]+)</instanceId>")
_ERROR = re.compile(r"<Code>([^<]+)</Code>.*?<Message>([^<]*)</Message>", re.S)


@dataclass(frozen=True)
class TrailRecord:
    seq: int
    detail: dict[str, Any]  # the CloudTrail record: the event's ``detail``


def records_since(account: str, region: str, seq: int) -> list[TrailRecord]:
    from moto.ec2.models import ec2_backends

    backend = ec2_backends[account][region]
    with _lock:
        return [r for r in backend.__dict__.get(_ATTR, []) if r.seq > seq]


def install() -> None:
    """Record EC2 CreateTags / DeleteTags / RunInstances in moto (once per process)."""
    global _installed
    with _lock:
        if _installed:
            return
        from moto.autoscaling.models import FakeAutoScalingGroup
        from moto.ec2.responses import EC2Response

        orig_call = EC2Response.call_action
        orig_launch = FakeAutoScalingGroup.replace_autoscaling_group_instances

        def call_action(self: Any) -> Any:
            action = self._get_action()
            out = orig_call(self)
            if action in EVENTS:
                try:
                    _record_call(self, action, out)
                except Exception:  # a trail must never break the API it watches
                    import logging

                    logging.getLogger("ringfence.local").exception("recording %s for the trail failed", action)
            return out

        def replace_autoscaling_group_instances(self: Any, count_needed: int, propagated_tags: dict[str, str]) -> None:
            before = {s.instance.id for s in self.instance_states}
            orig_launch(self, count_needed, propagated_tags)
            new = [s.instance for s in self.instance_states if s.instance.id not in before]
            if new:
                backend = self.autoscaling_backend
                account, region = backend.account_id, backend.region_name
                identity = {
                    "type": "AssumedRole",
                    "principalId": f"AROAEXAMPLEAUTOSCALING:AutoScaling-{uuid.uuid4().hex[:8]}",
                    "arn": f"arn:aws:sts::{account}:assumed-role/AWSServiceRoleForAutoScaling/AutoScaling",
                    "accountId": account,
                    "invokedBy": "autoscaling.amazonaws.com",
                }
                detail = _detail(
                    "RunInstances",
                    account,
                    region,
                    identity,
                    source_ip="autoscaling.amazonaws.com",
                    user_agent="autoscaling.amazonaws.com",
                    request={"instancesSet": {"items": [{"minCount": count_needed, "maxCount": count_needed}]}},
                    response={"instancesSet": {"items": [_instance_item(i) for i in new]}},
                )
                _append(backend.ec2_backend, detail)

        EC2Response.call_action = call_action  # type: ignore[method-assign]
        FakeAutoScalingGroup.replace_autoscaling_group_instances = replace_autoscaling_group_instances  # type: ignore[method-assign]
        _installed = True


def _append(ec2_backend: Any, detail: dict[str, Any]) -> None:
    with _lock:
        ec2_backend.__dict__.setdefault(_ATTR, []).append(TrailRecord(next(_seq), detail))


def _identity(access_key: str, account: str, region: str) -> dict[str, Any]:
    from moto.sts.models import sts_backends

    user_id, arn, acct = sts_backends[account]["aws"].get_caller_identity(access_key, region)
    kind = "AssumedRole" if ":assumed-role/" in arn else "Root" if arn.endswith(":root") else "IAMUser"
    out: dict[str, Any] = {"type": kind, "principalId": user_id, "arn": arn, "accountId": acct}
    out["accessKeyId"] = access_key
    if kind == "IAMUser":
        out["userName"] = arn.rsplit("/", 1)[-1]
    return out


def _record_call(resp: Any, action: str, out: Any) -> None:
    from moto.ec2.models import ec2_backends

    status, _headers, body = out
    account, region = resp.current_account, resp.region
    q = resp.querystring
    text = body.decode() if isinstance(body, bytes) else str(body)
    request: dict[str, Any]
    response: dict[str, Any] | None
    if action == "RunInstances":
        request = {
            "instancesSet": {
                "items": [
                    {
                        "imageId": _one(q, "ImageId"),
                        "minCount": int(_one(q, "MinCount") or 1),
                        "maxCount": int(_one(q, "MaxCount") or 1),
                    }
                ]
            }
        }
        if _one(q, "SubnetId"):
            request["subnetId"] = _one(q, "SubnetId")
        specs = _tag_specifications(q)
        if specs:
            request["tagSpecificationSet"] = {"items": specs}
        ids = _INSTANCE.findall(text) if int(status) < 300 else []
        backend = ec2_backends[account][region]
        response = {"instancesSet": {"items": [_instance_item(backend.get_instance(i)) for i in ids]}}
    else:
        resources = [v for k, v in _indexed(q, "ResourceId")]
        tags = []
        for n in sorted({int(m.group(1)) for k in q if (m := re.fullmatch(r"Tag\.(\d+)\.Key", k))}):
            item = {"key": _one(q, f"Tag.{n}.Key")}
            if f"Tag.{n}.Value" in q:
                item["value"] = _one(q, f"Tag.{n}.Value")
            tags.append(item)
        request = {
            "resourcesSet": {"items": [{"resourceId": r} for r in resources]},
            "tagSet": {"items": tags},
        }
        response = {"_return": True}
    error = None
    if int(status) >= 300:
        m = _ERROR.search(text)
        error = (m.group(1), m.group(2)) if m else ("Error", text[:200])
        response = None
    headers = resp.headers
    detail = _detail(
        action,
        account,
        region,
        _identity(resp.access_key, account, region),
        source_ip=headers.get("X-Forwarded-For", "127.0.0.1"),
        user_agent=headers.get("User-Agent", ""),
        request=request,
        response=response,
        error=error,
    )
    _append(ec2_backends[account][region], detail)


def _detail(
    action: str,
    account: str,
    region: str,
    identity: dict[str, Any],
    *,
    source_ip: str,
    user_agent: str,
    request: dict[str, Any],
    response: dict[str, Any] | None,
    error: tuple[str, str] | None = None,
) -> dict[str, Any]:
    now = dt.datetime.now(dt.UTC).strftime("%Y-%m-%dT%H:%M:%SZ")
    detail: dict[str, Any] = {
        "eventVersion": "1.08",
        "userIdentity": identity,
        "eventTime": now,
        "eventSource": "ec2.amazonaws.com",
        "eventName": action,
        "awsRegion": region,
        "sourceIPAddress": source_ip,
        "userAgent": user_agent,
        "requestParameters": request,
        "responseElements": response,
        "requestID": str(uuid.uuid4()),
        "eventID": str(uuid.uuid4()),
        "readOnly": False,
        "eventType": "AwsApiCall",
        "managementEvent": True,
        "recipientAccountId": account,
    }
    if error is not None:
        detail["errorCode"], detail["errorMessage"] = error
    return detail


def _instance_item(inst: Any) -> dict[str, Any]:
    return {
        "instanceId": inst.id,
        "imageId": inst.image_id,
        "privateIpAddress": inst.private_ip,
        "subnetId": inst.subnet_id,
        "vpcId": getattr(inst, "vpc_id", None),
        "instanceState": {"code": 0, "name": "pending"},
    }


def _one(q: dict[str, list[str]], key: str) -> str | None:
    v = q.get(key)
    return v[0] if v else None


def _indexed(q: dict[str, list[str]], name: str) -> list[tuple[int, str]]:
    out = []
    for k, v in q.items():
        m = re.fullmatch(rf"{name}\.(\d+)", k)
        if m and v:
            out.append((int(m.group(1)), v[0]))
    return sorted(out)


def _tag_specifications(q: dict[str, list[str]]) -> list[dict[str, Any]]:
    specs: dict[int, dict[str, Any]] = {}
    for k, v in q.items():
        m = re.fullmatch(r"TagSpecification\.(\d+)\.(ResourceType|Tag\.(\d+)\.(Key|Value))", k)
        if not m or not v:
            continue
        spec = specs.setdefault(int(m.group(1)), {"resourceType": None, "tags": {}})
        if m.group(2) == "ResourceType":
            spec["resourceType"] = v[0]
        else:
            spec["tags"].setdefault(int(m.group(3)), {})[m.group(4).lower()] = v[0]
    return [
        {"resourceType": s["resourceType"], "tags": [s["tags"][i] for i in sorted(s["tags"])]}
        for _, s in sorted(specs.items())
    ]
