"""On-premise workloads: registered by an operator (one at a time or from a CMDB export) instead
of observed in a cloud, and enrolled with pairing keys bound to them.

:class:`OnPremAdmin` is the admin service plus these actions, every one audited. It runs over
any wiring (the local control plane's or AWS's): the inventory holds on-premise records next to
cloud ones, with ``cloud: onprem``; a cloud instance's record is never overwritten from here.
"""

from __future__ import annotations

import hashlib
import logging
import time
from typing import Any

from pydantic import ValidationError

from ringfence.adminapi import OnPremWorkload
from ringfence.cmdb import CmdbError, CmdbRow, parse_cmdb_rows
from ringfence.control import credentials
from ringfence.control.admin import Admin
from ringfence.control.api import Response, error
from ringfence.control.wiring import BaseWiring, Metric, no_metric, queue_stored
from ringfence.governance import govern
from ringfence.labels import LabelMapper
from ringfence.model import Workload
from ringfence.store.base import (
    AddressTaken,
    ConflictError,
    GovernanceMoved,
    InventoryRecord,
    PartlyWritten,
    TooManyTogether,
    WorkloadChanged,
    check_registration_as_read,
    holds_addresses,
)

log = logging.getLogger(__name__)

HOLD_KINDS = frozenset({"held", "ungranted"})
"""Label problems that are governance's decision (answered as ``held``), not the operator's data."""


class OnPremAdmin(Admin):
    """:class:`~ringfence.control.admin.Admin` (policy, modes, quarantine, pairing keys) plus
    registering, importing and deregistering on-premise workloads. ``max_import_rows``: the most
    workloads one CMDB import may register (None: no bound), for a host whose requests are cut
    off after a time: there an import cut off part-way would leave part of the file registered."""

    def __init__(self, w: BaseWiring, metric: Metric = no_metric, *, max_import_rows: int | None = None) -> None:
        super().__init__(w, metric)
        self.max_import_rows = max_import_rows

    def _record(
        self,
        w: Workload,
        observed_at: float,
        state: str = "running",
        stored: InventoryRecord | None = None,
        *,
        mapper: LabelMapper | None,
        may_bind: bool = False,
    ) -> InventoryRecord:
        """The inventory record of an operator-given workload, over ``stored`` (what it replaces).
        Its label tags (reserved keys, as in a cloud) are governed as a cloud's are: a privileged
        value they set (``role: jumpbox``) is an admin binding only when the caller may bind one
        (``may_bind``: ``label.bind``, a policy author), then kept as ``label_grants`` (in the
        audit detail too); otherwise the move is *held*, as one by any unapproved source — the
        workload keeps its previous labels (a new one gets none) until a policy author binds the
        value (``PUT /admin/workloads/{id}/labels``). Grants a binding made stand; a host
        registered again after a deregistration starts from none, and so does one given an address
        it did not have by a caller who may not bind (:meth:`_readdressed`): the grant was for the
        host at its addresses, and the new address would carry it (the workload keeps its other
        labels, no privileged one). The decision is made from the stored record's governance: one
        that changes meanwhile refuses the write (409). ``mapper``: the active policy's labels
        (:meth:`_governing`), None when there is none."""
        labels: dict[str, str] = {}
        problems: list[str] = []
        anew = False
        if mapper is not None and state != "terminated":  # the hygiene view, as ingest gives cloud records
            asked = {d: v for d, v in mapper.resolve_tags(w).labels.items() if mapper.is_privileged(d, v)}
            previous = stored.workload if stored is not None and stored.state != "terminated" else None
            if may_bind and previous is not None and stored is not None:
                # a value a policy author took back is not granted again by the same tags sent again
                # (a CMDB sync's): the revocation is its dimension's last write; a binding re-grants
                asked = {d: v for d, v in asked.items() if not self._revoked(stored, d, v)}
            w = w.model_copy(update={"label_grants": asked if may_bind else {}, "held_labels": None})
            if previous is not None and not may_bind and self._readdressed(mapper, previous, w):
                # as a host with its labels but no privileged value: nothing granted carries over
                kept = {d: v for d, v in mapper.resolve(previous).labels.items() if not mapper.is_privileged(d, v)}
                previous = previous.model_copy(update={"label_grants": {}, "held_labels": kept})
                anew = True
            w = govern(mapper, previous, w).workload
        if mapper is not None:  # a deregistered workload keeps what was decided (its ips gone)
            res = mapper.resolve(w)
            labels, problems = res.labels, [p.message for p in res.problems]
        w = w.model_copy(update={"observed_at": observed_at})
        return InventoryRecord(
            id=w.id,
            workload=w,
            state=state,
            observed_at=observed_at,
            labels=labels,
            problems=problems,
            governed_rev=stored.governed_rev if stored is not None else 0,
            # registered again after a deregistration: no write of the host's earlier life stands
            # (a tombstone stored before tombstones cleared them may still hold some)
            label_writes={}
            if anew or (stored is not None and stored.state == "terminated" and state != "terminated")
            else None,
        )

    @staticmethod
    def _revoked(stored: InventoryRecord, dim: str, value: str) -> bool:
        """The dimension's last known write is a revocation of ``value``: a write of it by someone
        not approved (``other``), which on premise only a revocation (``DELETE .../labels``) makes
        (registrations record no writes; a value merely held is ``unseen``, and a caller who may
        bind still grants that by registering it)."""
        last = (stored.label_writes or {}).get(dim)
        return last is not None and last.value == value and last.by == "other"

    @staticmethod
    def _readdressed(mapper: LabelMapper, previous: Workload, w: Workload) -> bool:
        """``w`` gives the workload an address ``previous`` did not have while ``previous`` holds a
        privileged value (a grant, or one in force): the value would follow the id to that address.
        Dropping an address moves nothing; the tags, labels and site are governed per value."""
        privileged = bool(previous.label_grants) or any(
            mapper.is_privileged(d, v) for d, v in mapper.resolve(previous).labels.items()
        )
        return privileged and bool(set(w.ips) - set(previous.ips))

    def _address_owners(self) -> dict[str, str]:
        """Address → the workload holding it now: an on-premise one registered, or a cloud
        instance in any state but terminated (:func:`holds_addresses`): a stopped instance keeps
        its private address, and the host registered with it would share it once it starts."""
        owners: dict[str, str] = {}
        for rec in self.w.store.all_records():
            if holds_addresses(rec.state, rec.workload.cloud):
                for ip in rec.workload.ips:
                    owners.setdefault(ip, rec.id)
        return owners

    @staticmethod
    def _problems(mapper: LabelMapper | None, rec: InventoryRecord) -> list[str]:
        """The label problems of the operator's data (a value the policy does not allow, a required
        label missing, a conflict), as its tags and labels resolve whatever is held: a hold is
        governance's, answered as ``held``."""
        if mapper is None:
            return []
        return [p.message for p in mapper.resolve_tags(rec.workload).problems if p.kind not in HOLD_KINDS]

    def _governing(self) -> LabelMapper | None:
        """The active policy's labels, read now (not the hygiene view's cache, which may still say
        "no policy" after a provision: a privileged value registered then would go ungoverned)."""
        active = self.w.governing_policy()
        return active[1].labels if active is not None else None

    @staticmethod
    def _held(mapper: LabelMapper | None, rec: InventoryRecord) -> dict[str, str]:
        """The privileged values ``rec``'s tags ask for that it is not granted: held."""
        if mapper is None or rec.workload.held_labels is None:
            return {}
        wanted = mapper.resolve_tags(rec.workload).labels
        grants = rec.workload.label_grants
        return {d: v for d, v in wanted.items() if mapper.is_privileged(d, v) and grants.get(d) != v}

    @staticmethod
    def _dropped(stored: InventoryRecord | None, rec: InventoryRecord) -> dict[str, str]:
        """Grants the stored (active) record held that ``rec`` no longer does."""
        if stored is None or stored.state == "terminated":
            return {}
        now = rec.workload.label_grants
        return {d: v for d, v in stored.workload.label_grants.items() if now.get(d) != v}

    def _cloud_owned(self, ids: list[str]) -> dict[str, str]:
        """Ids that inventory holds as cloud instances → their cloud."""
        return {
            wid: rec.workload.cloud for wid, rec in self.w.store.get_many(ids).items() if rec.workload.cloud != "onprem"
        }

    def register_workload(
        self,
        principal: str,
        body: dict[str, Any] | OnPremWorkload,
        reason: str = "",
        *,
        may_bind: bool = False,
        strict: bool = False,
    ) -> Response:
        """Create or update one on-premise workload (201 when new, 200 when updated). A privileged
        value its tags set is granted only when ``may_bind`` (the caller holds ``label.bind``),
        else held (:meth:`_record`); the answer and the audit record name what is held, and the
        label problems of its data (``problems``: registered all the same unless ``strict``, 400).
        An address another workload holds (an active one, or a cloud instance not terminated) is
        refused (409)."""
        try:
            spec = body if isinstance(body, OnPremWorkload) else OnPremWorkload.model_validate(body)
        except ValidationError as exc:
            e = exc.errors()[0]
            return error(400, "bad workload", f"{'.'.join(str(p) for p in e['loc']) or '<body>'}: {e['msg']}")
        owned = self._cloud_owned([spec.id])
        if owned:
            return error(409, "not an on-premise workload", f"{spec.id} is a {owned[spec.id]} instance in inventory")
        # read first, as a quick answer and for owners no claim names (records stored before the
        # store checked addresses in its write, cloud instances); the write checks again (a
        # registration racing this one for an address lands first or not at all)
        owners = self._address_owners()
        taken = {ip: owner for ip in spec.ips if (owner := owners.get(ip)) not in (None, spec.id)}
        if taken:
            return self._address_in_use(taken)
        stored = self.w.store.get(spec.id)
        existed = stored is not None
        mapper = self._governing()
        anew = _tombstones([stored] if stored is not None else [])
        rec = self._record(
            spec.workload(),
            _after([stored] if stored is not None else []),
            stored=stored,
            mapper=mapper,
            may_bind=may_bind,
        )
        problems = self._problems(mapper, rec)
        if strict and problems:
            return error(400, "label problems: nothing registered", "\n".join(f"{spec.id}: {p}" for p in problems))
        detail = spec.model_dump(include=set(OnPremWorkload.model_fields) - {"id"}, exclude_none=True)
        if rec.workload.label_grants:
            detail["label_grants"] = dict(rec.workload.label_grants)
        dropped = self._dropped(stored, rec)
        if dropped:
            detail["grants_dropped"] = dropped
        cleared = self._operator_left(stored)
        if cleared:
            detail["operator_cleared"] = cleared
        held = self._held(mapper, rec)
        if held:
            detail["held"] = held
        if problems:
            detail["problems"] = problems
        # the record before anything is written (as a provision's): a registration (its labels,
        # its grants) is never in force without its record; one then refused or failed gets a
        # second record, workload.register.failed
        same = stored is not None and _unchanged(stored, rec) and not self._unwritable([stored])
        if same:
            detail["unchanged"] = True
        audit_id = self._audit(principal, "workload.register", spec.id, detail, reason)
        try:
            if not same:
                self._registered_anew(anew)
                self._write([rec], anew)
        except AddressTaken as exc:
            self._failed(principal, "workload.register", spec.id, audit_id, str(exc), reason)
            return self._address_in_use(exc.taken)
        except GovernanceMoved as exc:
            self._failed(principal, "workload.register", spec.id, audit_id, str(exc), reason)
            return error(409, "workload changed meanwhile: nothing registered", str(exc))
        except TooManyTogether as exc:
            self._failed(principal, "workload.register", spec.id, audit_id, str(exc), reason)
            return error(400, "too many addresses: nothing registered", str(exc))
        except Exception as exc:

            def registered() -> bool:
                now = self.w.store.get(spec.id)
                return now is not None and now.observed_at == rec.observed_at and now.workload == rec.workload

            # in force although the write's answer was lost: answered as registered (compute
            # queued, or 503 NotQueued), never a bare 500 with nothing queued
            if not self._raised(principal, "workload.register", spec.id, audit_id, exc, reason, registered):
                raise
        self._cleared(principal, anew, [spec.id])  # written: the old host's operator state with it
        # stored: a failed compute message is answered 503 (NotQueued); the same registration
        # again is an update of the stored record (200, created false) and queues compute
        queue_stored(self.w, [spec.id], "registered", spec.id, audit_id)
        answer: dict[str, Any] = {"workload_id": spec.id, "created": not existed, "audit_id": audit_id}
        if held:
            answer["held"] = held
        if cleared:  # landed with the write (a refused one answered above)
            answer["operator_cleared"] = cleared
        if problems:
            answer["problems"] = problems
        return Response(200 if existed else 201, answer)

    @staticmethod
    def _address_in_use(taken: dict[str, str]) -> Response:
        why = "; ".join(f"{ip} is held by workload {owner}" for ip, owner in taken.items())
        return error(409, "address in use: nothing registered", f"{why} (deregister it or give it another first)")

    def import_cmdb(
        self,
        principal: str,
        text: str,
        source: str = "cmdb.csv",
        reason: str = "",
        *,
        may_bind: bool = False,
        strict: bool = False,
    ) -> Response:
        """Register every workload of a CMDB CSV export, or none: any bad row (an address given
        twice, or one another workload holds, among them; or a row naming a cloud instance)
        refuses the whole file with every problem as ``file:line:column``. Privileged values are
        granted only when ``may_bind``, else held, as for one registration. Label problems are
        answered per workload (``problems``); ``strict`` refuses the file for any (400)."""
        try:
            rows = parse_cmdb_rows(text, source, held_by=self._address_owners())
        except CmdbError as exc:
            return error(400, "CMDB file rejected: nothing imported", str(exc))
        if self.max_import_rows is not None and len(rows) > self.max_import_rows:
            return error(
                400,
                "CMDB file rejected: nothing imported",
                f"{source}: {len(rows)} workloads, more than this control plane imports in one request "
                f"({self.max_import_rows}): import the file in parts",
            )
        workloads = [r.workload for r in rows]
        owned = self._cloud_owned([w.id for w in workloads])
        if owned:
            refusals = [f"{source}: {wid} is a {cloud} instance in inventory" for wid, cloud in sorted(owned.items())]
            return error(409, "CMDB file rejected: nothing imported", "\n".join(refusals))
        stored = self.w.store.get_many([w.id for w in workloads])
        existing = set(stored)
        anew = _tombstones(list(stored.values()))
        mapper = self._governing()
        # each row after its own record (not the file's latest): a record a clock far ahead wrote
        # must not carry every other row of the file into the future with it
        recs = [
            self._record(
                w, _after([old] if (old := stored.get(w.id)) else []), stored=old, mapper=mapper, may_bind=may_bind
            )
            for w in workloads
        ]
        problems = {r.id: p for r in recs if (p := self._problems(mapper, r))}
        if strict and problems:
            where = [
                f"{source}:{row.line}:1: {row.workload.id}: {p}"
                for row in rows
                for p in problems.get(row.workload.id, [])
            ]
            return error(400, "CMDB file rejected: nothing imported", "\n".join(where))
        ids = [w.id for w in workloads]
        detail: dict[str, Any] = {
            "sha256": hashlib.sha256(text.encode()).hexdigest(),
            "created": sorted(set(ids) - existing),
            "updated": sorted(set(ids) & existing),
        }
        grants = {r.id: dict(r.workload.label_grants) for r in recs if r.workload.label_grants}
        if grants:
            detail["label_grants"] = grants
        dropped = {r.id: d for r in recs if (d := self._dropped(stored.get(r.id), r))}
        if dropped:
            detail["grants_dropped"] = dropped
        cleared = {wid: c for wid, old in sorted(stored.items()) if (c := self._operator_left(old))}
        if cleared:
            detail["operator_cleared"] = cleared
        held = {r.id: h for r in recs if (h := self._held(mapper, r))}
        if held:
            detail["held"] = held
        if problems:
            detail["problems"] = problems
        same = {r.id for r in recs if _unchanged(stored.get(r.id), r)}
        same -= self._unwritable([stored[wid] for wid in sorted(same)])
        if same:
            detail["unchanged"] = sorted(same)
        # the record before anything is written, as for one registration
        audit_id = self._audit(principal, "workload.import", source, detail, reason)
        try:
            self._registered_anew(anew)
            changed = [r for r in recs if r.id not in same]
            if changed:
                self._write(changed, anew)  # SQLite: one transaction
        except AddressTaken as exc:
            # another writer took an address since the file was checked: refused as that check
            # refuses it (file:line:column)
            self._failed(principal, "workload.import", source, audit_id, str(exc), reason)
            try:
                parse_cmdb_rows(text, source, held_by=exc.taken)
            except CmdbError as refused:
                return error(400, "CMDB file rejected: nothing imported", str(refused))
            return error(409, "address in use: nothing imported", str(exc))
        except GovernanceMoved as exc:
            self._failed(principal, "workload.import", source, audit_id, str(exc), reason)
            return error(409, "a workload changed meanwhile: import the file again", str(exc))
        except TooManyTogether as exc:
            # sized before anything was written (DynamoDB: one transaction per group of rows)
            self._failed(principal, "workload.import", source, audit_id, str(exc), reason)
            return error(400, "CMDB file rejected: nothing imported", _too_many(exc, rows, source))
        except PartlyWritten as exc:
            # a later group lost a race after earlier ones were written (DynamoDB): those stand,
            # so they go to compute (peers' sets follow), and the answer and audit say which
            why = f"written: {', '.join(exc.written)}; then {type(exc.cause).__name__}: {exc.cause}"
            self._failed(principal, "workload.import", source, audit_id, why, reason, outcome="partial")
            self._cleared(principal, anew, exc.written)
            queue_stored(self.w, exc.written, f"partly imported ({len(exc.written)} of {len(ids)})", source, audit_id)
            if not isinstance(exc.cause, ConflictError | TooManyTogether):
                raise
            return error(
                409,
                "CMDB file partly imported: import it again",
                f"{len(exc.written)} of {len(ids)} workloads were written (and handed to compute): "
                f"{_some(exc.written)}"
                + (f"; {len(same)} unchanged (nothing to write): {_some(sorted(same))}" if same else "")
                + f"; the rest were not: {exc.cause}",
            )
        except Exception as exc:
            self._failed(principal, "workload.import", source, audit_id, f"{type(exc).__name__}: {exc}", reason)
            raise
        self._cleared(principal, anew, ids)
        # as a registration's: the same file again updates every row and queues compute
        queue_stored(self.w, ids, f"imported ({len(ids)} workloads)", source, audit_id)
        answer: dict[str, Any] = {
            "imported": len(ids),
            "created": len(set(ids) - existing),
            "updated": len(set(ids) & existing),
            "audit_id": audit_id,
        }
        if held:
            answer["held"] = held
        if cleared:
            answer["operator_cleared"] = cleared
        if problems:
            answer["problems"] = problems
        return Response(200, answer)

    def _unwritable(self, unchanged: list[InventoryRecord]) -> set[str]:
        """The ids of ``unchanged`` (records as read that a registration would store unchanged)
        that must be written all the same: one with no address claim in the store
        (:meth:`~ringfence.store.base.Store.unclaimed`), and one no longer stored as read
        (deregistered, registered again or governed anew since: written as any registration is,
        so the store decides over the newer record, refusing it 409 where it must, as before
        rows were left unwritten; never answered "registered" over a deregistration)."""
        if not unchanged:
            return set()
        now = self.w.store.get_many([r.id for r in unchanged])
        moved = set()
        for read in unchanged:
            try:
                check_registration_as_read(read.id, now.get(read.id), read)
            except WorkloadChanged:
                moved.add(read.id)
        return moved | self.w.store.unclaimed([r for r in unchanged if r.id not in moved])

    def _registered_anew(self, anew: dict[str, InventoryRecord]) -> None:
        """Ids about to be registered again after a deregistration (``anew``: their tombstones as
        read) name a new host: nothing the old one (or a pairing that raced its deregistration)
        bound may carry over, else that agent would receive the new host's bundle. Called before
        the record is written, on purpose: written first, the old agent could fetch the new host's
        bundle until the drop. A write then refused (409) has lost nothing: a deregistered id's
        credentials are dropped at deregistration already, so only a racing pairing's can be left,
        and those must go whatever happens (``token.revoke`` is audited when a token was active).

        Only while the id is still the tombstone read, checked in the drop's own store transaction
        (:func:`credentials.retire_old_host`): one registered again meanwhile (by another caller)
        is a live host whose freshly enrolled agent this stale registration must not cut off; its
        write is then refused (409, :func:`~ringfence.store.base.check_tombstone`)."""
        for wid, read in sorted(anew.items()):
            credentials.retire_old_host(self.w, wid, read.observed_at, "workload registered again")

    def _write(self, recs: list[InventoryRecord], anew: dict[str, InventoryRecord]) -> None:
        """The records written, each of ``anew`` only over its tombstone as read and with the old
        host's operator mode and quarantine cleared in the same write (``observe_addressed``):
        an ``idle`` set for the old box would leave the new one unenforced."""
        if anew:
            self.w.store.observe_addressed(recs, anew=anew)
        else:
            self.w.store.observe_addressed(recs)

    def _cleared(self, principal: str, anew: dict[str, InventoryRecord], written: list[str]) -> None:
        """A quarantine cleared with a registration's write (``written``: the ids that landed)
        counts ``SafeguardsLowered``: the id leaves quarantine by an onboarding caller's
        registration, not an incident responder's release."""
        for wid in written:
            read = anew.get(wid)
            if read is not None and read.op_quarantined:
                self._lowered(principal, "quarantine of a deregistered host cleared: its id registered again", wid)

    @staticmethod
    def _operator_left(stored: InventoryRecord | None) -> dict[str, Any]:
        """What an operator set on a deregistered id's last host (its mode, its quarantine), which
        registering the id again clears with its write (:meth:`_write`). The registration's audit
        record, written before (as every one is), names it; a write then refused leaves it, and
        the ``.failed`` record says so."""
        if stored is None or stored.state != "terminated":
            return {}
        left: dict[str, Any] = {}
        if stored.op_mode is not None:
            left["mode"] = stored.op_mode.value
        if stored.op_quarantined:
            left["quarantined"] = True
        return left

    def deregister_workload(self, principal: str, workload_id: str, reason: str = "") -> Response:
        """The workload is gone (decommissioned): it leaves every peer's sets."""
        rec = self.w.store.get(workload_id)
        if rec is None:
            return error(404, "unknown workload", workload_id)
        if rec.workload.cloud != "onprem":
            return error(409, "not an on-premise workload", f"{workload_id} is a {rec.workload.cloud} instance")
        gone = rec.workload.model_copy(update={"ips": []})
        when = max(time.time(), rec.observed_at)
        tombstone = self._record(gone, when, state="terminated", mapper=self._governing())
        # the record before the workload leaves (as a registration's); one whose write then fails
        # gets a second record, workload.deregister.failed
        audit_id = self._audit(principal, "workload.deregister", workload_id, {}, reason)
        try:
            # its addresses released, and only over the registration read: one written since (the
            # id deregistered and registered again, or a new box registered in its place) is not
            # this request's to remove, nor is this tombstone dropped as older while answered 200
            self.w.store.observe_addressed([tombstone], as_read={workload_id: rec})
        except WorkloadChanged as exc:
            return self._changed(principal, "workload.deregister", workload_id, audit_id, exc, reason)
        except Exception as exc:

            def deregistered() -> bool:
                now = self.w.store.get(workload_id)
                return now is not None and now.state == "terminated"

            # in force (the write's answer lost): credentials dropped and compute queued as below
            if not self._raised(principal, "workload.deregister", workload_id, audit_id, exc, reason, deregistered):
                raise
        # everything that lets an agent act as the id goes (token, agent key, a reset's named next
        # key, connection, pairing keys), and only while the id is still the tombstone this
        # request wrote (its observation time, ``when``), checked in the drop's own store step:
        # a registration landing after the tombstone (another host under the id) and that host's
        # enrollment keep what they were issued. A write whose answer was lost but which landed
        # is the same tombstone, so its drop is made; one that did not land (another request's
        # tombstone stored instead) drops nothing here: that request's own drop does
        credentials.retire_old_host(self.w, workload_id, when, "workload deregistered")
        # the same request again writes the tombstone again (its record stays) and queues compute
        # urgent: a workload leaving (its address must leave its peers' sets before it is reused)
        queue_stored(self.w, [workload_id], "deregistered", workload_id, audit_id, urgent=True)
        return Response(200, {"workload_id": workload_id, "audit_id": audit_id})


def _some(ids: list[str], n: int = 50) -> str:
    return ", ".join(ids[:n]) + (f" (and {len(ids) - n} more)" if len(ids) > n else "")


def _tombstones(stored: list[InventoryRecord]) -> dict[str, InventoryRecord]:
    """The deregistered ids among ``stored`` (as read) → their tombstones: registered anew."""
    return {old.id: old for old in stored if old.state == "terminated"}


STEP = 0.001
"""How much later than the record it replaces a registration is observed, at least (seconds)."""
AHEAD = 300.0
"""A stored registration time more than this ahead of the clock is logged (:func:`_after`)."""


def _unchanged(stored: InventoryRecord | None, rec: InventoryRecord) -> bool:
    """``rec`` would store nothing new over the live ``stored`` (a CMDB sync of an unchanged row):
    not written, so its registration time stays and an operator's write decided from it meanwhile
    (checked against that time: :func:`~ringfence.store.base.check_as_read`) is not refused by a
    sync that changed nothing. Anything else (an address, a tag, a label, a hold, a grant, a
    deregistered id) is written as a registration."""
    if stored is None or stored.state != "running" or rec.state != "running" or rec.label_writes is not None:
        return False
    same_workload = rec.workload.model_copy(update={"observed_at": stored.workload.observed_at}) == stored.workload
    return same_workload and rec.labels == stored.labels and rec.problems == stored.problems


def _after(stored: list[InventoryRecord]) -> float:
    """A registration's time: now, and always after every record it replaces (as read), registered
    or deregistered, by at least :data:`STEP`. The store keeps the newer of two observations, so
    one no later than the stored record (written by a host whose clock was ahead) would be dropped
    while answered as made; and an operator's write decided from the registration before it
    (:func:`~ringfence.store.base.check_as_read`) tells the two apart by their time alone, so
    even an equal time would let it land on this one. A record stored meanwhile newer than this
    time refuses the write (:meth:`~ringfence.store.base.Store.observe_addressed`: 409)."""
    now = time.time()
    for old in stored:
        if old.observed_at > now + AHEAD:
            # the newer-wins store keeps it, so this registration is dated after it: say so once per
            # registration, as its time (and every later one's) is then that far ahead too
            log.warning(
                "%s: stored registration time is %.0f s ahead of this clock (a host whose clock was ahead "
                "wrote it); registered after it",
                old.id,
                old.observed_at - now,
            )
    return max([now, *(old.observed_at + STEP for old in stored)])


def _too_many(exc: TooManyTogether, rows: list[CmdbRow], source: str) -> str:
    """Each group too large for one transaction, at its first row (``file:line:column``)."""
    line = {row.workload.id: row.line for row in rows}
    out = []
    for ids, n in exc.groups:
        first = min(line.get(i, 0) for i in ids)
        what = (
            f"{ids[0]}: its record and addresses are"
            if len(ids) == 1
            else f"{len(ids)} rows passing addresses among themselves ({_some(ids, 5)}) are"
        )
        out.append(
            f"{source}:{first}:1: {what} {n} items written in one transaction, more than one DynamoDB "
            f"transaction takes ({exc.limit}): give fewer addresses at once (import the moves in steps; a "
            "deregistered id registered again takes one item more, which clears the old host's quarantine)"
        )
    return "\n".join(out)
