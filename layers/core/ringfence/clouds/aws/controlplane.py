"""The AWS control plane's services: ingest, compute, lifecycle, reconcile, agent API, admin.

Each Lambda handler (``functions/<name>/app.py``) parses its trigger with Powertools and calls
one method here. Everything is wired from :class:`Config` (environment variables), and every
AWS call goes through :mod:`ringfence.clouds.aws.clients`, so tests run the same code against
a moto server.

Compute keeps the engine warm in a module global. The engine's revision counter lives in
DynamoDB (:class:`~ringfence.store.base.EngineHead`): revisions are reserved there *before*
anything is published (write-ahead), so versions stay monotonic and unique across cold starts,
retries and containers. A container whose engine is not exactly at the stored head (a cold
start, a failed publish, another container having moved on) rebuilds from the inventory at a
fresh revision and republishes every bundle.
"""

from __future__ import annotations

import contextlib
import hashlib
import itertools
import json
import logging
import os
import secrets
import time
import uuid
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from typing import Any

from pydantic import ValidationError

from ringfence import agentapi, bundle
from ringfence.addresses import V4, format_prefix, parse_prefix
from ringfence.engine import Engine
from ringfence.engine.compiler import Update
from ringfence.events import DomainEvent, Kind, MalformedEvent, normalize
from ringfence.labels import LabelMapper
from ringfence.model import Mode
from ringfence.policy import Policy, PolicyError, load_policy_texts
from ringfence.policytests import run_tests
from ringfence.store.base import (
    AuditRecord,
    BundlePointer,
    DeltaPointer,
    EngineHead,
    PolicyVersion,
    Store,
)
from ringfence.versions import digest_of

from . import clients, ec2
from .enroll import ProofError, check_sts_request, load_public_key, replay_sts, verify_iid
from .publish import S3Publisher, WebSocketNotifier

log = logging.getLogger("ringfence.aws")

Metric = Callable[[str, float], None]


def _no_metric(name: str, value: float) -> None:
    return None


# --- configuration ------------------------------------------------------------------------------


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
    dlq_url: str = ""
    signing_key_ref: str = ""
    kms_key_id: str | None = None
    iid_cert_pem: str = ""
    websocket_endpoint: str | None = None
    offline_after: int = 900
    token_ttl: int = 7 * 86400
    nonce_ttl: int = 300
    allowed_accounts: list[str] = field(default_factory=list)
    sts_endpoints: list[str] = field(default_factory=list)
    account_roles: dict[str, str] = field(default_factory=dict)
    targets: list[Target] = field(default_factory=list)

    @classmethod
    def from_env(cls, env: dict[str, str] | None = None) -> Config:
        e = dict(os.environ) if env is None else env
        return cls(
            inventory_table=e.get("RINGFENCE_INVENTORY_TABLE", ""),
            state_table=e.get("RINGFENCE_STATE_TABLE", ""),
            audit_table=e.get("RINGFENCE_AUDIT_TABLE", ""),
            bucket=e.get("RINGFENCE_BUCKET", ""),
            compute_queue_url=e.get("RINGFENCE_COMPUTE_QUEUE_URL", ""),
            dlq_url=e.get("RINGFENCE_DLQ_URL", ""),
            signing_key_ref=e.get("RINGFENCE_SIGNING_KEY", ""),
            kms_key_id=e.get("RINGFENCE_KMS_KEY_ID") or None,
            iid_cert_pem=e.get("RINGFENCE_IID_CERT", ""),
            websocket_endpoint=e.get("RINGFENCE_WEBSOCKET_ENDPOINT") or None,
            offline_after=int(e.get("RINGFENCE_OFFLINE_AFTER", "900")),
            token_ttl=int(e.get("RINGFENCE_TOKEN_TTL", str(7 * 86400))),
            nonce_ttl=int(e.get("RINGFENCE_NONCE_TTL", "300")),
            allowed_accounts=[a for a in e.get("RINGFENCE_ALLOWED_ACCOUNTS", "").split(",") if a],
            sts_endpoints=[u for u in e.get("RINGFENCE_STS_ENDPOINTS", "").split(",") if u],
            account_roles=json.loads(e.get("RINGFENCE_ACCOUNT_ROLES", "{}") or "{}"),
            targets=[Target(**t) for t in json.loads(e.get("RINGFENCE_RECONCILE_TARGETS", "[]") or "[]")],
        )


class Wiring:
    """Shared clients and adapters, built once per container."""

    def __init__(self, cfg: Config) -> None:
        from ringfence.store.dynamodb import DynamoStore

        self.cfg = cfg
        self.store: Store = DynamoStore(
            cfg.inventory_table, cfg.state_table, cfg.audit_table, resource=clients.resource("dynamodb")
        )
        self.publisher = S3Publisher(clients.client("s3"), cfg.bucket, cfg.kms_key_id)
        self.sqs = clients.client("sqs")
        self._policies: dict[int, Policy] = {}
        self._signer: Any = None
        self._mapper: tuple[float, LabelMapper | None] | None = None
        # (account, region, instance) → (describe time, instance or None): valid for one batch
        self.prefetched: dict[tuple[str, str, str], tuple[float, dict[str, Any] | None]] = {}

    @property
    def signer(self) -> Any:
        if self._signer is None:
            from .signer import from_reference

            self._signer = from_reference(self.cfg.signing_key_ref, lambda n: clients.client(n))
        return self._signer

    def ec2_for(self, account: str, region: str) -> Any:
        return clients.assumed_client("ec2", region, self.cfg.account_roles.get(account))

    def policy(self, pv: PolicyVersion) -> Policy:
        if pv.version not in self._policies:
            texts = {name: self.publisher.get(key).decode() for name, key in pv.keys.items()}
            self._policies[pv.version] = load_policy_texts(texts)
        return self._policies[pv.version]

    def active_policy(self) -> tuple[PolicyVersion, Policy] | None:
        pv = self.store.active_policy()
        return (pv, self.policy(pv)) if pv is not None else None

    def mapper(self) -> LabelMapper | None:
        """The active policy's tag→label mapping, looked up at most every 30 s (for ingest's
        hygiene view only: compute always resolves labels with the exact policy it compiles)."""
        now = time.monotonic()
        if self._mapper is None or now - self._mapper[0] > 30:
            active = self.active_policy()
            self._mapper = (now, active[1].labels if active else None)
        return self._mapper[1]

    def enqueue_compute(
        self,
        ids: Iterable[str] = (),
        *,
        rebuild: bool = False,
        lifecycle: dict[str, str] | None = None,
        publish: list[str] | None = None,
    ) -> None:
        ids = list(dict.fromkeys(ids))
        if not ids and not rebuild and lifecycle is None and not publish:
            return
        for i in range(0, max(len(ids), 1), 500):
            body = {"ids": ids[i : i + 500], "rebuild": rebuild, "lifecycle": lifecycle, "publish": publish or []}
            self.sqs.send_message(
                QueueUrl=self.cfg.compute_queue_url,
                MessageBody=json.dumps(body),
                MessageGroupId="compute",  # one group: compute is serialized
                MessageDeduplicationId=uuid.uuid4().hex,
            )


# --- ingest ---------------------------------------------------------------------------------------


@dataclass
class IngestResult:
    event_id: str
    kind: str = "ignored"
    changed: list[str] = field(default_factory=list)
    stale: list[str] = field(default_factory=list)


class Ingest:
    def __init__(self, w: Wiring, metric: Metric = _no_metric) -> None:
        self.w = w
        self.metric = metric

    def prefetch(self, raws: list[dict[str, Any]]) -> int:
        """Describe every instance a batch of events names with one call per account/region
        (DescribeInstances is rate-limited: a storm must not cost one call per event).
        Best effort: whatever fails here is described again per event. Returns ids described."""
        self.w.prefetched.clear()
        groups: dict[tuple[str, str], set[str]] = {}
        for raw in raws:
            try:
                ev = normalize(raw)
            except MalformedEvent:
                continue
            if ev is not None:
                groups.setdefault((ev.account, ev.region), set()).update(ev.instance_ids)
        n = 0
        for (account, region), ids in sorted(groups.items()):
            try:
                live = ec2.describe(self.w.ec2_for(account, region), sorted(ids))
            except Exception as exc:
                log.warning("prefetch describe for %s/%s failed (%s): describing per event", account, region, exc)
                continue
            t = ec2.now()
            for i in ids:
                self.w.prefetched[(account, region, i)] = (t, live.get(i))
            n += len(ids)
        return n

    def done(self) -> None:
        self.w.prefetched.clear()

    def handle(self, raw: dict[str, Any]) -> IngestResult:
        ev = normalize(raw)  # MalformedEvent propagates: the handler sends it to the DLQ
        if ev is None:
            self.metric("EventsIgnored", 1)
            return IngestResult(str(raw.get("id", "")))
        return self.apply(ev)

    def apply(self, ev: DomainEvent) -> IngestResult:
        res = IngestResult(ev.event_id, kind=ev.kind.value)
        ids = list(ev.instance_ids)
        if ev.tag_version is not None:
            fresh = []
            for iid in ids:
                rec = self.w.store.get(iid)
                if rec is not None and rec.tag_version is not None and ev.tag_version < rec.tag_version:
                    log.info(
                        "stale tag event %s for %s: version %s < %s", ev.event_id, iid, ev.tag_version, rec.tag_version
                    )
                    res.stale.append(iid)
                    self.metric("StaleEvents", 1)
                else:
                    fresh.append(iid)
            ids = fresh
        if not ids:
            return res
        changed = observe_instances(self.w, ev.account, ev.region, ids, tag_version=ev.tag_version)
        if ev.kind is Kind.LIFECYCLE_TERMINATE:
            changed |= mark_leaving(self.w, ev.account, ev.region, ids)
        res.changed = sorted(changed)
        if changed:
            self.w.enqueue_compute(res.changed)
        self.metric("InventoryChanges", len(changed))
        return res


def observe_instances(
    w: Wiring, account: str, region: str, ids: list[str], *, tag_version: int | None = None
) -> set[str]:
    """Describe the live instances and store what they are now; returns the ids that changed.
    Instances the batch prefetched (:meth:`Ingest.prefetch`) are not described again."""
    seen = {i: w.prefetched[(account, region, i)] for i in ids if (account, region, i) in w.prefetched}
    missing = [i for i in ids if i not in seen]
    if missing:
        live = ec2.describe(w.ec2_for(account, region), missing)
        t0 = ec2.now()
        seen.update({i: (t0, live.get(i)) for i in missing})
    mapper = w.mapper()
    changed: set[str] = set()
    for iid in ids:
        t, inst = seen[iid]
        rec = ec2.to_record(inst, account, region, t, mapper) if inst else ec2.tombstone(iid, account, region, t)
        if tag_version is not None:
            rec.tag_version = tag_version
        if w.store.observe(rec):
            changed.add(iid)
    return changed


def mark_leaving(w: Wiring, account: str, region: str, ids: list[str]) -> set[str]:
    """A terminate lifecycle action: the instance is still running but must leave peers' sets."""
    changed = set()
    t = ec2.now() + 0.001  # after the describe that just ran
    for iid in ids:
        old = w.store.get(iid)
        if old is None or old.state == "terminating":
            continue
        rec = old.model_copy(update={"state": "terminating", "observed_at": t})
        if w.store.observe(rec):
            changed.add(iid)
    return changed


# --- compute --------------------------------------------------------------------------------------


@dataclass
class ComputeStats:
    revision: int = 0
    rebuilt_engine: bool = False
    updates: int = 0
    sets_touched: int = 0
    deltas_published: int = 0
    bundles_published: int = 0
    nudged: int = 0
    bytes_published: int = 0
    lifecycle_completed: list[str] = field(default_factory=list)
    lifecycle_abandoned_to_timeout: list[str] = field(default_factory=list)


class Compute:
    """Inventory changes → engine → signed deltas and bundles in S3 → nudges → lifecycle."""

    def __init__(self, w: Wiring, metric: Metric = _no_metric) -> None:
        self.w = w
        self.metric = metric
        self.engine: Engine | None = None
        ws = None
        if w.cfg.websocket_endpoint:
            ws = clients.session().client(
                "apigatewaymanagementapi", endpoint_url=w.cfg.websocket_endpoint, config=clients.RETRIES
            )
        self.notifier = WebSocketNotifier(ws, w.store)

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
                self._publish(updates, stats)
                self._commit()
            # explicit re-render requests (the agent API found a gap it cannot bridge)
            for wid in dict.fromkeys(i for m in messages for i in m.get("publish", [])):
                if wid in self.engine.workloads:
                    self._publish_bundle(wid, stats)
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
            and e.policy_version == pv.version == head.policy_version
        ):
            return
        log.info("rebuilding engine at head %s (policy v%s)", head.revision, pv.version)
        engine = Engine(policy, policy_version=pv.version, revision=head.revision)
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

    def _publish(self, updates: list[Update], stats: ComputeStats) -> None:
        assert self.engine is not None
        signer = self.w.signer
        touched: set[str] = set()
        rebuilt: set[str] = set()
        notify: set[str] = set()
        for upd in updates:
            for name, (from_v, added, removed) in sorted(upd.set_deltas.items()):
                doc = bundle.sign(
                    bundle.SetDelta(
                        set=name,
                        from_version=from_v,
                        to_version=upd.revision,
                        add=[format_prefix(p) for p in added],
                        remove=[format_prefix(p) for p in removed],
                    ),
                    signer,
                )
                key = self.w.publisher.put_delta(doc)
                self.w.store.put_delta(DeltaPointer(set=name, from_version=from_v, to_version=upd.revision, key=key))
                stats.deltas_published += 1
                touched.add(name)
            rebuilt |= upd.rebuilt
            notify |= upd.notify
        for name in sorted(touched):
            s = self.engine.sets_by_name.get(name)
            if s is not None:
                self.w.store.put_set_head(name, s.version)
        stats.sets_touched += len(touched)
        # Whole bundles only where a workload's own rules changed. Agents whose bundles merely
        # reference a changed set get the signed deltas; the agent API materializes their current
        # bundle on demand from the last full one plus those deltas (see AgentApi.current).
        for wid in sorted(rebuilt):
            if wid in self.engine.workloads:
                self._publish_bundle(wid, stats)
        for wid in sorted(notify - rebuilt):
            if wid in self.engine.workloads:
                self.notifier.nudge(wid, self.engine.bundle_version(wid))
                stats.nudged += 1

    def _publish_bundle(self, wid: str, stats: ComputeStats) -> None:
        assert self.engine is not None
        doc = bundle.sign(bundle.Bundle.model_validate(self.engine.render(wid)), self.w.signer)
        key, _ = self.w.publisher.put_bundle(doc)
        ptr = BundlePointer(
            workload_id=wid,
            version=doc.version,
            key=key,
            etag=f'"{doc.version}"',
            rules_revision=self.engine.workloads[wid].rules_revision,
            sets={n: s.version for n, s in doc.sets.items()},
        )
        self.w.store.put_bundle_pointer(ptr)
        stats.bundles_published += 1
        self.notifier.nudge(wid, doc.version)

    # lifecycle hooks

    def _lifecycles(self, messages: list[dict[str, Any]], stats: ComputeStats, ok: bool) -> None:
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
            try:
                region = lc.get("region")
                ec2.complete_lifecycle(
                    clients.client("autoscaling", region=region),
                    lc["hook_name"],
                    lc["group_name"],
                    lc["token"],
                    iid,
                    "CONTINUE",
                )
                stats.lifecycle_completed.append(iid)
            except Exception as exc:
                log.error(
                    "CompleteLifecycleAction for %s failed (%s): the hook will time out into its default result",
                    iid,
                    exc,
                )
                stats.lifecycle_abandoned_to_timeout.append(iid)


# --- lifecycle --------------------------------------------------------------------------------------


class Lifecycle:
    """ASG lifecycle actions: update the inventory now, let compute publish, then complete."""

    def __init__(self, w: Wiring) -> None:
        self.w = w

    def handle(self, raw: dict[str, Any]) -> dict[str, Any]:
        ev = normalize(raw)
        if ev is None or ev.lifecycle is None:
            raise MalformedEvent(f"not a lifecycle action event: {raw.get('detail-type')!r}")
        ids = list(ev.instance_ids)
        changed = observe_instances(self.w, ev.account, ev.region, ids)
        if ev.kind is Kind.LIFECYCLE_TERMINATE:
            changed |= mark_leaving(self.w, ev.account, ev.region, ids)
        lc = ev.lifecycle.model_dump()
        lc["hook_name"], lc["group_name"] = ev.lifecycle.hook_name, ev.lifecycle.group_name
        lc["region"] = ev.region
        self.w.enqueue_compute(sorted(changed) or ids, lifecycle=lc)
        return {"instance": ev.lifecycle.instance_id, "transition": ev.lifecycle.transition}


# --- reconcile --------------------------------------------------------------------------------------


@dataclass
class ReconcileResult:
    seen: int = 0
    changed: list[str] = field(default_factory=list)
    gone: list[str] = field(default_factory=list)
    offline: list[str] = field(default_factory=list)


class Reconcile:
    def __init__(self, w: Wiring, metric: Metric = _no_metric) -> None:
        self.w = w
        self.metric = metric

    def run(self, now: float | None = None) -> ReconcileResult:
        res = ReconcileResult()
        mapper = self.w.mapper()
        records = {r.id: r for r in self.w.store.all_records()}
        changed: set[str] = set()
        for t in self.w.cfg.targets:
            client = clients.assumed_client("ec2", t.region, t.role_arn, "ringfence-reconcile")
            t0 = ec2.now()
            live_ids = set()
            for inst in ec2.all_instances(client):
                res.seen += 1
                live_ids.add(inst["InstanceId"])
                if self.w.store.observe(ec2.to_record(inst, t.account, t.region, t0, mapper)):
                    changed.add(inst["InstanceId"])
            for rec in records.values():
                w = rec.workload
                mine = w.cloud == "aws" and w.account == t.account and w.region == t.region
                if (
                    mine
                    and rec.id not in live_ids
                    and rec.state != "terminated"
                    and self.w.store.observe(ec2.tombstone(rec.id, t.account, t.region, t0))
                ):
                    changed.add(rec.id)
                    res.gone.append(rec.id)
        # agents silent for longer than offline_after leave their peers' sets (only then)
        now = ec2.now() if now is None else now
        for rec in records.values():
            silent = rec.last_heartbeat is not None and now - rec.last_heartbeat > self.w.cfg.offline_after
            if rec.enrolled and silent and not rec.offline:
                self.w.store.set_liveness(rec.id, offline=True)
                res.offline.append(rec.id)
                changed.add(rec.id)
        res.changed = sorted(changed)
        self.w.enqueue_compute(res.changed)
        self.metric("ReconcileDrift", len(res.changed))
        return res


# --- agent API --------------------------------------------------------------------------------------


@dataclass
class Response:
    status: int
    body: Any = None
    headers: dict[str, str] = field(default_factory=dict)


def _err(status: int, error: str, detail: str = "") -> Response:
    return Response(status, agentapi.ErrorBody(error=error, detail=detail).model_dump())


def _hash(secret: str) -> str:
    return hashlib.sha256(secret.encode()).hexdigest()


class AgentApi:
    def __init__(self, w: Wiring) -> None:
        self.w = w
        self._iid_key: Any = None
        # immutable, content-addressed documents: safe to keep while the container is warm
        self._deltas: dict[str, bundle.SetDelta] = {}
        self._sets: dict[tuple[str, int], bundle.AddressSetDoc] = {}

    def nonce(self) -> Response:
        n = secrets.token_urlsafe(24)
        self.w.store.put_nonce(n, self.w.cfg.nonce_ttl)
        return Response(200, agentapi.NonceResponse(nonce=n, expires_in=self.w.cfg.nonce_ttl).model_dump())

    def enroll(self, body: str | None) -> Response:
        try:
            req = agentapi.EnrollRequest.model_validate_json(body or "")
        except ValidationError as exc:
            return _err(400, "malformed enroll request", _first(exc))
        try:
            if req.method == "aws-iid":
                wid = self._enroll_iid(req)
            elif req.method == "pairing":
                wid = self._enroll_pairing(req)
            elif req.method == "aws-sts":
                wid = self._enroll_sts(req)
            else:
                return _err(400, "unsupported enrollment method", f"{req.method} is not enabled on this control plane")
        except ProofError as exc:
            log.warning("enrollment refused: %s", exc)
            return _err(401, "enrollment refused", str(exc))
        token = secrets.token_urlsafe(32)
        self.w.store.put_token(_hash(token), wid, self.w.cfg.token_ttl)
        with contextlib.suppress(KeyError):
            self.w.store.set_liveness(wid, enrolled=True, heartbeat=ec2.now(), offline=False)
        return Response(
            200,
            agentapi.EnrollResponse(
                workload_id=wid,
                token=token,
                expires_in=self.w.cfg.token_ttl,
                public_key_pem=self.w.signer.public_pem().decode(),
            ).model_dump(),
        )

    def _enroll_iid(self, req: agentapi.EnrollRequest) -> str:
        if not req.document or not req.document_signature:
            raise ProofError("aws-iid needs document and document_signature")
        if self._iid_key is None:
            self._iid_key = load_public_key(self.w.cfg.iid_cert_pem.encode())
        ident = verify_iid(req.document, req.document_signature, self._iid_key)
        if self.w.cfg.allowed_accounts and ident.account not in self.w.cfg.allowed_accounts:
            raise ProofError(f"account {ident.account} is not enrolled with this control plane")
        if not self.w.store.burn_nonce(req.nonce):
            raise ProofError("nonce is unknown, expired or already used")
        if not self.w.store.claim_once(f"iid#{ident.instance_id}#{ident.pending_time}", self.w.cfg.token_ttl * 4):
            raise ProofError(f"identity document of {ident.instance_id} was already used (replay refused)")
        live = ec2.describe(self.w.ec2_for(ident.account, ident.region), [ident.instance_id]).get(ident.instance_id)
        if live is None or live.get("State", {}).get("Name") not in ("pending", "running"):
            raise ProofError(f"instance {ident.instance_id} is not running")
        if ident.private_ip and ident.private_ip not in ec2.instance_ips(live):
            raise ProofError(f"instance {ident.instance_id} does not have the document's address")
        if self.w.store.get(ident.instance_id) is None:
            observe_instances(self.w, ident.account, ident.region, [ident.instance_id])
            self.w.enqueue_compute([ident.instance_id])
        return ident.instance_id

    def _enroll_sts(self, req: agentapi.EnrollRequest) -> str:
        if not req.sts_url or not req.sts_headers:
            raise ProofError("aws-sts needs sts_url and sts_headers")
        check_sts_request(req.sts_url, req.sts_headers, req.nonce, self.w.cfg.sts_endpoints)
        if not self.w.store.burn_nonce(req.nonce):
            raise ProofError("nonce is unknown, expired or already used")
        ident = replay_sts(req.sts_url, req.sts_headers)
        if self.w.cfg.allowed_accounts and ident.account not in self.w.cfg.allowed_accounts:
            raise ProofError(f"account {ident.account} is not enrolled with this control plane")
        rec = self.w.store.get(ident.instance_id)
        if rec is None or rec.workload.account != ident.account or not rec.active:
            raise ProofError(f"{ident.instance_id} is not a running instance of account {ident.account} in inventory")
        return ident.instance_id

    def _enroll_pairing(self, req: agentapi.EnrollRequest) -> str:
        if not req.pairing_key or not req.workload_id:
            raise ProofError("pairing needs pairing_key and workload_id")
        if not self.w.store.burn_nonce(req.nonce):
            raise ProofError("nonce is unknown, expired or already used")
        if not self.w.store.use_pairing(_hash(req.pairing_key)):
            raise ProofError("pairing key is unknown, expired or used up")
        return req.workload_id

    def authorize(self, authorization: str | None, workload_id: str) -> Response | None:
        if not authorization or not authorization.startswith("Bearer "):
            return _err(401, "missing bearer token")
        owner = self.w.store.token_workload(_hash(authorization.removeprefix("Bearer ").strip()))
        if owner is None:
            return _err(401, "unknown or expired token")
        if owner != workload_id:
            log.warning("agent %s asked for workload %s: refused", owner, workload_id)
            return _err(403, "forbidden", "an agent reads only its own bundle")
        return None

    def _latest(self, ptr: BundlePointer) -> tuple[int, dict[str, int]]:
        """The workload's newest version and set versions: the stored bundle's, moved on by set heads."""
        heads = self.w.store.set_heads(list(ptr.sets))
        sets = {n: max(v, heads.get(n, v)) for n, v in ptr.sets.items()}
        return max([ptr.version, ptr.rules_revision, *sets.values()]), sets

    def _chain(self, set_name: str, from_version: int, to_version: int) -> list[DeltaPointer] | None:
        chain = [d for d in self.w.store.deltas_after(set_name, from_version) if d.to_version <= to_version]
        if not chain or chain[-1].to_version != to_version or chain[0].from_version > from_version:
            return None
        if any(a.to_version != b.from_version for a, b in itertools.pairwise(chain)):
            return None
        return chain

    def _advance(self, name: str, sdoc: bundle.AddressSetDoc, chain: list[DeltaPointer]) -> bundle.AddressSetDoc:
        """A set moved along its delta chain. A set's content at a version is the same in every
        bundle (the engine's set at that revision), so results are cached per (set, version)."""
        target = chain[-1].to_version
        hit = self._sets.get((name, target))
        if hit is not None:
            return hit
        elems = set(sdoc.v4) | set(sdoc.v6)
        for d in chain:
            delta = self._deltas.get(d.key)
            if delta is None:
                delta = self._deltas[d.key] = bundle.load_delta(self.w.publisher.get(d.key))
            elems = (elems - set(delta.remove)) | set(delta.add)
        ordered = sorted(parse_prefix(e) for e in elems)
        out = bundle.AddressSetDoc(
            version=target,
            v4=[format_prefix(p) for p in ordered if p[0] == V4],
            v6=[format_prefix(p) for p in ordered if p[0] != V4],
        )
        if len(self._sets) > 4096:
            self._sets.clear()
        if len(self._deltas) > 16384:
            self._deltas.clear()
        self._sets[(name, target)] = out
        return out

    def current(self, workload_id: str) -> tuple[BundlePointer, dict[str, Any]] | Response:
        """The workload's current signed bundle: the last full one, with the set deltas published
        since then applied (exact: deltas are element edits of canonical covers), re-signed and
        written back content-addressed so the next fetch is a plain read."""
        ptr = self.w.store.bundle_pointer(workload_id)
        if ptr is None:
            return _err(404, "no bundle published for this workload yet")
        version, sets = self._latest(ptr)
        stored = bundle.load_bundle(self.w.publisher.get(ptr.key))
        if version == ptr.version:
            return ptr, stored.model_dump(mode="json")
        new_sets = {}
        for name, sdoc in stored.sets.items():
            target = sets[name]
            if target == sdoc.version:
                new_sets[name] = sdoc
                continue
            chain = self._chain(name, sdoc.version, target)
            if chain is None:
                log.warning(
                    "bundle of %s: deltas of %s do not bridge %s→%s; re-rendering",
                    workload_id,
                    name,
                    sdoc.version,
                    target,
                )
                self.w.enqueue_compute(publish=[workload_id])
                return Response(
                    503, {"error": "bundle is being re-rendered", "detail": "retry shortly"}, {"Retry-After": "5"}
                )
            new_sets[name] = self._advance(name, sdoc, chain)
        doc = bundle.sign(
            stored.model_copy(update={"sets": new_sets, "version": version, "signature": None}), self.w.signer
        )
        key, _ = self.w.publisher.put_bundle(doc)
        new_ptr = ptr.model_copy(update={"version": version, "key": key, "etag": f'"{version}"', "sets": sets})
        if not self.w.store.put_bundle_pointer(new_ptr, expected_version=ptr.version):
            # compute published a newer whole bundle meanwhile (its rules may differ): serve that
            return self.current(workload_id)
        return new_ptr, doc.model_dump(mode="json")

    def bundle(self, workload_id: str, if_none_match: str | None) -> Response:
        ptr = self.w.store.bundle_pointer(workload_id)
        if ptr is None:
            return _err(404, "no bundle published for this workload yet")
        etag = f'"{self._latest(ptr)[0]}"'
        if if_none_match and if_none_match.strip() == etag:
            return Response(304, None, {"ETag": etag})
        cur = self.current(workload_id)
        if isinstance(cur, Response):
            return cur
        ptr, doc = cur
        return Response(200, doc, {"ETag": ptr.etag})

    def deltas(self, workload_id: str, since: int) -> Response:
        ptr = self.w.store.bundle_pointer(workload_id)
        if ptr is None:
            return _err(404, "no bundle published for this workload yet")
        version, sets = self._latest(ptr)
        if since >= version:
            return Response(200, agentapi.DeltasResponse(bundle_version=version, deltas=[]).model_dump())
        if ptr.rules_revision > since:
            return _err(409, "deltas cannot bridge", "rules changed since that revision: fetch the bundle")
        chosen: list[DeltaPointer] = []
        for name, v in sets.items():
            if v <= since:
                continue
            chain = self._chain(name, since, v)
            if chain is None:
                return _err(409, "deltas cannot bridge", f"set {name}: fetch the bundle")
            chosen.extend(chain)
        chosen.sort(key=lambda d: (d.to_version, d.set))
        docs = [json.loads(self.w.publisher.get(d.key)) for d in chosen]
        return Response(200, agentapi.DeltasResponse(bundle_version=version, deltas=docs).model_dump())

    def heartbeat(self, workload_id: str, body: str | None) -> Response:
        try:
            agentapi.Heartbeat.model_validate_json(body or "")
        except ValidationError as exc:
            return _err(400, "malformed heartbeat", _first(exc))
        rec = self.w.store.get(workload_id)
        if rec is None:
            return _err(404, "unknown workload")
        self.w.store.set_liveness(workload_id, heartbeat=ec2.now(), offline=False if rec.offline else None)
        if rec.offline:
            log.info("agent %s is back online: rejoining peers' sets", workload_id)
            self.w.enqueue_compute([workload_id])
        ptr = self.w.store.bundle_pointer(workload_id)
        return Response(200, agentapi.HeartbeatResponse(latest_version=ptr.version if ptr else None).model_dump())

    def reports(self, workload_id: str, body: str | None) -> Response:
        raw = (body or "").encode()
        if len(raw) > agentapi.MAX_REPORT_BYTES:
            return _err(413, "report too large", f"{len(raw)} bytes > {agentapi.MAX_REPORT_BYTES}")
        try:
            batch = agentapi.ReportBatch.model_validate_json(raw)
        except ValidationError as exc:
            return _err(400, "malformed report", _first(exc))
        key = f"reports/{workload_id}/{time.strftime('%Y/%m/%d', time.gmtime())}/{uuid.uuid4().hex}.json"
        self.w.publisher.put_json(key, batch.model_dump(mode="json"))
        return Response(202, {"accepted": len(batch.flows) + len(batch.drops)})

    # WebSocket nudge channel

    def connect(self, token: str | None, connection_id: str) -> Response:
        owner = self.w.store.token_workload(_hash(token)) if token else None
        if owner is None:
            return _err(401, "unknown or expired token")
        self.w.store.put_connection(owner, connection_id)
        return Response(200, {"workload_id": owner})


# --- admin API --------------------------------------------------------------------------------------


class Admin:
    """Operator actions; each is recorded in the append-only audit table with the IAM principal."""

    def __init__(self, w: Wiring) -> None:
        self.w = w

    def _audit(self, principal: str, action: str, target: str, detail: dict[str, Any], reason: str) -> str:
        rec = AuditRecord(principal=principal, action=action, target=target, detail=detail, reason=reason)
        self.w.store.audit(rec)
        return rec.id

    def provision(self, principal: str, files: dict[str, str], reason: str = "") -> Response:
        if not files:
            return _err(400, "no policy files")
        try:
            policy = load_policy_texts(files)
        except PolicyError as exc:
            return _err(400, "policy rejected", str(exc))
        # the policy's own tests must pass against the live inventory before it becomes active
        engine = Engine(policy)
        engine.load(r.effective() for r in self.w.store.all_records() if r.active)
        failures = [t.report() for t in run_tests(policy, engine.workloads) if not t.passed]
        if failures:
            return _err(422, "policy tests fail", "\n".join(failures))
        digest = digest_of(files)
        version = self.w.store.next_policy_version()
        keys = {}
        for name, text in sorted(files.items()):
            key = f"policies/v{version:06d}/{name}"
            self.w.publisher.s3.put_object(
                Bucket=self.w.cfg.bucket, Key=key, Body=text.encode(), ServerSideEncryption="AES256"
            )
            keys[name] = key
        pv = PolicyVersion(version=version, keys=keys, digest=digest, created_by=principal, comment=reason)
        self.w.store.activate_policy(pv)
        audit_id = self._audit(principal, "policy.provision", f"policy/v{version}", {"digest": digest}, reason)
        self.w.enqueue_compute(rebuild=True)
        return Response(201, {"version": version, "digest": digest, "audit_id": audit_id})

    def set_mode(self, principal: str, workload_id: str, mode: str | None, reason: str = "") -> Response:
        try:
            m = Mode(mode) if mode else None
        except ValueError:
            return _err(400, "bad mode", f"{mode!r} is not one of idle, observe, enforce")
        try:
            self.w.store.set_operator(workload_id, mode=m)
        except KeyError:
            return _err(404, "unknown workload", workload_id)
        audit_id = self._audit(principal, "workload.mode", workload_id, {"mode": mode}, reason)
        self.w.enqueue_compute([workload_id])
        return Response(200, {"workload_id": workload_id, "mode": mode, "audit_id": audit_id})

    def quarantine(self, principal: str, workload_id: str, on: bool, reason: str = "") -> Response:
        try:
            self.w.store.set_operator(workload_id, quarantined=on)
        except KeyError:
            return _err(404, "unknown workload", workload_id)
        action = "workload.quarantine" if on else "workload.release"
        audit_id = self._audit(principal, action, workload_id, {"quarantined": on}, reason)
        self.w.enqueue_compute([workload_id])
        return Response(200, {"workload_id": workload_id, "quarantined": on, "audit_id": audit_id})

    def pairing_key(self, principal: str, workload_id: str | None, uses: int, ttl: int, reason: str = "") -> Response:
        if uses < 1 or ttl < 60:
            return _err(400, "bad pairing key request", "uses ≥ 1 and ttl ≥ 60 seconds")
        key = secrets.token_urlsafe(24)
        self.w.store.put_pairing(_hash(key), workload_id, uses, ttl)
        audit_id = self._audit(
            principal,
            "pairing.create",
            workload_id or "*",
            {"uses": uses, "ttl": ttl, "key_sha256": _hash(key)},
            reason,
        )
        return Response(201, {"pairing_key": key, "uses": uses, "expires_in": ttl, "audit_id": audit_id})


def _first(exc: ValidationError) -> str:
    e = exc.errors()[0]
    return f"{'.'.join(str(p) for p in e['loc']) or '<body>'}: {e['msg']}"


# --- perimeter --------------------------------------------------------------------------------------


class Perimeter:
    """Coarse security groups per VPC and env, from the inventory's labels (see ringfence.perimeter)."""

    def __init__(self, w: Wiring, config: Any, metric: Metric = _no_metric) -> None:
        self.w = w
        self.config = config
        self.metric = metric

    def run(self, dry_run: bool = False) -> list[dict[str, Any]]:
        from ringfence.perimeter import Member, QuotaExceeded

        from .sg import SecurityGroupPerimeter

        by_place: dict[tuple[str, str], list[Member]] = {}
        for rec in self.w.store.all_records():
            w = rec.workload
            if not rec.active or w.cloud != "aws" or not w.vpc or not w.account or not w.region:
                continue
            labels = rec.labels
            by_place.setdefault((w.account, w.region), []).append(Member(rec.id, w.vpc, labels))
        out: list[dict[str, Any]] = []
        for (account, region), members in sorted(by_place.items()):
            sgp = SecurityGroupPerimeter(self.w.ec2_for(account, region))
            try:
                res = sgp.reconcile(self.config, members, dry_run=dry_run)
                out.append({"account": account, "region": region, "applied": res.applied, "plan": res.plan})
            except QuotaExceeded as exc:
                self.metric("PerimeterOverQuota", 1)
                out.append({"account": account, "region": region, "applied": False, "violations": exc.violations})
        return out
