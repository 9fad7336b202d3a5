"""The loopback fail-safe admits this host's own traffic only (review r9), against the real agent
CLI on real nftables / iptables in network namespaces: a process with CAP_NET_ADMIN that
forwards an outside host's packets into ``lo`` from a netdev ingress chain of its own table
(Ringfence's table untouched, so its seal holds) does not get them past the fail-safe."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from ringfence import enforced
from ringfence.local.lab import Lab as NetLab
from tests.agent import dataplane
from tests.agent.bundles import LAB_POLICY, PUBLIC_KEY, Lab, workloads, write

pytestmark = pytest.mark.dataplane

dataplane.require()

HOSTS = {"h1": 1, "h2": 2, "h4": 4}
ROLES = {"h1": "client", "h2": "web", "h4": "other"}  # the bundle admits h1 to h2's tcp/8080, not h4

# the attacker's own table: h4's packets to tcp/8080, given a zero destination MAC (lo accepts
# them), are sent out of lo and so arrive on lo, before any hook of Ringfence's
FORWARD_INTO_LO = """table netdev rf_test_fwd {{
  chain c {{ type filter hook ingress device "eth0" priority 0; policy accept;
    ip saddr {v4} tcp dport 8080 ether daddr set 00:00:00:00:00:00 fwd to "lo"
    ip6 saddr {v6} tcp dport 8080 ether daddr set 00:00:00:00:00:00 fwd to "lo"
  }}
}}
"""


net = dataplane.lab_fixture(HOSTS, {"h2": [8080]})
backend = dataplane.backend_fixture()
clean = dataplane.reset_fixture("h2", tables=["netdev rf_test_fwd"])


def test_attack_outside_traffic_forwarded_into_lo_is_not_admitted_by_the_loopback_failsafe(
    net: NetLab, backend: str, tmp_path: Path
) -> None:
    """h4 is not admitted to h2's tcp/8080; a netdev ingress rule of another table forwards h4's
    packets into ``lo``, where the fail-safe used to accept anything (``iif "lo" accept``,
    ``-i lo -j ACCEPT``) and the replies left as established: tcp/8080 open to h4 over IPv4
    (reverse-path filter off: rp_filter 0 and 2 let it through) and IPv6, while status said
    programmed and apply "already applied". h2's own connections over lo still get through."""
    for conf in ("all", "eth0", "lo"):  # loose or none: strict (1) would drop h4's packets on lo itself
        net.exec("h2", "sysctl", "-qw", f"net.ipv4.conf.{conf}.rp_filter=0", check=True)
    ws = workloads({h: (net.v4(h), net.v6(h), role) for h, role in ROLES.items()})
    doc = Lab(LAB_POLICY, ws).bundle("h2")
    path = write(doc, tmp_path / "b.json")
    state = str(tmp_path / "state")
    args = ["--bundle", str(path), "--public-key", str(PUBLIC_KEY), "--backend", backend, "--state-dir", state]
    proc = net.agent("h2", "apply", *args)
    assert proc.returncode == 0, proc.stderr
    assert net.tcp("h1", "h2", 8080) and net.tcp("h1", "h2", 8080, v6=True)
    assert not net.tcp("h4", "h2", 8080) and not net.tcp("h4", "h2", 8080, v6=True)

    net.exec("h2", "nft", "-f", "-", stdin=FORWARD_INTO_LO.format(v4=net.v4("h4"), v6=net.v6("h4")), check=True)
    opened = [v6 for v6 in (False, True) if net.tcp("h4", "h2", 8080, v6=v6)]
    assert not opened, f"h4 reaches h2's tcp/8080 through lo ({['IPv6' if v6 else 'IPv4' for v6 in opened]})"
    # Ringfence's own rules are intact and sealed: the fix is in what they admit, not in a check
    status = json.loads(net.agent("h2", "status", "--backend", backend, "--state-dir", state, "--json").stdout)
    assert status["kernel_programmed"] is True and status["kernel_digest"] == enforced.expected(doc)
    # this host's own traffic over lo: loopback addresses and its own lab addresses (tcp/8080 is
    # not admitted from h2 by the bundle: only the loopback fail-safe lets these through)
    for addr in ("127.0.0.1", "::1", net.v4("h2"), net.v6("h2")):
        assert net.tcp("h2", "h2", 8080, addr=addr), f"h2's own connection to {addr} over lo is dropped"
