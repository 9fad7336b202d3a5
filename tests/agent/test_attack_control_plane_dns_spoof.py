"""A DNS answer is no proof (security review): the control-plane fail-safe opens tcp/443 from
root's sockets to whatever the control plane's name resolves to. It used to keep every address
the name resolved to in the last 24 hours, so one spoofed answer opened the port to an address of
the attacker's choosing for a day. Now it holds the configured addresses, the current answer, and
an earlier address only when a TLS handshake there verified the control plane's certificate
(``CONTROL_PLANE_RETAIN_S``). Real daemon, real nftables, in network namespaces; the resolver is
a DNS server in the lab whose answer the test changes, the control plane serves HTTPS with a
certificate for its name from a lab CA (``tls_ca_file``)."""

from __future__ import annotations

import ipaddress
import json
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

from ringfence.local.lab import Lab as NetLab
from ringfence.local.lab import wait_until
from ringfence.local.tls import lab_tls
from ringfence.staticlayout import bundle_path
from tests.agent import dataplane
from tests.agent.bundles import DENY_ALL_POLICY, Lab, resign, spawn_following_agent, workloads, write
from tests.agent.dnslab import CP_MOVED, applied, resolving_lab

pytestmark = pytest.mark.dataplane

dataplane.require()

HOSTS = {"h2": 2, "cp": 100, "dns": 53, "evil": 66}
CP_NAME = "cp.ringfence-spoof-lab.test"

HTTPS_SERVER = """
import functools, http.server, ssl, sys
class Quiet(http.server.SimpleHTTPRequestHandler):
    def log_message(self, *a): pass
server = http.server.ThreadingHTTPServer(("0.0.0.0", 443), functools.partial(Quiet, directory=sys.argv[1]))
ctx = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
ctx.load_cert_chain(sys.argv[2], sys.argv[3])
server.socket = ctx.wrap_socket(server.socket, server_side=True)
print("ready", flush=True)
server.serve_forever()
"""


@pytest.fixture
def net(tmp_path: Path) -> Iterator[tuple[NetLab, Path]]:
    """The lab: h2 resolves through ``dns`` (its resolv.conf) whose answer is the file yielded;
    ``evil`` listens on tcp/443 (an echo server: a reply means the packet got through)."""
    with resolving_lab(HOSTS, tmp_path, lambda lab: lab.serve("evil", tcp=[443])) as net:
        yield net


def kernel_cp(lab: NetLab) -> list[ipaddress.IPv4Network]:
    """The control-plane fail-safe's IPv4 set, as the kernel holds it (an address, a prefix or a
    range per element: nft merges neighbours)."""
    out = lab.exec("h2", "nft", "-j", "list", "set", "inet", "ringfence", "fs_cp_4").stdout
    nets: list[ipaddress.IPv4Network] = []
    for item in json.loads(out or '{"nftables": []}')["nftables"]:
        for e in item.get("set", {}).get("elem", []):
            if isinstance(e, str):
                nets.append(ipaddress.IPv4Network(e))
            elif "prefix" in e:
                nets.append(ipaddress.IPv4Network(f"{e['prefix']['addr']}/{e['prefix']['len']}"))
            elif "range" in e:
                lo, hi = (ipaddress.IPv4Address(x) for x in e["range"])
                nets += ipaddress.summarize_address_range(lo, hi)
    return nets


def tls_ok(lab: NetLab, address: str, ca: Path) -> bool:
    """A TLS handshake from h2's root to ``address``:443 verifies the control plane's certificate."""
    code = (
        "import socket, ssl\n"
        f"ctx = ssl.create_default_context(cafile={str(ca)!r})\n"
        f"ctx.wrap_socket(socket.create_connection(({address!r}, 443), timeout=2), server_hostname={CP_NAME!r}).close()"
    )
    return lab.exec("h2", sys.executable, "-c", code, timeout=10).returncode == 0


def admitted(lab: NetLab, address: str) -> bool:
    return any(ipaddress.IPv4Address(address) in n for n in kernel_cp(lab))


def test_attack_one_spoofed_dns_answer_does_not_keep_the_control_plane_failsafe_open(
    net: tuple[NetLab, Path], tmp_path: Path
) -> None:
    """The agent follows its control plane over HTTPS under a deny-everything bundle. One DNS
    answer names the attacker's address: while it is the current answer the fail-safe admits it
    (by design: the agent must reach what its name resolves to). Once the answer moves on, the
    attacker's address is gone from the kernel and h2's root cannot reach it on tcp/443 — while
    the address where a verified TLS handshake took place stays admitted (within retention)
    although it is no longer in the answer, and the agent follows its control plane to the new one."""
    lab, address = net
    cp, evil = lab.v4("cp"), lab.v4("evil")
    tls = lab_tls(tmp_path / "tls", CP_NAME)
    engine = Lab(DENY_ALL_POLICY, workloads({"h2": (lab.v4("h2"), lab.v6("h2"), "web")}))
    first = engine.bundle("h2")
    www = tmp_path / "www"
    write(first, www / bundle_path("h2"))
    server = lab.spawn(
        "cp", sys.executable, "-c", HTTPS_SERVER, str(www), str(tls.cert), str(tls.key), stdout=subprocess.PIPE
    )
    assert server.stdout is not None and server.stdout.readline().strip() == "ready"
    daemon, state, log = spawn_following_agent(lab, tmp_path, "nftables", f"https://{CP_NAME}", tls_ca_file=str(tls.ca))
    try:
        # enforced, fetched over verified TLS from cp: nothing but the fail-safes
        assert wait_until(lambda: applied(state) == first.version, 20), log.read_text()
        assert not lab.tcp("h2", "evil", 443), "deny-everything bundle: the attacker is not reachable"
        # the spoofed answer: the attacker's address is admitted while it is the current answer
        address.write_text(evil)
        assert wait_until(lambda: admitted(lab, evil), 20), log.read_text()
        assert lab.tcp("h2", "evil", 443), "the current answer is admitted (the premise of the attack)"
        # the answer moves on (to the control plane's other address): the attacker's is dropped
        # at the next follow; cp, proved by a verified handshake, stays; the agent follows there
        address.write_text(CP_MOVED)
        second = resign(first, version=first.version + 1)
        write(second, www / bundle_path("h2"))
        assert wait_until(lambda: applied(state) == second.version, 30), log.read_text()
        assert wait_until(lambda: admitted(lab, CP_MOVED), 10), log.read_text()
        assert not admitted(lab, evil), f"a spoofed DNS answer stays in the control-plane fail-safe: {kernel_cp(lab)}"
        assert not lab.tcp("h2", "evil", 443), "a spoofed DNS answer keeps tcp/443 open to the attacker"
        assert admitted(lab, cp) and tls_ok(lab, cp, tls.ca), "an address proved by a verified handshake was dropped"
        assert tls_ok(lab, CP_MOVED, tls.ca)
        assert f"control-plane fail-safe now admits {cp}, {CP_MOVED}" in log.read_text(), log.read_text()
    finally:
        daemon.terminate()
        daemon.wait(10)
