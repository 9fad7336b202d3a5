"""The control plane's state, provider-neutral: records and the :class:`Store` interface."""

from __future__ import annotations

import enum
import functools
import hashlib
import logging
from collections.abc import Callable
from typing import TYPE_CHECKING, Any, NamedTuple, Protocol

from pydantic import BaseModel, ConfigDict, Field, model_validator

from ringfence.audit import AuditHead, AuditRecord
from ringfence.bundlewire import BundleError, ed25519_public_from_one_pem, fingerprint_of_raw
from ringfence.flows.aggregate import FlowRow
from ringfence.flows.resolve import AddressOwner
from ringfence.governance import LabelWrite
from ringfence.model import Mode, Workload
from ringfence.versions import PolicyVersion

if TYPE_CHECKING:
    from ringfence.labels import LabelMapper

# re-exported: the store persists the shared audit record and the one policy-version model
__all__ = ["AuditHead", "AuditRecord", "PolicyVersion"]

ACTIVE_STATES = frozenset({"pending", "running"})


def holds_addresses(state: str, cloud: str) -> bool:
    """Whether a record in ``state`` keeps its workload's addresses from any other: an on-premise
    workload while registered (active), a cloud instance until terminated — a stopped instance
    keeps its private address and takes it back when it starts."""
    return state in ACTIVE_STATES or (cloud != "onprem" and state != "terminated")


log = logging.getLogger("ringfence.store")

INVENTORY_RECORDS_MISMATCHED = "InventoryRecordsMismatched"


def no_metric(name: str, value: float) -> None:
    """A store's :attr:`Store.metric` until its owner sets one."""


def names_its_key(key: str, workload_id: str, metric: Callable[[str, float], None]) -> bool:
    """Whether an inventory record's workload (``workload_id``, the id in its ``workload``) is the
    one it is stored under (``key``). Why: the quarantine and the operator's mode are looked up by
    the key, the engine keys a workload by the id in its document, and the event-fed roles may write
    any key's cloud fields (a new key too): a record under another key naming a quarantined
    workload would have it published unquarantined, and two records naming one workload stopped
    every rebuild. One that does not is left out of every read, logged naming both ids and counted
    (``InventoryRecordsMismatched``); no writer of ours stores one (each writes its record's id)."""
    if key == workload_id:
        return True
    log.warning(
        "inventory record %r holds workload %r: another workload's record, left out (InventoryRecordsMismatched)",
        key,
        workload_id,
    )
    metric(INVENTORY_RECORDS_MISMATCHED, 1)
    return False


def check_names_its_key(rec: InventoryRecord) -> None:
    """Refuse to write a record that no read would hand on (:func:`names_its_key`): a bug of ours."""
    if rec.id != rec.workload.id:
        raise ValueError(f"inventory record {rec.id!r} holds workload {rec.workload.id!r}: not written")


class ConflictError(RuntimeError):
    """An optimistic-concurrency condition failed (another writer won): retry."""


class AuditRecordExists(ConflictError):
    """:meth:`Store.audit`, :meth:`Store.audit_with`: a record with this id is in the log already
    (never rewritten); nothing was written, a change that went with it not made either."""


class NotTheNamedKey(Exception):
    """An operator's agent-key reset named another key (its id is the argument) for the workload:
    nothing was bound or spent (:meth:`Store.bind_agent_key`, :meth:`Store.use_pairing`)."""


class ChangeFailed(Exception):
    """:meth:`Store.audit_with`: the change was refused or failed (``cause``: :class:`KeyError`
    for an unknown workload, :class:`ConflictError` for a lost compare-and-swap, else the store's
    error) and its audit record was not written either: the two are one transaction."""

    def __init__(self, cause: Exception) -> None:
        super().__init__(f"{type(cause).__name__}: {cause}")
        self.cause = cause


class Unconfirmed(RuntimeError):
    """:meth:`Store.audit_with` (DynamoDB): the transaction's call failed (``cause``) and whether
    it committed could not be read back either: its record and its change are both written or
    neither, not known which (the audit log and the store say, once they can be read)."""

    def __init__(self, cause: BaseException) -> None:
        super().__init__(f"not known whether the record and its change were written: {type(cause).__name__}: {cause}")
        self.cause = cause


class WorkloadChanged(ConflictError):
    """A write made only over the registration read (``as_read``: :func:`check_as_read`) found
    the workload no longer the one it was decided from (deregistered, registered again, or
    governed anew since it was read). Nothing was written."""


def registration_as_read(rec: InventoryRecord) -> InventoryRecord | None:
    """``rec`` (the workload as an operator's request read it) as the condition of that request's
    write, where its id may name another host later: an on-premise id, which a deregistration
    frees for the next host registered under it. There the record's ``governed_rev`` moves only
    through administrators (a registration that changes what is governed, a binding, a
    deregistration), never through a heartbeat or an identical registration. None (no condition)
    for a cloud instance: EC2, Azure (the VM's ``vmId``) and GCP (the numeric instance id) never
    reuse an id, and its ``governed_rev`` moves on every governance decision of an observation (a
    tag write of a governed key, its CloudTrail call), so a condition there protects nothing and
    lets whoever may tag the instance (the instance itself) refuse an incident responder."""
    return rec if rec.workload.cloud == "onprem" else None


def check_as_read(workload_id: str, stored: tuple[int, str, float] | None, as_read: InventoryRecord | None) -> None:
    """:class:`WorkloadChanged` unless the stored record (``stored``: its ``governed_rev``, state
    and observation time ``observed_at``; None, no record) is still the registration ``as_read``
    (None: no check): the same ``governed_rev``, which a deregistration always moves (never back),
    deregistered or not alike (a registration over a tombstone may keep its version), and the same
    observation. Every registration of an on-premise id is a new observation, and only a
    registration (or a deregistration) moves it: a heartbeat, a poll, an enrollment or a binding
    never does. So a registration of the id in place since the read (a new box under the same name,
    new addresses, which keeps the governance version and the old host's credentials) is told from
    the one read too. A credential step keyed by id (a pairing key, a reset, a revocation), an
    operator's mode or quarantine, a binding or a deregistration then never lands on another
    registration than the one it was decided from."""
    if as_read is None:
        return
    if (
        stored is None
        or stored[0] != as_read.governed_rev
        or (stored[1] == "terminated") != (as_read.state == "terminated")
    ):
        now = "no record" if stored is None else f"governance version {stored[0]}, {stored[1]}"
        raise WorkloadChanged(
            f"{workload_id}: deregistered, registered again or governed anew since it was read (read at "
            f"governance version {as_read.governed_rev}, {as_read.state}; now {now}): nothing set"
        )
    if stored[2] != as_read.observed_at:
        raise WorkloadChanged(
            f"{workload_id}: registered again since it was read (read as registered at {as_read.observed_at}, "
            f"now at {stored[2]}): nothing set"
        )


def check_registration_as_read(workload_id: str, stored: InventoryRecord | None, as_read: InventoryRecord) -> None:
    """:func:`check_as_read` of a stored record as read (None: no record): what a deregistration's
    tombstone is written over (:meth:`Store.observe_addressed`'s ``as_read``) and what a binding
    decided again checks (:func:`~ringfence.control.governance.bind`)."""
    check_as_read(
        workload_id, (stored.governed_rev, stored.state, stored.observed_at) if stored is not None else None, as_read
    )


class OperatorChange(NamedTuple):
    """:meth:`Store.set_operator` as a change made with its audit record (:meth:`Store.audit_with`):
    the mode when ``set_mode`` (``mode`` None clears it) and/or the quarantine (``quarantined``
    None: left as it is), only over the registration read when ``as_read`` is given
    (:func:`check_as_read`; None: no check, as :func:`registration_as_read` decides). A
    description, not a callable, so that a store that writes both in one request (DynamoDB) can
    turn it into that request's items."""

    workload_id: str
    quarantined: bool | None = None
    set_mode: bool = False
    mode: Mode | None = None
    as_read: InventoryRecord | None = None

    def apply(self, store: Store) -> None:
        if self.set_mode:
            store.set_operator(self.workload_id, mode=self.mode, quarantined=self.quarantined, as_read=self.as_read)
        else:
            store.set_operator(self.workload_id, quarantined=self.quarantined, as_read=self.as_read)


class PolicyActivation(NamedTuple):
    """:meth:`Store.activate_policy` as a change made with its audit record (as :class:`OperatorChange`)."""

    pv: PolicyVersion
    expected_active: int | Unread | None

    def apply(self, store: Store) -> None:
        store.activate_policy(self.pv, expected_active=self.expected_active)


class TokenRevocation(NamedTuple):
    """:meth:`Store.revoke_tokens` as a change made with its audit record (:meth:`Store.audit_with`):
    every token of the workload revoked, whichever is current when it commits, not only the one
    :meth:`Store.active_token` named (``token_hash``, read before; what the record's id is made of).
    Refused, nothing revoked or recorded, with :class:`ConflictError` only if the workload has no
    current unexpired token any more (revoked since). So a ``token.revoke`` record and a
    revocation are both written or neither, a record is only ever of a workload that had a token,
    and a refresh made between the read and the change (a copied agent key renewing without end)
    cannot refuse it: it revokes the refreshed token too."""

    workload_id: str
    token_hash: str

    def apply(self, store: Store) -> None:
        if store.active_token(self.workload_id) is None:
            raise ConflictError(f"{self.workload_id} has no active token any more")
        store.revoke_tokens(self.workload_id)


class NotTheTombstone(ConflictError):
    """:class:`OldHostRetirement`: the id is no longer the tombstone the registration read
    (registered again by another caller, or deregistered again): nothing was dropped."""


class OldHostRetirement(NamedTuple):
    """Everything that lets an agent act as a deregistered on-premise id that is being registered
    again goes (its token, agent key, a reset's named next key, nudge connection and pairing keys:
    the old host's, or a pairing's that raced the deregistration), only while the stored record is
    still the tombstone the registration read (``tombstone_at``: its observation time), checked in
    the same atomic step (SQLite: the transaction; DynamoDB: a condition on the inventory item in
    each transaction). Else :class:`NotTheTombstone`, nothing dropped: another registration of the
    id landed, and every credential of the host it names was issued after it (pairing keys are
    issued for registered workloads only), so a registration that loses the race never revokes
    what the live host holds. Made with its ``token.revoke`` record (:meth:`Store.audit_with`) when
    ``token_hash`` (the token read active; the record's id is made of it) names one: it revokes
    whichever token is current, refused (:class:`ConflictError`) if none is any more, as
    :class:`TokenRevocation`; without (:meth:`Store.retire_old_host`), refused if one is active
    now (its revocation would go unrecorded)."""

    workload_id: str
    tombstone_at: float
    token_hash: str | None

    def apply(self, store: Store) -> None:
        now = store.get(self.workload_id)
        if now is None or now.state != "terminated" or now.observed_at != self.tombstone_at:
            raise NotTheTombstone(f"{self.workload_id}: registered or deregistered again since its tombstone was read")
        if (store.active_token(self.workload_id) is None) != (self.token_hash is None):
            raise ConflictError(f"{self.workload_id}: its token changed since it was read")
        store.revoke_tokens(self.workload_id)
        store.drop_agent_key(self.workload_id)
        store.expect_agent_key(self.workload_id, None)
        store.drop_pairings(self.workload_id)
        store.drop_connection(self.workload_id)


class AgentKeyReset(NamedTuple):
    """An operator's reset of a workload's agent key (:meth:`Store.reset_agent_key`): the next key
    named (``next_agent_key``, a fingerprint; None: any), its pairing keys revoked, its agent key
    unbound, its token revoked and its nudge connection dropped, in one atomic step with the check
    that the stored record is still ``as_read`` (:func:`check_as_read`). So a reset that read the
    old host never cuts off, nor names the key of, another host registered under the id since."""

    workload_id: str
    next_agent_key: str | None
    as_read: InventoryRecord | None  # None: no check (registration_as_read)


AuditedChange = OperatorChange | PolicyActivation | TokenRevocation | OldHostRetirement


class GovernanceMoved(ConflictError):
    """:meth:`Store.observe`: the stored record changed after the record being written was decided
    from it (a binding, an approval, another observation landed in between). Writing it would drop
    that decision: re-read the record and decide again."""


OBSERVATIONS_OTHER_ACCOUNT = "ObservationsOtherAccount"


def account_key(account: str | None) -> str | None:
    """A workload's account as the stores compare it: Azure subscription ids are GUIDs that ARM
    and events spell in either case; AWS account ids and GCP project ids have no upper case."""
    return account.lower() if account is not None else None


def other_account(stored: InventoryRecord | None, rec: InventoryRecord) -> bool:
    """Whether writing ``rec`` would replace the record of a workload stored under another account
    (AWS account, Azure subscription, GCP project): both stores refuse it (:class:`OtherAccount`).
    The inventory is keyed by the instance id alone, and ingest describes an id in the event's
    account: an event of member account A naming account B's instance was described in A, not
    found, and A's tombstone was written over B's running workload (out of peers' sets, its token
    retired). A record stored with no account is left to any writer (on-premise ids never have a
    cloud id's form; a record from before accounts were recorded). A live observation replaces
    another account's tombstone: the cloud gave the id in this account now (an Azure VM moved to
    another subscription, should its vmId move with it, once the old subscription saw it go)."""
    if stored is None or stored.workload.account is None:
        return False
    if stored.state == "terminated" and rec.state != "terminated":
        return False
    return account_key(stored.workload.account) != account_key(rec.workload.account)


class OtherAccount(Exception):
    """:meth:`Store.observe`: the workload is stored under another account than the observation's
    (:func:`other_account`); nothing was written. The caller logs it and counts it
    (``ObservationsOtherAccount``) and retires nothing: the stored workload is not the one seen."""

    def __init__(self, rec: InventoryRecord, stored_account: str | None) -> None:
        what = "tombstone" if rec.state == "terminated" else "observation"
        super().__init__(
            f"{rec.id}: a {what} of account {rec.workload.account} refused: the workload is stored under "
            f"account {stored_account}"
        )
        self.workload_id = rec.id
        self.account = rec.workload.account
        self.stored_account = stored_account


class AddressTaken(ConflictError):
    """:meth:`Store.observe_addressed`: another active workload holds addresses the records give
    (``taken``: address → that workload); nothing of the refused records was written."""

    def __init__(self, taken: dict[str, str]) -> None:
        super().__init__("; ".join(f"{ip} is held by workload {owner}" for ip, owner in taken.items()))
        self.taken = taken


class TooManyTogether(ValueError):
    """:meth:`Store.observe_addressed` (DynamoDB): records that must be written in one transaction
    (a workload and its address claims; records passing addresses among themselves) are more
    items than one transaction takes (``limit``). Found before anything is written: nothing was.
    ``groups``: the ids of each such group and its items."""

    def __init__(self, groups: list[tuple[list[str], int]], limit: int) -> None:
        super().__init__(
            "; ".join(f"{', '.join(ids)}: {n} items written together" for ids, n in groups)
            + f": more than one DynamoDB transaction takes ({limit}) (a deregistered id registered again takes one "
            "item more, which clears the old host's quarantine)"
        )
        self.groups = groups
        self.limit = limit


class PartlyWritten(RuntimeError):
    """:meth:`Store.observe_addressed` (DynamoDB, one transaction per group): a group failed
    (``cause``: another writer took an address or changed a record meanwhile, a throttle) after
    the records ``written`` were (``changed``: those whose cloud view changed)."""

    def __init__(self, written: list[str], changed: set[str], cause: BaseException) -> None:
        super().__init__(
            f"{len(written)} record(s) written before a later group failed: {type(cause).__name__}: {cause}"
        )
        self.written = written
        self.changed = changed
        self.cause = cause


class InventoryRecord(BaseModel):
    """What the cloud says about one workload, plus operator overrides and agent liveness.

    Cloud fields (``workload`` without mode/quarantine, ``state``, ``observed_at``,
    ``tag_version``) are written by ingest/reconcile and never by an older observation.
    Operator fields (``op_mode``, ``op_quarantined``) are written only by the admin API.
    ``op_quarantined`` as read is True while the workload's quarantine is recorded apart from the
    record (:meth:`Store.set_operator`) or the record's own mark says so.
    """

    model_config = ConfigDict(extra="ignore")

    id: str
    workload: Workload
    state: str = "running"
    observed_at: float = 0.0
    tag_version: int | None = None
    labels: dict[str, str] = Field(default_factory=dict, description="labels resolved from tags (for hygiene views)")
    problems: list[str] = Field(default_factory=list)
    op_mode: Mode | None = None
    op_quarantined: bool = False
    enrolled: bool = False
    last_heartbeat: float | None = None
    offline: bool = False
    governed_rev: int = Field(
        0,
        description="the version of the governance decision (held labels, grants, known writes) this record was "
        "decided from; the store bumps it whenever a write changes them",
    )
    label_writes: dict[str, LabelWrite] | None = Field(
        None,
        description="the governed dimensions' last known writes (ringfence.governance.govern_writes); "
        "None: not recorded yet (a record stored before they were)",
    )

    @classmethod
    def observed(
        cls, w: Workload, state: str, observed_at: float, mapper: LabelMapper | None = None
    ) -> InventoryRecord:
        """A cloud's observation of ``w``, with the labels its tags resolve to under ``mapper``
        (the hygiene view; compute resolves with the exact policy it compiles)."""
        labels: dict[str, str] = {}
        problems: list[str] = []
        if mapper is not None:
            res = mapper.resolve(w)
            labels = res.labels
            problems = [p.message for p in res.problems]
        return cls(id=w.id, workload=w, state=state, observed_at=observed_at, labels=labels, problems=problems)

    @property
    def active(self) -> bool:
        """In peers' sets: the instance runs and its agent (if it has one) is not offline."""
        return self.state in ACTIVE_STATES and not self.offline

    def effective(self) -> Workload:
        return self.workload.model_copy(update={"mode": self.op_mode, "quarantined": self.op_quarantined})

    def governance(self) -> tuple[Any, ...]:
        """What governance decided for the workload: its held labels, its grants and the last known
        writes of its governed dimensions."""
        writes = {d: w.model_dump() for d, w in self.label_writes.items()} if self.label_writes is not None else None
        return (self.workload.held_labels, self.workload.label_grants, writes)

    def cloud_view(self) -> tuple[Any, ...]:
        """What decides whether an observation changed anything."""
        w = self.workload
        # direct labels and the site (CMDB records) decide labels as much as tags do
        labels = tuple(sorted(w.labels.items()))
        view = (tuple(w.ips), tuple(sorted(w.tags.items())), labels, w.vpc, w.subnet, w.zone, w.site, self.state)
        # the resource id (a moved Azure VM's changes): stored, for the tombstone that keeps it
        return (*view, w.resource)

    def compute_view(self, key_prefix: str | None) -> tuple[Any, ...]:
        """What compute and the perimeter read of the record, to decide whether they are to hear
        of an observation (:meth:`cloud_view` decides what is stored): the workload but for when it
        was seen, its name and resource id (compiled into no bundle, no set, no perimeter) and its
        tags outside the labels' ``key_prefix`` (every label key starts with it; None: every tag
        counts); the labels it was resolved to; whether it is in peers' sets. Any other tag a
        developer may write: a storm of them must not queue work ahead of an admin's on the one
        serialized compute queue."""
        w = self.workload
        tags = w.tags if key_prefix is None else {k: v for k, v in w.tags.items() if k.startswith(key_prefix)}
        return (
            w.model_dump(exclude={"observed_at", "name", "resource", "tags"}),
            sorted(tags.items()),
            sorted(self.labels.items()),
            self.state in ACTIVE_STATES,
        )


def concerns_compute(before: InventoryRecord | None, after: InventoryRecord, key_prefix: str | None) -> bool:
    """Whether storing ``after`` over ``before`` changed anything compute or the perimeter reads
    (:meth:`InventoryRecord.compute_view`; ``key_prefix``: the active policy's, None without one)."""
    return before is None or before.compute_view(key_prefix) != after.compute_view(key_prefix)


RELEASING_STATES = frozenset({"terminating", "shutting-down", "terminated"})
"""States in which an instance gives its addresses back to the cloud for reuse (a tombstone is
``terminated``). A stopped EC2 instance keeps its private IPv4 and IPv6 addresses."""


def releases_addresses(before: InventoryRecord | None, after: InventoryRecord) -> bool:
    """Whether storing ``after`` over ``before`` takes a workload out of its peers' sets whose
    addresses the cloud may then give to another instance: it was in them (active) and is now
    terminating, shutting down, terminated or gone. Such a change is computed in the priority lane
    (``enqueue_compute(urgent=True)``): the address must not stay allowed while a storm's backlog
    drains (an address-reuse launch). A stop or an agent gone offline leaves the peers' sets too
    but keeps its addresses, so it takes the ordinary lane: cycling one's own instances must not
    fill the lane an administrator's quarantine takes (security review of the priority lane)."""
    return before is not None and before.active and after.state in RELEASING_STATES


class EngineHead(BaseModel):
    """The engine's durable revision counter (monotonic across cold starts).

    ``clean`` is False between reserving revisions and finishing their publication: a
    container that finds it False rebuilds and republishes everything at a fresh revision.
    """

    revision: int = 0
    policy_version: int = 0
    clean: bool = True
    published: int = Field(0, description="publications by the publish workers (Store.bump_published)")
    rebuilt_from: int = Field(
        0,
        description="the revision the engine at this head was rebuilt from (0: not recorded): the agent API "
        "re-issues a bundle to an agent holding a version below it only (one issued before a restore)",
    )


class BundlePointer(BaseModel):
    workload_id: str
    version: int
    key: str
    etag: str
    rules_revision: int
    sets: dict[str, int] = Field(default_factory=dict, description="set name → set version in this bundle")
    published_at: float | None = Field(None, description="when this bundle was stored and pointed at (unix seconds)")
    digest: str | None = Field(
        None, description="the bundle's rules (all but versions and set contents) hashed: a cold start adopts it"
    )
    expires_at: int | None = Field(None, description="when the stored bundle's signature expires")
    key_id: str | None = Field(
        None,
        description="the key that signed the stored bundle: a rebuild under another key re-signs, never adopts, it",
    )
    pending: int | None = Field(
        None,
        exclude=True,  # the store's mark beside the pointer (Store.mark_bundle_pending), not in its doc
        description="the highest bundle version compute handed on for publication (None: never marked)",
    )
    pending_at: float | None = Field(
        None,
        exclude=True,
        description="when compute last marked it (unix seconds; None where publication is in process)",
    )

    @property
    def in_flight(self) -> int | None:
        """The version of a bundle compute rendered for this workload that is not pointed at yet
        (its rules changed at that version), or None. Set heads at or past it must not reach
        the agent as deltas over this (older) bundle: the agent would move past the version of
        the bundle that carries its new rules and refuse it (``AgentApi._latest``)."""
        return self.pending if self.pending is not None and self.pending > self.version else None


class EnforcementReport(BaseModel):
    """What a workload's agent last said it enforces, as the agent API recorded it at a heartbeat
    (ringfence.control.findings compares it with what was published)."""

    workload_id: str
    time: float = Field(description="the heartbeat's arrival")
    version: int | None = Field(None, description="the revision the agent says it enforces")
    kernel_digest: str | None = Field(None, description="what the kernel holds (ringfence.enforced), as read back")
    expected_digest: str | None = Field(
        None, description="the digest of the published bundle at that version; None: not the latest, or unknown"
    )
    latest_version: int | None = Field(None, description="the newest published version at that heartbeat")
    behind_since: float | None = Field(None, description="first heartbeat at which the agent was behind the latest")
    tamper_reapplied: int | None = Field(
        None,
        description="the agent's tamper_reapplied counter at that heartbeat (0 when it sends none); None: "
        "recorded before the control plane kept it",
    )
    tampered_at: float | None = Field(
        None, description="the heartbeat at which the counter was last seen to rise (a repaired tamper)"
    )
    tamper_repairs: int = Field(
        0, description="re-applies counted in rises since the first rise of the current tamper window"
    )
    # a stored report is a JSON document (both stores): one written before the field loads as None
    agent_version: str | None = Field(
        None, description="the version the agent said it runs at that heartbeat; None: it said none"
    )


class DeltaPointer(BaseModel):
    set: str
    from_version: int
    to_version: int
    key: str


class MovedRecord(BaseModel):
    """The workloads whose latest version moved in one publication, written by compute before it
    commits the engine head at ``revision``. Records chain (``previous`` is the revision of the
    commit before), so a reader that saw the head at ``previous`` knows it missed nothing: the
    agent API then wakes only the long-polls of these workloads (any gap: all of them)."""

    revision: int
    previous: int
    workloads: list[str] | None = Field(None, description="None: every workload (too many to list)")


MOVED_MAX = 5000  # workload ids per record (≈ 120 KB, well under DynamoDB's 400 KB item)
MOVED_TTL = 86400  # a reader further behind than a day re-anchors (wakes everyone) anyway


class LaunchAction(BaseModel):
    """One lifecycle action of an instance, recorded in its hold under its token: claimed
    (``outcome`` :data:`COMPLETING`) before compute calls Auto Scaling, then settled."""

    lifecycle: dict[str, Any] = Field(description="the action to complete (hook, group, token, account, region)")
    recorded_at: float = Field(description="when compute first recorded it")
    perimeter_at: float | None = Field(None, description="when the perimeter handed it on (groups attached)")
    perimeter: str | None = None
    claimed_at: float | None = None
    released_at: float | None = Field(None, description="when compute completed it, or gave it up")
    outcome: str | None = Field(None, description='"continue", or why it was not completed')


class LaunchHold(BaseModel):
    """A launch held by its Auto Scaling launch hook under the lifecycle gate ``agent``: the two
    facts that release it, each recorded by the function that knows it. Compute records the
    perimeter hand-off (the lifecycle action, handed on by the perimeter function once every ENI
    carries its groups); the agent API records that the instance's agent enforces a bundle. Only
    compute completes the action (CONTINUE), once both are in, and records when. Compute records
    every other action it completes here too (the gate "publish", terminates): each action is
    claimed before it is completed, so that a copy of it completes nothing again.

    An instance may have several actions at once, each with its own token (one per launch hook
    of its group, sent together; a warm pool's second launch; a terminate): ``actions`` keeps
    each under its token, claimed and settled on its own. ``lifecycle``, ``token``,
    ``perimeter_at``, ``perimeter``, ``released_at`` and ``outcome`` show the action recorded
    last."""

    instance_id: str
    actions: dict[str, LaunchAction] = Field(default_factory=dict, description="token -> action")
    lifecycle: dict[str, Any] | None = Field(
        None, description="the action to complete (hook, group, token, account, region)"
    )
    token: str | None = Field(None, description="the token of the action recorded last")
    perimeter_at: float | None = Field(None, description="when the perimeter handed the action on (groups attached)")
    perimeter: str | None = Field(
        None, description='"attached", "dry run" (planned, nothing attached) or "not managed" (no event-path perimeter)'
    )
    enforced_version: int | None = Field(None, description="the first bundle version its agent reported applied")
    enforced_at: float | None = None
    released_at: float | None = Field(None, description="when compute completed the action, or gave it up")
    outcome: str | None = Field(None, description='"continue", or why the action was not completed')

    @model_validator(mode="after")
    def _latest(self) -> LaunchHold:
        if self.actions:
            token, last = max(self.actions.items(), key=lambda kv: kv[1].recorded_at)
            self.token, self.lifecycle, self.released_at, self.outcome = (
                token,
                last.lifecycle,
                last.released_at,
                last.outcome,
            )
            if last.perimeter_at is not None:
                self.perimeter_at, self.perimeter = last.perimeter_at, last.perimeter
        return self

    def pending(self) -> list[str]:
        """The tokens of the actions not released (nor claimed), oldest first."""
        return [t for t, a in sorted(self.actions.items(), key=lambda kv: kv[1].recorded_at) if a.released_at is None]


# a hold's fields written once: the first report of enforcement is the fact; later ones add nothing
HOLD_FIRST_WINS = frozenset({"enforced_version", "enforced_at"})
HOLD_TTL = 86400  # longer than any hook's wait (HeartbeatTimeout is at most 7200 s)
# a release claimed but never settled (compute stopped between the claim and Auto Scaling's
# answer) may be claimed again after this long: longer than compute's run, shorter than a hook's wait
HOLD_CLAIM_STALE = 900
COMPLETING = "completing"  # a claimed release's outcome until Auto Scaling answers


def check_hold_fields(fields: dict[str, Any]) -> None:
    unknown = set(fields) - (set(LaunchHold.model_fields) - {"instance_id", "actions"})
    if unknown:
        raise ValueError(f"launch hold: unknown fields {sorted(unknown)}")


@functools.lru_cache(maxsize=4096)
def agent_key_fingerprint_of(pem: str) -> str | None:
    """The fingerprint (SHA-256, 64 hex digits) of an agent's public key: what an operator's
    reset names as the next key (:meth:`Store.expect_agent_key`); None if not exactly one Ed25519
    key (:func:`~ringfence.bundlewire.ed25519_public_from_one_pem`). Cached: every agent request
    compares it (:func:`token_key_holds`)."""
    try:
        return fingerprint_of_raw(ed25519_public_from_one_pem(pem.encode()))
    except BundleError:
        return None


def agent_key_id_of(pem: str) -> str | None:
    """The id of an agent's public key (the fingerprint's first 16 hex digits, as bundle keys'
    ids are), None if the PEM is not an Ed25519 key."""
    fingerprint = agent_key_fingerprint_of(pem)
    return fingerprint[:16] if fingerprint is not None else None


def token_key_holds(token_key: str | None, bound_pem: str | None) -> bool:
    """Whether a token issued under the agent key ``token_key`` (its id; ``""``: issued without
    one) may still authorize, with ``bound_pem`` the workload's key bound now. A token is good only
    while the key it was issued under is the bound one, so that a token whose issue raced an
    operator's key reset (the refresh checked the stolen key, the reset dropped it, then the
    token was written) authorizes nothing. ``None``: a token written before tokens recorded their
    key (an upgrade) holds until it expires."""
    if token_key is None:
        return True
    if token_key == "":
        return bound_pem is None
    if bound_pem is None:
        return False
    if len(token_key) == 64:  # the whole fingerprint: a 64-bit id could be searched to match
        return agent_key_fingerprint_of(bound_pem) == token_key
    # a token issued under the 64-bit id (before tokens recorded the fingerprint) expires within its ttl
    return agent_key_id_of(bound_pem) == token_key


class Grant(NamedTuple):
    """What an agent request's token grants (:meth:`Store.token_grant`): the workload the token
    is current for (None: unknown, expired or replaced), and, when that is the workload asked
    for, its inventory record and bundle pointer as read in the same step (None if absent)."""

    workload_id: str | None
    # its op_quarantined is not to be relied on (DynamoStore reads the record's own mark only, not
    # the quarantine kept apart: Store.set_operator); the agent API decides nothing from it
    record: InventoryRecord | None = None
    pointer: BundlePointer | None = None
    # asked for (``with_enforcement``, a heartbeat): the workload's last enforcement report, read
    # in the same step (None if none); not asked for: ``enforcement_read`` False
    enforcement: EnforcementReport | None = None
    enforcement_read: bool = False


# the longest nonce an owed mark is read with (owe_compute writes 32 hex digits): a longer one
# is read malformed
OWED_NONCE_MAX = 64
# the pages (DynamoDB: up to 1 MB of whole items each, read capacity counts them whole, whatever is
# projected) a drain reads of each writer's partition: thousands of ordinary marks a page, two of a
# writer's 400 KB ones. Each partition has its own budget: a writer's marks spend only its own
OWED_PAGE_BUDGET = 16
# the functions that mark workloads owed, each in its own partition (DynamoDB ``owed#<writer>``,
# granted to that function alone: a compromised writer can fill and delay only its own marks).
# The drain reads every one of them; the name is the function's (functions/<name>/app.py), or
# ``serve``: ``ringfence serve --store aws`` (the operator's credentials; no Lambda role writes it)
OWED_WRITERS = ("ingest", "lifecycle", "reconcile", "gcpevents", "azureevents", "cloudreconcile", "serve")
# the digits of a mark's slot (owed_key): its place in a partition's order, uniform over the ids
OWED_SLOT_DIGITS = 8


def owed_key(workload_id: str) -> str:
    """The sort key of ``workload_id``'s owed mark: a slot hashed from the id, then the id. A drain
    reads a partition from a random slot round (:func:`ringfence.control.wiring.hand_on_owed`):
    the slots, unlike the ids (every EC2 id begins ``i-``, GCP's are 19 digits), are uniform over
    the marks present, so each mark is as likely as any other to be read first, backlog or not."""
    slot = hashlib.blake2b(workload_id.encode(), digest_size=OWED_SLOT_DIGITS // 2).hexdigest()
    return f"{slot}#{workload_id}"


def owed_id(key: str) -> str | None:
    """The workload id of the sort key ``key`` (:func:`owed_key`), None if it is no mark's key
    (its slot is not its id's: anything a writer of the partition made by hand)."""
    wid = key[OWED_SLOT_DIGITS + 1 :]
    return wid if wid and owed_key(wid) == key else None


class OwedMark(NamedTuple):
    """A workload whose records compute is owed (:meth:`Store.owe_compute`): a hand-off to compute
    failed after its change was stored. ``urgent``: in the priority lane (it gave its addresses
    back); ``nonce``: this write of the mark, so a drain deletes only the mark it read."""

    workload_id: str
    urgent: bool
    nonce: str
    # where it was read (DynamoDB: its writer's partition; "" the one place a store keeps marks in)
    # and its stored key ("" :func:`owed_key` of the id): settle_owed deletes that item
    partition: str = ""
    key: str = ""


class OwedNotMarked(Exception):
    """:meth:`Store.owe_compute` wrote some marks and not others (``ids``: those not written)."""

    def __init__(self, ids: list[str]) -> None:
        super().__init__(f"{len(ids)} owed marks not written: {', '.join(ids[:20])}")
        self.ids = ids


class Unread(enum.Enum):
    """``observe(previous=UNREAD)``: the store reads the stored record itself."""

    UNREAD = "unread"


UNREAD = Unread.UNREAD


def next_governed_rev(old: InventoryRecord | None, rec: InventoryRecord) -> int:
    """The ``governed_rev`` to store with ``rec`` over ``old`` (the stored record): the same while
    the held labels, grants and known writes (:meth:`InventoryRecord.governance`) stay, one more
    when they change. Raises :class:`GovernanceMoved` when ``rec`` was decided from another version
    than the stored one (tombstones excepted: a terminated workload holds nothing). A tombstone
    always moves it, as DynamoStore's does: a record decided from a read taken before the tombstone
    (a terminate action's ``terminating``) must fail the check, or a workload that left would come
    back as leaving."""
    stored = old.governed_rev if old is not None else 0
    if rec.state == "terminated":
        return stored + 1
    if rec.governed_rev != stored:
        raise GovernanceMoved(
            f"{rec.id}: its governance changed (version {stored}) after this record was decided "
            f"from version {rec.governed_rev}"
        )
    before = old.governance() if old is not None else (None, {}, None)
    return stored if rec.governance() == before else stored + 1


def check_read(old: InventoryRecord | None, rec: InventoryRecord, previous: InventoryRecord | Unread | None) -> None:
    """``rec`` decided from ``previous`` (the record as the caller read it; UNREAD: not said) is
    written only over exactly that record: raises :class:`GovernanceMoved` when ``old`` (the stored
    one, no newer than ``rec``) is another observation than the one read. Two observations of one
    instance decided side by side (two ingest invocations, a reconcile pass) must not both be
    written, the later over the earlier's decision: it is decided again from it. A tombstone is
    written whatever was read."""
    if previous is UNREAD or rec.state == "terminated":
        return
    read = previous.observed_at if previous is not None else None
    stored = old.observed_at if old is not None else None
    if read != stored:
        raise GovernanceMoved(f"{rec.id}: another observation was stored after the one this record was decided from")


def check_tombstone(old: InventoryRecord | None, read: InventoryRecord) -> None:
    """``old`` (stored now) is still ``read``, the tombstone a registration of its id again was
    decided from (:meth:`Store.observe_addressed`'s ``anew``): terminated, observed at the same
    time, with the operator mode and quarantine read (what the registration's audit record says it
    clears). Else :class:`GovernanceMoved`: registered again (or quarantined) meanwhile."""
    if (
        old is None
        or old.state != "terminated"
        or old.observed_at != read.observed_at
        or old.op_mode != read.op_mode
        or old.op_quarantined != read.op_quarantined
    ):
        raise GovernanceMoved(
            f"{read.id}: the deregistered workload this registration was decided from changed meanwhile "
            "(registered again, or its operator mode or quarantine set)"
        )


class Store(Protocol):
    # what the store counts (InventoryRecordsMismatched: :func:`names_its_key`); its owner sets it
    metric: Callable[[str, float], None]

    # inventory
    def get(self, workload_id: str) -> InventoryRecord | None: ...
    def get_many(self, workload_ids: list[str]) -> dict[str, InventoryRecord]: ...
    def observe(
        self,
        rec: InventoryRecord,
        *,
        release_terminating: bool = False,
        previous: InventoryRecord | Unread | None = UNREAD,
    ) -> bool:
        """Write cloud fields unless a newer observation is stored; True if the cloud view changed.
        A stored ``terminating`` stays while the instance still runs, unless ``release_terminating``
        (reconcile found it running and Auto Scaling not terminating it). ``previous``: the stored
        record as the caller just read it (a store that reads it apart from the write may use it
        instead of reading again; the write is conditional on the observation's time either way).

        Unless ``rec`` is a tombstone, the write is also conditional on the stored record being
        the one ``previous`` says was read (its observation, :func:`check_read`; not checked when
        UNREAD) and on its governance being the version ``rec`` was decided from (``rec.governed_rev``, see
        :func:`next_governed_rev`): otherwise :class:`GovernanceMoved` is raised and nothing is
        written, so a binding or an approval landing between a caller's read and its write is
        never overwritten by a record decided without it. A tombstone moves that version, whatever
        was stored.

        Never over the record of a workload stored under another account (:func:`other_account`):
        :class:`OtherAccount` is raised and nothing is written, checked with the write (DynamoDB:
        a condition on the item's ``account``, the workload's account as :func:`account_key`
        gives it, written by every observation; SQLite: in the write's transaction)."""
        ...

    def observe_many(self, recs: list[InventoryRecord]) -> set[str]:
        """:meth:`observe` each record; the ids whose cloud view changed. SQLite writes them in one
        transaction (all or none, even across a crash); DynamoDB one by one."""
        ...

    def unclaimed(self, recs: list[InventoryRecord]) -> set[str]:
        """The ids of ``recs`` (records as stored) whose addresses the store does not hold as
        theirs through :meth:`observe_addressed`: DynamoDB, an address with no claim item naming
        the record (a record stored before the claims); SQLite, none (its check is the inventory
        itself). A registration that would change nothing still writes these, so they get their
        claims."""
        ...

    def observe_addressed(
        self,
        recs: list[InventoryRecord],
        *,
        anew: dict[str, InventoryRecord] | None = None,
        as_read: dict[str, InventoryRecord] | None = None,
    ) -> set[str]:
        """:meth:`observe_many` for records whose addresses are theirs alone (on-premise
        registrations): each active record's addresses must not be held by another workload
        (:func:`holds_addresses`: an active one, or a cloud instance not terminated), checked
        atomically with the write, so that two writers racing for one address never both land.
        :class:`AddressTaken` when one is held (by a workload outside ``recs``, or
        given twice within them); an address may move between records of ``recs``. SQLite checks
        every active record in the write's transaction. DynamoDB keeps a claim item per address
        (state ``addrowner#<ip>``/``owner``), put in one transaction with the record, conditional
        on the claim read; it holds only for writes through here, so the caller still checks the
        inventory first (records stored before the claims, cloud instances). A tombstone releases
        its claims. SQLite writes all records in one transaction; DynamoDB one transaction per
        group of records that pass addresses among themselves: :class:`TooManyTogether`, nothing
        written, when a group is more than one transaction takes, and :class:`PartlyWritten`
        when a group fails after others were written. A record older than the one stored is
        refused (:class:`GovernanceMoved`, nothing of it written), never dropped as
        :meth:`observe` drops it: its caller (an administrator's registration, which is observed
        after the record it read) would answer it as made with nothing stored.

        ``anew``: id → the tombstone the caller read for a deregistered id it registers again. That
        record is written only over exactly that tombstone (:func:`check_tombstone`: its time and
        the operator mode and quarantine read), and in the same write (SQLite: the transaction;
        DynamoDB: the record's group's transaction) its operator mode and quarantine are cleared:
        the new host starts from none of the old one's, and a registration decided from a stale
        read never clears what an operator set on a host registered meanwhile. Otherwise
        :class:`GovernanceMoved`, nothing of that record written.

        ``as_read``: id → the record the caller read (a deregistration's tombstone is written over
        it): that record is written only while the stored one is still exactly it
        (:func:`check_registration_as_read`), checked in the record's own write (SQLite: the
        transaction; DynamoDB: a condition of its update), also where the stored observation is
        newer (which otherwise drops the record silently). Otherwise :class:`WorkloadChanged`,
        nothing of that record written: a tombstone decided from one registration never replaces
        another registered since, nor goes unwritten while the deregistration is answered as made."""
        ...

    def all_records(self) -> list[InventoryRecord]: ...
    def inventory_generation(self) -> int | None:
        """A number that changes whenever a record is added or removed, or its workload, state,
        operator fields or ``offline`` flag change (what :attr:`InventoryRecord.active` and peers'
        sets depend on; not heartbeats or enrollment): a cheap "did the inventory move" for readers
        that would otherwise read every record. None: this store keeps no such number."""
        ...

    def set_operator(
        self,
        workload_id: str,
        *,
        mode: Mode | None = ...,
        quarantined: bool | None = None,
        as_read: InventoryRecord | None = None,
    ) -> None:
        """Set the operator mode and/or quarantine (KeyError, nothing written, for an unknown
        workload). With ``as_read`` (the record as the caller read it), only while the stored
        record is still that registration (:func:`check_as_read`, as :meth:`put_pairing`), checked
        in the write's own transaction (DynamoDB: a condition of the record's item in it), else
        :class:`WorkloadChanged`, nothing written: a deregistration always moves the version
        (:func:`next_governed_rev`) and it never goes back, so an id deregistered or registered
        again since the read (another host) never takes a mode or quarantine meant for the one
        read. ``quarantined=True`` records the quarantine apart from the inventory record, in
        an item that only a release deletes (DynamoDB: the state item ``quarantine``/``<id>``,
        which the event-fed roles may put but never delete; SQLite: a row of its own). ``False``, a
        release, deletes it and clears the record's own ``op_quarantined`` (one set before the
        quarantine was kept apart) in one atomic step. Every record read is quarantined while
        either holds: writing the record's attribute false releases nothing."""
        ...

    def set_liveness(
        self,
        workload_id: str,
        *,
        enrolled: bool | None = None,
        heartbeat: float | None = None,
        offline: bool | None = None,
    ) -> None: ...

    # engine head and policy
    def head(self) -> EngineHead: ...
    def put_head(self, new: EngineHead, expected_revision: int) -> None: ...
    def active_policy(self) -> PolicyVersion | None: ...
    def next_policy_version(self) -> int: ...
    def activate_policy(self, pv: PolicyVersion, expected_active: int | Unread | None = UNREAD) -> None:
        """Record ``pv`` and make it the active version. With ``expected_active`` (the number of
        the version the caller read as active, None: none was), a compare-and-swap: raises
        :class:`ConflictError`, with nothing recorded, when another version became active
        meanwhile (a concurrent provision would otherwise leave whichever finished last active,
        even an older number). ``UNREAD``: unconditional."""
        ...

    # published artifacts
    def bundle_pointer(self, workload_id: str) -> BundlePointer | None: ...
    def put_bundle_pointer(self, ptr: BundlePointer, expected_version: int | None = None) -> bool:
        """Store the pointer unless a newer version is stored (or, with ``expected_version``, only
        over exactly that version); True if written."""
        ...

    def bundle_pointers(self, workload_ids: list[str]) -> dict[str, BundlePointer]: ...
    def mark_bundle_pending(self, workload_id: str, version: int) -> None:
        """Record that compute handed on a bundle of ``workload_id`` at ``version`` for publication
        (the mark never goes down; a pointer at or past it satisfies it). Written before any set
        head moves and before the job is sent: read back as :attr:`BundlePointer.pending`, by the
        agent API (no deltas past a bundle on its way) and by a rebuild (no adopting a pointer
        older than a bundle on its way). A workload with a mark and no pointer has none (None).
        Where workers publish (DynamoDB), marking the same version again renews
        :attr:`BundlePointer.pending_at`: a mark left standing that long is a job lost on the
        way, which the agent API asks compute to render again (``AgentApi.heartbeat``)."""
        ...

    def bundle_pending(self, workload_id: str) -> tuple[int, float | None] | None:
        """Compute's mark of ``workload_id`` read alone (:meth:`mark_bundle_pending`): the version
        and when it was last marked (None where publication is in process), None if never marked.
        What the agent API reads for a workload with no pointer yet: its first bundle on its way,
        or that job lost or refused (a mark left standing :attr:`BundlePointer.pending_at`-old)."""
        ...

    def put_delta(self, ptr: DeltaPointer) -> None: ...
    def put_set_head(self, set_name: str, version: int, digest: str | None = None) -> None:
        """Move the set's head forward (never back), with a hash of its content at ``version``."""
        ...

    def set_heads(self, set_names: list[str]) -> dict[str, int]: ...
    def set_states(self, set_names: list[str]) -> dict[str, tuple[int, str | None]]:
        """Head version and content hash per set (absent: never recorded)."""
        ...

    def bump_published(self, workloads: list[str] | None) -> int:
        """A publish worker moved these workloads' pointers (None: too many to list): counted on
        the engine head (``published``, which compute's writes leave alone) and recorded under
        the new count, so that the agent API's change watch wakes exactly their long-polls."""
        ...

    def published_after(self, count: int) -> list[tuple[int, list[str] | None]]:
        """The records of :meth:`bump_published` after ``count``, oldest first."""
        ...

    def deltas_after(self, set_name: str, revision: int) -> list[DeltaPointer]: ...
    def put_moved(self, rec: MovedRecord) -> None: ...
    def moved_after(self, revision: int) -> list[MovedRecord]:
        """The moved records of commits after ``revision``, oldest first."""
        ...

    # what agents report they enforce (ringfence.control.findings)
    def put_enforcement(self, rep: EnforcementReport) -> None: ...
    def enforcement(self, workload_id: str) -> EnforcementReport | None: ...
    def enforcement_reports(self) -> list[EnforcementReport]: ...

    # agent auth
    def put_nonce(self, nonce: str, ttl: int) -> None: ...
    def burn_nonce(self, nonce: str) -> bool: ...
    def claim_once(self, key: str, ttl: int) -> bool: ...
    def claimed(self, key: str) -> bool:
        """Whether ``key`` is claimed (by :meth:`claim_once`) and not expired: a read, no claim."""
        ...

    def put_token(self, token_hash: str, workload_id: str, ttl: int, agent_key: str = "") -> None:
        """The workload's one active token (by hash), for ``ttl`` s: the token it had before stops
        authorizing (re-enrollment and refresh revoke the previous token). ``agent_key``: the id
        of the agent key the token was issued under (``""``: none); the token authorizes only
        while that key is bound (:func:`token_key_holds`)."""
        ...

    def token_workload(self, token_hash: str) -> str | None:
        """The workload whose current, unexpired token this is, while the agent key it was issued
        under is still bound; None otherwise."""
        ...

    def token_expires(self, token_hash: str) -> float | None:
        """When the token expires (epoch seconds) while it is unexpired, current or not; None
        otherwise. A read, no write: how far into its lifetime a token is, for the renewal by
        token (ringfence.control.agents)."""
        ...

    def token_grant(self, token_hash: str, workload_id: str, with_enforcement: bool = False) -> Grant:
        """What an agent request for ``workload_id`` needs to be authorized, read together (every
        agent request asks): :meth:`token_workload` of the token and, when the token is that
        workload's, its inventory record and bundle pointer (what most requests read next), and
        with ``with_enforcement`` its last enforcement report (what a heartbeat reads next)."""
        ...

    def revoke_tokens(self, workload_id: str) -> bool:
        """No token of the workload authorizes any more; True if one was active."""
        ...

    def active_token(self, workload_id: str) -> str | None:
        """The hash of the workload's current unexpired token, or None (a read, no write: what a
        :class:`TokenRevocation` names)."""
        ...

    def bind_agent_key(self, workload_id: str, public_key: str, *, replace: bool = False) -> str:
        """Bind the agent's public key (PEM) to the workload unless one is bound already (atomic:
        the first binding wins), or over any earlier one with ``replace``; the key bound now.
        :class:`NotTheNamedKey` (nothing bound) if a reset named another key
        (:meth:`expect_agent_key`), checked in the same atomic step; binding the named key ends
        the expectation (a later rebinding, e.g. by a new pairing key, is not held to it)."""
        ...

    def agent_key(self, workload_id: str) -> str | None: ...
    def drop_agent_key(self, workload_id: str) -> None: ...
    def expect_agent_key(self, workload_id: str, fingerprint: str | None) -> None:
        """Only the agent key with this id may be bound to the workload next (an operator's reset
        names the reinstalled agent's key); None: any (the first proof of identity binds)."""
        ...

    def expected_agent_key(self, workload_id: str) -> str | None:
        """The key fingerprint :meth:`expect_agent_key` named for the workload, or None."""
        ...

    def put_pairing(
        self, key_hash: str, workload_id: str, uses: int, ttl: int, as_read: InventoryRecord | None = None
    ) -> None:
        """A pairing key (by hash) that enrolls only ``workload_id``, at most ``uses`` times, for
        ``ttl`` s; with ``as_read``, only while the stored record is still that registration
        (:func:`check_as_read`), checked in the put's own transaction (DynamoDB: a condition of
        the inventory item beside the put), else :class:`WorkloadChanged`, nothing stored."""
        ...

    def use_pairing(self, key_hash: str, workload_id: str, agent_key: str) -> bool:
        """Spend one use of the key for ``workload_id`` and bind ``agent_key`` (PEM) to the
        workload, over any earlier key, in the same atomic step, as :meth:`bind_agent_key` binds it
        (:class:`NotTheNamedKey`: nothing spent or bound). False (nothing spent or bound) if the
        key is unknown, expired, used up, issued for another workload, or one that
        :meth:`drop_pairings` could not revoke (DynamoDB: minted before the workload index)."""
        ...

    def drop_pairings(self, workload_id: str, as_read: InventoryRecord | None = None) -> int:
        """Revoke every pairing key issued for ``workload_id`` (used up or not); how many were
        unexpired with uses left. With ``as_read``, only while the stored record is still that
        registration (:func:`check_as_read`; DynamoDB: a condition of each transaction of
        deletes), else :class:`WorkloadChanged`, nothing revoked (DynamoDB: none after it)."""
        ...

    def reset_agent_key(self, change: AgentKeyReset) -> tuple[int, bool]:
        """Make ``change`` in one atomic step with its check (DynamoDB: one transaction, and more
        pairing keys than it takes in further ones before it, each conditional on the record too),
        else :class:`WorkloadChanged`, nothing changed (DynamoDB: the pairing keys of the further
        transactions that landed stay revoked). How many pairing keys were unexpired with uses
        left, and whether a token was revoked."""
        ...

    def retire_old_host(self, change: OldHostRetirement) -> None:
        """Make ``change`` (no token active: nothing to record) in one atomic step with its check
        that the id is still the tombstone read; :class:`NotTheTombstone` or :class:`ConflictError`
        (a token active now), nothing dropped. DynamoDB: one transaction, and more pairing keys
        than it takes in further ones before it, each conditional on the tombstone too."""
        ...

    def put_connection(self, workload_id: str, connection_id: str, token_hash: str) -> bool:
        """Record ``connection_id`` as the workload's nudge connection, in one atomic step with
        the check that ``token_hash`` is still its current token: a refresh or a retirement that
        revokes the token first and then drops the connection can never be followed by this
        write (its token's connection left in place). False: the token is no longer current,
        nothing written."""
        ...

    def connection(self, workload_id: str) -> str | None: ...
    def drop_connection(self, workload_id: str, connection_id: str | None = None) -> None:
        """Forget the workload's nudge connection; with ``connection_id``, only while it is that
        one (a gone connection's cleanup must not drop the one its agent opened since)."""
        ...

    # launch holds (the lifecycle gate "agent")
    def hold_launch(self, instance_id: str, **fields: Any) -> LaunchHold:
        """Merge ``fields`` into the instance's hold (created if missing) in one atomic step and
        return the hold as it then is; ``enforced_version``/``enforced_at`` keep their first value.
        Two writers (compute, the agent API) each see the other's fact if it came first."""
        ...

    def launch_hold(self, instance_id: str) -> LaunchHold | None: ...

    def hold_launch_action(self, instance_id: str, lifecycle: dict[str, Any], **fields: Any) -> LaunchHold:
        """Record a lifecycle action in the instance's hold under its token (``actions``),
        atomically, with ``fields`` (``perimeter_at``, ``perimeter``): a token not yet there is a
        new action, beside the others (several launch hooks' actions at once, a warm pool's
        second, a terminate); the same token again (a duplicate) changes nothing. The hold as it
        then is; the agent's fact is kept either way."""
        ...

    def claim_launch_release(self, instance_id: str, token: str) -> bool:
        """Claim the completion of the hold's action ``token`` (its ``released_at`` now,
        ``outcome`` :data:`COMPLETING`) in one conditional write: False if the hold has no such
        action, or it is released or claimed already (a claim older than :data:`HOLD_CLAIM_STALE`
        may be taken again). Only the claimant calls Auto Scaling; other actions of the instance
        are claimed on their own, concurrently."""
        ...

    def settle_launch_release(self, instance_id: str, token: str, outcome: str) -> bool:
        """Record the claimed action ``token``'s ``outcome`` (``released_at`` now), only while it
        is claimed (:data:`COMPLETING`): never over a recorded outcome."""
        ...

    # compute owed: hand-offs that failed after their change was stored (control/wiring.py)
    def owe_compute(self, workload_ids: list[str], urgent: bool = False) -> None:
        """Mark ``workload_ids`` owed to compute, each with a new nonce (DynamoDB: in this store's
        writer's partition, :data:`OWED_WRITERS`): a mark there already is
        written again (a drain that read it before then no longer deletes it), urgent if either
        write was. One mark's failed write does not keep the others from being written: raises
        :class:`OwedNotMarked` naming those not written (any other error: none may be)."""
        ...

    def owed_compute(self, limit: int | None = None, start: str = "") -> list[OwedMark]:
        """Every mark (``limit``: the first that many of each writer's partition, in
        :func:`owed_key` order from ``start`` round to the keys before it; SQLite keeps one), of
        any age, read consistently (no scan of other items). A store may return fewer than
        ``limit`` of a partition when its marks are unusually large (DynamoDB: a read budget of
        :data:`OWED_PAGE_BUDGET` pages each, an empty page with nothing after it not counted),
        or when a page after the first fails: what was read, so that a drain always makes
        progress (a partition that cannot be read at all is skipped, raised only if none was). A mark whose id names no workload is read as
        written (the drain, :func:`ringfence.control.wiring.hand_on_owed`, drops it). A malformed mark
        (its nonce missing, not a string, or over :data:`OWED_NONCE_MAX` characters: any writer of
        the partition can make one, and a drain must not hold kilobytes per mark) is still a
        workload owed: read with the nonce ``""``, which :meth:`settle_owed` deletes only while
        it is still malformed."""
        ...

    def settle_owed(self, marks: list[OwedMark]) -> list[str]:
        """Delete each of ``marks`` only while it holds the nonce read (a mark written again since
        stays, for the next drain); the workload ids deleted."""
        ...

    # audit
    def audit(self, rec: AuditRecord) -> AuditRecord:
        """Append the record to the hash chain and return it sealed (``seq``, ``prev``, ``hash``);
        the chain's head is written in the same atomic step, and concurrent writers queue or retry
        so that the chain never forks. :class:`AuditRecordExists` if a record with its id exists
        (never rewritten)."""
        ...

    def audit_with(self, rec: AuditRecord, change: AuditedChange) -> AuditRecord:
        """Append the record (as :meth:`audit`) and make ``change``, in one transaction: both or
        neither, so that a process killed between the two leaves no record of a change that never
        happened (SQLite: one ``BEGIN IMMEDIATE``; DynamoDB: one TransactWriteItems holding the
        change's items and the chain's). A failing record write raises as :meth:`audit` does; a
        refused or failing change raises :class:`ChangeFailed`; nothing is written either way."""
        ...

    def audit_log(self) -> list[AuditRecord]:
        """Every record in chain order (records from before chaining first)."""
        ...

    def audit_record(self, record_id: str) -> AuditRecord | None:
        """The record with this id as written (None: none is), read consistently."""
        ...

    def audit_head(self) -> AuditHead | None:
        """The chain's head as stored (``None`` before the first chained record)."""
        ...

    # flows (ringfence.flows): aggregate rows with a TTL, and the address → workload intervals
    def add_flows(self, rows: list[FlowRow], ttl: int) -> None:
        """Fold each row into the stored row of its day and key (counts added, first/last seen
        widened); the row expires ``ttl`` s after its last update."""
        ...

    def flow_rows(self, days: int = ...) -> list[FlowRow]:
        """Every unexpired row (of the last ``days`` days), per day."""
        ...

    def admit_flow_keys(
        self, reporter: str, period: str, keys: list[str], most: int, ttl: int
    ) -> tuple[set[str], bool]:
        """Of ``keys``, the row keys ``reporter`` may write in ``period`` (those it wrote in it,
        new ones up to ``most`` in all), and whether this is the period's first refusal."""
        ...

    def note_addresses(self, owners: list[AddressOwner]) -> None: ...
    def address_history(self, addresses: list[str]) -> dict[str, list[AddressOwner]]:
        """The intervals recorded per address, oldest first (addresses never recorded: absent)."""
        ...
