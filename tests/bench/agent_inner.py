"""Runs INSIDE a lab namespace: times the agent's own apply paths in-process (no CLI start-up).

python agent_inner.py STATE_DIR BUNDLE DELTA_DIR BACKEND  → JSON on stdout
"""

from __future__ import annotations

import json
import sys
import time
from pathlib import Path

from ringfence.bundlewire import Verifier, load_bundle, load_delta
from ringfence_agent.backends import make_backend
from ringfence_agent.core import Agent
from ringfence_agent.plan import LocalFailsafes, compile_plan
from ringfence_agent.state import StateDir


def main() -> None:
    state, bundle_path, delta_dir, backend_name = Path(sys.argv[1]), Path(sys.argv[2]), Path(sys.argv[3]), sys.argv[4]
    backend = make_backend(backend_name)
    agent = Agent(
        None, Verifier.from_file(Path(sys.argv[5])), backend, StateDir(state), LocalFailsafes(), log=lambda m: None
    )
    t0 = time.perf_counter()
    doc = load_bundle(bundle_path.read_bytes())
    t1 = time.perf_counter()
    agent.apply_bundle(doc)
    t2 = time.perf_counter()
    plan = compile_plan(doc, LocalFailsafes())
    t3 = time.perf_counter()
    backend.apply(plan)  # the kernel transaction alone (replace with identical content)
    t4 = time.perf_counter()
    deltas = []
    for p in sorted(delta_dir.glob("*.json"), key=lambda p: int(p.stem)):
        d = load_delta(p.read_bytes())
        s = time.perf_counter()
        agent.apply_delta(d)
        deltas.append(time.perf_counter() - s)
    deltas.sort()
    print(
        json.dumps(
            {
                "elements": sum(len(s.v4) + len(s.v6) for s in doc.sets.values()),
                "parse_s": t1 - t0,
                "apply_bundle_s": t2 - t1,
                "kernel_replace_s": t4 - t3,
                "delta_median_s": deltas[len(deltas) // 2],
                "delta_p90_s": deltas[int(len(deltas) * 0.9)],
                "deltas": len(deltas),
            }
        )
    )


if __name__ == "__main__":
    main()
