"""GCP ingest: authenticated audit-log events → the VM described again → governed inventory.

As on AWS, an event is a trigger: the VM is read live (``instances.get`` and its effective secure
tags) and the newest observation wins. What an event adds is *who* made the change and what the
call set, which decide a move into a privileged label value (:mod:`ringfence.governance`, the
same as AWS): the principal is ``protoPayload.authenticationInfo.principalEmail``.

Long-running operations log a first entry (with the request) and a last one (done): the first is
remembered by operation id, the last acts. When the first was never seen by this process (another
function instance took it), the change is unattributed: a privileged move is held, never approved.
"""

from __future__ import annotations

import logging
import threading
from collections import OrderedDict
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any

from ringfence.events import MalformedEvent
from ringfence.governance import TagChange
from ringfence.labels import LabelMapper
from ringfence.store.base import InventoryRecord

from ..aws import credentials
from ..aws.governance import govern_record
from ..aws.wiring import BaseWiring, Metric, no_metric
from .auditlog import Action, GcpEvent, log_entry, parse
from .config import GcpConfig
from .instances import DEFAULT_PREFIX, SOURCE_TAG, Instances, LabelSource, SecureTag, canonical_tags, now, tombstone
from .instances import to_record as instance_record
from .oidc import OidcVerifier, TokenError

log = logging.getLogger("ringfence.gcp")
PENDING_KEPT = 4096  # first entries remembered, waiting for their last


class UnknownProject(MalformedEvent):
    """An event or token for a project this control plane does not serve."""


@dataclass
class GcpIngestResult:
    event_id: str
    kind: str = "ignored"
    changed: list[str] = field(default_factory=list)


class GcpIngest:
    def __init__(
        self, w: BaseWiring, cfg: GcpConfig, instances: Instances | None = None, metric: Metric = no_metric
    ) -> None:
        self.w = w
        self.cfg = cfg
        self.instances = instances or Instances(cfg.endpoints, cfg.tag_parents)
        self.metric = metric
        self.pending: OrderedDict[str, tuple[str | None, dict[str, str] | None]] = OrderedDict()
        self._pending_lock = threading.Lock()  # serve handles events on a thread pool
        self._verifier = OidcVerifier(cfg.events_audience, cfg.jwks_url) if cfg.events_audience else None

    # --- the push's caller -----------------------------------------------------------------------

    def authenticate(self, authorization: str | None) -> str:
        """The pushing service account, once its OIDC token verified (signature, issuer, our
        audience) and it is one we configured; :class:`TokenError` otherwise."""
        if self._verifier is None:
            raise TokenError("GCP events are off here (RINGFENCE_GCP_EVENTS_AUDIENCE is not set)")
        if not self.cfg.push_service_accounts:
            # any project's Pub/Sub can push to our URL with our audience: the sender must be pinned
            raise TokenError("no push service account is configured (RINGFENCE_GCP_PUSH_SERVICE_ACCOUNTS)")
        scheme, _, token = (authorization or "").partition(" ")
        if scheme.lower() != "bearer" or not token.strip():
            raise TokenError("Authorization: Bearer <OIDC token> is required")
        claims = self._verifier.verify(token.strip(), "push token")
        email = claims.get("email")
        if claims.get("email_verified") is not True or email not in self.cfg.push_service_accounts:
            raise TokenError(f"push token of {email!r}: not a configured push service account")
        return str(email)

    # --- events ----------------------------------------------------------------------------------

    def handle(self, body: bytes | str) -> GcpIngestResult:
        """One pushed event (Pub/Sub envelope or Eventarc LogEntry). Raises MalformedEvent."""
        entry = log_entry(body)
        ev = parse(entry)
        if ev is None:
            self.metric("EventsIgnored", 1)
            return GcpIngestResult(str(entry.get("insertId", "")))
        return self.apply(ev)

    def project_id(self, project: str) -> str:
        if project in self.cfg.projects:
            return project
        pid = self.cfg.project_of_number(project)
        if pid is None:
            raise UnknownProject(f"project {project!r} is not served by this control plane (RINGFENCE_GCP_PROJECTS)")
        return pid

    def apply(self, ev: GcpEvent) -> GcpIngestResult:
        res = GcpIngestResult(ev.event_id, kind=f"{ev.action.value}:{'last' if ev.last else 'first'}")
        project = self.project_id(ev.project)
        if ev.failed:
            self.metric("EventsIgnored", 1)
            res.kind = "failed-call"
            return res
        if not ev.last:
            if ev.operation:
                with self._pending_lock:
                    self.pending[ev.operation] = (ev.principal, ev.requested)
                    while len(self.pending) > PENDING_KEPT:
                        self.pending.popitem(last=False)
            return res
        principal, requested = ev.principal, ev.requested
        if ev.operation and not ev.first:
            with self._pending_lock:
                principal, requested = self.pending.pop(ev.operation, (principal, None))
        if ev.group:
            self.metric("GroupLaunches", 1)
            log.info("%s %s/%s: made by managed instance group %s", ev.action.value, ev.zone, ev.instance, ev.group)
        change = TagChange(principal, self.requested_tags(ev.action, requested))
        names = {ev.instance: ev.instance_name} if ev.instance_name else None
        changed = self.observe(project, ev.zone, [ev.instance], names=names, change=change, event_id=ev.event_id)
        res.changed = sorted(changed)
        if changed:
            self.w.enqueue_compute(res.changed)
        self.metric("InventoryChanges", len(changed))
        return res

    def requested_tags(self, action: Action, requested: dict[str, str] | None) -> dict[str, str] | None:
        """What the call set, in the policy's key form, from the configured label source only
        (a ``setLabels`` call sets nothing that counts when labels are not a source)."""
        if requested is None:
            return None
        mapper = self.w.mapper()
        prefix = mapper.key_prefix if mapper is not None else DEFAULT_PREFIX
        src = self.cfg.label_source
        if action is Action.TAGS:
            tags = [SecureTag(k, v, "", "") for k, v in requested.items()]
            out = canonical_tags({}, tags, src, prefix)
        elif src is LabelSource.SECURE_TAGS:
            out = {}
        else:
            out = canonical_tags(requested, [], src, prefix)
        return {k: v for k, v in out.items() if not k.startswith(SOURCE_TAG)}

    def record(self, project: str, inst: dict[str, Any], t: float, mapper: LabelMapper | None) -> InventoryRecord:
        """The VM as an inventory record, its secure tags read where they are a label source."""
        secure = []
        if self.cfg.label_source is not LabelSource.LABELS:
            secure = self.instances.secure_tags(self.cfg.projects[project], inst)
        return instance_record(inst, project, t, secure=secure, source=self.cfg.label_source, mapper=mapper)

    def read(self, project: str, zone: str, ref: str, name: str | None = None) -> dict[str, Any] | None:
        """The VM ``ref`` (its numeric id, or a name) names, or None when it is gone. Read by name
        (what instances.get documents; the event's, else the stored record's), and a VM of that
        name with another id is a new VM, not this one."""
        if ref.isdigit() and name is None and (stored := self.w.store.get(ref)) is not None:
            name = stored.workload.name
        inst = self.instances.get(project, zone, name or ref)
        if inst is not None and ref.isdigit() and str(inst.get("id")) != ref:
            return None
        return inst

    def observe(
        self,
        project: str,
        zone: str,
        instances: Iterable[str],
        *,
        names: Mapping[str, str] | None = None,
        change: TagChange | None = None,
        event_id: str = "",
    ) -> set[str]:
        """Read the VMs live and store what they are now (governed); the ids that changed."""
        mapper = self.w.mapper()
        changed: set[str] = set()
        for name_or_id in instances:
            inst = self.read(project, zone, name_or_id, (names or {}).get(name_or_id))
            t = now()
            if inst is None:
                if not name_or_id.isdigit():
                    log.warning("%s/%s is gone and was never known by id: nothing to remove", zone, name_or_id)
                    continue
                rec = tombstone(name_or_id, project, zone, t)
            else:
                rec = self.record(project, inst, t, mapper)
            rec, governed = govern_record(
                self.w, rec, self.w.store.get(rec.id), change, event_id=event_id, metric=self.metric
            )
            if self.w.store.observe(rec) or governed:
                changed.add(rec.id)
                if rec.state == "terminated":
                    credentials.retire(self.w, rec.id, "instance deleted")
        return changed

    def sync(self, project: str) -> set[str]:
        """The full inventory of a project (aggregated list): every VM stored as it is now, and
        the project's stored VMs that no longer exist tombstoned. Returns the ids that changed."""
        mapper = self.w.mapper()
        changed: set[str] = set()
        seen: set[str] = set()
        for inst in self.instances.all(project):
            t = now()
            rec = self.record(project, inst, t, mapper)
            seen.add(rec.id)
            rec, governed = govern_record(self.w, rec, self.w.store.get(rec.id), None, metric=self.metric)
            if self.w.store.observe(rec) or governed:
                changed.add(rec.id)
        for stored in self.w.store.all_records():
            wl = stored.workload
            if wl.cloud != "gcp" or wl.account != project or stored.id in seen or stored.state == "terminated":
                continue
            if self.w.store.observe(tombstone(stored.id, project, wl.zone, now())):
                changed.add(stored.id)
                credentials.retire(self.w, stored.id, "instance deleted")
        if changed:
            self.w.enqueue_compute(sorted(changed))
        return changed
