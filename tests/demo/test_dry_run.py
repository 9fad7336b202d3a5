"""``ringfence demo --dry-run`` (what runs without root): the same loop with dry-run agents in
this namespace; every step's checks are judged on the plans the agents applied. Every step runs,
on the example's instances they probe or change (``--instances used``: 12 of 20, the 8 that no
step names left out); the whole estate is the live demo's test (``test_live.py``)."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

pytestmark = pytest.mark.slow

RINGFENCE = Path(sys.executable).parent / "ringfence"


def test_the_dry_run_demo_passes_on_the_agents_applied_bundles(tmp_path: Path) -> None:
    proc = subprocess.run(
        [str(RINGFENCE), "demo", "--dry-run", "--instances", "used", "--out", str(tmp_path)],
        capture_output=True,
        text=True,
        timeout=600,
        check=False,
    )
    assert proc.stdout.splitlines()[0].startswith("ringfence demo: --dry-run: dry-run agents"), proc.stdout[:500]
    summary = json.loads((tmp_path / "summary.json").read_text())
    assert proc.returncode == 0, proc.stdout[-4000:]
    assert summary["passed"] is True and summary["mode"] == "dry-run" and summary["agent_start"] == "fork"
    steps = {s["number"]: s for s in summary["steps"]}
    assert set(steps) == {0, 1, 2, 3, 4, 5, 6} and steps[0]["timings"]["instances"] == 12
    assert all(s["passed"] for s in steps.values()), [s for s in steps.values() if not s["passed"]]
    assert {c["got"] for c in steps[1]["checks"]} == {"allowed", "blocked"}
    assert any(c["what"] == "its agent applied the quarantine bundle" and c["passed"] for c in steps[4]["checks"])
    # the launch gate: at InService each new instance's agent enforced and its ENIs carried the
    # perimeter groups (moto's security groups are real in a dry run too)
    for v in steps[2]["timings"]["instances"].values():
        assert v["agent_enforcing_at_in_service"] and v["perimeter_at_in_service"] and v["release"] == "continue", v
    assert "rf-prod-boundary" in steps[2]["timings"]["perimeter"]["groups"]
    for kind in ("launch", "tag_change", "quarantine", "cross_cloud"):
        assert summary["time_to_policy"][kind]["not_enforced"] == 0
    # step 6 runs dry, and says so in one line; its flows are judged on the EC2 ends' plans
    assert "dry run: the Azure and GCP VMs get no namespace" in proc.stdout
    assert {c["got"] for c in steps[6]["checks"] if " → " in c["what"]} == {"allowed", "blocked"}
    assert steps[6]["timings"]["db_delta"]["delta"] is not None
    # dry-run agents see no packet: the map shows what policy allows
    assert (tmp_path / "map.html").is_file() and summary["dependency_map"]["edges"] > 0
