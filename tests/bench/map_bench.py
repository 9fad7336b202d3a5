"""The dependency map of N app groups loaded in headless Chromium: page load (navigation start
→ load event, which includes drawing: the map draws in an inline script), the map's own
phases and ``ready`` (its accessible element list built too, ms since navigation start), median of several loads (docs/benchmarks.md, "The dependency map in a browser")."""

from __future__ import annotations

import argparse
import json
import os
import statistics
import tempfile
from pathlib import Path

from ringfence.viz.render import to_html
from tests.viz import browser
from tests.viz.bigmap import big_map


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--groups", type=int, default=2000)
    ap.add_argument("--runs", type=int, default=5)
    args = ap.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "map.html"
        m = big_map(args.groups)
        path.write_text(to_html(m))
        loads, phases = [], []
        with browser.chromium() as d:
            for _ in range(args.runs):
                browser.load(d, path)
                loads.append(
                    d.execute_script("return performance.timing.loadEventEnd - performance.timing.navigationStart")
                )
                phases.append(
                    {
                        **d.execute_script("return ringfenceMap.phases"),
                        "ready": d.execute_script("return ringfenceMap.readyMs"),
                    }
                )
        print(
            json.dumps(
                {
                    "groups": args.groups,
                    "nodes": len(m.nodes),
                    "edges": len(m.edges),
                    "html_bytes": path.stat().st_size,
                    "load_ms_median": statistics.median(loads),
                    "load_ms": loads,
                    "phases_ms_median": {k: round(statistics.median(p[k] for p in phases)) for k in phases[0]},
                    "loadavg": os.getloadavg(),
                },
                indent=1,
            )
        )


if __name__ == "__main__":
    main()
