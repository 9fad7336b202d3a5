"""Reconcile: scheduled full sync of every account/region; converges whatever events were lost."""

from __future__ import annotations

import logging
from dataclasses import dataclass, field

from ringfence.control import credentials
from ringfence.control.governance import store_governed
from ringfence.control.wiring import (
    COMPUTE_NOT_QUEUED,
    Metric,
    Target,
    hand_on_gone_again,
    hand_on_owed,
    no_metric,
    owe_compute,
)
from ringfence.events import UnservedAccount
from ringfence.labels import LabelMapper
from ringfence.store.base import ACTIVE_STATES, InventoryRecord, releases_addresses

from . import clients, ec2, hooks
from .wiring import Wiring

log = logging.getLogger(__name__)

# --- reconcile --------------------------------------------------------------------------------------


@dataclass
class ReconcileResult:
    seen: int = 0
    changed: list[str] = field(default_factory=list)
    gone: list[str] = field(default_factory=list)
    offline: list[str] = field(default_factory=list)
    restored: list[str] = field(default_factory=list)  # a stale `terminating` cleared
    refused: list[str] = field(default_factory=list)  # account/region targets not served (no role)
    failed: list[str] = field(default_factory=list)  # account/region targets that could not be read
    # account/region/group/hook: launch hooks that abandon launches Ringfence never completes (hooks.py)
    hooks_unlisted: list[str] = field(default_factory=list)
    hooks_unchecked: list[str] = field(default_factory=list)  # account/region whose hooks could not be listed


class Reconcile:
    def __init__(self, w: Wiring, metric: Metric = no_metric) -> None:
        self.w = w
        self.metric = metric

    def run(self, now: float | None = None) -> ReconcileResult:
        res = ReconcileResult()
        # first, what earlier hand-offs failed to give compute (any age: a queue outage longer
        # than the re-send window of tombstones), whatever this run then does
        hand_on_owed(self.w, "reconcile", self.metric)
        mapper = self.w.mapper()
        records = {r.id: r for r in self.w.store.all_records()}
        changed: set[str] = set()
        removed: set[str] = set()  # of those, the workloads that gave their addresses up
        offline_failed: list[Exception] = []
        try:
            for t in self.w.cfg.targets:
                try:
                    self._target(t, mapper, records, res, changed, removed)
                except UnservedAccount as exc:
                    log.error("reconcile target %s/%s refused: %s", t.account, t.region, exc)
                    self.metric("ReconcileTargetsRefused", 1)
                    res.refused.append(f"{t.account}/{t.region}")
                except Exception:
                    # one account's broken trust policy or an STS/EC2 outage in one region must not
                    # stop the run: the other targets converge, and what they changed still reaches
                    # compute below (the store already holds it: a later run would see no drift)
                    log.exception("reconcile target %s/%s failed", t.account, t.region)
                    self.metric("ReconcileTargetsFailed", 1)
                    res.failed.append(f"{t.account}/{t.region}")
            # agents silent for longer than offline_after leave their peers' sets (only then)
            now = ec2.now() if now is None else now
            for rec in records.values():
                silent = rec.last_heartbeat is not None and now - rec.last_heartbeat > self.w.cfg.offline_after
                if rec.enrolled and silent and not rec.offline:
                    try:
                        self.w.store.set_liveness(rec.id, offline=True)
                    except Exception as exc:
                        # one failed write (throttled) must not keep what the run stored from
                        # compute: a retry finds that stored and would not hand it on. Raised
                        # below; handed on as if it landed (it may have: one hand-off too many)
                        log.exception("reconcile: %s could not be marked offline", rec.id)
                        offline_failed.append(exc)
                    else:
                        res.offline.append(rec.id)
                    changed.add(rec.id)
                    if rec.active:
                        removed.add(rec.id)
        except BaseException:
            # whatever fails once something is stored, what was stored stays owed to compute
            owe_compute(self.w, changed, "reconcile", self.metric, urgent=removed & changed)
            raise
        res.changed = sorted(changed)
        # what left its peers' sets (gone, stopped, offline) first, in the priority lane: its
        # address must not stay allowed behind a tag storm's backlog
        urgent = sorted(removed & changed)
        try:
            if urgent:
                self.w.enqueue_compute(urgent, urgent=True)
            # and compute re-signs the bundles whose expiry is near (only compute signs)
            self.w.enqueue_compute([i for i in res.changed if i not in removed], refresh=True)
        except Exception:
            # the run fails (Lambda retries it); what it stored stays owed to compute until a
            # run hands it on, however long the queue refuses
            log.exception("reconcile: %s stored but compute could not be queued", ", ".join(res.changed))
            self.metric(COMPUTE_NOT_QUEUED, 1)
            owe_compute(self.w, res.changed, "reconcile", self.metric, urgent=urgent)
            raise
        self.w.enqueue_perimeter(res.changed)  # repaired drift reaches the perimeter as events do
        # and what was stored gone lately, again: a run that stored a tombstone and failed to hand
        # it on is retried with nothing more to store for it (compute: a removal applied is a no-op)
        places = {(t.account, t.region) for t in self.w.cfg.targets}
        hand_on_gone_again(
            self.w,
            records.values(),
            lambda r: r.workload.cloud == "aws" and (r.workload.account, r.workload.region) in places,
            res.changed,
            "reconcile",
            self.metric,
            now,
        )
        self.metric("ReconcileDrift", len(res.changed))
        if offline_failed:  # the run fails, for its retry (which marks them offline)
            raise offline_failed[0]
        return res

    def _hooks(self, t: Target, role: str | None, res: ReconcileResult) -> None:
        """Report, once per run, the gated groups' launch hooks that abandon every launch because
        their name is not Ringfence's (:mod:`.hooks`): nothing else sees them."""
        where = f"{t.account}/{t.region}"
        try:
            asg = clients.assumed_client("autoscaling", t.region, role, "ringfence-reconcile")
            found = hooks.unlisted_launch_hooks(asg, self.w.cfg.gated_group_names, self.w.cfg.lifecycle_hook_names)
        except Exception:
            # e.g. a member role not given the two Auto Scaling reads yet: the target converged all the same
            log.warning(
                "reconcile %s: the gated groups' lifecycle hooks could not be listed "
                "(autoscaling:DescribeAutoScalingGroups, autoscaling:DescribeLifecycleHooks)",
                where,
                exc_info=True,
            )
            self.metric("LifecycleHooksUnchecked", 1)
            res.hooks_unchecked.append(where)
            return
        for h in found:
            log.error(
                "lifecycle hook %s of %s (%s) holds every launch and ends it ABANDON after %d s, and no launch "
                "hook of the group is in RINGFENCE_LIFECYCLE_HOOK_NAMES: Ringfence completes none of its actions. "
                "If it is Ringfence's, add %s to LifecycleHookNames / lifecycle_hook_names; if the group is not "
                "Ringfence's, keep it out of GatedGroupNames / gated_group_names",
                h.hook,
                h.group,
                where,
                h.heartbeat_timeout,
                h.hook,
            )
            res.hooks_unlisted.append(f"{where}/{h.group}/{h.hook}")
        if found:
            self.metric("LifecycleHooksUnlisted", len(found))

    def _target(
        self,
        t: Target,
        mapper: LabelMapper | None,
        records: dict[str, InventoryRecord],
        res: ReconcileResult,
        changed: set[str],
        removed: set[str],
    ) -> None:
        """Converge one account/region: nothing is taken for gone unless its listing completed."""
        # a target without its own role takes the account's member role: never this
        # account's credentials for another account (its instances would be taken for gone)
        role = t.role_arn or self.w.member_role(t.account)
        client = clients.assumed_client("ec2", t.region, role, "ringfence-reconcile")
        t0 = ec2.now()
        live_ids = set()
        observed: list[InventoryRecord] = []
        held: set[str] = set()  # stored as terminating, running now
        for inst in ec2.all_instances(client):
            res.seen += 1
            live_ids.add(inst["InstanceId"])
            rec = ec2.to_record(inst, t.account, t.region, t0, mapper)
            old = records.get(rec.id)
            if old is not None and old.state == "terminating" and rec.state in ACTIVE_STATES:
                held.add(rec.id)
            observed.append(rec)
        release: frozenset[str] = frozenset()
        if held:
            # a terminate that Auto Scaling is not (or no longer) carrying out — a forged or
            # abandoned action — must not keep a running instance out of its peers' sets
            asg = clients.assumed_client("autoscaling", t.region, role, "ringfence-reconcile")
            release = frozenset(held - set(ec2.leaving_groups(asg, sorted(held))))
        # a token is revoked before the record is written terminated: a terminated record is
        # never written again (a later run finds it as listed), so a revocation failing after the
        # write would leave the token authorizing for good
        failed: list[Exception] = []
        withheld: set[str] = set()
        for rec in observed:
            old = records.get(rec.id)
            leaves = rec.state == "terminated" and (old is None or old.state != "terminated")
            if leaves and not self._retire(rec.id, "instance terminated (reconcile)", failed):
                withheld.add(rec.id)
        # one whose revocation failed stays as stored, for the next run to revoke and write
        observed = [rec for rec in observed if rec.id not in withheld]
        # reconcile names no principal: it never approves a move into a privileged value
        try:
            stored = store_governed(self.w, observed, records, metric=self.metric, release=release, fresh=True)
        except Exception:
            # some of them may be written already (the results come at the end): all go to compute,
            # which finds nothing to do for the rest, or the next run would see no drift for them
            changed.update(rec.id for rec in observed)
            raise
        for rec, written, governed, replaced in stored:
            if written or governed:
                changed.add(rec.id)
                # judged against the record the write replaced, not the pass's early read
                if written and releases_addresses(replaced, rec):
                    removed.add(rec.id)
            if written and rec.id in release:
                res.restored.append(rec.id)
                self.metric("StaleTerminatingCleared", 1)
        for rec in records.values():
            w = rec.workload
            mine = w.cloud == "aws" and w.account == t.account and w.region == t.region
            if not mine or rec.id in live_ids or rec.state == "terminated":
                continue
            # its token revoked before its tombstone is written: every later run skips a
            # tombstone, so one whose revocation then failed would leave the token authorizing;
            # and only where the tombstone lands (an instance stored by its event after the
            # listing began keeps its token and its record)
            if self._retire(rec.id, "instance gone (reconcile)", failed, at=t0) and self.w.store.observe(
                ec2.tombstone(rec.id, t.account, t.region, t0)
            ):
                changed.add(rec.id)
                res.gone.append(rec.id)
                if rec.active:
                    removed.add(rec.id)
        self._hooks(t, role, res)
        if failed:  # the target failed: counted, logged, and what it stored still reaches compute
            raise failed[0]

    def _retire(self, wid: str, why: str, failed: list[Exception], at: float | None = None) -> bool:
        """:func:`credentials.retire` (``at``: before a tombstone observed then,
        :func:`credentials.retire_before_tombstone`, False where it would not land); False (the
        error kept in ``failed``) when it fails, so that one workload's failed revocation does not
        stop the others' convergence."""
        try:
            if at is not None:
                return credentials.retire_before_tombstone(self.w, wid, at, why)
            credentials.retire(self.w, wid, why)
        except Exception as exc:
            log.warning("reconcile: the token of %s could not be revoked (%s): left as stored", wid, exc)
            failed.append(exc)
            return False
        return True
