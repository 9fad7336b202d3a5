"""The real ``ringfence serve --store sqlite:PATH`` and a real paired (dry-run) agent: a computation
that fails (``objects/`` full) is owed and retried, 1 s doubling up to ``RINGFENCE_COMPUTE_RETRY_MAX``,
until one succeeds. Before, the worker tried a batch three times 1-2 s apart and dropped it, and
the failure also turned off the hourly refresh (it ran only on a warm engine, which a failure
drops), so a quarantine acknowledged 200 while the disk was full never reached its host once
there was room again (not after 900 s), until an unrelated change or a restart. What is owed
shows in ``/metrics`` and, to an admin token only, on ``/healthz``.
"""

from __future__ import annotations

import contextlib
import os
import subprocess
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
from prometheus_client.parser import text_string_to_metric_families

from tests.agentproc import BIN, AgentProcess, wait_until
from tests.onprem.conftest import provision_estate
from tests.onprem.serveproc import TOKEN, Server

ADMIN = {"Authorization": f"Bearer {TOKEN}"}
WEB = "dc1-web-1"


def samples(server: Server) -> dict[str, float]:
    """Every sample of ``/metrics`` by name (counters' ``…_total``, gauges as named)."""
    text = httpx.get(f"{server.url}/metrics", headers=ADMIN, timeout=30).text
    return {s.name: s.value for family in text_string_to_metric_families(text) for s in family.samples}


def healthz(server: Server, headers: dict[str, str] | None = None) -> tuple[int, Any]:
    r = httpx.get(f"{server.url}/healthz", headers=headers or {}, timeout=30)
    return r.status_code, r.json()


@pytest.fixture
def objects_full(server: Server) -> Iterator[Callable[[], None]]:
    """Mounts a full tmpfs over the state directory's objects/ (called when wanted); unmounted at
    the end whatever happened."""
    if os.geteuid() != 0:
        pytest.skip("mounting a tmpfs needs root")
    objects = server.db.parent / "objects"

    def fill() -> None:
        subprocess.run(["mount", "-t", "tmpfs", "-o", "size=64k", "tmpfs", str(objects)], check=True)
        subprocess.run(["dd", "if=/dev/zero", f"of={objects / 'filler'}", "bs=4k"], capture_output=True, check=False)

    yield fill
    with contextlib.suppress(Exception):
        subprocess.run(["umount", "-l", str(objects)], check=False, capture_output=True)


@pytest.mark.slow
def test_a_quarantine_acknowledged_while_objects_is_full_reaches_the_agent_once_there_is_room(
    server: Server,
    paired_agent: Callable[..., AgentProcess],
    objects_full: Callable[[], None],
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setenv("RINGFENCE_COMPUTE_RETRY_MAX", "2")  # 30 s by default: the same, slower
    server.stop()
    server.start()
    provision_estate(server)
    agent = paired_agent(WEB)
    agent.wait_for(lambda s: s.get("applied_revision") and s.get("quarantined") is False, 60, "the first bundle")
    assert samples(server)["ringfence_compute_owed_seconds"] == 0
    assert healthz(server, ADMIN) == (200, {"ok": True})

    objects_full()
    r = server.admin("POST", f"/admin/workloads/{WEB}/quarantine", {"reason": "IR-9"})
    assert r.status_code == 200, r.text  # stored: the store itself has room
    # more failures than the three tries a batch had before: it is still being retried
    wait_until(lambda: samples(server)["ringfence_compute_failed_total"] >= 5, 60, "compute retried", server.log)
    assert samples(server)["ringfence_compute_owed_seconds"] > 0
    # serving still; why it is behind, to an admin token only
    assert healthz(server) == (200, {"ok": True})
    assert healthz(server, {"Authorization": "Bearer not-an-admin-token"}) == (200, {"ok": True})
    status, told = healthz(server, ADMIN)
    assert status == 200 and told["ok"] is True, told
    owed = told["compute"]
    assert owed["error"].startswith("objects/: "), owed
    assert owed["failures"] >= 5 and owed["owed_seconds"] > 0 and 0 <= owed["retry_in_seconds"] <= 2, owed
    assert agent.status()["quarantined"] is False

    # room again, and no other change made: the owed computation delivers the quarantine
    subprocess.run(["umount", "-l", str(server.db.parent / "objects")], check=True)
    agent.wait_for(lambda s: s.get("quarantined") is True, 60, "the quarantine, once there is room")
    assert samples(server)["ringfence_compute_owed_seconds"] == 0
    assert healthz(server, ADMIN) == (200, {"ok": True})
    assert "compute caught up after" in server.log.read_text()


@pytest.mark.parametrize("value", ["30s", "0", "nan", "3601"])
def test_a_retry_cap_that_is_not_seconds_stops_the_start_naming_it(tmp_path: Path, value: str) -> None:
    env = {**os.environ, "RINGFENCE_COMPUTE_RETRY_MAX": value}
    db = tmp_path / "state" / "state.db"
    p = subprocess.run(
        [str(BIN / "ringfence"), "serve", "--port", "0", "--store", f"sqlite:{db}"],
        capture_output=True,
        text=True,
        env=env,
        timeout=60,
    )
    assert p.returncode == 1
    assert p.stderr.strip().splitlines()[-1] == (
        f"error: RINGFENCE_COMPUTE_RETRY_MAX={value!r}: must be a number of seconds from 0.1 to 3600"
    )
    assert not db.exists()
