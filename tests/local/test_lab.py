"""The lab's hosts (``Lab.add``): a namespace on the bridge with its addresses, routes and
conntrack accounting, set up with one ``ip -batch`` per namespace."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from ringfence.local.lab import CONNTRACK_ACCT, PY, Lab, sh
from tests.agent.dataplane import require

require()
pytestmark = pytest.mark.dataplane


def test_a_host_gets_its_addresses_routes_and_accounting_and_reaches_its_peer() -> None:
    lab = Lab({"a": 1})
    try:
        ns = lab.add("b", ["10.77.0.2/24"], ["fd77::2/64"], routes=["10.66.0.0/16"])
        links = {i["ifname"]: i for i in json.loads(sh("ip", "-n", ns, "-j", "addr", "show").stdout)}
        assert "UP" in links["eth0"]["flags"] and "UP" in links["lo"]["flags"]
        addrs = {f"{a['local']}/{a['prefixlen']}" for a in links["eth0"]["addr_info"]}
        assert {"10.77.0.2/24", "fd77::2/64"} <= addrs
        routes = json.loads(sh("ip", "-n", ns, "-j", "route", "show").stdout)
        assert any(r["dst"] == "10.66.0.0/16" and r["dev"] == "eth0" for r in routes)
        if Path(CONNTRACK_ACCT).exists():  # the module is loaded: each namespace has its own value
            got = lab.exec("b", "sysctl", "-n", "net.netfilter.nf_conntrack_acct", check=True).stdout.strip()
            assert got == "1"
        lab.serve("a", tcp=[7000])
        connect = "import socket, time\nfor _ in range(50):\n    try:\n        socket.create_connection(('10.77.0.1', 7000), 2).close(); break\n    except OSError:\n        time.sleep(0.1)\nelse:\n    raise SystemExit(1)"
        assert lab.exec("b", PY, "-c", connect).returncode == 0, "b reaches a over the bridge"
        with pytest.raises(ValueError, match="exists already"):
            lab.add("b", ["10.77.0.3/24"])
    finally:
        lab.close()
