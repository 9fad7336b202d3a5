"""Perimeter service: the coarse security groups per VPC and environment, quota-checked."""

from __future__ import annotations

from typing import Any

from .wiring import Metric, Wiring, no_metric

# --- perimeter --------------------------------------------------------------------------------------


class Perimeter:
    """Coarse security groups per VPC and env, from the inventory's labels (see ringfence.perimeter)."""

    def __init__(self, w: Wiring, config: Any, metric: Metric = no_metric) -> None:
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
