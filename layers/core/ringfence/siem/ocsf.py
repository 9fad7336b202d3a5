"""Ringfence's events as OCSF 1.7.0 JSON (https://schema.ocsf.io/1.7.0, github.com/ocsf/ocsf-schema
at the v1.7.0 release).

* **API Activity** (6003) — every audit record: policy provisions and reverts, mode changes,
  quarantine and release, pairing and agent keys, refused admin calls. The chain's ``seq``,
  ``hash`` and the before/after digests are in ``unmapped.audit``.
* **Network Activity** (4001, with the ``security_control`` profile) — an agent's drop
  (``action_id`` Denied, ``disposition_id`` Dropped) or would-drop in observe mode (``action_id``
  Allowed, ``disposition_id`` Detected), folded per batch with a ``count``; and the summary of a
  workload's drop events suppressed past its SIEM budget.
* **Detection Finding** (2004) — findings (a privileged label move held or quarantined, label
  hygiene).

The tests validate each class against the required attributes, types and enums of the published
schema (``tests/siem/ocsf-1.7.0-subset.schema.json``, derived by ``tests/siem/derive_ocsf_schema.py``).
"""

from __future__ import annotations

from typing import Any

from ringfence import __version__
from ringfence.audit import AuditRecord

OCSF_VERSION = "1.7.0"
PRODUCT = {"name": "Ringfence", "vendor_name": "Ringfence", "version": __version__}

NETWORK_ACTIVITY, API_ACTIVITY, DETECTION_FINDING = 4001, 6003, 2004
# severity_id: 1 Informational, 2 Low, 3 Medium, 4 High
INFORMATIONAL, LOW, MEDIUM, HIGH = 1, 2, 3, 4

# the audit action → API Activity's activity_id (1 Create, 2 Read, 3 Update, 4 Delete)
_CREATE = ("policy.provision", "policy.revert", "pairing.create", "workload.register", "token.issue", "label.bind")
_DELETE = ("workload.deregister", "token.revoke", "agent-key.reset", "pairing.revoke", "label.unbind")
# actions that lower a safeguard or were refused: worth more than informational
_NOTABLE = ("workload.release", "admin.denied", "label.held", "workload.quarantine", "agent-key.reset")


def _ms(t: float) -> int:
    return int(t * 1000)


def _metadata(uid: str, log_name: str, profiles: list[str] | None = None) -> dict[str, Any]:
    md: dict[str, Any] = {"version": OCSF_VERSION, "product": PRODUCT, "uid": uid, "log_name": log_name}
    if profiles:
        md["profiles"] = profiles
    return md


def _activity(action: str) -> int:
    if action.startswith(_CREATE):
        return 1
    if action.startswith(_DELETE):
        return 4
    return 3


def api_activity(rec: AuditRecord) -> dict[str, Any]:
    """One audit record as API Activity."""
    activity = _activity(rec.action)
    refused = rec.action in ("admin.denied",) or rec.action.endswith(("-refused", ".refused"))
    kind = rec.target.split("/", 1)[0] if "/" in rec.target else "workload"
    message = f"{rec.principal} {rec.action} {rec.target}" + (f": {rec.reason}" if rec.reason else "")
    return {
        "class_uid": API_ACTIVITY,
        "class_name": "API Activity",
        "category_uid": 6,
        "category_name": "Application Activity",
        "activity_id": activity,
        "activity_name": {1: "Create", 3: "Update", 4: "Delete"}[activity],
        "type_uid": API_ACTIVITY * 100 + activity,
        "severity_id": MEDIUM if rec.action in _NOTABLE else INFORMATIONAL,
        "status_id": 2 if refused else 1,
        "time": _ms(rec.time),
        "message": message,
        "metadata": {**_metadata(rec.id, "audit"), "sequence": rec.seq},
        "actor": {"user": {"name": rec.principal, "uid": rec.principal}},
        "api": {"operation": rec.action, "service": {"name": "ringfence"}, "request": {"uid": rec.id}},
        # the caller's address is not part of an audit record: the endpoint is the control plane
        "src_endpoint": {"svc_name": "ringfence"},
        "resources": [{"uid": rec.target, "type": kind}],
        "unmapped": {
            "audit": {
                "seq": rec.seq,
                "prev": rec.prev,
                "hash": rec.hash,
                "before": rec.before,
                "after": rec.after,
                "reason": rec.reason,
                "detail": rec.detail,
            }
        },
    }


def _drop_class(dropped: bool) -> dict[str, Any]:
    """Network Activity's class and outcome fields for a drop (``dropped``) or a would-drop."""
    return {
        "class_uid": NETWORK_ACTIVITY,
        "class_name": "Network Activity",
        "category_uid": 4,
        "category_name": "Network Activity",
        # 5 Refuse: the connection was refused; 6 Traffic: a report of traffic (let through)
        "activity_id": 5 if dropped else 6,
        "activity_name": "Refuse" if dropped else "Traffic",
        "type_uid": NETWORK_ACTIVITY * 100 + (5 if dropped else 6),
        "severity_id": LOW if dropped else INFORMATIONAL,
        "action_id": 2 if dropped else 1,
        "action": "Denied" if dropped else "Allowed",
        "disposition_id": 6 if dropped else 15,
        "disposition": "Dropped" if dropped else "Detected",
    }


def network_activity(
    workload_id: str,
    *,
    time: float,
    direction: str,
    src: str,
    dst: str,
    proto: str,
    sport: int | None,
    dport: int | None,
    rule_id: str | None,
    action: str,
    count: int = 1,
    end_time: float | None = None,
) -> dict[str, Any]:
    """An agent's drop (``action`` "drop") or would-drop (observe mode) as Network Activity;
    with ``end_time``, drops folded together: ``time`` and ``start_time`` the first, ``end_time``
    the last (OCSF's ``count`` is of the events between the two)."""
    dropped = action == "drop"
    src_ep: dict[str, Any] = {"ip": src}
    dst_ep: dict[str, Any] = {"ip": dst}
    if sport is not None:
        src_ep["port"] = sport
    if dport is not None:
        dst_ep["port"] = dport
    # the reporting workload is the destination of an inbound drop, the source of an outbound one
    (dst_ep if direction == "inbound" else src_ep)["instance_uid"] = workload_id
    rule = rule_id or "default"
    what = "dropped" if dropped else "would drop (observe mode)"
    event: dict[str, Any] = {
        **_drop_class(dropped),
        "time": _ms(time),
        "count": count,
        "message": f"{workload_id}: {direction} {proto} {src} -> {dst}:{dport if dport is not None else '-'} {what}"
        f" (rule {rule})",
        "metadata": _metadata(f"{workload_id}:{_ms(time)}:{src}:{dst}:{dport}", "drops", ["security_control"]),
        "src_endpoint": src_ep,
        "dst_endpoint": dst_ep,
        "connection_info": {"direction_id": 1 if direction == "inbound" else 2, "protocol_name": proto},
        "unmapped": {"ringfence": {"workload_id": workload_id, "rule_id": rule_id, "observed": action}},
    }
    if end_time is not None:
        event["start_time"], event["end_time"] = _ms(time), _ms(end_time)
    num = {"tcp": 6, "udp": 17, "icmp": 1, "icmpv6": 58}.get(proto)
    if num is not None:
        event["connection_info"]["protocol_num"] = num
    return event


def drops_suppressed(
    workload_id: str,
    *,
    action: str,
    events: int,
    count: int,
    first: float,
    last: float,
    window_start: float,
    window: float,
    budget: int,
    seq: int,
) -> dict[str, Any]:
    """The summary of a workload's drop events (of one ``action``) not sent past its SIEM budget in
    a window: Network Activity as its drops (``count`` their drops, ``start_time``/``end_time``
    their first and last), no endpoints, the numbers in ``unmapped.ringfence.suppressed``."""
    dropped = action == "drop"
    what = "drop" if dropped else "would-drop"
    start = _ms(window_start)
    return {
        **_drop_class(dropped),
        "time": _ms(last),
        "start_time": _ms(first),
        "end_time": _ms(last),
        "count": count,
        "message": f"{workload_id}: {events} {what} event(s) ({count} {what}(s)) suppressed past the SIEM budget of "
        f"{budget} per {window:g} s (the agent's report batches keep them)",
        "metadata": _metadata(f"{workload_id}:suppressed:{start}:{action}:{seq}", "drops", ["security_control"]),
        "unmapped": {
            "ringfence": {
                "workload_id": workload_id,
                "observed": action,
                "suppressed": {
                    "events": events,
                    "drops": count,
                    "window_start": start,
                    "window_seconds": window,
                    "budget": budget,
                },
            }
        },
    }


def detection_finding(
    uid: str,
    *,
    title: str,
    time: float,
    severity_id: int,
    resource: str,
    analytic: str,
    message: str,
    detail: dict[str, Any] | None = None,
) -> dict[str, Any]:
    """A finding (``analytic`` names the check, e.g. ``privileged-label-change``) as Detection Finding."""
    return {
        "class_uid": DETECTION_FINDING,
        "class_name": "Detection Finding",
        "category_uid": 2,
        "category_name": "Findings",
        "activity_id": 1,
        "activity_name": "Create",
        "type_uid": DETECTION_FINDING * 100 + 1,
        "severity_id": severity_id,
        "status_id": 1,
        "time": _ms(time),
        "message": message,
        "metadata": _metadata(uid, "findings"),
        "finding_info": {
            "uid": uid,
            "title": title,
            "analytic": {"name": analytic, "uid": analytic, "type_id": 1},  # 1: Rule
            "types": [analytic],
        },
        "resources": [{"uid": resource, "type": "workload"}],
        "unmapped": {"ringfence": detail or {}},
    }
