"""The agent's systemd unit (``agent/packaging/ringfence-agent.service``) is one systemd accepts,
and its capability bounding set is enough for the real agent to program the kernel: under exactly
that set and no new privileges (``setpriv``, as systemd starts it), in a network namespace of its
own, ``ringfence-agent apply`` enforces a signed bundle on nftables and on iptables, and ``status``
reads back the digest the control plane expects. Without CAP_NET_ADMIN it says so and the kernel
holds nothing of ours."""

from __future__ import annotations

import json
import shutil
from collections.abc import Iterator
from pathlib import Path

import pytest

from ringfence import bundlewire as wire
from ringfence import enforced
from ringfence.local.lab import Lab as NetLab
from ringfence.local.lab import prerequisites
from tests.agent.bundles import GOLDEN, PUBLIC_KEY
from tests.agentproc import BIN
from tests.systemdunit import service, setpriv, verify

UNIT = Path(__file__).resolve().parents[2] / "agent" / "packaging" / "ringfence-agent.service"
BUNDLE = GOLDEN / "bundle-ord-prod-proc-1.json"


def test_the_agent_unit_is_one_systemd_accepts(tmp_path: Path) -> None:
    verify(UNIT, BIN / "ringfence-agent", tmp_path)


@pytest.fixture(scope="module")
def net() -> Iterator[NetLab]:
    if (why := prerequisites()) is not None or shutil.which("setpriv") is None:
        pytest.skip(why or "setpriv is not installed here")
    lab = NetLab({"h": 2})
    try:
        yield lab
    finally:
        lab.close()


@pytest.mark.parametrize("backend", ["nftables", "iptables"])
def test_the_agent_enforces_within_its_units_capabilities(net: NetLab, tmp_path: Path, backend: str) -> None:
    capabilities = service(UNIT)["CapabilityBoundingSet"].split()
    assert service(UNIT)["NoNewPrivileges"] == "yes"
    net.reset("h")
    state = tmp_path / "state"
    common = ["--public-key", str(PUBLIC_KEY), "--state-dir", str(state), "--backend", backend]
    agent = [*setpriv(capabilities), str(BIN / "ringfence-agent")]
    out = net.exec("h", *agent, "apply", "--bundle", str(BUNDLE), *common)
    assert out.returncode == 0, out.stderr
    status = net.exec("h", *agent, "status", "--state-dir", str(state), "--backend", backend, "--json")
    assert status.returncode == 0, status.stderr
    doc = wire.load_bundle(BUNDLE.read_bytes())
    assert json.loads(status.stdout)["kernel_digest"] == enforced.expected(doc)

    # without CAP_NET_ADMIN: a clear refusal, nothing of ours in the kernel
    net.reset("h")
    bare = [*setpriv([c for c in capabilities if c != "CAP_NET_ADMIN"]), str(BIN / "ringfence-agent")]
    out = net.exec("h", *bare, "apply", "--bundle", str(BUNDLE), *common)
    assert out.returncode != 0 and "Operation not permitted" in out.stderr and "Traceback" not in out.stderr, out.stderr
    assert "ringfence" not in net.exec("h", "nft", "list", "tables").stdout
    assert "rf-" not in net.exec("h", "iptables-save").stdout + net.exec("h", "ipset", "list", "-n").stdout
