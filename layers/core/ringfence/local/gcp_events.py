"""GCP events as Ringfence receives them (tests and the demo): Cloud Audit Logs entries of Compute
Engine calls, shaped as ``cloud_events.md`` §3.2/§3.3, delivered by a Pub/Sub push subscription
with the OIDC token Google signs for it (here signed by the local API's key, whose JWKS the
control plane is configured with: :func:`ringfence.local.gcp_project.gcp_environment`).

An entry Google wrote is in Cloud Logging before a sink publishes it: :func:`logged` stores an
entry in the local API's log (what its ``entries:list`` reads), and :func:`bind_tag_as` makes a
tag binding on the local API and logs its audit entry, as a caller's real change does. An entry
built and pushed without being logged is one somebody published to the topic themselves."""

from __future__ import annotations

import base64
import json
import time
import uuid
from typing import Any
from urllib.parse import quote

from ringfence.local.gcp_api import GOOGLE_ISSUER, GcpApi
from ringfence.local.gcp_project import EVENTS_AUDIENCE, ORG, PROJECT, PUSHER, TAGGER


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


def tag_binding_entry(
    api: GcpApi,
    inst: dict[str, Any],
    key: str,
    value: str,
    *,
    principal: str = TAGGER,
    namespace: str = ORG,
    method: str = "CreateTagBinding",
) -> dict[str, Any]:
    """The audit entry of a ``TagBindings.CreateTagBinding`` (or ``DeleteTagBinding``) of the tag
    ``namespace/key/value`` on the VM ``inst`` by ``principal``, logged in the VM's project. A
    delete names the binding only, as the API's ``DeleteTagBindingRequest`` has it (``name``:
    ``tagBindings/{the VM's full resource name, percent-encoded}/tagValues/N``; no ``parent``), and
    that name as its resource name: the shape of the API reference, not one seen in a live log."""
    zone = inst["zone"].rsplit("/", 1)[-1]
    project = inst["selfLink"].split("/projects/", 1)[1].split("/", 1)[0]
    parent = api.full_name(project, zone, inst["id"])
    request: dict[str, Any] = {"tagBinding": {"parent": parent, "tagValueNamespacedName": f"{namespace}/{key}/{value}"}}
    resource = parent
    if method == "DeleteTagBinding":
        resource = f"tagBindings/{quote(parent, safe='')}/{api.tag_value(namespace, key, value)}"
        request = {
            "@type": "type.googleapis.com/google.cloud.resourcemanager.v3.DeleteTagBindingRequest",
            "name": resource,
        }
    return {
        "protoPayload": {
            "@type": "type.googleapis.com/google.cloud.audit.AuditLog",
            "serviceName": "cloudresourcemanager.googleapis.com",
            "methodName": f"TagBindings.{method}",
            "resourceName": resource,
            "request": request,
            "authenticationInfo": {"principalEmail": principal},
        },
        "insertId": uuid.uuid4().hex[:12],
        "resource": {"type": "audited_resource", "labels": {"service": "cloudresourcemanager.googleapis.com"}},
        "timestamp": _now(),
        "severity": "NOTICE",
        "logName": f"projects/{project}/logs/cloudaudit.googleapis.com%2Factivity",
    }


def logged(api: GcpApi, entry: dict[str, Any]) -> dict[str, Any]:
    """``entry`` written to the local API's Cloud Logging (what a log sink then publishes)."""
    api.write_log(entry)
    return entry


def bind_tag_as(api: GcpApi, principal: str, inst: dict[str, Any], key: str, value: str) -> dict[str, Any]:
    """``principal`` binds the organization's tag ``key=value`` to the VM ``inst``: the binding is
    made on the local API and its audit entry logged there; returns the entry (to push)."""
    zone = inst["zone"].rsplit("/", 1)[-1]
    project = inst["selfLink"].split("/projects/", 1)[1].split("/", 1)[0]
    api.bind_tag(project, zone, inst["id"], ORG, key, value)
    return logged(api, tag_binding_entry(api, inst, key, value, principal=principal))


def unbind_tag_as(api: GcpApi, principal: str, inst: dict[str, Any], key: str, value: str) -> dict[str, Any]:
    """``principal`` deletes the binding of the organization's tag ``key=value`` from the VM
    ``inst``: removed on the local API and its audit entry logged there; returns the entry."""
    zone = inst["zone"].rsplit("/", 1)[-1]
    project = inst["selfLink"].split("/projects/", 1)[1].split("/", 1)[0]
    api.unbind_tag(project, zone, inst["id"], ORG, key, value)
    return logged(api, tag_binding_entry(api, inst, key, value, principal=principal, method="DeleteTagBinding"))


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
