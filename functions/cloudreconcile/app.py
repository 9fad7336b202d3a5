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

logger = Logger()
tracer = Tracer()
metrics = Metrics()


def metric(name: str, value: float) -> None:
    metrics.add_metric(name=name, unit=MetricUnit.Count, value=value)


def reconcile(w: Wiring) -> dict[str, Any]:
    out: dict[str, Any] = {}
    if os.environ.get("RINGFENCE_AZURE_SUBSCRIPTIONS"):
        from ringfence.clouds.aws.othercloud import azure_from_env
        from ringfence.clouds.azure.reconcile import AzureReconcile
        from ringfence.perimeter import PerimeterConfig

        perimeter = None
        if os.environ.get("RINGFENCE_AZURE_PERIMETER") == "true":  # NSGs/ASGs need network write rights
            perimeter = PerimeterConfig.model_validate_json(os.environ.get("RINGFENCE_PERIMETER_CONFIG") or "{}")
        out["azure"] = asdict(AzureReconcile(w, azure_from_env(), perimeter, metric).run())
    if os.environ.get("RINGFENCE_GCP_PROJECTS"):
        from ringfence.clouds.gcp.config import GcpConfig
        from ringfence.clouds.gcp.reconcile import GcpPerimeter, GcpReconcile

        out["gcp"] = asdict(GcpReconcile(w, GcpConfig.from_env(), GcpPerimeter.from_env(), metric).run())
    return out


@logger.inject_lambda_context
@tracer.capture_lambda_handler
@metrics.log_metrics
@event_source(data_class=EventBridgeEvent)
def handler(event: EventBridgeEvent, context: Any) -> dict[str, Any]:
    result = reconcile(Wiring(Config.from_env()))
    for cloud, r in result.items():
        logger.info("reconciled", extra={"cloud": cloud, "changed": len(r["changed"]), "failed": r["failed"]})
    return result
