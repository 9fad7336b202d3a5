"""Two boot faults that used to hold the host without its rules, against the real daemon with
real nftables in network namespaces (the style of test_agent_boot_faults.py):

- a resolver that never answers: the control plane's name was looked up (twice) before READY=1,
  so under ``Type=notify`` systemd's start timeout, not the agent, decided when the host got its
  rules; the boot lookup now has a deadline (``BOOT_RESOLVE_S``) and the daemon enforces, says
  READY=1, and follows the name later;
- a config file that cannot be loaded (missing, not JSON, an invalid value): ``run`` exited
  before programming anything, the host open after a reboot; now the daemon enforces the last
  configuration that loaded (its last known good), or without one the fail-safe posture, says
  why in its status and log, and loads the file again until it can (then starts over with it).

h2 is the protected workload ("web", tcp/8080 from clients); h1 a client, h3 the database (no
access to h2:8080), adm the admin host (tcp/22), dns a resolver that never answers."""

from __future__ import annotations

import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from ringfence.local.lab import Lab as NetLab
from ringfence.local.lab import Probe as P
from ringfence.local.lab import wait_until
from ringfence_agent.daemon import STOP_GRACE_S
from tests.agent import dataplane
from tests.agent.agentdaemon import boot_config, spawn_daemon
from tests.agent.bundles import LAB_POLICY, PUBLIC_KEY, Lab, workloads, write

pytestmark = pytest.mark.dataplane

dataplane.require()

HOSTS = {"h1": 1, "h2": 2, "h3": 3, "adm": 250, "dns": 53}
ROLES = {"h1": "client", "h2": "web", "h3": "db"}

SILENT_RESOLVER = """
import socket, time
u = socket.socket(socket.AF_INET, socket.SOCK_DGRAM); u.bind(("0.0.0.0", 53))
t = socket.socket(); t.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1); t.bind(("0.0.0.0", 53)); t.listen(16)
print("ready", flush=True)
time.sleep(3600)
"""


@pytest.fixture(scope="module")
def net() -> Iterator[NetLab]:
    with dataplane.lab(HOSTS, {"h2": [22, 8080]}) as lab:
        etc = Path("/etc/netns") / lab.ns("h2")
        try:
            # takes every query, answers none (glibc waits timeout × attempts per query)
            resolver = lab.spawn("dns", sys.executable, "-c", SILENT_RESOLVER, stdout=subprocess.PIPE)
            assert resolver.stdout is not None and resolver.stdout.readline().strip() == "ready"
            etc.mkdir(parents=True, exist_ok=True)
            (etc / "hosts").write_text("127.0.0.1 localhost\n")
            (etc / "resolv.conf").write_text(f"nameserver {lab.v4('dns')}\noptions timeout:5 attempts:3\n")
            yield lab
        finally:
            shutil.rmtree(etc, ignore_errors=True)


clean = dataplane.reset_fixture("h2")


def config(net: NetLab, work: Path, state: Path, **extra: Any) -> dict[str, Any]:
    return boot_config(net, work, state, **{"request_timeout": 2, **extra})


def posture_held(net: NetLab) -> bool:
    """The fail-safe posture: nothing reaches h2's service (and with an admin range configured,
    the admin host reaches tcp/22: checked by the callers that configure one)."""
    return net.reach([P("h1", "h2", 8080), P("h3", "h2", 8080)], timeout=0.3) == [False, False]  # at once


def lkg_enforced(net: NetLab) -> bool:
    return not net.tcp("h3", "h2", 8080, timeout=0.3) and net.tcp("h1", "h2", 8080)


def stop(net: NetLab, daemon: Any) -> None:
    net.kill(daemon, 15)


@pytest.mark.slow
def test_a_resolver_that_never_answers_does_not_hold_ready_or_the_rules(net: NetLab, tmp_path: Path) -> None:
    """The control plane is a host name and h2's resolver takes queries and answers none (glibc
    would wait 15 s per lookup): READY=1 comes within the boot deadline plus a start, and at that
    moment the kernel already holds the fail-safe posture; the daemon goes on (and says so)."""
    state = tmp_path / "state"
    cfg = config(net, tmp_path, state, source="https://cp.silent-resolver.test")
    (tmp_path / "agent.json").write_text(json.dumps(cfg))
    sockdir = Path(tempfile.mkdtemp(prefix="rfn-", dir="/tmp"))  # AF_UNIX paths are short
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    daemon = None
    try:
        sock.bind(str(sockdir / "notify"))
        sock.settimeout(60)
        started = time.monotonic()
        daemon, log = spawn_daemon(
            net, tmp_path, tmp_path / "agent.json", env={"NOTIFY_SOCKET": str(sockdir / "notify")}
        )
        message = sock.recv(4096).decode()
        took = time.monotonic() - started
        ruleset = net.exec("h2", "nft", "list", "table", "inet", "ringfence")
        assert "READY=1" in message.splitlines(), message
        assert ruleset.returncode == 0 and "drop" in ruleset.stdout, (message, log.read_text())
        assert "STATUS=holding the fail-safe posture" in message, message
        # BOOT_RESOLVE_S (2.5 s) plus the interpreter's start and one nft apply, with CI margin;
        # without the deadline: two lookups of 15 s each
        assert took < 9, f"READY=1 after {took:.1f}s: the boot waited for the resolver\n{log.read_text()}"
        assert posture_held(net) and net.tcp("adm", "h2", 22)
        assert "did not resolve" in log.read_text(), log.read_text()
        time.sleep(3)
        assert daemon.poll() is None, log.read_text()
        # SIGTERM with a lookup of the silent resolver in flight (15 s; no signal ends one): the
        # daemon used to outlive it; now it exits within STOP_GRACE_S, the rules left in force
        signalled = time.monotonic()
        os.killpg(daemon.pid, signal.SIGTERM)
        assert daemon.wait(30) == 0
        assert time.monotonic() - signalled < STOP_GRACE_S + 3, log.read_text()
        assert "stopping now: a network call" in log.read_text() or "stopped;" in log.read_text()
        assert posture_held(net) and net.tcp("adm", "h2", 22)
    finally:
        sock.close()
        shutil.rmtree(sockdir, ignore_errors=True)
        if daemon is not None:
            net.kill(daemon)


BROKEN = {
    "missing": None,
    "garbage": "{not json",
    "invalid": json.dumps({"workload_id": "h2", "public_key": str(PUBLIC_KEY), "poll_interval": -5}),
}


def lab_engine(net: NetLab) -> Lab:
    return Lab(LAB_POLICY, workloads({h: (net.v4(h), net.v6(h), role) for h, role in ROLES.items()}))


def break_config(cfg_file: Path, broken: str) -> None:
    content = BROKEN[broken]
    if content is None:
        cfg_file.unlink()
    else:
        cfg_file.write_text(content)


def daemon_status(state: Path) -> dict[str, Any]:
    try:
        return dict(json.loads((state / "status.json").read_text()))
    except (OSError, ValueError):
        return {}


@pytest.mark.parametrize("broken", list(BROKEN))
def test_a_config_that_does_not_load_enforces_the_last_good_and_starts_over_once_it_loads(
    net: NetLab, tmp_path: Path, broken: str
) -> None:
    """A host that ran with a good config (its last known good and the config kept in the state
    directory), rebooted (the kernel forgot its rules) with the config file missing, not JSON, or
    with an invalid value: the daemon used to exit before programming anything — the host open.
    Now the kernel holds the last known good, the log and status name the file and the problem,
    the daemon keeps running, and once the file loads again it starts over with it (same pid)."""
    state = tmp_path / "state"
    cfg_file = tmp_path / "agent.json"
    good = json.dumps(config(net, tmp_path, state))
    cfg_file.write_text(good)
    write(lab_engine(net).bundle("h2"), tmp_path / "src" / "bundles" / "h2.json")
    daemon, log = spawn_daemon(net, tmp_path, cfg_file)
    try:
        assert wait_until(lambda: lkg_enforced(net), 15), log.read_text()
    finally:
        stop(net, daemon)
    assert (state / "config.last-good.json").is_file()
    net.reset("h2")  # the reboot
    assert net.tcp("h3", "h2", 8080), "the reboot left rules behind"
    break_config(cfg_file, broken)
    daemon, log = spawn_daemon(net, tmp_path, cfg_file, "--state-dir", str(state))
    try:
        assert wait_until(lambda: "re-applied last known good" in log.read_text(), 15), log.read_text()
        assert lkg_enforced(net) and net.tcp("adm", "h2", 22), log.read_text()
        text = log.read_text()
        assert f"ERROR: config {cfg_file} not loaded" in text and "last configuration that loaded" in text, text
        status = daemon_status(state)
        assert status["daemon"]["config_error"] and f"config {cfg_file} not loaded" in status["last_error"], status
        time.sleep(2)
        assert daemon.poll() is None, log.read_text()
        # the file fixed: loaded within CONFIG_RETRY_S, the daemon starts over with it, same pid
        cfg_file.write_text(good)
        assert wait_until(lambda: "loads now: starting over" in log.read_text(), 15), log.read_text()
        assert wait_until(lambda: log.read_text().count("re-applied last known good") == 2, 15), log.read_text()
        assert wait_until(lambda: daemon_status(state).get("daemon", {}).get("config_error", 1) is None, 10)
        assert daemon.poll() is None and lkg_enforced(net), log.read_text()
    finally:
        stop(net, daemon)


@pytest.mark.parametrize("broken", list(BROKEN))
def test_a_config_that_never_loaded_holds_the_failsafe_posture(net: NetLab, tmp_path: Path, broken: str) -> None:
    """A first boot with a broken config file (no configuration ever loaded): the daemon holds the
    fail-safe posture — nothing reaches h2, h2 reaches nothing — and says why; not the open host
    it used to leave."""
    state = tmp_path / "state"
    cfg_file = tmp_path / "agent.json"
    cfg_file.write_text("{}")
    break_config(cfg_file, broken)
    assert net.tcp("h3", "h2", 8080), "open before the agent starts"
    daemon, log = spawn_daemon(net, tmp_path, cfg_file, "--state-dir", str(state))
    try:
        assert wait_until(lambda: "holding the fail-safe posture" in log.read_text(), 15), log.read_text()
        # the config error (which names the posture) is logged before the posture is applied
        assert wait_until(lambda: posture_held(net), 10), log.read_text()
        ruleset = net.exec("h2", "nft", "list", "table", "inet", "ringfence")
        assert ruleset.returncode == 0 and "drop" in ruleset.stdout
        text = log.read_text()
        assert f"ERROR: config {cfg_file} not loaded" in text and "no last good configuration" in text, text
        status = daemon_status(state)
        assert status["posture"] == "failsafe" and status["daemon"]["config_error"], status
        assert f"config {cfg_file} not loaded" in status["last_error"], status
        time.sleep(2)
        assert daemon.poll() is None, log.read_text()
    finally:
        stop(net, daemon)
