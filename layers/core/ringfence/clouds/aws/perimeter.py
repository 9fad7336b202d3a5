"""Perimeter service: the coarse security groups per VPC and environment, quota-checked.

Two entry points. :meth:`Perimeter.react` is the event path: ingest, lifecycle and reconcile
enqueue the workloads they saw change on the perimeter queue; their interfaces (every ENI) get their groups
and, for a launching instance, the lifecycle action is handed on to compute only then — compute
completes it after the bundle is published too, so CONTINUE means both are in place.
:meth:`Perimeter.run` is the scheduled converging reconcile, which also removes groups that lost
their purpose.

What would break a limit (an interface over the groups-per-interface quota, a group over the rules
quota, a name held by a group Ringfence did not create) is skipped, not the whole plan: that
interface is left as it is and named, the rest is applied, ``PerimeterPlanRefused`` is counted, and
that instance's launch is not handed on (its hook times out into its default result).

Each account and Region (a place) is reconciled on its own: one whose perimeter role cannot be
assumed or whose API fails is reported failed (``PerimeterPlacesFailed``) while the others are
reconciled and their launches handed on; on the event path only that place's part is retried.

A group Ringfence has no record of becomes its own in two ways only: taken back (made by a run
stopped before its record, ``PerimeterGroupsTakenBack``) or adopted (made before records, by the
full run): each is audited (``perimeter.group-taken-back``, ``perimeter.group-adopted``) before
its record is written, so none is recorded unaudited.

What a run changes in a place (groups created and deleted, rules added and removed, groups
attached and detached) is audited as one ``perimeter.apply`` record per place and run, written
before the first change: if the write fails nothing is changed and the place fails, to be tried
again. A run that changes nothing, and a dry run, write none."""

from __future__ import annotations

import logging
import time
from collections.abc import Iterable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any

from pydantic import BaseModel, ConfigDict, Field

from ringfence.audit import AuditRecord
from ringfence.control.wiring import Metric, no_metric
from ringfence.perimeter import PerimeterConfig, PlanRefused, QuotaExceeded, Scope
from ringfence.store.base import InventoryRecord

from . import clients
from .sg import GONE_STATES, Applying, GroupRecords, Owned, SecurityGroupPerimeter, log
from .wiring import Wiring

# --- perimeter --------------------------------------------------------------------------------------

Place = tuple[str, str]  # (account, region)
PRINCIPAL = "ringfence:perimeter"  # who the perimeter's audit records name
_OWNED_WHY = {
    "taken-back": "made by a perimeter run stopped before recording it (it carries that run's intent "
    "nonce, as EC2 made it): recorded as Ringfence's",
    "adopted": "made before Ringfence recorded its groups, exactly as it makes them: recorded as Ringfence's",
}
_APPLY_WHY = (
    "the perimeter's changes in this account and Region, audited before the first is made: a run that "
    "fails part-way made only some of them (the place is reported failed) and the next run audits what "
    "is left to do; a group to delete that is still attached is kept"
)


class PerimeterMessage(BaseModel):
    """One message on the perimeter queue (sent by :meth:`Wiring.enqueue_perimeter`)."""

    model_config = ConfigDict(extra="forbid")

    ids: list[str] = Field(default_factory=list, description="workloads whose interfaces to reconcile")
    lifecycles: list[dict[str, Any]] = Field(
        default_factory=list, description="launch lifecycle actions to hand on to compute (for instances in ids)"
    )
    lifecycle: dict[str, Any] | None = Field(
        None, description="one action (messages sent before lifecycles existed; still accepted)"
    )

    def actions(self) -> list[dict[str, Any]]:
        return [*([self.lifecycle] if self.lifecycle else []), *self.lifecycles]


@dataclass
class Reaction:
    """What one batch of perimeter messages did."""

    results: list[dict[str, Any]] = field(default_factory=list)
    lifecycles_forwarded: list[str] = field(default_factory=list)
    lifecycles_left_to_timeout: list[str] = field(default_factory=list)
    # messages (their index in the batch) to hand back for a retry: all they name is in a failed place
    retry: list[int] = field(default_factory=list)
    # workloads of failed places sent again on their own (the rest of their message was done)
    requeued: list[str] = field(default_factory=list)


class Perimeter:
    """Coarse security groups per VPC and env, from the inventory's labels (see ringfence.perimeter)."""

    def __init__(self, w: Wiring, config: PerimeterConfig, metric: Metric = no_metric) -> None:
        self.w = w
        self.config = config
        self.metric = metric
        self._table: Any = None

    def _records(self, account: str, region: str) -> GroupRecords:
        if self._table is None:
            self._table = clients.resource("dynamodb").Table(self.w.cfg.state_table)
        return GroupRecords(self._table, account, region)

    def _owned(self, account: str, region: str) -> Owned:
        """Audits a group becoming Ringfence's without a record of its creation (before the record
        is written: a failed audit fails the place, and the next run tries both again)."""

        def audit(how: str, gid: str, network: str, name: str) -> None:
            self.w.audit(
                AuditRecord(
                    principal=PRINCIPAL,
                    action=f"perimeter.group-{how}",
                    target=gid,
                    detail={"account": account, "region": region, "vpc": network, "name": name},
                    reason=_OWNED_WHY[how],
                )
            )

        return audit

    def _applying(self, account: str, region: str, scope: Scope) -> Applying:
        """Audits what a run is about to change in a place (one record per place and run, however
        many instances: a scale-out's batch is one record, not one per instance), before the
        first change: a failed audit fails the place with nothing changed, to be tried again."""

        def audit(changes: dict[str, Any]) -> None:
            self.w.audit(
                AuditRecord(
                    principal=PRINCIPAL,
                    action="perimeter.apply",
                    target=f"{account}/{region}",
                    detail={"account": account, "region": region, "scope": scope.value} | changes,
                    reason=_APPLY_WHY,
                )
            )

        return audit

    def run(self, dry_run: bool = False) -> list[dict[str, Any]]:
        """The full reconcile of every account/region the inventory or the targets name; a place
        that fails is in the results with ``failed`` (the others are reconciled all the same)."""
        by_place: dict[Place, list[InventoryRecord]] = {(t.account, t.region): [] for t in self.w.cfg.targets}
        for rec in self.w.store.all_records():
            place = _place(rec)
            if place is not None:
                by_place.setdefault(place, []).append(rec)
        return [self._reconcile(place, recs, Scope.FULL, dry_run) for place, recs in sorted(by_place.items())]

    def run_for(self, ids: Iterable[str], dry_run: bool = False) -> list[dict[str, Any]]:
        """The event path: the interfaces of these workloads only (rules only added, nothing deleted)."""
        by_place: dict[Place, list[InventoryRecord]] = {}
        for rec in self.w.store.get_many(list(dict.fromkeys(ids))).values():
            place = _place(rec)
            if place is not None and rec.state not in GONE_STATES:
                by_place.setdefault(place, []).append(rec)
        return [self._reconcile(place, recs, Scope.WORKLOADS, dry_run) for place, recs in sorted(by_place.items())]

    def react(self, messages: list[PerimeterMessage], dry_run: bool = False) -> Reaction:
        """A batch from the perimeter queue: ``{"ids": [...], "lifecycles": [{...}, ...]}`` each.
        A place (account/Region) that fails (its role, STS or EC2) holds up only its own workloads:
        a message naming nothing else is handed back for a retry (then the DLQ); one naming others
        too is done for those, and the failed place's workloads and lifecycle actions are sent again
        in a message of their own. A refused plan (over quota, a group name taken) is final: those
        instances' lifecycle actions are not handed on and time out into the hook's default result."""
        ids = [i for m in messages for i in m.ids]
        out = Reaction(results=self.run_for(ids, dry_run))
        failed = {i for r in out.results if r.get("failed") for i in r["workloads"]}
        # a plan refused whole refuses all its workloads; otherwise only those left as they were
        refused = {
            i
            for r in out.results
            if not r.get("failed")
            for i in r.get("refused", r["workloads"] if r.get("violations") else [])
        }
        actions: list[dict[str, Any]] = []
        for n, m in enumerate(messages):
            mine = [i for i in m.ids if i in failed]
            if not mine:
                actions += m.actions()
                continue
            waiting = [lc for lc in m.actions() if lc["instance_id"] in failed]
            if set(mine) == set(m.ids) and len(waiting) == len(m.actions()):
                out.retry.append(n)  # all of it waits: SQS retries it, then the DLQ (alarmed)
                continue
            # the rest is done: the failed place's part alone goes back on the queue (each round
            # sends less, so this ends; a message of failed places only is retried as above)
            self.w.enqueue_perimeter(mine, lifecycles=waiting)
            out.requeued += mine
            actions += [lc for lc in m.actions() if lc["instance_id"] not in failed]
        handed: list[dict[str, Any]] = []
        for lc in actions:
            iid = lc["instance_id"]
            if iid in refused:
                log.error(
                    "lifecycle %s for %s: its perimeter plan was refused; NOT handing on — the hook %s of %s will time "
                    "out into its configured default result",
                    lc["transition"],
                    iid,
                    lc["hook_name"],
                    lc["group_name"],
                )
                self.metric("LifecycleLeftToTimeout", 1)
                out.lifecycles_left_to_timeout.append(iid)
                continue
            # compute completes it once the bundle is published and, under the lifecycle gate
            # "agent", once its agent enforces too: perimeter_at records the hand-off (every ENI
            # carries its groups now; in dry run they were planned only, and the hold says so)
            handed.append({**lc, "perimeter_at": time.time(), **({"perimeter": "dry run"} if dry_run else {})})
            out.lifecycles_forwarded.append(iid)
        if handed:
            # one message for the batch's actions, naming their instances: compute takes them
            # into the engine first, whether or not the lifecycle handler's own message came yet
            self.w.enqueue_compute([lc["instance_id"] for lc in handed], lifecycles=handed)
        return out

    def _reconcile(self, place: Place, recs: list[InventoryRecord], scope: Scope, dry_run: bool) -> dict[str, Any]:
        account, region = place
        workloads = {r.id: dict(r.labels) for r in recs if r.state not in GONE_STATES}
        base: dict[str, Any] = {"account": account, "region": region, "scope": scope.value}
        base["workloads"] = sorted(workloads)
        try:
            sgp = SecurityGroupPerimeter(
                self.w.perimeter_ec2_for(account, region),
                self._records(account, region),
                self._owned(account, region),
                self._applying(account, region, scope),
            )
            res = sgp.reconcile(self.config, workloads, scope, dry_run=dry_run, gone=[r.id for r in recs])
        except PlanRefused as exc:
            self.metric("PerimeterPlanRefused", 1)
            if isinstance(exc, QuotaExceeded):
                self.metric("PerimeterOverQuota", 1)
            return base | {"applied": False, "violations": exc.violations}
        except Exception as exc:
            # one account's broken trust policy, an SCP, a disabled Region or an EC2 outage there
            # must not stop the others (as reconcile's targets): this place is reported failed
            log.exception("perimeter %s/%s failed", account, region)
            self.metric("PerimeterPlacesFailed", 1)
            return base | {"applied": False, "failed": f"{type(exc).__name__}: {exc}"[:500]}
        if res.lookalikes:
            self.metric("PerimeterGroupsRefused", len(res.lookalikes))
        if res.taken_back and not dry_run:
            self.metric("PerimeterGroupsTakenBack", len(res.taken_back))
        if res.applied:
            counts = res.plan
            self.metric("PerimeterGroupsCreated", counts["create"])
            self.metric("PerimeterGroupsDeleted", len([c for c in res.changes if c["action"] == "delete"]))
            self.metric("PerimeterAttachments", counts["attach"])
            self.metric("PerimeterDetachments", counts["detach"])
            self.metric("PerimeterRuleChanges", counts["authorize"] + counts["revoke"])
        for c in res.changes:
            log.info("%s%s", "(dry run) " if not res.applied else "", c["text"], extra={"perimeter_change": c})
        for k in res.kept:
            log.warning("perimeter: kept %s (%s) without purpose: %s", k["group"], k["name"], k["reason"])
        out = base | {"applied": res.applied, "plan": res.plan, "changes": res.changes, "kept": res.kept}
        if res.lookalikes or res.adopted or res.taken_back:
            out |= {"lookalikes": res.lookalikes, "adopted": res.adopted, "taken_back": res.taken_back}
        if res.violations:  # applied but for what breaks a limit: left as it was, named here
            self.metric("PerimeterPlanRefused", 1)
            if any("limit:" in v for v in res.violations):
                self.metric("PerimeterOverQuota", 1)
            out |= {"violations": res.violations, "refused": res.refused}
        return out


def _place(rec: InventoryRecord) -> Place | None:
    w = rec.workload
    if w.cloud != "aws" or not w.account or not w.region:
        return None
    return (w.account, w.region)


@contextmanager
def recorded_changes() -> Iterator[list[dict[str, Any]]]:
    """What the perimeter changes in this process while the block runs, one dict per change
    (``action``, ``text`` such as "perimeter: sg-… (rf-prod-boundary) attached to i-… (2 ENIs)",
    and the ids), whichever handler or thread made it: for a demo or a test driving the handlers
    in-process. Dry-run plans are not changes and are not recorded."""
    seen: list[dict[str, Any]] = []
    # the level below which the process did not want these records: recorded, then dropped, so
    # that lowering the logger's level to see them prints nothing new (e.g. on the demo's display)
    wanted = log.getEffectiveLevel()

    class _Recorder(logging.Filter):
        def filter(self, record: logging.LogRecord) -> bool:
            change = getattr(record, "perimeter_change", None)
            if change is not None and not record.getMessage().startswith("(dry run)"):
                seen.append(change)
            return record.levelno >= wanted

    recorder = _Recorder()
    level = log.level
    log.addFilter(recorder)
    if wanted > logging.INFO:
        log.setLevel(logging.INFO)
    try:
        yield seen
    finally:
        log.removeFilter(recorder)
        log.setLevel(level)
