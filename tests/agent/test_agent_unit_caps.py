"""The agent's systemd unit (``agent/packaging/ringfence-agent.service``) is one systemd accepts,
and its capability bounding set is enough for the real agent to program the kernel: under exactly
that set and no new privileges (``setpriv``, as systemd starts it), in a network namespace of its
own, ``ringfence-agent apply`` enforces a signed bundle on nftables and on iptables, and ``status``
reads back the digest the control plane expects — with /run read-only but for the xtables lock, as
the unit's ReadWritePaths leave it (a private mount namespace, /run a scratch tmpfs). Without
CAP_NET_ADMIN it says so and the kernel holds nothing of ours."""

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

# the unit's view of /run (ExecStartPre creates the lock; ReadWritePaths=-/run/xtables.lock makes
# it the one writable path there), on a scratch tmpfs in a private mount namespace, then the agent
RUN_AS_THE_UNIT_SEES_IT = [
    "unshare",
    "-m",
    "--propagation",
    "private",
    "sh",
    "-ec",
    "mount -t tmpfs tmpfs /run; touch /run/xtables.lock; mount --bind /run /run; "
    "mount -o remount,bind,ro /run; mount --bind /run/xtables.lock /run/xtables.lock; "
    "mount -o remount,bind,rw /run/xtables.lock; "
    "if touch /run/rf-escape 2>/dev/null; then echo '/run is writable' >&2; exit 99; fi; "
    '[ -w /run/xtables.lock ] && : >> /run/xtables.lock; exec "$@"',
    "sh",
]


def test_the_agent_unit_leaves_run_read_only_and_confines_the_agent() -> None:
    """uid 0 with /run writable could drop a runtime unit (/run/systemd/system) or udev rule."""
    unit = service(UNIT)
    writable = unit["ReadWritePaths"].split()
    assert "/run" not in writable and all(not w.lstrip("-").startswith("/run/systemd") for w in writable)
    assert set(writable) == {"/var/lib/ringfence-agent", "-/run/xtables.lock"}
    for setting in (
        "ProtectKernelTunables",
        "ProtectKernelLogs",
        "ProtectClock",
        "PrivateDevices",
        "RestrictNamespaces",
        "RestrictSUIDSGID",
        "LockPersonality",
    ):
        assert unit[setting] == "yes", setting
    assert unit["SystemCallFilter"] == "@system-service" and unit["SystemCallArchitectures"] == "native"


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
    agent = [*RUN_AS_THE_UNIT_SEES_IT, *setpriv(capabilities), str(BIN / "ringfence-agent")]
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
