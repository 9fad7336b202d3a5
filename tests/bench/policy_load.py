"""Policy load of this tree against a baseline tree, in alternating processes.

    git archive <commit> layers/core | tar -x -C /tmp/rf-base
    .venv/bin/python -m tests.bench.policy_load --baseline /tmp/rf-base/layers/core [--rounds 3] [--json]

Each round runs one child process on the baseline (``PYTHONPATH`` puts its ``ringfence`` first)
and then one on this tree, so both sides see the same load on a shared box. A child times
:func:`load_policy_texts` and, alternating with it, ``yamlpos.load`` of the same texts (the YAML
part) on the estate ``tests/bench/compare_nca.py`` compares with NCA (385 workloads, 3 apps,
seed 1) and the synthetic estates' policies at N = 1,000 / 10,000 / 50,000, and prints medians.
The garbage of the previous call is collected outside the timer. Figures go to docs/benchmarks.md.
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[2]
REPEATS = {"nca": 41, "N=1000": 21, "N=10000": 9, "N=50000": 5}


def child() -> dict[str, dict[str, float]]:
    from ringfence import synth, yamlpos
    from ringfence.policy import load_policy_texts

    estates = {"nca": synth.generate(385, seed=1, apps=3).policy_texts}
    for n in (1_000, 10_000, 50_000):
        estates[f"N={n}"] = synth.generate(n, seed=1).policy_texts
    out: dict[str, dict[str, float]] = {}
    for name, texts in estates.items():
        load_policy_texts(texts)  # first call: imports, pydantic's validators
        load, yaml = [], []
        for _ in range(REPEATS[name]):
            gc.collect()
            t0 = time.perf_counter()
            load_policy_texts(texts)
            load.append(time.perf_counter() - t0)
            gc.collect()
            t0 = time.perf_counter()
            for text in texts.values():
                yamlpos.load(text)
            yaml.append(time.perf_counter() - t0)
        out[name] = {"load_ms": statistics.median(load) * 1e3, "yaml_ms": statistics.median(yaml) * 1e3}
    return out


def _run_child(pythonpath: str | None) -> dict[str, dict[str, float]]:
    env = dict(os.environ)
    if pythonpath:
        env["PYTHONPATH"] = pythonpath
    proc = subprocess.run(
        [sys.executable, "-m", "tests.bench.policy_load", "--child"],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        check=True,
    )
    result: dict[str, dict[str, float]] = json.loads(proc.stdout)
    return result


def run(baseline: Path, rounds: int) -> list[dict[str, Any]]:
    out = []
    for _ in range(rounds):
        old, new = _run_child(str(baseline)), _run_child(None)
        row: dict[str, Any] = {}
        for name in new:
            o, n = old[name], new[name]
            rest_o, rest_n = o["load_ms"] - o["yaml_ms"], n["load_ms"] - n["yaml_ms"]
            row[name] = {
                "old": o,
                "new": n,
                "load_ratio": round(o["load_ms"] / n["load_ms"], 2),
                "non_yaml_old_ms": round(rest_o, 2),
                "non_yaml_new_ms": round(rest_n, 2),
                "non_yaml_ratio": round(rest_o / rest_n, 2),
            }
        out.append(row)
    return out


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    ap.add_argument("--baseline", type=Path, help="a baseline tree's layers/core")
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--json", action="store_true")
    ap.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    if args.child:
        print(json.dumps(child()))
        return 0
    if args.baseline is None:
        ap.error("--baseline is required")
    rounds = run(args.baseline, args.rounds)
    if args.json:
        print(json.dumps(rounds, indent=1))
        return 0
    for i, row in enumerate(rounds, 1):
        for name, v in row.items():
            print(
                f"round {i} {name:8} load {v['old']['load_ms']:8.2f} -> {v['new']['load_ms']:8.2f} ms "
                f"({v['load_ratio']:.2f}x); not YAML {v['non_yaml_old_ms']:8.2f} -> {v['non_yaml_new_ms']:7.2f} ms "
                f"({v['non_yaml_ratio']:.2f}x); YAML {v['new']['yaml_ms']:.2f} ms"
            )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
