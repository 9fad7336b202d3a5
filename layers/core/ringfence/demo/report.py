"""What the live demo measured and checked: steps with pass/fail, time-to-policy samples, and
``out/summary.json``."""

from __future__ import annotations

import json
import math
import statistics
import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

# where the time goes, in the order it is spent (docs/benchmarks.md, "Time to policy")
PHASES = ("event_delivery", "ingest", "perimeter", "compute", "publish", "push", "fetch", "apply")


@dataclass
class Check:
    what: str
    expected: str
    got: str
    passed: bool


@dataclass
class Sample:
    """One cloud change, from the change to the last affected agent enforcing it."""

    kind: str  # launch | tag_change | quarantine | terminate
    subject: str
    seconds: float | None  # None: not enforced within the timeout
    agents: int = 0  # affected agents (their applied revision had to move)
    phases: dict[str, float] = field(default_factory=dict)
    t0: float = 0.0  # wall clock of the change
    measuring: dict[str, float] = field(default_factory=dict)  # what measuring it cost (s)
    # the embedded AWS's busiest calls from the change to enforcement: "service.Action" →
    # [count, seconds moto spent answering them] (where a slow sample's time went)
    moto_calls: dict[str, list[float]] = field(default_factory=dict)


@dataclass
class Step:
    number: int
    title: str
    passed: bool = True
    seconds: float = 0.0
    checks: list[Check] = field(default_factory=list)
    timings: dict[str, Any] = field(default_factory=dict)
    error: str | None = None


def percentile(values: list[float], q: float) -> float:
    """Nearest-rank percentile (q in 0..100) of a non-empty list."""
    ordered = sorted(values)
    rank = max(1, math.ceil(q / 100 * len(ordered)))
    return ordered[rank - 1]


class Report:
    def __init__(self, out: Path, mode: str, quiet: bool = False, agent_start: str | None = None) -> None:
        self.out = out
        self.mode = mode
        self.agent_start = agent_start  # how the agents were started: "fork", "exec"
        self.started = time.time()
        self.steps: list[Step] = []
        self.samples: list[Sample] = []
        self.notes: list[str] = []
        self.quiet = quiet
        self.current: Step | None = None

    # --- the progress display: plain lines, flushed, time since start ----------------------------

    def say(self, msg: str) -> None:
        if not self.quiet:
            print(f"[{time.time() - self.started:6.1f}s] {msg}", flush=True)

    @contextmanager
    def step(self, number: int, title: str) -> Iterator[Step]:
        st = Step(number, title)
        self.steps.append(st)
        self.current = st
        if not self.quiet:
            print(f"\n== {number}. {title} " + "=" * max(0, 66 - len(title)), flush=True)
        t0 = time.perf_counter()
        try:
            yield st
        except Exception as exc:
            st.passed = False
            st.error = f"{type(exc).__name__}: {exc}"
            self.say(f"step {number} failed: {st.error}")
        except BaseException as exc:  # Ctrl-C / SIGTERM: the step did not finish
            st.passed = False
            st.error = f"interrupted ({type(exc).__name__})"
            raise
        finally:
            st.seconds = round(time.perf_counter() - t0, 3)
            self.current = None
            if not self.quiet:
                mark = "PASS" if st.passed else "FAIL"
                print(f"-- step {number}: {mark} in {st.seconds:.1f}s", flush=True)

    def check(self, what: str, expected: object, got: object, flow: bool = False) -> bool:
        """One expectation; ``flow``: booleans read allowed/blocked (else yes/no)."""
        passed = expected == got
        c = Check(what, _word(expected, flow), _word(got, flow), passed)
        if self.current is not None:
            self.current.checks.append(c)
            self.current.passed = self.current.passed and passed
        self.say(f"  {'ok ' if passed else 'BAD'} {what}: {c.got}" + ("" if passed else f" (expected {c.expected})"))
        return passed

    def sample(self, s: Sample) -> None:
        self.samples.append(s)
        if self.current is not None:
            self.current.timings.setdefault("samples", []).append(asdict(s))

    # --- summary -------------------------------------------------------------------------------

    def time_to_policy(self) -> dict[str, Any]:
        out: dict[str, Any] = {}
        for kind in sorted({s.kind for s in self.samples}):
            got = [s for s in self.samples if s.kind == kind]
            secs = [s.seconds for s in got if s.seconds is not None]
            entry: dict[str, Any] = {"n": len(got), "not_enforced": len(got) - len(secs)}
            if secs:
                entry.update(
                    p50_s=round(statistics.median(secs), 3),
                    p95_s=round(percentile(secs, 95), 3),
                    max_s=round(max(secs), 3),
                )
                phases: dict[str, float] = {}
                for ph in PHASES:
                    vals = [s.phases[ph] for s in got if ph in s.phases]
                    if vals:
                        phases[ph] = round(statistics.median(vals), 4)
                entry["phases_p50_s"] = phases
            out[kind] = entry
        return out

    @property
    def passed(self) -> bool:
        return bool(self.steps) and all(s.passed for s in self.steps)

    def write(self, extra: dict[str, Any] | None = None) -> Path:
        self.out.mkdir(parents=True, exist_ok=True)
        doc = {
            "passed": self.passed,
            "mode": self.mode,
            "agent_start": self.agent_start,
            "started": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(self.started)),
            "seconds": round(time.time() - self.started, 3),
            "steps": [asdict(s) for s in self.steps],
            "time_to_policy": self.time_to_policy(),
            "phases": list(PHASES),
            "notes": self.notes,
            **(extra or {}),
        }
        path = self.out / "summary.json"
        path.write_text(json.dumps(doc, indent=1) + "\n")
        return path

    def print_summary(self) -> None:
        if self.quiet:
            return
        print("\n== summary " + "=" * 68)
        for s in self.steps:
            bad = sum(not c.passed for c in s.checks)
            print(
                f"  {s.number}. {'PASS' if s.passed else 'FAIL'} {s.title} ({s.seconds:.1f}s, {len(s.checks)} checks"
                + (f", {bad} failed" if bad else "")
                + (f"; {s.error}" if s.error else "")
                + ")"
            )
        for kind, e in self.time_to_policy().items():
            if "p50_s" in e:
                where = ", ".join(f"{k} {v * 1000:.0f}ms" for k, v in e.get("phases_p50_s", {}).items())
                print(
                    f"  time to policy, {kind}: p50 {e['p50_s']:.2f}s p95 {e['p95_s']:.2f}s (n={e['n']})"
                    + (f"; p50 by phase: {where}" if where else "")
                )
        sys.stdout.flush()


def _word(v: object, flow: bool) -> str:
    if isinstance(v, bool):
        return ("allowed" if v else "blocked") if flow else ("yes" if v else "no")
    return str(v)
