"""A synthetic map of N app groups (three roles each, a few edges per group), for the browser
test and the load benchmark."""

from __future__ import annotations

from ringfence.flows.aggregate import FlowRow
from ringfence.viz.depmap import DependencyMap, from_flows


def big_map(groups: int) -> DependencyMap:
    rows = []
    for g in range(groups):
        app = f"app{g:04d}"
        ends = [f"app={app},env=prod,loc=ca,role={r}" for r in ("web", "api", "db")]
        for a, b, port in ((0, 1, 8443), (1, 2, 5432)):
            rows.append(_row(ends[a], ends[b], port, "allowed"))
        other = f"app=app{(g * 7 + 1) % groups:04d},env=prod,loc=ca,role=api"
        rows.append(_row(ends[0], other, 8443, "blocked" if g % 5 == 0 else "allowed"))
        if g % 10 == 0:
            rows.append(_row(ends[0], "internet", 443, "potentially-blocked"))
    return from_flows(rows)


def _row(src: str, dst: str, port: int, decision: str) -> FlowRow:
    return FlowRow(
        day="2026-12-02", src=src, dst=dst, proto="tcp", port=port, decision=decision,  # type: ignore[arg-type]
        rule="r (x.yaml:1:1)", flows=5, first_seen=1.0, last_seen=2.0, sample_src="10.0.0.1", sample_dst="10.0.0.2",
    )  # fmt: skip
