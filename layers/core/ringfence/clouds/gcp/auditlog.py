"""Cloud Audit Logs entries → :class:`GcpEvent` (wire format apart from the model).

Two deliveries carry the same LogEntry JSON (cloud_events.md §3.1): a log sink → Pub/Sub push
(``{"message": {"data": base64(LogEntry), "messageId": …}, "subscription": …}``) and Eventarc
(``google.cloud.audit.log.v1.written`` CloudEvents in binary mode: the body is the LogEntry).

What we take from an entry: which VM (``resource.labels`` or the resource name; for a tag binding
its ``parent``, or the full resource name its binding name holds percent-encoded), what method
(``v1.``/``beta.`` ``compute.instances.insert|delete|setLabels|setName``, and Resource Manager's
``CreateTagBinding``/``DeleteTagBinding`` on a VM), who called
(``protoPayload.authenticationInfo.principalEmail``), what the call asked for (the complete new
label set of ``setLabels``, the labels of ``insert``, the tag value of a binding), whether a managed
instance group made it (a ``MEMBER_OF`` link to ``instanceGroupManagers/…``, or the Google APIs
service agent), and the operation's ``first``/``last`` flags: long-running operations log twice,
the request on the first entry, completion on the last — we act on the last.
"""

from __future__ import annotations

import base64
import binascii
import enum
import json
import re
from datetime import datetime
from typing import Any
from urllib.parse import unquote

from pydantic import BaseModel, ConfigDict, Field, ValidationError

# setLabels logs its labels as CloudTrail logs tags: [{"key": k, "value": v}] (a missing value is "")
from ringfence.events import MalformedEvent
from ringfence.events import _tag_items as _label_items

COMPUTE_METHODS = {
    "compute.instances.insert": "insert",
    "compute.instances.delete": "delete",
    "compute.instances.setLabels": "labels",
    # followed so the inventory's name of the VM is its name now (a VM is looked up by its id)
    "compute.instances.setName": "rename",
}
TAG_METHODS = {"CreateTagBinding": "tags", "DeleteTagBinding": "tags"}
_INSTANCE_NAME = re.compile(r"projects/([^/]+)/zones/([^/]+)/instances/([^/]+)$")
_TAG_PARENT = re.compile(r"^//compute\.googleapis\.com/projects/([^/]+)/zones/([^/]+)/instances/([^/]+)$")
# a binding's name: tagBindings/{the resource's full name, percent-encoded}/tagValues/N (the API
# reference's form; what DeleteTagBinding's request and resource name hold, with no parent)
_BINDING_NAME = re.compile(r"(?:^|/)tagBindings/([^/]+)/tagValues/[^/]+$")
_MIG = re.compile(r"instanceGroupManagers/([^/@]+)")
_SERVICE_AGENT = re.compile(r"^\d+@cloudservices\.gserviceaccount\.com$")


class Action(enum.StrEnum):
    INSERT = "insert"
    DELETE = "delete"
    LABELS = "labels"
    TAGS = "tags"
    RENAME = "rename"


class GcpEvent(BaseModel):
    """One audit log entry about a VM, normalized."""

    model_config = ConfigDict(frozen=True)

    event_id: str = Field(description="the entry's insertId")
    log_name: str | None = Field(None, description="the log it was written to (projects/P/logs/…)")
    action: Action
    method: str
    project: str = Field(description="the project id, or its number when only the number is logged")
    zone: str
    instance: str = Field(description="the instance id when logged, else its name")
    instance_name: str | None = None
    time: datetime | None = None
    principal: str | None = None
    requested: dict[str, str] | None = Field(None, description="labels / tag the call set (first entry only)")
    operation: str | None = None
    first: bool = True
    last: bool = True
    failed: bool = False
    group: str | None = Field(None, description="the managed instance group that made the call")
    tag_value_ids: tuple[str, ...] = Field(
        (),
        description="secure tag values the call binds that the entry names by id only (tagValues/…, "
        "an insert's params.resourceManagerTags): which key and value each is, the entry does not say",
    )


# --- wire models (only the fields used) -------------------------------------------------------


class _Wire(BaseModel):
    model_config = ConfigDict(extra="ignore", populate_by_name=True)


class _AuthInfo(_Wire):
    principal_email: str | None = Field(None, alias="principalEmail")


class _Status(_Wire):
    code: int = 0


class _Payload(_Wire):
    service_name: str = Field("", alias="serviceName")
    method_name: str = Field(alias="methodName")
    resource_name: str = Field("", alias="resourceName")
    authentication_info: _AuthInfo | None = Field(None, alias="authenticationInfo")
    request: dict[str, Any] | None = None
    response: dict[str, Any] | None = None
    status: _Status | None = None


class _Resource(_Wire):
    type: str = ""
    labels: dict[str, str] = Field(default_factory=dict)


class _Operation(_Wire):
    id: str = ""
    first: bool = False
    last: bool = False


class LogEntry(_Wire):
    insert_id: str = Field(alias="insertId")
    log_name: str | None = Field(None, alias="logName")
    proto_payload: _Payload = Field(alias="protoPayload")
    resource: _Resource = Field(default_factory=_Resource)
    timestamp: datetime | None = None
    severity: str = ""
    operation: _Operation | None = None


class _PushMessage(_Wire):
    data: str
    message_id: str = Field("", alias="messageId")


class PushEnvelope(_Wire):
    message: _PushMessage
    subscription: str = ""


def log_entry(body: bytes | str) -> dict[str, Any]:
    """The LogEntry of a Pub/Sub push body, or of an Eventarc body (the LogEntry itself)."""
    try:
        doc = json.loads(body)
    except ValueError:
        raise MalformedEvent("event body is not JSON") from None
    if not isinstance(doc, dict):
        raise MalformedEvent("event body is not a JSON object")
    if "message" in doc:
        try:
            env = PushEnvelope.model_validate(doc)
            data = base64.b64decode(env.message.data, validate=True)
            entry = json.loads(data)
        except (ValidationError, binascii.Error, ValueError):
            raise MalformedEvent("Pub/Sub push message.data is not base64 JSON") from None
        if not isinstance(entry, dict):
            raise MalformedEvent("Pub/Sub push message.data is not a LogEntry object")
        return entry
    return doc


def parse(entry: dict[str, Any]) -> GcpEvent | None:
    """A LogEntry → :class:`GcpEvent`; None when valid but not about a VM we follow."""
    try:
        e = LogEntry.model_validate(entry)
    except ValidationError as exc:
        err = exc.errors()[0]
        where = ".".join(str(p) for p in err["loc"]) or "<root>"
        raise MalformedEvent(f"not an audit LogEntry: {where}: {err['msg']}") from None
    p = e.proto_payload
    method = p.method_name
    op = e.operation
    base: dict[str, Any] = {
        "event_id": e.insert_id,
        "log_name": e.log_name,
        "method": method,
        "time": e.timestamp,
        "principal": p.authentication_info.principal_email if p.authentication_info else None,
        "operation": op.id if op else None,
        # an entry without an operation is a complete call on its own
        "first": op.first if op else True,
        "last": op.last if op else True,
        "failed": e.severity == "ERROR" or (p.status is not None and p.status.code != 0),
    }
    bare = method.split(".", 1)[1] if method.startswith(("v1.", "beta.")) else None
    if bare in COMPUTE_METHODS:
        return _compute(e, Action(COMPUTE_METHODS[bare]), base)
    tail = method.rsplit(".", 1)[-1]
    if tail in TAG_METHODS and "TagBindings" in method:
        return _tag_binding(e, base)
    return None


def _compute(e: LogEntry, action: Action, base: dict[str, Any]) -> GcpEvent:
    p = e.proto_payload
    labels = e.resource.labels
    m = _INSTANCE_NAME.search(p.resource_name)
    project = labels.get("project_id") or (m[1] if m else "")
    zone = labels.get("zone") or (m[2] if m else "")
    resp = p.response or {}
    target = resp.get("targetId")
    if target is not None and not (isinstance(target, (str, int)) and not isinstance(target, bool)):
        raise MalformedEvent(f"audit entry {e.insert_id}: protoPayload.response.targetId is not an instance id")
    instance = labels.get("instance_id") or str(target or "") or (m[3] if m else "")
    if not (project and zone and instance):
        raise MalformedEvent(f"audit entry {e.insert_id}: {p.method_name} names no instance (project, zone, id)")
    req = p.request or {}
    requested: dict[str, str] | None = None
    if (action is Action.LABELS and base["first"]) or (action is Action.INSERT and "labels" in req):
        requested = _labels(e.insert_id, req.get("labels"))
    group = None
    for link in req.get("links", []) if isinstance(req.get("links"), list) else []:
        if (
            isinstance(link, dict)
            and link.get("type") == "MEMBER_OF"
            and (g := _MIG.search(str(link.get("source", ""))))
        ):
            group = g[1]
    if group is None and action is Action.INSERT and _SERVICE_AGENT.match(base["principal"] or ""):
        group = "?"  # the Google APIs service agent launches for MIGs; which one, the instance says
    name = req.get("name") if isinstance(req.get("name"), str) else (m[3] if m else None)
    params = req.get("params")
    rm_tags = params.get("resourceManagerTags") if action is Action.INSERT and isinstance(params, dict) else None
    by_id = tuple(sorted(str(v) for v in rm_tags.values())) if isinstance(rm_tags, dict) else ()
    return GcpEvent(
        action=action,
        project=project,
        zone=zone,
        instance=instance,
        instance_name=name,
        requested=requested,
        group=group,
        tag_value_ids=by_id,
        **base,
    )


def _labels(insert_id: str, raw: object) -> dict[str, str]:
    """A call's labels as logged: ``[{"key": k, "value": v}]`` (a missing value is ""), or a map of
    strings; none for a request without them. Anything else is a malformed entry, named."""
    where = f"audit entry {insert_id}: protoPayload.request.labels"
    if raw is None:
        return {}
    if isinstance(raw, dict):
        if not all(isinstance(v, str) for v in raw.values()):
            raise MalformedEvent(f"{where}: a label value is not a string")
        return {str(k): v for k, v in raw.items()}
    if not isinstance(raw, list):
        raise MalformedEvent(f"{where}: neither a list of key/value items nor a map (a {type(raw).__name__})")
    for item in raw:
        if not isinstance(item, dict) or not isinstance(item.get("key"), str):
            raise MalformedEvent(f'{where}: an item is not {{"key": string, "value": string}}')
        if not isinstance(item.get("value", ""), str):
            raise MalformedEvent(f"{where}: the value of {item['key']!r} is not a string")
    return _label_items(raw)


def _tag_binding(e: LogEntry, base: dict[str, Any]) -> GcpEvent | None:
    p = e.proto_payload
    req = p.request or {}
    raw = req.get("tagBinding")
    binding: dict[str, Any] = raw if isinstance(raw, dict) else {}
    parent = str(binding.get("parent") or req.get("parent") or "")
    m = (
        _TAG_PARENT.match(parent)
        or _TAG_PARENT.match(p.resource_name)
        or _TAG_PARENT.match(_bound_to(req.get("name")))
        or _TAG_PARENT.match(_bound_to(p.resource_name))
    )
    if not m:
        return None  # a binding on a project, a bucket, …: not a VM
    requested = None
    creates = base["first"] and p.method_name.endswith("CreateTagBinding")
    nv = binding.get("tagValueNamespacedName")
    if isinstance(nv, str) and nv.count("/") >= 2 and creates:
        _, key, value = nv.rsplit("/", 2)
        requested = {key: value}
    tv = binding.get("tagValue")
    by_id = (str(tv),) if creates and requested is None and isinstance(tv, str) and tv else ()
    return GcpEvent(
        action=Action.TAGS, project=m[1], zone=m[2], instance=m[3], requested=requested, tag_value_ids=by_id, **base
    )


def _bound_to(name: object) -> str:
    """The full resource name a binding's name (``tagBindings/…/tagValues/N``) holds, decoded, else
    "". A ``DeleteTagBinding`` names the binding only (``DeleteTagBindingRequest.name``)."""
    m = _BINDING_NAME.search(name) if isinstance(name, str) else None
    return unquote(m[1]) if m else ""
