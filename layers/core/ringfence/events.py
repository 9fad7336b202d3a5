"""Cloud events → domain events.

Cloud events are *triggers*: they say which resource may have changed, never the whole truth.
The ingest step re-describes the live resource, so a stale or reordered event cannot install
old state. What an event does carry that is worth keeping is its time and, for ``aws.tag``
events, the tag-set ``version`` (a hint only: a lower version than one already seen is counted,
never trusted to skip the describe — a forged huge version would otherwise lock out every real
change); for CloudTrail calls, *who* made the call (``userIdentity``) and the tags the call set,
which decide whether a move into a privileged label value is approved
(:mod:`ringfence.governance`). An ``aws.tag`` "Tag Change on Resource" event names no principal:
it can never approve such a move. An event whose resources name an ARN of another account than
its own is skipped (logged): its instances are described in the event's account.

This module is provider-neutral pydantic; it imports no cloud SDK. Handlers give it the SQS
record's body (:func:`normalize_json`): the envelope and its detail are parsed once, here.
"""

from __future__ import annotations

import enum
import logging
import re
from datetime import datetime
from typing import Any

from pydantic import BaseModel, ConfigDict, Field, ValidationError

INSTANCE_ID = re.compile(r"i-[0-9a-f]{8,17}")  # fullmatch: `$` matches before a trailing newline
log = logging.getLogger("ringfence.events")

_ASSUMED_ROLE = re.compile(r"^arn:(?P<partition>[^:]+):sts::(?P<account>\d{12}):assumed-role/(?P<role>[^/]+)/[^/]+$")


class MalformedEvent(ValueError):
    """An event that can never be processed (goes to the DLQ, with this message)."""


class UnservedAccount(MalformedEvent):
    """About an AWS account that is neither this control plane's own nor listed with a role
    (``AccountRoles``). It is never read with this account's own credentials instead: those would
    describe another account, record its instances under the wrong account and take the member's
    for gone. Its events go to the DLQ (redrive them once the account is listed)."""

    def __init__(self, account: str) -> None:
        super().__init__(
            f"account {account} is not served: it is not in AccountRoles (account_roles) and is not this "
            "control plane's own account; list its ringfence-member role to serve it"
        )
        self.account = account


class Kind(enum.StrEnum):
    STATE = "state"  # EC2 state change
    TAGS = "tags"  # tag change (aws.tag or CloudTrail Create/DeleteTags)
    LAUNCH = "launch"  # ASG launch successful / CloudTrail RunInstances
    TERMINATE = "terminate"  # ASG terminate successful
    LIFECYCLE_LAUNCH = "lifecycle-launch"
    LIFECYCLE_TERMINATE = "lifecycle-terminate"


class LifecycleAction(BaseModel):
    model_config = ConfigDict(frozen=True)

    hook_name: str
    group_name: str
    token: str
    instance_id: str
    transition: str


class DomainEvent(BaseModel):
    """One cloud event, normalized: which instances to re-describe, and what it claimed."""

    model_config = ConfigDict(frozen=True)

    event_id: str
    kind: Kind
    cloud: str = "aws"
    account: str
    region: str
    time: datetime
    instance_ids: tuple[str, ...]
    state: str | None = None
    tag_version: int | None = Field(None, description="aws.tag detail.version: per-resource tag-set version")
    tags: dict[str, str] | None = Field(None, description="full tag set after the change, when the event has it")
    lifecycle: LifecycleAction | None = None
    principal: str | None = Field(
        None, description="who made the call (CloudTrail userIdentity: an assumed role's role ARN, else the ARN)"
    )
    tag_request: dict[str, str] | None = Field(
        None, description="the instance tags the CloudTrail call set (CreateTags, RunInstances tag specifications)"
    )

    @property
    def observed_at(self) -> float:
        return self.time.timestamp()


# --- detail models (only the fields we use; everything else is ignored) -------------------------


class _Detail(BaseModel):
    model_config = ConfigDict(extra="ignore", populate_by_name=True)


class StateDetail(_Detail):
    instance_id: str = Field(alias="instance-id")
    state: str


class TagDetail(_Detail):
    service: str
    resource_type: str = Field(alias="resource-type")
    version: int | None = None
    tags: dict[str, str] = Field(default_factory=dict)
    changed_tag_keys: list[str] = Field(default_factory=list, alias="changed-tag-keys")


class AsgDetail(_Detail):
    instance_id: str = Field(alias="EC2InstanceId")
    group_name: str = Field(alias="AutoScalingGroupName")


class LifecycleDetail(_Detail):
    instance_id: str = Field(alias="EC2InstanceId")
    group_name: str = Field(alias="AutoScalingGroupName")
    hook_name: str = Field(alias="LifecycleHookName")
    token: str = Field(alias="LifecycleActionToken")
    transition: str = Field(alias="LifecycleTransition")


class _Items(_Detail):
    items: list[dict[str, Any]] = Field(default_factory=list)


class TrailRequest(_Detail):
    resources_set: _Items = Field(default_factory=_Items, alias="resourcesSet")
    tag_set: _Items = Field(default_factory=_Items, alias="tagSet")
    tag_specification_set: _Items = Field(default_factory=_Items, alias="tagSpecificationSet")
    launch_template: dict[str, Any] | None = Field(None, alias="launchTemplate")


class SessionIssuer(_Detail):
    arn: str | None = None


class SessionContext(_Detail):
    session_issuer: SessionIssuer | None = Field(None, alias="sessionIssuer")


class UserIdentity(_Detail):
    type: str | None = None
    arn: str | None = None
    invoked_by: str | None = Field(None, alias="invokedBy")
    session_context: SessionContext | None = Field(None, alias="sessionContext")

    def principal(self) -> str | None:
        """The principal a tagger allow-list names: an assumed role's *role* ARN (sessions come and
        go), else the caller's ARN, else the AWS service that called on someone's behalf."""
        issuer = self.session_context.session_issuer if self.session_context else None
        if issuer is not None and issuer.arn:
            return issuer.arn
        if self.arn and (m := _ASSUMED_ROLE.match(self.arn)):
            # no sessionIssuer given: the role's ARN from the session's (a role path is not in it)
            return f"arn:{m['partition']}:iam::{m['account']}:role/{m['role']}"
        return self.arn or self.invoked_by


class TrailResponse(_Detail):
    instances_set: _Items = Field(default_factory=_Items, alias="instancesSet")


class TrailDetail(_Detail):
    event_source: str = Field(alias="eventSource")
    event_name: str = Field(alias="eventName")
    error_code: str | None = Field(None, alias="errorCode")
    user_identity: UserIdentity | None = Field(None, alias="userIdentity")
    request_parameters: TrailRequest | None = Field(None, alias="requestParameters")
    response_elements: TrailResponse | None = Field(None, alias="responseElements")


class Envelope(_Detail):
    id: str
    detail_type: str = Field(alias="detail-type")
    source: str
    account: str
    time: datetime
    region: str
    resources: list[str] = Field(default_factory=list)
    detail: dict[str, Any]


DETAIL_TYPES = {
    "EC2 Instance State-change Notification",
    "Tag Change on Resource",
    "EC2 Instance Launch Successful",
    "EC2 Instance Terminate Successful",
    "EC2 Instance-launch Lifecycle Action",
    "EC2 Instance-terminate Lifecycle Action",
    "AWS API Call via CloudTrail",
}
TRAIL_EVENTS = {"CreateTags", "DeleteTags", "RunInstances"}


def instance_ids(ids: list[str]) -> tuple[str, ...]:
    """Keep only EC2 instance ids (CloudTrail tag calls mix sg-, vol-, i- …), in order, once."""
    seen: dict[str, None] = {}
    for i in ids:
        if INSTANCE_ID.fullmatch(i):
            seen.setdefault(i, None)
    return tuple(seen)


def normalize(raw: dict[str, Any]) -> DomainEvent | None:
    """An EventBridge event → a :class:`DomainEvent`; ``None`` when it is valid but not ours
    (a failed API call, a tag change on a security group, …). Raises :class:`MalformedEvent`."""
    try:
        env = Envelope.model_validate(raw)
    except ValidationError as exc:
        raise MalformedEvent(f"not an EventBridge event: {_first(exc)}") from None
    return from_envelope(env)


def normalize_json(body: str | bytes) -> DomainEvent | None:
    """:func:`normalize` of an event's JSON text (an SQS record's body), parsed in one pass."""
    try:
        env = Envelope.model_validate_json(body)
    except ValidationError as exc:
        raise MalformedEvent(f"not an EventBridge event: {_first(exc)}") from None
    return from_envelope(env)


def from_envelope(env: Envelope) -> DomainEvent | None:
    """A validated envelope → a :class:`DomainEvent` (``None``: valid, not ours)."""
    if env.detail_type not in DETAIL_TYPES:
        raise MalformedEvent(f"unsupported detail-type {env.detail_type!r} (source {env.source!r})")
    base: dict[str, Any] = {"event_id": env.id, "account": env.account, "region": env.region, "time": env.time}
    try:
        ev = _normalize(env, base)
    except ValidationError as exc:
        raise MalformedEvent(f"{env.detail_type} event {env.id}: {_first(exc)}") from None
    if ev is not None and (foreign := _other_accounts_arn(env)) is not None:
        # the instance is described in the event's account: an ARN of another account's instance
        # (a Tag Change's resources) would be looked for there, not found, and tombstoned over
        # that account's workload. AWS names its own account's resources: not ours to act on
        log.warning(
            "%s event %s of account %s names %s of account %s: skipped",
            env.detail_type,
            env.id,
            env.account,
            foreign,
            foreign.split(":")[4],
        )
        return None
    return ev


def _other_accounts_arn(env: Envelope) -> str | None:
    """The first of the event's resources that is an ARN naming an account other than the event's
    (``arn:partition:service:region:account:resource``); an ARN with no account field (an S3
    bucket's) or a resource that is no ARN is judged by nothing it does not say."""
    for r in env.resources:
        parts = r.split(":", 5)
        if len(parts) == 6 and parts[0] == "arn" and parts[4] and parts[4] != env.account:
            return r
    return None


def _normalize(env: Envelope, base: dict[str, Any]) -> DomainEvent | None:
    dt, d = env.detail_type, env.detail
    if dt == "EC2 Instance State-change Notification":
        sd = StateDetail.model_validate(d)
        ids = instance_ids([sd.instance_id])
        if not ids:
            raise MalformedEvent(f"state-change event {env.id}: {sd.instance_id!r} is not an instance id")
        return DomainEvent(kind=Kind.STATE, instance_ids=ids, state=sd.state, **base)
    if dt == "Tag Change on Resource":
        td = TagDetail.model_validate(d)
        if td.service != "ec2" or td.resource_type != "instance":
            return None
        ids = instance_ids([r.rsplit("/", 1)[-1] for r in env.resources])
        if not ids:
            raise MalformedEvent(f"tag event {env.id}: no instance ARN in resources")
        return DomainEvent(kind=Kind.TAGS, instance_ids=ids, tag_version=td.version, tags=td.tags, **base)
    if dt in ("EC2 Instance Launch Successful", "EC2 Instance Terminate Successful"):
        ad = AsgDetail.model_validate(d)
        kind = Kind.LAUNCH if "Launch" in dt else Kind.TERMINATE
        return DomainEvent(kind=kind, instance_ids=instance_ids([ad.instance_id]), **base)
    if dt in ("EC2 Instance-launch Lifecycle Action", "EC2 Instance-terminate Lifecycle Action"):
        ld = LifecycleDetail.model_validate(d)
        kind = Kind.LIFECYCLE_LAUNCH if "launch" in dt else Kind.LIFECYCLE_TERMINATE
        action = LifecycleAction(
            hook_name=ld.hook_name,
            group_name=ld.group_name,
            token=ld.token,
            instance_id=ld.instance_id,
            transition=ld.transition,
        )
        return DomainEvent(kind=kind, instance_ids=instance_ids([ld.instance_id]), lifecycle=action, **base)
    # AWS API Call via CloudTrail
    cd = TrailDetail.model_validate(d)
    if cd.event_source != "ec2.amazonaws.com" or cd.event_name not in TRAIL_EVENTS or cd.error_code:
        return None
    req = cd.request_parameters
    tag_request: dict[str, str] | None = None
    if cd.event_name == "RunInstances":
        items = cd.response_elements.instances_set.items if cd.response_elements else []
        ids = instance_ids([str(i.get("instanceId", "")) for i in items])
        kind = Kind.LAUNCH
        # from a launch template the instance also gets the template's tags, which the request
        # does not show: what the call set is then unknown (None: it approves nothing, and a
        # non-tagger answers for every held move), never "nothing"
        if req is not None and req.launch_template is None:
            tag_request = {}
            for spec in req.tag_specification_set.items:
                if spec.get("resourceType") == "instance":
                    tag_request.update(_tag_items(spec.get("tags")))
    else:
        items = req.resources_set.items if req else []
        ids = instance_ids([str(i.get("resourceId", "")) for i in items])
        kind = Kind.TAGS
        if cd.event_name == "CreateTags" and req is not None:
            tag_request = _tag_items(req.tag_set.items)
    if not ids:
        return None  # e.g. tags on security groups or volumes only
    principal = cd.user_identity.principal() if cd.user_identity else None
    return DomainEvent(kind=kind, instance_ids=ids, principal=principal, tag_request=tag_request, **base)


def _tag_items(items: Any) -> dict[str, str]:
    """CloudTrail's ``[{"key": k, "value": v}]`` (a missing value is the empty string, as in EC2)."""
    out: dict[str, str] = {}
    for item in items if isinstance(items, list) else []:
        if isinstance(item, dict) and isinstance(item.get("key"), str):
            value = item.get("value")
            out[item["key"]] = value if isinstance(value, str) else ""
    return out


def _first(exc: ValidationError) -> str:
    e = exc.errors()[0]
    return f"{'.'.join(str(p) for p in e['loc']) or '<root>'}: {e['msg']}"
