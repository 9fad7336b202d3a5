"""DNS under an enforce bundle (issue 10, fail-safes): the agent re-resolves its control plane's
host name (API Gateway's) before every sync, so it needs DNS even when a bundle admits nothing.
It admits the name servers of its host's /etc/resolv.conf (read again at every sync: DHCP
rewrites it), udp/tcp 53 outbound, and nothing else on port 53. Real agent, real nftables, in network namespaces; the resolver is a
DNS server in the lab (``ip netns exec`` binds /etc/netns/<ns>/resolv.conf over /etc/resolv.conf)."""

from __future__ import annotations

import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

from ringfence.local.lab import Lab as NetLab
from ringfence.local.lab import wait_until
from ringfence.staticlayout import bundle_path
from tests.agent import dataplane
from tests.agent.bundles import DENY_ALL_POLICY, Lab, resign, spawn_following_agent, workloads, write
from tests.agent.dnslab import CP_MOVED, RESPONDER, applied, resolving_lab

pytestmark = pytest.mark.dataplane

dataplane.require()

HOSTS = {"h2": 2, "cp": 100, "dns": 53, "other": 54}
CP_NAME = "cp.ringfence-dns-lab.test"


@pytest.fixture
def net(tmp_path: Path) -> Iterator[tuple[NetLab, Path]]:
    """The lab; h2 resolves through ``dns`` (its resolv.conf), ``other`` answers DNS too (a port
    53 elsewhere), ``cp`` serves the bundles over HTTP on 443. Yields the lab and the file whose
    address the resolver answers for every name."""

    def serve(lab: NetLab) -> None:
        lab.serve("h2", tcp=[8080])
        lab.serve("other", tcp=[53], udp=[53])  # echo servers: a reply means the packet got through

    with resolving_lab(HOSTS, tmp_path, serve) as net:
        yield net


def resolves(lab: NetLab, name: str = CP_NAME) -> str | None:
    """What h2's resolver (glibc, through its resolv.conf) answers for ``name``."""
    code = f"import socket\nprint(socket.getaddrinfo({name!r}, 443, socket.AF_INET)[0][4][0])"
    out = lab.exec("h2", sys.executable, "-c", code, timeout=20)
    return out.stdout.strip() if out.returncode == 0 else None


def dns_query(lab: NetLab, server: str, tcp: bool = False) -> bool:
    """A DNS query from h2 straight to ``server`` (UDP, or TCP) is answered."""
    cmd = [sys.executable, str(RESPONDER), "query", server, *(["tcp"] if tcp else [])]
    return lab.exec("h2", *cmd, timeout=20).returncode == 0


def test_attack_deny_everything_bundle_keeps_the_agents_resolver_and_no_other_dns(
    net: tuple[NetLab, Path], tmp_path: Path
) -> None:
    """Without its resolver admitted the agent cannot even fetch its first bundle under the boot
    posture (the fetch resolves the name); with it, a deny-everything bundle leaves it DNS to its
    resolver, over UDP and TCP, outbound only, and to no other server on port 53."""
    lab, address = net
    engine = Lab(DENY_ALL_POLICY, workloads({"h2": (lab.v4("h2"), lab.v6("h2"), "web")}))
    first = engine.bundle("h2")
    assert first.failsafes.dns_resolvers == [], "the policy names no resolver: the agent must admit its own"
    www = tmp_path / "www"
    write(first, www / bundle_path("h2"))
    server = lab.spawn(
        "cp", sys.executable, "-m", "http.server", "443", "--bind", "0.0.0.0", "--directory", str(www),
        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
    )  # fmt: skip
    assert server.poll() is None
    assert resolves(lab) == lab.v4("cp"), "the lab's resolver answers before anything is enforced"
    daemon, state, log = spawn_following_agent(lab, tmp_path, "nftables", f"http://{CP_NAME}:443")
    try:
        assert wait_until(lambda: applied(state) == first.version, 20), log.read_text()
        assert f"DNS fail-safe admits this host's resolvers (/etc/resolv.conf): {lab.v4('dns')}" in log.read_text()
        # enforced: nothing reaches h2, h2 reaches nothing but its fail-safes
        assert not lab.tcp("other", "h2", 8080)
        assert not lab.tcp("dns", "h2", 8080, sport=53), "a reply-shaped packet from port 53 is not admitted inbound"
        # its resolver, over UDP (glibc) and TCP; no other server on port 53
        assert resolves(lab) == lab.v4("cp")
        assert dns_query(lab, lab.v4("dns")) and dns_query(lab, lab.v4("dns"), tcp=True)
        assert not dns_query(lab, lab.v4("other")), "DNS to a server that is not the host's resolver"
        assert not lab.udp("h2", "other", 53) and not lab.tcp("h2", "other", 53)
        # the name moves: only a working resolver lets the agent follow it under this bundle
        address.write_text(CP_MOVED)
        second = resign(first, version=first.version + 1)
        write(second, www / bundle_path("h2"))
        assert wait_until(lambda: applied(state) == second.version, 30), log.read_text()
        # resolved at the start of a sync: one that began before the name moved fetched the new
        # bundle at the old address, and the next sync follows the name; over plain http no TLS
        # handshake proves the old address, so only the current answer is admitted
        # (test_attack_control_plane_dns_spoof.py)
        follows = f"control-plane fail-safe now admits {CP_MOVED}\n"
        assert wait_until(lambda: follows in log.read_text(), 30), log.read_text()
        # DHCP names another resolver: glibc reads resolv.conf again, and so does the fail-safe
        # (the name now comes from /etc/hosts: ``other`` only echoes)
        etc = Path("/etc/netns") / lab.ns("h2")
        (etc / "hosts").write_text(f"127.0.0.1 localhost\n{CP_MOVED} {CP_NAME}\n")
        (etc / "resolv.conf").write_text(f"nameserver {lab.v4('other')}\n")
        moved = f"DNS fail-safe now admits {lab.v4('other')}\n"
        assert wait_until(lambda: moved in log.read_text(), 30), log.read_text()
        assert lab.udp("h2", "other", 53) and lab.tcp("h2", "other", 53)
        assert not dns_query(lab, lab.v4("dns")), "a resolver resolv.conf no longer names stays admitted"
        # a file caught mid-rewrite names none: what is admitted stays (a sync has read it since)
        (etc / "resolv.conf").write_text("")
        third = resign(first, version=first.version + 2)
        write(third, www / bundle_path("h2"))
        assert wait_until(lambda: applied(state) == third.version, 30), log.read_text()
        assert lab.udp("h2", "other", 53), "an empty resolv.conf took the host's resolver away"
    finally:
        daemon.terminate()
        daemon.wait(10)
