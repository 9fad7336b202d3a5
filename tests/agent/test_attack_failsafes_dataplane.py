"""Fail-safes bounded (issue 10), against the real agent and real nftables / iptables in network
namespaces: the agent does not widen the policy's admin ports, and an enforce bundle that admits
nothing cannot cut the agent off its control plane, named by a host name whose addresses move —
while the control-plane fail-safe opens the control plane's port only, and only outbound."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

from ringfence.local.lab import Lab as NetLab
from ringfence.local.lab import sh, wait_until
from ringfence.staticlayout import bundle_path
from tests.agent import dataplane
from tests.agent.bundles import DENY_ALL_POLICY, PUBLIC_KEY, Lab, resign, spawn_following_agent, workloads, write
from tests.agent.dnslab import CP_MOVED, applied

pytestmark = pytest.mark.dataplane

dataplane.require()

HOSTS = {"h1": 1, "h2": 2, "adm": 250, "cp": 100}
ROLES = {"h1": "client", "h2": "web", "adm": "admin"}
RINGFENCE = str(Path(sys.executable).parent / "ringfence")
CP_NAME = "cp.ringfence-lab.test"  # the control plane's host name, as API Gateway's is one


# cp: a port of the control plane's host that is not the control plane
net = dataplane.lab_fixture(HOSTS, {"h2": [22, 3389, 8080], "cp": [8080]})
backend = dataplane.backend_fixture()
clean = dataplane.reset_fixture("h2")


def lab_engine(net: NetLab) -> Lab:
    return Lab(DENY_ALL_POLICY, workloads({h: (net.v4(h), net.v6(h), role) for h, role in ROLES.items()}))


def test_attack_the_agent_does_not_widen_the_policys_admin_ports(net: NetLab, backend: str, tmp_path: Path) -> None:
    """The policy says ``admin_ports: [tcp/22]``: the admin range gets tcp/22 on h2 and not
    tcp/3389 (the agent's built-in tcp/22 + tcp/3389 used to be added to every policy's), and
    ``ringfence explain`` says the same of both ports."""
    doc = lab_engine(net).bundle("h2")
    assert [(p.proto, p.ports) for p in doc.failsafes.admin_ports] == [("tcp", (22, 22))]
    path = write(doc, tmp_path / "b.json")
    common = ["--public-key", str(PUBLIC_KEY), "--backend", backend, "--state-dir", str(tmp_path / "state")]
    proc = net.agent("h2", "apply", "--bundle", str(path), *common)
    assert proc.returncode == 0, proc.stderr
    assert net.tcp("adm", "h2", 22)
    assert not net.tcp("adm", "h2", 3389), "the agent widened the policy's admin ports"
    assert not net.tcp("h1", "h2", 22) and not net.tcp("h1", "h2", 8080)  # the bundle is enforced
    policy = tmp_path / "policy.yaml"
    policy.write_text(DENY_ALL_POLICY)
    verdicts = {}
    for port in ("tcp/22", "tcp/3389"):
        out = subprocess.run(
            [
                RINGFENCE,
                "explain",
                "--policy",
                str(policy),
                *("--from", net.v4("adm"), "--to", "role=web,app=lab"),
                *("--port", port, "--json"),
            ],
            capture_output=True,
            text=True,
            timeout=60,
            check=True,
        ).stdout
        verdicts[port] = json.loads(out)["verdict"]
    assert verdicts == {"tcp/22": "allow", "tcp/3389": "deny"}  # as the dataplane decided
    # the host's operator may add a port for the admin ranges, on that host only (--admin-port)
    proc = net.agent("h2", "apply", "--bundle", str(path), *common, "--admin-port", "tcp/3389")
    assert proc.returncode == 0, proc.stderr
    assert net.tcp("adm", "h2", 3389)


@pytest.fixture
def control_plane(net: NetLab, tmp_path: Path) -> Iterator[Path]:
    """A static source over HTTP on port 443 in cp, and h2's /etc/hosts naming it (``ip netns
    exec`` binds /etc/netns/<ns>/hosts over /etc/hosts): the directory it serves."""
    www = tmp_path / "www"
    (www / "bundles").mkdir(parents=True)
    etc = Path("/etc/netns") / net.ns("h2")
    etc.mkdir(parents=True, exist_ok=True)
    (etc / "hosts").write_text(f"127.0.0.1 localhost\n{net.v4('cp')} {CP_NAME}\n")
    sh("ip", "-n", net.ns("cp"), "addr", "replace", f"{CP_MOVED}/24", "dev", "eth0")
    server = net.spawn(
        "cp", sys.executable, "-m", "http.server", "443", "--bind", "0.0.0.0", "--directory", str(www),
        stdout=subprocess.DEVNULL, stderr=(tmp_path / "www.log").open("w"),
    )  # fmt: skip
    try:
        assert wait_until(lambda: http_ok(net, "h1", net.v4("cp")), 10), (tmp_path / "www.log").read_text()
        yield www
    finally:
        server.kill()
        server.wait()
        shutil.rmtree(etc, ignore_errors=True)
        sh("ip", "-n", net.ns("cp"), "addr", "del", f"{CP_MOVED}/24", "dev", "eth0", check=False)


def http_ok(net: NetLab, src: str, addr: str, port: int = 443) -> bool:
    """An HTTP GET from ``src`` to ``addr:port`` is answered (any status)."""
    code = f"import urllib.request as u, urllib.error as e\ntry: u.urlopen('http://{addr}:{port}/', timeout=1)\nexcept e.HTTPError: pass"
    return net.exec(src, sys.executable, "-c", code, timeout=10).returncode == 0


def test_attack_an_enforce_bundle_cannot_cut_the_agent_off_its_named_control_plane(
    net: NetLab, backend: str, tmp_path: Path, control_plane: Path
) -> None:
    """The control plane is a host name (API Gateway's is): the agent resolves it and admits
    those addresses on the control plane's port, outbound. An enforce bundle that admits nothing
    (override-deny everything) still lets the agent fetch the next bundles — also after the name
    moves to another address — while h2 reaches nothing else there, on no other port, and the
    control plane's host cannot reach h2."""
    lab = lab_engine(net)
    first = lab.bundle("h2")
    assert first.failsafes.control_plane == []  # the policy names no control plane: the agent must
    write(first, control_plane / bundle_path("h2"))
    daemon, state, log = spawn_following_agent(net, tmp_path, backend, f"http://{CP_NAME}:443")
    try:
        assert wait_until(lambda: applied(state) == first.version, 20), log.read_text()
        # enforced: nothing but the fail-safes
        assert not net.tcp("h1", "h2", 8080)
        assert not net.tcp("h2", "cp", 8080, timeout=0.5), "the control-plane fail-safe opened every port"
        assert not net.tcp("cp", "h2", 8080, timeout=0.5), "the control-plane fail-safe admitted inbound"
        assert http_ok(net, "h2", net.v4("cp"))
        # the agent still reaches its control plane: the next bundle arrives
        second = resign(first, version=first.version + 1)
        write(second, control_plane / bundle_path("h2"))
        assert wait_until(lambda: applied(state) == second.version, 20), log.read_text()
        # the name moves (API Gateway's addresses change): re-resolved before each fetch
        (Path("/etc/netns") / net.ns("h2") / "hosts").write_text(f"127.0.0.1 localhost\n{CP_MOVED} {CP_NAME}\n")
        third = resign(first, version=first.version + 2)
        write(third, control_plane / bundle_path("h2"))
        assert wait_until(lambda: applied(state) == third.version, 20), log.read_text()
        # plain http: no verified TLS handshake proves the old address, so the new answer alone
        assert f"control-plane fail-safe now admits {CP_MOVED}\n" in log.read_text()
        assert http_ok(net, "h2", CP_MOVED) and not net.tcp("h2", "cp", 8080, timeout=0.5, addr=CP_MOVED)
    finally:
        daemon.terminate()
        daemon.wait(10)
