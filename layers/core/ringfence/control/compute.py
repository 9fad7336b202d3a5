"""Compute: inventory changes → engine updates → signed bundles and deltas published, agents nudged."""

from __future__ import annotations

import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any, TypeVar

from ringfence import bundle
from ringfence.addresses import Prefix, format_prefix
from ringfence.engine import Engine
from ringfence.engine.compiler import Update
from ringfence.policy import Policy
from ringfence.store.base import (
    MOVED_MAX,
    BundlePointer,
    DeltaPointer,
    EngineHead,
    MovedRecord,
    PolicyVersion,
)

from .launchgate import LaunchGate
from .publish import PUBLIC_KEYS_KEY, Notifier
from .wiring import BaseWiring, Metric, log, no_metric

T = TypeVar("T")
R = TypeVar("R")
PUBLISH_THREADS = 8  # concurrent uploads of signed documents

# --- compute --------------------------------------------------------------------------------------


@dataclass
class ComputeStats:
    revision: int = 0
    rebuilt_engine: bool = False
    updates: int = 0
    sets_touched: int = 0
    deltas_published: int = 0
    bundles_published: int = 0
    bundles_refreshed: int = 0
    nudged: int = 0
    bytes_published: int = 0
    lifecycle_completed: list[str] = field(default_factory=list)
    lifecycle_abandoned_to_timeout: list[str] = field(default_factory=list)
    lifecycle_awaiting_agent: list[str] = field(default_factory=list)


class Compute:
    """Inventory changes → engine → signed deltas and bundles in S3 → nudges → lifecycle."""

    def __init__(self, w: BaseWiring, metric: Metric = no_metric, notifier: Notifier | None = None) -> None:
        self.w = w
        self.metric = metric
        self.engine: Engine | None = None
        # workload → expiry of the bundle this container signed last; a cold start rebuilds and
        # re-signs every bundle, so a workload missing here is re-signed by the next refresh
        self.expiry: dict[str, int] = {}
        self._published_key: str | None = None  # the key id whose public key is published
        self.notifier = notifier if notifier is not None else w.default_notifier()
        self.gate = LaunchGate(w, metric)

    def run(self, messages: list[dict[str, Any]]) -> ComputeStats:
        stats = ComputeStats()
        bytes0 = self.w.publisher.bytes_published
        try:
            active = self.w.active_policy()
            if active is None:
                log.warning("no active policy: nothing to compute (provision one with the admin API)")
                self._lifecycles(messages, stats, ok=False)
                return stats
            force = any(m.get("rebuild") for m in messages)
            self._ensure(active, stats, force=force)
            assert self.engine is not None
            ids = list(dict.fromkeys(i for m in messages for i in m.get("ids", [])))
            base = self.engine.revision  # == the stored head (checked by _ensure)
            updates = self._apply(ids)
            stats.updates = len(updates)
            if updates:
                self._reserve(base)  # fails if another container moved the head meanwhile
                moved = self._publish(updates, stats)
                # before the commit: a reader that sees the head at this revision finds the record
                self.w.store.put_moved(
                    MovedRecord(
                        revision=self.engine.revision,
                        previous=base,
                        workloads=sorted(moved) if len(moved) <= MOVED_MAX else None,
                    )
                )
                self._commit()
            # explicit re-render requests (the agent API found a gap it cannot bridge)
            for wid in dict.fromkeys(i for m in messages for i in m.get("publish", [])):
                if wid in self.engine.workloads:
                    self._publish_bundle(wid, stats)
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

    def _ensure(self, active: tuple[PolicyVersion, Policy], stats: ComputeStats, force: bool = False) -> None:
        pv, policy = active
        head = self.w.store.head()
        e = self.engine
        if (
            not force
            and e is not None
            and head.clean
            and e.revision == head.revision
            and e.policy_version == pv.number == head.policy_version
        ):
            return
        log.info("rebuilding engine at head %s (policy v%s)", head.revision, pv.number)
        engine = Engine(policy, policy_version=pv.number, revision=head.revision)
        engine.load(r.effective() for r in self.w.store.all_records() if r.active)
        self.engine = engine
        self._reserve(head.revision)
        for wid in sorted(engine.workloads):
            self._publish_bundle(wid, stats)
        self._commit()
        stats.rebuilt_engine = True

    def _reserve(self, expected: int) -> None:
        assert self.engine is not None
        self.w.store.put_head(
            EngineHead(revision=self.engine.revision, policy_version=self.engine.policy_version, clean=False), expected
        )

    def _commit(self) -> None:
        assert self.engine is not None
        self.w.store.put_head(
            EngineHead(revision=self.engine.revision, policy_version=self.engine.policy_version, clean=True),
            self.engine.revision,
        )

    def _apply(self, ids: list[str]) -> list[Update]:
        assert self.engine is not None
        out = []
        recs = self.w.store.get_many(ids)
        for wid in ids:
            rec = recs.get(wid)
            upd = self.engine.upsert(rec.effective()) if rec is not None and rec.active else self.engine.remove(wid)
            if upd.changed:
                out.append(upd)
        return out

    # publication

    def _signer(self) -> Any:
        """The signing key (only compute signs), its public key published once per key for the
        agent API to name at enrollment."""
        signer = self.w.signer
        if self._published_key != signer.key_id:
            self.w.publisher.put_text(PUBLIC_KEYS_KEY, signer.public_pem().decode())
            self._published_key = signer.key_id
        return signer

    def _refresh(self, stats: ComputeStats) -> None:
        """Re-sign, at the same version, the bundles expiring within ``bundle_refresh_before``
        (the schedule asks; agents fetch a bundle whose expiry is near): a healthy control plane
        never lets an enforced bundle expire."""
        assert self.engine is not None
        soon = time.time() + self.w.cfg.bundle_refresh_before
        for wid in sorted(self.engine.workloads):
            if self.expiry.get(wid, 0) <= soon:
                self._publish_bundle(wid, stats)
                stats.bundles_refreshed += 1
        self.metric("BundlesRefreshed", stats.bundles_refreshed)

    def _publish(self, updates: list[Update], stats: ComputeStats) -> set[str]:
        """Publish one batch; the workloads whose latest version it moved."""
        assert self.engine is not None
        signer = self._signer()
        rebuilt: set[str] = set()
        notify: set[str] = set()
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
        keys = self._in_parallel(self.w.publisher.put_delta, deltas)
        for doc, key in zip(deltas, keys, strict=True):
            self.w.store.put_delta(
                DeltaPointer(set=doc.set, from_version=doc.from_version, to_version=doc.to_version, key=key)
            )
            stats.deltas_published += 1
        for upd in updates:
            rebuilt |= upd.rebuilt
            notify |= upd.notify
        for name in sorted(merged):
            s = self.engine.sets_by_name.get(name)
            if s is not None:
                self.w.store.put_set_head(name, s.version)
        stats.sets_touched += len(merged)
        # Whole bundles only where a workload's own rules changed. Agents whose bundles merely
        # reference a changed set get the signed deltas; the agent API materializes their current
        # bundle on demand from the last full one plus those deltas (see AgentApi.current).
        self._publish_bundles([w for w in sorted(rebuilt) if w in self.engine.workloads], stats)
        for wid in sorted(notify - rebuilt):
            if wid in self.engine.workloads:
                self.notifier.nudge(wid, self.engine.bundle_version(wid))
                stats.nudged += 1
        return notify | rebuilt

    def _publish_bundle(self, wid: str, stats: ComputeStats) -> None:
        self._publish_bundles([wid], stats)

    def _publish_bundles(self, wids: list[str], stats: ComputeStats) -> None:
        """Render and sign in turn (CPU), upload the documents in parallel (I/O), then point each
        workload at its new bundle in order."""
        assert self.engine is not None
        expires_at = int(time.time()) + self.w.cfg.bundle_ttl
        signer = self._signer()
        docs = [
            bundle.sign(bundle.Bundle.model_validate(self.engine.render(wid)), signer, expires_at=expires_at)
            for wid in wids
        ]
        stored = self._in_parallel(self.w.publisher.put_bundle, docs)
        for wid, doc, (key, sha) in zip(wids, docs, stored, strict=True):
            self.expiry[wid] = expires_at
            ptr = BundlePointer(
                workload_id=wid,
                version=doc.version,
                key=key,
                # the stored bytes: a refresh (same version, later expiry) is a new ETag
                etag=f'"{doc.version}-{sha[:16]}"',
                rules_revision=self.engine.workloads[wid].rules_revision,
                sets={n: s.version for n, s in doc.sets.items()},
                published_at=time.time(),  # the not-enforced bound counts from here (control.findings)
            )
            self.w.store.put_bundle_pointer(ptr)
            stats.bundles_published += 1
            self.notifier.nudge(wid, doc.version)

    def _in_parallel(self, fn: Callable[[T], R], items: list[T]) -> list[R]:
        """``fn`` over ``items`` on up to ``PUBLISH_THREADS`` threads (the publisher's S3 client
        is thread-safe; the store's writes stay on this thread), results in order."""
        if len(items) <= 1:
            return [fn(i) for i in items]
        with ThreadPoolExecutor(min(PUBLISH_THREADS, len(items)), thread_name_prefix="publish") as pool:
            return list(pool.map(fn, items))

    # lifecycle hooks

    def _lifecycles(self, messages: list[dict[str, Any]], stats: ComputeStats, ok: bool) -> None:
        for iid in dict.fromkeys(i for m in messages for i in m.get("enforced") or []):
            # the agent API: this instance's agent enforces (lifecycle gate "agent")
            if self.gate.enforced(iid) == "completed":
                stats.lifecycle_completed.append(iid)
        for m in messages:
            lc = m.get("lifecycle")
            if not lc:
                continue
            iid = lc["instance_id"]
            launching = lc["transition"].endswith("LAUNCHING")
            ready = ok and self.engine is not None
            if ready and launching:
                ptr = self.w.store.bundle_pointer(iid)
                ready = iid in self.engine.workloads and ptr is not None  # type: ignore[union-attr]
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
                stats.lifecycle_abandoned_to_timeout.append(iid)
                self.metric("LifecycleLeftToTimeout", 1)
                continue
            if launching and self.w.cfg.lifecycle_gate == "agent":
                # completed only once its agent enforces too (ringfence.control.launchgate)
                outcome = self.gate.handed_on(lc)
                if outcome == "completed":
                    stats.lifecycle_completed.append(iid)
                else:
                    log.info("launch of %s published, perimeter in place: %s", iid, outcome)
                    stats.lifecycle_awaiting_agent.append(iid)
                continue
            try:
                self.w.complete_lifecycle(lc, iid)
                stats.lifecycle_completed.append(iid)
            except Exception as exc:
                log.error(
                    "CompleteLifecycleAction for %s failed (%s): the hook will time out into its default result",
                    iid,
                    exc,
                )
                stats.lifecycle_abandoned_to_timeout.append(iid)


def merge_set_deltas(updates: list[Update]) -> dict[str, tuple[int, int, set[Prefix], set[Prefix]]]:
    """The set deltas of consecutive updates as one per set: name → (from_version, to_version,
    added, removed), the net element edits from the set's version before the first update that
    touched it to the last one's revision (an element added then removed is neither)."""
    out: dict[str, tuple[int, int, set[Prefix], set[Prefix]]] = {}
    for upd in updates:
        for name, (from_v, added, removed) in upd.set_deltas.items():
            first, _, add, rem = out.get(name, (from_v, from_v, set(), set()))
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
