"""Configuration and the wiring every control-plane service uses (store, publisher, signer, queues),
whatever runs it: :class:`ringfence.clouds.aws.wiring.Wiring` in AWS,
:class:`ringfence.local.wiring.LocalWiring` on one machine."""

from __future__ import annotations

import json
import logging
import os
import random
import threading
import time
from collections.abc import Callable, Iterable, Mapping
from contextvars import ContextVar
from dataclasses import dataclass, field
from typing import Any

from ringfence.audit import AuditRecord
from ringfence.cmdb import WORKLOAD_ID
from ringfence.labels import LabelMapper
from ringfence.policy import Policy, load_policy_texts
from ringfence.siem import DROP_BUDGET, DROP_WINDOW, Siem
from ringfence.store.base import (
    OWED_SLOT_DIGITS,
    AuditedChange,
    InventoryRecord,
    OwedMark,
    OwedNotMarked,
    PolicyVersion,
    Store,
)
from ringfence.versions import digest_of

from .enroll import Enroller, enroll_pairing
from .publish import NoNotifier, Notifier, Publisher

log = logging.getLogger("ringfence.aws")

Metric = Callable[[str, float], None]

# The environment one Lambda function has beyond the process's, while it runs: on AWS each function
# has its own environment and this stays empty; an in-process host of several functions
# (:mod:`ringfence.local.lambdas`) sets it around one function's invocations, so that only compute
# sees RINGFENCE_SIGNING_KEY (it is never in the shared process environment, which
# ``ringfence serve`` — the agent API — inherits in the demo).
FUNCTION_ENV: ContextVar[Mapping[str, str] | None] = ContextVar("ringfence_function_env", default=None)


def no_metric(name: str, value: float) -> None:
    return None


# the metric a change stored whose compute message failed counts toward (a CloudWatch alarm
# watches it): its workloads' bundles and their peers' sets do not follow it until a retry
COMPUTE_NOT_QUEUED = "ComputeNotQueued"
# a failed hand-off's owed mark that could not be written either (owe_compute): only the window's
# re-send of tombstones (hand_on_gone_again) is left to hand it on
COMPUTE_OWED_NOT_MARKED = "ComputeOwedNotMarked"
# owed marks whose id names no workload, deleted by a drain unsent (hand_on_owed)
OWED_MARKS_MALFORMED = "OwedMarksMalformed"
# the owed marks one scheduled pass hands on (the rest: the next pass's), the marks it reads of each
# writer's partition to choose them from (sort key, nonce and urgency only: a few MB), and the ids of each hand-off of
# them (one refused keeps only its own marks)
OWED_READ_LIMIT = 5000
OWED_SCAN_LIMIT = 50000
OWED_CHUNK = 500
# chooses among the marks read: not predictable by a writer of the partition
_owed_rng = random.SystemRandom()


class NotQueued(Exception):
    """An admin change is stored and audited but its compute message could not be sent (the queue
    refused it): bundles and peers' sets keep what they had until compute takes the records.
    ``done``: what was stored, as the answer says it ("bound", "quarantined", ...); ``target``:
    for what (a workload id, a CMDB file); ``audit_id``: the change's record (None: nothing was
    changed by this call, a retry of one already stored, ``done`` then says why). The same
    request again queues compute (each caller says how its retry gets there)."""

    def __init__(self, done: str, target: str, audit_id: str | None, cause: BaseException, again: str = "") -> None:
        super().__init__(f"{target}: {done}; compute not queued ({type(cause).__name__}: {cause})")
        self.done = done
        self.target = target
        self.audit_id = audit_id
        # when the same request again queues compute, where not always (a provisioning's: only
        # while its version is the active one)
        self.again = again or "the same request again queues it"
        # for the answer: the type and AWS error code only. The error's text (logged in full)
        # can name role sessions, queue and key ARNs a caller has no need to see
        response = getattr(cause, "response", None)
        code = response.get("Error", {}).get("Code") if isinstance(response, dict) else None
        self.cause = f"{type(cause).__name__}: {code}" if code else type(cause).__name__


def queue_stored(
    w: BaseWiring,
    ids: Iterable[str],
    done: str,
    target: str,
    audit_id: str | None,
    *,
    rebuild: bool = False,
    again: str = "",
    urgent: bool = False,
) -> None:
    """Compute for ``ids`` (``rebuild``: for every workload, a policy provisioned) after a change
    is stored, or :class:`NotQueued` (logged, counted as ``ComputeNotQueued``): never a bare
    failure, whose caller would not know the change is in the store but not enforced.
    ``urgent``: an administrator's change, in the priority lane (:meth:`BaseWiring.enqueue_compute`)."""
    try:
        w.enqueue_compute(ids, rebuild=rebuild, urgent=urgent)
    except Exception as exc:
        log.exception("%s: %s (audit record %s) but compute could not be queued", target, done, audit_id)
        w.metric(COMPUTE_NOT_QUEUED, 1)
        raise NotQueued(done, target, audit_id, exc, again) from exc


def hand_on_stored(
    w: BaseWiring, ids: Iterable[str], what: str, metric: Metric | None = None, *, urgent: Iterable[str] = ()
) -> None:
    """Compute and the perimeter for ``ids``, stored by a step that then failed (``urgent``: those
    of them that gave their addresses back, computed in the priority lane), while the step's own
    failure propagates for its queue to retry: the redelivery finds the record equal to its
    observation, stores nothing and would hand nothing on. Compute and the perimeter take records
    as stored, so a hand-off too many is harmless, a lost one is not. A failure to queue either is
    logged and counted (``ComputeNotQueued``), never raised over the step's own; compute's is
    marked owed (:func:`owe_compute`) for the scheduled passes to hand on."""
    ids, first, rest = _lanes(ids, urgent)
    if not ids:
        return
    try:
        if first:
            w.enqueue_compute(first, urgent=True)
        w.enqueue_compute(rest)
    except Exception:
        log.exception("%s: %s stored but compute could not be queued", what, ", ".join(ids))
        (metric or w.metric)(COMPUTE_NOT_QUEUED, 1)
        owe_compute(w, ids, what, metric, urgent=first)
    try:
        # as a delivery's own hand-off (AWS Ingest._hand_on): the instances' security groups
        # follow a move too (a no-op where no perimeter is managed)
        w.enqueue_perimeter(ids)
    except Exception:
        log.exception("%s: %s stored but the perimeter could not be queued", what, ", ".join(ids))
        (metric or w.metric)(COMPUTE_NOT_QUEUED, 1)


def hand_on_gone_again(
    w: BaseWiring,
    records: Iterable[InventoryRecord],
    mine: Callable[[InventoryRecord], bool],
    handed: Iterable[str],
    what: str,
    metric: Metric | None = None,
    now: float | None = None,
) -> list[str]:
    """A scheduled pass (AWS reconcile, Azure's subscription pass, GCP's sync) hands to compute,
    in the priority lane, the workloads of its scope (``mine``) among ``records`` stored gone
    (terminated) within ``w.cfg.gone_resend_window`` seconds that it did not hand on itself
    (``handed``). A pass that stored a tombstone and then failed to hand it on is retried (a
    Lambda retry, the next schedule) with nothing more to store for it: no event source
    redelivers it, and compute would keep the workload in its peers' sets. Compute takes records
    as stored: a removal it applied already changes nothing (no set delta, no bundle). All of
    them, every pass: a pass dates its tombstones alike (its listing's time), so a cap by recency
    would send the same ones each pass and never the rest (AWS sends 500 ids a message, one
    machine's worker takes any number). A failure to queue is logged and counted
    (``ComputeNotQueued``), never raised (the next pass sends them again), and marks them owed
    (:func:`owe_compute`): handed on by a pass past the window too. The ids sent."""
    metric = metric or w.metric
    since = (time.time() if now is None else now) - w.cfg.gone_resend_window
    done = set(handed)
    gone = [r for r in records if r.state == "terminated" and r.observed_at >= since and r.id not in done and mine(r)]
    ids = sorted(r.id for r in gone)
    if not ids:
        return []
    try:
        w.enqueue_compute(ids, urgent=True)
    except Exception:
        log.exception(
            "%s: %d stored gone (%s) but compute could not be queued again", what, len(ids), ", ".join(ids[:20])
        )
        metric(COMPUTE_NOT_QUEUED, 1)
        # owed past the window too: an outage longer than it lost these removals for good
        owe_compute(w, ids, what, metric, urgent=ids)
        return []
    return ids


def _lanes(ids: Iterable[str], urgent: Iterable[str]) -> tuple[list[str], list[str], list[str]]:
    """``ids`` sorted and deduplicated, then split into the priority lane's (those also in
    ``urgent``) and the ordinary lane's."""
    every = sorted(set(ids))
    chosen = set(urgent) & set(every)
    return every, sorted(chosen), [i for i in every if i not in chosen]


def owe_compute(
    w: BaseWiring, ids: Iterable[str], what: str, metric: Metric | None = None, *, urgent: Iterable[str] = ()
) -> None:
    """Mark ``ids`` owed to compute in the store (``urgent``: those of them for the priority lane)
    after their hand-off failed: the next scheduled pass hands them on (:func:`hand_on_owed`),
    however long the queue stays unreachable. Best effort: a failure to write the marks is logged
    and counted (``ComputeOwedNotMarked``), never raised over the hand-off's own failure (the
    window's re-send of tombstones, :func:`hand_on_gone_again`, still covers those). Each lane is
    written apart, each mark apart (a failed one costs no other), and each mark not written is
    counted once."""
    ids, first, rest = _lanes(ids, urgent)
    if not ids:
        return
    failed: list[str] = []
    for lane, is_urgent in ((first, True), (rest, False)):
        if not lane:
            continue
        try:
            w.store.owe_compute(lane, urgent=is_urgent)
        except OwedNotMarked as exc:
            log.error("%s: %s", what, exc, exc_info=exc)
            failed += exc.ids
        except Exception:
            log.exception("%s: %d marks owed to compute not written", what, len(lane))
            failed += lane
    if failed:
        log.error("%s: %s not handed to compute, and could not be marked owed either", what, ", ".join(failed))
        (metric or w.metric)(COMPUTE_OWED_NOT_MARKED, len(failed))


def _fair_share(groups: list[list[OwedMark]], room: int) -> list[OwedMark]:
    """At most ``room`` of ``groups``' marks, shared evenly (the smallest groups whole, what they
    leave to the larger), each group's share its urgent marks first, then its ordinary ones, each
    lane's at random. Groups of one size are taken in random order: when the room is smaller than
    the number of groups, those left without a share are not the same ones every pass."""
    chosen: list[OwedMark] = []
    groups = list(groups)
    _owed_rng.shuffle(groups)
    groups.sort(key=len)  # stable: equal sizes keep the shuffled order
    for n, group in enumerate(groups):
        share = (room - len(chosen)) // (len(groups) - n)
        urgent = [m for m in group if m.urgent]
        ordinary = [m for m in group if not m.urgent]
        first = _owed_rng.sample(urgent, min(share, len(urgent)))
        chosen += first + _owed_rng.sample(ordinary, min(share - len(first), len(ordinary)))
    return chosen


def _by_partition(marks: list[OwedMark]) -> list[list[OwedMark]]:
    """``marks`` grouped by the partition each was read in."""
    groups: dict[str, list[OwedMark]] = {}
    for m in marks:
        groups.setdefault(m.partition, []).append(m)
    return list(groups.values())


def hand_on_owed(w: BaseWiring, what: str, metric: Metric | None = None) -> list[str]:
    """A scheduled pass hands to compute the workloads marked owed (:func:`owe_compute`), of any
    age and any scope (compute takes records as stored: one hand-off too many is harmless, and a
    mark names no cloud to filter by), the urgent ones in the priority lane: at most
    :data:`OWED_READ_LIMIT` marks a pass (the rest are the next pass's), chosen among the first
    :data:`OWED_SCAN_LIMIT` read of each writer's partition (:func:`~ringfence.store.base.owed_key`
    order from a random slot round, within the store's read budget per partition:
    :data:`~ringfence.store.base.OWED_PAGE_BUDGET`), each partition its fair share
    (:func:`_fair_share`), urgent ones first within it, at random among equals: a backlog, or a
    writer planting marks of either lane (only its own partition is granted to it), neither holds
    another writer's mark of either lane back nor pins the window. Each lane goes in chunks of
    :data:`OWED_CHUNK` ids, and the marks of each chunk queued are deleted, each only while it holds the nonce read (a mark written again by a newer failure
    meanwhile stays for the next pass): a refused chunk keeps its own marks and no other. A mark
    whose id is no workload id (:data:`~ringfence.cmdb.WORKLOAD_ID`; any writer of a partition
    can make one, e.g. kilobytes of control characters) is deleted unsent and counted
    (``OwedMarksMalformed``), at most :data:`OWED_READ_LIMIT` a pass, each partition its fair
    share of them too. A failure is logged and counted, never raised. The ids queued."""
    metric = metric or w.metric
    try:
        # from a random slot round (owed_key: slots hashed from the ids are uniform over the marks
        # present, whatever the ids' shapes): a backlog's first keys cannot keep the rest unread
        start = f"{_owed_rng.getrandbits(4 * OWED_SLOT_DIGITS):0{OWED_SLOT_DIGITS}x}"
        marks = w.store.owed_compute(limit=OWED_SCAN_LIMIT, start=start)
    except Exception:
        log.exception("%s: the workloads owed to compute could not be read", what)
        metric(COMPUTE_NOT_QUEUED, 1)
        return []
    named: list[OwedMark] = []
    bad: list[OwedMark] = []
    for m in marks:
        (named if WORKLOAD_ID.fullmatch(m.workload_id) else bad).append(m)
    # the room is shared among the writers' partitions first, and each spends its share on its
    # urgent marks first: one writer's flood of urgent marks spends its own share alone, never the
    # room of another writer's ordinary marks (a revocation of peer access among them)
    good = _fair_share(_by_partition(named), OWED_READ_LIMIT)
    # each pass deletes at most as many malformed marks as it hands on, shared alike: one
    # writer's flood of them neither keeps another partition's undeleted nor out of the log
    # and count (each a lead to a role of its own)
    bad = _fair_share(_by_partition(bad), OWED_READ_LIMIT)
    if bad:
        # named escaped and cut short: the id is anyone's with a grant to the partition
        # and where: only a writer of that partition makes one (the alarm's lead to its role)
        log.warning(
            "%s: %d owed marks name no workload (deleted unsent), in %s, e.g. %s",
            what,
            len(bad),
            ", ".join(sorted({m.partition or "the store's marks" for m in bad})),
            ascii(bad[0].workload_id[:64]),
        )
        metric(OWED_MARKS_MALFORMED, len(bad))
        try:
            w.store.settle_owed(bad)
        except Exception:
            log.exception("%s: %d malformed owed marks not deleted (the next pass tries again)", what, len(bad))
    queued: list[str] = []
    for urgent in (True, False):
        lane = sorted((m for m in good if m.urgent == urgent), key=lambda m: m.workload_id)
        for n in range(0, len(lane), OWED_CHUNK):
            chunk = lane[n : n + OWED_CHUNK]
            # one id marked by two writers is one hand-off; both marks are settled with it
            ids = list(dict.fromkeys(m.workload_id for m in chunk))
            try:
                w.enqueue_compute(ids, urgent=urgent)
            except Exception:
                log.exception("%s: %d workloads owed to compute could not be queued (kept owed)", what, len(ids))
                metric(COMPUTE_NOT_QUEUED, 1)
                continue
            queued += ids
            try:
                w.store.settle_owed(chunk)
            except Exception:
                # queued: the marks left are handed on again by the next pass, harmlessly
                log.exception("%s: %d workloads handed to compute but their owed marks not all deleted", what, len(ids))
    if queued:
        log.info("%s: handed %d workloads owed to compute on", what, len(queued))
    return queued


class NoSigningKey(RuntimeError):
    """A function without the signing key was asked to sign."""


class BatchDeadline(Exception):
    """A batch's invocation is nearly out of time: this event was not reached and fails, to be
    retried by its queue (:meth:`BaseWiring.check_deadline`)."""


# what a batch keeps of its invocation's time for an event already under way and its end (the
# hand-off of what it changed): an ingest invocation has 60 s; one killed by its timeout fails
# every event of the batch, the other accounts' too, and hands nothing on
BATCH_RESERVE_S = 15.0


class PolicyTampered(RuntimeError):
    """A policy version's files, as read, are not the ones its recorded digest names (changed in
    the bucket after provisioning), or one of them is gone: never compiled, never enforced."""


def _object_missing(exc: BaseException) -> bool:
    """``exc`` says the object is not there (removed from the bucket), not that it could not be
    read now (throttled, unreachable): only the first is a version's files no longer being its own."""
    if isinstance(exc, FileNotFoundError):
        return True
    code = str(getattr(exc, "response", {}).get("Error", {}).get("Code", ""))
    return code in {"NoSuchKey", "404", "NotFound"}


# --- configuration ------------------------------------------------------------------------------


# the lifecycle hooks' names docs/deploy-aws.md has users create (LifecycleHookNames' default)
DEFAULT_LIFECYCLE_HOOK_NAMES = ("ringfence-launch", "ringfence-terminate")


@dataclass
class Target:
    account: str
    region: str
    role_arn: str | None = None


@dataclass
class Config:
    inventory_table: str = ""
    state_table: str = ""
    audit_table: str = ""
    bucket: str = ""
    compute_queue_url: str = ""
    # compute's priority lane (urgent requests: an administrator's change, a workload leaving),
    # read by the same compute function; empty: urgent requests take the compute queue too
    compute_priority_queue_url: str = ""
    # empty: compute signs, stores and nudges itself; else it fans that out over this queue to
    # the publish function (ringfence.control.fanout)
    publish_queue_url: str = ""
    perimeter_queue_url: str = ""  # empty: no event-path perimeter (the schedule alone reconciles)
    dlq_url: str = ""
    signing_key_ref: str = ""
    kms_key_id: str | None = None
    iid_cert_pem: str = ""
    websocket_endpoint: str | None = None
    offline_after: int = 900
    # the access token's lifetime: agents renew it before it ends with a signature by their key
    token_ttl: int = 3600
    # signed bundles expire bundle_ttl seconds after signing; compute re-signs those expiring
    # within bundle_refresh_before when the schedule (reconcile) asks (docs/bundle.md, Expiry)
    bundle_ttl: int = 7 * 86400
    bundle_refresh_before: int = 4 * 86400
    nonce_ttl: int = 300
    # the agent API's long-poll (GET /v1/agents/{id}/wait): at most max_wait seconds per request
    # (API Gateway ends a request at 29 s); while requests wait, one thread per process reads the
    # engine head every wait_poll_interval seconds and wakes them when it moved (changes.py)
    max_wait: float = 25.0
    wait_poll_interval: float = 1.0
    # when compute releases a launch held by the lifecycle hook: "publish" (once the perimeter is
    # attached and the bundle and the peers' deltas are published) or "agent" (once, as well, the
    # new instance's agent reported a bundle applied through the agent API: enforced before
    # InService; without an agent the hook times out into its default result). Only compute
    # completes lifecycle actions (ringfence.control.launchgate).
    lifecycle_gate: str = "publish"
    # the lifecycle hooks that are Ringfence's (exact names): an action of any other hook on a
    # gated group (another team's bootstrap or log drain) is neither held nor completed, only
    # logged and counted (LifecycleActionsNotOurs); the event rule passes only these names too.
    # Empty (refused by both deployments): no action is completed, each is counted
    # LifecycleLeftToTimeout; publishing goes on
    lifecycle_hook_names: list[str] = field(default_factory=lambda: list(DEFAULT_LIFECYCLE_HOOK_NAMES))
    # GatedGroupNames: the Auto Scaling groups (IAM wildcards) whose lifecycle actions compute may
    # complete; reconcile reports their launch hooks that hold launches under an unlisted name
    gated_group_names: str = "*"
    # enrollment methods the agent API accepts: EC2 agents send aws-iid; aws-sts (server side only),
    # azure-attested, gcp-jwt and pairing are off unless the stack lists them (fewer doors to
    # guard); the local control plane: pairing only
    enroll_methods: list[str] = field(default_factory=lambda: ["aws-iid"])
    allowed_accounts: list[str] = field(default_factory=list)
    # aws-sts: the STS origins replayed to (exact scheme, host and port); empty: AWS's STS host
    # names over https only (sts.amazonaws.com, sts.<region>.amazonaws.com[.cn])
    sts_endpoints: list[str] = field(default_factory=list)
    account_roles: dict[str, str] = field(default_factory=dict)
    # the perimeter's own roles in member accounts (security-group writes): apart from the read-only
    # ones above, which the internet-facing agent API may assume too
    perimeter_account_roles: dict[str, str] = field(default_factory=dict)
    # compute's role in member accounts (the name; the account's own ARN is built from its
    # account_roles entry): CompleteLifecycleAction there, nothing else. Empty: member accounts'
    # lifecycle actions are not completed (counted LifecycleLeftToTimeout)
    member_lifecycle_role_name: str = ""
    targets: list[Target] = field(default_factory=list)
    # where audit records, agents' drops and findings also go (ringfence.siem): "" for nowhere
    siem: str = ""
    # agents' folded drop events sent per workload per window (0: no budget); past it a summary
    siem_drop_budget: int = DROP_BUDGET
    siem_drop_window: float = DROP_WINDOW
    # how long after a workload is stored gone each scheduled pass hands it to compute again
    # (hand_on_gone_again): the pass that stored it may have failed to; at least two schedule
    # periods (the default: four of the default 15 minutes)
    gone_resend_window: float = 3600.0
    # the function marking workloads owed in its own partition (OWED_WRITERS; "" it marks none):
    # named by its app in code, as its role's grant names it, never read from the environment
    owed_writer: str = ""

    @classmethod
    def from_env(cls, env: dict[str, str] | None = None, *, owed_writer: str = "") -> Config:
        e = {**os.environ, **(FUNCTION_ENV.get() or {})} if env is None else env
        return cls(
            owed_writer=owed_writer,
            inventory_table=e.get("RINGFENCE_INVENTORY_TABLE", ""),
            state_table=e.get("RINGFENCE_STATE_TABLE", ""),
            audit_table=e.get("RINGFENCE_AUDIT_TABLE", ""),
            bucket=e.get("RINGFENCE_BUCKET", ""),
            compute_queue_url=e.get("RINGFENCE_COMPUTE_QUEUE_URL", ""),
            compute_priority_queue_url=e.get("RINGFENCE_COMPUTE_PRIORITY_QUEUE_URL", ""),
            publish_queue_url=e.get("RINGFENCE_PUBLISH_QUEUE_URL", ""),
            perimeter_queue_url=e.get("RINGFENCE_PERIMETER_QUEUE_URL", ""),
            dlq_url=e.get("RINGFENCE_DLQ_URL", ""),
            signing_key_ref=e.get("RINGFENCE_SIGNING_KEY", ""),
            kms_key_id=e.get("RINGFENCE_KMS_KEY_ID") or None,
            iid_cert_pem=e.get("RINGFENCE_IID_CERT", ""),
            websocket_endpoint=e.get("RINGFENCE_WEBSOCKET_ENDPOINT") or None,
            offline_after=int(e.get("RINGFENCE_OFFLINE_AFTER", "900")),
            token_ttl=int(e.get("RINGFENCE_TOKEN_TTL", "3600")),
            bundle_ttl=int(e.get("RINGFENCE_BUNDLE_TTL", str(7 * 86400))),
            bundle_refresh_before=int(e.get("RINGFENCE_BUNDLE_REFRESH_BEFORE", str(4 * 86400))),
            nonce_ttl=int(e.get("RINGFENCE_NONCE_TTL", "300")),
            max_wait=min(25.0, float(e.get("RINGFENCE_MAX_WAIT", "25"))),
            wait_poll_interval=max(0.05, float(e.get("RINGFENCE_WAIT_POLL_INTERVAL", "1"))),
            lifecycle_gate=_gate(e.get("RINGFENCE_LIFECYCLE_GATE", "publish")),
            lifecycle_hook_names=_hook_names(
                e.get("RINGFENCE_LIFECYCLE_HOOK_NAMES", ",".join(DEFAULT_LIFECYCLE_HOOK_NAMES))
            ),
            gated_group_names=e.get("RINGFENCE_GATED_GROUP_NAMES", "*") or "*",
            enroll_methods=[m for m in e.get("RINGFENCE_ENROLL_METHODS", "aws-iid").split(",") if m],
            allowed_accounts=[a for a in e.get("RINGFENCE_ALLOWED_ACCOUNTS", "").split(",") if a],
            sts_endpoints=[u for u in e.get("RINGFENCE_STS_ENDPOINTS", "").split(",") if u],
            account_roles=json.loads(e.get("RINGFENCE_ACCOUNT_ROLES", "{}") or "{}"),
            perimeter_account_roles=json.loads(e.get("RINGFENCE_PERIMETER_ACCOUNT_ROLES", "{}") or "{}"),
            member_lifecycle_role_name=e.get("RINGFENCE_MEMBER_LIFECYCLE_ROLE", ""),
            targets=[Target(**t) for t in json.loads(e.get("RINGFENCE_RECONCILE_TARGETS", "[]") or "[]")],
            siem=e.get("RINGFENCE_SIEM", ""),
            siem_drop_budget=int(e.get("RINGFENCE_SIEM_DROP_BUDGET", str(DROP_BUDGET))),
            siem_drop_window=float(e.get("RINGFENCE_SIEM_DROP_WINDOW", str(DROP_WINDOW))),
            gone_resend_window=float(e.get("RINGFENCE_GONE_RESEND_WINDOW", "3600")),
        )


def _gate(value: str) -> str:
    if value not in ("publish", "agent"):
        raise ValueError(f"RINGFENCE_LIFECYCLE_GATE must be publish or agent, not {value!r}")
    return value


def _hook_names(value: str) -> list[str]:
    names = [n.strip() for n in value.split(",") if n.strip()]
    if not names:
        # both deployments refuse an empty list (SAM Rules, Terraform validation). Not refused
        # here: compute and lifecycle would then fail every batch, publishing included. With no
        # hook of ours nothing is completed (each action is logged and counted
        # LifecycleLeftToTimeout, alarmed); everything else goes on
        log.error(
            "RINGFENCE_LIFECYCLE_HOOK_NAMES names no lifecycle hook: no lifecycle action will be completed "
            "(each times out into its hook's default result); set LifecycleHookNames / lifecycle_hook_names"
        )
    return names


class BaseWiring:
    """What the services (AgentApi, Admin, Compute, Ingest) use, whatever runs them: the AWS
    :class:`Wiring` here, :class:`ringfence.local.wiring.LocalWiring` on one machine. Subclasses
    provide ``signer``, ``enqueue_compute``, ``wait_for_change`` and ``ec2_for``; the policy
    cache and the tag→label mapper are the same everywhere."""

    cfg: Config
    store: Store
    publisher: Publisher
    mapper_ttl = 30.0  # seconds; a DynamoDB read saved per event in a storm
    # agents' reports folded into flow rows as they arrive (on one machine: no S3 event to do it;
    # on AWS the flows function does it on the reports/ object's event)
    flows_inline = False
    # an enrollment may record its instance, as the enroller just read it from the cloud, when no
    # event has yet: not on AWS, whose agent-API role writes no inventory record beyond an agent's
    # liveness (a compromised agent API must not rewrite labels); there the launch event, or
    # reconcile, records it a moment later
    enroll_records_instance = True

    def __init__(self, cfg: Config, store: Store, publisher: Publisher) -> None:
        self.cfg = cfg
        # enrollment method → the proof it checks; a cloud's wiring adds its own methods
        self.enrollers: dict[str, Enroller] = {"pairing": enroll_pairing}
        self.store = store
        self.publisher = publisher
        # what the services count (serve's GET /metrics; a Lambda function's CloudWatch metrics,
        # when its handler sets one)
        self.metric: Metric = no_metric
        self.siem: Siem | None = (
            Siem.from_spec(cfg.siem, cfg.siem_drop_budget, cfg.siem_drop_window) if cfg.siem else None
        )
        self._policies: dict[int, Policy] = {}
        self._mapper: tuple[float, LabelMapper | None] | None = None
        # one load of a policy (or the mapper) however many threads ask at once: when a fleet
        # enrolled together, each of serve's threads read the same seven files from the bucket
        self._policy_lock = threading.Lock()
        self._mapper_lock = threading.Lock()
        # (account, region, instance) → (describe time, instance or None): valid for one batch
        self.prefetched: dict[tuple[str, str, str], tuple[float, dict[str, Any] | None]] = {}
        # the governing policy, read once in a batch (begin_batch → end_batch); None: no batch open
        self._batch_policy: list[tuple[PolicyVersion, Policy] | None] | None = None
        # (account, region) → why the cloud there failed this batch (throttled, refused,
        # unreachable): the batch's other events there fail at once instead of asking again
        self.unavailable: dict[tuple[str, str], str] = {}
        # the seconds the batch's invocation has left (None: no deadline)
        self._time_left: Callable[[], float] | None = None
        # the calls a batch's read may make in all (None: the cloud client's default)
        self.read_attempts: int | None = None

    def audit(self, rec: AuditRecord) -> AuditRecord:
        """Append ``rec`` to the store's hash chain and send the sealed record to the SIEM (if one
        is configured; a SIEM failure is logged, never the action's)."""
        sealed = self.store.audit(rec)
        if self.siem is not None:
            self.siem.audit(sealed)
        return sealed

    def audit_with(self, rec: AuditRecord, change: AuditedChange) -> AuditRecord:
        """:meth:`audit` with ``change`` made in the same store transaction
        (:meth:`Store.audit_with`); the record goes to the SIEM only once that committed (a change
        refused, :class:`~ringfence.store.base.ChangeFailed`, wrote no record: none is sent)."""
        sealed = self.store.audit_with(rec, change)
        if self.siem is not None:
            self.siem.audit(sealed)
        return sealed

    @property
    def signer(self) -> Any:
        raise NotImplementedError

    def ec2_for(self, account: str, region: str, *, batch: bool = False) -> Any:
        """EC2 in ``account``/``region``; ``batch``: for a batch's reads, whose retries are short
        (another account's events wait on them)."""
        raise NotImplementedError

    def autoscaling_for(self, account: str, region: str, *, batch: bool = False) -> Any:
        """The Auto Scaling client that confirms a terminate lifecycle action."""
        raise NotImplementedError

    def complete_lifecycle(self, lc: dict[str, Any], instance_id: str) -> None:
        """Let a held launch or termination go on (Auto Scaling's CompleteLifecycleAction in AWS)."""
        raise NotImplementedError("this control plane has no lifecycle hooks")

    def default_notifier(self) -> Notifier:
        """How compute nudges connected agents when no notifier is given (none by default)."""
        return NoNotifier()

    def enqueue_compute(
        self,
        ids: Iterable[str] = (),
        *,
        rebuild: bool = False,
        lifecycle: dict[str, Any] | None = None,
        publish: list[str] | None = None,
        enforced: list[str] | None = None,
        refresh: bool = False,
        lifecycles: list[dict[str, Any]] | None = None,
        reissue: dict[str, int] | None = None,
        urgent: bool = False,
    ) -> None:
        """Ask compute to take these workloads' inventory (and a lifecycle action, a rebuild,
        re-renders or a refresh of bundles near expiry) into the engine; nothing is sent when
        there is nothing to do. ``enforced``: instances whose agent now enforces (the agent API,
        lifecycle gate "agent"). ``lifecycles``: several lifecycle actions in one message (a
        batch's), each taken as if it came with ``lifecycle`` (:func:`ringfence.control.compute.
        one_action_each`). ``reissue``: workload → a version its agent holds above every one
        published for it, to be issued a whole bundle above it (``Compute._reissue``).

        ``urgent``: an administrator's change (a quarantine, a mode, a binding, a policy) or a
        workload giving its addresses back for reuse (they must leave its peers' allow sets,
        :func:`ringfence.store.base.releases_addresses`): sent in compute's
        priority lane, so it never waits behind a backlog of ordinary changes (a tag storm's).
        Compute takes every workload's record as stored when it runs, so the order between the
        two lanes changes nothing but how soon each is computed."""
        ids = list(dict.fromkeys(ids))
        if (
            not ids
            and not rebuild
            and lifecycle is None
            and not publish
            and not enforced
            and not refresh
            and not lifecycles
            and not reissue
        ):
            return
        message: dict[str, Any] = {"ids": ids, "rebuild": rebuild, "lifecycle": lifecycle, "publish": publish or []}
        if lifecycles:
            message["lifecycles"] = list(lifecycles)
        if enforced:
            message["enforced"] = list(enforced)
        if refresh:
            message["refresh"] = True
        if reissue:
            message["reissue"] = dict(reissue)
        self.send_compute(message, urgent=urgent)

    def send_compute(self, message: dict[str, Any], *, urgent: bool = False) -> None:
        """Deliver one compute message (the compute queue in AWS, the worker thread on one
        machine); ``urgent``: in the priority lane, where there is one."""
        raise NotImplementedError

    def send_publish(self, message: dict[str, Any]) -> None:
        """Deliver one publish job (:class:`ringfence.control.fanout.PublishJob` as JSON) to the
        publish workers (the publish queue in AWS)."""
        raise NotImplementedError("this control plane publishes in compute (no publish queue)")

    def wait_for_change(self, seconds: float, workload_id: str | None = None) -> None:
        """Return when published state may have changed (for ``workload_id``, or for anyone), or
        after ``seconds``."""
        raise NotImplementedError

    def change_mark(self) -> int | None:
        """A mark that stays equal while no published change was seen (None: no watch to tell,
        keep nothing): :meth:`ringfence.control.changes.StoreChanges.mark`."""
        return None

    def enqueue_perimeter(self, ids: Iterable[str], *, lifecycle: dict[str, str] | None = None) -> bool:
        """Hand changed workloads to the perimeter step; False where there is none (on one machine
        no cloud perimeter is managed), so launches go straight to compute."""
        return False

    def policy(self, pv: PolicyVersion) -> Policy:
        known = self._policies.get(pv.number)
        if known is not None:
            return known
        if pv.files:
            # the control plane provisions a version's files as published objects only (the admin
            # provision path, control/admin.py): inline texts in a store's item were written there
            # by someone else, with a digest of their own choosing, so they are never compiled
            raise PolicyTampered(
                f"policy version {pv.number}: its files are inline in the store's item, which no provision "
                "writes; not loaded"
            )
        with self._policy_lock:
            if pv.number not in self._policies:
                try:
                    bodies = self.publisher.get_many(list(pv.keys.values()))
                except Exception as exc:
                    if not _object_missing(exc):
                        raise
                    raise PolicyTampered(
                        f"policy version {pv.number}: a file of it is gone from the bucket ({exc}); not loaded"
                    ) from exc
                texts = pv.texts(bodies.__getitem__)
                # the texts provisioned (and audited, by this digest), or nothing: a file rewritten
                # in the bucket fails every caller (compute's batch is retried, then alarmed)
                if digest_of(texts) != pv.digest:
                    raise PolicyTampered(
                        f"policy version {pv.number}: its files do not match its digest {pv.digest[:16]}… "
                        f"(read {digest_of(texts)[:16]}…): changed since provisioning; not loaded"
                    )
                self._policies[pv.number] = load_policy_texts(texts)
            return self._policies[pv.number]

    def active_policy(self) -> tuple[PolicyVersion, Policy] | None:
        pv = self.store.active_policy()
        return (pv, self.policy(pv)) if pv is not None else None

    def begin_batch(self, time_left: Callable[[], float] | None = None, read_attempts: int | None = None) -> None:
        """A handler's batch begins: what is prefetched for it, the places found unavailable in
        it, and the policy governing its label changes (:meth:`governing_policy`), hold until
        :meth:`end_batch`. ``time_left``: the seconds its invocation has left (a Lambda
        context's remaining time), for :meth:`check_deadline`; ``read_attempts``: the calls each
        of its reads may make (retries stop at the deadline whatever is left of them)."""
        self.prefetched.clear()
        self.unavailable.clear()
        self._time_left = time_left
        self.read_attempts = read_attempts
        self._batch_policy = []

    def end_batch(self) -> None:
        self.prefetched.clear()
        self.unavailable.clear()
        self._time_left = None
        self.read_attempts = None
        self._batch_policy = None

    def in_batch(self) -> bool:
        return self._batch_policy is not None

    def seconds_to_deadline(self) -> float | None:
        """How long until :meth:`check_deadline` raises (None: the batch has no deadline)."""
        return None if self._time_left is None else self._time_left() - BATCH_RESERVE_S

    def check_deadline(self) -> None:
        """Raise :class:`BatchDeadline` once the batch's invocation has no more than
        :data:`BATCH_RESERVE_S` left: what is not done by then fails (and is retried by its
        queue), and the batch ends in time to hand on what it did."""
        if self._time_left is not None:
            left = self._time_left()
            if left <= BATCH_RESERVE_S:
                raise BatchDeadline(
                    f"{left:.1f} s left of the invocation, {BATCH_RESERVE_S:.0f} s kept for the batch's end"
                )

    def governing_policy(self) -> tuple[PolicyVersion, Policy] | None:
        """The active policy that decides governed labels: read when asked, or once per batch
        inside :meth:`begin_batch` (a storm's batch of ten events made ten reads of it). Never
        the :meth:`mapper` cache, which may say "no policy" for its TTL after a provision."""
        if self._batch_policy is None:
            return self.active_policy()
        if not self._batch_policy:
            self._batch_policy.append(self.active_policy())
        return self._batch_policy[0]

    def _mapper_stale(self) -> bool:
        # "no policy yet" is never kept: the first events after provisioning get their labels
        # (the perimeter places a launching instance by them)
        m = self._mapper
        return m is None or m[1] is None or time.monotonic() - m[0] > self.mapper_ttl

    def mapper(self) -> LabelMapper | None:
        """The active policy's tag→label mapping, looked up at most every ``mapper_ttl`` seconds
        (for the inventory's hygiene view only: compute always resolves labels with the exact
        policy it compiles)."""
        if self._mapper_stale():
            with self._mapper_lock:
                if self._mapper_stale():
                    active = self.active_policy()
                    self._mapper = (time.monotonic(), active[1].labels if active else None)
        assert self._mapper is not None
        return self._mapper[1]
