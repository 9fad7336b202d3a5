"""The agent seals only what it wrote (review r9, the seal race): a whole apply read the kernel
back right after its commit and sealed whatever it found. A process with CAP_NET_ADMIN and no
access to the state directory watches ``nft monitor`` and inserts an accept between the commit
and the read-back: the loosened table was sealed, and status, the heartbeat digest, ``apply``
("already applied") and the daemon's drift baseline accepted it for good.

Deterministic, not a timing race: the real NftBackend runs in a child process in the lab host's
namespace, subclassed so that the attacker's ``nft insert`` runs at exactly that moment (after
the commit, before the read-back); what it left is then judged by a fresh ``status`` of the real
CLI with the same state directory, and by a real connection."""

from __future__ import annotations

import json
import os
import shutil
import sys
import tempfile
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import pytest

from ringfence import enforced
from ringfence.local.lab import Lab as NetLab
from tests.agent import dataplane
from tests.agent.bundles import GROUP_POLICY, LAB_POLICY, PUBLIC_KEY, Lab, workloads, write
from tests.systemdunit import as_the_unit, service, unit_user

pytestmark = pytest.mark.dataplane

dataplane.require()

HOSTS = {"h1": 1, "h2": 2, "h4": 4, "adm": 250, "cp": 100}
ROLES = {"h1": "client", "h2": "web", "h4": "other"}


net = dataplane.lab_fixture(HOSTS, {"h2": [22, 8080]})
clean = dataplane.reset_fixture("h2")


# The real backend, applying the lab's bundle with the real state directory; between its commit
# and its read-back (the group-set listing comes first, on this code and on the code before) the
# test's "attacker" runs: argv[3] times an accept of tcp/8080 from anyone dressed as a fail-safe
# (only the seal tells it from the agent's), or, with "neighbour", a commit to another table.
RACE = """
import json, subprocess, sys
from pathlib import Path
from ringfence.bundlewire import load_bundle
from ringfence_agent.backends import ApplyError
from ringfence_agent.backends.nft import NftBackend
from ringfence_agent.plan import LocalFailsafes, compile_plan
INSERT = 'insert rule inet ringfence input tcp dport 8080 accept comment "failsafe x"\\n'
NEIGHBOUR = "add table ip neighbour\\nadd chain ip neighbour c{}\\n"
times, what = int(sys.argv[3]), sys.argv[4]
done = []
class Raced(NftBackend):
    def _group_digests(self, names):
        if len(done) < times:
            script = INSERT if what == "insert" else NEIGHBOUR.format(len(done))
            subprocess.run(["nft", "-f", "-"], input=script, text=True, check=True)
            done.append(what)
        return super()._group_digests(names)
backend = Raced(state_dir=Path(sys.argv[2]))
plan = compile_plan(load_bundle(open(sys.argv[1], "rb").read()), LocalFailsafes())
try:
    backend.apply(plan)
    failed = None
except ApplyError as exc:
    failed = str(exc)
print(json.dumps({"raced": len(done), "failed": failed, "baseline": backend.applied_fingerprint,
                  "fresh": backend.fingerprint(), "groups": backend.group_problem()}))
"""
# The same for iptables: the read-back starts with IPv4's iptables-save without counters (the
# commit's own save of before is with them), in this process (not the check's child).
RACE_IPTABLES = """
import json, os, subprocess, sys
from pathlib import Path
from ringfence.bundlewire import load_bundle
from ringfence_agent.backends import ApplyError
from ringfence_agent.backends.iptables import IptablesBackend
from ringfence_agent.plan import LocalFailsafes, compile_plan
INSERT = "*filter\\n-I RF-IN 2 -p tcp --dport 8080 -j ACCEPT\\nCOMMIT\\n"
times, me = int(sys.argv[3]), os.getpid()
done = []
class Raced(IptablesBackend):
    def _save(self, family, counters=False):
        if family == 4 and not counters and os.getpid() == me and len(done) < times and self._gen is not None:
            subprocess.run(["iptables-restore", "--noflush"], input=INSERT, text=True, check=True)
            done.append(1)
        return super()._save(family, counters)
backend = Raced(state_dir=Path(sys.argv[2]))
plan = compile_plan(load_bundle(open(sys.argv[1], "rb").read()), LocalFailsafes())
try:
    backend.apply(plan)
    failed = None
except ApplyError as exc:
    failed = str(exc)
print(json.dumps({"raced": len(done), "failed": failed, "groups": None}))
"""


def _race(
    net: NetLab, tmp_path: Path, times: int, what: str = "insert", backend: str = "nftables", prefix: Sequence[str] = ()
) -> tuple[dict[str, Any], dict[str, Any]]:
    doc = Lab(LAB_POLICY, workloads({h: (net.v4(h), net.v6(h), r) for h, r in ROLES.items()})).bundle("h2")
    state = tmp_path / "state"
    path = write(doc, tmp_path / "bundle.json")
    race = RACE if backend == "nftables" else RACE_IPTABLES
    proc = net.exec("h2", *prefix, sys.executable, "-c", race, str(path), str(state), str(times), what)
    assert proc.returncode == 0, proc.stderr
    raced: dict[str, Any] = json.loads(proc.stdout.splitlines()[-1])
    assert raced["raced"] >= 1, "the attacker never ran between commit and read-back: the test proves nothing"
    status = net.agent("h2", "status", "--state-dir", str(state), "--backend", backend, "--json")
    assert status.returncode == 0, status.stderr
    out: dict[str, Any] = json.loads(status.stdout)
    out["published"] = out.get("kernel_digest") == enforced.expected(doc)
    return raced, out


def _hole(net: NetLab) -> bool:
    return net.tcp("h4", "h2", 8080)


@pytest.mark.parametrize("backend", ["nftables", "iptables"])
def test_attack_a_rule_inserted_between_the_apply_and_its_seal_is_not_sealed(
    net: NetLab, tmp_path: Path, backend: str
) -> None:
    """The accept inserted once, right after the commit: the apply sees that what it read back is
    not what it wrote (the generation moved twice; the same table loaded in a fresh namespace
    reads back otherwise), programs the table again and seals that: the hole is closed, a fresh
    status says programmed with the published digest, the daemon's baseline is the kernel's."""
    raced, status = _race(net, tmp_path, 1, backend=backend)
    assert raced["failed"] is None, raced
    assert status["kernel_programmed"] is True and status["published"], status
    assert not _hole(net), ("the inserted accept is still in force", raced, status)
    if backend == "nftables":
        assert raced["baseline"] is not None and raced["baseline"] == raced["fresh"], raced
        assert raced["groups"] is None, raced


def test_attack_a_rule_inserted_between_the_apply_and_its_seal_is_not_sealed_within_the_units_capabilities(
    net: NetLab,
) -> None:
    """The same as the shipped unit starts the agent: its own user, CAP_NET_ADMIN CAP_NET_RAW
    ambient, no new privileges, and its RestrictNamespaces= seccomp filter (tests/restrictns.py).
    No CAP_SYS_ADMIN for a bare network namespace, so the nftables check makes a user namespace
    holding one (libnftables and the reads run in the child itself): the unit must allow both
    (with RestrictNamespaces=yes the fresh namespace failed, the loosened table was sealed as read
    and tcp/8080 stayed open); the hole is closed."""
    if shutil.which("setpriv") is None:
        pytest.skip("setpriv is not installed here")
    unit = Path(__file__).resolve().parents[2] / "agent" / "packaging" / "ringfence-agent.service"
    assert "CAP_SYS_ADMIN" not in service(unit)["CapabilityBoundingSet"].split()
    user = unit_user(unit)
    assert user is not None
    where = Path(tempfile.mkdtemp(prefix="rf-race-"))  # outside pytest's root-only temp tree
    try:
        where.chmod(0o711)
        (where / "state").mkdir(mode=0o700)
        os.chown(where / "state", *user)  # as systemd makes StateDirectory= for User=
        raced, status = _race(net, where, 1, prefix=as_the_unit(unit))
    finally:
        shutil.rmtree(where, ignore_errors=True)
    assert raced["failed"] is None, raced
    assert status["kernel_programmed"] is True and status["published"], status
    assert not _hole(net), ("the inserted accept is still in force", raced, status)


@pytest.mark.parametrize("backend", ["nftables", "iptables"])
def test_attack_a_rule_inserted_after_every_try_fails_the_apply_unsealed(
    net: NetLab, tmp_path: Path, backend: str
) -> None:
    """The accept inserted after each of the apply's tries: it fails, saying the kernel's rules
    changed while they were applied, and seals nothing: a fresh status says not programmed (the
    daemon's drift check programs it again), the daemon's baseline is none."""
    raced, status = _race(net, tmp_path, 3, backend=backend)
    assert raced["failed"] is not None and "changed while they were applied" in raced["failed"], raced
    assert raced["raced"] == 3, raced
    assert status["kernel_programmed"] is False and not status["published"], status
    assert raced.get("baseline") is None, raced


def test_a_neighbours_commit_during_the_apply_still_seals_it(net: NetLab, tmp_path: Path) -> None:
    """Another process committing to its own table between the commit and the read-back (the
    generation moved twice, as under the attack) does not stop the seal: the same table loaded
    in a fresh network namespace reads back the same, so what was read is what was written."""
    raced, status = _race(net, tmp_path, 1, "neighbour")
    assert raced["failed"] is None, raced
    assert status["kernel_programmed"] is True and status["published"], status
    assert raced["baseline"] is not None and raced["baseline"] == raced["fresh"], raced
    net.exec("h2", "nft", "delete", "table", "ip", "neighbour")


def test_the_fresh_namespace_reads_the_live_table_back_as_written(net: NetLab, tmp_path: Path) -> None:
    """What the check loads in a fresh namespace (the bundle sets left empty) reads back as the
    live table does after a plain apply, group sets included (GROUP_POLICY: concatenated sets)."""
    doc = Lab(GROUP_POLICY, workloads({h: (net.v4(h), net.v6(h), r) for h, r in ROLES.items()})).bundle("h2")
    path = write(doc, tmp_path / "bundle.json")
    script = """
import json, sys
from ringfence.bundlewire import load_bundle
from ringfence_agent.backends.nft import NftBackend
from ringfence_agent.plan import LocalFailsafes, compile_plan
backend = NftBackend()
plan = compile_plan(load_bundle(open(sys.argv[1], "rb").read()), LocalFailsafes())
backend.apply(plan)
held, _ = backend.held()
names = sorted(backend.group_held or {})
print(json.dumps([names, backend._as_written(plan, backend.concatenated(plan), names, held, backend.group_held or {})]))
"""
    proc = net.exec("h2", sys.executable, "-c", script, str(path))
    assert proc.returncode == 0, proc.stderr
    names, same = json.loads(proc.stdout.splitlines()[-1])
    assert names and same is True, (names, same)


def test_an_iptables_apply_beside_other_ipsets_is_sealed(net: NetLab, tmp_path: Path) -> None:
    """Another process's ipsets take kernel slots, so the live rules' ``-m set`` bytes name other
    set indexes than the same rules in the fresh namespace: that check leaves the indexes out
    (iptables-save names the sets), else every iptables apply failed as "changed while applied".
    Two applies (generations a, then b, made while a's sets still exist), both sealed."""
    doc = Lab(LAB_POLICY, workloads({h: (net.v4(h), net.v6(h), r) for h, r in ROLES.items()})).bundle("h2")
    path = write(doc, tmp_path / "bundle.json")
    state = tmp_path / "state"
    for i in range(3):
        net.exec("h2", "ipset", "create", f"neighbour{i}", "hash:ip", "-exist", check=True)
    try:
        for i in range(2):
            if i:  # a change makes the next apply whole (generation b)
                net.exec("h2", "iptables", "-I", "RF-IN", "2", "-p", "tcp", "--dport", "1", "-j", "DROP", check=True)
            args = ["--public-key", str(PUBLIC_KEY), "--backend", "iptables", "--state-dir", str(state)]
            proc = net.agent("h2", "apply", "--bundle", str(path), *args)
            assert proc.returncode == 0, proc.stderr
            status = json.loads(
                net.agent("h2", "status", "--state-dir", str(state), "--backend", "iptables", "--json").stdout
            )
            assert status["kernel_programmed"] is True, (proc.stdout, status)
        assert "gen=b" in net.exec("h2", "iptables", "-S", "RF-IN").stdout
    finally:
        net.agent("h2", "flush", "--backend", "iptables")
        for i in range(3):
            net.exec("h2", "ipset", "destroy", f"neighbour{i}")


# The real Agent core over the real backend, as the daemon runs its drift check: a bundle
# applied and sealed, the accept inserted, then the drift check's re-apply raced on each of its
# tries (argv[4]: how many drift checks are raced so), then one drift check left alone.
DRIFT_RACE = """
import json, subprocess, sys
from pathlib import Path
from ringfence.bundlewire import Verifier, load_bundle
from ringfence_agent.backends import ApplyError
from ringfence_agent.backends.nft import NftBackend
from ringfence_agent.core import Agent
from ringfence_agent.plan import LocalFailsafes
from ringfence_agent.state import StateDir
INSERT = 'insert rule inet ringfence input tcp dport 8080 accept comment "failsafe x"\\n'
race = [0]
class Raced(NftBackend):
    def _group_digests(self, names):
        if race[0] > 0:
            race[0] -= 1
            subprocess.run(["nft", "-f", "-"], input=INSERT, text=True, check=True)
        return super()._group_digests(names)
state = StateDir(Path(sys.argv[2]))
agent = Agent(None, Verifier.from_file(Path(sys.argv[3])), Raced(state_dir=state.path), state, LocalFailsafes(), log=lambda m: None)
agent.track_drift = True
agent.apply_bundle(load_bundle(open(sys.argv[1], "rb").read()))
subprocess.run(["nft", "-f", "-"], input=INSERT, text=True, check=True)
out = []
for _ in range(int(sys.argv[4])):
    race[0] = 3
    try:
        agent.check_drift()
        failed = None
    except ApplyError as exc:
        failed = str(exc)
    status = state.read_json("status.json")
    out.append({"failed": failed, "raced": 3 - race[0], "tamper": status.get("last_tamper"), "counters": status["counters"]})
result = agent.check_drift()
status = state.read_json("status.json")
out.append({"changed": result.changed, "tamper": status.get("last_tamper"), "counters": status["counters"]})
print(json.dumps(out))
"""


def test_attack_a_drift_repair_raced_on_every_try_still_counts_as_tamper(net: NetLab, tmp_path: Path) -> None:
    """Tamper whose repair the attacker races on each of its tries (so each drift re-apply fails
    unsealed, "changed while they were applied") was logged as a failed drift check and never
    counted: ``tamper_reapplied``, which the control plane's ``tampered`` finding reads, stayed
    still for as long as the attacker kept racing. Now each such round counts, ``last_tamper``
    says it was not repaired and why, and the first round left alone repairs it."""
    doc = Lab(LAB_POLICY, workloads({h: (net.v4(h), net.v6(h), r) for h, r in ROLES.items()})).bundle("h2")
    path = write(doc, tmp_path / "bundle.json")
    state = tmp_path / "state"
    proc = net.exec("h2", sys.executable, "-c", DRIFT_RACE, str(path), str(state), str(PUBLIC_KEY), "2")
    assert proc.returncode == 0, proc.stderr
    *raced, repaired = json.loads(proc.stdout.splitlines()[-1])
    for n, r in enumerate(raced, 1):
        assert r["raced"] == 3 and r["failed"] and "changed while they were applied" in r["failed"], r
        assert r["counters"]["tamper_reapplied"] == n, r
        assert r["tamper"]["repaired"] is False and r["tamper"]["what"] == "changed", r
        assert "changed while they were applied" in r["tamper"]["error"], r
    assert repaired["changed"] is True and repaired["counters"]["tamper_reapplied"] == 3, repaired
    assert repaired["tamper"]["repaired"] is True and "error" not in repaired["tamper"], repaired
    assert not _hole(net), ("the inserted accept is still in force", raced, repaired)
    net.agent("h2", "flush", "--backend", "nftables")
