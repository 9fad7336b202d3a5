"""An earlier table the agent sealed, saved and put back after a tightening, is not taken for the
agent's (review r7: the keyed seal was a MAC of the table's content only, and ``seal.key`` never
changes, so every table the agent ever sealed stayed valid: a process with CAP_NET_ADMIN but no
access to the state directory saved the table, waited for a port to be closed or the admin range
narrowed, then deleted the table and loaded the saved one, seal included). The seal is now bound
to the agent's last whole apply. Real agent, real nftables, in network namespaces."""

from __future__ import annotations

import json
import os
import signal
import sys
import time
from pathlib import Path

import pytest

from ringfence import enforced
from ringfence.bundle import Bundle
from ringfence.engine import Engine
from ringfence.local.lab import Lab as NetLab
from ringfence.local.lab import wait_until
from ringfence.policy import load_policy_texts
from tests.agent import dataplane
from tests.agent.agentdaemon import running_daemon
from tests.agent.bundles import LAB_POLICY, PUBLIC_KEY, workloads, write
from tests.agent.test_attack_kernel_truth import (
    HOSTS,
    ROLES,
    _apply,
    _engine,
    _intact,
    _reported_and_reapplied,
)

pytestmark = pytest.mark.dataplane

dataplane.require()

# bundle v2: the web service moved from tcp/8080 to tcp/9090 (8080 closed). The enforced-policy
# digest names rules by counter and verdict, not ports: v1's and v2's are the same, so only the
# seal can tell v1's table from v2's
V2_POLICY = LAB_POLICY.replace("ports: [tcp/8080, udp/5353]", "ports: [tcp/9090, udp/5353]")
# What the daemon's heartbeat sends (Agent.enforced_state), read by a fresh process
HEARTBEAT_READ = """
import json, sys
from pathlib import Path
from ringfence.bundlewire import Verifier
from ringfence_agent.backends import make_backend
from ringfence_agent.core import Agent
from ringfence_agent.plan import LocalFailsafes
from ringfence_agent.state import StateDir
state = Path(sys.argv[2])
backend = make_backend(sys.argv[3], state)
agent = Agent(None, Verifier.from_file(Path(sys.argv[1])), backend, StateDir(state), LocalFailsafes(), log=print)
print(json.dumps(agent.enforced_state()[1]))
"""


net = dataplane.lab_fixture(HOSTS, {"h2": [22, 8080, 9090], "cp": [443, 8080]})
clean = dataplane.reset_fixture("h2")


def _v2(net: NetLab) -> Bundle:
    """Bundle v2 of h2, from a later revision of the control plane (newer than v1)."""
    lab = _engine(net, V2_POLICY)
    lab.engine = Engine(load_policy_texts({"lab.yaml": V2_POLICY}), policy_version=2, revision=10)
    lab.engine.load(workloads({h: (net.v4(h), net.v6(h), role) for h, role in ROLES.items()}))
    return lab.bundle("h2")


SAVE = {
    "nftables": [["nft", "list", "table", "inet", "ringfence"]],
    # the ipsets first: the rules name them (the later apply destroyed the earlier generation's)
    "iptables": [["ipset", "save"], ["iptables-save", "-t", "filter"], ["ip6tables-save", "-t", "filter"]],
}
RESTORE = {
    "nftables": [["nft", "-f", "-"]],
    "iptables": [["ipset", "restore", "-exist"], ["iptables-restore"], ["ip6tables-restore"]],
}


def _save(net: NetLab, backend: str = "nftables") -> list[str]:
    """The attacker's copy of the rules as the agent sealed them (the seal chain included)."""
    return [net.exec("h2", *cmd, check=True).stdout for cmd in SAVE[backend]]


def _replay(net: NetLab, saved: list[str], backend: str = "nftables") -> None:
    """The attacker (CAP_NET_ADMIN in the namespace, no access to the state directory) puts the
    saved rules back, their seal chain with them (iptables-restore replaces the filter table)."""
    if backend == "nftables":
        net.exec("h2", "nft", "delete", "table", "inet", "ringfence", check=True)
    for cmd, text in zip(RESTORE[backend], saved, strict=True):
        net.exec("h2", *cmd, stdin=text, check=True)


def _backend_or_skip(backend: str) -> None:
    if backend == "iptables":
        dataplane.iptables_or_skip()


def _heartbeat(net: NetLab, state: Path, backend: str = "nftables") -> str | None:
    proc = net.exec("h2", sys.executable, "-c", HEARTBEAT_READ, str(PUBLIC_KEY), str(state), backend)
    assert proc.returncode == 0, proc.stderr
    digest: str | None = json.loads(proc.stdout.splitlines()[-1])
    return digest


@pytest.mark.parametrize("backend", ["nftables", "iptables"])
def test_attack_an_earlier_sealed_table_replayed_after_a_port_closed_is_not_the_agents(
    net: NetLab, tmp_path: Path, backend: str
) -> None:
    """v1 opens tcp/8080 to h1, v2 closes it. The attacker saved v1's table and put it back after
    v2: a fresh ``status`` said programmed with the published digest, the heartbeat sent it, and
    ``apply`` of v2 said "already applied" with 8080 open. Now status says altered, the
    heartbeat's digest is not v2's, ``apply`` programs v2 again (8080 closed) and the next apply
    finds it intact."""
    _backend_or_skip(backend)
    v1, v2 = _engine(net).bundle("h2"), _v2(net)
    assert enforced.expected(v1) == enforced.expected(v2), "the digest tells v1 from v2: only the seal is tested"
    state = tmp_path / "state"
    _apply(net, backend, v1, state)
    assert net.tcp("h1", "h2", 8080) and not net.tcp("h1", "h2", 9090)
    saved = _save(net, backend)
    _apply(net, backend, v2, state)
    assert not net.tcp("h1", "h2", 8080) and net.tcp("h1", "h2", 9090)
    _intact(net, backend, state, v2)
    _replay(net, saved, backend)
    assert net.tcp("h1", "h2", 8080), "the replay did not open anything: the test proves nothing"
    assert _heartbeat(net, state, backend) not in (None, enforced.expected(v2))
    _reported_and_reapplied(net, backend, state, v2, lambda: net.tcp("h1", "h2", 8080))
    out = _apply(net, backend, v2, state)
    assert "already applied" in out, out


@pytest.mark.parametrize("backend", ["nftables", "iptables"])
def test_attack_an_earlier_sealed_table_with_a_wider_admin_range_replayed_is_not_the_agents(
    net: NetLab, tmp_path: Path, backend: str
) -> None:
    """The same bundle applied with ``--admin-cidr 10.77.0.0/24`` (h4 reaches SSH through the
    local fail-safe), then without it: the saved first table put back re-opened SSH to the whole
    range and passed for the agent's. Now it reads altered and ``apply`` programs it again."""
    _backend_or_skip(backend)
    doc = _engine(net).bundle("h2")
    state = tmp_path / "state"
    _apply(net, backend, doc, state, "--admin-cidr", "10.77.0.0/24")
    assert net.tcp("h4", "h2", 22)
    saved = _save(net, backend)
    _apply(net, backend, doc, state)
    assert not net.tcp("h4", "h2", 22)
    _intact(net, backend, state, doc)
    _replay(net, saved, backend)
    assert _heartbeat(net, state, backend) not in (None, enforced.expected(doc))
    _reported_and_reapplied(net, backend, state, doc, lambda: net.tcp("h4", "h2", 22))


def test_attack_an_earlier_sealed_table_replayed_is_repaired_by_the_running_daemon_without_its_drift_check(
    net: NetLab, tmp_path: Path
) -> None:
    """The v1 table put back under a daemon enforcing v2 with its drift check off (drift_interval
    300: its in-memory baseline never looks): each poll round's "does the kernel hold the bundle"
    and the heartbeat's digest took v1's seal for the agent's and 8080 stayed open. They now read
    it as altered and the daemon programs v2 again within a round or two."""
    v1, v2 = _engine(net).bundle("h2"), _v2(net)
    with running_daemon(net, tmp_path, v1, poll_interval=1, drift_interval=300) as daemon:
        assert wait_until(lambda: not net.tcp("h4", "h2", 8080, timeout=0.3), 15), daemon.said()
        assert wait_until(lambda: "seal_" in _save(net)[0], 5)  # sealed: a second transaction
        saved = _save(net)
        write(v2, tmp_path / "src" / "bundles" / "h2.json")
        assert wait_until(lambda: not net.tcp("h1", "h2", 8080, timeout=0.3), 15), daemon.said()
        time.sleep(0.5)  # v2 sealed
        os.killpg(daemon.proc.pid, signal.SIGSTOP)  # no poll round between the replay and the look at it
        try:
            _replay(net, saved)
            assert net.tcp("h1", "h2", 8080), "the replay did not open anything: the test proves nothing"
        finally:
            os.killpg(daemon.proc.pid, signal.SIGCONT)
        assert wait_until(lambda: not net.tcp("h1", "h2", 8080, timeout=0.3), 10), daemon.said()
        assert "applied again" in daemon.said() or "tamper" in daemon.said(), daemon.said()
        _intact(net, "nftables", daemon.state, v2)


# The agent's own table, then ``argv[2]`` loaded into it and sealed again with the agent's key and
# last nonce (what root can do): only the enforced document can tell
RESEALED = """
import json, subprocess, sys
from ringfence import enforced
from ringfence.bundlewire import load_bundle
from ringfence_agent.backends.nft import SEAL, NftBackend
from ringfence_agent.plan import LocalFailsafes, compile_plan
doc = load_bundle(open(sys.argv[1], "rb").read())
backend = NftBackend()
backend.apply(compile_plan(doc, LocalFailsafes()))
subprocess.run(["nft", "-f", "-"], input=sys.argv[2], text=True, check=True)
held, seal = backend.held()
subprocess.run(["nft", "delete", "chain", "inet", "ringfence", SEAL + seal], check=True)
resealed = SEAL + backend.seal_key.seal(held, backend.seal_key.get())
subprocess.run(["nft", "add", "chain", "inet", "ringfence", resealed], check=True)
print(json.dumps([backend.kernel_problem(), backend.enforced() == enforced.expected(doc)]))
"""


def test_a_verdict_map_without_a_bundle_counter_is_in_the_enforced_digest(net: NetLab, tmp_path: Path) -> None:
    """A counter-less ``tcp dport vmap { 8080 : accept }`` at the head of the input chain was
    not read as a verdict rule, so under a seal that checks (root's) the enforced digest was the
    published one with tcp/8080 open. A verdict map is now an entry of its own: a mismatch."""
    path = write(_engine(net).bundle("h2"), tmp_path / "bundle.json")
    vmap = "insert rule inet ringfence input tcp dport vmap { 8080 : accept }\n"
    proc = net.exec("h2", sys.executable, "-c", RESEALED, str(path), vmap)
    assert proc.returncode == 0, proc.stderr
    assert net.tcp("h4", "h2", 8080), "the verdict map opened nothing: the test proves nothing"
    assert json.loads(proc.stdout) == [None, False]
