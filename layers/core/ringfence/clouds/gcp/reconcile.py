"""The scheduled full sync of every served project (converges lost or never-sent events: Pub/Sub
delivers at least once, but a sink created late or a dead-lettered push leaves inventory behind),
and each project's firewall-policy perimeter converged after it where one is configured
(``ringfence serve`` runs it on an interval; in AWS the scheduled cloud-reconcile function).

What a project's perimeter run changes (policies created or associated, rules added and removed) is
audited as one ``perimeter.apply`` record (principal ``ringfence:perimeter``, target
``projects/<project>``) before the first change: if the record cannot be written nothing changes
and the project fails this run (the next one tries again). A run with nothing to change writes none."""

from __future__ import annotations

import json
import os
import threading
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field

from google.api_core.exceptions import GoogleAPICallError, RetryError

from ringfence.audit import AuditRecord
from ringfence.clouds import every
from ringfence.control.wiring import BaseWiring, Metric, hand_on_owed, log, no_metric
from ringfence.perimeter import AuditNotWritten, PerimeterConfig, PlanRefused

from .config import GcpConfig
from .firewall import ApplyFailed, FirewallPolicyPerimeter, GcpPerimeterConfig, PolicyPlan, changes_of, members
from .ingest import GcpIngest

PRINCIPAL = "ringfence:perimeter"  # who the perimeter's audit records name, in every cloud
_APPLY_WHY = (
    "the perimeter's changes in this project, audited before the first is made: a run that fails "
    "part-way made only some of them (the project is reported failed) and the next run audits what is left"
)


@dataclass
class GcpReconcileResult:
    changed: list[str] = field(default_factory=list)
    failed: dict[str, str] = field(default_factory=dict)  # project → why (the others still ran)
    perimeter_writes: int = 0  # rules added or removed, plus policies created


@dataclass(frozen=True)
class GcpPerimeter:
    """The neutral perimeter plan and its GCP translation (both needed: no env tags, no targets)."""

    config: PerimeterConfig
    gcp: GcpPerimeterConfig

    @classmethod
    def from_env(cls, env: Mapping[str, str] | None = None) -> GcpPerimeter | None:
        """``RINGFENCE_PERIMETER_CONFIG`` (the neutral plan, as AWS's) and
        ``RINGFENCE_GCP_PERIMETER`` (:class:`GcpPerimeterConfig`, JSON); None when the latter is
        unset: the GCP perimeter is off, inventory still reconciled."""
        e = os.environ if env is None else env
        raw = e.get("RINGFENCE_GCP_PERIMETER", "").strip()
        if not raw:
            return None
        try:
            gcp = GcpPerimeterConfig.model_validate_json(raw)
            config = PerimeterConfig.model_validate_json(e.get("RINGFENCE_PERIMETER_CONFIG") or "{}")
        except ValueError as exc:
            raise ValueError(f"RINGFENCE_GCP_PERIMETER / RINGFENCE_PERIMETER_CONFIG: {exc}") from None
        return cls(config, gcp)


class GcpReconcile:
    def __init__(
        self,
        w: BaseWiring,
        cfg: GcpConfig,
        perimeter: GcpPerimeter | None = None,
        metric: Metric = no_metric,
        ingest: GcpIngest | None = None,
    ) -> None:
        self.w = w
        self.cfg = cfg
        self.perimeter = perimeter
        self.metric = metric
        self.ingest = ingest or GcpIngest(w, cfg, metric=metric)

    def run(self) -> GcpReconcileResult:
        res = GcpReconcileResult()
        # what earlier hand-offs failed to give compute (any age, any cloud's: a mark names no scope)
        hand_on_owed(self.w, "gcp reconcile", self.metric)
        for project in sorted(self.cfg.projects):
            try:
                res.changed += sorted(self.ingest.sync(project))
                if self.perimeter is not None:
                    fw = FirewallPolicyPerimeter(self.cfg.endpoints, project)
                    plans = fw.reconcile(
                        self.perimeter.config,
                        self.perimeter.gcp,
                        members(self.w.store.all_records(), project),
                        applying=self._applying(project),
                    )
                    writes = sum(len(p.add) + len(p.remove) + int(p.create) + int(p.associate) for p in plans)
                    res.perimeter_writes += writes
                    self.metric("GcpPerimeterWrites", writes)
            except (GoogleAPICallError, RetryError, PlanRefused, ApplyFailed) as exc:
                # one project's failure (throttled past the retry, over a limit) leaves the others
                # converged; a refused plan changed nothing (limits are checked before any write);
                # ApplyFailed: some networks' writes failed, the project's other networks were applied
                log.error("gcp reconcile of %s failed: %s", project, exc)
                res.failed[project] = str(exc)
                self.metric("GcpReconcileFailed", 1)
        log.info("gcp reconcile: %s", json.dumps({"changed": len(res.changed), "failed": sorted(res.failed)}))
        return res

    def _applying(self, project: str) -> Callable[[list[PolicyPlan]], None]:
        """Audits what a run is about to change in ``project`` (one record per project and run),
        before the first change; a failed write fails the project with nothing changed."""

        def audit(plans: list[PolicyPlan]) -> None:
            try:
                self.w.audit(
                    AuditRecord(
                        principal=PRINCIPAL,
                        action="perimeter.apply",
                        target=f"projects/{project}",
                        detail={"project": project, "scope": "full"} | changes_of(plans),
                        reason=_APPLY_WHY,
                    )
                )
            except Exception as exc:  # the store's failure, whatever the store: this project only
                raise AuditNotWritten([f"{type(exc).__name__}: {exc}"[:500]]) from exc

        return audit

    def every(self, seconds: float, stop: threading.Event) -> threading.Thread:
        """Run now and then every ``seconds`` until ``stop`` is set (``ringfence serve``)."""
        return every("gcp-reconcile", self.run, seconds, stop)
