"""Policy and inventory load times: libyaml event composer (``yamlevents``) against the pure-Python path.

    .venv/bin/python -m tests.bench.yaml_load [--repeat 5] [--json]

Both paths run in the same process, alternating, on the same texts: the shipped example
(``examples/ordering``), the estate ``tests/bench/compare_nca.py`` compares with NCA (385
workloads, 3 apps, seed 1) and the synthetic estates' policies at N = 1,000 / 10,000 / 50,000
(``ringfence bench``). Each figure is the median of ``--repeat`` timed loads; "yaml" is
``yamlpos.load`` alone, "load" the whole :func:`load_policy_texts` / :func:`load_inventory`.
Figures go to docs/benchmarks.md.
"""

from __future__ import annotations

import argparse
import gc
import json
import statistics
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import yaml

from ringfence import synth, yamlpos
from ringfence.inventory import load_inventory
from ringfence.policy import load_policy_texts

ROOT = Path(__file__).resolve().parents[2]


def _median(fn: Callable[[], object], repeat: int) -> float:
    times = []
    for _ in range(repeat):
        gc.collect()
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


def _both(fn: Callable[[], object], repeat: int) -> dict[str, float]:
    """Median seconds of ``fn`` on the pure path and with libyaml, interleaved."""
    out: dict[str, list[float]] = {"pure": [], "fast": []}
    for _ in range(repeat):
        for path in ("pure", "fast"):
            yamlpos.HAVE_LIBYAML = path == "fast"
            out[path].append(_median(fn, 1))
    yamlpos.HAVE_LIBYAML = bool(yaml.__with_libyaml__)
    pure, fast = statistics.median(out["pure"]), statistics.median(out["fast"])
    return {"pure_s": round(pure, 5), "fast_s": round(fast, 5), "ratio": round(pure / fast, 1)}


def _yaml_only(texts: list[str]) -> Callable[[], object]:
    return lambda: [yamlpos.load(t) for t in texts]


def run(repeat: int = 5, sizes: tuple[int, ...] = (1_000, 10_000, 50_000)) -> dict[str, Any]:
    results: dict[str, Any] = {}
    example = ROOT / "examples" / "ordering"
    policy = {p.name: p.read_text() for p in sorted((example / "policy").glob("*.yaml"))}
    inventory = example / "inventory.yaml"
    results["example policy"] = _both(lambda: load_policy_texts(policy), repeat)
    results["example inventory"] = _both(lambda: load_inventory(inventory), repeat)
    estate = synth.generate(385, seed=1, apps=3)
    tmp = Path(tempfile.mkdtemp(prefix="rf-yaml-"))
    inventory_385 = tmp / "inventory.yaml"
    records = [w.model_dump(mode="json", exclude_defaults=True) for w in estate.workloads]
    inventory_385.write_text(yaml.safe_dump({"workloads": records}))
    results["nca estate policy load"] = _both(lambda: load_policy_texts(estate.policy_texts), repeat)
    results["nca estate policy yaml"] = _both(_yaml_only(list(estate.policy_texts.values())), repeat)
    results["nca estate inventory load"] = _both(lambda: load_inventory(inventory_385), repeat)
    results["nca estate inventory yaml"] = _both(_yaml_only([inventory_385.read_text()]), repeat)
    for n in sizes:
        texts = synth.generate(n, seed=1).policy_texts
        results[f"N={n} policy load"] = _both(lambda texts=texts: load_policy_texts(texts), repeat)
        results[f"N={n} policy yaml"] = _both(_yaml_only(list(texts.values())), repeat)
    return results


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    ap.add_argument("--repeat", type=int, default=5)
    ap.add_argument("--sizes", type=int, nargs="*", default=[1_000, 10_000, 50_000])
    ap.add_argument("--json", action="store_true")
    args = ap.parse_args(argv)
    r = run(args.repeat, tuple(args.sizes))
    if args.json:
        print(json.dumps(r, indent=1))
    else:
        for name, v in r.items():
            print(
                f"{name:28} pure {v['pure_s'] * 1e3:9.1f} ms   libyaml {v['fast_s'] * 1e3:8.1f} ms   {v['ratio']:5.1f}x"
            )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
