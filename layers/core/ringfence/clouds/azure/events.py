"""Event Grid deliveries (the Event Grid event schema) → what changed, where: models apart from the
wire format, no SDK and no I/O here.

Two kinds of source feed it (docs/deploy-azure.md):

* the subscription's system topic (``Microsoft.Resources.ResourceWriteSuccess`` /
  ``ResourceDeleteSuccess``): routed on ``data.operationName``; these carry no resource payload
  and no tags, so the VM is read back from ARM (:mod:`.ingest`). They name the caller
  (``data.claims``), which is kept as the change's principal when the event's ``topic`` (which
  Event Grid stamps) is that system topic (:func:`from_system_topic`);
* Azure Resource Notifications (``Microsoft.ResourceNotifications.Resources.CreatedOrUpdated`` /
  ``Deleted``): ``data.resourceInfo`` carries the resource, tags included, but only its id is
  taken: the notification is a trigger and the VM is read back from ARM as for the system topic.
  A delivery's body is not the authority on a resource (whoever gets one accepted, or replays a
  stale one, would set its labels, addresses and ``vmId``); ARM is. No caller is named.

A Tags API write (``Microsoft.Resources/tags/write``) names the tagged resource either directly
or as its ``/providers/Microsoft.Resources/tags/default`` child (both are accepted: which one
Azure sends is not documented).
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Iterable
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError

from ringfence.governance import SKEW, LabelWrite

from .model import NIC, SCALE_SET_VM, SCALE_SET_VM_NIC, VM, ArmId

VALIDATION = "Microsoft.EventGrid.SubscriptionValidationEvent"
WRITE = "Microsoft.Resources.ResourceWriteSuccess"
DELETE = "Microsoft.Resources.ResourceDeleteSuccess"
NOTIFIED = "Microsoft.ResourceNotifications.Resources.CreatedOrUpdated"
NOTIFIED_DELETE = "Microsoft.ResourceNotifications.Resources.Deleted"
SCALE_SET = "microsoft.compute/virtualmachinescalesets"
# the header a delivery carries Ringfence's delivery secret in (ingest checks it); here, with no
# I/O, for whoever builds deliveries without importing the ARM clients (the demo, the tests)
SECRET_HEADER = "x-ringfence-eventgrid-secret"  # noqa: S105 (a header name, not a secret)
_TAGS_CHILD = "/providers/microsoft.resources/tags/default"

# the resource types whose writes and deletes change a workload (lower case, as ArmId.type)
WATCHED = {VM, SCALE_SET_VM, NIC, SCALE_SET_VM_NIC, SCALE_SET}

OID_CLAIM = "http://schemas.microsoft.com/identity/claims/objectidentifier"
TID_CLAIM = "http://schemas.microsoft.com/identity/claims/tenantid"


class MalformedDelivery(ValueError):
    """The body is not an Event Grid delivery (400; nothing is changed)."""


class GridEvent(BaseModel):
    """One event of the Event Grid event schema."""

    model_config = ConfigDict(extra="ignore", populate_by_name=True)

    id: str
    topic: str = ""
    subject: str = ""
    event_type: str = Field(alias="eventType")
    event_time: str = Field("", alias="eventTime")
    data: dict[str, Any] = Field(default_factory=dict)


def read_delivery(body: bytes | str) -> tuple[list[tuple[int, GridEvent]], dict[int, str]]:
    """A delivery (a JSON array of events, Event Grid schema) → its well-formed events with their
    index, and why each other one is malformed (by index). MalformedDelivery only when the body
    itself is not a delivery (not JSON, not an array or object)."""
    try:
        raw = json.loads(body)
    except ValueError as exc:
        raise MalformedDelivery(f"body is not JSON: {exc}") from None
    if isinstance(raw, dict):
        raw = [raw]
    if not isinstance(raw, list):
        raise MalformedDelivery("body must be a JSON array of Event Grid events")
    good: list[tuple[int, GridEvent]] = []
    bad: dict[int, str] = {}
    for i, item in enumerate(raw):
        try:
            good.append((i, GridEvent.model_validate(item)))
        except ValidationError as exc:
            where = "; ".join(f"{'.'.join(map(str, e['loc']))}: {e['msg']}" for e in exc.errors())
            bad[i] = f"event [{i}]: {where}"
    return good, bad


def parse_delivery(body: bytes | str) -> list[GridEvent]:
    """A delivery: a JSON array of events (Event Grid schema). MalformedDelivery naming the index
    of the first malformed event (:func:`read_delivery` keeps the others)."""
    good, bad = read_delivery(body)
    if bad:
        raise MalformedDelivery(bad[min(bad)])
    return [ev for _, ev in good]


def validation_code(events: list[GridEvent]) -> str | None:
    """The handshake's ``data.validationCode`` if this delivery is the subscription validation."""
    for ev in events:
        if ev.event_type == VALIDATION:
            code = ev.data.get("validationCode")
            if not isinstance(code, str) or not code:
                raise MalformedDelivery("SubscriptionValidationEvent without data.validationCode")
            return code
    return None


@dataclass(frozen=True)
class Change:
    """What one event says: ``resource`` (an ARM id) was written or deleted, by ``principal`` when
    the event names one. Nothing of the resource itself: what it is now is read from ARM."""

    event_id: str
    """:func:`event_key`: the same for a delivery of this event again, never for another event"""
    kind: Literal["write", "delete"]
    resource: ArmId
    principal: str | None = None
    tags_write: bool = False
    """the operation was a Tags API write (``Microsoft.Resources/tags/*``): it wrote tags only"""
    time: float | None = None
    """the event's ``eventTime`` (unix seconds; None: absent or not a time)"""
    system_topic: bool = False
    """the event came from the target's system topic (:func:`from_system_topic`): Azure's word that
    the call was made, by ``principal``, at ``time``"""


def event_time(ev: GridEvent) -> float | None:
    """``eventTime`` (ISO 8601, Event Grid writes seven fractional digits) as unix seconds."""
    raw = ev.event_time.strip()
    if not raw:
        return None
    try:
        at = datetime.fromisoformat(raw)
    except ValueError:
        return None
    return at.timestamp() if at.tzinfo is not None else at.replace(tzinfo=UTC).timestamp()


def event_key(ev: GridEvent, principal: str | None) -> str:
    """The event's ``id`` with a digest of what its caller cannot choose: the topic (Event Grid
    stamps it), the type, ``eventTime`` (ARM stamps it, to 100 ns), the subject, the operation and
    the caller Azure names. Records of what an event decided are keyed by it (one quarantine, one
    ``label.held`` per event and workload), so a redelivery decides the same again. The ``id``
    alone is not enough: ARM's events carry the request's correlation id, which a caller may set
    (``x-ms-correlation-request-id``), and a custom topic's publisher sets ``id`` outright, so a
    second call under an earlier event's ``id`` would be taken for that event, already decided."""
    parts = (ev.topic.strip().lower(), ev.event_type, ev.event_time, ev.subject, str(ev.data.get("operationName", "")))
    digest = hashlib.sha256("\0".join((*parts, principal or "")).encode()).hexdigest()[:16]
    return f"{ev.id}#{digest}"


RETRY_SPAN = 24 * 3600.0
"""Event Grid's retry span: an event is not delivered later than this after it was published."""


def stored_key(key: str, writes: Iterable[LabelWrite], now: float) -> str:
    """The key an earlier delivery of this event stored its decisions under: ``key``, or its bare
    ``id`` where one of ``writes`` (the workload's stored label writes) names that id with no
    digest and was written within :data:`RETRY_SPAN` (and :data:`~ringfence.governance.SKEW`)
    before ``now``: a delivery before events were keyed by :func:`event_key` stored the bare id,
    and its redelivery since must find its write (and its records) its own, or a quarantine whose
    report failed is never made. Past the span no delivery of that event can come, so a second
    call under its id (a caller may set it) is its own event again. The bare id only matches what
    that delivery stored (and names its records): a write stored since carries the call's own
    ``key`` (:attr:`~ringfence.governance.TagChange.stored_as`), so it cannot extend the span."""
    bare = key.split("#", 1)[0]
    if bare == key:
        return key
    for w in writes:
        # a write dated in the future is no delivery's of the past span
        if w.event == bare and -SKEW <= now - w.at <= RETRY_SPAN + SKEW:
            return bare
    return key


def _object(data: dict[str, Any], name: str) -> dict[str, Any]:
    """``data[name]`` when it is an object (absent or null: empty); MalformedDelivery naming it."""
    value = data.get(name)
    if value is None:
        return {}
    if not isinstance(value, dict):
        raise MalformedDelivery(f"data.{name} must be an object, not {type(value).__name__}")
    return value


def _text(obj: dict[str, Any], name: str, where: str) -> str | None:
    value = obj.get(name)
    if value is None or value == "":
        return None
    if not isinstance(value, str):
        raise MalformedDelivery(f"{where}.{name} must be a string, not {type(value).__name__}")
    return value


def principal_of(data: dict[str, Any]) -> str | None:
    """The caller an ARM event names: ``azure:<tenant>/<object id>`` (the object id is the one
    identifier of a user, group member or service principal that cannot be renamed or reused;
    allow-list taggers by it)."""
    claims = _object(data, "claims")
    oid = _text(claims, OID_CLAIM, "data.claims") or _text(claims, "oid", "data.claims")
    tid = (
        _text(claims, TID_CLAIM, "data.claims")
        or _text(claims, "tid", "data.claims")
        or _text(data, "tenantId", "data")
    )
    if not oid:
        return None
    return f"azure:{tid}/{oid}" if tid else f"azure:{oid}"


def from_system_topic(ev: GridEvent, target: ArmId) -> bool:
    """The event came from Azure itself: the system topic of the target's subscription (or of its
    resource group). Event Grid stamps ``topic`` with the source's resource path and refuses a
    publisher's own value for it, so an event published to a custom topic (anyone with a topic
    can create one and subscribe the route) carries that topic's path. Only then is the caller
    in ``data.claims`` Azure's word; otherwise it is the publisher's, and names nobody."""
    topic = ev.topic.strip().rstrip("/").lower()
    sub = f"/subscriptions/{target.subscription}".lower()
    return topic == sub or topic == f"{sub}/resourcegroups/{target.group}".lower()


def _resource_of(resource_id: str) -> ArmId | None:
    rid = resource_id.strip()
    if rid.lower().endswith(_TAGS_CHILD):
        rid = rid[: -len(_TAGS_CHILD)]
    try:
        return ArmId.parse(rid)
    except ValueError:
        return None


def change_of(ev: GridEvent) -> Change | None:
    """The workload-relevant change of one event; None for events of other resources or types.
    MalformedDelivery naming the field where one the event is read by has the wrong type."""
    if ev.event_type in (WRITE, DELETE):
        op = str(ev.data.get("operationName", "")).lower()
        target = _resource_of(str(ev.data.get("resourceUri") or ev.subject))
        if target is None:
            return None
        if op.startswith("microsoft.resources/tags/"):
            kind: Literal["write", "delete"] = "write"  # a tag removed is a write of the resource
        elif op == f"{target.type}/write":
            kind = "write"
        elif op == f"{target.type}/delete":
            kind = "delete"
        else:
            return None  # an action (start, restart…) or another resource's operation
        if target.type not in WATCHED:
            return None
        system = from_system_topic(ev, target)
        principal = principal_of(ev.data) if system else None
        tags = op.startswith("microsoft.resources/tags/")
        return Change(
            event_key(ev, principal), kind, target, principal, tags_write=tags, time=event_time(ev), system_topic=system
        )
    if ev.event_type in (NOTIFIED, NOTIFIED_DELETE):
        # only which resource: its tags, vmId and NICs in resourceInfo are the sender's word
        info = _object(ev.data, "resourceInfo")
        target = _resource_of(_text(info, "id", "data.resourceInfo") or ev.subject)
        if target is None or target.type not in WATCHED:
            return None
        return Change(event_key(ev, None), "delete" if ev.event_type == NOTIFIED_DELETE else "write", target)
    return None
