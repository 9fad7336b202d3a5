"""What one inventory change costs agents that follow ``ringfence compile`` output (static source).

    .venv/bin/python -m tests.bench.static_deltas --workloads 10000

A synthetic estate is compiled into a directory; one prod web server joins and it is compiled again
into the same directory. For every agent whose bundle changed: the bytes of its whole new bundle
(what a bundles-only static source makes it fetch) against its head plus the set deltas it walks.
Figures go to docs/benchmarks.md (Agent, static source); raw results to ``out/static-bench.json``.
"""

from __future__ import annotations

import argparse
import contextlib
import io
import json
import tempfile
import time
from pathlib import Path

from ringfence import synth
from ringfence.cli import main as ringfence
from ringfence.staticlayout import bundle_path, delta_path, load_head

ROOT = Path(__file__).resolve().parents[2]
KEY = ROOT / "tests" / "golden" / "test-key.pem"


def measure(workloads: int) -> dict[str, object]:
    tmp = Path(tempfile.mkdtemp(prefix="rf-static-"))
    estate = synth.generate(workloads)
    policy = tmp / "policy"
    policy.mkdir()
    for name, text in estate.policy_texts.items():
        (policy / name).write_text(text)
    rows = [w.model_dump(mode="json", exclude_defaults=True) for w in estate.workloads]
    web = next(
        w for w in estate.workloads if w.tags.get("ringfence:role") == "web" and w.tags.get("ringfence:env") == "prod"
    )
    joiner = web.model_dump(mode="json", exclude_defaults=True) | {"id": "joiner-1", "ips": ["10.250.0.10"]}
    out = tmp / "out"

    def compile_(rows: list[dict[str, object]], revision: int) -> float:
        (tmp / "inventory.json").write_text(json.dumps({"workloads": rows}))
        args = ["--policy", str(policy), "--inventory", str(tmp / "inventory.json"), "--out", str(out)]
        start = time.perf_counter()
        with contextlib.redirect_stdout(io.StringIO()):
            assert ringfence(["compile", *args, "--key", str(KEY), "--revision", str(revision)]) == 0
        return time.perf_counter() - start

    first_s = compile_(rows, 1000)
    before = {p.name: load_head(p.read_bytes()) for p in (out / "heads").iterdir()}
    again_s = compile_([*rows, joiner], 2000)
    changed = own_rules = whole = walked = 0
    for p in (out / "heads").iterdir():
        head, old = load_head(p.read_bytes()), before.get(p.name)
        if old is None or head.version == old.version:
            continue
        changed += 1
        size = (out / bundle_path(head.workload_id)).stat().st_size
        whole += size
        if head.rules_version > old.version:
            own_rules += 1
            walked += p.stat().st_size + size
            continue
        steps = [delta_path(name, old.sets[name]) for name, v in head.sets.items() if v != old.sets[name]]
        walked += p.stat().st_size + sum((out / s).stat().st_size for s in steps)
    heads = list((out / "heads").iterdir())
    bundles = list((out / "bundles").iterdir())
    return {
        "workloads": workloads,
        "compile_first_s": round(first_s, 2),
        "compile_again_s": round(again_s, 2),
        "deltas_written": len(list((out / "deltas").rglob("*.json"))),
        "agents_changed": changed,
        "agents_own_rules_changed": own_rules,
        "bytes_whole_bundles": whole,
        "bytes_head_and_deltas": walked,
        "ratio": round(walked / whole, 4) if whole else None,
        "mean_head_bytes": sum(p.stat().st_size for p in heads) // len(heads),
        "mean_bundle_bytes": sum(p.stat().st_size for p in bundles) // len(bundles),
    }


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--workloads", type=int, nargs="+", default=[2000, 10000])
    results = [measure(n) for n in p.parse_args().workloads]
    (ROOT / "out").mkdir(exist_ok=True)
    (ROOT / "out" / "static-bench.json").write_text(json.dumps(results, indent=1) + "\n")
    print(json.dumps(results, indent=1))


if __name__ == "__main__":
    main()
