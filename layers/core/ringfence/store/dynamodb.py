"""DynamoDB implementation of :class:`ringfence.store.base.Store`.

Tables (see template.yaml / infra/):

* inventory ``id`` — one item per workload; cloud fields are written with a condition on
  ``observed_at`` so an older observation never overwrites a newer one;
* state ``pk``/``sk`` with TTL on ``ttl`` — engine head, active policy, bundle and delta
  index, nonces, one-time claims, tokens, pairing keys, WebSocket connections, quarantines
  (``quarantine``/``<workload id>``: see :meth:`DynamoStore.set_operator`);
* audit ``pk``/``sk`` — the hash chain: ``chain``/``<seq, 12 digits>`` per record, ``head``/``head``
  the chain's head, ``id#<id>``/``id`` a record id's claim; each record is one transaction of the
  three, conditional on the seq and the id being new and the head being the one read (never
  updated or deleted by code), with the items of the change it records where it records one
  (:meth:`DynamoStore.audit_with`). Items keyed by day are records from before chaining.
"""

from __future__ import annotations

import contextlib
import json
import logging
import math
import random
import threading
import time
import uuid
from collections.abc import Callable, Iterator
from decimal import Decimal
from typing import Any, NamedTuple

import boto3
from boto3.dynamodb.conditions import Key
from botocore.exceptions import ClientError

from ringfence.audit import seal
from ringfence.flows.aggregate import DEFAULT_RETENTION_DAYS, MAX_REPORTERS, FlowRow, day_of
from ringfence.flows.resolve import AddressOwner
from ringfence.groupcommit import GroupCommit
from ringfence.model import Mode, Workload
from ringfence.store.base import (
    ACTIVE_STATES,
    COMPLETING,
    HOLD_CLAIM_STALE,
    HOLD_FIRST_WINS,
    HOLD_TTL,
    MOVED_MAX,
    MOVED_TTL,
    OWED_NONCE_MAX,
    OWED_PAGE_BUDGET,
    OWED_WRITERS,
    UNREAD,
    AddressTaken,
    AgentKeyReset,
    AuditedChange,
    AuditHead,
    AuditRecord,
    AuditRecordExists,
    BundlePointer,
    ChangeFailed,
    ConflictError,
    DeltaPointer,
    EnforcementReport,
    EngineHead,
    GovernanceMoved,
    Grant,
    InventoryRecord,
    LaunchHold,
    MovedRecord,
    NotTheNamedKey,
    NotTheTombstone,
    OldHostRetirement,
    OperatorChange,
    OtherAccount,
    OwedMark,
    OwedNotMarked,
    PartlyWritten,
    PolicyActivation,
    PolicyVersion,
    TokenRevocation,
    TooManyTogether,
    Unconfirmed,
    Unread,
    WorkloadChanged,
    account_key,
    agent_key_fingerprint_of,
    check_hold_fields,
    check_names_its_key,
    check_registration_as_read,
    check_tombstone,
    names_its_key,
    next_governed_rev,
    no_metric,
    other_account,
    owed_id,
    owed_key,
    token_key_holds,
)

_UNSET: Any = object()
# a workload's quarantine: the state item QUARANTINE/<workload id> (DynamoStore.set_operator). One
# partition: every quarantine in one Query (all_records), as few as they are
QUARANTINE = "quarantine"
# the workloads compute is owed (owe_compute): each writer's partition is ``owed#<writer>``; ``owed``
# alone is the one partition all wrote before, drained until it is empty
OWED = "owed"
QUARANTINE_BATCH = 50  # workloads per BatchGetItem with their quarantine items (100 keys a call)

log = logging.getLogger(__name__)


class _Part(NamedTuple):
    """A change as items of a transaction (the resource's client: plain values), and what the
    cancellation reasons of those items (in their order) mean: the change's own error (its
    condition failed), or None (not refused by its own items: a collision, retried)."""

    items: list[dict[str, Any]]
    refused: Callable[[list[str]], Exception | None]


def _not_as_read(workload_id: str, as_read: InventoryRecord) -> WorkloadChanged:
    """A write conditional on ``as_read`` (:meth:`DynamoStore._as_read_condition`), refused by it."""
    return WorkloadChanged(
        f"{workload_id}: deregistered, registered again or governed anew since it was read (read at governance "
        f"version {as_read.governed_rev}, {as_read.state}, registered at {as_read.observed_at}): nothing set"
    )


def _reasons(exc: ClientError) -> list[str]:
    return [str(r.get("Code", "None")) for r in exc.response.get("CancellationReasons", [])]


class _ChainWriter:
    """This process's writer of one audit table. Why: every record is a transaction conditional
    on the chain's head, so concurrent writers race for it and all but one retry. A serve process
    or a demo holds dozens of threads that audit at once (59 agents enrolling in a scale-out made
    27,000 transactions for a few hundred records, and every other DynamoDB call waited behind
    them). One write per process at a time, with the head it wrote remembered, leaves the race
    to what truly runs apart (Lambda instances); records that queue behind a write go together in
    the next transaction (a group commit: 50 agents enrolling at once waited 5 s in line for
    their ``agent.enroll`` records, one round trip each). A record with a change
    (:meth:`DynamoStore.audit_with`) goes the same way, its change's items in the transaction
    with it (one touching an item already in it: in the next transaction)."""

    __slots__ = ("group", "head")

    def __init__(self) -> None:
        self.head: AuditHead | None = None  # the head this process last wrote (None: read it)
        # (the store to write with, the record, its change): stores sharing a writer share its table
        self.group: GroupCommit[tuple[DynamoStore, AuditRecord, _Part | None], AuditRecord] = GroupCommit(self._write)

    def _write(self, items: list[tuple[DynamoStore, AuditRecord, _Part | None]]) -> list[AuditRecord | BaseException]:
        return items[0][0]._append_many([(rec, part) for _, rec, part in items], self)


# TransactWriteItems takes at most 100 items: two per record (and its change's), and the head
AUDIT_RECORDS_PER_TRANSACTION = 49
AUDIT_ITEMS = 3  # a record's chain and id items and the head: beside a change's items


def _chain_item(rec: AuditRecord) -> dict[str, Any]:
    return {"pk": "chain", "sk": f"{rec.seq:012d}", "doc": rec.model_dump_json()}


_CHAIN_WRITERS: dict[tuple[str, str], _ChainWriter] = {}
_CHAIN_WRITERS_LOCK = threading.Lock()


def _conditional_failed(exc: ClientError) -> bool:
    return bool(exc.response.get("Error", {}).get("Code") == "ConditionalCheckFailedException")


def _token_key(item: dict[str, Any]) -> str | None:
    """The agent key a token item was issued under (None: written before tokens recorded it)."""
    key = item.get("agent_key")
    return None if key is None else str(key)


def _to_hold(instance_id: str, item: dict[str, Any]) -> LaunchHold:
    doc = {k: json.loads(v) for k, v in item.items() if k in LaunchHold.model_fields and isinstance(v, str)}
    doc["actions"] = {
        tok: {k: float(v) if k == "claimed_at" else json.loads(v) for k, v in entry.items()}
        for tok, entry in (item.get("actions") or {}).items()
    }
    return LaunchHold.model_validate({**doc, "instance_id": instance_id})


class DynamoStore:
    # items per audit-chain Query page (:meth:`audit_pages`); None: DynamoDB's own 1 MB a page.
    # Tests set it to show the anchor's memory follows one page, without a 1 MB page's chain.
    AUDIT_PAGE_ITEMS: int | None = None

    def __init__(
        self,
        inventory_table: str,
        state_table: str,
        audit_table: str,
        *,
        resource: Any = None,
        one_audit_writer: bool = True,
        owed_writer: str = "",
    ) -> None:
        """``one_audit_writer``: this process's audit writes go one at a time (:class:`_ChainWriter`);
        False leaves every thread to race like a process of its own (tests of the conditions).
        ``owed_writer``: the function whose partition this store marks workloads owed in (one of
        :data:`~ringfence.store.base.OWED_WRITERS`; "" none: :meth:`owe_compute` writes nothing)."""
        self.owed_writer = owed_writer
        ddb = resource or boto3.resource("dynamodb")
        self.one_audit_writer = one_audit_writer
        self.ddb = ddb
        self.inventory = ddb.Table(inventory_table)
        self.state = ddb.Table(state_table)
        self.audit_table = ddb.Table(audit_table)
        self.metric: Callable[[str, float], None] = no_metric

    # --- inventory ------------------------------------------------------------------------------

    @staticmethod
    def _to_record(item: dict[str, Any]) -> InventoryRecord:
        return InventoryRecord(
            id=item["id"],
            workload=Workload.model_validate_json(item["workload"]),
            state=item.get("state", "running"),
            observed_at=float(item.get("observed_at", 0)),
            tag_version=int(item["tag_version"]) if item.get("tag_version") is not None else None,
            labels=json.loads(item.get("labels", "{}")),
            problems=json.loads(item.get("problems", "[]")),
            op_mode=Mode(item["op_mode"]) if item.get("op_mode") else None,
            op_quarantined=bool(item.get("op_quarantined", False)),
            enrolled=bool(item.get("enrolled", False)),
            last_heartbeat=float(item["last_heartbeat"]) if item.get("last_heartbeat") is not None else None,
            offline=bool(item.get("offline", False)),
            governed_rev=int(item.get("governed_rev", 0)),
            label_writes=json.loads(item["label_writes"]) if item.get("label_writes") else None,
        )

    def _record(self, item: dict[str, Any]) -> InventoryRecord | None:
        """The record of an inventory item; None (logged, counted) when its workload is another
        than its key's (:func:`names_its_key`): what no read hands on."""
        rec = self._to_record(item)
        return rec if names_its_key(rec.id, rec.workload.id, self.metric) else None

    def get(self, workload_id: str) -> InventoryRecord | None:
        return self.get_many([workload_id]).get(workload_id)

    def get_many(self, workload_ids: list[str]) -> dict[str, InventoryRecord]:
        """The records, each with its quarantine item read in the same BatchGetItem (at most 100
        keys a call: 50 workloads); more than 50 workloads: records 100 a call and the quarantine
        partition queried once, instead of twice the calls."""
        ids = sorted(set(workload_ids))
        together = len(ids) <= QUARANTINE_BATCH
        items: list[dict[str, Any]] = []
        quarantined: set[str] = set()
        step = QUARANTINE_BATCH if together else 100
        for i in range(0, len(ids), step):
            chunk = ids[i : i + step]
            request: dict[str, Any] = {
                self.inventory.name: {"Keys": [{"id": x} for x in chunk], "ConsistentRead": True}
            }
            if together:
                keys = [{"pk": QUARANTINE, "sk": x} for x in chunk]
                request[self.state.name] = {"Keys": keys, "ConsistentRead": True}
            while request:
                resp = self.ddb.batch_get_item(RequestItems=request)
                items.extend(resp.get("Responses", {}).get(self.inventory.name, []))
                quarantined.update(str(q["sk"]) for q in resp.get("Responses", {}).get(self.state.name, []))
                request = resp.get("UnprocessedKeys") or {}
        if not together:
            quarantined = self._quarantined()
        recs = (self._with_quarantine(i, quarantined) for i in items if _observed(i))
        return {rec.id: rec for rec in recs if rec is not None}

    def _quarantined(self) -> set[str]:
        """Every workload with a quarantine item (one Query: quarantines are few)."""
        out: set[str] = set()
        kwargs: dict[str, Any] = {"KeyConditionExpression": Key("pk").eq(QUARANTINE), "ConsistentRead": True}
        while True:
            page = self.state.query(**kwargs)
            out.update(str(i["sk"]) for i in page.get("Items", []))
            if "LastEvaluatedKey" not in page:
                return out
            kwargs["ExclusiveStartKey"] = page["LastEvaluatedKey"]

    def _with_quarantine(self, item: dict[str, Any], quarantined: set[str]) -> InventoryRecord | None:
        """The record, quarantined if its quarantine item exists or its own ``op_quarantined``
        says so. The item is what counts: only the administrator's role may delete it, while the
        event-fed roles, which may update records, could write the attribute false (IAM cannot
        hold it). The attribute is read too for records quarantined before the item existed (an
        upgrade): they stay quarantined until an administrator releases them, which clears both.
        None: a record under another workload's key (:meth:`_record`)."""
        rec = self._record(item)
        if rec is None:
            return None
        if rec.id in quarantined and not rec.op_quarantined:
            rec.op_quarantined = True
        return rec

    def observe(
        self,
        rec: InventoryRecord,
        *,
        release_terminating: bool = False,
        previous: InventoryRecord | Unread | None = UNREAD,
    ) -> bool:
        old = self.get(rec.id) if previous is UNREAD else previous
        update = self._observation(rec, old, release_terminating, previous)
        if update is None:
            return False
        rec, kwargs = update
        try:
            self.inventory.update_item(**kwargs)
        except ClientError as exc:
            if not _conditional_failed(exc):
                raise
            # another writer landed between our read and write: another account's workload, a
            # newer observation (ours is stale: dropped), or a new governance decision (ours must
            # be decided again)
            now = self.get(rec.id)
            if now is not None and other_account(now, rec):
                raise OtherAccount(rec, now.workload.account) from None
            if now is not None and now.observed_at > rec.observed_at:
                return False
            raise GovernanceMoved(f"{rec.id}: the record changed while this record was decided") from None
        return old is None or old.cloud_view() != rec.cloud_view()

    def _observation(
        self,
        rec: InventoryRecord,
        old: InventoryRecord | None,
        release_terminating: bool = False,
        previous: InventoryRecord | Unread | None = UNREAD,
    ) -> tuple[InventoryRecord, dict[str, Any]] | None:
        """The conditional update that writes ``rec`` over ``old`` (the stored record as read), with
        ``rec`` as it is written; None when ``old`` is newer (``rec`` is dropped)."""
        check_names_its_key(rec)
        if old is not None and other_account(old, rec):
            raise OtherAccount(rec, old.workload.account)
        if old is not None and old.observed_at > rec.observed_at:
            return None
        if old is not None and old.state == "terminating" and rec.state in ACTIVE_STATES and not release_terminating:
            # a terminate lifecycle action was seen: the instance stays out of peers' sets while
            # it still runs in Terminating:Wait (termination is final, whatever the hook's result)
            rec = rec.model_copy(update={"state": "terminating"})
        tag_version = rec.tag_version
        if old is not None and old.tag_version is not None:
            tag_version = max(old.tag_version, tag_version or 0)
        values: dict[str, Any] = {
            ":w": rec.workload.model_dump_json(exclude={"mode", "quarantined"}),
            ":s": rec.state,
            ":t": Decimal(str(rec.observed_at)),
            ":l": json.dumps(rec.labels, sort_keys=True),
            ":p": json.dumps(rec.problems),
        }
        expr = "SET workload = :w, #st = :s, observed_at = :t, labels = :l, problems = :p, "
        condition = "(attribute_not_exists(observed_at) OR observed_at <= :t)"
        if rec.state != "terminated":
            # the stored record is still the version this record was decided from
            expr += "governed_rev = :g"
            values[":g"] = next_governed_rev(old, rec)
            if rec.label_writes is not None:
                expr += ", label_writes = :lw"
                values[":lw"] = json.dumps({d: w.model_dump() for d, w in sorted(rec.label_writes.items())})
            condition += " AND (attribute_not_exists(governed_rev) OR governed_rev = :r)"
            values[":r"] = rec.governed_rev
            if previous is not UNREAD:
                # and over exactly the observation the caller decided from (check_read)
                if previous is None:
                    condition += " AND attribute_not_exists(observed_at)"
                else:
                    condition += " AND observed_at = :pt"
                    values[":pt"] = Decimal(str(previous.observed_at))
        else:
            # written whatever was decided since the caller's read: one more than what is stored
            # then, never a number computed from that read (a binding in between would share it)
            expr += "governed_rev = if_not_exists(governed_rev, :zero) + :one"
            values |= {":zero": 0, ":one": 1}
        if tag_version is not None:
            expr += ", tag_version = :v"
            values[":v"] = tag_version
        # never over another account's workload (other_account): the workload's account is kept
        # beside its document, where a condition can read it; an item without it (no account, or
        # written before it was kept) was judged from the read above
        account = account_key(rec.workload.account)
        removes = ["label_writes"] if rec.state == "terminated" else []
        if account is None:
            same = "attribute_not_exists(#acct)"
            removes.append("#acct")
        else:
            same = "(attribute_not_exists(#acct) OR #acct = :acct)"
            expr += ", #acct = :acct"
            values[":acct"] = account
        if rec.state != "terminated":
            # the cloud gave this id in this account now: another account's tombstone is replaced
            same = f"({same} OR #st = :gone)"
            values[":gone"] = "terminated"
        condition += f" AND {same}"
        if removes:
            # a tombstone clears the known writes: a grant or approval does not outlive the workload
            expr += " REMOVE " + ", ".join(removes)
        kwargs: dict[str, Any] = {
            "Key": {"id": rec.id},
            "UpdateExpression": expr,
            "ConditionExpression": condition,
            "ExpressionAttributeNames": {"#st": "state", "#acct": "account"},
            "ExpressionAttributeValues": values,
        }
        return rec, kwargs

    def observe_many(self, recs: list[InventoryRecord]) -> set[str]:
        return {rec.id for rec in recs if self.observe(rec)}

    def all_records(self) -> list[InventoryRecord]:
        items: list[dict[str, Any]] = []
        kwargs: dict[str, Any] = {"ConsistentRead": True}
        while True:
            page = self.inventory.scan(**kwargs)
            items.extend(i for i in page.get("Items", []) if _observed(i))
            if "LastEvaluatedKey" not in page:
                break
            kwargs["ExclusiveStartKey"] = page["LastEvaluatedKey"]
        quarantined = self._quarantined()  # read after the records: a quarantine put meanwhile counts
        return [rec for rec in (self._with_quarantine(i, quarantined) for i in items) if rec is not None]

    def set_operator(
        self,
        workload_id: str,
        *,
        mode: Mode | None = _UNSET,
        quarantined: bool | None = None,
        as_read: InventoryRecord | None = None,
    ) -> None:
        """A quarantine is the state item ``quarantine``/``<workload id>``, put (never updated) in
        one transaction with a check that the record exists; a release deletes it and removes the
        record's ``op_quarantined`` (set true before the item existed: an upgrade) in one
        transaction. So the roles that quarantine (governance, in the event-fed functions) need
        only PutItem on that item, which can quarantine but never release; DeleteItem on it is
        the administrator's alone (template.yaml, infra/). ``as_read``: a condition of the
        record's item in that transaction (:meth:`_as_read_condition`)."""
        if quarantined is None and as_read is None:
            sets, removes, values = self._mode_update(mode)
            self._update(workload_id, sets, removes, values)
            return
        self._transact_part(self._operator_part(workload_id, mode, quarantined, as_read))

    @staticmethod
    def _mode_update(mode: Mode | None) -> tuple[list[str], list[str], dict[str, Any]]:
        if mode is _UNSET:
            return [], [], {}
        if mode is None:
            return [], ["op_mode"], {}
        return ["op_mode = :m"], [], {":m": mode.value}

    def _operator_part(
        self, workload_id: str, mode: Mode | None, quarantined: bool | None, as_read: InventoryRecord | None = None
    ) -> _Part:
        """:meth:`set_operator` as transaction items: the record's update (or, with nothing of it
        to change, a check that it exists), then the quarantine item's put or delete (none when
        ``quarantined`` is None). Refused by the first: :class:`KeyError`; with ``as_read`` (the
        record as read, which also says it existed then: no record is ever deleted)
        :class:`WorkloadChanged`."""
        sets, removes, values = self._mode_update(mode)
        if quarantined is False:
            removes.append("op_quarantined")
        record: dict[str, Any] = {"TableName": self.inventory.name, "Key": {"id": workload_id}}
        if as_read is None:
            record["ConditionExpression"] = "attribute_exists(id)"
        else:
            # the registration read and no other: the condition the pairing and reset paths check
            condition, names, read_values = self._as_read_condition(as_read)
            record["ConditionExpression"] = condition
            record["ExpressionAttributeNames"] = names
            values.update(read_values)
        if sets or removes:
            expr = ("SET " + ", ".join(sets) if sets else "") + (" REMOVE " + ", ".join(removes) if removes else "")
            record["UpdateExpression"] = expr.strip()
        if values:  # the mode's, and the record read's (a condition check's too)
            record["ExpressionAttributeValues"] = values
        items: list[dict[str, Any]] = [{"Update" if sets or removes else "ConditionCheck": record}]
        key = {"pk": QUARANTINE, "sk": workload_id}
        if quarantined:
            items.append({"Put": {"TableName": self.state.name, "Item": key}})
        elif quarantined is False:
            items.append({"Delete": {"TableName": self.state.name, "Key": key}})

        def refused(reasons: list[str]) -> Exception | None:
            if reasons[:1] != ["ConditionalCheckFailed"]:
                return None
            if as_read is None:
                return KeyError(workload_id)
            return _not_as_read(workload_id, as_read)

        return _Part(items, refused)

    def _transact_part(self, part: _Part) -> None:
        """Write a change's items in one transaction (no audit record with them)."""
        try:
            self.state.meta.client.transact_write_items(TransactItems=part.items)
        except ClientError as exc:
            if exc.response.get("Error", {}).get("Code") != "TransactionCanceledException":
                raise
            err = part.refused(_reasons(exc))
            if err is not None:
                raise err from None
            raise

    def set_liveness(
        self,
        workload_id: str,
        *,
        enrolled: bool | None = None,
        heartbeat: float | None = None,
        offline: bool | None = None,
    ) -> None:
        sets: list[str] = []
        values: dict[str, Any] = {}
        if enrolled is not None:
            sets.append("enrolled = :e")
            values[":e"] = enrolled
        if heartbeat is not None:
            sets.append("last_heartbeat = :h")
            values[":h"] = Decimal(str(heartbeat))
        if offline is not None:
            sets.append("#offline = :o")
            values[":o"] = offline
        self._update(workload_id, sets, [], values)

    def _update(self, workload_id: str, sets: list[str], removes: list[str], values: dict[str, Any]) -> None:
        if not sets and not removes:
            return
        expr = ""
        if sets:
            expr += "SET " + ", ".join(sets)
        if removes:
            expr += " REMOVE " + ", ".join(removes)
        kwargs: dict[str, Any] = {
            "Key": {"id": workload_id},
            "UpdateExpression": expr.strip(),
            "ConditionExpression": "attribute_exists(id)",
        }
        if values:
            kwargs["ExpressionAttributeValues"] = values
        if "#offline" in expr:
            kwargs["ExpressionAttributeNames"] = {"#offline": "offline"}
        try:
            self.inventory.update_item(**kwargs)
        except ClientError as exc:
            if _conditional_failed(exc):
                raise KeyError(workload_id) from None
            raise

    # --- state table helpers --------------------------------------------------------------------

    def _get(self, pk: str, sk: str) -> dict[str, Any] | None:
        item: dict[str, Any] | None = self.state.get_item(Key={"pk": pk, "sk": sk}, ConsistentRead=True).get("Item")
        if item is not None and "ttl" in item and int(item["ttl"]) < time.time():
            return None  # TTL deletion is lazy: an expired item is gone for us
        return item

    def _put(
        self, pk: str, sk: str, ttl: int | None = None, replaced: bool = False, **attrs: Any
    ) -> dict[str, Any] | None:
        """Writes the item; with ``replaced``, returns the item it replaced (or None)."""
        item = {"pk": pk, "sk": sk, **attrs}
        if ttl is not None:
            item["ttl"] = int(time.time()) + ttl
        if not replaced:
            self.state.put_item(Item=item)
            return None
        old: dict[str, Any] | None = self.state.put_item(Item=item, ReturnValues="ALL_OLD").get("Attributes")
        return old

    # --- engine head and policy -----------------------------------------------------------------

    def inventory_generation(self) -> int | None:
        return None  # none kept: on AWS the flows function, not each report, notes address owners

    def head(self) -> EngineHead:
        item = self._get("engine", "head")
        if item is None:
            return EngineHead()
        return EngineHead(
            revision=int(item.get("revision", 0)),
            policy_version=int(item.get("policy_version", 0)),
            clean=bool(item.get("clean", True)),
            published=int(item.get("published", 0)),
            rebuilt_from=int(item.get("rebuilt_from", 0)),
        )

    def put_head(self, new: EngineHead, expected_revision: int) -> None:
        # an update, not a put: the publish workers' count (``published``) on the same item stays
        try:
            self.state.update_item(
                Key={"pk": "engine", "sk": "head"},
                UpdateExpression="SET revision = :n, policy_version = :p, clean = :c, rebuilt_from = :b",
                ConditionExpression="attribute_not_exists(revision) OR revision = :r",
                ExpressionAttributeValues={
                    ":n": new.revision,
                    ":p": new.policy_version,
                    ":c": new.clean,
                    ":b": new.rebuilt_from,
                    ":r": expected_revision,
                },
            )
        except ClientError as exc:
            if _conditional_failed(exc):
                raise ConflictError(f"engine head moved past revision {expected_revision}") from None
            raise

    def active_policy(self) -> PolicyVersion | None:
        item = self._get("policy", "active")
        return PolicyVersion.model_validate_json(item["doc"]) if item else None

    def next_policy_version(self) -> int:
        out = self.state.update_item(
            Key={"pk": "policy", "sk": "counter"},
            UpdateExpression="ADD #v :one",
            ExpressionAttributeNames={"#v": "value"},
            ExpressionAttributeValues={":one": 1},
            ReturnValues="UPDATED_NEW",
        )
        return int(out["Attributes"]["value"])

    def activate_policy(self, pv: PolicyVersion, expected_active: int | Unread | None = UNREAD) -> None:
        self._transact_part(self._activation_part(pv, expected_active))

    def _activation_part(self, pv: PolicyVersion, expected_active: int | Unread | None) -> _Part:
        """:meth:`activate_policy` as transaction items; refused by the second (the active one's
        condition): :class:`ConflictError`."""
        doc = pv.model_dump_json()
        # the history item and the active one in one transaction; the active item carries its
        # number for the compare-and-swap (one written before it did matches a caller that read
        # it: the first activation after an upgrade adds the number, so the next race is caught)
        active: dict[str, Any] = {
            "TableName": self.state.name,
            "Item": {"pk": "policy", "sk": "active", "doc": doc, "number": pv.number},
        }
        if expected_active is None:
            active["ConditionExpression"] = "attribute_not_exists(pk)"
        elif expected_active is not UNREAD:
            active["ConditionExpression"] = "#n = :n OR (attribute_exists(pk) AND attribute_not_exists(#n))"
            active["ExpressionAttributeNames"] = {"#n": "number"}
            active["ExpressionAttributeValues"] = {":n": expected_active}
        history = {"TableName": self.state.name, "Item": {"pk": "policy", "sk": f"v{pv.number:08d}", "doc": doc}}

        def refused(reasons: list[str]) -> Exception | None:
            if reasons[1:2] != ["ConditionalCheckFailed"]:
                return None
            now = self.active_policy()
            return ConflictError(
                f"policy version {now.number if now else None} became active meanwhile (read: {expected_active})"
            )

        return _Part([{"Put": history}, {"Put": active}], refused)

    # --- published artifacts --------------------------------------------------------------------

    def bundle_pointer(self, workload_id: str) -> BundlePointer | None:
        return _pointer_of(self._get(f"bundle#{workload_id}", "latest"))

    def put_bundle_pointer(self, ptr: BundlePointer, expected_version: int | None = None) -> bool:
        if expected_version is None:  # an item holding only compute's pending mark has no version yet
            cond, values = "attribute_not_exists(version) OR version <= :v", {":v": ptr.version}
        else:  # compare-and-swap: only over the pointer the new one was derived from
            cond, values = "version = :e", {":e": expected_version}
        try:
            # an update, not a put: compute's pending mark on the same item stays (one older than
            # this version is satisfied by it; a newer one still holds the agent API back)
            self.state.update_item(
                Key={"pk": f"bundle#{ptr.workload_id}", "sk": "latest"},
                UpdateExpression="SET version = :n, doc = :d",
                ConditionExpression=cond,
                ExpressionAttributeValues={**values, ":n": ptr.version, ":d": ptr.model_dump_json()},
            )
        except ClientError as exc:
            if _conditional_failed(exc):
                return False
            raise
        return True

    def bundle_pointers(self, workload_ids: list[str]) -> dict[str, BundlePointer]:
        out: dict[str, BundlePointer] = {}
        for item in self._batch_get([(f"bundle#{w}", "latest") for w in sorted(set(workload_ids))]):
            ptr = _pointer_of(item)
            if ptr is not None:
                out[ptr.workload_id] = ptr
        return out

    def mark_bundle_pending(self, workload_id: str, version: int) -> None:
        try:
            self.state.update_item(
                Key={"pk": f"bundle#{workload_id}", "sk": "latest"},
                UpdateExpression="SET pending = :p, pending_at = :t",
                # the same version again renews when: a repair of a lost job re-marks it
                ConditionExpression="attribute_not_exists(pending) OR pending <= :p",
                ExpressionAttributeValues={":p": version, ":t": Decimal(str(round(time.time(), 3)))},
            )
        except ClientError as exc:
            if not _conditional_failed(exc):  # a higher mark stands: nothing to do
                raise

    def bundle_pending(self, workload_id: str) -> tuple[int, float | None] | None:
        item = self._get(f"bundle#{workload_id}", "latest")
        if item is None or "pending" not in item:
            return None
        return int(item["pending"]), float(item["pending_at"]) if "pending_at" in item else None

    def _batch_get(self, keys: list[tuple[str, str]]) -> list[dict[str, Any]]:
        out: list[dict[str, Any]] = []
        for i in range(0, len(keys), 100):
            chunk = [{"pk": pk, "sk": sk} for pk, sk in keys[i : i + 100]]
            request: dict[str, Any] = {self.state.name: {"Keys": chunk, "ConsistentRead": True}}
            while request:
                resp = self.ddb.batch_get_item(RequestItems=request)
                out.extend(resp.get("Responses", {}).get(self.state.name, []))
                request = resp.get("UnprocessedKeys") or {}
        return out

    def set_states(self, set_names: list[str]) -> dict[str, tuple[int, str | None]]:
        out: dict[str, tuple[int, str | None]] = {}
        for item in self._batch_get([(f"sethead#{n}", "head") for n in sorted(set(set_names))]):
            digest = item.get("digest")
            out[str(item["pk"]).removeprefix("sethead#")] = (int(item["version"]), str(digest) if digest else None)
        return out

    def bump_published(self, workloads: list[str] | None) -> int:
        out = self.state.update_item(
            Key={"pk": "engine", "sk": "head"},
            UpdateExpression="ADD published :one",
            ExpressionAttributeValues={":one": 1},
            ReturnValues="UPDATED_NEW",
        )
        count = int(out["Attributes"]["published"])
        listed = workloads is not None and len(workloads) <= MOVED_MAX
        self._put("published", f"{count:012d}", ttl=MOVED_TTL, doc=json.dumps(workloads if listed else None))
        return count

    def published_after(self, count: int) -> list[tuple[int, list[str] | None]]:
        out: list[tuple[int, list[str] | None]] = []
        kwargs: dict[str, Any] = {
            "KeyConditionExpression": Key("pk").eq("published") & Key("sk").gt(f"{count:012d}"),
            "ConsistentRead": True,
        }
        while True:
            page = self.state.query(**kwargs)
            out.extend((int(i["sk"]), json.loads(i["doc"])) for i in page.get("Items", []))
            if "LastEvaluatedKey" not in page:
                return out
            kwargs["ExclusiveStartKey"] = page["LastEvaluatedKey"]

    def put_set_head(self, set_name: str, version: int, digest: str | None = None) -> None:
        values: dict[str, Any] = {":v": version}
        expr = "SET version = :v"
        if digest is not None:
            expr += ", digest = :d"
            values[":d"] = digest
        try:
            self.state.update_item(
                Key={"pk": f"sethead#{set_name}", "sk": "head"},
                UpdateExpression=expr,
                ConditionExpression="attribute_not_exists(version) OR version < :v",
                ExpressionAttributeValues=values,
            )
        except ClientError as exc:
            if not _conditional_failed(exc):
                raise

    def set_heads(self, set_names: list[str]) -> dict[str, int]:
        """Latest delta version per set (sets that never had a delta are absent)."""
        out: dict[str, int] = {}
        names = sorted(set(set_names))
        for i in range(0, len(names), 100):
            keys = [{"pk": f"sethead#{n}", "sk": "head"} for n in names[i : i + 100]]
            request: dict[str, Any] = {self.state.name: {"Keys": keys, "ConsistentRead": True}}
            while request:
                resp = self.ddb.batch_get_item(RequestItems=request)
                for item in resp.get("Responses", {}).get(self.state.name, []):
                    out[str(item["pk"]).removeprefix("sethead#")] = int(item["version"])
                request = resp.get("UnprocessedKeys") or {}
        return out

    def put_delta(self, ptr: DeltaPointer) -> None:
        self._put(f"delta#{ptr.set}", f"{ptr.to_version:012d}", ttl=14 * 86400, doc=ptr.model_dump_json())

    def deltas_after(self, set_name: str, revision: int) -> list[DeltaPointer]:
        out: list[DeltaPointer] = []
        kwargs: dict[str, Any] = {
            "KeyConditionExpression": Key("pk").eq(f"delta#{set_name}") & Key("sk").gt(f"{revision:012d}"),
            "ConsistentRead": True,
        }
        while True:
            page = self.state.query(**kwargs)
            out.extend(DeltaPointer.model_validate_json(i["doc"]) for i in page.get("Items", []))
            if "LastEvaluatedKey" not in page:
                return out
            kwargs["ExclusiveStartKey"] = page["LastEvaluatedKey"]

    def put_moved(self, rec: MovedRecord) -> None:
        self._put("moved", f"{rec.revision:012d}", ttl=MOVED_TTL, doc=rec.model_dump_json())

    def moved_after(self, revision: int) -> list[MovedRecord]:
        out: list[MovedRecord] = []
        kwargs: dict[str, Any] = {
            "KeyConditionExpression": Key("pk").eq("moved") & Key("sk").gt(f"{revision:012d}"),
            "ConsistentRead": True,
        }
        while True:
            page = self.state.query(**kwargs)
            out.extend(MovedRecord.model_validate_json(i["doc"]) for i in page.get("Items", []))
            if "LastEvaluatedKey" not in page:
                return out
            kwargs["ExclusiveStartKey"] = page["LastEvaluatedKey"]

    # --- compute owed (control/wiring.py) ---------------------------------------------------------
    # a partition per writer, ``owed#<writer>`` (OWED_WRITERS), a mark per sort key (owed_key: a
    # slot hashed from the workload id, then the id); each function is granted UpdateItem on its
    # own partition alone (dynamodb:LeadingKeys), so a compromised one can delay only the marks it
    # writes. A drain reads each partition with a Query, never a Scan, with a budget of its own.
    # ``owed``: the one partition every writer shared before; drained only (no role writes it)

    def owe_compute(self, workload_ids: list[str], urgent: bool = False) -> None:
        ids = sorted(set(workload_ids))
        if ids and self.owed_writer not in OWED_WRITERS:
            # no partition is this function's (nor granted to it): not written, said why
            raise OwedNotMarked(ids) from ValueError(
                f"owed marks: this store's writer {self.owed_writer!r} is none of {', '.join(OWED_WRITERS)}"
            )
        # a write per mark: one throttled must not cost the marks after it
        failed: list[str] = []
        error: Exception | None = None
        for wid in ids:
            # an urgent mark stays urgent when an ordinary failure writes it again
            lane = "urgent = :u" if urgent else "urgent = if_not_exists(urgent, :u)"
            try:
                self.state.update_item(
                    Key={"pk": f"{OWED}#{self.owed_writer}", "sk": owed_key(wid)},
                    UpdateExpression=f"SET nonce = :n, {lane}",
                    ExpressionAttributeValues={":n": uuid.uuid4().hex, ":u": urgent},
                )
            except Exception as exc:
                failed.append(wid)
                error = error or exc
        if failed:
            raise OwedNotMarked(failed) from error

    def owed_compute(self, limit: int | None = None, start: str = "") -> list[OwedMark]:
        out: list[OwedMark] = []
        error: Exception | None = None
        for partition in (OWED, *(f"{OWED}#{w}" for w in OWED_WRITERS)):
            # each partition with its own limit and page budget: one writer's marks, however many
            # or large, leave every other writer's read as it would be without them
            try:
                out += self._owed_partition(partition, limit, "" if partition == OWED else start)
            except Exception as exc:
                log.exception("owed marks: partition %s could not be read (the others are)", partition)
                error = error or exc
        if error is not None and not out:
            raise error
        return out

    def _owed_partition(self, partition: str, limit: int | None, start: str) -> list[OwedMark]:
        out: list[OwedMark] = []
        pages = 0
        # from ``start`` to the end of the partition, then round from its beginning to ``start``
        for part in (Key("sk").gte(start), Key("sk").lt(start)) if start else (None,):
            cond = Key("pk").eq(partition) if part is None else Key("pk").eq(partition) & part
            kwargs: dict[str, Any] = {
                "KeyConditionExpression": cond,
                "ConsistentRead": True,
                # only what a mark is: any other attribute a writer of the partition added stays unread
                "ProjectionExpression": "sk, nonce, urgent",
            }
            while (limit is None or len(out) < limit) and pages < OWED_PAGE_BUDGET:
                if limit is not None:
                    kwargs["Limit"] = limit - len(out)
                try:
                    page = self.state.query(**kwargs)
                except Exception:
                    if not out:
                        raise
                    log.exception(
                        "owed marks: a page of %s failed after %d marks read: the drain takes those",
                        partition,
                        len(out),
                    )
                    return out
                if page.get("Items") or "LastEvaluatedKey" in page:
                    pages += 1  # an empty half (a start past every mark) costs no page of the budget
                self._owed_marks(page, partition, out)
                if "LastEvaluatedKey" not in page:
                    break
                kwargs["ExclusiveStartKey"] = page["LastEvaluatedKey"]
        return out

    @staticmethod
    def _owed_marks(page: dict[str, Any], partition: str, out: list[OwedMark]) -> None:
        for i in page.get("Items", []):
            # any writer of the partition may leave a mark malformed (its nonce removed):
            # one such item must not fail every drain; it is still a workload owed
            key, nonce = i.get("sk"), i.get("nonce")
            if not isinstance(key, str) or not key:
                continue
            # the legacy partition's keys are the ids; a key whose slot is not its id's is read as
            # written: with a '#' (no workload id has one) the drain deletes it unsent, a bare id
            # is that id, handed on like a mark (only the partition's own writer can make either)
            wid = key if partition == OWED else (owed_id(key) or key)
            # a nonce longer than any we write (a writer may set ~400 KB) is malformed: read as
            # "", never kept nor sent back, so a few thousand of them cannot fill a drain's memory
            ok = isinstance(nonce, str) and 0 < len(nonce) <= OWED_NONCE_MAX
            out.append(OwedMark(wid, bool(i.get("urgent")), nonce if ok else "", partition, key))

    def settle_owed(self, marks: list[OwedMark]) -> list[str]:
        settled: list[str] = []
        for m in marks:
            if m.nonce:
                cond: dict[str, Any] = {
                    "ConditionExpression": "nonce = :n",
                    "ExpressionAttributeValues": {":n": m.nonce},
                }
            else:
                # read malformed: deleted only while still so (a mark written since has a nonce)
                cond = {
                    # size() is the nonce's length in characters or in bytes: a nonce over
                    # OWED_NONCE_MAX characters is over it either way, one written since is not
                    "ConditionExpression": "attribute_not_exists(nonce) OR NOT attribute_type(nonce, :s) "
                    "OR nonce = :e OR size(nonce) > :max",
                    "ExpressionAttributeValues": {":s": "S", ":e": "", ":max": OWED_NONCE_MAX},
                }
            # a mark not read here (its partition unnamed): this store's writer's
            partition = m.partition or f"{OWED}#{self.owed_writer}"
            key = m.key or (m.workload_id if partition == OWED else owed_key(m.workload_id))
            try:
                self.state.delete_item(Key={"pk": partition, "sk": key}, **cond)
            except ClientError as exc:
                if _conditional_failed(exc):
                    continue  # written again since it was read: the next drain's
                raise
            settled.append(m.workload_id)
        return settled

    # --- agent auth -----------------------------------------------------------------------------

    def put_nonce(self, nonce: str, ttl: int) -> None:
        self._put(f"nonce#{nonce}", "nonce", ttl=ttl)

    def burn_nonce(self, nonce: str) -> bool:
        """Delete the nonce if it exists and is unexpired; True exactly once per nonce."""
        try:
            self.state.delete_item(
                Key={"pk": f"nonce#{nonce}", "sk": "nonce"},
                ConditionExpression="attribute_exists(pk) AND #t >= :now",
                ExpressionAttributeNames={"#t": "ttl"},
                ExpressionAttributeValues={":now": int(time.time())},
            )
        except ClientError as exc:
            if _conditional_failed(exc):
                return False
            raise
        return True

    def claimed(self, key: str) -> bool:
        item = self._get(f"once#{key}", "once")
        return item is not None and int(item.get("ttl", 0)) >= time.time()  # TTL deletion lags

    def claim_once(self, key: str, ttl: int) -> bool:
        try:
            self.state.put_item(
                Item={"pk": f"once#{key}", "sk": "once", "ttl": int(time.time()) + ttl},
                ConditionExpression="attribute_not_exists(pk)",
            )
        except ClientError as exc:
            if _conditional_failed(exc):
                return False
            raise
        return True

    def put_token(self, token_hash: str, workload_id: str, ttl: int, agent_key: str = "") -> None:
        # the token item maps hash → workload (and the agent key it was issued under); the
        # workload's ``tokenof`` item names its one current token, so a token replaced (even by a
        # racing writer) never authorizes again. The put hands back the ``tokenof`` item it
        # replaced: the previous token, deleted without a read first (one round trip less per
        # enrollment and renewal)
        self._put(f"token#{token_hash}", "token", ttl=ttl, workload_id=workload_id, agent_key=agent_key)
        old = self._put(f"tokenof#{workload_id}", "token", ttl=ttl, replaced=True, hash=token_hash)
        if old is not None and old.get("hash") != token_hash:
            self.state.delete_item(Key={"pk": f"token#{old['hash']}", "sk": "token"})

    def token_workload(self, token_hash: str) -> str | None:
        item = self._get(f"token#{token_hash}", "token")
        if item is None:
            return None
        wid = str(item["workload_id"])
        current = self._get(f"tokenof#{wid}", "token")
        if current is None or current.get("hash") != token_hash:
            return None
        return wid if token_key_holds(_token_key(item), self.agent_key(wid)) else None

    def token_expires(self, token_hash: str) -> float | None:
        item = self._get(f"token#{token_hash}", "token")
        return float(item["ttl"]) if item is not None and "ttl" in item else None

    def token_grant(self, token_hash: str, workload_id: str, with_enforcement: bool = False) -> Grant:
        # one BatchGetItem for the five items (the token, the workload's current token, its bound
        # agent key, its bundle pointer, its inventory record) instead of five GetItems: one round
        # trip per agent request, and the pointer is what a wait, a heartbeat or a bundle fetch
        # reads next; a heartbeat's adds its last enforcement report (what it writes anew)
        keys = [
            {"pk": f"token#{token_hash}", "sk": "token"},
            {"pk": f"tokenof#{workload_id}", "sk": "token"},
            {"pk": f"agentkey#{workload_id}", "sk": "key"},
            {"pk": f"bundle#{workload_id}", "sk": "latest"},
        ]
        if with_enforcement:
            keys.append({"pk": "enforcement", "sk": workload_id})
        request: dict[str, Any] = {
            self.state.name: {"Keys": keys, "ConsistentRead": True},
            self.inventory.name: {"Keys": [{"id": workload_id}], "ConsistentRead": True},
        }
        state: dict[str, dict[str, Any]] = {}
        inventory: list[dict[str, Any]] = []
        while request:
            resp = self.ddb.batch_get_item(RequestItems=request)
            for item in resp.get("Responses", {}).get(self.state.name, []):
                if "ttl" not in item or int(item["ttl"]) >= time.time():  # TTL deletion is lazy
                    state[str(item["pk"])] = item
            inventory.extend(resp.get("Responses", {}).get(self.inventory.name, []))
            request = resp.get("UnprocessedKeys") or {}
        token = state.get(f"token#{token_hash}")
        if token is None:
            return Grant(None)
        if str(token["workload_id"]) != workload_id:  # another workload's token: whose, if current
            return Grant(self.token_workload(token_hash))
        current = state.get(f"tokenof#{workload_id}")
        if current is None or current.get("hash") != token_hash:
            return Grant(None)
        bound = state.get(f"agentkey#{workload_id}")
        if not token_key_holds(_token_key(token), str(bound["public_key"]) if bound else None):
            return Grant(None)
        item = inventory[0] if inventory else None
        report = state.get("enforcement")
        return Grant(
            workload_id,
            # the record's quarantine item is not read: the agent API decides nothing from it
            # (compute signs it into the bundle), and every agent request would read one more item
            self._record(item) if item is not None and _observed(item) else None,
            _pointer_of(state.get(f"bundle#{workload_id}")),
            EnforcementReport.model_validate_json(report["doc"]) if report is not None else None,
            with_enforcement,
        )

    def revoke_tokens(self, workload_id: str) -> bool:
        old = self.state.get_item(Key={"pk": f"tokenof#{workload_id}", "sk": "token"}, ConsistentRead=True).get("Item")
        if old is None:
            return False
        self.state.delete_item(Key={"pk": f"tokenof#{workload_id}", "sk": "token"})
        self.state.delete_item(Key={"pk": f"token#{old['hash']}", "sk": "token"})
        return int(old.get("ttl", 0)) >= time.time()

    def active_token(self, workload_id: str) -> str | None:
        item = self._get(f"tokenof#{workload_id}", "token")  # an expired one: None
        return str(item["hash"]) if item is not None else None

    def _revocation_part(self, workload_id: str, token_hash: str) -> _Part:
        """A :class:`TokenRevocation` as transaction items: the ``tokenof#`` item deleted on
        condition only that it is there, unexpired, whichever token it names (refused by it:
        :class:`ConflictError`), and the item of ``token_hash``, the token read. A refresh in
        between replaced that token: the ``tokenof#`` item deleted names the new one, whose own
        ``token#`` item is left to its TTL, authorizing nothing (:meth:`token_workload` and
        :meth:`token_grant` require the ``tokenof#`` item to name it). Conditioned on the hash, a
        copied agent key renewing between each read and its transaction refused every attempt."""
        current: dict[str, Any] = {
            "TableName": self.state.name,
            "Key": {"pk": f"tokenof#{workload_id}", "sk": "token"},
            "ConditionExpression": "#t >= :now",  # false where the item is absent
            "ExpressionAttributeNames": {"#t": "ttl"},
            "ExpressionAttributeValues": {":now": int(time.time())},
        }
        token = {"TableName": self.state.name, "Key": {"pk": f"token#{token_hash}", "sk": "token"}}

        def refused(reasons: list[str]) -> Exception | None:
            if reasons[:1] != ["ConditionalCheckFailed"]:
                return None
            return ConflictError(f"{workload_id} has no active token any more")

        return _Part([{"Delete": current}, {"Delete": token}], refused)

    def _bind_items(self, workload_id: str, public_key: str, replace: bool) -> list[dict[str, Any]]:
        """The transaction items binding ``public_key``: the named-key expectation ended (deleted
        on condition that it names this key, or is absent), then the key put."""
        named = {
            "TableName": self.state.name,
            "Key": {"pk": f"nextkey#{workload_id}", "sk": "key"},
            "ConditionExpression": "attribute_not_exists(pk) OR key_id = :k",
            "ExpressionAttributeValues": {":k": agent_key_fingerprint_of(public_key) or ""},
        }
        put: dict[str, Any] = {
            "TableName": self.state.name,
            "Item": {"pk": f"agentkey#{workload_id}", "sk": "key", "public_key": public_key},
        }
        if not replace:
            put["ConditionExpression"] = "attribute_not_exists(pk)"
        return [{"Delete": named}, {"Put": put}]

    def _transact(self, workload_id: str, items: list[dict[str, Any]], named_at: int) -> list[str]:
        """Write ``items`` in one transaction (the resource's client: plain values):
        :class:`NotTheNamedKey` if the condition of item ``named_at`` (:meth:`_bind_items`'
        first) failed; else the cancellation reasons, one per item ([] when it went through)."""
        try:
            self.state.meta.client.transact_write_items(TransactItems=items)
        except ClientError as exc:
            if exc.response.get("Error", {}).get("Code") != "TransactionCanceledException":
                raise
            reasons = [str(r.get("Code", "None")) for r in exc.response.get("CancellationReasons", [])]
            if not set(reasons) <= {"None", "ConditionalCheckFailed"}:
                raise
            if named_at < len(reasons) and reasons[named_at] == "ConditionalCheckFailed":
                raise NotTheNamedKey(self.expected_agent_key(workload_id) or "") from None
            return reasons
        return []

    def bind_agent_key(self, workload_id: str, public_key: str, *, replace: bool = False) -> str:
        if self._transact(workload_id, self._bind_items(workload_id, public_key, replace), named_at=0):
            return self.agent_key(workload_id) or public_key  # another key was bound first
        return public_key

    def agent_key(self, workload_id: str) -> str | None:
        item = self._get(f"agentkey#{workload_id}", "key")
        return str(item["public_key"]) if item else None

    def drop_agent_key(self, workload_id: str) -> None:
        self.state.delete_item(Key={"pk": f"agentkey#{workload_id}", "sk": "key"})

    def expect_agent_key(self, workload_id: str, fingerprint: str | None) -> None:
        # the attribute keeps its name: it held a 64-bit key id before, which now matches no key
        if fingerprint is None:
            self.state.delete_item(Key={"pk": f"nextkey#{workload_id}", "sk": "key"})
        else:
            self._put(f"nextkey#{workload_id}", "key", key_id=fingerprint)

    def expected_agent_key(self, workload_id: str) -> str | None:
        item = self._get(f"nextkey#{workload_id}", "key")
        return str(item["key_id"]) if item else None

    def put_pairing(
        self, key_hash: str, workload_id: str, uses: int, ttl: int, as_read: InventoryRecord | None = None
    ) -> None:
        if not workload_id:
            raise ValueError("a pairing key is issued for one workload")
        # indexed by workload (pairingof#<id>, one item per key) in the same transaction, so that
        # no key exists that drop_pairings cannot find, even one minted while it runs
        expires = int(time.time()) + ttl
        index = {"pk": f"pairingof#{workload_id}", "sk": key_hash, "ttl": expires}
        key = {"pk": f"pairing#{key_hash}", "sk": "pairing", "ttl": expires, "uses": uses, "workload_id": workload_id}
        items = [{"Put": {"TableName": self.state.name, "Item": item}} for item in (index, key)]
        self._transact_part(self._as_read_part(workload_id, as_read, items))

    def _as_read_part(self, workload_id: str, as_read: InventoryRecord | None, items: list[dict[str, Any]]) -> _Part:
        """``items`` as a transaction, with ``as_read`` (:func:`check_as_read`) a condition of the
        inventory item first: refused by it, :class:`WorkloadChanged`."""
        if as_read is None:
            return _Part(items, lambda reasons: None)
        condition, names, values = self._as_read_condition(as_read)
        check = {
            "ConditionCheck": {
                "TableName": self.inventory.name,
                "Key": {"id": workload_id},
                "ConditionExpression": condition,
                "ExpressionAttributeNames": names,
                "ExpressionAttributeValues": values,
            }
        }

        def refused(reasons: list[str]) -> Exception | None:
            if reasons[:1] != ["ConditionalCheckFailed"]:
                return None
            return _not_as_read(workload_id, as_read)

        return _Part([check, *items], refused)

    @staticmethod
    def _as_read_condition(as_read: InventoryRecord) -> tuple[str, dict[str, str], dict[str, Any]]:
        """:func:`check_as_read` as a condition of the inventory item (its expression, names and
        values): it exists, with the ``governed_rev`` read (a deregistration moves it, never back),
        deregistered or not alike, and the observation read (a registration of the id in place
        since, which may keep the version, moves it; a heartbeat or a binding never does)."""
        values: dict[str, Any] = {
            ":read_rev": as_read.governed_rev,
            ":gone": "terminated",
            ":read_at": Decimal(str(as_read.observed_at)),
        }
        same = "governed_rev = :read_rev"
        if as_read.governed_rev == 0:
            same = f"({same} OR attribute_not_exists(governed_rev))"
        gone = "#st = :gone" if as_read.state == "terminated" else "(attribute_not_exists(#st) OR #st <> :gone)"
        return f"attribute_exists(id) AND {same} AND {gone} AND observed_at = :read_at", {"#st": "state"}, values

    def use_pairing(self, key_hash: str, workload_id: str, agent_key: str) -> bool:
        use: dict[str, Any] = {
            "TableName": self.state.name,
            "Key": {"pk": f"pairing#{key_hash}", "sk": "pairing"},
            "UpdateExpression": "SET uses = uses - :one",
            "ConditionExpression": "attribute_exists(pk) AND workload_id = :w AND uses > :zero AND #t >= :now",
            "ExpressionAttributeNames": {"#t": "ttl"},
            "ExpressionAttributeValues": {":one": 1, ":zero": 0, ":now": int(time.time()), ":w": workload_id},
        }
        # only a key drop_pairings can find enrolls: one minted before the pairingof# index existed
        # (no index item) would outlive every revocation, so it is refused (fail closed)
        indexed = {
            "TableName": self.state.name,
            "Key": {"pk": f"pairingof#{workload_id}", "sk": key_hash},
            "ConditionExpression": "attribute_exists(pk)",
        }
        # the use and the binding in one transaction ([use, index, named-key expectation, key])
        items = [{"Update": use}, {"ConditionCheck": indexed}, *self._bind_items(workload_id, agent_key, True)]
        return not self._transact(workload_id, items, named_at=2)

    def drop_pairings(self, workload_id: str, as_read: InventoryRecord | None = None) -> int:
        if as_read is not None:
            return self._drop_pairings_as_read(workload_id, as_read)
        live = 0
        for entry in self._query_all(f"pairingof#{workload_id}"):
            old = self.state.delete_item(
                Key={"pk": f"pairing#{entry['sk']}", "sk": "pairing"}, ReturnValues="ALL_OLD"
            ).get("Attributes")
            if old is not None and int(old.get("uses", 0)) > 0 and int(old.get("ttl", 0)) >= time.time():
                live += 1
            self.state.delete_item(Key={"pk": entry["pk"], "sk": entry["sk"]})
        return live

    def reset_agent_key(self, change: AgentKeyReset) -> tuple[int, bool]:
        """The pairing keys read from their index (and each read, to count those that could still
        enroll), then transactions each conditional on the record as read: the keys beyond what
        the last takes first, then the last: the named next key put (or deleted), the agent key,
        the ``tokenof#`` item and the token read, the connection and the remaining pairing keys
        deleted. A token issued after that read keeps its ``token#`` item but authorizes nothing:
        a token holds only while the key it was issued under is bound (:func:`token_key_holds`),
        and that key goes in the same transaction."""
        wid, as_read = change.workload_id, change.as_read
        token = self.state.get_item(Key={"pk": f"tokenof#{wid}", "sk": "token"}, ConsistentRead=True).get("Item")
        if change.next_agent_key is None:
            named = self._delete(f"nextkey#{wid}", "key")
        else:
            item = {"pk": f"nextkey#{wid}", "sk": "key", "key_id": change.next_agent_key}
            named = {"Put": {"TableName": self.state.name, "Item": item}}
        last = [named, self._delete(f"agentkey#{wid}", "key"), self._delete(f"tokenof#{wid}", "token")]
        if token is not None:
            last.append(self._delete(f"token#{token['hash']}", "token"))
        last.append(self._delete(f"conn#{wid}", "conn"))
        live, pairings = self._pairing_deletes(wid)
        room = TRANSACT_ITEMS - 1 - len(last)  # beside the condition
        room -= room % 2
        last += pairings[:room]
        rest = pairings[room:]
        per = (TRANSACT_ITEMS - 1) // 2 * 2
        # Refused at a later transaction (the id deregistered and registered again, or governed
        # anew, after an earlier one committed), the keys the earlier ones revoked stay revoked
        # while the reset answers 409. Harmless, on purpose: each earlier transaction committed
        # only while the record was still the one read, and its keys were listed before it, so
        # every key it revoked was issued before any later registration was written: the old
        # registration's (or its id's earlier lives', which a deregistration and a registration
        # again drop anyway), never one minted for the host registered since, and never that
        # host's agent key, token or connection (all in the last transaction). Revoking them is
        # what the reset asked for, a revoked key only makes the operator mint another, and keys
        # left unrevoked would be the harm, so the keys go before the last step, not after it
        # (tests/aws/test_attack_deregistration_race_ddb.py, the reset refused between its
        # transactions). The same holds for _drop_pairings_as_read and _old_host_parts.
        for i in range(0, len(rest), per):
            self._transact_part(self._as_read_part(wid, as_read, rest[i : i + per]))
        self._transact_part(self._as_read_part(wid, as_read, last))
        return live, token is not None and int(token.get("ttl", 0)) >= time.time()

    def _pairing_deletes(self, workload_id: str) -> tuple[int, list[dict[str, Any]]]:
        """The deletes of every pairing key of ``workload_id`` (its item and its index item, two
        by two), read from the index, and how many could still enroll: each key is read first (a
        transaction returns no old item), so a use spent between that read and the delete is
        counted all the same."""
        live = 0
        deletes: list[dict[str, Any]] = []
        for entry in self._query_all(f"pairingof#{workload_id}"):
            if (old := self._get(f"pairing#{entry['sk']}", "pairing")) is not None and int(old.get("uses", 0)) > 0:
                live += 1
            deletes += [self._delete(f"pairing#{entry['sk']}", "pairing"), self._delete(entry["pk"], entry["sk"])]
        return live, deletes

    def _drop_pairings_as_read(self, workload_id: str, as_read: InventoryRecord) -> int:
        """:meth:`drop_pairings` in transactions each conditional on the record as read: one refused
        after others committed leaves their keys revoked, all issued before the record changed
        (see :meth:`reset_agent_key`)."""
        live, deletes = self._pairing_deletes(workload_id)
        per = (TRANSACT_ITEMS - 1) // 2 * 2  # beside the condition; a key's two items together
        for i in range(0, max(len(deletes), 1), per):  # none to drop: the check alone, so a 409 is said
            self._transact_part(self._as_read_part(workload_id, as_read, deletes[i : i + per]))
        return live

    def retire_old_host(self, change: OldHostRetirement) -> None:
        for part in self._old_host_parts(change):
            self._transact_part(part)

    def _old_host_parts(self, change: OldHostRetirement) -> list[_Part]:
        """An :class:`OldHostRetirement` as transactions, the last one's items to go with its
        record (:meth:`audit_with`): each holds a check that the inventory item is still the
        tombstone read (refused by it: :class:`NotTheTombstone`). The last deletes the ``tokenof#``
        item (conditional on an unexpired one when ``token_hash`` names the token read, else on
        none: refused by it, :class:`ConflictError`), the token read, the agent key, the named next
        key, the nudge connection and as many pairing keys (their item and their ``pairingof#``
        index item) as fit beside the record's items; the keys beyond go in transactions before
        it. The keys are read from the index beforehand (a query): one issued after that read was
        issued while the id was registered, so by a later registration's caller, whose write then
        refuses every transaction here. A transaction refused after earlier ones committed leaves
        their keys revoked: listed before the first, each while the tombstone stood, so the old
        host's (or a pairing's that raced its deregistration), which the registration again drops
        anyway, never the new host's (see :meth:`reset_agent_key`)."""
        wid = change.workload_id
        tombstone: dict[str, Any] = {
            "ConditionCheck": {
                "TableName": self.inventory.name,
                "Key": {"id": wid},
                "ConditionExpression": "#st = :gone AND observed_at = :at0",
                "ExpressionAttributeNames": {"#st": "state"},
                "ExpressionAttributeValues": {":gone": "terminated", ":at0": Decimal(str(change.tombstone_at))},
            }
        }
        # as the read's expiry (_get: ttl < now, a float): for a whole ttl, ttl < ceil(now) says the
        # same, so a token read as expired is one this condition finds expired (int(now) refused
        # it for up to a second after its expiry, every retry of a deregistration's drop alike)
        now = math.ceil(time.time())
        current: dict[str, Any] = {
            "TableName": self.state.name,
            "Key": {"pk": f"tokenof#{wid}", "sk": "token"},
            "ExpressionAttributeNames": {"#t": "ttl"},
            "ExpressionAttributeValues": {":now": now},
        }
        if change.token_hash is not None:
            current["ConditionExpression"] = "#t >= :now"  # false where the item is absent
        else:
            current["ConditionExpression"] = "attribute_not_exists(pk) OR #t < :now"
        last: list[dict[str, Any]] = [tombstone, {"Delete": current}]
        if change.token_hash is not None:
            last.append(self._delete(f"token#{change.token_hash}", "token"))
        last += [self._delete(f"agentkey#{wid}", "key"), self._delete(f"nextkey#{wid}", "key")]
        last.append(self._delete(f"conn#{wid}", "conn"))
        pairings: list[dict[str, Any]] = []
        for entry in self._query_all(f"pairingof#{wid}"):
            pairings += [self._delete(f"pairing#{entry['sk']}", "pairing"), self._delete(entry["pk"], entry["sk"])]
        # the last transaction leaves room for the record's items (a chain item, an id item, the head)
        room = TRANSACT_ITEMS - AUDIT_ITEMS - len(last)
        room -= room % 2
        last += pairings[:room]
        rest = pairings[room:]
        per = (TRANSACT_ITEMS - 1) // 2 * 2
        first = [[tombstone, *rest[i : i + per]] for i in range(0, len(rest), per)]

        def refused(reasons: list[str]) -> Exception | None:
            if reasons[:1] == ["ConditionalCheckFailed"]:
                return NotTheTombstone(f"{wid}: registered or deregistered again since its tombstone was read")
            if reasons[1:2] == ["ConditionalCheckFailed"]:
                return ConflictError(f"{wid}: its token changed since it was read")
            return None

        return [*(_Part(items, refused) for items in first), _Part(last, refused)]

    def _delete(self, pk: str, sk: str) -> dict[str, Any]:
        return {"Delete": {"TableName": self.state.name, "Key": {"pk": pk, "sk": sk}}}

    def _query_all(self, pk: str) -> list[dict[str, Any]]:
        """Every item of the state table's partition ``pk`` (consistent reads, every page)."""
        items: list[dict[str, Any]] = []
        kwargs: dict[str, Any] = {"KeyConditionExpression": Key("pk").eq(pk)}
        while True:
            page = self.state.query(ConsistentRead=True, **kwargs)
            items.extend(page.get("Items", []))
            if "LastEvaluatedKey" not in page:
                return items
            kwargs["ExclusiveStartKey"] = page["LastEvaluatedKey"]

    def put_connection(self, workload_id: str, connection_id: str, token_hash: str) -> bool:
        # one transaction with a check of the workload's current token: a refresh or a retirement
        # revokes it before it drops the connection, so a $connect that checked the token before
        # either and writes after it is cancelled here, never left as the workload's connection
        now = int(time.time())
        try:
            self.state.meta.client.transact_write_items(
                TransactItems=[
                    {
                        "Put": {
                            "TableName": self.state.name,
                            "Item": {
                                "pk": f"conn#{workload_id}",
                                "sk": "conn",
                                "connection_id": connection_id,
                                "ttl": now + 2 * 3600,
                            },
                        }
                    },
                    {
                        "ConditionCheck": {
                            "TableName": self.state.name,
                            "Key": {"pk": f"tokenof#{workload_id}", "sk": "token"},
                            "ConditionExpression": "#h = :h AND #t >= :now",
                            "ExpressionAttributeNames": {"#h": "hash", "#t": "ttl"},
                            "ExpressionAttributeValues": {":h": token_hash, ":now": now},
                        }
                    },
                ]
            )
        except ClientError as exc:
            if exc.response.get("Error", {}).get("Code") != "TransactionCanceledException":
                raise
            reasons = [str(r.get("Code", "None")) for r in exc.response.get("CancellationReasons", [])]
            if reasons[1:2] == ["ConditionalCheckFailed"]:
                return False
            raise
        return True

    def connection(self, workload_id: str) -> str | None:
        item = self._get(f"conn#{workload_id}", "conn")
        return str(item["connection_id"]) if item else None

    def drop_connection(self, workload_id: str, connection_id: str | None = None) -> None:
        key = {"pk": f"conn#{workload_id}", "sk": "conn"}
        if connection_id is None:
            self.state.delete_item(Key=key)
            return
        try:
            self.state.delete_item(
                Key=key, ConditionExpression="connection_id = :c", ExpressionAttributeValues={":c": connection_id}
            )
        except ClientError as exc:
            if not _conditional_failed(exc):
                raise  # else its agent connected again since: that connection stays

    # --- launch holds -----------------------------------------------------------------------------

    # The agent API's fact (its agent enforces: HOLD_FIRST_WINS) is an item of its own, under a
    # partition the agent-API role may write; compute's facts (the lifecycle action, the perimeter,
    # the release) are the hold item, which that role may not touch (an agent API that could write
    # released_at would leave every launch to time out into ABANDON). Each writer writes its own
    # item, then reads the other's with a consistent read, so whichever comes second sees the first.

    def hold_launch(self, instance_id: str, **fields: Any) -> LaunchHold:
        check_hold_fields(fields)
        agent = set(fields) <= HOLD_FIRST_WINS
        if not agent and set(fields) & HOLD_FIRST_WINS:
            raise ValueError(f"launch hold: {sorted(HOLD_FIRST_WINS)} are written apart from {sorted(fields)}")
        key = (
            {"pk": f"enforcing#{instance_id}", "sk": "agent"}
            if agent
            else {"pk": f"launch#{instance_id}", "sk": "hold"}
        )
        sets, names = ["#ttl = :ttl"], {"#ttl": "ttl"}
        values: dict[str, Any] = {":ttl": int(time.time()) + HOLD_TTL}
        for i, (k, v) in enumerate(sorted(fields.items())):
            names[f"#f{i}"] = k
            values[f":f{i}"] = json.dumps(v)  # JSON text: floats and dicts without Decimal conversion
            sets.append(f"#f{i} = if_not_exists(#f{i}, :f{i})" if k in HOLD_FIRST_WINS else f"#f{i} = :f{i}")
        out = self.state.update_item(
            Key=key,
            UpdateExpression="SET " + ", ".join(sets),
            ExpressionAttributeNames=names,
            ExpressionAttributeValues=values,
            ReturnValues="ALL_NEW",
        )
        other = self._get(f"launch#{instance_id}", "hold") if agent else self._get(f"enforcing#{instance_id}", "agent")
        return _to_hold(instance_id, {**(other or {}), **out["Attributes"]})

    def launch_hold(self, instance_id: str) -> LaunchHold | None:
        items = self._batch_get([(f"launch#{instance_id}", "hold"), (f"enforcing#{instance_id}", "agent")])
        if not items:
            return None
        merged: dict[str, Any] = {}
        for item in items:
            merged.update(item)
        return _to_hold(instance_id, merged)

    # Each action is an entry of the hold's map ``actions`` under its token (a DynamoDB map:
    # written and claimed one entry at a time with conditions on that entry's path alone, so the
    # actions of one instance never displace one another): its fields JSON text, but for
    # ``claimed_at``, a number comparable in a condition.

    def hold_launch_action(self, instance_id: str, lifecycle: dict[str, Any], **fields: Any) -> LaunchHold:
        check_hold_fields(fields)
        if set(fields) - {"perimeter_at", "perimeter"}:
            raise ValueError(f"launch hold: an action is recorded with its hand-off fields only, not {sorted(fields)}")
        key = {"pk": f"launch#{instance_id}", "sk": "hold"}
        token = str(lifecycle["token"])
        # the map first (an entry can only be set inside an existing map), then the entry
        self.state.update_item(
            Key=key,
            UpdateExpression="SET #ttl = :ttl, #actions = if_not_exists(#actions, :empty)",
            ExpressionAttributeNames={"#ttl": "ttl", "#actions": "actions"},
            ExpressionAttributeValues={":ttl": int(time.time()) + HOLD_TTL, ":empty": {}},
        )
        entry = {k: json.dumps(v) for k, v in {**fields, "lifecycle": lifecycle, "recorded_at": time.time()}.items()}
        try:
            self.state.update_item(
                Key=key,
                UpdateExpression="SET #actions.#tok = :entry",
                # the same token again is a duplicate: the action as recorded (and its release) stays
                ConditionExpression="attribute_not_exists(#actions.#tok)",
                ExpressionAttributeNames={"#actions": "actions", "#tok": token},
                ExpressionAttributeValues={":entry": entry},
            )
        except ClientError as exc:
            if not _conditional_failed(exc):
                raise
        hold = self.launch_hold(instance_id)
        assert hold is not None  # just written
        return hold

    def claim_launch_release(self, instance_id: str, token: str) -> bool:
        now = int(time.time())
        return self._hold_write(
            instance_id,
            token,
            COMPLETING,
            # not released, or claimed by a run that never answered
            "(attribute_not_exists(#a.#tok.#released) OR (#a.#tok.#outcome = :completing AND #a.#tok.#claimed < :stale))",
            {":stale": now - HOLD_CLAIM_STALE, ":claimed": now},
            ", #a.#tok.#claimed = :claimed",
        )

    def settle_launch_release(self, instance_id: str, token: str, outcome: str) -> bool:
        return self._hold_write(instance_id, token, outcome, "#a.#tok.#outcome = :completing")

    def _hold_write(
        self,
        instance_id: str,
        token: str,
        outcome: str,
        condition: str,
        values: dict[str, Any] | None = None,
        more: str = "",
    ) -> bool:
        """Set ``released_at`` (now) and ``outcome`` on the hold's action ``token`` if it is there
        and ``condition`` holds."""
        try:
            self.state.update_item(
                Key={"pk": f"launch#{instance_id}", "sk": "hold"},
                UpdateExpression="SET #a.#tok.#released = :released, #a.#tok.#outcome = :outcome" + more,
                ConditionExpression=f"attribute_exists(#a.#tok) AND {condition}",
                ExpressionAttributeNames={
                    "#a": "actions",
                    "#tok": token,
                    "#released": "released_at",
                    "#outcome": "outcome",
                    **({"#claimed": "claimed_at"} if "#claimed" in condition else {}),
                },
                ExpressionAttributeValues={
                    ":released": json.dumps(time.time()),
                    ":outcome": json.dumps(outcome),
                    ":completing": json.dumps(COMPLETING),
                    **(values or {}),
                },
            )
        except ClientError as exc:
            if not _conditional_failed(exc):
                raise
            return False
        return True

    # --- address claims (observe_addressed): ``addrowner#<ip>``/``owner``, the workload holding it ---

    CLAIM_ATTEMPTS = 10

    def unclaimed(self, recs: list[InventoryRecord]) -> set[str]:
        claims = self._claims(sorted({ip for rec in recs for ip in _addresses(rec)}))
        return {rec.id for rec in recs if any(claims.get(ip) != rec.id for ip in _addresses(rec))}

    def observe_addressed(
        self,
        recs: list[InventoryRecord],
        *,
        anew: dict[str, InventoryRecord] | None = None,
        as_read: dict[str, InventoryRecord] | None = None,
    ) -> set[str]:
        """Each active record is written in one transaction with a claim item per address, each
        put conditional on the claim as read (absent, or the owner read), so of two writers racing
        for an address one transaction is cancelled: a global lock would serialise every
        registration, and a lock item that a crashed writer left would stop them all. A claim read
        as another workload's is taken only when that workload no longer holds the address (its
        inventory item, checked in the same transaction to be the one read: a claim its release
        left behind, or one written before a rollback), or when it is one of ``recs`` giving the
        address up (then written in the same transaction, so the move is atomic). Released claims
        (addresses a record gives up, a tombstone's) are deleted afterwards, conditional on the
        owner and on the record still being the one written; one left behind is taken over as
        above. Records whose claims nothing moves between them are written one transaction each.
        A record of ``anew`` is written on the condition that the item is still the tombstone read
        and clears its ``op_mode`` and ``op_quarantined``; its quarantine item is deleted in the
        same transaction (conditional on its absence when none was read). A record of ``as_read``
        is written on the condition that the item is still exactly the record read (its
        observation, ``governed_rev`` and state: :func:`check_registration_as_read`)."""
        if not recs:
            return set()
        anew, as_read = anew or {}, as_read or {}
        ids = [rec.id for rec in recs]
        if len(set(ids)) != len(ids):
            raise ValueError("observe_addressed: a workload given twice")
        wanted: dict[str, str] = {}
        taken: dict[str, str] = {}
        for rec in recs:
            for ip in _addresses(rec):
                first = wanted.setdefault(ip, rec.id)
                if first != rec.id:
                    taken.setdefault(ip, first)
        if taken:
            raise AddressTaken(taken)
        stored = self.get_many(ids)
        for wid, read in anew.items():  # as this writer reads it too, before anything is written
            check_tombstone(stored.get(wid), read)
        for wid, read in as_read.items():
            check_registration_as_read(wid, stored.get(wid), read)
        groups = _moving_together(recs, stored)
        # every claim read and judged before anything is written: a file refused for an address
        # held is refused whole (a race with a writer after this read can still refuse a later group)
        claims = self._claims(sorted(wanted))
        holders = self._holders(recs, claims)
        taken = _taken(recs, claims, holders)
        if taken:
            raise AddressTaken(taken)
        # every group sized before anything is written: a file with one group too large for a
        # transaction is refused whole, not after the groups before it were written
        over = [
            (sorted(rec.id for rec in group), n)
            for group in groups
            if (n := _transaction_items(group, claims) + sum(rec.id in anew for rec in group)) > TRANSACT_ITEMS
        ]
        if over:
            raise TooManyTogether(over, TRANSACT_ITEMS)
        changed: set[str] = set()
        written: list[str] = []
        for group in groups:
            try:
                changed |= self._observe_group(group, stored, claims, holders, anew, as_read)
            except Exception as exc:
                if written:  # a race after the checks above: say what stands
                    raise PartlyWritten(written, changed, exc) from exc
                raise
            written += [rec.id for rec in group]
        return changed

    def _observe_group(
        self,
        group: list[InventoryRecord],
        stored: dict[str, InventoryRecord],
        claims: dict[str, str],
        holders: dict[str, dict[str, Any] | None],
        anew: dict[str, InventoryRecord],
        as_read: dict[str, InventoryRecord],
    ) -> set[str]:
        ids = {rec.id for rec in group}
        for attempt in range(self.CLAIM_ATTEMPTS):
            if attempt:  # another writer moved a claim or a record we read: read and judge again
                stored = {**stored, **self.get_many(sorted(ids))}
                claims = self._claims(sorted({ip for rec in group for ip in _addresses(rec)}))
                holders = self._holders(group, claims)
                taken = _taken(group, claims, holders)
                if taken:
                    raise AddressTaken(taken)
            items: list[dict[str, Any]] = []
            written: list[InventoryRecord] = []
            clears: list[dict[str, Any]] = []
            for rec in group:
                if rec.id in as_read:  # read again on a retry: still the record read?
                    check_registration_as_read(rec.id, stored.get(rec.id), as_read[rec.id])
                update = self._observation(rec, stored.get(rec.id))
                if update is None:
                    if rec.id in anew:  # not the tombstone read: its clear must not land either
                        check_tombstone(stored.get(rec.id), anew[rec.id])
                    # a newer observation is stored: refused, never dropped while its caller
                    # answers it as made
                    raise GovernanceMoved(f"{rec.id}: a newer registration was stored meanwhile")
                rec, kwargs = update
                if rec.id in anew:
                    kwargs, clear = _anew(kwargs, anew[rec.id], self.state.name)
                    clears.append(clear)
                if rec.id in as_read:
                    kwargs = self._over_as_read(kwargs, as_read[rec.id])
                written.append(rec)
                items.append({"Update": {"TableName": self.inventory.name, **kwargs}})
            items += clears
            checked: set[str] = set()
            for rec in group:
                for ip in _addresses(rec):
                    owner = claims.get(ip)
                    put: dict[str, Any] = {
                        "TableName": self.state.name,
                        "Item": {"pk": CLAIM + ip, "sk": "owner", "owner": rec.id},
                    }
                    if owner is None:
                        put["ConditionExpression"] = "attribute_not_exists(pk)"
                    else:
                        put["ConditionExpression"] = "#o = :o"
                        put["ExpressionAttributeNames"] = {"#o": "owner"}
                        put["ExpressionAttributeValues"] = {":o": owner}
                    items.append({"Put": put})
                    if owner is not None and owner not in ids and owner != rec.id and owner not in checked:
                        # a claim left behind: its owner's record must still be the one read (not
                        # holding the address) when the claim moves
                        checked.add(owner)
                        items.append({"ConditionCheck": self._unchanged(owner, holders.get(owner))})
            if len(items) > TRANSACT_ITEMS:  # claims read again since the sizing left behind by others
                raise TooManyTogether([(sorted(ids), len(items))], TRANSACT_ITEMS)
            try:
                self.inventory.meta.client.transact_write_items(TransactItems=items)
            except ClientError as exc:
                if exc.response.get("Error", {}).get("Code") != "TransactionCanceledException":
                    raise
                reasons = [r.get("Code", "None") for r in exc.response.get("CancellationReasons", [])]
                if not set(reasons) <= {"None", "ConditionalCheckFailed", "TransactionConflict"}:
                    raise
                cleared = reasons[len(written) : len(written) + len(clears)]
                for rec, reason in zip(written, reasons, strict=False):
                    if reason == "ConditionalCheckFailed" and rec.id in as_read:  # not the record read?
                        check_registration_as_read(rec.id, self.get(rec.id), as_read[rec.id])
                    if reason == "ConditionalCheckFailed" and rec.id in anew:  # not the tombstone read
                        check_tombstone(self.get(rec.id), anew[rec.id])
                        raise GovernanceMoved(f"{rec.id}: the record changed while this record was decided") from None
                    if reason == "ConditionalCheckFailed":  # the record's own conditions: as observe
                        now = self.get(rec.id)
                        if now is not None and other_account(now, rec):
                            raise OtherAccount(rec, now.workload.account) from None
                        raise GovernanceMoved(f"{rec.id}: the record changed while this record was decided") from None
                if "ConditionalCheckFailed" in cleared:  # a quarantine put on the tombstone meanwhile
                    raise GovernanceMoved(f"{', '.join(sorted(anew.keys() & ids))}: quarantined meanwhile") from None
                time.sleep(random.uniform(0, min(0.2, 0.005 * 2**attempt)))  # noqa: S311 (jitter, not a secret)
                continue
            self._release(written, stored)
            return {
                rec.id for rec in written if (old := stored.get(rec.id)) is None or old.cloud_view() != rec.cloud_view()
            }
        raise ConflictError(
            f"{', '.join(sorted(ids))}: address claims stayed contended for {self.CLAIM_ATTEMPTS} attempts"
        )

    def _over_as_read(self, kwargs: dict[str, Any], read: InventoryRecord) -> dict[str, Any]:
        """A record's conditional update (:meth:`_observation`) made only over exactly ``read``
        (:func:`check_registration_as_read`): its ``governed_rev``, state and observation
        (:meth:`_as_read_condition`)."""
        condition, names, values = self._as_read_condition(read)
        return {
            **kwargs,
            "ConditionExpression": f"({kwargs['ConditionExpression']}) AND {condition}",
            "ExpressionAttributeNames": {**kwargs["ExpressionAttributeNames"], **names},
            "ExpressionAttributeValues": {**kwargs["ExpressionAttributeValues"], **values},
        }

    def _claims(self, addresses: list[str]) -> dict[str, str]:
        """Address → the workload its claim names (absent: no claim)."""
        got = self._batch_get([(CLAIM + ip, "owner") for ip in addresses]) if addresses else []
        return {str(i["pk"]).removeprefix(CLAIM): str(i["owner"]) for i in got}

    def _holders(self, recs: list[InventoryRecord], claims: dict[str, str]) -> dict[str, dict[str, Any] | None]:
        """The inventory items (None: none) of the workloads outside ``recs`` that claims of their
        addresses name: whether each still holds the address decides whether its claim stands."""
        ids = {rec.id for rec in recs}
        owners = sorted({claims[ip] for rec in recs for ip in _addresses(rec) if ip in claims} - ids)
        out: dict[str, dict[str, Any] | None] = dict.fromkeys(owners)
        for i in range(0, len(owners), 100):
            request: dict[str, Any] = {
                self.inventory.name: {"Keys": [{"id": x} for x in owners[i : i + 100]], "ConsistentRead": True}
            }
            while request:
                resp = self.ddb.batch_get_item(RequestItems=request)
                for item in resp.get("Responses", {}).get(self.inventory.name, []):
                    out[str(item["id"])] = item if _observed(item) else None
                request = resp.get("UnprocessedKeys") or {}
        return out

    def _unchanged(self, wid: str, item: dict[str, Any] | None) -> dict[str, Any]:
        """A transaction's check that ``wid``'s inventory item is still ``item`` as read (its
        workload and state; None: no record)."""
        check: dict[str, Any] = {"TableName": self.inventory.name, "Key": {"id": wid}}
        if item is None:
            check["ConditionExpression"] = "attribute_not_exists(workload)"
        else:
            check["ConditionExpression"] = "workload = :w AND #st = :s"
            check["ExpressionAttributeNames"] = {"#st": "state"}
            check["ExpressionAttributeValues"] = {":w": item["workload"], ":s": item.get("state", "running")}
        return check

    def _release(self, written: list[InventoryRecord], stored: dict[str, InventoryRecord]) -> None:
        """Delete the claims of addresses each written record gave up, while it still owns them
        and its record is still the one written (a later write of it may have claimed them again).
        Best effort: a claim left behind is taken over by the next writer of its address."""
        client = self.inventory.meta.client
        for rec in written:
            old = stored.get(rec.id)
            gone = sorted(set(old.workload.ips if old is not None else []) - set(_addresses(rec)))
            if not gone:
                continue
            mine = {
                ":me": rec.id,
                ":w": rec.workload.model_dump_json(exclude={"mode", "quarantined"}),
                ":s": rec.state,
            }
            items: list[dict[str, Any]] = [
                {
                    "ConditionCheck": {
                        "TableName": self.inventory.name,
                        "Key": {"id": rec.id},
                        "ConditionExpression": "workload = :w AND #st = :s",
                        "ExpressionAttributeNames": {"#st": "state"},
                        "ExpressionAttributeValues": {":w": mine[":w"], ":s": mine[":s"]},
                    }
                }
            ]
            for ip in gone[:99]:
                items.append(
                    {
                        "Delete": {
                            "TableName": self.state.name,
                            "Key": {"pk": CLAIM + ip, "sk": "owner"},
                            "ConditionExpression": "#o = :me",
                            "ExpressionAttributeNames": {"#o": "owner"},
                            "ExpressionAttributeValues": {":me": rec.id},
                        }
                    }
                )
            # the records are written: a release that fails (cancelled, throttled) must not fail
            # the write that succeeded; the claims it leaves behind are taken over
            with contextlib.suppress(ClientError):
                client.transact_write_items(TransactItems=items)

    # --- audit ----------------------------------------------------------------------------------

    AUDIT_ATTEMPTS = 200

    def _chain_writer(self) -> _ChainWriter:
        if not self.one_audit_writer:
            return _ChainWriter()
        key = (str(self.audit_table.meta.client.meta.endpoint_url), self.audit_table.name)
        with _CHAIN_WRITERS_LOCK:
            return _CHAIN_WRITERS.setdefault(key, _ChainWriter())

    def audit(self, rec: AuditRecord) -> AuditRecord:
        return self._chain_writer().group.commit((self, rec, None))

    def audit_with(self, rec: AuditRecord, change: AuditedChange) -> AuditRecord:
        # the change's items go in the record's transaction (through the same group commit, so
        # that this process's writes still queue rather than race for the head): both or neither
        if isinstance(change, OperatorChange):
            mode = change.mode if change.set_mode else _UNSET
            part = self._operator_part(change.workload_id, mode, change.quarantined, change.as_read)
        elif isinstance(change, PolicyActivation):
            part = self._activation_part(change.pv, change.expected_active)
        elif isinstance(change, TokenRevocation):
            part = self._revocation_part(change.workload_id, change.token_hash)
        elif isinstance(change, OldHostRetirement):
            *before, part = self._old_host_parts(change)
            try:
                for first in before:  # pairing keys beyond what the record's transaction takes
                    self._transact_part(first)
            except Exception as exc:
                raise ChangeFailed(exc) from exc  # no record: its revocation not made
        else:
            raise TypeError(f"no audited change {change!r}")
        return self._chain_writer().group.commit((self, rec, part))

    def _append_many(
        self, recs: list[tuple[AuditRecord, _Part | None]], writer: _ChainWriter
    ) -> list[AuditRecord | BaseException]:
        """Append ``recs`` in order, as many per transaction as its 100 items take (each record is
        its change's items, its chain item and its id item, conditional on neither existing; the
        head moves once, conditional on the head the first one follows; no two records touching
        one item in a transaction). A record whose id exists (unless read back as this very
        transaction, committed and retried), or whose change's own condition fails, is refused
        alone (the log is append-only; the change: :class:`ChangeFailed`) with nothing of it
        written; the others are sealed again and retried."""
        out: list[AuditRecord | BaseException | None] = [None] * len(recs)
        try:
            self._append_into(recs, writer, out)
        except Exception as exc:  # the records not yet written get it; those written keep theirs
            writer.head = None
            return [r if r is not None else exc for r in out]
        done = [r for r in out if r is not None]
        assert len(done) == len(recs), "every record written, refused or given up on"
        return done

    def _append_into(
        self,
        recs: list[tuple[AuditRecord, _Part | None]],
        writer: _ChainWriter,
        out: list[AuditRecord | BaseException | None],
    ) -> None:
        # the resource's client: it takes and returns plain Python values (boto3's serializer)
        client = self.audit_table.meta.client
        table = self.audit_table.name
        pending = list(range(len(recs)))
        losses = 0
        limit = AUDIT_RECORDS_PER_TRANSACTION  # halved by a transaction DynamoDB refused as invalid
        new = {"ConditionExpression": "attribute_not_exists(pk)"}
        while pending:
            if losses >= self.AUDIT_ATTEMPTS:
                for i in pending:
                    out[i] = ConflictError(
                        f"audit record {recs[i][0].id}: the chain stayed contended for {self.AUDIT_ATTEMPTS} attempts"
                    )
                break
            head = writer.head or self.audit_head() or AuditHead()
            chunk: list[int] = []
            size = 1  # the head
            # the items the chunk writes: DynamoDB refuses a whole transaction with two operations
            # on one item (ValidationException), so a record touching one already in the chunk (a
            # mode and a quarantine of one workload, two activations, a repeated id) ends it and
            # goes in the next transaction, sealed on the head this one leaves
            touched: set[tuple[str, str]] = set()
            for i in pending:
                rec, part = recs[i]
                n = 2 + (len(part.items) if part else 0)
                mine = self._touches(rec, part)
                if chunk and (size + n > TRANSACT_ITEMS or len(chunk) >= limit or not touched.isdisjoint(mine)):
                    break
                chunk.append(i)
                size += n
                touched |= mine
            sealed: list[AuditRecord] = []
            items: list[dict[str, Any]] = []
            # per item: the record it belongs to, and whether it is its change's (else the chain's)
            owners: list[tuple[int, bool]] = []
            claims: list[int] = []  # the positions of the id claims
            after = head
            for i in chunk:
                rec, part = recs[i]
                rec = seal(rec, after)
                sealed.append(rec)
                after = AuditHead(seq=rec.seq, hash=rec.hash)
                for it in part.items if part else []:
                    items.append(it)
                    owners.append((i, True))
                items.append({"Put": {"TableName": table, "Item": _chain_item(rec), **new}})
                items.append(
                    {"Put": {"TableName": table, "Item": {"pk": f"id#{rec.id}", "sk": "id", "seq": rec.seq}, **new}}
                )
                claims.append(len(items) - 1)
                owners += [(i, False), (i, False)]
            if head.seq:
                head_cond: dict[str, Any] = {
                    "ConditionExpression": "#s = :s AND #h = :h",
                    "ExpressionAttributeNames": {"#s": "seq", "#h": "hash"},
                    "ExpressionAttributeValues": {":s": head.seq, ":h": head.hash},
                }
            else:
                head_cond = new
            head_item = {"pk": "head", "sk": "head", "seq": after.seq, "hash": after.hash}
            items.append({"Put": {"TableName": table, "Item": head_item, **head_cond}})
            try:
                # one token per sealed chunk: DynamoDB answers a retry of it (botocore's, after an
                # answer lost once it committed) within 10 minutes as the success it was, instead
                # of cancelling it on the items it wrote (moto ignores the token: the read-back
                # below is what tells the two apart there, and after those 10 minutes)
                client.transact_write_items(TransactItems=items, ClientRequestToken=uuid.uuid4().hex)
            except ClientError as exc:
                writer.head = None  # another process appended (or the call failed): read it again
                code = exc.response.get("Error", {}).get("Code")
                if code == "ValidationException" and len(chunk) > 1:
                    # refused whole, before anything was written, for what some record brings (two
                    # operations on one item the keys above missed, a size): smaller chunks, until
                    # the one record refused so is refused alone
                    limit = max(1, len(chunk) // 2)
                    continue
                if code != "TransactionCanceledException":
                    self._unanswered(recs, chunk, sealed, exc, out)
                    pending = pending[len(chunk) :]
                    continue
                reasons = _reasons(exc)
                if not set(reasons) <= {"None", "ConditionalCheckFailed", "TransactionConflict"}:
                    raise
                if any(reasons[k : k + 1] == ["ConditionalCheckFailed"] for k in claims):
                    # an id claim exists: a record submitted twice, or this very transaction
                    # committed and its answer was lost (a 500, a dropped connection), so that
                    # botocore's retry found its own items. The first record's claim and chain
                    # item say which; all or nothing, the chunk's records are written or none is
                    landed = self._landed(sealed[0])
                    if landed is not False:
                        self._settle(recs, chunk, sealed, exc, out, landed)
                        pending = pending[len(chunk) :]
                        continue
                refused = self._refused(recs, chunk, owners, reasons)
                for i, err in refused.items():
                    out[i] = err
                if refused:
                    pending = [i for i in pending if i not in refused]
                    continue
                # another writer appended this seq first (or the transactions collided): read the
                # new head and try again, after a random pause that grows with each loss (capped
                # exponential backoff with full jitter), so that racing writers spread out
                time.sleep(random.uniform(0, min(0.25, 0.005 * 2**losses)))  # noqa: S311 (jitter, not a secret)
                losses += 1
                continue
            except Exception as exc:  # no answer at all (a timeout, a dropped connection)
                writer.head = None
                self._unanswered(recs, chunk, sealed, exc, out)
                pending = pending[len(chunk) :]
                continue
            writer.head = after
            for i, rec in zip(chunk, sealed, strict=True):
                out[i] = rec
            pending = pending[len(chunk) :]

    def _touches(self, rec: AuditRecord, part: _Part | None) -> set[tuple[str, str]]:
        """The (table, key) of each item a record's transaction items write or check but the
        chain's (new seqs, one head): its change's, and its id claim."""
        out = {(self.audit_table.name, json.dumps({"pk": f"id#{rec.id}", "sk": "id"}))}
        for op in part.items if part else []:
            (body,) = op.values()
            names = ("id",) if body["TableName"] == self.inventory.name else ("pk", "sk")
            key = body.get("Key") or {k: body["Item"][k] for k in names}
            out.add((str(body["TableName"]), json.dumps(key, sort_keys=True, default=str)))
        return out

    @staticmethod
    def _refused(
        recs: list[tuple[AuditRecord, _Part | None]],
        chunk: list[int],
        owners: list[tuple[int, bool]],
        reasons: list[str],
    ) -> dict[int, Exception]:
        """The records of a cancelled transaction refused by their own items (read by position):
        a change whose condition failed (:class:`ChangeFailed`), an id that exists. Nothing of
        theirs was written; a failed head condition or a collision refuses none (retried)."""
        refused: dict[int, Exception] = {}
        for i in chunk:
            rec, part = recs[i]
            at = [k for k, (j, _) in enumerate(owners) if j == i]
            mine = [reasons[k] if k < len(reasons) else "None" for k in at]
            n = len(part.items) if part else 0
            if part is not None and "ConditionalCheckFailed" in mine[:n]:
                refused[i] = ChangeFailed(
                    part.refused(mine[:n]) or ConflictError(f"the change of {rec.id} was refused")
                )
            elif mine[n + 1 : n + 2] == ["ConditionalCheckFailed"]:
                refused[i] = AuditRecordExists(f"audit record {rec.id} exists: the audit log is append-only")
        return refused

    def _unanswered(
        self,
        recs: list[tuple[AuditRecord, _Part | None]],
        chunk: list[int],
        sealed: list[AuditRecord],
        exc: Exception,
        out: list[AuditRecord | BaseException | None],
    ) -> None:
        """A transaction whose call failed without a cancellation (throttled after the client's
        retries, a timeout): it may have committed all the same. The first record's id claim, read
        consistently, says which (the transaction is all or nothing): written, each caller gets
        its record; not written, the error (a record with a change: :class:`ChangeFailed`, as
        nothing of it was written); unreadable too, :class:`Unconfirmed` for a record with a
        change (an administrator's action must not take it for undone), the error for the rest."""
        self._settle(recs, chunk, sealed, exc, out, self._landed(sealed[0]))

    def _landed(self, rec: AuditRecord) -> bool | None:
        """Whether ``rec``, as sealed, is in the chain (consistent reads): its id claim holds its
        seq and the chain item at that seq carries its hash. None: unreadable."""
        try:
            claim = self.audit_table.get_item(Key={"pk": f"id#{rec.id}", "sk": "id"}, ConsistentRead=True).get("Item")
            if claim is None or int(claim["seq"]) != rec.seq:
                return False
            item = self.audit_table.get_item(Key={"pk": "chain", "sk": f"{rec.seq:012d}"}, ConsistentRead=True).get(
                "Item"
            )
        except Exception:
            return None
        return item is not None and AuditRecord.model_validate_json(item["doc"]).hash == rec.hash

    @staticmethod
    def _settle(
        recs: list[tuple[AuditRecord, _Part | None]],
        chunk: list[int],
        sealed: list[AuditRecord],
        exc: Exception,
        out: list[AuditRecord | BaseException | None],
        landed: bool | None,
    ) -> None:
        """The outcome of a chunk whose call failed, as read back (:meth:`_unanswered`)."""
        for i, rec in zip(chunk, sealed, strict=True):
            part = recs[i][1]
            if landed:
                out[i] = rec
            elif part is None:
                out[i] = exc
            else:
                out[i] = ChangeFailed(exc) if landed is False else Unconfirmed(exc)

    def audit_record(self, record_id: str) -> AuditRecord | None:
        # the id claim names the record's seq, the chain item at that seq holds it
        claim = self.audit_table.get_item(Key={"pk": f"id#{record_id}", "sk": "id"}, ConsistentRead=True).get("Item")
        if claim is None:
            return None
        key = {"pk": "chain", "sk": f"{int(claim['seq']):012d}"}
        item = self.audit_table.get_item(Key=key, ConsistentRead=True).get("Item")
        return AuditRecord.model_validate_json(item["doc"]) if item else None

    def audit_head(self) -> AuditHead | None:
        item = self.audit_table.get_item(Key={"pk": "head", "sk": "head"}, ConsistentRead=True).get("Item")
        return AuditHead(seq=int(item["seq"]), hash=str(item["hash"])) if item else None

    # --- flows (ringfence.flows): rows per day ``flows#<day>``/key, owners ``addr#<ip>``/since ----

    def add_flows(self, rows: list[FlowRow], ttl: int) -> None:
        """Fold each row into its stored row: counts with ADD (concurrent writers add up), then
        first/last seen moved only outward by conditional updates. The ends that reported
        (``reported_by``) are a string set ADDed with the counts; the reporting workloads
        (``reporters``) one more conditional ADD, only when the row names one not yet and fewer
        than ``MAX_REPORTERS`` (an item of a whole label group's rows stays small)."""
        expires = int(time.time()) + ttl
        for row in rows:
            key = {"pk": f"flows#{row.day}", "sk": row.key}
            doc = row.model_dump_json(
                exclude={"flows", "packets", "bytes", "first_seen", "last_seen", "origins", "reported_by", "reporters"}
            )
            values: dict[str, Any] = {
                ":n": row.flows,
                ":p": row.packets,
                ":b": row.bytes,
                ":o": set(row.origins) or {"agent"},
                ":d": doc,
                ":f": Decimal(str(row.first_seen)),
                ":l": Decimal(str(row.last_seen)),
                ":t": expires,
            }
            adds = "ADD flows :n, packets :p, bytes :b, origins :o"
            if row.reported_by:  # (a set ADDed must not be empty)
                adds += ", reported_by :r"
                values[":r"] = set(row.reported_by)
            new = self.state.update_item(
                Key=key,
                UpdateExpression=adds
                + " SET doc = if_not_exists(doc, :d), first_seen = if_not_exists(first_seen, :f), "
                "last_seen = if_not_exists(last_seen, :l), #ttl = :t",
                ExpressionAttributeNames={"#ttl": "ttl"},
                ExpressionAttributeValues=values,
                ReturnValues="ALL_NEW",
            )["Attributes"]
            named = set(new.get("reporters", set()))
            more = sorted(set(row.reporters) - named)[: max(0, MAX_REPORTERS - len(named))]
            if more:
                try:
                    self.state.update_item(
                        Key=key,
                        UpdateExpression="ADD reporters :w",
                        ConditionExpression="attribute_not_exists(reporters) OR size(reporters) < :k",
                        ExpressionAttributeValues={":w": set(more), ":k": MAX_REPORTERS},
                    )
                except ClientError as exc:
                    if not _conditional_failed(exc):
                        raise
            for attr, value, cond in (("first_seen", row.first_seen, ">"), ("last_seen", row.last_seen, "<")):
                if (float(new[attr]) > value) if cond == ">" else (float(new[attr]) < value):
                    try:
                        self.state.update_item(
                            Key=key,
                            UpdateExpression=f"SET {attr} = :v",
                            ConditionExpression=f"{attr} {cond} :v",
                            ExpressionAttributeValues={":v": Decimal(str(value))},
                        )
                    except ClientError as exc:
                        if not _conditional_failed(exc):
                            raise

    def admit_flow_keys(
        self, reporter: str, period: str, keys: list[str], most: int, ttl: int
    ) -> tuple[set[str], bool]:
        """One item per reporter and period, ``flows#quota#<reporter>``/``<period>`` (under the
        flows function's ``flows#*`` leading keys): the set of keys written, a write counter for
        optimistic concurrency (two invocations never grant past ``most`` together), ``capped``
        once refused, and the TTL."""
        want = list(dict.fromkeys(keys))
        key = {"pk": f"flows#quota#{reporter}", "sk": period}
        for _ in range(20):
            item = self.state.get_item(Key=key, ConsistentRead=True).get("Item")
            have = set(item.get("keys", set())) if item else set()
            new = [k for k in want if k not in have]
            grant = new[: max(0, most - len(have))]
            first = len(grant) < len(new) and not (item and item.get("capped"))
            if not grant and not first:
                return {k for k in want if k in have}, False
            n = int(item["n"]) if item else 0
            names = {"#ttl": "ttl"}
            values: dict[str, Any] = {":n1": n + 1, ":t": int(time.time()) + ttl}
            expr = "SET n = :n1, #ttl = :t"
            if item:
                values[":n"] = n
            if first:
                expr += ", capped = :c"
                values[":c"] = True
            if grant:
                expr += " ADD #k :g"
                names["#k"] = "keys"
                values[":g"] = set(grant)
            try:
                self.state.update_item(
                    Key=key,
                    UpdateExpression=expr,
                    ConditionExpression="n = :n" if item else "attribute_not_exists(pk)",
                    ExpressionAttributeNames=names,
                    ExpressionAttributeValues=values,
                )
            except ClientError as exc:
                if not _conditional_failed(exc):
                    raise
                continue  # another invocation wrote first: read again
            return {k for k in want if k in have} | set(grant), first
        raise RuntimeError(f"flow row quota of {reporter}: too many concurrent writers")

    def flow_rows(self, days: int = DEFAULT_RETENTION_DAYS + 1) -> list[FlowRow]:
        """Every unexpired row of the last ``days`` days, per day."""
        out = []
        now = time.time()
        for i in range(days):
            pk = f"flows#{day_of(now - i * 86400)}"
            kwargs: dict[str, Any] = {"KeyConditionExpression": Key("pk").eq(pk), "ConsistentRead": True}
            while True:
                page = self.state.query(**kwargs)
                for item in page.get("Items", []):
                    if int(item.get("ttl", now + 1)) < now:
                        continue
                    out.append(
                        FlowRow.model_validate(
                            {
                                **json.loads(item["doc"]),
                                "flows": int(item["flows"]),
                                "packets": int(item["packets"]),
                                "bytes": int(item["bytes"]),
                                "first_seen": float(item["first_seen"]),
                                "last_seen": float(item["last_seen"]),
                                "origins": sorted(item.get("origins", [])),
                                "reported_by": sorted(item.get("reported_by", [])),
                                "reporters": sorted(item.get("reporters", []))[:MAX_REPORTERS],
                            }
                        )
                    )
                if "LastEvaluatedKey" not in page:
                    break
                kwargs["ExclusiveStartKey"] = page["LastEvaluatedKey"]
        return sorted(out, key=lambda r: (r.day, r.key))

    def note_addresses(self, owners: list[AddressOwner]) -> None:
        with self.state.batch_writer() as batch:
            for o in owners:
                batch.put_item(Item={"pk": f"addr#{o.address}", "sk": f"{o.since:020.6f}", "doc": o.model_dump_json()})

    # one partition for every workload's report: a heartbeat a minute per agent stays far below a
    # partition's 1,000 writes/s up to tens of thousands of agents, and findings read it in one query
    def put_enforcement(self, rep: EnforcementReport) -> None:
        self._put("enforcement", rep.workload_id, doc=rep.model_dump_json())

    def enforcement(self, workload_id: str) -> EnforcementReport | None:
        item = self._get("enforcement", workload_id)
        return EnforcementReport.model_validate_json(item["doc"]) if item else None

    def enforcement_reports(self) -> list[EnforcementReport]:
        items: list[dict[str, Any]] = []
        kwargs: dict[str, Any] = {"KeyConditionExpression": Key("pk").eq("enforcement"), "ConsistentRead": True}
        while True:
            page = self.state.query(**kwargs)
            items.extend(page.get("Items", []))
            if "LastEvaluatedKey" not in page:
                break
            kwargs["ExclusiveStartKey"] = page["LastEvaluatedKey"]
        return [EnforcementReport.model_validate_json(i["doc"]) for i in items]

    def address_history(self, addresses: list[str]) -> dict[str, list[AddressOwner]]:
        out: dict[str, list[AddressOwner]] = {}
        for a in addresses:
            items = self.state.query(KeyConditionExpression=Key("pk").eq(f"addr#{a}"), ConsistentRead=True)["Items"]
            if items:
                out[a] = [AddressOwner.model_validate_json(i["doc"]) for i in items]
        return out

    def audit_pages(self, after: int, upto: int) -> Iterator[list[AuditRecord]]:
        """The chain's records ``after`` < seq <= ``upto``, in key order, one ``Query`` page (at
        most 1 MB read) at a time, each read only when the one before is consumed: what the
        anchor function checks a head against, in memory that does not grow with the chain."""
        key = Key("pk").eq("chain") & Key("sk").between(f"{after + 1:012d}", f"{upto:012d}")
        kwargs: dict[str, Any] = {"KeyConditionExpression": key, "ConsistentRead": True}
        if self.AUDIT_PAGE_ITEMS is not None:
            kwargs["Limit"] = self.AUDIT_PAGE_ITEMS
        while True:
            page = self.audit_table.query(**kwargs)
            more = page.get("LastEvaluatedKey")
            records = [AuditRecord.model_validate_json(i["doc"]) for i in page.get("Items", [])]
            del page  # the raw page is not held while its records are checked
            yield records
            if more is None:
                return
            kwargs["ExclusiveStartKey"] = more

    def audit_log(self) -> list[AuditRecord]:
        items: list[dict[str, Any]] = []
        kwargs: dict[str, Any] = {"ConsistentRead": True}
        while True:
            page = self.audit_table.scan(**kwargs)
            items.extend(page.get("Items", []))
            if "LastEvaluatedKey" not in page:
                break
            kwargs["ExclusiveStartKey"] = page["LastEvaluatedKey"]
        # the chain in key order (not the documents' own seq: verify must see a reordering);
        # records from before chaining (keyed by day) first, by time
        chain = sorted((i for i in items if i["pk"] == "chain"), key=lambda i: str(i["sk"]))
        legacy = [i for i in items if i["pk"] not in ("chain", "head") and not str(i["pk"]).startswith("id#")]
        for i in legacy:
            if "doc" not in i:
                raise ValueError(
                    f"audit table {self.audit_table.name}: item {i['pk']}/{i.get('sk')} is no audit record"
                )
        older = sorted((AuditRecord.model_validate_json(i["doc"]) for i in legacy), key=lambda r: r.time)
        return older + [AuditRecord.model_validate_json(i["doc"]) for i in chain]


def _pointer_of(item: dict[str, Any] | None) -> BundlePointer | None:
    """The bundle pointer of a ``bundle#`` item, with compute's pending mark beside it; None when
    the item holds only the mark (nothing published yet)."""
    if item is None or "doc" not in item:
        return None
    ptr = BundlePointer.model_validate_json(item["doc"])
    if "pending" in item:
        ptr.pending = int(item["pending"])
        ptr.pending_at = float(item["pending_at"]) if "pending_at" in item else None
    return ptr


def _observed(item: dict[str, Any] | None) -> bool:
    """An inventory item that holds an observation. moto's UpdateItem on a new key stores the key
    before it sets the attributes, so a read racing the first observation of an instance (its
    agent enrolling while ingest stores it) can see the key alone; DynamoDB's update is atomic.
    Either way there is no record yet."""
    return item is not None and "workload" in item


CLAIM = "addrowner#"  # + an address: the state item naming the workload that holds it


def _addresses(rec: InventoryRecord) -> list[str]:
    """The addresses ``rec`` holds once written (none unless active)."""
    return list(dict.fromkeys(rec.workload.ips)) if rec.state in ACTIVE_STATES else []


TRANSACT_ITEMS = 100  # the most items one TransactWriteItems takes


def _anew(kwargs: dict[str, Any], read: InventoryRecord, state_table: str) -> tuple[dict[str, Any], dict[str, Any]]:
    """The record's update (``kwargs``) made to land only over the tombstone ``read`` and to clear
    the old host's operator mode and quarantine, and the transaction item deleting its quarantine
    item (:meth:`DynamoStore.observe_addressed`'s ``anew``)."""
    values = dict(kwargs["ExpressionAttributeValues"])
    names = dict(kwargs["ExpressionAttributeNames"])
    values[":gone"] = "terminated"
    values[":at0"] = Decimal(str(read.observed_at))
    condition = f"({kwargs['ConditionExpression']}) AND #st = :gone AND observed_at = :at0"
    if read.op_mode is None:
        condition += " AND attribute_not_exists(op_mode)"
    else:
        condition += " AND op_mode = :om0"
        values[":om0"] = read.op_mode.value
    if not read.op_quarantined:
        condition += " AND (attribute_not_exists(op_quarantined) OR op_quarantined = :false)"
        values[":false"] = False
    expr = str(kwargs["UpdateExpression"])
    # one REMOVE clause: added to the tombstone-free update's, if it has one
    expr = (
        expr.replace(" REMOVE ", " REMOVE op_mode, op_quarantined, ", 1)
        if " REMOVE " in expr
        else (expr + " REMOVE op_mode, op_quarantined")
    )
    update = {
        **kwargs,
        "UpdateExpression": expr,
        "ConditionExpression": condition,
        "ExpressionAttributeNames": names,
        "ExpressionAttributeValues": values,
    }
    delete: dict[str, Any] = {"TableName": state_table, "Key": {"pk": QUARANTINE, "sk": read.id}}
    # the quarantine item as read, or the write is refused: one put on the tombstone since the read
    # is not this registration's to clear, nor is one released since its to count as lowered
    delete["ConditionExpression"] = "attribute_exists(pk)" if read.op_quarantined else "attribute_not_exists(pk)"
    return update, {"Delete": delete}


def _transaction_items(group: list[InventoryRecord], claims: dict[str, str]) -> int:
    """The items :meth:`DynamoStore._observe_group` writes ``group`` with, by the claims read: a
    record each, a claim per address, a check per other workload whose claim left behind moves."""
    ids = {rec.id for rec in group}
    owners = {
        owner
        for rec in group
        for ip in _addresses(rec)
        if (owner := claims.get(ip)) is not None and owner not in ids and owner != rec.id
    }
    return len(group) + sum(len(_addresses(rec)) for rec in group) + len(owners)


def _moving_together(recs: list[InventoryRecord], stored: dict[str, InventoryRecord]) -> list[list[InventoryRecord]]:
    """``recs`` in groups that must be written in one transaction: a record taking an address
    another of them holds now (a move within a CMDB file) goes with it, transitively."""
    parent = {rec.id: rec.id for rec in recs}

    def root(x: str) -> str:
        while parent[x] != x:
            parent[x] = parent[parent[x]]
            x = parent[x]
        return x

    held = {ip: wid for wid, old in stored.items() if wid in parent for ip in _addresses(old)}
    for rec in recs:
        for ip in _addresses(rec):
            other = held.get(ip)
            if other is not None and other != rec.id:
                parent[root(rec.id)] = root(other)
    groups: dict[str, list[InventoryRecord]] = {}
    for rec in recs:
        groups.setdefault(root(rec.id), []).append(rec)
    return list(groups.values())


def _taken(
    recs: list[InventoryRecord], claims: dict[str, str], holders: dict[str, dict[str, Any] | None]
) -> dict[str, str]:
    """Address → the workload outside ``recs`` whose claim of it stands: its record (``holders``)
    is active and holds the address. A claim by one of ``recs`` moves with the write."""
    out: dict[str, str] = {}
    for rec in recs:
        for ip in _addresses(rec):
            owner = claims.get(ip)
            item = holders.get(owner) if owner is not None else None
            active = item is not None and item.get("state", "running") in ACTIVE_STATES
            if active and item is not None and ip in Workload.model_validate_json(item["workload"]).ips:
                out.setdefault(ip, str(owner))
    return out
