"""The lab's hypervisor (``ringfence.local.fleet``): instances come and go as moto says."""

from __future__ import annotations

import subprocess
import sys
import time
from pathlib import Path
from typing import Any

from ringfence.local.aws import Estate, EstateInstance
from ringfence.local.fleet import Fleet, FleetConfig

# an "agent" that ignores SIGTERM, as one in the middle of a long-poll answers it late
STUBBORN = "import signal, time; signal.signal(signal.SIGTERM, signal.SIG_IGN); time.sleep(120)"


def test_terminated_instances_power_off_together_and_new_ones_boot_in_the_same_look(tmp_path: Path) -> None:
    """Five instances terminate while five launch: their agents get SIGTERM together, then
    SIGKILL after the grace (one by one, waiting for each, held up the next scale-out's boots for
    a minute), and the new instances have agents when the same look returns."""
    started: list[subprocess.Popen[Any]] = []

    def start(*cmd: str, **kw: Any) -> subprocess.Popen[Any]:
        p = subprocess.Popen([sys.executable, "-c", STUBBORN], start_new_session=True, **kw)
        started.append(p)
        return p

    estate = {f"i-old{k}": EstateInstance("running", f"10.0.0.{k}", {"Name": f"old-{k}"}) for k in range(5)}
    fleet = Fleet(
        FleetConfig(api_url="http://127.0.0.1:9", public_key=tmp_path / "k.pem", workdir=tmp_path, fork_agents=False),
        lambda: Estate(instances=dict(estate), groups={}),
        lab=None,
        traffic=None,
        start_process=start,
    )
    try:
        booted, _ = fleet.sync()
        assert sorted(i.id for i in booted) == sorted(estate) and len(started) == 5
        old = list(started)
        estate.clear()
        estate.update({f"i-new{k}": EstateInstance("pending", f"10.0.1.{k}", {}) for k in range(5)})
        t = time.monotonic()
        booted, destroyed = fleet.sync()
        took = time.monotonic() - t
        assert sorted(i.id for i in destroyed) == [f"i-old{k}" for k in range(5)]
        assert sorted(i.id for i in booted) == sorted(estate) and sorted(fleet.instances) == sorted(estate)
        assert all(p.poll() is not None for p in old), "every terminated instance's agent is gone"
        assert took < 4.0, f"one grace for all five, not one each ({took:.1f} s)"
    finally:
        for p in started:
            p.kill()
            p.wait()
