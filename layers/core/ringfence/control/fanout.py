"""Publishing fanned out: compute (one ordered writer of the engine's state) hands the bundles it
rendered and the nudges it owes to publish workers, which sign, store, point and nudge in
parallel.

A :class:`PublishJob` carries, per workload, the unsigned bundle compute rendered (or the key of
a staged copy in the bucket when it is too big for a queue message), and the agents to nudge
whose sets moved. :class:`PublishWorker` runs a batch of jobs: signs each bundle (the signing
key: compute and the publish function only), stores it under its content-addressed key, moves
the workload's pointer — never backwards: a later version already pointed at wins, and the older
document is left unpointed and unannounced — then nudges, and finally counts the publication on
the engine head (``Store.bump_published``) so that the agent API's long-polls for these
workloads wake (:class:`ringfence.control.changes.MovedSince`).

Compute marks each bundle's version as pending on its workload's pointer before it hands the job
on and before any set head moves (``Store.mark_bundle_pending``); the pointer write here keeps
that mark. Until a pointer reaches it, the agent API serves the workload no set delta at or past
it, and a rebuild does not adopt the older pointer.

A staged copy is signed only if it is the very bytes compute staged: the job carries their
SHA-256 (``BundleJob.staged_sha256``, written by compute as it stages them), and a body whose hash
differs, or that is not the job's workload, version and rules digest, is refused
(:class:`StagedBundleRefused`): never signed, counted (``StagedBundlesRefused``), logged naming
the key and the workload, and the job fails (retried, then the publish DLQ) after the message's
other bundles are published. Whoever may write the bucket can thus delay a workload's bundle, not
choose it: its pointer stays on its previous good bundle (a new workload has none yet: its agent
gets 404 meanwhile), and once the pending mark is ``PENDING_STALE_S`` old the agent's heartbeat
has the agent API ask compute to render it again (a fresh staged copy, a fresh hash), a first
bundle too (the mark read alone, ``Store.bundle_pending``); not for a workload no longer active
(terminating: compute renders it no more). A job queued before the field existed
(``staged_sha256`` None) is refused alike: never signed blindly, and the same stale-mark
re-render replaces it.

Jobs run in-process (:meth:`PublishWorker.run`, on one machine and for launches whose lifecycle
hook waits) or go through the publish queue to the ``publish`` function (AWS: ``send_publish``).
"""

from __future__ import annotations

import hashlib
import hmac
import json
import time
from collections.abc import Callable, Iterable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any, TypeVar

from pydantic import BaseModel, Field

from ringfence import bundle
from ringfence.store.base import BundlePointer

from .publish import PUBLIC_KEYS_KEY, Notifier
from .wiring import BaseWiring, Metric, log, no_metric

T = TypeVar("T")
R = TypeVar("R")
PUBLISH_THREADS = 8  # concurrent uploads of signed documents
MESSAGE_BUDGET = 200_000  # bytes of JSON per queue message (SQS takes 256 KiB)
NUDGES_PER_MESSAGE = 2000
STAGED_PREFIX = "staging/"  # unsigned bundles too big for a message; the worker deletes them


class StagedBundleRefused(Exception):
    """A job's bundle is not what compute rendered for it (a staged copy replaced in the bucket, a
    job from before staged copies were hashed): the worker does not sign it."""


class BundleJob(BaseModel):
    workload_id: str
    bundle: dict[str, Any] | None = Field(None, description="the unsigned bundle as the engine rendered it")
    staged: str | None = Field(None, description="or the key of its JSON in the bucket (too big for a message)")
    staged_sha256: str | None = Field(
        None,
        description="SHA-256 (hex) of the staged copy's exact bytes, set by compute as it stages them: the"
        " worker signs those bytes only (a job without it is refused)",
    )
    digest: str = Field(description="rules_digest of the bundle (a cold start adopts what matches)")
    rules_revision: int
    version: int | None = Field(
        None, description="the bundle's version (a job whose staged copy is gone is done once it is pointed at)"
    )


class PublishJob(BaseModel):
    """One message of the publish queue."""

    revision: int = Field(description="the engine revision compute was at (for logs and ordering checks)")
    bundles: list[BundleJob] = Field(default_factory=list)
    nudges: list[tuple[str, int]] = Field(default_factory=list, description="(workload, latest version)")


@dataclass
class PublishStats:
    bundles_published: int = 0
    superseded: int = 0  # a newer version was pointed at already: this one is not announced
    nudged: int = 0
    bytes_published: int = 0


def rules_digest(doc: dict[str, Any]) -> str:
    """What a bundle says apart from its versions and its sets' contents (those are the set
    heads'): two renders with the same digest over sets of the same contents are the same bundle."""
    body = {k: v for k, v in doc.items() if k not in ("version", "sets", "signature", "expires_at", "signed_at")}
    body["sets"] = sorted(doc.get("sets") or {})
    return hashlib.sha256(json.dumps(body, sort_keys=True, separators=(",", ":")).encode()).hexdigest()


def set_digest(v4: Iterable[str], v6: Iterable[str]) -> str:
    """A set's content, hashed (its canonical cover, as the engine renders it)."""
    h = hashlib.sha256()
    for p in v4:
        h.update(p.encode() + b"\n")
    h.update(b"--\n")
    for p in v6:
        h.update(p.encode() + b"\n")
    return h.hexdigest()


def pack(bundles: list[BundleJob], nudges: list[tuple[str, int]], revision: int) -> list[PublishJob]:
    """Jobs of at most ``MESSAGE_BUDGET`` bytes of bundles and ``NUDGES_PER_MESSAGE`` nudges each
    (a bundle over the budget alone must be staged by the caller first)."""
    out: list[PublishJob] = []
    cur: list[BundleJob] = []
    size = 0
    for job in bundles:
        n = len(job.model_dump_json())
        if cur and size + n > MESSAGE_BUDGET:
            out.append(PublishJob(revision=revision, bundles=cur))
            cur, size = [], 0
        cur.append(job)
        size += n
    if cur:
        out.append(PublishJob(revision=revision, bundles=cur))
    for i in range(0, len(nudges), NUDGES_PER_MESSAGE):
        out.append(PublishJob(revision=revision, nudges=nudges[i : i + NUDGES_PER_MESSAGE]))
    return out


class PublishWorker:
    """Sign, store, point, nudge (see the module doc). Stateless but for the published key id,
    so any number run in parallel."""

    def __init__(self, w: BaseWiring, metric: Metric = no_metric, notifier: Notifier | None = None) -> None:
        self.w = w
        self.metric = metric
        self.notifier = notifier if notifier is not None else w.default_notifier()
        self._published_key: str | None = None

    def signer(self) -> Any:
        """The signing key, its public key published once per key for the agent API to name."""
        signer = self.w.signer
        if self._published_key != signer.key_id:
            self.w.publisher.put_text(PUBLIC_KEYS_KEY, signer.public_pem().decode())
            self._published_key = signer.key_id
        return signer

    def run(self, jobs: list[PublishJob], *, signal: bool = True) -> tuple[PublishStats, dict[str, int]]:
        """Publish these jobs; the stats and each pointed-at workload's bundle expiry.
        ``signal``: count the publication on the engine head (the queued path; in-process callers
        that commit the head themselves afterwards need not)."""
        stats = PublishStats()
        bytes0 = self.w.publisher.bytes_published
        expiry: dict[str, int] = {}
        moved: list[str] = []
        wanted = [b for j in jobs for b in j.bundles]
        # a staged copy gone with its version pointed at: the job was done by a run that deleted
        # the copy (a redelivery, a batch retried job by job); counted again below, since that
        # run may have failed before its count woke the long-polls
        found: list[tuple[BundleJob, dict[str, Any] | None]] = []
        refused: list[BundleJob] = []
        for b in wanted:
            try:
                found.append((b, self._doc(b)))
            except StagedBundleRefused as exc:
                # never signed; the message's other bundles are published, then the job fails
                log.error("bundle of %s refused (staged at %s), not signed: %s", b.workload_id, b.staged, exc)
                refused.append(b)
        for b, body in found:
            if body is None:
                moved.append(b.workload_id)
        wanted = [b for b, body in found if body is not None]
        if wanted:
            signer = self.signer()
            expires_at = int(time.time()) + self.w.cfg.bundle_ttl
            docs = [
                bundle.sign(bundle.Bundle.model_validate(body), signer, expires_at=expires_at)
                for _, body in found
                if body is not None
            ]
            stored = in_parallel(self.w.publisher.put_bundle, docs)
            pointers = [
                BundlePointer(
                    workload_id=job.workload_id,
                    version=doc.version,
                    key=key,
                    # the stored bytes: a refresh (same version, later expiry) is a new ETag
                    etag=f'"{doc.version}-{sha[:16]}"',
                    rules_revision=job.rules_revision,
                    sets={n: s.version for n, s in doc.sets.items()},
                    digest=job.digest,
                    expires_at=expires_at,
                    key_id=doc.signature.key_id if doc.signature else None,
                    published_at=time.time(),  # the not-enforced bound counts from here (control.findings)
                )
                for job, doc, (key, sha) in zip(wanted, docs, stored, strict=True)
            ]
            # never backwards: a worker that took a later job first keeps its pointer. Each
            # pointer is its workload's own item: written side by side (a scale-out's job of
            # twenty bundles was twenty round trips one after another before any agent heard)
            for ptr, pointed in zip(pointers, in_parallel(self.w.store.put_bundle_pointer, pointers), strict=True):
                if not pointed:
                    log.info("bundle v%s of %s superseded by a newer one: not announced", ptr.version, ptr.workload_id)
                    stats.superseded += 1
                    continue
                expiry[ptr.workload_id] = expires_at
                stats.bundles_published += 1
                moved.append(ptr.workload_id)
                self.notifier.nudge(ptr.workload_id, ptr.version)
                stats.nudged += 1
        for j in jobs:
            for wid, version in j.nudges:
                self.notifier.nudge(wid, version)
                stats.nudged += 1
        if signal and moved:
            self.w.store.bump_published(moved)
        # last: a staged copy goes once its job is done and counted (a copy left behind is
        # harmless; a job whose copy went before it was done could never be done)
        for job in wanted:
            if job.staged and not any(job is r for r in refused):
                try:
                    self.w.publisher.delete(job.staged)
                except Exception as exc:
                    log.warning("staged bundle %s not deleted: %s", job.staged, exc)
        stats.bytes_published = self.w.publisher.bytes_published - bytes0
        self.metric("BundlesPublished", stats.bundles_published)
        self.metric("BundlesSuperseded", stats.superseded)
        self.metric("Nudged", stats.nudged)
        if refused:
            # the staged copy stays (evidence: the bucket's access log names its writer); the
            # workload keeps its pointer, and its stale pending mark has it rendered again
            self.metric("StagedBundlesRefused", len(refused))
            raise StagedBundleRefused(
                "not signed: " + ", ".join(f"{b.workload_id} ({b.staged or 'inline'})" for b in refused)
            )
        return stats, expiry

    def _doc(self, job: BundleJob) -> dict[str, Any] | None:
        """The job's unsigned bundle; None when its staged copy is gone and the workload's
        pointer is at its version or past it (the job is done). :class:`StagedBundleRefused` when
        a staged copy is not the bytes compute staged, or a bundle is not the job's."""
        if job.bundle is not None:
            return self._checked(job, job.bundle)
        if not job.staged or not job.staged.startswith(STAGED_PREFIX):
            raise ValueError(
                f"publish job for {job.workload_id}: neither a bundle nor a staged key under {STAGED_PREFIX}"
            )
        try:
            raw = self.w.publisher.get(job.staged)
        except Exception:
            ptr = self.w.store.bundle_pointer(job.workload_id) if job.version is not None else None
            if ptr is None or job.version is None or ptr.version < job.version:
                raise  # not done: redelivered until it is (or the DLQ)
            log.info("staged bundle v%s of %s gone, pointer at v%s: done", job.version, job.workload_id, ptr.version)
            return None
        if job.staged_sha256 is None:
            raise StagedBundleRefused(
                "the job names no SHA-256 of the staged bytes (queued before they were hashed): "
                "its workload is rendered again once its pending mark is stale"
            )
        got = hashlib.sha256(raw).hexdigest()
        if not hmac.compare_digest(got, job.staged_sha256.lower()):
            raise StagedBundleRefused(f"staged bytes hash {got}, the job says {job.staged_sha256}: replaced")
        doc = json.loads(raw)
        if not isinstance(doc, dict):
            raise StagedBundleRefused("the staged copy is not a bundle object")
        return self._checked(job, doc)

    @staticmethod
    def _checked(job: BundleJob, doc: dict[str, Any]) -> dict[str, Any]:
        """``doc`` if it is the job's bundle: its workload, its version and its rules digest."""
        if doc.get("workload_id") != job.workload_id:
            raise StagedBundleRefused(f"the bundle is of workload {doc.get('workload_id')!r}")
        if job.version is not None and doc.get("version") != job.version:
            raise StagedBundleRefused(f"the bundle is version {doc.get('version')!r}, the job's is {job.version}")
        if rules_digest(doc) != job.digest:
            raise StagedBundleRefused("the bundle's rules digest is not the job's")
        return doc


def in_parallel(fn: Callable[[T], R], items: list[T]) -> list[R]:
    """``fn`` over ``items`` on up to ``PUBLISH_THREADS`` threads, results in order (the S3
    and DynamoDB clients are thread-safe; the SQLite store opens a connection per thread)."""
    if len(items) <= 1:
        return [fn(i) for i in items]
    with ThreadPoolExecutor(min(PUBLISH_THREADS, len(items)), thread_name_prefix="publish") as pool:
        return list(pool.map(fn, items))
