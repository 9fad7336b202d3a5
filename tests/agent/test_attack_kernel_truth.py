"""The agent reports what the kernel really holds, and never takes a loosened firewall for its own
(review: status, the heartbeat's digest and ``apply`` were blind to rules flushed or inserted
inside Ringfence's nftables table, to a fail-safe address added, to an iptables jump removed or
one family flushed); and the control-plane fail-safe admits the agent (root), not any local user.
Real agent, real nftables and iptables/ipset in network namespaces."""

from __future__ import annotations

import json
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import pytest

from ringfence import enforced
from ringfence.bundle import Bundle
from ringfence.local.lab import PROBE, wait_until
from ringfence.local.lab import Lab as NetLab
from ringfence.model import Workload
from tests.agent import dataplane
from tests.agent.agentdaemon import running_daemon
from tests.agent.bundles import DENY_ALL_POLICY, GROUP_POLICY, LAB_POLICY, PUBLIC_KEY, Lab, workloads, write

pytestmark = pytest.mark.dataplane

dataplane.require()

HOSTS = {"h1": 1, "h2": 2, "h4": 4, "adm": 250, "cp": 100}
ROLES = {"h1": "client", "h2": "web", "h4": "other"}


net = dataplane.lab_fixture(HOSTS, {"h2": [22, 8080], "cp": [443, 8080]})
clean = dataplane.reset_fixture("h2")


def _engine(net: NetLab, policy: str = LAB_POLICY) -> Lab:
    return Lab(policy, workloads({h: (net.v4(h), net.v6(h), role) for h, role in ROLES.items()}))


def _apply(net: NetLab, backend: str, doc: Bundle, state: Path, *extra: str) -> str:
    path = write(doc, state.parent / f"bundle-{time.monotonic_ns()}.json")
    common = ["--public-key", str(PUBLIC_KEY), "--backend", backend, "--state-dir", str(state)]
    proc = net.agent("h2", "apply", "--bundle", str(path), *common, *extra)
    assert proc.returncode == 0, proc.stderr
    return proc.stdout


def _status(net: NetLab, backend: str, state: Path) -> dict[str, Any]:
    proc = net.agent("h2", "status", "--state-dir", str(state), "--backend", backend, "--json")
    assert proc.returncode == 0, proc.stderr
    out: dict[str, Any] = json.loads(proc.stdout)
    return out


def _intact(net: NetLab, backend: str, state: Path, doc: Bundle) -> None:
    status = _status(net, backend, state)
    assert status["kernel_programmed"] is True and status["mode"] == "enforce" and "warning" not in status, status
    assert status["kernel_digest"] == enforced.expected(doc)  # what the control plane compares with


def _reported_and_reapplied(net: NetLab, backend: str, state: Path, doc: Bundle, hole: Any) -> None:
    """The kernel was loosened (``hole()`` is True): status says so, the digest no longer matches
    the published one, and ``apply`` of the same bundle programs it again."""
    assert hole(), "the tamper did not open anything: the test proves nothing"
    status = _status(net, backend, state)
    assert status["kernel_programmed"] is False and status["mode"] is None, status
    assert status["state_mode"] == "enforce" and "run apply" in status["warning"], status
    assert status["kernel_digest"] != enforced.expected(doc)
    out = _apply(net, backend, doc, state)
    assert "already applied" not in out and "applied again" in out, out
    assert not hole()
    _intact(net, backend, state, doc)


NFT_TAMPERS = {
    "flush-table": (["nft", "flush", "table", "inet", "ringfence"], "h4", 8080),
    "inserted-accept": (["nft", "insert", "rule", "inet", "ringfence", "input", "accept"], "h4", 8080),
    "failsafe-address-added": (["nft", "add", "element", "inet", "ringfence", "fs_admin_4", "{ 10.77.0.4 }"], "h4", 22),
    # every rule and set stays as applied, unhooked: the table enforces nothing
    "table-made-dormant": (["nft", "add", "table", "inet", "ringfence", "{ flags dormant; }"], "h4", 8080),
}


@pytest.mark.parametrize("tamper", sorted(NFT_TAMPERS))
def test_attack_rules_flushed_or_loosened_inside_ringfences_nft_table_are_reported_and_reapplied(
    net: NetLab, tmp_path: Path, tamper: str
) -> None:
    """``nft flush table inet ringfence`` (the table and its sets stay, every rule goes), an
    ``accept`` inserted at the top of its input chain, h4's address added to the admin fail-safe
    set, the table made ``dormant`` (nothing changed but its flag): each used to leave ``status`` at enforce, ``kernel_programmed`` true and the same
    ``kernel_digest``, and ``apply`` said "already applied: no change" with the hole open."""
    cmd, src, port = NFT_TAMPERS[tamper]
    doc = _engine(net).bundle("h2")
    state = tmp_path / "state"
    _apply(net, "nftables", doc, state)
    assert not net.tcp("h4", "h2", 8080) and not net.tcp("h4", "h2", 22) and net.tcp("h1", "h2", 8080)
    _intact(net, "nftables", state, doc)
    net.exec("h2", *cmd, check=True)
    _reported_and_reapplied(net, "nftables", state, doc, lambda: net.tcp(src, "h2", port))


IPT_TAMPERS = {
    "ipv4-jump-deleted": (["iptables", "-D", "INPUT", "-j", "RF-IN"], False),
    "ipv4-accept-before-the-jump": (["iptables", "-I", "INPUT", "1", "-j", "ACCEPT"], False),
    "ipv6-flushed": (["ip6tables", "-F"], True),
}


@pytest.mark.parametrize("tamper", sorted(IPT_TAMPERS))
def test_attack_iptables_jump_removed_or_one_family_flushed_is_reported_and_reapplied(
    net: NetLab, tmp_path: Path, tamper: str
) -> None:
    """``iptables -D INPUT -j RF-IN`` (IPv4 open), an ACCEPT put before the jump, ``ip6tables -F``
    (IPv6 open): each used to leave ``kernel_programmed`` true and the digest unchanged, and
    ``apply`` a no-op. The jump must be the first rule of INPUT/OUTPUT in both families, and a
    rule counts only if every family that should hold it does."""
    dataplane.iptables_or_skip()
    cmd, v6 = IPT_TAMPERS[tamper]
    doc = _engine(net).bundle("h2")
    state = tmp_path / "state"
    _apply(net, "iptables", doc, state)
    assert not net.tcp("h4", "h2", 8080) and not net.tcp("h4", "h2", 8080, v6=True)
    _intact(net, "iptables", state, doc)
    net.exec("h2", *cmd, check=True)
    try:
        _reported_and_reapplied(net, "iptables", state, doc, lambda: net.tcp("h4", "h2", 8080, v6=v6))
        assert not net.tcp("h4", "h2", 8080, v6=not v6)
    finally:
        net.exec("h2", "iptables", "-D", "INPUT", "-j", "ACCEPT")  # left by one tamper


def _tcp_as(net: NetLab, uid: int, dst: str, port: int) -> bool:
    """A TCP connect from h2 by a process of ``uid``."""
    ids = ["setpriv", "--reuid", str(uid), "--regid", str(uid), "--clear-groups"] if uid else []
    proc = net.exec("h2", *ids, *PROBE, "tcp", net.v4(dst), str(port), "--timeout", "0.8")
    return proc.returncode == 0


@pytest.mark.parametrize("backend", ["nftables", "iptables"])
def test_attack_a_local_user_cannot_reach_the_control_plane_through_its_failsafe(
    net: NetLab, tmp_path: Path, backend: str
) -> None:
    """Under a deny-everything bundle the control-plane fail-safe admitted any local user (nobody
    reached cp:443): the threat model promises the agent's path only. Now only sockets of root
    (the agent's user) match it; nobody's connection is dropped like any other."""
    if backend == "iptables":
        dataplane.iptables_or_skip()
    doc = _engine(net, DENY_ALL_POLICY).bundle("h2")
    _apply(net, backend, doc, tmp_path / "state", "--control-plane", net.v4("cp"))
    assert _tcp_as(net, 0, "cp", 443), "the agent (root) lost its control plane"
    assert not _tcp_as(net, 65534, "cp", 443), "a local user (nobody) reaches the control plane"
    assert not _tcp_as(net, 0, "cp", 8080)  # its port only


@pytest.mark.parametrize("backend", ["nftables", "iptables"])
def test_drops_says_when_the_kernel_holds_no_counters_of_the_applied_bundle(
    net: NetLab, tmp_path: Path, backend: str
) -> None:
    """``ringfence-agent drops`` printed nothing and exited 0 once Ringfence's rules were gone
    (no counters read looked like no drops); now it says so and exits 1."""
    if backend == "iptables":
        dataplane.iptables_or_skip()
    state = tmp_path / "state"
    _apply(net, backend, _engine(net).bundle("h2"), state)
    drops = net.agent("h2", "drops", "--state-dir", str(state), "--backend", backend)
    assert drops.returncode == 0 and "counter d_in: " in drops.stdout, drops.stderr
    net.reset("h2")
    drops = net.agent("h2", "drops", "--state-dir", str(state), "--backend", backend)
    assert drops.returncode == 1 and drops.stdout == ""
    assert drops.stderr.strip() == (
        f"ringfence-agent: the kernel holds no counters of Ringfence's rules ({backend}): nothing is applied "
        "here, or the rules were removed; see `ringfence-agent status`"
    )


SEALED_BASELINE = """
import json, sys
from ringfence.bundlewire import load_bundle
from ringfence_agent.backends.nft import NftBackend
from ringfence_agent.plan import LocalFailsafes, compile_plan
backend = NftBackend()
backend.apply(compile_plan(load_bundle(open(sys.argv[1], "rb").read()), LocalFailsafes()))
print(json.dumps([backend.applied_fingerprint, backend.fingerprint()]))
"""


def test_the_seal_read_is_the_drift_baseline_without_a_second_read(net: NetLab, tmp_path: Path) -> None:
    """The daemon's drift baseline after a whole apply is the fingerprint of what the seal read
    back (a read costs ~0.5 s at 100,000 set elements): it must equal a fresh read's."""
    doc = _engine(net).bundle("h2")
    path = write(doc, tmp_path / "bundle.json")
    proc = net.exec("h2", sys.executable, "-c", SEALED_BASELINE, str(path))
    assert proc.returncode == 0, proc.stderr
    applied, fresh = json.loads(proc.stdout)
    assert applied is not None and applied == fresh


NO_TABLE_AS_JSON = """
import json, re, sys
from ringfence.bundlewire import load_bundle
from ringfence_agent.backends.nft import NftBackend
from ringfence_agent.backends.nftables_netlink import table_info
from ringfence_agent.plan import LocalFailsafes, compile_plan
backend = NftBackend()
assert backend.lib is not None, "libnftables not loaded: the test proves nothing"
listed, real = [], backend.lib.run
def spy(script, *args, **kwargs):
    # every table (another's owner table is there), or Ringfence's own while it carries a flag
    json_output = bool(args[0] if args else kwargs.get("json_output"))
    m = re.match(r"list (tables|ruleset|table inet ringfence)\\b", script) if json_output else None
    if m and (m.group(1) != "table inet ringfence" or table_info("inet", "ringfence").flags):
        listed.append(script.strip())
    return real(script, *args, **kwargs)
backend.lib.run = spy
backend.apply(compile_plan(load_bundle(open(sys.argv[1], "rb").read()), LocalFailsafes()))
read = lambda: [backend.table_present(), backend.programmed(), backend.kernel_problem(), backend.enforced()]
print(json.dumps(read()), flush=True)
sys.stdin.readline()  # the test makes the table dormant meanwhile
print(json.dumps({"dormant": read(), "listed": listed}))
"""


def test_attack_a_table_with_one_flag_is_never_listed_through_libnftables(net: NetLab, tmp_path: Path) -> None:
    """libnftables 1.0.6 frees a table's only flag before printing it as JSON: listed in-process
    (``list tables`` to see whether Ringfence's table exists, ``list table`` for the enforced
    digest), another process's ``flags owner`` table corrupted the agent's heap until glibc
    aborted the daemon ("corrupted double-linked list", in CI). The real backend, over the real
    libnftables, with such a table beside its own and then its own made dormant, lists no table
    object as JSON, and reads the flag from the kernel: dormant is not programmed."""
    doc = _engine(net).bundle("h2")
    path = write(doc, tmp_path / "bundle.json")
    holder = net.spawn("h2", "nft", "-i", stdin=subprocess.PIPE, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        assert holder.stdin is not None
        holder.stdin.write("add table inet other { flags owner; }\n")
        holder.stdin.flush()
        assert wait_until(lambda: "other" in net.exec("h2", "nft", "list", "tables").stdout, 5)
        spy = net.spawn(
            "h2", sys.executable, "-c", NO_TABLE_AS_JSON, str(path), stdin=subprocess.PIPE, stdout=subprocess.PIPE
        )
        assert spy.stdin is not None and spy.stdout is not None
        first = json.loads(spy.stdout.readline() or "null")
        net.exec("h2", "nft", "add", "table", "inet", "ringfence", "{ flags dormant; }", check=True)
        out, _ = spy.communicate("\n", timeout=60)
    finally:
        net.kill(holder)
    assert spy.returncode == 0 and first == [True, True, None, enforced.expected(doc)], (first, out)
    result = json.loads(out)
    assert result["listed"] == []
    present, programmed, problem, digest = result["dormant"]
    assert present is True and programmed is False and "dormant" in problem and digest != enforced.expected(doc)


def _grouped_bundle(net: NetLab) -> Bundle:
    """h2 (web) under GROUP_POLICY: one grouped inbound rule (h1 → tcp/8080 among its members),
    realised as concatenated sets ``g_*``; h4 (other) reaches nothing on h2."""
    wls = [
        Workload(id=h, ips=[net.v4(h), net.v6(h)], tags={"ringfence:app": "lab", "ringfence:role": role})
        for h, role in ROLES.items()
    ]
    doc = Lab(GROUP_POLICY, wls).bundle("h2")
    assert doc.inbound[0].members, "no grouped rule: the test proves nothing"
    return doc


def _group_set(net: NetLab, kind: str = "4p") -> str:
    out = net.exec("h2", "nft", "-j", "list", "sets", "inet", check=True).stdout
    names = [x["set"]["name"] for x in json.loads(out)["nftables"] if "set" in x]
    ours = [n for n in names if n.startswith("g_r_in_") and n.endswith(f"_{kind}")]
    assert len(ours) == 1, names
    return ours[0]


def test_attack_an_element_added_to_a_group_set_is_reported_and_repaired_by_the_daemon(
    net: NetLab, tmp_path: Path
) -> None:
    """``nft add element inet ringfence g_r_in_0_4p { <h4> . tcp . 22 }`` opened SSH to h4 and
    neither the seal (rules and fail-safe sets only) nor the enforced digest (bundle sets) saw it:
    no report, no repair. The daemon's drift check now compares each group set with what it last
    wrote, re-applies within drift_interval and records the tamper; SSH from h4 is closed again."""
    with running_daemon(net, tmp_path, _grouped_bundle(net), report_interval=1, drift_interval=3) as daemon:
        said = daemon.said
        assert wait_until(lambda: not net.tcp("h4", "h2", 8080, timeout=0.3), 15), said()
        assert not net.tcp("h4", "h2", 22) and net.tcp("h1", "h2", 8080)
        element = f"{{ {net.v4('h4')} . tcp . 22 }}"
        net.exec("h2", "nft", "add", "element", "inet", "ringfence", _group_set(net), element, check=True)
        assert net.tcp("h4", "h2", 22), "the tamper did not open anything: the test proves nothing"
        assert wait_until(lambda: "holds elements the agent did not put there" in said(), 10), said()
        assert not net.tcp("h4", "h2", 22) and net.tcp("h1", "h2", 8080)
        status = _status(net, "nftables", daemon.state)
        assert status["counters"]["tamper_reapplied"] == 1, status
        assert status["last_tamper"]["what"] == "group set altered", status


SET_REPAIR_RACE = """
import json, subprocess, sys, tempfile
from pathlib import Path
from ringfence.bundlewire import Verifier, load_bundle
from ringfence_agent.backends.nft import NftBackend
from ringfence_agent.core import Agent
from ringfence_agent.plan import LocalFailsafes
from ringfence_agent.state import StateDir
doc = load_bundle(open(sys.argv[1], "rb").read())
agent = Agent("h2", Verifier.from_file(Path(sys.argv[2])), NftBackend(), StateDir(Path(tempfile.mkdtemp())), LocalFailsafes(), log=lambda _: None)
agent.track_drift = True
agent.apply_bundle(doc)
sets = json.loads(subprocess.run(["nft", "-j", "list", "sets", "inet"], capture_output=True).stdout)["nftables"]
name = next(x["set"]["name"] for x in sets if x.get("set", {}).get("name", "").startswith("s_") and x["set"].get("elem"))
subprocess.run(["nft", "add", "element", "inet", "ringfence", name, "{ " + sys.argv[3] + " }"], check=True)
applies = agent.applies
revision, digest = agent.enforced_state()  # the heartbeat's read: the tamper in it
agent._apply(agent.ensure_plan())  # the drift check repairs the same revision meanwhile
raced = agent.check_sets(revision, digest, applies).changed  # must not repair (and count) again
applies = agent.applies
revision, digest = agent.enforced_state()
clean = agent.check_sets(revision, digest, applies).changed  # nothing to repair
subprocess.run(["nft", "add", "element", "inet", "ringfence", name, "{ " + sys.argv[3] + " }"], check=True)
applies = agent.applies
revision, digest = agent.enforced_state()
tampered = agent.check_sets(revision, digest, applies).changed  # a tamper nobody repaired: repaired
print(json.dumps([raced, clean, tampered]))
"""


def test_a_set_repair_the_drift_check_made_meanwhile_is_not_made_again(net: NetLab, tmp_path: Path) -> None:
    """The heartbeat reads the kernel without the apply lock; the drift check may re-apply the
    same revision meanwhile. The heartbeat's set check then compared a stale digest (the tamper
    still in it) and re-applied and counted the tamper a second time; it now skips when a whole
    apply landed since its read, and still repairs a tamper nobody else did."""
    path = write(_engine(net).bundle("h2"), tmp_path / "bundle.json")
    proc = net.exec("h2", sys.executable, "-c", SET_REPAIR_RACE, str(path), str(PUBLIC_KEY), net.v4("h4"))
    assert proc.returncode == 0, proc.stderr
    assert json.loads(proc.stdout) == [False, False, True]


REWOUND_CHAIN = """
import json, sys, tempfile
from pathlib import Path
from ringfence.bundlewire import Verifier, load_bundle, load_delta
from ringfence_agent.backends.nft import NftBackend
from ringfence_agent.core import Agent
from ringfence_agent.plan import LocalFailsafes
from ringfence_agent.state import StateDir
doc = load_bundle(open(sys.argv[1], "rb").read())
first, other = (load_delta(open(p, "rb").read()) for p in sys.argv[3:5])
agent = Agent("h2", Verifier.from_file(Path(sys.argv[2])), NftBackend(), StateDir(Path(tempfile.mkdtemp())), LocalFailsafes(), log=lambda _: None)
agent.track_drift = True
agent.apply_bundle(doc)
out = []
for delta in (first, other):
    agent.apply_delta(delta)
    revision, digest = agent.enforced_state()
    out.append(agent.check_sets(revision, digest, agent.applies).changed)  # the kernel is as applied
    agent.rewind_deltas(0)
print(json.dumps(out))
"""


def test_a_rewound_delta_chain_of_the_same_length_is_not_taken_for_a_tamper(net: NetLab, tmp_path: Path) -> None:
    """The heartbeat's expected digest was cached by the bundle object's id and the number of
    deltas applied: a chain rewound and grown back to the same length with another delta (same
    set, same versions, other addresses) compared the kernel with the old chain's digest, so an
    intact kernel was re-applied and counted as a tamper at every heartbeat. The cache is keyed
    by the documents' signatures."""
    lab = _engine(net)
    doc = write(lab.bundle("h2"), tmp_path / "bundle.json")
    first = lab.upsert(Workload(id="h4", ips=[net.v4("h4")], tags={"ringfence:role": "client", "ringfence:app": "lab"}))
    other_lab = _engine(net)
    other = other_lab.upsert(
        Workload(id="h9", ips=["10.77.0.9"], tags={"ringfence:role": "client", "ringfence:app": "lab"})
    )
    assert len(first) == len(other) == 1 and (first[0].set, first[0].to_version) == (other[0].set, other[0].to_version)
    paths = [str(write(d[0], tmp_path / f"delta-{i}.json")) for i, d in enumerate((first, other))]
    proc = net.exec("h2", sys.executable, "-c", REWOUND_CHAIN, str(doc), str(PUBLIC_KEY), *paths)
    assert proc.returncode == 0, proc.stderr
    assert json.loads(proc.stdout) == [False, False]


GROUP_TAMPER = """
import json, subprocess, sys
from ringfence import enforced
from ringfence.bundlewire import load_bundle
from ringfence_agent.backends.nft import NftBackend
from ringfence_agent.plan import LocalFailsafes, compile_plan
doc = load_bundle(open(sys.argv[1], "rb").read())
backend = NftBackend()
backend.apply(compile_plan(doc, LocalFailsafes()))
sets = json.loads(subprocess.run(["nft", "-j", "list", "sets", "inet"], capture_output=True).stdout)["nftables"]
group = next(x["set"]["name"] for x in sets if x.get("set", {}).get("name", "").startswith("g_") and x["set"]["name"].endswith("_4p"))
problem = getattr(backend, "group_problem", lambda: None)
before = [problem(), backend.enforced() == enforced.expected(doc)]
subprocess.run(["nft", "add", "element", "inet", "ringfence", group, sys.argv[2]], check=True)
print(json.dumps([group, *before, problem(), backend.enforced() == enforced.expected(doc)]))
"""


def test_attack_a_group_set_element_added_marks_the_enforced_digest_altered(net: NetLab, tmp_path: Path) -> None:
    """The heartbeat's enforced digest, read by the process that applied: a group set element it
    did not write makes it ``altered`` (never the published digest), as the seal does for rules."""
    path = write(_grouped_bundle(net), tmp_path / "bundle.json")
    proc = net.exec("h2", sys.executable, "-c", GROUP_TAMPER, str(path), f"{{ {net.v4('h4')} . tcp . 22 }}")
    assert proc.returncode == 0, proc.stderr
    group, problem_before, intact_before, problem_after, intact_after = json.loads(proc.stdout)
    assert problem_before is None and intact_before is True
    assert intact_after is False, "the enforced digest still matches the published one"
    assert problem_after is not None and group in problem_after
