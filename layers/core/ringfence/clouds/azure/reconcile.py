"""The scheduled full sync of every governed subscription (converges lost or never-sent events:
Event Grid delivers at least once, but a subscription created late or a dead-lettered delivery
leaves inventory behind), and the perimeter converged after it where one is configured.

What a subscription's perimeter run writes (ASGs and NSGs created and deleted, rules written and
deleted, NICs' ASGs and NSG) is audited as one ``perimeter.apply`` record (principal
``ringfence:perimeter``, target ``subscriptions/<id>``) before the first write: if the record cannot
be written nothing is written and the subscription fails this run (the next one tries again). A run
with nothing to write writes none.

A run one of whose rule writes ARM refused each time (the rule kept changing: :mod:`.perimeter`)
puts no NIC on that rule's NSG; it writes a second record, ``perimeter.apply.partial`` (same
principal and target), listing under ``not_done`` what the first listed but was not done (those
rules, those NICs), and the subscription is reported failed (``AzureReconcileFailed``)."""

from __future__ import annotations

import threading
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from azure.core.exceptions import AzureError

from ringfence.audit import AuditRecord
from ringfence.clouds import every
from ringfence.control.wiring import BaseWiring, Metric, hand_on_owed, log, no_metric
from ringfence.perimeter import AuditNotWritten, PerimeterConfig, PerimeterError, PlanRefused

from .inventory import observe_subscription
from .perimeter import AzurePerimeter, changes_of, members_of
from .wiring import Azure

PRINCIPAL = "ringfence:perimeter"  # who the perimeter's audit records name, in every cloud
_APPLY_WHY = (
    "the perimeter's writes in this subscription, audited before the first is made: a run that fails "
    "part-way made only some of them (the subscription is reported failed) and the next run audits what is left"
)
_PARTIAL_WHY = (
    "what this subscription's perimeter.apply record of the run lists but the run did not do: rule writes "
    "ARM refused each time (the rule kept changing), and the NICs not put on those rules' NSGs"
)


class ApplyIncomplete(PerimeterError):
    """Some of what a run audited was not done (a rule write refused): the subscription failed."""


@dataclass
class AzureReconcileResult:
    changed: list[str] = field(default_factory=list)
    gone: list[str] = field(default_factory=list)
    failed: dict[str, str] = field(default_factory=dict)  # subscription → why (the others still ran)
    perimeter_writes: int = 0
    warnings: int = 0  # what the perimeter runs set aside (logged one by one)


class AzureReconcile:
    def __init__(
        self, w: BaseWiring, azure: Azure, perimeter: PerimeterConfig | None = None, metric: Metric = no_metric
    ) -> None:
        self.w = w
        self.azure = azure
        self.perimeter = perimeter
        self.metric = metric

    def run(self) -> AzureReconcileResult:
        res = AzureReconcileResult()
        # what earlier hand-offs failed to give compute (any age, any cloud's: a mark names no scope)
        hand_on_owed(self.w, "azure reconcile", self.metric)
        for sub in self.azure.cfg.subscriptions:
            try:
                arm = self.azure.arm(sub)
                inv = observe_subscription(self.w, arm, self.metric, scheduled=True)
                res.changed += inv.changed
                res.gone += inv.gone
                if self.perimeter is not None:
                    labels = members_of(self.w.store.all_records())
                    result = AzurePerimeter(arm, self.perimeter).reconcile(labels, applying=self._applying(sub))
                    res.perimeter_writes += len(result.writes)
                    # what the run set aside (a VM whose env or service no ASG can be named after,
                    # left as it is; a NIC on another team's NSG): said where operators look
                    for warning in result.warnings:
                        log.warning("azure perimeter of %s: %s", sub, warning)
                    res.warnings += len(result.warnings)
                    if result.warnings:
                        self.metric("AzurePerimeterWarnings", len(result.warnings))
                    if result.not_done:
                        self._partial(sub, result.not_done)
            except (AzureError, PlanRefused, ApplyIncomplete) as exc:
                # one subscription's failure (throttled, over a limit, ARM or Entra ID unreachable:
                # azure-core's AzureError covers HttpResponseError and the ServiceRequestError of a
                # connection that failed) leaves the others converged
                log.error("azure reconcile of %s failed: %s", sub, exc)
                res.failed[sub] = str(exc)
                self.metric("AzureReconcileFailed", 1)
        return res

    def _applying(self, sub: str) -> Callable[[dict[str, Any]], None]:
        """Audits what a run is about to write in subscription ``sub`` (one record per subscription
        and run), before the first write; a failed audit write fails the subscription, nothing written."""

        def audit(changes: dict[str, Any]) -> None:
            try:
                self._audit(sub, "perimeter.apply", changes, _APPLY_WHY)
            except Exception as exc:  # the store's failure, whatever the store: this subscription only
                raise AuditNotWritten([f"{type(exc).__name__}: {exc}"[:500]]) from exc

        return audit

    def _partial(self, sub: str, not_done: list[dict[str, Any]]) -> None:
        """Audits what the run's record listed but the run did not do, and fails the subscription."""
        why = f"{len(not_done)} audited write(s) not made (a rule write refused; see perimeter.apply.partial)"
        try:
            self._audit(sub, "perimeter.apply.partial", {"not_done": changes_of(not_done)}, _PARTIAL_WHY)
        except Exception as exc:  # the store's failure: still this subscription's failure only
            why += f"; its audit record not written: {type(exc).__name__}: {exc}"[:500]
        raise ApplyIncomplete(why)

    def _audit(self, sub: str, action: str, detail: dict[str, Any], reason: str) -> None:
        self.w.audit(
            AuditRecord(
                principal=PRINCIPAL,
                action=action,
                target=f"subscriptions/{sub}",
                detail={"subscription": sub, "scope": "full"} | detail,
                reason=reason,
            )
        )

    def every(self, seconds: float, stop: threading.Event) -> threading.Thread:
        """Run now and then every ``seconds`` until ``stop`` is set (``ringfence serve``)."""
        return every("azure-reconcile", self.run, seconds, stop)
