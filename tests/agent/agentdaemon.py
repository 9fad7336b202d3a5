"""A real ``ringfence-agent run`` in a lab namespace, fed one bundle from a static source directory
(no control plane): what the attack tests on the daemon's kernel reads start from; and the
configuration and start of the boot tests' daemon (test_agent_boot_*.py)."""

from __future__ import annotations

import json
import subprocess
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from ringfence.bundle import Bundle
from ringfence.local.lab import AGENT
from ringfence.local.lab import Lab as NetLab
from tests.agent.bundles import PUBLIC_KEY, write


@dataclass(frozen=True)
class Daemon:
    proc: subprocess.Popen[Any]
    state: Path  # its state directory
    log: Path  # its stderr

    def said(self) -> str:
        return self.log.read_text()


@contextmanager
def running_daemon(net: NetLab, tmp_path: Path, doc: Bundle, host: str = "h2", **settings: Any) -> Iterator[Daemon]:
    """The daemon of ``host`` (nftables) enforcing ``doc``, stopped by SIGTERM on leaving.
    ``settings`` override the config's (polled every 300 s: after the start only the drift check,
    the heartbeat and the observer read the kernel)."""
    src = tmp_path / "src"
    write(doc, src / "bundles" / f"{host}.json")
    state = tmp_path / "state"
    config = {
        "workload_id": host,
        "public_key": str(PUBLIC_KEY),
        "state_dir": str(state),
        "backend": "nftables",
        "source": str(src),
        "poll_interval": 300,
        "observe_interval": 0.3,
        "heartbeat_interval": 1,
        **settings,
    }
    cfg = tmp_path / "agent.json"
    cfg.write_text(json.dumps(config))
    log = tmp_path / "run.log"
    with log.open("w") as err:
        proc = net.spawn(host, str(AGENT), "run", "--config", str(cfg), stderr=err)
    try:
        yield Daemon(proc, state, log)
    finally:
        net.kill(proc, 15)


def boot_config(net: NetLab, work: Path, state: Path, **settings: Any) -> dict[str, Any]:
    """The configuration of the boot tests' daemon in h2: nftables over the empty static source
    ``work/src`` (made here), polled every second, the admin host ``adm`` admitted to tcp/22;
    ``settings`` override or add to it."""
    (work / "src").mkdir(exist_ok=True)
    return {
        "workload_id": "h2",
        "public_key": str(PUBLIC_KEY),
        "state_dir": str(state),
        "backend": "nftables",
        "source": str(work / "src"),
        "poll_interval": 1,
        "observe_interval": 1,
        "backoff_max": 1,
        "dhcp": False,
        "admin_cidrs": [f"{net.v4('adm')}/32"],
        "admin_ports": ["tcp/22"],
        **settings,
    }


def spawn_daemon(
    net: NetLab, work: Path, cfg_file: Path, *more: str, env: dict[str, str] | None = None
) -> tuple[subprocess.Popen[Any], Path]:
    """``ringfence-agent run --config cfg_file more...`` in h2, its stderr in ``work/agent.log``:
    the process and its log (the lab kills it on close)."""
    log = work / "agent.log"
    daemon = net.spawn("h2", str(AGENT), "run", "--config", str(cfg_file), *more, stderr=log.open("w"), env=env)
    return daemon, log
