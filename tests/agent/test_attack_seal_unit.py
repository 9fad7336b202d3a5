"""The seal race (tests/agent/test_attack_seal_race.py) where the agent has no CAP_SYS_ADMIN, as
the shipped unit starts it, and where no namespace can be made at all; and the drift baseline
of an iptables apply.

- Under the unit (its own user, CAP_NET_ADMIN CAP_NET_RAW ambient, ``RestrictNamespaces=user
  net``) the iptables check loads the rules in a user namespace holding a fresh network namespace,
  the agent's uid mapped to itself there (the control-plane fail-safe's ``--uid-owner``) and the
  capabilities ambient for iptables-restore and ipset: an accept inserted between the commit and
  the read-back is not sealed. It was sealed as read: no bare namespace without CAP_SYS_ADMIN.
  So is the nftables check's with the ``nft`` binary (no libnftables), which it executes there.
- Where no namespace can be made at all (``RestrictNamespaces=yes``, as tests/restrictns.py
  loads it) the check cannot run, and nothing is sealed on trust: nftables tries again (sealed
  once the generation moved by one alone), else fails unsealed saying why, as iptables does at
  once. Both sealed what they read.
- The daemon's drift baseline is the read-back the seal verified: iptables took a second read
  after the seal, so an accept inserted in between became the baseline and was never repaired.

Deterministic: the real Agent and backend run in the lab host's namespace, subclassed so that
the "attacker" (a process with CAP_NET_ADMIN) acts at exactly that moment; a fresh ``status`` of
the real CLI and a real connection judge what it left."""

from __future__ import annotations

import json
import os
import shutil
import sys
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

import pytest

from ringfence import enforced
from ringfence.local.lab import Lab as NetLab
from tests.agent import dataplane
from tests.agent.bundles import LAB_POLICY, PUBLIC_KEY, Lab, workloads, write
from tests.agent.test_agent_unit_caps import LEGACY_TOOLS, run_as_the_unit_sees_it
from tests.systemdunit import as_the_unit, reachable_dir, restrict_namespaces, service, setpriv, unit_user

pytestmark = pytest.mark.dataplane

dataplane.require()

UNIT = Path(__file__).resolve().parents[2] / "agent" / "packaging" / "ringfence-agent.service"
HOSTS = {"h1": 1, "h2": 2, "h4": 4, "adm": 250, "cp": 100}
ROLES = {"h1": "client", "h2": "web", "h4": "other"}


net = dataplane.lab_fixture(HOSTS, {"h2": [22, 8080]})
clean = dataplane.reset_fixture("h2")


@pytest.fixture
def where() -> Iterator[Path]:
    """Outside pytest's root-only temp tree: the unit's user reaches the bundle and its state."""
    with reachable_dir("rf-seal-unit-") as made:
        yield made


# The real Agent over the real backend (argv[4]), applying the lab's bundle with a real state
# directory; the "attacker" inserts an accept of tcp/8080 from anyone: argv[5] = "read" between
# the commit and the read-back of each of the first argv[6] tries, "sealed" right after the seal
# (before anything else reads the kernel). The daemon's drift check is on; after the apply, one
# drift check runs (argv[7] == "1").
RACE = """
import json, os, subprocess, sys
from pathlib import Path
from ringfence.bundlewire import Verifier, load_bundle
from ringfence_agent.backends import ApplyError
from ringfence_agent.backends.iptables import IptablesBackend
from ringfence_agent.backends.nft import NftBackend
from ringfence_agent.core import Agent
from ringfence_agent.plan import LocalFailsafes
from ringfence_agent.state import StateDir
bundle, state_dir, key, backend, when, times, drift = sys.argv[1:8]
times, me, done = int(times), os.getpid(), []
def attack():
    if backend == "nftables":
        script = 'insert rule inet ringfence input tcp dport 8080 accept comment "failsafe x"\\n'
        subprocess.run(["nft", "-f", "-"], input=script, text=True, check=True)
    else:
        script = "*filter\\n-I RF-IN 2 -p tcp --dport 8080 -j ACCEPT\\nCOMMIT\\n"
        subprocess.run(["iptables-restore", "--noflush"], input=script, text=True, check=True)
    done.append(when)
class Nft(NftBackend):
    def _group_digests(self, names):  # the read-back starts here
        if when == "read" and len(done) < times:
            attack()
        return super()._group_digests(names)
    def _seal(self, held):
        super()._seal(held)
        if when == "sealed" and len(done) < times:
            attack()
class Iptables(IptablesBackend):
    def _save(self, family, counters=False):  # the read-back starts with IPv4's, without counters
        if when == "read" and family == 4 and not counters and os.getpid() == me and len(done) < times and self._gen:
            attack()
        return super()._save(family, counters)
    def _seal(self, *args):
        super()._seal(*args)
        if when == "sealed" and len(done) < times:
            attack()
state = StateDir(Path(state_dir))
made = (Nft if backend == "nftables" else Iptables)(state_dir=state.path)
agent = Agent(None, Verifier.from_file(Path(key)), made, state, LocalFailsafes(), log=lambda m: None)
agent.track_drift = True
try:
    agent.apply_bundle(load_bundle(open(bundle, "rb").read()))
    failed = None
except ApplyError as exc:
    failed = str(exc)
baseline = agent._baseline if isinstance(agent._baseline, str) or agent._baseline is None else "nothing applied"
out = {"raced": len(done), "failed": failed, "baseline": baseline, "fresh": made.fingerprint()}
if drift == "1":
    out["repaired"] = agent.check_drift().changed
print(json.dumps(out))
"""


def _race(
    net: NetLab,
    where: Path,
    backend: str,
    when: str,
    times: int,
    prefix: Sequence[str] = (),
    env: Sequence[str] = (),
    drift: bool = False,
) -> tuple[dict[str, Any], dict[str, Any]]:
    """(what the raced apply said, a fresh ``status --json`` of the real CLI with ``published``:
    whether its kernel digest is the bundle's)."""
    doc = Lab(LAB_POLICY, workloads({h: (net.v4(h), net.v6(h), r) for h, r in ROLES.items()})).bundle("h2")
    path = write(doc, where / "bundle.json")
    path.chmod(0o644)
    state = where / "state"
    state.mkdir(mode=0o700)
    user = unit_user(UNIT)
    if prefix and user is not None:
        os.chown(state, *user)  # as systemd makes StateDirectory= for User=
    args = [str(path), str(state), str(PUBLIC_KEY), backend, when, str(times), "1" if drift else "0"]
    proc = net.exec("h2", *(["env", *env] if env else []), *prefix, sys.executable, "-c", RACE, *args)
    assert proc.returncode == 0, proc.stderr
    raced: dict[str, Any] = json.loads(proc.stdout.splitlines()[-1])
    assert raced["raced"] >= 1, ("the attacker never ran: the test proves nothing", raced)
    status = net.agent("h2", "status", "--state-dir", str(state), "--backend", backend, "--json", env=env)
    assert status.returncode == 0, status.stderr
    out: dict[str, Any] = json.loads(status.stdout)
    out["published"] = out.get("kernel_digest") == enforced.expected(doc)
    return raced, out


def _hole(net: NetLab) -> bool:
    return net.tcp("h4", "h2", 8080)


def _unit_prefix(restrict: str | None = None) -> list[str]:
    """As the unit starts the agent (its RestrictNamespaces=, or ``restrict``'s filter instead)."""
    if shutil.which("setpriv") is None:
        pytest.skip("setpriv is not installed here")
    section = service(UNIT)
    assert "CAP_SYS_ADMIN" not in section["CapabilityBoundingSet"].split()
    if restrict is None:
        return as_the_unit(UNIT)
    return [*restrict_namespaces(restrict), *setpriv(section["CapabilityBoundingSet"].split(), unit_user(UNIT))]


def _iptables(net: NetLab, where: Path, variant: str) -> list[str]:
    """The environment making ``iptables*`` that ``variant`` (iptables-nft or iptables-legacy)."""
    dataplane.iptables_or_skip()
    legacy = "legacy" in net.exec("h2", "iptables", "-V").stdout
    if (variant == "iptables-legacy") == legacy:
        return []
    if variant == "iptables-nft":
        pytest.skip("iptables here is legacy iptables")
    multi = shutil.which("xtables-legacy-multi")
    if multi is None:
        pytest.skip("xtables-legacy-multi (legacy iptables) not installed")
    tools = where / "legacy"
    tools.mkdir(mode=0o755)
    for name in LEGACY_TOOLS:
        (tools / name).symlink_to(multi)
    for family in ("ip", "ip6"):  # an iptables-nft run's nf_tables tables are not legacy's
        net.exec("h2", "nft", "delete", "table", family, "filter")
    return [f"PATH={tools}:{os.environ['PATH']}"]


@pytest.mark.parametrize("variant", ["iptables-nft", "iptables-legacy"])
def test_attack_a_rule_inserted_between_the_iptables_apply_and_its_seal_is_not_sealed_under_the_unit(
    net: NetLab, where: Path, variant: str
) -> None:
    """As the unit starts the agent (no CAP_SYS_ADMIN): the accept inserted once, between the
    commit and the read-back. The check's user namespace maps the agent's uid, so the rules with
    the control-plane fail-safe's ``--uid-owner`` load there and read back otherwise than the live
    ones: the apply is done again and sealed; the hole is closed, a fresh status says programmed
    with the published digest, the drift baseline is the kernel's. It was sealed as read, the
    accept open. (/run as the unit sees it: legacy iptables locks /run/xtables.lock.)"""
    env = _iptables(net, where, variant)
    user = unit_user(UNIT)
    assert user is not None
    try:
        raced, status = _race(
            net, where, "iptables", "read", 1, [*run_as_the_unit_sees_it(user[1]), *_unit_prefix()], env
        )
        assert raced["failed"] is None, raced
        assert status["kernel_programmed"] is True and status["published"], status
        assert not _hole(net), ("the inserted accept is still in force", raced, status)
        assert raced["baseline"] is not None and raced["baseline"] == raced["fresh"], raced
    finally:
        net.agent("h2", "flush", "--backend", "iptables", env=env)


def test_attack_a_rule_inserted_between_the_apply_and_its_seal_is_not_sealed_under_the_unit_with_the_nft_binary(
    net: NetLab, where: Path
) -> None:
    """nftables without libnftables (``RINGFENCE_NFT_CLI=1``: the ``nft`` binary), as the unit
    starts the agent: the check executes nft in the user namespace, which keeps CAP_NET_ADMIN
    there as an ambient capability; the accept is not sealed, the hole is closed. Only the
    library's in-process check had a user namespace: the binary's read was sealed as read."""
    raced, status = _race(net, where, "nftables", "read", 1, ["env", "RINGFENCE_NFT_CLI=1", *_unit_prefix()])
    assert raced["failed"] is None, raced
    assert status["kernel_programmed"] is True and status["published"], status
    assert not _hole(net), ("the inserted accept is still in force", raced, status)
    assert raced["baseline"] is not None and raced["baseline"] == raced["fresh"], raced


def test_attack_a_rule_inserted_between_the_apply_and_its_seal_is_not_sealed_where_no_namespace_can_be_made(
    net: NetLab, where: Path
) -> None:
    """``RestrictNamespaces=yes`` (the reviewer's reproduction): no namespace can be made, so the
    nftables check cannot run; the generation moved twice (the accept's commit), so the read is
    not sealed but tried again, and the second try, left alone (the generation moved by one),
    is sealed: the hole is closed. It was sealed as read, tcp/8080 open."""
    raced, status = _race(net, where, "nftables", "read", 1, _unit_prefix("yes"))
    assert raced["failed"] is None, raced
    assert status["kernel_programmed"] is True and status["published"], status
    assert not _hole(net), ("the inserted accept is still in force", raced, status)
    assert raced["baseline"] is not None and raced["baseline"] == raced["fresh"], raced


def test_attack_an_apply_where_no_namespace_can_be_made_fails_unsealed_saying_why(net: NetLab, where: Path) -> None:
    """``RestrictNamespaces=yes``, the accept inserted on every try of an nftables apply: the
    apply fails unsealed and says the seal check could not run and why (no CAP_SYS_ADMIN, user
    namespaces refused), and so does the status's last_error; a fresh status says not programmed;
    no drift baseline. It was sealed as read, the accept with it."""
    raced, status = _race(net, where, "nftables", "read", 3, _unit_prefix("yes"))
    assert raced["raced"] == 3, raced
    for said in (raced["failed"], status["last_error"]):
        assert said is not None and "the seal check could not run" in said, (raced, status)
        assert "no CAP_SYS_ADMIN" in said and "user namespaces refused" in said, said
    assert status["kernel_programmed"] is False and not status["published"], status
    assert raced["baseline"] == "nothing applied", raced
    net.agent("h2", "flush", "--backend", "nftables")


def test_an_iptables_apply_where_no_namespace_can_be_made_is_sealed_as_read_and_says_so(
    net: NetLab, where: Path
) -> None:
    """``RestrictNamespaces=yes`` with iptables, which has no ruleset generation to fall back on:
    failing every apply would leave no bundle ever in force as the last known good (a start would
    hold the boot posture), so the read-back is sealed as read (the documented limit: the seal
    race stays open there) and status says so and why, in ``seal_unchecked``; a whole apply where
    the check runs (root's, CAP_SYS_ADMIN) clears it."""
    dataplane.iptables_or_skip()
    raced, status = _race(net, where, "iptables", "read", 1, _unit_prefix("yes"))
    assert raced["failed"] is None, raced
    assert status["kernel_programmed"] is True, status
    said = status["seal_unchecked"]
    assert said is not None and "no CAP_SYS_ADMIN" in said and "user namespaces refused" in said, status
    state = where / "state"
    flushed = net.agent("h2", "flush", "--backend", "iptables")  # else "already applied"
    assert flushed.returncode == 0, flushed.stderr
    applied = net.agent(
        "h2", "apply", "--bundle", str(where / "bundle.json"), "--public-key", str(PUBLIC_KEY),
        "--backend", "iptables", "--state-dir", str(state),
    )  # fmt: skip
    assert applied.returncode == 0, applied.stderr
    again = json.loads(net.agent("h2", "status", "--state-dir", str(state), "--backend", "iptables", "--json").stdout)
    assert again["seal_unchecked"] is None and again["kernel_programmed"] is True, (applied.stdout, again)
    net.agent("h2", "flush", "--backend", "iptables")


@pytest.mark.parametrize("backend", ["nftables", "iptables"])
def test_attack_a_rule_inserted_right_after_the_seal_is_repaired_by_the_drift_check(
    net: NetLab, where: Path, backend: str
) -> None:
    """The accept inserted right after the seal, before anything else reads the kernel. The seal
    does not cover it (a fresh status says not programmed), and the daemon's drift baseline is
    the read the seal verified, so the next drift check re-applies and the hole is closed. With
    iptables the baseline was a second read after the seal, the accept in it: no drift check
    ever repaired it."""
    if backend == "iptables":
        dataplane.iptables_or_skip()
    raced, _ = _race(net, where, backend, "sealed", 1, drift=True)
    assert raced["failed"] is None, raced
    assert raced["baseline"] is not None and raced["baseline"] != raced["fresh"], raced
    assert raced["repaired"] is True, raced
    assert not _hole(net), ("the inserted accept is still in force", raced)
    net.agent("h2", "flush", "--backend", backend)
