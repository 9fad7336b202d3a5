"""GCP events as Ringfence receives them (tests and the demo): Cloud Audit Logs entries of Compute
Engine calls, shaped as ``cloud_events.md`` §3.2/§3.3, delivered by a Pub/Sub push subscription
with the OIDC token Google signs for it (here signed by the local API's key, whose JWKS the
control plane is configured with: :func:`ringfence.local.gcp_project.gcp_environment`)."""

from __future__ import annotations

import base64
import json
import time
import uuid
from typing import Any

from ringfence.local.gcp_api import GOOGLE_ISSUER, GcpApi
from ringfence.local.gcp_project import EVENTS_AUDIENCE, PROJECT, PUSHER, TAGGER


def _now(fraction: bool = True) -> str:
    t = time.time()
    base = time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(t))
    return f"{base}.{int(t % 1 * 1000):03d}Z" if fraction else f"{base}Z"


def audit_entry(
    method: str,
    inst: dict[str, Any],
    *,
    principal: str = TAGGER,
    request: dict[str, Any] | None = None,
    first: bool = True,
    last: bool = True,
    operation: str | None = None,
    severity: str = "NOTICE",
) -> dict[str, Any]:
    """The audit log entry of ``method`` (``v1.compute.instances.insert``…) on the instance ``inst``
    (its compute v1 JSON) made by ``principal``; ``operation``: part of a long-running operation
    (``first``/``last`` say which entry of it)."""
    zone = inst["zone"].rsplit("/", 1)[-1]
    project = inst["selfLink"].split("/projects/", 1)[1].split("/", 1)[0]
    entry: dict[str, Any] = {
        "protoPayload": {
            "@type": "type.googleapis.com/google.cloud.audit.AuditLog",
            "serviceName": "compute.googleapis.com",
            "methodName": method,
            "resourceName": f"projects/{project}/zones/{zone}/instances/{inst['name']}",
            "authenticationInfo": {"principalEmail": principal},
            "response": {"@type": "type.googleapis.com/operation", "targetId": inst["id"], "status": "RUNNING"},
        },
        "insertId": uuid.uuid4().hex[:12],
        "resource": {
            "type": "gce_instance",
            "labels": {"zone": zone, "instance_id": inst["id"], "project_id": project},
        },
        "timestamp": _now(),
        "severity": severity,
        "logName": f"projects/{project}/logs/cloudaudit.googleapis.com%2Factivity",
    }
    if request is not None and first:
        entry["protoPayload"]["request"] = request
    if operation is not None:
        entry["operation"] = {"id": operation, "producer": "compute.googleapis.com", "first": first, "last": last}
    return entry


def push_body(entry: dict[str, Any], project: str = PROJECT) -> bytes:
    """A Pub/Sub push delivery of ``entry`` (the body POSTed to the push endpoint)."""
    data = base64.b64encode(json.dumps(entry).encode()).decode()
    return json.dumps(
        {
            "message": {"data": data, "messageId": uuid.uuid4().hex, "publishTime": _now(fraction=False)},
            "subscription": f"projects/{project}/subscriptions/ringfence-push",
        }
    ).encode()


def push_token(api: GcpApi, *, email: str = PUSHER, audience: str = EVENTS_AUDIENCE, **extra: Any) -> str:
    """The OIDC token a push subscription running as ``email`` sends (``Authorization: Bearer``),
    signed by ``api``'s key; ``extra`` claims override (an expired or foreign token, say)."""
    now = int(time.time())
    claims = {
        "aud": audience,
        "azp": "1234",
        "email": email,
        "email_verified": True,
        "exp": now + 3600,
        "iat": now,
        "iss": GOOGLE_ISSUER,
        "sub": "1234",
        **extra,
    }
    return api.sign_token(claims)


def push_headers(token: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {token}", "content-type": "application/json"}
