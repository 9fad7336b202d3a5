"""A real ``ringfence-agent run`` process for tests against a real control plane (``ringfence
serve`` over moto or SQLite): its config written, started, its status read, stopped. Used through
the ``agent_process`` fixture (tests/conftest.py), which stops every agent a test started."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

BIN = Path(sys.executable).parent
POLL_INTERVAL = 300.0  # the agent's slow poll: anything sooner came by the long-poll


def wait_until(check: Callable[[], Any], timeout: float, what: str, log: Path | None = None) -> Any:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        got = check()
        if got:
            return got
        time.sleep(0.1)
    raise AssertionError(f"{what} within {timeout}s" + (f"\n--- agent log:\n{log.read_text()}" if log else ""))


def agent_status(state: Path) -> dict[str, Any]:
    """``ringfence-agent status --json`` of a state directory ({} before the agent wrote one)."""
    out = subprocess.run(
        [str(BIN / "ringfence-agent"), "status", "--state-dir", str(state), "--json"],
        capture_output=True,
        text=True,
        check=False,
    )
    return json.loads(out.stdout) if out.returncode == 0 else {}


@dataclass
class AgentProcess:
    proc: subprocess.Popen[bytes]
    state: Path
    log: Path

    def status(self) -> dict[str, Any]:
        return agent_status(self.state)

    def wait_for(self, check: Callable[[dict[str, Any]], Any], timeout: float, what: str) -> Any:
        """Until ``check(status)`` is truthy (its value), or fail with the agent's log."""
        return wait_until(lambda: check(self.status()), timeout, what, self.log)

    def alive(self) -> bool:
        return self.proc.poll() is None

    def poll(self) -> int | None:
        return self.proc.poll()

    def stop(self, timeout: float = 40) -> None:
        """SIGTERM: the agent ends a request in flight (a long-poll) and stops at once."""
        if self.proc.poll() is not None:
            return
        self.proc.terminate()
        try:
            self.proc.wait(timeout)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait(5)


def start_agent(
    workdir: Path,
    *,
    workload_id: str,
    public_key: Path,
    api_url: str,
    enroll: dict[str, Any],
    clean_env: bool = False,
    **overrides: Any,
) -> AgentProcess:
    """A dry-run agent of ``workload_id`` in ``workdir`` (agent.json, state/, agent.log), slow
    poll off (``POLL_INTERVAL``) so that only push can explain a quick change. ``clean_env``: no
    ``AWS_*``/``RINGFENCE_*`` variables (the agent must not lean on the control plane's)."""
    state = workdir / "state"
    cfg = {
        "workload_id": workload_id,
        "public_key": str(public_key),
        "state_dir": str(state),
        "backend": "dry-run",
        "api_url": api_url,
        "enroll": enroll,
        "poll_interval": POLL_INTERVAL,
        "wait_timeout": 8,
        "heartbeat_interval": 2,
        "request_timeout": 10,
        **overrides,
    }
    (workdir / "agent.json").write_text(json.dumps(cfg))
    log = workdir / "agent.log"
    env = {k: v for k, v in os.environ.items() if not (clean_env and k.startswith(("AWS_", "RINGFENCE_")))}
    with log.open("w") as err:
        proc = subprocess.Popen(
            [str(BIN / "ringfence-agent"), "run", "--config", str(workdir / "agent.json")],
            stdout=subprocess.DEVNULL,
            stderr=err,
            env=env,
        )
    return AgentProcess(proc, state, log)
