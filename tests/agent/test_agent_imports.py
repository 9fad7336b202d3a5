"""The agent's entry points import no pydantic (nor the other heavy modules it can do without):
its idle memory is mostly its imports (docs/benchmarks.md, "Idle daemon"). ``cryptography`` is
only a fallback where the interpreter has no libcrypto loaded (not on Linux CPython)."""

from __future__ import annotations

import json
import signal
import subprocess
import sys
import time
from pathlib import Path

from tests.agent.bundles import GOLDEN, PUBLIC_KEY

# run the real CLI in a fresh interpreter; on exit, list the modules it loaded that it must not
PROBE = """
import atexit, json, sys
from ringfence_agent.cli import main

HEAVY = ("pydantic", "pydantic_core", "yaml", "ringfence.bundle", "ringfence.agentapi", "ringfence.model",
         "cryptography")

def report():
    with open(sys.argv[1], "w") as f:
        json.dump(sorted(m for m in sys.modules if m in HEAVY or m.startswith(tuple(h + "." for h in HEAVY))), f)

atexit.register(report)
sys.exit(main(sys.argv[2:]))
"""

PROC = GOLDEN / "bundle-ord-prod-proc-1.json"
DELTA = GOLDEN / "delta-ord-prod-proc-1-scale-out.json"


def _start(tmp_path: Path, name: str, *argv: str) -> tuple[subprocess.Popen[str], Path]:
    out = tmp_path / f"{name}.modules.json"
    proc = subprocess.Popen(
        [sys.executable, "-c", PROBE, str(out), *argv], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True
    )
    return proc, out


def _loaded(proc: subprocess.Popen[str], out: Path) -> list[str]:
    _, stderr = proc.communicate(timeout=60)
    assert proc.returncode == 0, stderr
    loaded: list[str] = json.loads(out.read_text())
    return loaded


def test_apply_and_apply_delta_import_no_pydantic(tmp_path: Path) -> None:
    common = ["--public-key", str(PUBLIC_KEY), "--backend", "dry-run", "--state-dir", str(tmp_path / "st")]
    assert _loaded(*_start(tmp_path, "apply", "apply", "--bundle", str(PROC), *common)) == []
    assert _loaded(*_start(tmp_path, "delta", "apply-delta", "--delta", str(DELTA), *common)) == []
    assert _loaded(*_start(tmp_path, "status", "status", "--state-dir", str(tmp_path / "st"))) == []


def test_running_daemon_imports_no_pydantic(tmp_path: Path) -> None:
    src = tmp_path / "src"
    (src / "bundles").mkdir(parents=True)
    (src / "bundles" / "ord-prod-proc-1.json").write_bytes(PROC.read_bytes())
    cfg = tmp_path / "agent.json"
    settings = {
        "workload_id": "ord-prod-proc-1",
        "public_key": str(PUBLIC_KEY),
        "state_dir": str(tmp_path / "st"),
        "backend": "dry-run",
        "source": str(src),
        "poll_interval": 1,
        "observe_interval": 0.2,
        "heartbeat_interval": 1,
        "report_interval": 1,
    }
    cfg.write_text(json.dumps(settings))
    assert _loaded(*_start(tmp_path, "once", "run", "--config", str(cfg), "--once")) == []
    # a daemon that ran for a while (sync, observation, heartbeats, reports), stopped by SIGTERM
    proc, out = _start(tmp_path, "daemon", "run", "--config", str(cfg))
    time.sleep(3)
    proc.send_signal(signal.SIGTERM)
    assert _loaded(proc, out) == []
    status = json.loads((tmp_path / "st" / "status.json").read_text())
    assert status["applied_version"] == 1 and status["daemon"]["pid"] is None
    # a YAML configuration needs the YAML parser, and nothing else heavy
    yml = tmp_path / "agent.yaml"
    yml.write_text("".join(f"{k}: {json.dumps(v)}\n" for k, v in settings.items()))
    loaded = _loaded(*_start(tmp_path, "yaml", "run", "--config", str(yml), "--once"))
    assert "yaml" in loaded and all(m == "yaml" or m.startswith("yaml.") for m in loaded), loaded
