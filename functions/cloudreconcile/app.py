"""Cloud reconcile (scheduled, EventBridge): the full inventory pass of the other clouds the stack
serves (Azure subscriptions, GCP projects) and their perimeters (NSG/ASG, network firewall
policy) where configured; converges lost Event Grid / Pub/Sub deliveries (docs/deploy-*.md)."""

from __future__ import annotations

import os
from dataclasses import asdict
from typing import Any

from aws_lambda_powertools import Logger, Metrics, Tracer
from aws_lambda_powertools.metrics import MetricUnit
from aws_lambda_powertools.utilities.data_classes import EventBridgeEvent, event_source

from ringfence.clouds.aws.wiring import Wiring
from ringfence.control.wiring import Config
from ringfence.textsafe import json_line

logger = Logger(json_serializer=json_line)  # escaped: ringfence.textsafe
tracer = Tracer()
metrics = Metrics()


def metric(name: str, value: float) -> None:
    metrics.add_metric(name=name, unit=MetricUnit.Count, value=value)


# a cloud's pass that raised (not one subscription's or project's failure, which the pass records
# itself): its result says why, and its failure metric (alarmed: AzureReconcileFailed,
# GcpReconcileFailed) is emitted
WHOLE_PASS = "*"  # noqa: S105 (a key of the failures, not a secret)
FAILED_METRIC = {"azure": "AzureReconcileFailed", "gcp": "GcpReconcileFailed"}


class ReconcileFailed(RuntimeError):
    """A cloud's whole pass failed (the other clouds' passes ran): the invocation fails."""


def _azure(w: Wiring) -> dict[str, Any]:
    from ringfence.clouds.aws.othercloud import azure_from_env
    from ringfence.clouds.azure.reconcile import AzureReconcile
    from ringfence.perimeter import PerimeterConfig

    perimeter = None
    if os.environ.get("RINGFENCE_AZURE_PERIMETER") == "true":  # NSGs/ASGs need network write rights
        perimeter = PerimeterConfig.model_validate_json(os.environ.get("RINGFENCE_PERIMETER_CONFIG") or "{}")
    return asdict(AzureReconcile(w, azure_from_env(), perimeter, metric).run())


def _gcp(w: Wiring) -> dict[str, Any]:
    from ringfence.clouds.gcp.config import GcpConfig
    from ringfence.clouds.gcp.reconcile import GcpPerimeter, GcpReconcile

    return asdict(GcpReconcile(w, GcpConfig.from_env(), GcpPerimeter.from_env(), metric).run())


def reconcile(w: Wiring) -> dict[str, Any]:
    """Each configured cloud's pass, each apart: one that raises (its API unreachable past what the
    pass catches per subscription or project, its configuration or credentials unreadable) is
    recorded in its result (``failed[WHOLE_PASS]``, ``error``) and its failure metric emitted, and
    the next cloud's pass still runs."""
    passes = [
        ("azure", "RINGFENCE_AZURE_SUBSCRIPTIONS", _azure),
        ("gcp", "RINGFENCE_GCP_PROJECTS", _gcp),
    ]
    out: dict[str, Any] = {}
    for cloud, setting, run in passes:
        if not os.environ.get(setting):
            continue
        try:
            out[cloud] = run(w)
        except Exception as exc:
            why = f"{type(exc).__name__}: {exc}"
            logger.exception("%s reconcile failed; the other clouds' passes still run", cloud)
            metric(FAILED_METRIC[cloud], 1)
            out[cloud] = {"changed": [], "failed": {WHOLE_PASS: why}, "error": why}
    return out


@logger.inject_lambda_context
@tracer.capture_lambda_handler(capture_response=False, capture_error=False)  # answers hold tokens
@metrics.log_metrics
@event_source(data_class=EventBridgeEvent)
def handler(event: EventBridgeEvent, context: Any) -> dict[str, Any]:
    result = reconcile(Wiring(Config.from_env(owed_writer="cloudreconcile")))
    for cloud, r in result.items():
        logger.info("reconciled", extra={"cloud": cloud, "changed": len(r["changed"]), "failed": r["failed"]})
    broken = sorted(cloud for cloud, r in result.items() if "error" in r)
    if broken:
        # after every cloud's pass ran: the invocation fails (Lambda's Errors, the async retry and
        # the failure destination), on top of the failure metrics already emitted
        raise ReconcileFailed(f"the {', '.join(broken)} reconcile pass failed: {result[broken[0]]['error']}")
    return result
