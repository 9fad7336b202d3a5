"""Step 6 of ``ringfence demo`` (cross-cloud) reports a failed expectation: the step fails with the
check that failed (expected and got) in ``out/summary.json``, and the demo exits 1.

The demo runs dry (no root needed) in a subprocess, step 6 alone (``--steps 6``) on the instances
it uses (``--instances used``: 4 of the example's 20), with the Azure VM mis-tagged ``role=web``
from the start: the policy does not let web reach the database, so the step's first flow (Azure →
the ordering database on 5432, expected allowed) is blocked."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

pytestmark = pytest.mark.slow

_RUN = """
import argparse, sys
from ringfence.demo import crosscloud, live

crosscloud.AZURE_TAGS = {**crosscloud.AZURE_TAGS, "ringfence:role": "web"}  # web may not reach the database
args = argparse.Namespace(out=sys.argv[1], dry_run=True, example=None, bench=False, steps="6", instances="used")
sys.exit(live.run(args))
"""


def test_a_failed_cross_cloud_expectation_fails_the_step_and_the_demo(tmp_path: Path) -> None:
    proc = subprocess.run(
        [sys.executable, "-c", _RUN, str(tmp_path)], capture_output=True, text=True, timeout=600, check=False
    )
    assert proc.returncode == 1, proc.stdout[-4000:] + proc.stderr[-4000:]
    summary = json.loads((tmp_path / "summary.json").read_text())
    assert summary["passed"] is False
    steps = {s["number"]: s for s in summary["steps"]}
    assert set(steps) == {0, 6} and steps[0]["timings"]["instances"] == 4
    assert steps[0]["passed"] and steps[6]["passed"] is False
    assert steps[6]["error"] is None, "an expectation failed, not the step's code"
    checks = {c["what"]: c for c in steps[6]["checks"]}
    flow = checks["az-ord-proc-1 → ord-prod-db-1 tcp/5432 (Azure processing → EC2 database)"]
    assert (flow["expected"], flow["got"], flow["passed"]) == ("allowed", "blocked", False)
    labels = checks["az-ord-proc-1's labels (tags, loc from its region)"]
    assert labels["passed"] is False and "role=web" in labels["got"]
    # the events were still taken and refused ones refused: only what the policy decides differs
    assert checks["POST /azure/events took the VM's write event"]["passed"]
    assert checks["Event Grid delivery without the delivery secret refused (HTTP)"]["passed"]
    assert "BAD az-ord-proc-1 → ord-prod-db-1 tcp/5432" in proc.stdout
    assert "6. FAIL cross-cloud" in proc.stdout and "FAILED:" in proc.stdout
