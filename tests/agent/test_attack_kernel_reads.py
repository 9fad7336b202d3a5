"""What the kernel holds cannot hide from the agent, nor kill it (review of the agent's kernel
reads): a rule nft cannot render was left out of every listing and so of every digest; a string
that is not UTF-8, in another process's table or in Ringfence's own, made libnftables abort()
the agent while printing JSON; a table made dormant while the agent read it was printed by
libnftables in-process (its use-after-free). Real agent, real nftables, in network namespaces."""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from ringfence import enforced
from ringfence.local.lab import Lab as NetLab
from ringfence.local.lab import wait_until
from tests.agent import dataplane
from tests.agent.agentdaemon import running_daemon
from tests.agent.bundles import PUBLIC_KEY, write
from tests.agent.test_attack_kernel_truth import (
    HOSTS,
    _apply,
    _engine,
    _intact,
    _reported_and_reapplied,
    _status,
)

pytestmark = pytest.mark.dataplane

dataplane.require()

NFRAW = str(Path(__file__).with_name("nfraw.py"))
INSERT = ("nft", "insert", "rule", "inet", "ringfence", "input")  # a rule at the head of the input chain


net = dataplane.lab_fixture(HOSTS, {"h2": [22, 8080], "cp": [443, 8080]})
clean = dataplane.reset_fixture("h2", tables=["inet other"])


def _listed_rules(net: NetLab, chain: str) -> int:
    out = net.exec("h2", "nft", "-j", "list", "chain", "inet", "ringfence", chain, check=True).stdout
    return sum(1 for x in json.loads(out)["nftables"] if "rule" in x)


def test_attack_a_rule_nft_cannot_parse_is_reported(net: NetLab, tmp_path: Path) -> None:
    """A rule [immediate accept][inner ...] inserted over raw netlink at the head of Ringfence's
    input chain accepts every packet, and nft/libnftables 1.0.6 (which does not know the
    kernel's ``inner`` expression) leaves it out of every listing: status said programmed, the
    digest matched the published one and ``apply`` said "already applied". The digest is now
    taken of the kernel's own bytes over netlink: reported, and ``apply`` programs it again."""
    doc = _engine(net).bundle("h2")
    state = tmp_path / "state"
    _apply(net, "nftables", doc, state)
    assert not net.tcp("h4", "h2", 8080) and net.tcp("h1", "h2", 8080)
    _intact(net, "nftables", state, doc)
    listed = _listed_rules(net, "input")
    net.exec("h2", sys.executable, NFRAW, "hidden-accept", "inet", "ringfence", "input", check=True)
    assert _listed_rules(net, "input") == listed, "nft shows the rule: the test proves nothing"
    _reported_and_reapplied(net, "nftables", state, doc, lambda: net.tcp("h4", "h2", 8080))


@pytest.mark.parametrize("chain", ["INPUT", "RF-IN"])
def test_attack_a_rule_iptables_cannot_show_is_reported(net: NetLab, tmp_path: Path, chain: str) -> None:
    """iptables-nft: the same hidden ``accept`` at the head of ``ip filter INPUT`` (before
    Ringfence's jump) or of ``RF-IN``: iptables-save (1.8.9) leaves it out, so the jump looked
    first and the chain whole. Over netlink the first rule of INPUT must be the jump and RF-IN
    must hold what iptables-save shows; ``apply`` moves the jump first again (the hidden rule,
    now after it, decides nothing) or rebuilds the chain."""
    dataplane.iptables_or_skip()
    if "nf_tables" not in net.exec("h2", "iptables", "-V").stdout:
        pytest.skip("iptables-legacy: iptables-save shows every rule")
    doc = _engine(net).bundle("h2")
    state = tmp_path / "state"
    _apply(net, "iptables", doc, state)
    assert not net.tcp("h4", "h2", 8080)
    _intact(net, "iptables", state, doc)
    saved = net.exec("h2", "iptables-save", "-t", "filter", check=True).stdout
    net.exec("h2", sys.executable, NFRAW, "hidden-accept", "ip", "filter", chain, check=True)
    assert net.exec("h2", "iptables-save", "-t", "filter", check=True).stdout.count("\n-A ") == saved.count("\n-A ")
    _reported_and_reapplied(net, "iptables", state, doc, lambda: net.tcp("h4", "h2", 8080))


def test_attack_a_non_utf8_rule_in_ringfences_table_is_repaired(net: NetLab, tmp_path: Path) -> None:
    """An ``accept`` inserted into Ringfence's input chain (a loosening the agent reports and
    repairs), shielded by a rule matching an interface name that is not UTF-8: libnftables
    1.0.6 abort()s printing that rule as JSON, and it did so inside ``status`` and ``apply``
    (SIGABRT) before either could report or repair anything: the hole stayed. The listing now
    runs in a child process: status says the rules are not as applied and why the read failed,
    and ``apply`` programs them again."""
    doc = _engine(net).bundle("h2")
    state = tmp_path / "state"
    _apply(net, "nftables", doc, state)
    _intact(net, "nftables", state, doc)
    net.exec("h2", "nft", "insert", "rule", "inet", "ringfence", "input", "accept", check=True)
    shield = "nft insert rule inet ringfence input iifname \\\"$(printf 'x\\377')\\\" accept"
    net.exec("h2", "sh", "-c", shield, check=True)
    assert net.tcp("h4", "h2", 8080), "the tamper did not open anything: the test proves nothing"
    status = _status(net, "nftables", state)
    assert "SIGABRT" in str(status["kernel_read_error"]), status
    _reported_and_reapplied(net, "nftables", state, doc, lambda: net.tcp("h4", "h2", 8080))
    assert _status(net, "nftables", state)["kernel_read_error"] is None


def test_attack_a_foreign_chain_name_nft_cannot_print_does_not_stop_the_agent(net: NetLab, tmp_path: Path) -> None:
    """Another process's own table holding a chain whose name is not UTF-8 (any CAP_NET_ADMIN
    process, over raw netlink) made libnftables abort() while the agent listed ``chains inet``:
    the daemon's drift check, status and apply died with SIGABRT, and a restarted daemon died at
    its seal, for good. The agent now reads only its own table, over netlink, and lists through
    libnftables in a child: the daemon keeps enforcing, status and apply work."""
    doc = _engine(net).bundle("h2")
    with running_daemon(net, tmp_path, doc, report_interval=1, drift_interval=1) as daemon:
        assert wait_until(lambda: not net.tcp("h4", "h2", 8080, timeout=0.3), 15), daemon.said()
        net.exec("h2", sys.executable, NFRAW, "badname-chain", "other", check=True)
        time.sleep(4)  # drift checks, heartbeats and observations, each reading the kernel
        assert daemon.proc.poll() is None, daemon.said()
        assert not net.tcp("h4", "h2", 8080) and net.tcp("h1", "h2", 8080)
        _intact(net, "nftables", daemon.state, doc)
        assert "tamper" not in daemon.said(), daemon.said()  # nothing of Ringfence's changed
    state = daemon.state
    path = write(doc, tmp_path / "again.json")
    proc = net.agent("h2", "apply", "--bundle", str(path), "--public-key", str(PUBLIC_KEY), "--backend", "nftables",
                     "--state-dir", str(state))  # fmt: skip
    assert proc.returncode == 0 and "already applied" in proc.stdout, (proc.stdout, proc.stderr)
    # a restarted agent applies from scratch (the table gone) and seals it
    net.exec("h2", "nft", "delete", "table", "inet", "ringfence", check=True)
    proc = net.agent("h2", "apply", "--bundle", str(path), "--public-key", str(PUBLIC_KEY), "--backend", "nftables",
                     "--state-dir", str(state))  # fmt: skip
    assert proc.returncode == 0, proc.stderr
    _intact(net, "nftables", state, doc)


DORMANT_MEANWHILE = """
import json, subprocess, sys
from ringfence.bundlewire import load_bundle
from ringfence_agent.backends import nft
from ringfence_agent.plan import LocalFailsafes, compile_plan
backend = nft.NftBackend()
assert backend.lib is not None, "libnftables not loaded: the test proves nothing"
backend.apply(compile_plan(load_bundle(open(sys.argv[1], "rb").read()), LocalFailsafes()))
intact = backend.enforced()
listed, real_run, real_info = [], backend.lib.run, nft.table_info
def spy(script, *args, **kwargs):
    if args and args[0] or kwargs.get("json_output"):  # a JSON listing in this process
        listed.append(script.strip())
    return real_run(script, *args, **kwargs)
def info(family, name, *args, **kwargs):
    # the race, made certain: the flags are read, then the table is made dormant at once
    out = real_info(family, name, *args, **kwargs)
    subprocess.run(["nft", "add", "table", "inet", "ringfence", "{ flags dormant; }"], check=True)
    return out
backend.lib.run, nft.table_info = spy, info
after = backend.enforced()
print(json.dumps([intact, after, listed]))
"""


def test_attack_a_table_made_dormant_while_the_agent_reads_it_is_never_printed_in_process(
    net: NetLab, tmp_path: Path
) -> None:
    """The enforced digest read the table's flags over netlink, then listed the table through
    libnftables in-process: made dormant in between (a tight loop of a root process hits it), the
    table was printed with its one flag, libnftables 1.0.6's use-after-free, in the agent's heap.
    Here the table is made dormant right after each flag read, every time: no JSON listing runs
    in the agent's process, and the digest is not the published one."""
    doc = _engine(net).bundle("h2")
    path = write(doc, tmp_path / "bundle.json")
    proc = net.exec("h2", sys.executable, "-c", DORMANT_MEANWHILE, str(path))
    assert proc.returncode == 0, proc.stderr
    intact, after, listed = json.loads(proc.stdout)
    assert intact == enforced.expected(doc)
    assert listed == [], listed
    assert after != enforced.expected(doc)


def test_attack_a_name_nft_cannot_print_in_ringfences_table_is_repaired_by_the_daemon(
    net: NetLab, tmp_path: Path
) -> None:
    """A named counter whose name is not UTF-8 added to Ringfence's table (raw netlink): no rule
    or fail-safe changes, but libnftables 1.0.6 abort()s printing the table as JSON, which the
    heartbeat's enforced digest and the observer did in the daemon's process. The listing now
    dies in a child: cannot tell is never intact, so the daemon programs the table again (the
    counter is gone) and keeps running."""
    doc = _engine(net).bundle("h2")
    # the heartbeat (each poll round) lists the table: the observer no longer does
    with running_daemon(net, tmp_path, doc, poll_interval=1, drift_interval=2) as daemon:
        said = daemon.said
        assert wait_until(lambda: not net.tcp("h4", "h2", 8080, timeout=0.3), 15), said()
        net.exec("h2", sys.executable, NFRAW, "badname-counter", "ringfence", check=True)
        listing = net.exec("h2", "nft", "-j", "list", "table", "inet", "ringfence")
        assert listing.returncode != 0, "nft prints the table: the test proves nothing"
        assert wait_until(lambda: "could not be read" in said(), 10), said()
        assert wait_until(
            lambda: net.exec("h2", "nft", "-j", "list", "table", "inet", "ringfence").returncode == 0, 10
        ), said()
        assert daemon.proc.poll() is None, said()
        assert not net.tcp("h4", "h2", 8080) and net.tcp("h1", "h2", 8080)
        _intact(net, "nftables", daemon.state, doc)
        assert _status(net, "nftables", daemon.state)["last_tamper"]["what"] == "unreadable"


# A neighbour (a fail2ban or crowdsec) committing to its own tables in a loop, one of them with
# many chains: the kernel does not filter a chain dump by table, so the agent's comes in many parts
# and a commit between two of them marks it interrupted (NLM_F_DUMP_INTR).
_CHURN = """
import ctypes, sys, time
lib = ctypes.CDLL("libnftables.so.1")
lib.nft_ctx_new.restype = ctypes.c_void_p
lib.nft_run_cmd_from_buffer.argtypes = [ctypes.c_void_p, ctypes.c_char_p]
ctx = ctypes.c_void_p(lib.nft_ctx_new(0))
setup = b"add table ip churn\\nadd set ip churn s { type ipv4_addr; }\\nadd table inet other\\n"
lib.nft_run_cmd_from_buffer(ctx, setup + b"".join(b"add chain inet other c%d\\n" % i for i in range(20000)))
print("ready", flush=True)
end = time.time() + float(sys.argv[1])
while time.time() < end:
    lib.nft_run_cmd_from_buffer(ctx, b"add element ip churn s { 1.2.3.4 }\\n")
    lib.nft_run_cmd_from_buffer(ctx, b"delete element ip churn s { 1.2.3.4 }\\n")
"""


@pytest.mark.slow
def test_attack_a_tamper_under_ruleset_churn_elsewhere_is_reapplied(net: NetLab, tmp_path: Path) -> None:
    """A neighbour commits to its own table in a loop while a rule accepting tcp/8080 is
    inserted at the head of Ringfence's input chain. Every netlink dump of the drift check came
    back interrupted (InterruptedError after 4 tries, an OSError the check took for "nothing to
    do"): the hole stayed open, unlogged, for as long as the churn lasted. Dumps are now asked
    again until a deadline, and one that cannot be read is "cannot tell": re-applied, reported."""
    doc = _engine(net).bundle("h2")
    churn = None
    with running_daemon(net, tmp_path, doc, drift_interval=1) as daemon:
        try:
            assert wait_until(lambda: not net.tcp("h4", "h2", 8080, timeout=0.3), 15), daemon.said()
            # runs until killed below: a fixed length could end before a loaded machine's repair
            churn = net.spawn("h2", sys.executable, "-c", _CHURN, "600", stdout=subprocess.PIPE)
            assert churn.stdout is not None and churn.stdout.readline().strip() == "ready"
            time.sleep(2)
            net.exec("h2", *INSERT, "tcp", "dport", "8080", "accept", check=True)
            assert wait_until(lambda: not net.tcp("h4", "h2", 8080, timeout=0.3), 25), daemon.said()
            assert churn.poll() is None, "the churn stopped before the repair: the test proves nothing"
            assert wait_until(
                lambda: _status(net, "nftables", daemon.state).get("counters", {}).get("tamper_reapplied", 0) >= 1, 10
            ), daemon.said()
            assert daemon.proc.poll() is None, daemon.said()
        finally:
            if churn is not None:
                net.kill(churn)


# The attacker: any CAP_NET_ADMIN process in the namespace, without the state directory. It
# digests what the kernel holds exactly as the agent does (the agent's own netlink read, public
# code, no state directory: no key) and renames the seal chain to that digest, which is what the
# agent's seal was before it was keyed.
RESEAL = """
import subprocess
from ringfence_agent.backends.nft import SEAL, NftBackend
held, seal = NftBackend().held()
assert held is not None and seal is not None, (held, seal)
subprocess.run(["nft", "delete", "chain", "inet", "ringfence", SEAL + seal], check=True)
subprocess.run(["nft", "add", "chain", "inet", "ringfence", SEAL + held], check=True)
"""
# What the daemon's heartbeat sends (Agent.enforced_state), read by a fresh process: a restarted
# daemon before it applies, or the running one's next heartbeat.
HEARTBEAT_READ = """
import json, sys
from pathlib import Path
from ringfence.bundlewire import Verifier
from ringfence_agent.backends import make_backend
from ringfence_agent.core import Agent
from ringfence_agent.plan import LocalFailsafes
from ringfence_agent.state import StateDir
state = Path(sys.argv[2])
backend = make_backend("nftables", state)
agent = Agent(None, Verifier.from_file(Path(sys.argv[1])), backend, StateDir(state), LocalFailsafes(), log=print)
print(json.dumps(agent.enforced_state()[1]))
"""
# an accept dressed as one of the agent's fail-safes: only the seal can tell it is not the agent's
FORGED_FAILSAFE = (*INSERT, "tcp", "dport", "8080", "accept", "comment", '"failsafe admin"')


def _reseal(net: NetLab) -> None:
    net.exec("h2", *FORGED_FAILSAFE, check=True)
    net.exec("h2", sys.executable, "-c", RESEAL, check=True)
    assert net.tcp("h4", "h2", 8080), "the tamper did not open anything: the test proves nothing"


def test_attack_a_reforged_seal_does_not_pass_for_the_agents(net: NetLab, tmp_path: Path) -> None:
    """The seal named the plain digest of what the kernel held: a process with CAP_NET_ADMIN in
    the namespace (a --net=host container with NET_ADMIN, a CNI plugin), which cannot read the
    state directory, inserted an accept dressed as a fail-safe, digested the table as the agent
    does and renamed the seal chain to it. A fresh ``status`` said programmed with the published
    digest, the heartbeat sent that digest, and ``apply`` said "already applied" with the hole
    open. The seal is now an HMAC keyed by ``seal.key`` in the state directory: status reports
    the table altered, the heartbeat's digest is not the published one, ``apply`` programs the
    rules again (the accept gone) and seals them; the next apply finds them intact (also what an
    agent upgraded from the unkeyed seal does: one apply, then sealed)."""
    doc = _engine(net).bundle("h2")
    state = tmp_path / "state"
    _apply(net, "nftables", doc, state)
    assert (state / "seal.key").stat().st_mode & 0o777 == 0o600
    _intact(net, "nftables", state, doc)
    _reseal(net)
    problem = _status(net, "nftables", state)["warning"]
    assert "unkeyed seal" in problem, problem
    proc = net.exec("h2", sys.executable, "-c", HEARTBEAT_READ, str(PUBLIC_KEY), str(state))
    assert proc.returncode == 0, proc.stderr
    assert json.loads(proc.stdout.splitlines()[-1]) not in (None, enforced.expected(doc)), proc.stdout
    _reported_and_reapplied(net, "nftables", state, doc, lambda: net.tcp("h4", "h2", 8080))
    listed = net.exec("h2", "nft", "list", "chain", "inet", "ringfence", "input").stdout
    assert 'tcp dport 8080 accept comment "failsafe admin"' not in listed, listed
    out = _apply(net, "nftables", doc, state)
    assert "already applied" in out, out


def test_attack_a_reforged_seal_is_repaired_by_the_running_daemon_without_its_drift_check(
    net: NetLab, tmp_path: Path
) -> None:
    """The same reforged seal under a running daemon whose drift check is off (drift_interval
    300: its in-memory baseline never looks). Its other reads of the kernel, each poll round's
    "does the kernel hold the bundle" and the heartbeat's enforced digest, took the forged seal
    for the agent's: the published digest was sent and the hole stayed open. They now read the
    table as altered and the daemon programs it again within a round or two."""
    doc = _engine(net).bundle("h2")
    with running_daemon(net, tmp_path, doc, poll_interval=1, drift_interval=300) as daemon:
        assert wait_until(lambda: not net.tcp("h4", "h2", 8080, timeout=0.3), 15), daemon.said()
        # no poll round between the tamper and the look at it (under load one repaired it first)
        os.killpg(daemon.proc.pid, signal.SIGSTOP)
        try:
            _reseal(net)
        finally:
            os.killpg(daemon.proc.pid, signal.SIGCONT)
        assert wait_until(lambda: not net.tcp("h4", "h2", 8080, timeout=0.3), 10), daemon.said()
        assert "applied again" in daemon.said() or "tamper" in daemon.said(), daemon.said()
        _intact(net, "nftables", daemon.state, doc)


def test_a_lost_seal_key_never_reads_as_intact(net: NetLab, tmp_path: Path) -> None:
    """Without its key (deleted, or unreadable) no seal can be checked: status says the rules are
    not as applied, and ``apply`` makes a new key and seals them again."""
    doc = _engine(net).bundle("h2")
    state = tmp_path / "state"
    _apply(net, "nftables", doc, state)
    key = (state / "seal.key").read_text()
    (state / "seal.key").unlink()
    status = _status(net, "nftables", state)
    assert status["kernel_programmed"] is False and "seal key" in status["warning"], status
    assert status["kernel_digest"] != enforced.expected(doc)
    out = _apply(net, "nftables", doc, state)
    assert "applied again" in out, out
    assert (state / "seal.key").read_text() != key
    _intact(net, "nftables", state, doc)


COUNTERLESS = """
import json, subprocess, sys
from ringfence import enforced
from ringfence.bundlewire import load_bundle
from ringfence_agent.backends.nft import SEAL, NftBackend
from ringfence_agent.plan import LocalFailsafes, compile_plan
doc = load_bundle(open(sys.argv[1], "rb").read())
backend = NftBackend()
backend.apply(compile_plan(doc, LocalFailsafes()))
subprocess.run(["nft", "insert", "rule", "inet", "ringfence", "input", "tcp", "dport", "8080", "accept"], check=True)
# sealed again with the agent's own key: the seal says intact, only the document can tell
held, seal = backend.held()
subprocess.run(["nft", "delete", "chain", "inet", "ringfence", SEAL + seal], check=True)
resealed = SEAL + backend.seal_key.seal(held, backend.seal_key.get())
subprocess.run(["nft", "add", "chain", "inet", "ringfence", resealed], check=True)
print(json.dumps([backend.kernel_problem(), backend.enforced() == enforced.expected(doc)]))
"""


def test_a_verdict_rule_without_a_bundle_counter_is_in_the_enforced_digest(net: NetLab, tmp_path: Path) -> None:
    """The enforced document listed only rules with a bundle counter; a counter-less ``accept``
    (the agent writes none outside its fail-safes) was left to the seal alone. It is now an entry
    of its own, so the digest is not the published one even under a seal that checks."""
    path = write(_engine(net).bundle("h2"), tmp_path / "bundle.json")
    proc = net.exec("h2", sys.executable, "-c", COUNTERLESS, str(path))
    assert proc.returncode == 0, proc.stderr
    assert json.loads(proc.stdout) == [None, False]


# ringfence-agent and the tamper with legacy iptables (xtables-legacy-multi acts as its argv[0])
LEGACY_TOOLS = ("iptables", "iptables-save", "iptables-restore", "ip6tables", "ip6tables-save", "ip6tables-restore")
HEARTBEAT_READ_BACKEND = HEARTBEAT_READ.replace('make_backend("nftables", state)', "make_backend(sys.argv[3], state)")


def _iptables_variant(net: NetLab, tmp_path: Path, variant: str) -> list[str]:
    """The environment that makes ``iptables*`` the ``variant`` (nft: the host's default, legacy:
    xtables-legacy); skips only where that variant is truly absent."""
    dataplane.iptables_or_skip()
    default = "nft" if "nf_tables" in net.exec("h2", "iptables", "-V").stdout else "legacy"
    if variant == default:
        return []
    if variant == "nft":
        pytest.skip("the host's iptables is legacy; iptables-nft is not the default here")
    multi = shutil.which("xtables-legacy-multi")
    if multi is None:
        pytest.skip("xtables-legacy-multi (legacy iptables) not installed")
    tools = tmp_path / "legacy"
    tools.mkdir()
    for name in LEGACY_TOOLS:
        (tools / name).symlink_to(multi)
    # nf_tables' own ip/ip6 filter tables left by an iptables-nft test are not legacy's: out of the way
    for family in ("ip", "ip6"):
        net.exec("h2", "nft", "delete", "table", family, "filter")
    return [f"PATH={tools}:{os.environ['PATH']}"]


def _agent_ok(net: NetLab, env: list[str], *args: str) -> str:
    proc = net.agent("h2", *args, env=env)
    assert proc.returncode == 0, proc.stderr
    return proc.stdout


@pytest.mark.parametrize("variant", ["nft", "legacy"])
def test_attack_an_accept_inserted_inside_rf_in_is_caught_by_the_iptables_seal(
    net: NetLab, tmp_path: Path, variant: str
) -> None:
    """iptables had no seal: ``iptables -I RF-IN 2 -p tcp --dport 8080 -j ACCEPT`` (an accept
    among the fail-safes, no bundle counter) by another process with CAP_NET_ADMIN left the jumps
    first, the marker and the defaults in place: a fresh ``status`` said programmed with the
    published digest, the heartbeat's digest from a fresh process was the published one and
    ``apply`` said "already applied" with the hole open; only a running daemon's in-memory drift
    baseline saw it. IPv4's filter table now carries ``RF-S-<HMAC>`` of what both families hold
    (keyed by ``seal.key``): status says altered, the heartbeat's digest is not the published
    one, ``apply`` programs the chains again (the accept gone) and the next apply finds them
    intact. On iptables-nft and on legacy iptables."""
    env = _iptables_variant(net, tmp_path, variant)
    doc = _engine(net).bundle("h2")
    state = tmp_path / "state"
    path = write(doc, tmp_path / "bundle.json")
    apply = ["apply", "--bundle", str(path), "--public-key", str(PUBLIC_KEY), "--backend", "iptables"]
    apply += ["--state-dir", str(state)]
    status = ["status", "--state-dir", str(state), "--backend", "iptables", "--json"]
    try:
        _agent_ok(net, env, *apply)
        assert not net.tcp("h4", "h2", 8080) and net.tcp("h1", "h2", 8080)
        before = json.loads(_agent_ok(net, env, *status))
        assert before["kernel_programmed"] is True and before["kernel_digest"] == enforced.expected(doc), before
        tamper = ["iptables", "-I", "RF-IN", "2", "-p", "tcp", "--dport", "8080", "-j", "ACCEPT"]
        net.exec("h2", *(["env", *env] if env else []), *tamper, check=True)
        assert net.tcp("h4", "h2", 8080), "the tamper did not open anything: the test proves nothing"
        after = json.loads(_agent_ok(net, env, *status))
        assert after["kernel_programmed"] is False and "seal" in after["warning"], after
        assert after["kernel_digest"] != enforced.expected(doc)
        read = [sys.executable, "-c", HEARTBEAT_READ_BACKEND, str(PUBLIC_KEY), str(state), "iptables"]
        proc = net.exec("h2", *(["env", *env] if env else []), *read)
        assert proc.returncode == 0, proc.stderr
        assert json.loads(proc.stdout.splitlines()[-1]) not in (None, enforced.expected(doc)), proc.stdout
        out = _agent_ok(net, env, *apply)
        assert "already applied" not in out and "applied again" in out, out
        assert not net.tcp("h4", "h2", 8080) and net.tcp("h1", "h2", 8080)
        assert "--dport 8080 -j ACCEPT" not in net.exec("h2", "env", *env, "iptables-save", "-t", "filter").stdout
        healed = json.loads(_agent_ok(net, env, *status))
        assert healed["kernel_programmed"] is True and healed["kernel_digest"] == enforced.expected(doc), healed
        assert "already applied" in _agent_ok(net, env, *apply)
    finally:
        net.agent("h2", "flush", "--backend", "iptables", env=env)


def test_an_iptables_seal_lost_its_key_or_never_written_is_applied_again(net: NetLab, tmp_path: Path) -> None:
    """Chains without a seal (what an agent before it left: the upgrade) or whose key is lost
    never read as intact: status says so, ``apply`` programs them once and seals them, and the
    apply after that finds them intact."""
    dataplane.iptables_or_skip()
    doc = _engine(net).bundle("h2")
    state = tmp_path / "state"
    _apply(net, "iptables", doc, state)
    assert (state / "seal.key").stat().st_mode & 0o777 == 0o600
    _intact(net, "iptables", state, doc)
    seals = [x.split()[0][1:] for x in net.exec("h2", "iptables-save", "-t", "filter").stdout.splitlines()]
    seals = [x for x in seals if x.startswith("RF-S-")]
    assert len(seals) == 1, seals
    net.exec("h2", "iptables", "-X", seals[0], check=True)  # as an unsealing agent left the chains
    status = _status(net, "iptables", state)
    assert status["kernel_programmed"] is False and "no seal" in status["warning"], status
    assert "applied again" in _apply(net, "iptables", doc, state)
    assert "already applied" in _apply(net, "iptables", doc, state)
    (state / "seal.key").unlink()
    status = _status(net, "iptables", state)
    assert status["kernel_programmed"] is False and "seal key" in status["warning"], status
    assert status["kernel_digest"] != enforced.expected(doc)
    assert "applied again" in _apply(net, "iptables", doc, state)
    _intact(net, "iptables", state, doc)
    assert "already applied" in _apply(net, "iptables", doc, state)
