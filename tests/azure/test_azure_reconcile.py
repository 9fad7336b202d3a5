"""The scheduled Azure sync: every governed subscription read, the perimeter converged after it,
one subscription's failure leaving the others converged."""

from __future__ import annotations

import logging
from typing import Any

from ringfence.clouds.azure.reconcile import AzureReconcile
from ringfence.clouds.azure.wiring import Azure
from ringfence.local.azure_arm import ArmServer
from ringfence.local.azure_estate import SUB, seed_vm
from ringfence.local.wiring import LocalWiring
from ringfence.perimeter import PerimeterConfig, PublishedService

from .conftest import OTHER_SUB, PROD_WEB

WEB = "ab000000-0000-4000-8000-00000000f001"
OTHER = "ab000000-0000-4000-8000-00000000f002"


def test_reconcile_reads_each_subscription_and_converges_the_perimeter(
    arm: ArmServer, azure: Azure, wiring: LocalWiring
) -> None:
    azure.cfg.subscriptions = [SUB, OTHER_SUB]
    seed_vm(arm, "web-1", WEB, "10.20.1.4", PROD_WEB)
    seed_vm(arm, "web-2", OTHER, "10.30.1.4", PROD_WEB, sub=OTHER_SUB)
    rec = AzureReconcile(wiring, azure, PerimeterConfig(admin_cidrs=["10.250.0.0/24"]))
    res = rec.run()
    assert sorted(res.changed) == sorted([WEB, OTHER]) and res.failed == {}
    assert res.perimeter_writes > 0
    again = rec.run()
    assert again.changed == [] and again.perimeter_writes == 0  # converged: only read


def test_a_throttled_subscription_fails_alone(arm: ArmServer, azure: Azure, wiring: LocalWiring) -> None:
    azure.cfg.subscriptions = [OTHER_SUB, SUB]
    seed_vm(arm, "web-1", WEB, "10.20.1.4", PROD_WEB)
    azure.arm(OTHER_SUB).compute._config.retry_policy.total_retries = 0  # type: ignore[attr-defined]
    arm.throttle(times=1, retry_after=0)
    res = AzureReconcile(wiring, azure).run()
    assert list(res.failed) == [OTHER_SUB] and "TooManyRequests" in res.failed[OTHER_SUB]
    assert res.changed == [WEB]


def test_what_the_perimeter_sets_aside_is_logged_and_counted(
    arm: ArmServer, azure: Azure, wiring: LocalWiring, caplog: Any
) -> None:
    """A published service no ASG can be named after is set aside (the run goes on for the rest):
    the scheduled sync says so in its log and a metric, not only in a result it dropped."""
    seed_vm(arm, "web-1", WEB, "10.20.1.4", PROD_WEB)
    cfg = PerimeterConfig(
        admin_cidrs=["10.250.0.0/24"],
        published=[PublishedService(name="web-tier", match={"role": "web"}, ports=["tcp/443"])],
    )
    metrics: list[tuple[str, float]] = []
    with caplog.at_level(logging.WARNING):
        res = AzureReconcile(wiring, azure, cfg, metric=lambda n, v: metrics.append((n, v))).run()
    assert res.failed == {} and res.perimeter_writes > 0 and res.warnings >= 1
    assert any("web-tier" in r.getMessage() and "azure perimeter of" in r.getMessage() for r in caplog.records)
    assert ("AzurePerimeterWarnings", res.warnings) in metrics
