"""The daemon never fails open at start, whatever it finds on disk or in the kernel: the real
``ringfence-agent run`` in a network namespace with real nftables, after a "reboot" (the kernel
forgot its rules, the state directory did not), facing one fault at a time — the kernel refusing
its table for a while, a full or read-only state filesystem, an unusable pinned key, a state file
that is a FIFO or a symlink to /dev/zero. Each ends enforcing the last known good or the fail-safe
posture, and the daemon keeps running. Under ``Type=notify`` it tells systemd it is ready only
once the kernel holds its rules.

h2 is the protected workload ("web", tcp/8080 from clients); h1 a client, h3 the database (no
access to h2:8080), h4 a stranger made a client by a delta, adm the admin host (tcp/22)."""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import socket
import subprocess
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from ringfence.local.lab import Lab as NetLab
from ringfence.local.lab import sh, wait_until
from ringfence.model import Workload
from tests.agent import dataplane
from tests.agent.agentdaemon import boot_config, spawn_daemon
from tests.agent.bundles import LAB_POLICY, PUBLIC_KEY, Lab, workloads, write
from tests.systemdunit import service

pytestmark = pytest.mark.dataplane

dataplane.require()

HOSTS = {"h1": 1, "h2": 2, "h3": 3, "h4": 4, "adm": 250}
ROLES = {"h1": "client", "h2": "web", "h3": "db", "h4": "other"}
UNIT = Path(__file__).resolve().parents[2] / "agent" / "packaging" / "ringfence-agent.service"


net = dataplane.lab_fixture(HOSTS, {"h2": [22, 8080]})
clean = dataplane.reset_fixture("h2")


def lab_engine(net: NetLab) -> Lab:
    return Lab(LAB_POLICY, workloads({h: (net.v4(h), net.v6(h), role) for h, role in ROLES.items()}))


def ok(proc: subprocess.CompletedProcess[str]) -> str:
    assert proc.returncode == 0, proc.stderr
    return proc.stdout


def seed(net: NetLab, state: Path, work: Path, key: Path = PUBLIC_KEY, delta: bool = False) -> None:
    """A last known good in ``state`` (the lab bundle, and with ``delta`` a delta making h4 a
    client, then that delta again, stale, as a crash may leave it), then a "reboot": the kernel
    forgets, the state directory keeps it."""
    lab = lab_engine(net)
    common = ["--public-key", str(key), "--backend", "nftables", "--state-dir", str(state)]
    ok(net.agent("h2", "apply", "--bundle", str(write(lab.bundle("h2"), work / "b.json")), *common))
    if delta:
        h4 = Workload(
            id="h4", ips=[net.v4("h4"), net.v6("h4")], tags={"ringfence:role": "client", "ringfence:app": "lab"}
        )
        files = [str(write(d, work / f"d{i}.json")) for i, d in enumerate(lab.upsert(h4))]
        ok(net.agent("h2", "apply-delta", *(a for f in files for a in ("--delta", f)), *common))
        journal = state / "deltas.jsonl"
        lines = journal.read_bytes().splitlines(keepends=True)
        journal.write_bytes(b"".join([*lines, lines[-1]]))  # no longer fits: cut at the next start
    net.reset("h2")
    assert net.tcp("h3", "h2", 8080), "the reboot left rules behind"


def start(net: NetLab, work: Path, state: Path, env: dict[str, str] | None = None, **extra: Any) -> tuple[Any, Path]:
    """The daemon in h2 over an empty static source (the control plane is out of reach)."""
    cfg = boot_config(net, work, state, **extra)
    if "api_url" in extra:
        del cfg["source"]
    (work / "agent.json").write_text(json.dumps(cfg))
    return spawn_daemon(net, work, work / "agent.json", env=env)


def lkg_enforced(net: NetLab, h4_client: bool = False) -> bool:
    """The lab bundle holds: h1 in, h3 out (and h4 in, once the delta made it a client)."""
    return (
        not net.tcp("h3", "h2", 8080, timeout=0.3)
        and net.tcp("h1", "h2", 8080)
        and (net.tcp("h4", "h2", 8080) if h4_client else True)
    )


def posture_held(net: NetLab) -> bool:
    """The fail-safe posture: the admin host on tcp/22, nothing else."""
    return not net.tcp("h1", "h2", 8080, timeout=0.3) and not net.tcp("h3", "h2", 8080) and net.tcp("adm", "h2", 22)


def stop(net: NetLab, daemon: Any) -> None:
    net.kill(daemon, 15)


def test_a_table_the_kernel_refuses_at_boot_is_programmed_once_it_can_be(net: NetLab, tmp_path: Path) -> None:
    """Another process holds ``table inet ringfence { flags owner; }`` at boot: the kernel refuses
    the last known good and the posture alike. Before, the daemon logged it and went on with
    nothing in the kernel for good (the source out of reach: the host open). Now it tries again
    until the kernel takes the last known good."""
    state = tmp_path / "state"
    seed(net, state, tmp_path)
    holder = net.spawn("h2", "nft", "-i", stdin=subprocess.PIPE, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    daemon = None
    try:
        assert holder.stdin is not None
        holder.stdin.write("add table inet ringfence { flags owner; }\n")
        holder.stdin.flush()
        assert wait_until(lambda: "ringfence" in net.exec("h2", "nft", "list", "tables").stdout, 5)
        daemon, log = start(net, tmp_path, state)
        assert wait_until(lambda: "fail-safe posture not applied" in log.read_text(), 15), log.read_text()
        time.sleep(2)  # a few seconds of refusal
        assert net.tcp("h3", "h2", 8080), "the foreign table did not hold the agent off"
        net.kill(holder)  # its table goes with its socket
        released = time.monotonic()
        assert wait_until(lambda: lkg_enforced(net), 40), log.read_text()
        assert time.monotonic() - released < 40
        assert daemon.poll() is None
        assert "enforcing after" in log.read_text() and "re-applied last known good" in log.read_text()
    finally:
        net.kill(holder)
        if daemon is not None:
            stop(net, daemon)


@pytest.fixture
def small_fs(tmp_path: Path) -> Iterator[Path]:
    """A 512 KiB tmpfs: a filesystem to fill or to make read-only."""
    mnt = tmp_path / "fs"
    mnt.mkdir()
    sh("mount", "-t", "tmpfs", "-o", "size=512k,mode=0700", "tmpfs", str(mnt))
    try:
        yield mnt
    finally:
        for _ in range(2):  # the read-only bind mount, then the tmpfs
            subprocess.run(["umount", str(mnt)], capture_output=True, check=False)


@pytest.mark.parametrize("fault", ["full", "read-only"])
def test_a_full_or_read_only_state_filesystem_does_not_stop_enforcement(
    net: NetLab, tmp_path: Path, small_fs: Path, fault: str
) -> None:
    """status.json could not be written, so the daemon exited before enforcing anything (a
    restart loop, the host open); and a journal that needed rewriting at start (a stale delta
    cut) left the bundle in memory with nothing in the kernel. Now the last known good and its
    delta are enforced, and the daemon keeps running, telling what it could not write."""
    state = small_fs / "state"
    seed(net, state, tmp_path, delta=True)
    if fault == "full":
        with contextlib.suppress(OSError), (small_fs / "filler").open("wb") as f:
            while True:
                f.write(b"\0" * 65536)
                f.flush()
    else:
        sh("mount", "--bind", str(small_fs), str(small_fs))
        sh("mount", "-o", "remount,bind,ro", str(small_fs))
    with pytest.raises(OSError):
        (state / "probe").write_bytes(b"x" * 65536)
    daemon, log = start(net, tmp_path, state)
    try:
        assert wait_until(lambda: lkg_enforced(net, h4_client=True), 20), log.read_text()
        time.sleep(2)
        assert daemon.poll() is None, log.read_text()
        assert lkg_enforced(net, h4_client=True)
        text = log.read_text()
        # full: an apply that cannot record its seal's nonce removes the previous record (seal.last),
        # which frees a block: status.json then fits, what was not kept is the last good's copy
        told = "status not written" if fault == "read-only" else "last good configuration not kept"
        assert told in text and "could not rewrite the delta journal" in text, text
        assert "re-applied last known good" in text and "Traceback" not in text, text
    finally:
        stop(net, daemon)


def test_a_missing_pairing_key_file_does_not_stop_enforcement(net: NetLab, tmp_path: Path) -> None:
    """The agent API's pairing key file (or the CA file) is not there yet at boot: the daemon
    exited setting up its source, before enforcing anything. Now it enforces the last known good,
    retries the source with its backoff, and sets it up once the file appears."""
    state = tmp_path / "state"
    seed(net, state, tmp_path)
    key = tmp_path / "pairing-key"
    api = {"api_url": "http://10.77.0.9:8443", "insecure_http_lab_only": True, "request_timeout": 1}
    daemon, log = start(net, tmp_path, state, enroll={"method": "pairing", "pairing_key_file": str(key)}, **api)
    try:
        assert wait_until(lambda: lkg_enforced(net), 15), log.read_text()
        assert wait_until(lambda: "source not set up" in log.read_text(), 10), log.read_text()
        assert daemon.poll() is None
        key.write_text("k" * 32 + "\n")
        assert wait_until(lambda: "source set up" in log.read_text().replace("not set up", ""), 15), log.read_text()
        assert daemon.poll() is None and lkg_enforced(net)
    finally:
        stop(net, daemon)


@pytest.fixture(scope="module")
def rsa_public_key() -> bytes:
    if shutil.which("openssl") is None:
        pytest.skip("openssl is not installed here")
    priv = subprocess.run(["openssl", "genpkey", "-algorithm", "RSA"], capture_output=True, check=True).stdout
    return subprocess.run(["openssl", "pkey", "-pubout"], input=priv, capture_output=True, check=True).stdout


@pytest.mark.parametrize("broken", ["missing", "empty", "garbage", "rsa"])
def test_an_unusable_pinned_key_holds_the_failsafe_posture_and_refuses_every_bundle(
    net: NetLab, tmp_path: Path, broken: str, request: pytest.FixtureRequest
) -> None:
    """The pinned key file is missing, empty, not PEM or not Ed25519: the daemon exited before
    programming anything (the host open after a reboot). Now it holds the fail-safe posture,
    refuses every bundle (the source's good one too: nothing can be verified), says why in its
    status, and keeps the last known good on disk for a start with the key restored."""
    key = tmp_path / "key.pem"
    shutil.copy(PUBLIC_KEY, key)
    state = tmp_path / "state"
    seed(net, state, tmp_path, key=key)
    content = {"missing": None, "empty": b"", "garbage": b"not a pem\n"}.get(broken)
    if broken == "rsa":
        content = request.getfixturevalue("rsa_public_key")
    if content is None:
        key.unlink()
    else:
        key.write_bytes(content)
    write(lab_engine(net).bundle("h2"), tmp_path / "src" / "bundles" / "h2.json")  # the source's good bundle
    daemon, log = start(net, tmp_path, state, public_key=str(key))
    try:
        assert wait_until(lambda: "holding the fail-safe posture" in log.read_text(), 15), log.read_text()
        assert wait_until(lambda: "refused: no usable pinned key" in log.read_text(), 15), log.read_text()
        assert posture_held(net)
        assert daemon.poll() is None
        status = json.loads(ok(net.agent("h2", "status", "--state-dir", str(state), "--json")))
        assert "no usable pinned key" in status["last_error"] and status["daemon"]["key_error"], status
        assert status["kernel_programmed"] is True, status
        # what the daemon holds (`status` reads the bundle on disk, which it does not enforce)
        assert json.loads((state / "status.json").read_text())["posture"] == "failsafe"
        assert (state / "bundle.json").is_file() and not (state / "rejected").exists()
    finally:
        stop(net, daemon)
    # the key restored: the last known good is back at the next start
    shutil.copy(PUBLIC_KEY, key)
    shutil.rmtree(tmp_path / "src")
    net.reset("h2")
    daemon, log = start(net, tmp_path, state, public_key=str(key))
    try:
        assert wait_until(lambda: lkg_enforced(net), 15), log.read_text()
    finally:
        stop(net, daemon)


@pytest.mark.parametrize("special", ["fifo", "symlink-to-dev-zero"])
def test_a_state_file_that_is_no_regular_file_is_set_aside(net: NetLab, tmp_path: Path, special: str) -> None:
    """bundle.json is a FIFO (the daemon hung reading it, for good, before enforcing anything) or
    a symlink to /dev/zero (it read until MemoryError and exited): the host open either way. Now
    it is set aside like a corrupt file and the host holds the fail-safe posture."""
    state = tmp_path / "state"
    seed(net, state, tmp_path)
    (state / "bundle.json").unlink()
    if special == "fifo":
        os.mkfifo(state / "bundle.json")
    else:
        os.symlink("/dev/zero", state / "bundle.json")
    daemon, log = start(net, tmp_path, state)
    try:
        assert wait_until(lambda: "holding the fail-safe posture" in log.read_text(), 15), log.read_text()
        assert posture_held(net) and daemon.poll() is None
        assert "set aside" in log.read_text()
        assert not os.path.lexists(state / "bundle.json")
        assert len(list((state / "rejected").glob("*-bundle.json"))) == 1
    finally:
        stop(net, daemon)


def test_the_unit_waits_for_the_agent_to_say_it_is_ready() -> None:
    """Type=simple counted the agent started at fork, interfaces coming up before its rules."""
    assert service(UNIT)["Type"] == "notify"


def test_the_daemon_says_ready_only_once_the_kernel_holds_its_rules(net: NetLab, tmp_path: Path) -> None:
    """As systemd does for a Type=notify unit: a datagram socket in $NOTIFY_SOCKET; READY=1
    arrives, and at that moment the kernel already enforces the last known good."""
    state = tmp_path / "state"
    seed(net, state, tmp_path)
    sockdir = Path(tempfile.mkdtemp(prefix="rfn-", dir="/tmp"))  # AF_UNIX paths are short
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    daemon = None
    try:
        sock.bind(str(sockdir / "notify"))
        sock.settimeout(20)
        daemon, log = start(net, tmp_path, state, env={"NOTIFY_SOCKET": str(sockdir / "notify")})
        message = sock.recv(4096).decode()
        ruleset = net.exec("h2", "nft", "list", "table", "inet", "ringfence")
        assert "READY=1" in message.splitlines(), message
        assert ruleset.returncode == 0 and "drop" in ruleset.stdout, (message, log.read_text())
        assert "STATUS=enforcing revision" in message, message
        assert lkg_enforced(net)
    finally:
        sock.close()
        shutil.rmtree(sockdir, ignore_errors=True)
        if daemon is not None:
            stop(net, daemon)
