"""Compute: inventory changes → engine updates → signed bundles and deltas published, agents nudged."""

from __future__ import annotations

import hashlib
import json
import threading
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any

from ringfence import bundle
from ringfence.addresses import Prefix, format_prefix
from ringfence.engine import Engine
from ringfence.engine.compiler import Update
from ringfence.policy import Policy
from ringfence.store.base import (
    MOVED_MAX,
    DeltaPointer,
    EngineHead,
    InventoryRecord,
    MovedRecord,
    PolicyVersion,
)

from .fanout import (
    MESSAGE_BUDGET,
    STAGED_PREFIX,
    BundleJob,
    PublishWorker,
    in_parallel,
    pack,
    rules_digest,
    set_digest,
)
from .launchgate import LaunchGate
from .publish import Notifier
from .wiring import BaseWiring, Metric, log, no_metric

# --- compute --------------------------------------------------------------------------------------


def revision_floor() -> int:
    """The clock in milliseconds: the lowest revision an engine rebuild starts from (as offline
    ``ringfence compile`` numbers its bundles), so a rebuild over a restored store never numbers
    below what agents hold."""
    return time.time_ns() // 1_000_000


@dataclass
class ComputeStats:
    revision: int = 0
    rebuilt_engine: bool = False
    updates: int = 0
    sets_touched: int = 0
    deltas_published: int = 0
    bundles_published: int = 0  # signed and pointed at by this invocation itself
    bundles_queued: int = 0  # handed to the publish workers
    bundles_adopted: int = 0  # a rebuild found them published already, unchanged
    publish_messages: int = 0
    bundles_refreshed: int = 0
    nudged: int = 0
    bytes_published: int = 0
    # where this invocation's time went (s): "rebuild", "engine" (apply), "deltas" (sign, store,
    # index), "render" (bundles rendered, published in place), "enqueue" (jobs sent), "commit"
    seconds: dict[str, float] = field(default_factory=dict)
    lifecycle_completed: list[str] = field(default_factory=list)
    lifecycle_abandoned_to_timeout: list[str] = field(default_factory=list)
    lifecycle_awaiting_agent: list[str] = field(default_factory=list)


def one_action_each(messages: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """The messages with each one that carries several lifecycle actions (``lifecycles``: a
    lifecycle or perimeter batch hands its actions on in one message) split into one message per
    action, as if each had come alone (``lifecycle``); the ids stay with the first."""
    out: list[dict[str, Any]] = []
    for m in messages:
        actions = m.get("lifecycles") or []
        if not actions:
            out.append(m)
            continue
        out.append({k: v for k, v in m.items() if k != "lifecycles"})
        out.extend({"ids": [], "lifecycle": lc} for lc in actions)
    return out


class Compute:
    """Inventory changes → engine → signed deltas and bundles in S3 → nudges → lifecycle."""

    def __init__(self, w: BaseWiring, metric: Metric = no_metric, notifier: Notifier | None = None) -> None:
        self.w = w
        self.metric = _one_at_a_time(metric)  # lifecycle actions are handled on several threads
        if metric is not no_metric:
            # the records the store leaves out (InventoryRecordsMismatched) are counted with compute's
            w.store.metric = self.metric
        self.engine: Engine | None = None
        # the revision self.engine was rebuilt from, recorded with the head (EngineHead.rebuilt_from)
        self.rebuilt_from = 0
        # workload → expiry of its stored bundle (adopted by a rebuild from the pointers); a
        # workload missing here is re-signed by the next refresh
        self.expiry: dict[str, int] = {}
        # set → the head version recorded in the store (with its content's digest)
        self.heads: dict[str, int] = {}
        self.notifier = notifier if notifier is not None else w.default_notifier()
        # signs, stores and nudges: in this process, or behind the publish queue (w.cfg)
        self.worker = PublishWorker(w, metric, self.notifier)
        self.gate = LaunchGate(w, self.metric)

    def run(self, messages: list[dict[str, Any]]) -> ComputeStats:
        messages = one_action_each(messages)
        stats = ComputeStats()
        bytes0 = self.w.publisher.bytes_published
        try:
            ids = list(dict.fromkeys(i for m in messages for i in m.get("ids", [])))
            # a run starts with three reads that do not depend on one another: one round trip
            # of waiting, not three (compute is the one serialized stage of a scale-out)
            active, head, recs = _together(
                self.w.active_policy, self.w.store.head, lambda: self.w.store.get_many(ids) if ids else {}
            )
            if active is None:
                log.warning("no active policy: nothing to compute (provision one with the admin API)")
                self._lifecycles(messages, stats, ok=False)
                return stats
            force = any(m.get("rebuild") for m in messages)
            # a launch held by its lifecycle hook waits on its own bundle: published here, not
            # queued — unless the hook waits on the agent (lifecycle gate "agent"): an agent that
            # enforces its bundle proves it published, and the publish workers, side by side, are
            # faster than this one serialized function (a scale-out's launches were published here)
            launching = {
                m["lifecycle"]["instance_id"]
                for m in messages
                if m.get("lifecycle") and str(m["lifecycle"].get("transition", "")).endswith("LAUNCHING")
            }
            if self.w.cfg.lifecycle_gate == "agent":
                launching = set()
            t = time.perf_counter()
            rebuilt = self._ensure(active, head, stats, force=force, inline=launching)
            assert self.engine is not None
            t = _lap(stats, "rebuild", t)
            base = self.engine.revision  # == the stored head (checked by _ensure)
            # a rebuild loaded every record after the batch's were read: read them again
            updates = self._apply(ids, self.w.store.get_many(ids) if rebuilt and ids else recs)
            updates += self._reissue(messages)
            self._shared(None if rebuilt else ids)
            t = _lap(stats, "engine", t)
            stats.updates = len(updates)
            if updates:
                self._reserve(base)  # fails if another container moved the head meanwhile
                moved = self._publish(updates, stats, inline=launching)
                t_commit = time.perf_counter()
                # before the commit: a reader that sees the head at this revision finds the record
                self.w.store.put_moved(
                    MovedRecord(
                        revision=self.engine.revision,
                        previous=base,
                        workloads=sorted(moved) if len(moved) <= MOVED_MAX else None,
                    )
                )
                self._commit()
                _lap(stats, "commit", t_commit)
            # explicit re-render requests (the agent API found a gap it cannot bridge)
            wanted = dict.fromkeys(i for m in messages for i in m.get("publish", []))
            self._publish_bundles([w for w in wanted if w in self.engine.workloads], stats, inline=launching)
            if any(m.get("refresh") for m in messages):
                self._refresh(stats)
            stats.revision = self.engine.revision
        except Exception:
            self.engine = None  # never trust a half-applied engine: the next run rebuilds
            self._lifecycles(messages, stats, ok=False)
            raise
        stats.bytes_published = self.w.publisher.bytes_published - bytes0
        self._lifecycles(messages, stats, ok=True)
        self.metric("SetsTouched", stats.sets_touched)
        self.metric("BundlesPublished", stats.bundles_published)
        self.metric("BytesPublished", stats.bytes_published)
        return stats

    # engine lifecycle

    def _ensure(
        self,
        active: tuple[PolicyVersion, Policy],
        head: EngineHead,
        stats: ComputeStats,
        force: bool = False,
        inline: set[str] | frozenset[str] = frozenset(),
    ) -> bool:
        """A warm engine at the stored ``head``, or one rebuilt from the inventory that adopts
        what is published already (:meth:`_adopt`) and republishes only the rest (True)."""
        pv, policy = active
        e = self.engine
        if (
            not force
            and e is not None
            and head.clean
            and e.revision == head.revision
            and e.policy_version == pv.number == head.policy_version
        ):
            return False
        # the rebuild numbers from the stored head or the clock (ms), whichever is higher: a store
        # restored from a backup (SQLite backup, DynamoDB point-in-time) holds an older head than
        # the versions agents already enforce, and an agent refuses a lower version as a rollback
        # (a quarantine numbered below it would never take effect). Between rebuilds versions go
        # up by one per change, far slower than the clock, so a restore started later numbers
        # above every version issued before it (docs/onprem.md, on restoring a backup)
        start = max(head.revision, revision_floor())
        log.info("rebuilding engine at head %s from %s (policy v%s)", head.revision, start, pv.number)
        engine = Engine(policy, policy_version=pv.number, revision=start)
        engine.load(r.effective() for r in self.w.store.all_records() if r.active)
        if engine.duplicates:  # the store's keys are unique and name their workload: never expected
            self.metric("InventoryDuplicatesSkipped", len(engine.duplicates))
        self.engine = engine
        self.rebuilt_from = start
        self.expiry = {}
        adopted = self._adopt(engine)
        self._reserve(head.revision)
        self._publish_bundles([w for w in sorted(engine.workloads) if w not in adopted], stats, inline=inline)
        self._commit()
        stats.rebuilt_engine = True
        stats.bundles_adopted = len(adopted)
        self.metric("BundlesAdopted", len(adopted))
        return True

    def _adopt(self, engine: Engine) -> set[str]:
        """Take over the versions already published for what did not change: a set whose stored
        head carries the digest of the rebuilt set's content keeps that head's version (agents
        chain their deltas from it); a workload whose pointer names the same rules
        (:func:`rules_digest`) over sets that were all adopted keeps its bundle (no re-render to
        sign, store or announce), if the signing key in use signed it: after a key rotation a cold
        start re-signs every bundle, so the old key can be revoked once agents hold the new ones.
        The rest gets the rebuild's fresh revision and is republished. Returns the adopted
        workloads."""
        self.heads = {}
        states = self.w.store.set_states(list(engine.sets_by_name))
        kept: set[str] = set()
        for name, s in engine.sets_by_name.items():
            st = states.get(name)
            if st is None:
                continue
            self.heads[name] = st[0]  # a stale head stays recorded: see _note_heads
            if st[1] is not None and st[1] == set_digest(*s.cover_text()):
                s.version = st[0]
                kept.add(name)
        adopted: set[str] = set()
        key_id = self.w.signer.key_id
        pointers = self.w.store.bundle_pointers(list(engine.workloads))
        for wid, ws in engine.workloads.items():
            ptr = pointers.get(wid)
            if ptr is None or ptr.digest is None or ptr.key_id != key_id or not set(ptr.sets) <= kept:
                continue
            if ptr.in_flight is not None:
                # a newer bundle was handed to the publish workers (by a run that failed before
                # its commit, say): adopting the older pointer would let that job, rendered from
                # an inventory that may have changed since, land over this rebuild's view. The
                # workload gets the rebuild's fresh revision, above every version handed on.
                continue
            if any(v > engine.sets_by_name[n].version for n, v in ptr.sets.items()):
                continue  # the pointer is ahead of the recorded head (a set made again since)
            doc = engine.render(wid)
            held: dict[str, Any] = doc["sets"]  # type: ignore[assignment]
            if set(held) != set(ptr.sets) or rules_digest(doc) != ptr.digest:
                continue
            ws.rules_revision = ptr.rules_revision
            adopted.add(wid)
            if ptr.expires_at is not None:
                self.expiry[wid] = ptr.expires_at
        log.info(
            "rebuild adopted %d of %d bundles and %d of %d sets",
            len(adopted),
            len(engine.workloads),
            len(kept),
            len(engine.sets_by_name),
        )
        return adopted

    def _reserve(self, expected: int) -> None:
        assert self.engine is not None
        self.w.store.put_head(
            EngineHead(
                revision=self.engine.revision,
                policy_version=self.engine.policy_version,
                clean=False,
                rebuilt_from=self.rebuilt_from,
            ),
            expected,
        )

    def _commit(self) -> None:
        assert self.engine is not None
        self.w.store.put_head(
            EngineHead(
                revision=self.engine.revision,
                policy_version=self.engine.policy_version,
                clean=True,
                rebuilt_from=self.rebuilt_from,
            ),
            self.engine.revision,
        )

    def _shared(self, ids: list[str] | None) -> None:
        """Log and count (``AddressesShared``) the addresses of ``ids`` (None: of every workload)
        that more than one active workload holds: peers' sets give such an address the access of
        each. A registration is refused an address a workload holds, but a cloud instance is
        observed, not refused: one launched or started with an address an on-premise host was
        registered with, or in a VPC overlapping another's, shares it."""
        assert self.engine is not None
        shared = self.engine.shared_addresses(ids)
        if not shared:
            return
        some = "; ".join(f"{ip}: {', '.join(held)}" for ip, held in list(shared.items())[:20])
        more = f" (and {len(shared) - 20} more)" if len(shared) > 20 else ""
        log.warning("%d address(es) held by more than one active workload: %s%s", len(shared), some, more)
        self.metric("AddressesShared", len(shared))

    def _apply(self, ids: list[str], recs: Mapping[str, InventoryRecord]) -> list[Update]:
        assert self.engine is not None
        out = []
        for wid in ids:
            rec = recs.get(wid)
            upd = self.engine.upsert(rec.effective()) if rec is not None and rec.active else self.engine.remove(wid)
            if upd.changed:
                out.append(upd)
        return out

    def _reissue(self, messages: list[dict[str, Any]]) -> list[Update]:
        """Whole new bundles, at fresh revisions, for the workloads whose agents hold a version
        above every one published for them (``reissue``: workload → the version its agent holds,
        sent by the agent API): issued before the store was restored from a backup, so the
        restored state reaches them. Only for a version below the one this engine was rebuilt from
        (every version issued before a restore is) and while the engine's version of the workload
        is not above it already (a copy of the message, or one handled since, changes nothing):
        at most one re-issue per workload per rebuild, whatever agents claim."""
        assert self.engine is not None
        held: dict[str, int] = {}
        for m in messages:
            for wid, v in (m.get("reissue") or {}).items():
                held[wid] = max(held.get(wid, 0), int(v))
        return [
            self.engine.reissue(wid)
            for wid, v in sorted(held.items())
            if wid in self.engine.workloads and self.engine.bundle_version(wid) <= v < self.rebuilt_from
        ]

    # publication

    def _refresh(self, stats: ComputeStats) -> None:
        """Re-sign, at the same version, the bundles expiring within ``bundle_refresh_before``
        (the schedule asks; agents fetch a bundle whose expiry is near): a healthy control plane
        never lets an enforced bundle expire."""
        assert self.engine is not None
        soon = time.time() + self.w.cfg.bundle_refresh_before
        due = [wid for wid in sorted(self.engine.workloads) if self.expiry.get(wid, 0) <= soon]
        self._publish_bundles(due, stats, refresh=True)
        stats.bundles_refreshed += len(due)
        self.metric("BundlesRefreshed", stats.bundles_refreshed)

    def _publish(
        self, updates: list[Update], stats: ComputeStats, inline: set[str] | frozenset[str] = frozenset()
    ) -> set[str]:
        """Publish one batch: the set deltas here, in order (each set's chain has no gap when
        its head moves); whole bundles and nudges through the publish workers. The workloads
        whose latest version it moved (or will, once the workers are through)."""
        assert self.engine is not None
        signer = self.worker.signer()
        rebuilt: set[str] = set()
        notify: set[str] = set()
        for upd in updates:
            rebuilt |= upd.rebuilt
            notify |= upd.notify
        # the whole bundles first rendered and their versions marked pending, before any set head
        # moves: the agent API serves no deltas past a bundle on its way (an agent moved past its
        # new bundle's version with its old rules would refuse that bundle as a replay or rollback)
        wids = [w for w in sorted(rebuilt) if w in self.engine.workloads]
        jobs = self._render(wids, stats, mark=set(wids))  # published here too: the heads move first
        t_deltas = time.perf_counter()
        # One delta per set for the whole batch (its first version → its last): a storm of
        # launches is one publication, not one per instance. Versions in between were never
        # published (compute holds the head reserved meanwhile), so no agent can be at one.
        merged = merge_set_deltas(updates)
        deltas = [
            bundle.sign(
                bundle.SetDelta(
                    set=name,
                    from_version=from_v,
                    to_version=to_v,
                    add=[format_prefix(p) for p in sorted(added)],
                    remove=[format_prefix(p) for p in sorted(removed)],
                ),
                signer,
            )
            for name, (from_v, to_v, added, removed) in sorted(merged.items())
        ]
        keys = in_parallel(self.w.publisher.put_delta, deltas)
        # each set's pointer and head are its own items: written side by side, every delta
        # pointer before any head moves (a reader that sees a head finds its delta)
        in_parallel(
            self.w.store.put_delta,
            [
                DeltaPointer(set=doc.set, from_version=doc.from_version, to_version=doc.to_version, key=key)
                for doc, key in zip(deltas, keys, strict=True)
            ],
        )
        stats.deltas_published += len(deltas)
        moved = [(name, s) for name in sorted(merged) if (s := self.engine.sets_by_name.get(name)) is not None]
        in_parallel(lambda ns: self.w.store.put_set_head(ns[0], ns[1].version, set_digest(*ns[1].cover_text())), moved)
        for name, s in moved:
            self.heads[name] = s.version
        stats.sets_touched += len(merged)
        _lap(stats, "deltas", t_deltas)
        # Whole bundles only where a workload's own rules changed. Agents whose bundles merely
        # reference a changed set get the signed deltas; the agent API materializes their current
        # bundle on demand from the last full one plus those deltas (see AgentApi.current).
        nudges = [
            (wid, self.engine.bundle_version(wid)) for wid in sorted(notify - rebuilt) if wid in self.engine.workloads
        ]
        self._dispatch(jobs, stats, nudges, inline)
        return notify | rebuilt

    def _publish_bundles(
        self,
        wids: list[str],
        stats: ComputeStats,
        nudges: list[tuple[str, int]] | None = None,
        inline: set[str] | frozenset[str] = frozenset(),
        refresh: bool = False,
    ) -> None:
        """Render these workloads' bundles (the engine's part: it lives here) and have them
        signed, stored, pointed at and announced, with ``nudges`` for agents whose sets moved:
        by the publish workers over the queue when one is configured, else (and for ``inline``
        workloads, whose launch waits on them) right here."""
        # marked: the jobs handed to the publish workers (no set head moves here, and a bundle
        # published in this process is pointed at before the head is committed). A refresh
        # re-signs the versions already handed on: nothing to mark
        queued = bool(self.w.cfg.publish_queue_url)
        mark = set() if refresh or not queued else {w for w in wids if w not in inline}
        self._dispatch(self._render(wids, stats, mark), stats, nudges, inline)

    def _render(self, wids: list[str], stats: ComputeStats, mark: set[str]) -> list[BundleJob]:
        """These workloads' bundles rendered as publish jobs; the version of each one in ``mark``
        recorded as pending on its pointer (:meth:`Store.mark_bundle_pending`) before it is
        handed on: the agent API holds back set deltas past it, a rebuild adopts no older
        pointer."""
        assert self.engine is not None
        t = time.perf_counter()
        jobs: list[BundleJob] = []
        marks: list[tuple[str, int]] = []
        for wid in wids:
            doc = self.engine.render(wid)
            version = self.engine.bundle_version(wid)
            jobs.append(
                BundleJob(
                    workload_id=wid,
                    bundle=doc,
                    digest=rules_digest(doc),
                    rules_revision=self.engine.workloads[wid].rules_revision,
                    version=version,
                )
            )
            if wid in mark:
                marks.append((wid, version))
        in_parallel(lambda m: self.w.store.mark_bundle_pending(*m), marks)
        _lap(stats, "render", t)
        return jobs

    def _dispatch(
        self,
        jobs: list[BundleJob],
        stats: ComputeStats,
        nudges: list[tuple[str, int]] | None = None,
        inline: set[str] | frozenset[str] = frozenset(),
    ) -> None:
        """Rendered jobs (and ``nudges``) signed, stored, pointed at and announced: see
        :meth:`_publish_bundles`."""
        assert self.engine is not None
        nudges = nudges or []
        if not jobs and not nudges:
            return
        t = time.perf_counter()
        for job in jobs:  # after this batch's set heads moved (see _note_heads)
            assert job.bundle is not None
            self._note_heads(job.bundle)
        queued = bool(self.w.cfg.publish_queue_url)
        here = [j for j in jobs if not queued or j.workload_id in inline]
        if here:
            # the head is committed after this: the workers' wake-up signal is not needed
            done, expiry = self.worker.run(pack(here, [] if queued else nudges, self.engine.revision), signal=False)
            stats.bundles_published += done.bundles_published
            stats.nudged += done.nudged
            self.expiry.update(expiry)
        t = _lap(stats, "render", t)
        if not queued:
            return
        away = [j for j in jobs if j.workload_id not in inline]
        for job in away:
            if len(job.model_dump_json()) > MESSAGE_BUDGET:  # too big for a message: staged in the bucket
                body = json.dumps(job.bundle, separators=(",", ":")).encode()
                # named by its content: two jobs of one workload at one revision (a change and a
                # repair request in one batch) are two objects unless they are the same bytes,
                # and then the worker that finds it gone counts it done (PublishWorker._doc)
                sha = hashlib.sha256(body).hexdigest()
                job.staged = f"{STAGED_PREFIX}{job.workload_id}/{sha[:32]}.json"
                # the worker signs these bytes only (PublishWorker._doc): a copy replaced in the
                # bucket before it reads it is refused, never signed
                job.staged_sha256 = sha
                self.w.publisher.put_bytes(job.staged, body, "application/json")
                job.bundle = None
        messages = pack(away, nudges, self.engine.revision)
        for msg in messages:
            self.w.send_publish(msg.model_dump(mode="json"))
        expected = int(time.time()) + self.w.cfg.bundle_ttl
        for job in away:
            self.expiry[job.workload_id] = expected
        _lap(stats, "enqueue", t)
        stats.bundles_queued += len(away)
        stats.nudged += len(nudges)
        stats.publish_messages += len(messages)

    def _note_heads(self, doc: dict[str, Any]) -> None:
        """Record the head (with its content's digest) of a set a bundle holds at a version the
        store has no head for yet (a new set; one a rebuild gave a fresh version), so that a cold
        start can adopt it. A set whose stored head is older keeps it: its newer version came
        from a rebuild, and moving the head without a delta chain would send the agents still on
        the old bundle to fetch a whole one before the workers have published it."""
        assert self.engine is not None
        sets: dict[str, Any] = doc["sets"]
        for name, body in sets.items():
            version = int(body["version"])
            if name in self.heads:
                continue
            self.w.store.put_set_head(name, version, set_digest(body.get("v4", []), body.get("v6", [])))
            self.heads[name] = version

    # lifecycle hooks

    def _lifecycles(self, messages: list[dict[str, Any]], stats: ComputeStats, ok: bool) -> None:
        """Complete (or hold, or leave to time out) the batch's lifecycle actions. Each action's
        reads and writes concern its own instance only (its hold, its bundle pointer, its
        CompleteLifecycleAction), so they run side by side: a scale-out's batch of ten launch
        actions was thirty-odd round trips one after another while the compute queue waited."""
        enforced = list(dict.fromkeys(i for m in messages for i in m.get("enforced") or []))
        # the agent API: these instances' agents enforce (lifecycle gate "agent")
        for iid, outcome in zip(enforced, in_parallel(self.gate.enforced, enforced), strict=True):
            if outcome == "completed":
                stats.lifecycle_completed.append(iid)
        # one per action: a copy of one (delivered twice, handed on again by a retried batch) in
        # the same batch would otherwise run beside it and complete it twice
        actions = list(
            {
                (m["lifecycle"]["instance_id"], m["lifecycle"]["token"]): m["lifecycle"]
                for m in messages
                if m.get("lifecycle")
            }.values()
        )
        for lc, outcome in zip(actions, in_parallel(lambda lc: self._lifecycle(lc, ok), actions), strict=True):
            if outcome in ("duplicate", "not ours"):
                # completed (or given up) already, by an earlier copy; or another hook's action,
                # its owner's to complete (both logged by the gate)
                continue
            {
                "completed": stats.lifecycle_completed,
                "awaiting agent": stats.lifecycle_awaiting_agent,
                "left to time out": stats.lifecycle_abandoned_to_timeout,
            }[outcome].append(lc["instance_id"])

    def _lifecycle(self, lc: dict[str, Any], ok: bool) -> str:
        """One action: "completed", "awaiting agent", "left to time out" (logged here),
        "duplicate" (an earlier copy of it was completed) or "not ours" (another hook's)."""
        if not self.gate.ours(lc):
            # with no hook named ours at all, every action is left to time out (logged, counted)
            return "not ours" if self.w.cfg.lifecycle_hook_names else "left to time out"
        iid = lc["instance_id"]
        launching = lc["transition"].endswith("LAUNCHING")
        ready = ok and self.engine is not None
        if ready and launching:
            ready = iid in self.engine.workloads  # type: ignore[union-attr]
            if ready and self.w.cfg.lifecycle_gate != "agent":  # gate "agent": its agent's report proves it
                ready = self.w.store.bundle_pointer(iid) is not None
        if ready and not launching:
            ready = iid not in self.engine.workloads  # type: ignore[union-attr]
        if not ready:
            log.error(
                "lifecycle %s for %s: policy not published; NOT completing — the hook %s of %s will time out "
                "into its configured default result",
                lc["transition"],
                iid,
                lc["hook_name"],
                lc["group_name"],
            )
            self.metric("LifecycleLeftToTimeout", 1)
            return "left to time out"
        if launching and self.w.cfg.lifecycle_gate == "agent":
            # completed only once its agent enforces too (ringfence.control.launchgate)
            outcome = self.gate.handed_on(lc)
            if outcome in ("completed", "lost"):
                return {"completed": "completed", "lost": "left to time out"}[outcome]
            log.info("launch of %s published, perimeter in place: %s", iid, outcome)
            return "awaiting agent"
        # claimed first: a copy of the action in a later batch completes nothing again; a failure
        # is logged and counted (LifecycleLeftToTimeout) there
        return {"failed": "left to time out", "lost": "left to time out", "already": "duplicate"}.get(
            self.gate.complete_once(lc), "completed"
        )


def _together(*reads: Callable[[], Any]) -> list[Any]:
    """Independent reads side by side, their results in order."""
    return in_parallel(lambda read: read(), list(reads))


def _one_at_a_time(metric: Metric) -> Metric:
    lock = threading.Lock()

    def counted(name: str, value: float) -> None:
        with lock:
            metric(name, value)

    return counted


def _lap(stats: ComputeStats, phase: str, since: float) -> float:
    """Add the time since ``since`` to ``phase``; now."""
    now = time.perf_counter()
    stats.seconds[phase] = stats.seconds.get(phase, 0.0) + now - since
    return now


def merge_set_deltas(updates: list[Update]) -> dict[str, tuple[int, int, set[Prefix], set[Prefix]]]:
    """The set deltas of consecutive updates as one per set: name → (from_version, to_version,
    added, removed), the net element edits from the set's version before the first update that
    touched it to the last one's revision (an element added then removed is neither). A set that
    died and was made again under its name within the updates: its new copy's edits only, from
    that copy's first version."""
    out: dict[str, tuple[int, int, set[Prefix], set[Prefix]]] = {}
    for upd in updates:
        for name, (from_v, added, removed) in upd.set_deltas.items():
            first, last, add, rem = out.get(name, (from_v, from_v, set(), set()))
            if from_v != last:
                # not where the set's last delta left it: the set died and was made again under
                # its name in between (a new copy starts at its creation's version). No delta
                # spans both copies: the new one's starts afresh; an agent holding the old copy
                # gets a whole bundle (its bundle was rebuilt when the set it held went away)
                first, add, rem = from_v, set(), set()
            for p in removed:
                if p in add:
                    add.discard(p)
                else:
                    rem.add(p)
            for p in added:
                if p in rem:
                    rem.discard(p)
                else:
                    add.add(p)
            out[name] = (first, upd.revision, add, rem)
    return out
