"""Pool the new-connection rounds of several agent bench runs into one estimate per ratio.

    RINGFENCE_BENCH=1 RINGFENCE_BENCH_OUT=out/agent-bench-1.json pytest -s tests/bench/test_agent_bench.py
    ...  (repeat)
    .venv/bin/python -m tests.bench.conn_pool out/agent-bench-*.json

Every run interleaves the variants within each round, so the ratio is taken per round (variant ÷
baseline, CPU per connection) and the rounds of all runs are pooled: median with a
distribution-free ~95 % interval, plus the spread of the per-run medians. One round alone is
noisy (single rounds range from ~0.9× to ~2× for a 1.2× effect); a run's 30 rounds narrow the
median to about ±0.04, several runs pooled to about ±0.015.
"""

from __future__ import annotations

import json
import statistics
import sys
from pathlib import Path

VARIANTS = ("stateful_minimal", "nft_sets", "ipset", "iptables_linear")


def median_ci(xs: list[float]) -> dict[str, float]:
    """Median with a distribution-free ~95 % confidence interval (order statistics)."""
    xs = sorted(xs)
    n = len(xs)
    k = max(0, int((n - 1.96 * n**0.5) / 2))
    return {"median": statistics.median(xs), "ci_low": xs[k], "ci_high": xs[n - 1 - k], "min": xs[0], "max": xs[-1]}


def pool(results: list[dict[str, object]], metric: str = "cpu_us_per_conn") -> dict[str, object]:
    runs = [r["new_connections"]["runs"] for r in results]  # type: ignore[index]
    out: dict[str, object] = {"runs": len(runs), "rounds": sum(len(r["none"]) for r in runs)}
    for base in ("none", "stateful_minimal"):
        table: dict[str, object] = {}
        for kind in VARIANTS:
            if kind == base:
                continue
            per_run = [[a[metric] / b[metric] for a, b in zip(r[kind], r[base], strict=True)] for r in runs]
            table[kind] = {
                "pooled": median_ci([x for xs in per_run for x in xs]),
                "run_medians": [statistics.median(xs) for xs in per_run],
                "extra_us_pooled": median_ci(
                    [a[metric] - b[metric] for r in runs for a, b in zip(r[kind], r[base], strict=True)]
                ),
            }
        out[f"vs_{base}"] = table
    return out


def main(paths: list[str]) -> None:
    pooled = pool([json.loads(Path(p).read_text()) for p in paths])
    print(f"{pooled['runs']} runs, {pooled['rounds']} rounds: CPU per connection, variant ÷ baseline per round")
    for base in ("none", "stateful_minimal"):
        for kind, t in pooled[f"vs_{base}"].items():  # type: ignore[attr-defined]
            p, runs = t["pooled"], t["run_medians"]
            print(
                f"  {kind:17s} / {base:17s} {p['median']:.3f} [{p['ci_low']:.3f}–{p['ci_high']:.3f}]"
                f"  runs {min(runs):.3f}–{max(runs):.3f}  extra {t['extra_us_pooled']['median']:.2f} µs"
            )
    print(json.dumps(pooled, indent=1))


if __name__ == "__main__":
    main(sys.argv[1:])
