"""``ringfence demo`` end to end, as a user runs it: the real CLI in a subprocess, as root (network
namespaces, nftables); asserts what it wrote to ``out/summary.json`` and that it leaves nothing
behind — also when interrupted with Ctrl-C half-way."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
import uuid
from pathlib import Path

import pytest

from ringfence.local.lab import prerequisites

pytestmark = [pytest.mark.dataplane, pytest.mark.slow]

_why = prerequisites()
if _why is not None:
    if os.environ.get("CI") == "true":
        raise RuntimeError(f"the live demo must run in CI but cannot: {_why}")
    pytest.skip(f"live demo skipped: {_why}", allow_module_level=True)

RINGFENCE = Path(sys.executable).parent / "ringfence"
STEPS = {0, 1, 2, 3, 4, 5, 6}


def _marked(mark: str) -> list[int]:
    """Pids whose environment carries ``mark`` (every process the demo started inherits it)."""
    found = []
    for d in Path("/proc").iterdir():
        if not d.name.isdigit() or int(d.name) == os.getpid():
            continue
        try:
            if mark.encode() in (d / "environ").read_bytes():
                found.append(int(d.name))
        except OSError:
            continue
    return found


def _namespaces(pid: int) -> list[str]:
    out = subprocess.run(["ip", "netns", "list"], capture_output=True, text=True, check=True).stdout
    return [line.split()[0] for line in out.splitlines() if line.startswith(f"rf{pid}x")]


# Ctrl-C as a terminal delivers it: a suite started in the background of a non-interactive shell
# (`make test &`) ignores SIGINT, every process it starts inherits that, and Python keeps an
# ignored SIGINT ignored; the demo is exec'd with the default disposition back
_WITH_SIGINT = (
    "import os, signal, sys; signal.signal(signal.SIGINT, signal.SIG_DFL); os.execv(sys.argv[1], sys.argv[1:])"
)


def _start(out: Path, mark: str, *options: str) -> subprocess.Popen[str]:
    return subprocess.Popen(
        [sys.executable, "-c", _WITH_SIGINT, str(RINGFENCE), "demo", "--out", str(out), *options],
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        env={**os.environ, "RINGFENCE_DEMO_TEST_MARK": mark},
    )


def test_the_live_demo_passes_and_writes_its_summary(tmp_path: Path) -> None:
    mark = uuid.uuid4().hex
    proc = _start(tmp_path, mark)
    try:
        output, _ = proc.communicate(timeout=600)
    finally:
        if proc.poll() is None:
            proc.kill()
    summary = json.loads((tmp_path / "summary.json").read_text())
    assert proc.returncode == 0, output[-4000:]
    assert summary["passed"] is True and summary["mode"] == "nftables"
    steps = {s["number"]: s for s in summary["steps"]}
    assert set(steps) == STEPS
    for s in steps.values():
        assert s["passed"] and s["error"] is None, s
    for n in (1, 2, 3, 4, 5, 6):
        assert steps[n]["checks"], f"step {n} checked nothing"
        assert all(c["passed"] for c in steps[n]["checks"])
    # step 1 is proved both ways: flows that must pass and flows that must not
    got = {c["got"] for c in steps[1]["checks"]}
    assert got == {"allowed", "blocked"}
    # step 2: three new instances, each enforcing, each reached by the load balancer
    assert len(steps[2]["timings"]["instances"]) == 3
    assert all(v["enforced_at"] for v in steps[2]["timings"]["instances"].values())
    # ... and at the moment each went InService its agent enforced and every ENI carried its
    # perimeter groups; compute released it (CONTINUE) only after both
    for name, v in steps[2]["timings"]["instances"].items():
        assert v["agent_enforcing_at_in_service"] and v["perimeter_at_in_service"], (name, v)
        assert v["perimeter_groups"] and all("rf-prod-boundary" in g for g in v["perimeter_groups"].values()), v
        assert v["release"] == "continue"
        assert 0 < v["perimeter_s_after_scale_out"] <= v["released_s_after_scale_out"], v
    perimeter = steps[2]["timings"]["perimeter"]
    assert "rf-prod-boundary" in perimeter["groups"]
    assert any("attached to" in line for line in perimeter["changes"]), perimeter
    # step 4: the open sessions were cut
    cut = [c for c in steps[4]["checks"] if c["what"].startswith("held session")]
    assert len(cut) == 2 and all(c["got"] == "no" for c in cut)
    # step 6: the Azure and GCP VMs through their event routes, packets both ways, the tag change
    # reaching the database's agent as a delta
    xc = steps[6]
    assert {c["got"] for c in xc["checks"] if c["what"].startswith(("az-", "gcp-"))} >= {"allowed", "blocked"}
    flows = {c["what"]: c["got"] for c in xc["checks"]}
    assert flows["az-ord-proc-1 → ord-prod-db-1 tcp/5432 (Azure processing → EC2 database)"] == "allowed"
    assert flows["gcp-pay-web-1 → ord-prod-db-1 tcp/5432 (GCP VM of another app (payroll))"] == "blocked"
    assert flows["az-ord-proc-1 → ord-prod-db-1 tcp/5432 (now web: web skips a tier, as on EC2)"] == "blocked"
    assert xc["timings"]["azure_vm"]["labels"] == {"app": "ordering", "env": "prod", "loc": "ca", "role": "processing"}
    assert xc["timings"]["gcp_vm"]["labels"]["app"] == "payroll"
    delta = xc["timings"]["db_delta"]["delta"]
    assert delta is not None and any(r.startswith("10.50.1.4") for r in delta["remove"]) and not delta["add"], delta
    ttp = summary["time_to_policy"]
    assert ttp["cross_cloud"]["n"] == 3 and ttp["cross_cloud"]["not_enforced"] == 0
    assert {"ingest", "push", "apply"} <= set(ttp["cross_cloud"]["phases_p50_s"])
    for kind in ("launch", "tag_change", "quarantine"):
        assert ttp[kind]["not_enforced"] == 0
        assert 0 < ttp[kind]["p50_s"] <= ttp[kind]["p95_s"]
        assert {"fetch", "apply"} <= set(ttp[kind]["phases_p50_s"])
    assert {"event_delivery", "ingest", "compute", "push"} <= set(ttp["tag_change"]["phases_p50_s"])
    # the dependency map, drawn from the flows the agents reported
    dm = summary["dependency_map"]
    assert (tmp_path / "map.html").is_file() and dm["from"] == "flows" and dm["flows"] > 0 and dm["edges"] > 0, dm
    # nothing left behind
    assert _namespaces(proc.pid) == []
    assert _marked(mark) == []


def test_ctrl_c_half_way_leaves_no_namespace_and_no_process(tmp_path: Path) -> None:
    mark = uuid.uuid4().hex
    # interrupted once its agents run (the most there is to clean up, and in 4 instances the same
    # kinds as in 20): the smallest estate, step 6's 4 instances, is reached soonest
    proc = _start(tmp_path, mark, "--steps", "6", "--instances", "used")
    lines = []
    try:
        assert proc.stdout is not None
        deadline = time.monotonic() + 300
        for line in proc.stdout:  # until the agents run: the most there is to clean up
            lines.append(line)
            if "booted" in line or time.monotonic() > deadline:
                break
        assert any("booted" in x for x in lines), "".join(lines)
        assert _namespaces(proc.pid), "the demo should be running its lab now"
        # the demo, moto, serve, the two probe helpers, the agents' template and its 4 agents
        assert len(_marked(mark)) >= 10
        proc.send_signal(signal.SIGINT)
        rest, _ = proc.communicate(timeout=120)
    finally:
        if proc.poll() is None:
            proc.kill()
    assert proc.returncode == 130, "".join(lines) + rest
    assert _namespaces(proc.pid) == []
    assert _marked(mark) == []
    summary = json.loads((tmp_path / "summary.json").read_text())
    assert summary["passed"] is False and any("interrupted" in n for n in summary["notes"])


def test_a_samples_moto_calls_name_the_busiest_and_count_all_but_the_long_polls() -> None:
    from ringfence.demo.live import ALL_CALLS, _busiest

    before = {"dynamodb.GetItem": (10, 0.5), "sqs.ReceiveMessage": (3, 40.0)}
    after = {"dynamodb.GetItem": (14, 0.7), "sqs.ReceiveMessage": (9, 100.0), "ec2.DescribeInstances": (2, 0.05)}
    got = _busiest(before, after, top=1)
    assert got == {"sqs.ReceiveMessage": [6, 60.0], ALL_CALLS: [6, 0.25]}
