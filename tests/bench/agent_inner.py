"""Runs INSIDE a lab namespace: times the agent's own apply paths in-process (no CLI start-up).

python agent_inner.py STATE_DIR BUNDLE DELTA_DIR BACKEND PUBLIC_KEY  → JSON on stdout

Deltas are timed end to end (``Agent.apply_delta``) and per phase, by wall clock around the
agent's own calls: signature check, kernel change, journal write (fdatasync), status file; the
rest (acceptance checks, cache updates) is what remains.
"""

from __future__ import annotations

import json
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from ringfence.bundlewire import Verifier, load_bundle, load_delta
from ringfence_agent.backends import make_backend
from ringfence_agent.core import Agent
from ringfence_agent.plan import LocalFailsafes, compile_plan
from ringfence_agent.state import StateDir


def timed(obj: object, name: str, into: list[float]) -> None:
    """Wrap one method of one object so that each call's wall time is appended to ``into``."""
    fn: Callable[..., Any] = getattr(obj, name)

    def wrapper(*args: Any, **kwargs: Any) -> Any:
        t = time.perf_counter()
        try:
            return fn(*args, **kwargs)
        finally:
            into.append(time.perf_counter() - t)

    setattr(obj, name, wrapper)


def quantiles(xs: list[float]) -> dict[str, float]:
    xs = sorted(xs)
    return {"p50": xs[len(xs) // 2], "p90": xs[int(len(xs) * 0.9)], "max": xs[-1]}


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
    phases: dict[str, list[float]] = {"verify": [], "kernel": [], "journal": [], "status": []}
    timed(agent.verifier, "verify", phases["verify"])
    timed(backend, "apply_delta", phases["kernel"])
    timed(agent.state, "append_delta", phases["journal"])
    timed(agent.state, "update_status", phases["status"])
    total: list[float] = []
    for p in sorted(delta_dir.glob("*.json"), key=lambda p: int(p.stem)):
        d = load_delta(p.read_bytes())
        s = time.perf_counter()
        agent.apply_delta(d)
        total.append(time.perf_counter() - s)
    rest = [t - sum(v[i] for v in phases.values()) for i, t in enumerate(total)]
    print(
        json.dumps(
            {
                "elements": sum(len(s.v4) + len(s.v6) for s in doc.sets.values()),
                "parse_s": t1 - t0,
                "apply_bundle_s": t2 - t1,
                "kernel_replace_s": t4 - t3,
                "deltas": len(total),
                "delta_median_s": quantiles(total)["p50"],
                "delta_p90_s": quantiles(total)["p90"],
                "delta_phases_s": {k: quantiles(v) for k, v in {**phases, "rest": rest}.items()},
            }
        )
    )


if __name__ == "__main__":
    main()
