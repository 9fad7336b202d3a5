"""The agent's systemd unit (``agent/packaging/ringfence-agent.service``) is one systemd accepts,
and the real agent does its whole job as that unit starts it: as the unit's own non-root user
(``User=``; a uid no account has stands in for it here), with ``CAP_NET_ADMIN CAP_NET_RAW`` bounded
and ambient, no new privileges (``setpriv``, as systemd starts it) and the unit's
``RestrictNamespaces=`` seccomp filter (tests/restrictns.py), with /run read-only but for the
xtables lock as the unit's ReadWritePaths and ExecStartPre leave it (a private mount namespace,
/run a scratch tmpfs) — in a network namespace of its own: a whole apply, status, a set delta
with the session cut it makes (conntrack listed without /proc/net/nf_conntrack, root's 0440;
the host's socket aborted over sock_diag), the control-plane fail-safe admitting the agent's
user, and a drift repair, on nftables, iptables-nft and iptables-legacy. Without CAP_NET_ADMIN
it says so and the kernel holds nothing of ours. And the reason for the user: uid 0 with the same
capabilities connects to a root-owned socket (docker.sock's shape), the unit's user cannot."""

from __future__ import annotations

import json
import os
import shutil
import socket
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

from ringfence import enforced
from ringfence.local.lab import PROBE, prerequisites
from ringfence.local.lab import Lab as NetLab
from ringfence_agent import asowner
from ringfence_agent.backends import scratch
from tests.agent.bundles import GOLDEN, LAB_POLICY, PUBLIC_KEY, Lab, workloads, write
from tests.agentproc import BIN
from tests.restrictns import NAMESPACES, allowed
from tests.systemdunit import as_the_unit, reachable_dir, restrict_namespaces, service, setpriv, unit_user, verify

ROOT = Path(__file__).resolve().parents[2]
UNIT = ROOT / "agent" / "packaging" / "ringfence-agent.service"
INSTALL = ROOT / "agent" / "packaging" / "install.sh"
BUNDLE = GOLDEN / "bundle-ord-prod-proc-1.json"
HOSTS = {"h1": 1, "h2": 2, "h4": 4, "adm": 250, "cp": 100}
ROLES = {"h1": "client", "h2": "web", "h4": "other"}
LEGACY_TOOLS = ("iptables", "iptables-save", "iptables-restore", "ip6tables", "ip6tables-save", "ip6tables-restore")


def run_as_the_unit_sees_it(gid: int) -> list[str]:
    """The unit's view of /run: ExecStartPre makes the lock and opens it to the agent's group;
    ReadWritePaths=-/run/xtables.lock makes it the one writable path there. On a scratch tmpfs in
    a private mount namespace; then the program."""
    return [
        "unshare",
        "-m",
        "--propagation",
        "private",
        "sh",
        "-ec",
        f"mount -t tmpfs tmpfs /run; touch /run/xtables.lock; chgrp {gid} /run/xtables.lock; "
        "chmod 0660 /run/xtables.lock; mount --bind /run /run; "
        "mount -o remount,bind,ro /run; mount --bind /run/xtables.lock /run/xtables.lock; "
        "mount -o remount,bind,rw /run/xtables.lock; "
        "if touch /run/rf-escape 2>/dev/null; then echo '/run is writable' >&2; exit 99; fi; "
        'exec "$@"',
        "sh",
    ]


def test_the_agent_unit_leaves_run_read_only_and_confines_the_agent() -> None:
    """Neither /run (a runtime unit, a udev rule) nor anything but its state is writable."""
    unit = service(UNIT)
    writable = unit["ReadWritePaths"].split()
    assert "/run" not in writable and all(not w.lstrip("-").startswith("/run/systemd") for w in writable)
    assert set(writable) == {"/var/lib/ringfence-agent", "-/run/xtables.lock"}
    for setting in (
        "ProtectKernelTunables",
        "ProtectKernelLogs",
        "ProtectClock",
        "PrivateDevices",
        "RestrictSUIDSGID",
        "LockPersonality",
    ):
        assert unit[setting] == "yes", setting
    assert unit["SystemCallFilter"] == "@system-service" and unit["SystemCallArchitectures"] == "native"


def test_the_agent_unit_runs_as_its_own_user_with_ambient_capabilities() -> None:
    """Not root (root-owned sockets need no capability); the capabilities raised as ambient ones
    (the agent and the programs it runs: nft, iptables-restore, ipset, conntrack); the xtables lock
    opened to its group before it starts; install.sh makes the user and the config readable."""
    unit = service(UNIT)
    assert unit["User"] == unit["Group"] == "ringfence-agent"
    assert (
        unit["AmbientCapabilities"].split() == unit["CapabilityBoundingSet"].split() == ["CAP_NET_ADMIN", "CAP_NET_RAW"]
    )
    assert unit["StateDirectory"] == "ringfence-agent" and unit["StateDirectoryMode"] == "0700"
    pre = unit["ExecStartPre"]
    assert pre.startswith("+") and "chgrp ringfence-agent /run/xtables.lock" in pre and "chmod 0660" in pre
    text = INSTALL.read_text()
    assert "useradd --system --user-group" in text and "AGENT_USER=ringfence-agent" in text
    assert 'chgrp "$AGENT_USER" "$f" && chmod 0640 "$f"' in text  # agent.json, pairing-key
    assert 'chown -R -h "$AGENT_USER:$AGENT_USER" /var/lib/ringfence-agent' in text  # an upgrade from root


def test_root_cli_becomes_a_state_directorys_owner_exactly_as_the_unit_starts_the_agent() -> None:
    """Root's CLI on a state directory another user owns executes itself again as that user with
    the unit's capabilities, bounded and ambient, and no new privileges (asowner.py): the same
    as the unit's settings, and the one setpriv command line the unit tests start it with."""
    unit = service(UNIT)
    assert (
        list(asowner.UNIT_CAPABILITIES) == unit["CapabilityBoundingSet"].split() == unit["AmbientCapabilities"].split()
    )
    assert unit["NoNewPrivileges"] == "yes"
    caps = "-all,+net_admin,+net_raw"
    assert asowner.setpriv_command(asowner.UNIT_CAPABILITIES, (61_000, 61_001), "/usr/bin/setpriv") == [
        "/usr/bin/setpriv",
        "--reuid=61000",
        "--regid=61001",
        "--clear-groups",
        f"--bounding-set={caps}",
        f"--inh-caps={caps}",
        f"--ambient-caps={caps}",
        "--no-new-privs",
    ]
    assert setpriv(unit["CapabilityBoundingSet"].split(), (61_000, 61_001)) == asowner.setpriv_command(
        asowner.UNIT_CAPABILITIES, (61_000, 61_001)
    )


def test_the_units_restrict_namespaces_allows_what_the_seal_check_needs_and_nothing_else() -> None:
    """The seal check (backends/scratch.py) unshares a network namespace, or a user namespace
    holding one (no CAP_SYS_ADMIN under the unit): RestrictNamespaces= allows exactly those."""
    setting = service(UNIT)["RestrictNamespaces"]
    needed = {ns for ns, flag in NAMESPACES.items() if flag & (scratch.CLONE_NEWUSER | scratch.CLONE_NEWNET)}
    assert needed == {"user", "net"}
    assert allowed(setting) == needed, setting


def test_the_agent_unit_is_one_systemd_accepts(tmp_path: Path) -> None:
    verify(UNIT, BIN / "ringfence-agent", tmp_path)


@pytest.fixture
def scratch_dir() -> Iterator[Path]:
    """Outside pytest's root-only temp tree: the unit's user must reach bundles, keys and state."""
    with reachable_dir("rf-unit-") as made:
        yield made


def _state(where: Path, user: tuple[int, int]) -> Path:
    """A state directory as systemd makes StateDirectory= for User=: the user's, 0700."""
    state = where / "state"
    state.mkdir(mode=0o700)
    os.chown(state, *user)
    return state


def _needs_root_and_setpriv() -> None:
    if os.geteuid() != 0 or shutil.which("setpriv") is None:
        pytest.skip("needs root and setpriv")


# A root-owned unix socket of mode 0660 (docker.sock's shape); argv[1]: connect to it
CONNECT = """
import socket, sys
s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
try:
    s.connect(sys.argv[1])
    print("connected")
except OSError as exc:
    print(type(exc).__name__)
"""


def test_attack_a_compromised_agent_cannot_connect_to_root_owned_sockets(scratch_dir: Path) -> None:
    """The agent ran as uid 0: with no capability at all, uid 0 connects to a root-owned 0660
    socket under /run (docker.sock, containerd, /run/udev/control, the journal), i.e. root on the
    host; a read-only /run stops writes, not connect(). Under the unit's user, with the same
    capabilities and filter, the connect is refused (EACCES); uid 0 with them still connects."""
    _needs_root_and_setpriv()
    where = scratch_dir / "run"
    where.mkdir(mode=0o755)
    path = where / "docker.sock"
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as listener:
        listener.bind(str(path))
        listener.listen(4)
        path.chmod(0o660)
        assert path.stat().st_uid == 0 and path.stat().st_gid == 0
        caps = service(UNIT)["CapabilityBoundingSet"].split()
        as_root = [*restrict_namespaces(service(UNIT)["RestrictNamespaces"]), *setpriv(caps)]

        def attempt(prefix: list[str]) -> str:
            out = subprocess.run([*prefix, sys.executable, "-c", CONNECT, str(path)], capture_output=True, text=True)
            assert out.returncode == 0, out.stderr
            return out.stdout.strip()

        assert attempt(as_root) == "connected"  # what the agent could do as uid 0: the test can fail
        assert attempt(as_the_unit(UNIT)) == "PermissionError"


@pytest.fixture(scope="module")
def net() -> Iterator[NetLab]:
    if (why := prerequisites()) is not None or shutil.which("setpriv") is None:
        pytest.skip(why or "setpriv is not installed here")
    lab = NetLab(HOSTS)
    try:
        lab.serve("h2", tcp=[22, 8080])
        lab.serve("cp", tcp=[443])
        yield lab
    finally:
        lab.close()


def _variant(net: NetLab, where: Path, variant: str) -> tuple[str, list[str]]:
    """The backend and the environment making ``iptables*`` legacy iptables for ``iptables-legacy``."""
    if variant == "nftables":
        return "nftables", []
    if shutil.which("iptables-restore") is None or shutil.which("ipset") is None:
        pytest.skip("iptables-restore / ipset not installed")
    default = "legacy" if "legacy" in net.exec("h2", "iptables", "-V").stdout else "nft"
    if variant == "iptables" or default == "legacy":
        return "iptables", []
    multi = shutil.which("xtables-legacy-multi")
    if multi is None:
        pytest.skip("xtables-legacy-multi (legacy iptables) not installed")
    tools = where / "legacy"
    tools.mkdir(mode=0o755)
    for name in LEGACY_TOOLS:
        (tools / name).symlink_to(multi)
    for family in ("ip", "ip6"):  # an iptables-nft run's nf_tables tables are not legacy's
        net.exec("h2", "nft", "delete", "table", family, "filter")
    return "iptables", [f"PATH={tools}:{os.environ['PATH']}"]


# The daemon's drift check, as the unit's user: a bundle applied by this process (its baseline),
# argv[5:] (a CAP_NET_ADMIN process's accept) run, then two drift checks
DRIFT = """
import json, subprocess, sys
from pathlib import Path
from ringfence.bundlewire import Verifier, load_bundle
from ringfence_agent.backends import make_backend
from ringfence_agent.core import Agent
from ringfence_agent.plan import LocalFailsafes
from ringfence_agent.state import StateDir
state = StateDir(Path(sys.argv[2]))
agent = Agent(None, Verifier.from_file(Path(sys.argv[4])), make_backend(sys.argv[3], state.path), state,
              LocalFailsafes(), log=lambda m: None)
agent.track_drift = True
agent.apply_bundle(load_bundle(open(sys.argv[1], "rb").read()))
subprocess.run(sys.argv[5:], check=True)
first, second = agent.check_drift(), agent.check_drift()
status = state.read_json("status.json")
print(json.dumps({"changed": first.changed, "again": second.changed, "tamper": status["counters"]["tamper_reapplied"]}))
"""
TAMPER = {
    "nftables": ["nft", "insert", "rule", "inet", "ringfence", "input", "tcp", "dport", "8080", "accept"],
    "iptables": ["iptables", "-I", "RF-IN", "2", "-p", "tcp", "--dport", "8080", "-j", "ACCEPT"],
}


def _tcp_as(net: NetLab, uid: int, dst: str, port: int) -> bool:
    ids = ["setpriv", f"--reuid={uid}", f"--regid={uid}", "--clear-groups"]
    return net.exec("h2", *ids, *PROBE, "tcp", net.v4(dst), str(port), "--timeout", "0.8").returncode == 0


@pytest.mark.parametrize("variant", ["nftables", "iptables", "iptables-legacy"])
def test_the_agent_enforces_as_its_units_user_within_its_capabilities(
    net: NetLab, scratch_dir: Path, variant: str
) -> None:
    user = unit_user(UNIT)
    assert user is not None and service(UNIT)["NoNewPrivileges"] == "yes"
    net.reset("h2")
    backend, env = _variant(net, scratch_dir, variant)
    docs = scratch_dir / "docs"
    docs.mkdir(mode=0o755)
    state = _state(scratch_dir, user)
    prefix = ["env", *env, *run_as_the_unit_sees_it(user[1]), *as_the_unit(UNIT)]
    agent = [*prefix, str(BIN / "ringfence-agent")]
    common = ["--public-key", str(PUBLIC_KEY), "--state-dir", str(state), "--backend", backend]
    lab = Lab(LAB_POLICY, workloads({h: (net.v4(h), net.v6(h), r) for h, r in ROLES.items()}))
    try:
        # a whole apply, its control-plane fail-safe, status
        doc = lab.bundle("h2")
        out = net.exec("h2", *agent, "apply", "--bundle", str(write(doc, docs / "b1.json")), *common,
                       "--control-plane", net.v4("cp"))  # fmt: skip
        assert out.returncode == 0, out.stderr
        assert net.tcp("h1", "h2", 8080) and not net.tcp("h4", "h2", 8080)
        assert _tcp_as(net, user[0], "cp", 443), "the agent's user lost its control plane"
        assert not _tcp_as(net, 65534, "cp", 443), "another local user reaches the control plane"
        status = net.exec("h2", *agent, "status", "--state-dir", str(state), "--backend", backend, "--json")
        assert status.returncode == 0, status.stderr
        got = json.loads(status.stdout)
        assert got["kernel_programmed"] is True and got["kernel_digest"] == enforced.expected(doc), got

        # a delta removing h1, which cuts its open connection (entry deleted, h2's socket aborted)
        held = net.hold("h1", "h2", 8080)
        assert held.connected and held.ping()
        deltas = lab.remove("h1")
        paths = [x for i, d in enumerate(deltas) for x in ("--delta", str(write(d, docs / f"d{i}.json")))]
        out = net.exec("h2", *agent, "apply-delta", *paths, *common)
        assert out.returncode == 0, out.stderr
        assert any(x.startswith(f"  cut inbound tcp {net.v4('h1')}:") for x in out.stdout.splitlines()), out.stdout
        assert "aborted 1 local socket" in out.stdout and "not aborted" not in out.stdout, out.stdout
        assert not held.ping() and not net.tcp("h1", "h2", 8080)
        net.kill(held.p)

        # the daemon's drift check repairs an inserted accept
        drift_state = _state(docs, user)
        bundle = write(lab.bundle("h2"), docs / "b2.json")
        args = [str(bundle), str(drift_state), backend, str(PUBLIC_KEY), *TAMPER[backend]]
        out = net.exec("h2", *prefix, sys.executable, "-c", DRIFT, *args)
        assert out.returncode == 0, out.stderr
        assert json.loads(out.stdout.splitlines()[-1]) == {"changed": True, "again": False, "tamper": 1}, out.stdout
        assert not net.tcp("h4", "h2", 8080)
    finally:
        net.exec("h2", "env", *env, str(BIN / "ringfence-agent"), "flush", "--backend", backend)

    # without CAP_NET_ADMIN: a clear refusal, nothing of ours in the kernel
    caps = [c for c in service(UNIT)["CapabilityBoundingSet"].split() if c != "CAP_NET_ADMIN"]
    bare = ["env", *env, *setpriv(caps, user), str(BIN / "ringfence-agent")]
    fresh = scratch_dir / "bare"
    fresh.mkdir(mode=0o711)
    common = ["--public-key", str(PUBLIC_KEY), "--state-dir", str(_state(fresh, user)), "--backend", backend]
    out = net.exec("h2", *bare, "apply", "--bundle", str(BUNDLE), *common)
    assert out.returncode != 0 and "Operation not permitted" in out.stderr and "Traceback" not in out.stderr, out.stderr
    assert "ringfence" not in net.exec("h2", "nft", "list", "tables").stdout
    assert (
        "rf-" not in net.exec("h2", "env", *env, "iptables-save").stdout + net.exec("h2", "ipset", "list", "-n").stdout
    )
