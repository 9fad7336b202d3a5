"""The agent against a real kernel: nftables and iptables+ipset in network namespaces.

One lab per module (6 namespaces on a bridge); each test resets what the agent programmed.
h2 is the protected workload ("web"); h1 is a client, h3 the database, h4 a stranger, adm the
operators' admin host (10.77.0.250, the bundle's admin range), cp a control plane.
"""

from __future__ import annotations

import contextlib
import json
import os
import subprocess
import time
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import Any

import pytest

from ringfence.bundle import Bundle, SetDelta, sign
from ringfence.local.estate import lab_image
from ringfence.local.lab import PROBE, PY, Holder, sh, wait_until
from ringfence.local.lab import Lab as NetLab
from ringfence.local.lab import Probe as P
from ringfence.model import Mode, Workload
from ringfence_agent.backends.iptables import ipset_name
from tests.agent import dataplane
from tests.agent.bundles import (
    DENY_ALL_POLICY,
    GROUP_POLICY,
    LAB_POLICY,
    OBSERVE_POLICY,
    PRECEDENCE_POLICY,
    PUBLIC_KEY,
    Lab,
    apply_flags,
    forge,
    key,
    resign,
    workloads,
    write,
)

# fixtures: the moto-backed AWS control plane (aws_env: a fresh world, its handlers; see tests/aws)
from tests.aws.conftest import env as aws_env  # noqa: F401
from tests.aws.conftest import iid_key, moto_url  # noqa: F401

pytestmark = pytest.mark.dataplane

dataplane.require()

HOSTS = {"h1": 1, "h2": 2, "h3": 3, "h4": 4, "adm": 250, "cp": 100}
ROLES = {"h1": "client", "h2": "web", "h3": "db", "h4": "other"}
HERE = Path(__file__).resolve().parent


net = dataplane.lab_fixture(HOSTS, {"h2": [22, 8080, 5432], "h3": [5432], "h4": [8080]}, udp={"h2": [5353], "h3": [53]})
backend = dataplane.backend_fixture()
clean = dataplane.reset_fixture("h2", after=False)  # the only host the tests program


def lab_engine(net: NetLab, policy: str = LAB_POLICY, extra: dict[str, str] | None = None) -> Lab:
    hosts = {h: (net.v4(h), net.v6(h), role) for h, role in {**ROLES, **(extra or {})}.items()}
    return Lab(policy, workloads(hosts))


def apply(
    net: NetLab, backend: str, doc: Bundle, state: Path, host: str = "h2", env: Sequence[str] = ()
) -> subprocess.CompletedProcess[str]:
    path = write(doc, state.parent / f"bundle-{doc.workload_id}-{doc.version}-{time.monotonic_ns()}.json")
    return net.agent(host, "apply", "--bundle", str(path), *apply_flags(backend, state), env=env)


def apply_delta(net: NetLab, backend: str, deltas: list[SetDelta], state: Path) -> subprocess.CompletedProcess[str]:
    args: list[str] = []
    for i, d in enumerate(deltas):
        args += ["--delta", str(write(d, state.parent / f"delta-{i}-{time.monotonic_ns()}.json"))]
    return net.agent("h2", "apply-delta", *args, *apply_flags(backend, state))


def ok(proc: subprocess.CompletedProcess[str]) -> str:
    assert proc.returncode == 0, proc.stderr
    return proc.stdout


def enforced_baseline(net: NetLab) -> None:
    """The lab policy on h2: h1 → h2 web allowed; h4 → h2 blocked."""
    assert net.tcp("h1", "h2", 8080)
    assert not net.tcp("h4", "h2", 8080)


# --- the matrix ----------------------------------------------------------------------------------


def test_enforce_allows_and_blocks_tcp_udp_v4_v6(net: NetLab, backend: str, tmp_path: Path) -> None:
    lab = lab_engine(net)
    out = ok(apply(net, backend, lab.bundle("h2"), tmp_path / "state"))
    assert "version 1" in out and "mode enforce" in out
    assert net.tcp("h1", "h2", 8080) and net.tcp("h1", "h2", 8080, v6=True)
    assert net.udp("h1", "h2", 5353) and net.udp("h1", "h2", 5353, v6=True)
    assert not net.tcp("h4", "h2", 8080) and not net.tcp("h4", "h2", 8080, v6=True)
    assert not net.udp("h4", "h2", 5353)
    assert not net.tcp("h1", "h2", 5432)  # allowed peer, port not allowed
    assert net.tcp("h2", "h3", 5432) and net.tcp("h2", "h3", 5432, v6=True)  # outbound allow
    assert not net.tcp("h2", "h4", 8080)  # outbound default drop
    assert net.tcp("h3", "h4", 8080)  # other hosts untouched
    drops = json.loads(
        ok(net.agent("h2", "drops", "--backend", backend, "--state-dir", str(tmp_path / "state"), "--json"))
    )
    srcs = {(e["src"], e["dport"], e["direction"], e["action"]) for e in drops["events"]}
    assert (net.v4("h4"), 8080, "inbound", "drop") in srcs
    assert (net.v4("h2"), 8080, "outbound", "drop") in srcs
    assert drops["counters"]["d_in"] >= 1


def test_rule_precedence_and_drop_attribution(net: NetLab, backend: str, tmp_path: Path) -> None:
    lab = lab_engine(net, PRECEDENCE_POLICY, extra={"adm": "admin"})
    doc = lab.bundle("h2")
    assert [r.action for r in doc.inbound] == ["override-deny", "allow", "deny"]  # the two allows: one group
    assert [m.id for m in doc.inbound[1].members or []] == ["lab/client-to-web", "guard/admins-allowed"]
    state = tmp_path / "state"
    ok(apply(net, backend, doc, state))
    assert not net.tcp("adm", "h2", 8080)  # override-deny beats the later allow for admins
    assert net.tcp("h1", "h2", 8080)  # an allow beats the later deny
    assert not net.tcp("h4", "h2", 8080)  # the deny rule, not the default, catches strangers
    assert not net.tcp("h4", "h2", 5432)  # no rule at all: the default
    drops = json.loads(ok(net.agent("h2", "drops", "--backend", backend, "--state-dir", str(state), "--json")))
    by = {(e["src"], e["dport"]): e["rule_id"] for e in drops["events"] if e["direction"] == "inbound"}
    assert by[(net.v4("adm"), 8080)] == "guard/admins-never-web"
    assert by[(net.v4("h4"), 8080)] == "guard/strangers-out"
    assert by[(net.v4("h4"), 5432)] is None
    assert (net.v4("h1"), 8080) not in by


def test_drop_events_carry_the_source_port_of_the_blocked_socket(net: NetLab, backend: str, tmp_path: Path) -> None:
    state = tmp_path / "state"
    ok(apply(net, backend, lab_engine(net).bundle("h2"), state))
    assert not net.tcp("h4", "h2", 8080, sport=41234)  # inbound: the default drop
    assert not net.tcp("h4", "h2", 8080, v6=True, sport=41235)
    assert not net.tcp("h2", "h4", 8080, sport=41236)  # outbound: the default drop
    drops = json.loads(ok(net.agent("h2", "drops", "--backend", backend, "--state-dir", str(state), "--json")))
    got = {(e["direction"], e["src"], e["sport"], e["dst"], e["dport"]) for e in drops["events"]}
    assert ("inbound", net.v4("h4"), 41234, net.v4("h2"), 8080) in got, got
    assert ("inbound", net.v6("h4"), 41235, net.v6("h2"), 8080) in got, got
    assert ("outbound", net.v4("h2"), 41236, net.v4("h4"), 8080) in got, got
    text = ok(net.agent("h2", "drops", "--backend", backend, "--state-dir", str(state)))
    assert f"drop inbound tcp {net.v4('h4')}:41234 -> {net.v4('h2')}:8080" in text


def test_a_full_drop_tuple_set_never_lets_a_denied_packet_through(net: NetLab, backend: str, tmp_path: Path) -> None:
    """Every connection attempt is its own tuple (new source port): a burst fills the bounded set."""
    lab = lab_engine(net, PRECEDENCE_POLICY, extra={"adm": "admin"})
    state = tmp_path / "state"
    ok(apply(net, backend, lab.bundle("h2"), state))
    burst = net.exec("adm", *PROBE, "burst", net.v4("h2"), "8080", "1200", check=True)
    assert burst.stdout.strip() == "0"
    if backend == "nftables":
        listed = json.loads(ok(net.exec("h2", "nft", "-j", "list", "set", "inet", "ringfence", "t_r_in_0_4")))
        held = next(x["set"] for x in listed["nftables"] if "set" in x).get("elem", [])
    else:
        listed = ok(net.exec("h2", "ipset", "list", "rf-ts-r_in_0-4a"))
        held = [x for x in listed.split("Members:", 1)[1].splitlines() if x.strip()]
    assert len(held) == 1024  # full: the kernel-side bound holds
    # the override-deny still drops (a later rule allows admins: a skipped drop would connect)
    assert not net.tcp("adm", "h2", 8080)
    assert net.tcp("h1", "h2", 8080)
    drops = json.loads(ok(net.agent("h2", "drops", "--backend", backend, "--state-dir", str(state), "--json")))
    assert drops["counters"]["r_in_0"] >= 1201
    assert sum(1 for e in drops["events"] if e["rule_id"] == "guard/admins-never-web") <= 1024


def test_observe_passes_traffic_and_reports_would_drop(net: NetLab, backend: str, tmp_path: Path) -> None:
    lab = lab_engine(net, OBSERVE_POLICY)
    assert "mode observe" in ok(apply(net, backend, lab.bundle("h2"), tmp_path / "state"))
    assert net.tcp("h4", "h2", 8080) and net.tcp("h1", "h2", 8080)
    drops = json.loads(
        ok(net.agent("h2", "drops", "--backend", backend, "--state-dir", str(tmp_path / "state"), "--json"))
    )
    would = [e for e in drops["events"] if e["src"] == net.v4("h4")]
    assert would and all(e["action"] == "would-drop" and e["rule_id"] is None for e in would)
    assert not [e for e in drops["events"] if e["src"] == net.v4("h1") and e["dport"] == 8080]


def test_delta_adding_a_peer_opens_access(net: NetLab, backend: str, tmp_path: Path) -> None:
    lab = lab_engine(net)
    ok(apply(net, backend, lab.bundle("h2"), tmp_path / "state"))
    assert not net.tcp("h4", "h2", 8080)
    deltas = lab.upsert(
        Workload(
            id="h4",
            ips=[net.v4("h4"), net.v6("h4")],
            tags={"ringfence:role": "client", "ringfence:app": "lab", "ringfence:env": "test"},
        )
    )
    assert deltas and all(d.add for d in deltas)
    out = ok(apply_delta(net, backend, deltas, tmp_path / "state"))
    assert "+2 -0 elements" in out or "+1" in out
    assert net.tcp("h4", "h2", 8080) and net.tcp("h4", "h2", 8080, v6=True)
    assert net.tcp("h1", "h2", 8080)


def test_removing_a_peer_by_delta_cuts_its_open_connection_only(net: NetLab, backend: str, tmp_path: Path) -> None:
    """A removed allow cuts its established session; a peer still allowed and SSH from the admin
    range keep theirs (``ct state established accept`` alone would keep all three)."""
    lab = lab_engine(net)
    state = tmp_path / "state"
    ok(apply(net, backend, lab.bundle("h2"), state))
    ok(apply_delta(net, backend, lab.upsert(_client("h4", net)), state))
    removed, kept, ssh = net.hold("h1", "h2", 8080), net.hold("h4", "h2", 8080), net.hold("adm", "h2", 22)
    removed6, kept6 = net.hold("h1", "h2", 8080, v6=True), net.hold("h4", "h2", 8080, v6=True)
    assert all(h.connected and h.ping() for h in (removed, kept, ssh, removed6, kept6))
    deltas = lab.remove("h1")
    assert deltas and all(d.remove for d in deltas)
    out = ok(apply_delta(net, backend, deltas, state))
    cut = _cut_lines(out)
    assert any(x.startswith(f"inbound tcp {net.v4('h1')}:") and x.endswith(":8080 (default)") for x in cut), out
    assert all(net.v4("h1") in x or net.v6("h1") in x for x in cut), out  # nobody else's
    assert any(x.startswith(f"inbound tcp [{net.v6('h1')}]:") for x in cut), out
    assert not net.tcp("h1", "h2", 8080)
    assert not removed.ping() and not removed6.ping()
    assert kept.ping() and ssh.ping() and kept6.ping()
    status = json.loads(ok(net.agent("h2", "status", "--state-dir", str(state), "--json")))
    assert status["last_cut"]["cut"] == len(cut) and status["counters"]["sessions_cut"] >= 1
    _close(net, removed, kept, ssh, removed6, kept6)


def test_quarantine_cuts_open_connections_but_not_the_admins_ssh(net: NetLab, backend: str, tmp_path: Path) -> None:
    """Issue 9 §2.4: quarantine kills a session already open into the workload and one it opened
    itself (a reverse shell's shape); new connections are refused; SSH from the admin range stays."""
    lab = lab_engine(net)
    state = tmp_path / "state"
    ok(apply(net, backend, lab.bundle("h2"), state))
    into, shell, ssh = net.hold("h1", "h2", 8080), net.hold("h2", "h3", 5432), net.hold("adm", "h2", 22)
    assert all(h.connected and h.ping() for h in (into, shell, ssh))
    lab.upsert(Workload(id="h2", ips=[net.v4("h2"), net.v6("h2")], tags=_tags("web"), quarantined=True))
    doc = lab.bundle("h2")
    assert doc.quarantined and not doc.inbound and not doc.outbound
    out = ok(apply(net, backend, doc, state))
    cut = _cut_lines(out)
    assert any(x.startswith(f"inbound tcp {net.v4('h1')}:") and x.endswith(":8080 (default)") for x in cut), out
    assert any(
        x.startswith(f"outbound tcp {net.v4('h2')}:") and x.endswith(f"{net.v4('h3')}:5432 (default)") for x in cut
    )
    assert not [x for x in cut if net.v4("adm") in x], out
    assert "aborted" in out, out  # h2's own ends too: the shell's process sees an error now
    assert net.exec("h2", "ss", "-tnH", "state", "established", "dst", net.v4("h3")).stdout.strip() == ""
    assert not into.ping() and not shell.ping()
    assert ssh.ping() and ssh.ping()
    assert not net.tcp("h1", "h2", 8080) and not net.tcp("h2", "h3", 5432) and not net.tcp("h4", "h2", 8080)
    assert net.tcp("adm", "h2", 22)
    status = json.loads(ok(net.agent("h2", "status", "--state-dir", str(state), "--json")))
    assert status["last_cut"]["cut"] == len(cut) == len(status["last_cut"]["connections"])
    _close(net, into, shell, ssh)


def test_a_bundle_removing_an_allow_cuts_its_connection_and_spares_the_allowed(
    net: NetLab, backend: str, tmp_path: Path
) -> None:
    lab = lab_engine(net)
    state = tmp_path / "state"
    ok(apply(net, backend, lab.bundle("h2"), state))
    kept, gone = net.hold("h1", "h2", 8080), net.hold("h2", "h3", 5432)
    assert kept.ping() and gone.ping()
    lab.remove("h3")  # the database is gone: the web tier's allow to it has no peer left
    out = ok(apply(net, backend, lab.bundle("h2"), state))
    cut = _cut_lines(out)
    assert "version 2" in out and any(x.endswith(f"{net.v4('h3')}:5432 (default)") for x in cut), out
    assert not [x for x in cut if net.v4("h1") in x], out
    assert not gone.ping()
    assert kept.ping() and kept.ping()
    enforced_baseline(net)
    _close(net, kept, gone)


def test_keep_open_connections_leaves_established_sessions_alone(net: NetLab, backend: str, tmp_path: Path) -> None:
    lab = lab_engine(net)
    state = tmp_path / "state"
    ok(apply(net, backend, lab.bundle("h2"), state))
    held = net.hold("h1", "h2", 8080)
    assert held.ping()
    lab.upsert(Workload(id="h2", ips=[net.v4("h2"), net.v6("h2")], tags=_tags("web"), quarantined=True))
    path = write(lab.bundle("h2"), tmp_path / "q.json")
    common = ["--public-key", str(PUBLIC_KEY), "--backend", backend, "--state-dir", str(state)]
    out = ok(net.agent("h2", "apply", "--bundle", str(path), *common, "--keep-open-connections"))
    assert "cut" not in out
    assert held.ping() and not net.tcp("h1", "h2", 8080)
    _close(net, held)


def _cut_lines(out: str) -> list[str]:
    """The connections an apply reports cut: "inbound tcp 10.77.0.1:4321 -> 10.77.0.2:8080 (rule)"."""
    return [x.strip()[4:] for x in out.splitlines() if x.startswith("  cut ")]


def _close(net: NetLab, *held: Holder) -> None:
    for h in held:
        net.kill(h.p)


def _tags(role: str) -> dict[str, str]:
    return {"ringfence:role": role, "ringfence:app": "lab", "ringfence:env": "test"}


def _client(host: str, net: NetLab) -> Workload:
    return Workload(id=host, ips=[net.v4(host), net.v6(host)], tags=_tags("client"))


def test_established_connections_survive_a_whole_bundle_replace(net: NetLab, backend: str, tmp_path: Path) -> None:
    lab = lab_engine(net)
    ok(apply(net, backend, lab.bundle("h2"), tmp_path / "state"))
    held = net.hold("h1", "h2", 8080)
    assert held.connected and held.ping()
    lab.upsert(
        Workload(
            id="h9",
            ips=["10.77.0.9"],
            tags={"ringfence:role": "client", "ringfence:app": "lab", "ringfence:env": "test"},
        )
    )
    out = ok(apply(net, backend, lab.bundle("h2"), tmp_path / "state"))
    assert "version 2" in out
    assert held.ping() and held.ping()
    enforced_baseline(net)


def test_admin_range_is_never_locked_out(net: NetLab, backend: str, tmp_path: Path) -> None:
    lab = lab_engine(net, DENY_ALL_POLICY, extra={"adm": "admin"})
    doc = lab.bundle("h2")
    assert doc.inbound[0].action == "override-deny" and net.v4("adm") + "/32" in str(doc.sets)
    ok(apply(net, backend, doc, tmp_path / "state"))
    assert net.tcp("adm", "h2", 22) and net.tcp("adm", "h2", 22, v6=False)
    assert not net.tcp("h1", "h2", 22) and not net.tcp("h1", "h2", 8080) and not net.tcp("adm", "h2", 8080)
    # a bundle cannot drop the local fail-safe either: an empty bundle admin list + local --admin-cidr
    bare = resign(doc, version=doc.version + 1, failsafes=doc.failsafes.model_copy(update={"admin_cidrs": []}))
    path = write(bare, tmp_path / "bare.json")
    ok(
        net.agent(
            "h2",
            "apply",
            "--bundle",
            str(path),
            *apply_flags(backend, tmp_path / "state"),
            "--admin-cidr",
            f"{net.v4('adm')}/32",
        )
    )
    assert net.tcp("adm", "h2", 22) and not net.tcp("h1", "h2", 22)


def test_an_admin_range_overlapping_the_bundles_is_merged_not_refused(
    net: NetLab, backend: str, tmp_path: Path
) -> None:
    """The bundle's admin 10.77.0.250/32 inside the local 10.77.0.0/24: one fail-safe cover (nft
    refused the overlapping interval set, so every bundle failed: no enforcement at first boot)."""
    lab = lab_engine(net, DENY_ALL_POLICY, extra={"adm": "admin"})
    doc = lab.bundle("h2")
    assert f"{net.v4('adm')}/32" in doc.failsafes.admin_cidrs
    path = write(doc, tmp_path / "b.json")
    common = ["--public-key", str(PUBLIC_KEY), "--backend", backend, "--state-dir", str(tmp_path / "state")]
    subnet = net.v4("adm").rsplit(".", 1)[0] + ".0/24"
    ok(net.agent("h2", "apply", "--bundle", str(path), *common, "--admin-cidr", subnet))
    assert net.tcp("adm", "h2", 22) and net.tcp("h1", "h2", 22)  # h1 is in the local admin range
    assert not net.tcp("h1", "h2", 8080)  # and the bundle is enforced


def test_dns_to_configured_resolver_survives_a_deny_everything_bundle(
    net: NetLab, backend: str, tmp_path: Path
) -> None:
    lab = lab_engine(net, DENY_ALL_POLICY, extra={"adm": "admin"})
    path = write(lab.bundle("h2"), tmp_path / "deny.json")
    args = ["--public-key", str(PUBLIC_KEY), "--backend", backend, "--state-dir", str(tmp_path / "state")]
    ok(net.agent("h2", "apply", "--bundle", str(path), *args))
    assert not net.udp("h2", "h3", 53)
    ok(net.agent("h2", "apply", "--bundle", str(path), *args, "--dns", net.v4("h3")))  # same bundle, local resolver
    assert net.udp("h2", "h3", 53)  # DNS to the configured resolver
    assert not net.tcp("h2", "h3", 5432)  # nothing else


METADATA = ("169.254.169.254", "fd00:ec2::254")


@pytest.fixture
def metadata_host(net: NetLab) -> Iterator[str]:
    """cp also answers as the cloud metadata endpoint (both families), serving tcp/80 and tcp/8080."""
    for addr in METADATA:
        plen = "128" if ":" in addr else "32"
        net.exec("cp", "ip", "addr", "add", f"{addr}/{plen}", "dev", "eth0", *(["nodad"] if ":" in addr else []))
        net.exec("h2", "ip", "route", "add", f"{addr}/{plen}", "dev", "eth0", check=True)
    server = net.serve("cp", tcp=[80, 8080])
    try:
        yield "cp"
    finally:
        net.kill(server)
        for addr in METADATA:
            plen = "128" if ":" in addr else "32"
            net.exec("h2", "ip", "route", "del", f"{addr}/{plen}", "dev", "eth0")
            net.exec("cp", "ip", "addr", "del", f"{addr}/{plen}", "dev", "eth0")


def test_metadata_endpoint_survives_a_deny_everything_bundle_on_its_port_only(
    net: NetLab, backend: str, tmp_path: Path, metadata_host: str
) -> None:
    v4, v6 = METADATA
    assert net.tcp("h2", metadata_host, 8080, addr=v4)  # reachable before any firewall
    lab = lab_engine(net, DENY_ALL_POLICY, extra={"adm": "admin"})
    ok(apply(net, backend, lab.bundle("h2"), tmp_path / "state"))
    assert net.tcp("h2", metadata_host, 80, addr=v4) and net.tcp("h2", metadata_host, 80, addr=v6)
    # the same host on another port, and the same port on the host's own address: dropped
    assert not net.tcp("h2", metadata_host, 8080, addr=v4) and not net.tcp("h2", metadata_host, 8080, addr=v6)
    assert not net.tcp("h2", metadata_host, 80)


def test_dhcp_exchange_survives_a_deny_everything_bundle(net: NetLab, backend: str, tmp_path: Path) -> None:
    server = net.spawn("h3", *PROBE, "dhcp-serve", "--ports", "67,6700", stdout=subprocess.PIPE)
    try:
        assert server.stdout is not None and server.stdout.readline().strip() == "ready"

        def dhcp(client_port: int, server_port: int) -> bool:
            probe = (*PROBE, "dhcp", str(client_port), str(server_port))
            return net.exec("h2", *probe).returncode == 0

        assert dhcp(68, 67) and dhcp(6800, 6700)  # both work without a firewall
        lab = lab_engine(net, DENY_ALL_POLICY, extra={"adm": "admin"})
        ok(apply(net, backend, lab.bundle("h2"), tmp_path / "state"))
        # broadcast 68 → 67 out, broadcast 67 → 68 back: the reply matches no connection, only the
        # inbound fail-safe lets it in
        assert dhcp(68, 67)
        assert not dhcp(6800, 6700)  # the same exchange on other ports: dropped
    finally:
        net.kill(server)


def test_idle_mode_leaves_the_firewall_alone(net: NetLab, backend: str, tmp_path: Path) -> None:
    lab = lab_engine(net)
    state = tmp_path / "state"
    ok(apply(net, backend, lab.bundle("h2"), state))
    assert not net.tcp("h4", "h2", 8080)
    idle = resign(lab.bundle("h2"), version=2, mode=Mode.IDLE)
    assert "mode idle" in ok(apply(net, backend, idle, state))
    assert net.tcp("h4", "h2", 8080)
    assert net.exec("h2", "nft", "list", "table", "inet", "ringfence").returncode != 0
    assert "RF-IN" not in net.exec("h2", "iptables-save").stdout


def test_forged_rolled_back_and_foreign_bundles_are_rejected(net: NetLab, backend: str, tmp_path: Path) -> None:
    lab = lab_engine(net)
    first = lab.bundle("h2")
    lab.upsert(
        Workload(
            id="h9",
            ips=["10.77.0.9"],
            tags={"ringfence:role": "client", "ringfence:app": "lab", "ringfence:env": "test"},
        )
    )
    second = lab.bundle("h2")
    state = tmp_path / "state"
    ok(apply(net, backend, second, state))
    before = (state / "bundle.json").read_bytes()
    open_all = resign(second, mode=Mode.OBSERVE)  # would open everything if it were accepted
    cases = {
        "forged": (forge(open_all, version=5), "signature does not verify"),
        "rollback": (first, "rollback refused"),
        "foreign": (lab.bundle("h3"), "this agent is 'h2'"),
    }
    for name, (doc, message) in cases.items():
        proc = apply(net, backend, doc, state)
        assert proc.returncode != 0, name
        assert message in proc.stderr, (name, proc.stderr)
        assert (state / "bundle.json").read_bytes() == before
        enforced_baseline(net)
    status = json.loads(ok(net.agent("h2", "status", "--state-dir", str(state), "--json")))
    assert status["counters"]["rejected"] == 3 and status["bundle_version"] == second.version


def test_failed_apply_leaves_previous_rules_intact(net: NetLab, backend: str, tmp_path: Path) -> None:
    lab = lab_engine(net)
    state = tmp_path / "state"
    ok(apply(net, backend, lab.bundle("h2"), state))
    good = lab.bundle("h2")
    name = good.inbound[0].set
    assert name is not None
    env: list[str] = []
    if backend == "nftables":
        # the plan refuses overlapping elements, so a shim in front of `nft` appends one to the
        # agent's transaction: nft refuses it as a whole, the delete of the old table included
        shim = tmp_path / "shim"
        shim.mkdir()
        real = subprocess.run(["which", "nft"], capture_output=True, text=True, check=True).stdout.strip()
        (shim / "nft").write_text(
            "#!/bin/sh\n"
            'if [ "$1" = "-f" ]; then\n'
            f"  {{ cat; echo 'add element inet ringfence fs_admin_4 {{ 10.77.0.0/24, 10.77.0.0/25 }}'; }} | {real} -f -\n"
            "  exit $?\n"
            "fi\n"
            f'exec {real} "$@"\n'
        )
        (shim / "nft").chmod(0o755)
        env = ["RINGFENCE_NFT_CLI=1", f"PATH={shim}:{os.environ['PATH']}"]
        bad = resign(good, version=good.version + 1)
        expected = "nft refused the bundle"
    else:
        # ipset accepts overlaps; instead another program holds the name the next generation
        # needs, with another type and in use, so `ipset restore` fails half-way
        squatter = ipset_name(name, 4, "b")
        net.exec("h2", "ipset", "create", squatter, "hash:ip", check=True)
        net.exec(
            "h2", "iptables", "-A", "FORWARD", "-m", "set", "--match-set", squatter, "src", "-j", "ACCEPT", check=True
        )
        bad = resign(good, version=good.version + 1)
        expected = "ipset restore failed"
    try:
        proc = apply(net, backend, bad, state, env=env)
        assert proc.returncode != 0 and expected in proc.stderr, proc.stderr
        enforced_baseline(net)
        assert net.udp("h1", "h2", 5353) and not net.tcp("h2", "h4", 8080)
        assert Bundle.model_validate_json((state / "bundle.json").read_text()).version == good.version
    finally:
        if backend == "iptables":
            net.exec("h2", "iptables", "-F", "FORWARD")
            net.exec("h2", "ipset", "destroy", ipset_name(name, 4, "b"))


def _ringfence_v4_rules(net: NetLab) -> list[str]:
    save = net.exec("h2", "iptables-save", "-t", "filter").stdout.splitlines()
    return [line for line in save if "RF-" in line]


def _squat_ipv6_input_chain(net: NetLab) -> None:
    """Another program takes the name of Ringfence's IPv6 input chain for a hooked chain of its own
    (accepting everything) and our chain lives on under another name, still jumped to from INPUT:
    the previous IPv6 rules keep enforcing, and the next ``ip6tables-restore`` is refused by the
    kernel (EEXIST) — after the IPv4 commit of the same apply has succeeded."""
    net.exec("h2", "nft", "rename", "chain", "ip6", "filter", "RF-IN", "RF-IN-kept", check=True)
    net.exec(
        "h2",
        "nft",
        "add chain ip6 filter RF-IN { type filter hook prerouting priority -400; policy accept; }",
        check=True,
    )


def _unsquat(net: NetLab) -> None:
    net.exec("h2", "nft", "delete", "chain", "ip6", "filter", "RF-IN")
    net.exec("h2", "nft", "rename", "chain", "ip6", "filter", "RF-IN-kept", "RF-IN")


def test_iptables_ipv6_failure_rolls_ipv4_back(net: NetLab, tmp_path: Path) -> None:
    if subprocess.run(["which", "iptables-restore", "ipset"], capture_output=True).returncode:
        pytest.skip("iptables-restore / ipset not installed")
    state = tmp_path / "state"
    good = lab_engine(net).bundle("h2")
    ok(apply(net, "iptables", good, state))
    rules, sets = _ringfence_v4_rules(net), net.exec("h2", "ipset", "list", "-n").stdout.split()
    # the next bundle would let h4 in (it becomes a client) on both families
    nxt = lab_engine(net, extra={"h4": "client"}).bundle("h2")
    nxt = resign(nxt, version=good.version + 1)
    _squat_ipv6_input_chain(net)
    try:
        proc = apply(net, "iptables", nxt, state)
        assert proc.returncode != 0, proc.stdout
        assert "ip6tables-restore failed" in proc.stderr and "previous rules still in force" in proc.stderr
        # IPv4 was committed, then rolled back: the previous rules and sets, nothing of the new generation
        assert _ringfence_v4_rules(net) == rules
        assert net.exec("h2", "ipset", "list", "-n").stdout.split() == sets
        enforced_baseline(net)
        assert net.tcp("h1", "h2", 8080, v6=True) and not net.tcp("h4", "h2", 8080, v6=True)
        assert Bundle.model_validate_json((state / "bundle.json").read_text()).version == good.version
        # a delta still lands in the live (previous) generation's sets
        lab = lab_engine(net)
        deltas = lab.upsert(
            Workload(
                id="h4",
                ips=[net.v4("h4"), net.v6("h4")],
                tags={"ringfence:role": "client", "ringfence:app": "lab", "ringfence:env": "test"},
            )
        )
        ok(apply_delta(net, "iptables", deltas, state))
        assert net.tcp("h4", "h2", 8080)
    finally:
        _unsquat(net)
    ok(apply(net, "iptables", resign(nxt, version=nxt.version + 1), state))
    assert net.tcp("h4", "h2", 8080) and net.tcp("h4", "h2", 8080, v6=True)


def test_iptables_first_apply_failing_on_ipv6_leaves_no_ipv4_rules(net: NetLab, tmp_path: Path) -> None:
    if subprocess.run(["which", "iptables-restore", "ipset"], capture_output=True).returncode:
        pytest.skip("iptables-restore / ipset not installed")
    net.exec("h2", "ip6tables", "-N", "RF-IN", check=True)
    net.exec("h2", "ip6tables", "-A", "INPUT", "-j", "RF-IN", check=True)
    _squat_ipv6_input_chain(net)
    try:
        proc = apply(net, "iptables", lab_engine(net).bundle("h2"), tmp_path / "state")
        assert proc.returncode != 0 and "ip6tables-restore failed" in proc.stderr, proc.stderr
        assert _ringfence_v4_rules(net) == []
        assert not [n for n in net.exec("h2", "ipset", "list", "-n").stdout.split() if n.startswith("rf")]
        assert net.tcp("h4", "h2", 8080)  # nothing enforced, as before the apply
    finally:
        _unsquat(net)
        net.exec("h2", "ip6tables", "-D", "INPUT", "-j", "RF-IN")
        net.exec("h2", "ip6tables", "-X", "RF-IN")


@pytest.mark.parametrize("ipset", ["libipset", "binary"])
def test_iptables_delta_failing_half_way_is_undone(net: NetLab, tmp_path: Path, ipset: str) -> None:
    """A delta adds h4's IPv4 and IPv6 addresses; the IPv6 set has vanished (an operator emptied
    Ringfence's IPv6 chains and destroyed it), so the IPv6 line fails after the IPv4 one: the
    IPv4 element must be taken back out and the state directory left as it was."""
    if subprocess.run(["which", "iptables-restore", "ipset"], capture_output=True).returncode:
        pytest.skip("iptables-restore / ipset not installed")
    lab = lab_engine(net)
    state = tmp_path / "state"
    doc = lab.bundle("h2")
    ok(apply(net, "iptables", doc, state))
    name = doc.inbound[0].set
    assert name is not None and net.v4("h1") + "/32" in doc.sets[name].v4
    for chain in ("RF-IN", "RF-OUT"):
        net.exec("h2", "ip6tables", "-F", chain, check=True)
    net.exec("h2", "ipset", "destroy", ipset_name(name, 6, "a"), check=True)
    deltas = lab.upsert(
        Workload(
            id="h4",
            ips=[net.v4("h4"), net.v6("h4")],
            tags={"ringfence:role": "client", "ringfence:app": "lab", "ringfence:env": "test"},
        )
    )
    assert [(d.set, len(d.add)) for d in deltas] == [(name, 2)]
    args: list[str] = []
    for i, d in enumerate(deltas):
        args += ["--delta", str(write(d, tmp_path / f"d{i}.json"))]
    common = ["--backend", "iptables", "--public-key", str(PUBLIC_KEY), "--state-dir", str(state)]
    env = [f"RINGFENCE_IPSET_CLI={int(ipset == 'binary')}"]
    proc = net.agent("h2", "apply-delta", *args, *common, env=env)
    assert proc.returncode != 0 and "ipset refused the delta" in proc.stderr, proc.stderr
    members = net.exec("h2", "ipset", "list", ipset_name(name, 4, "a")).stdout
    assert net.v4("h1") in members and net.v4("h4") not in members
    enforced_baseline(net)
    status = json.loads(ok(net.agent("h2", "status", "--state-dir", str(state), "--json")))
    assert status["applied_revision"] == doc.version and status["deltas_applied"] == 0
    # with the sets whole again, the same delta applies through the same path
    net.reset("h2")
    common[-1] = str(tmp_path / "state2")
    ok(apply(net, "iptables", doc, tmp_path / "state2"))
    ok(net.agent("h2", "apply-delta", *args, *common, env=env))
    assert net.tcp("h4", "h2", 8080) and net.tcp("h4", "h2", 8080, v6=True)


STALE_GENERATION = """
import sys
from ringfence.bundle import load_bundle
from ringfence_agent.backends import ElementChange
from ringfence_agent.backends.iptables import IptablesBackend
from ringfence_agent.plan import LocalFailsafes, compile_plan

plan = compile_plan(load_bundle(open(sys.argv[1]).read()), LocalFailsafes())
daemon, other = IptablesBackend(), IptablesBackend()
daemon.apply(plan)
other.apply(plan)  # another agent process commits the other generation meanwhile
name = next(r.set for r in plan.rules if r.direction == "inbound" and r.set is not None)
daemon.apply_delta(ElementChange(name, add_v4=(sys.argv[2] + "/32",)))
print(daemon.active_gen())
"""


def test_iptables_delta_follows_a_generation_switched_by_another_process(net: NetLab, tmp_path: Path) -> None:
    if subprocess.run(["which", "iptables-restore", "ipset"], capture_output=True).returncode:
        pytest.skip("iptables-restore / ipset not installed")
    path = write(lab_engine(net).bundle("h2"), tmp_path / "b.json")
    proc = net.exec("h2", PY, "-c", STALE_GENERATION, str(path), net.v4("h4"))
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.strip() == "b"
    assert net.tcp("h4", "h2", 8080) and net.tcp("h1", "h2", 8080)


def test_a_rule_id_of_120_cjk_characters_fits_the_kernels_comment_limits(
    net: NetLab, backend: str, tmp_path: Path
) -> None:
    """nft's comment limit is 128 bytes, xt_comment's 256: 120 CJK characters are 360 bytes."""
    good = lab_engine(net).bundle("h2")
    long_id = "\u898f" * 120
    doc = resign(good, inbound=[good.inbound[0].model_copy(update={"id": long_id}), *good.inbound[1:]])
    ok(apply(net, backend, doc, tmp_path / "state"))
    enforced_baseline(net)


def test_a_delta_that_would_overlap_a_set_is_rejected_before_the_kernel(
    net: NetLab, backend: str, tmp_path: Path
) -> None:
    """A /24 over a /32 already in the set. Both kernels took this one (the /32 lives in nft's hash
    set, the /24 in the interval set; ipset allows overlaps), but nft refuses a /24 over a /25 or
    in a grouped rule's set, and the set is no CIDR cover any more: the agent rejects every
    overlap, the firewall and the set version stay, and the next delta applies."""
    good = lab_engine(net).bundle("h2")
    name = good.inbound[0].set
    assert name is not None and f"{net.v4('h1')}/32" in good.sets[name].v4
    version = good.sets[name].version
    state = tmp_path / "state"
    ok(apply(net, backend, good, state))
    subnet = net.v4("h4").rsplit(".", 1)[0] + ".0/24"
    bad = sign(SetDelta(set=name, from_version=version, to_version=version + 1, add=[subnet]), key())
    proc = apply_delta(net, backend, [bad], state)
    assert proc.returncode != 0 and "overlaps" in proc.stderr and "rejected" in proc.stderr, proc.stderr
    enforced_baseline(net)  # h4 still blocked
    add = f"{net.v4('h4')}/32"
    fine = sign(SetDelta(set=name, from_version=version, to_version=version + 1, add=[add]), key())
    ok(apply_delta(net, backend, [fine], state))
    assert net.tcp("h4", "h2", 8080)


def _rename_set(doc: Bundle, old: str, new: str) -> Bundle:
    """The bundle with set ``old`` called ``new`` (in its rules too), signed again."""

    def rule(r: Any) -> Any:
        members = [m.model_copy(update={"set": new if m.set == old else m.set}) for m in r.members or ()]
        return r.model_copy(update={"set": new if r.set == old else r.set, "members": members or r.members})

    sets = {new if k == old else k: v for k, v in doc.sets.items()}
    return resign(doc, sets=sets, inbound=[rule(r) for r in doc.inbound], outbound=[rule(r) for r in doc.outbound])


def _ipset_members(net: NetLab, name: str) -> list[str] | None:
    proc = net.exec("h2", "ipset", "list", name)
    return sorted(proc.stdout.split("Members:", 1)[1].split()) if proc.returncode == 0 else None


def test_iptables_touches_no_ipset_outside_its_namespace_and_flush_leaves_none(net: NetLab, tmp_path: Path) -> None:
    """A bundle set named like another program's ipsets (``blocklist`` → ``blocklist-4a``, the
    names older agents used) leaves them alone; old generations go; flush leaves no ``rf*`` ipset."""
    if subprocess.run(["which", "iptables-restore", "ipset"], capture_output=True).returncode:
        pytest.skip("iptables-restore / ipset not installed")
    lab = lab_engine(net)
    good = lab.bundle("h2")
    name = good.inbound[0].set
    assert name is not None
    doc = _rename_set(good, name, "blocklist")
    foreign = {
        "blocklist-4a": ("inet", "203.0.113.0/24"),
        "blocklist-4b": ("inet", "198.51.100.0/24"),
        "blocklist-6a": ("inet6", "2001:db8::/64"),
    }
    for n, (fam, net_) in foreign.items():
        net.exec("h2", "ipset", "create", n, "hash:net", "family", fam, check=True)
        net.exec("h2", "ipset", "add", n, net_, check=True)
    state = tmp_path / "state"
    try:
        ok(apply(net, "iptables", doc, state))
        enforced_baseline(net)
        assert net.tcp("h1", "h2", 8080, v6=True)
        ok(apply(net, "iptables", resign(doc, version=doc.version + 1), state))  # the other generation
        enforced_baseline(net)
        ours = [n for n in net.exec("h2", "ipset", "list", "-n").stdout.split() if n.startswith("rf")]
        assert ipset_name("blocklist", 4, "b") in ours and ipset_name("blocklist", 6, "b") in ours
        assert all(n.endswith("b") for n in ours), ours  # generation a destroyed
        assert "removed" in ok(net.agent("h2", "flush", "--backend", "iptables"))
        assert not [n for n in net.exec("h2", "ipset", "list", "-n").stdout.split() if n.startswith("rf")]
        for n, (_, net_) in foreign.items():
            assert _ipset_members(net, n) == [net_], n
    finally:
        for n in foreign:
            net.exec("h2", "ipset", "destroy", n)


# --- the daemon ------------------------------------------------------------------------------------


def config(tmp_path: Path, backend: str, **extra: object) -> Path:
    cfg = {
        "workload_id": "h2",
        "public_key": str(PUBLIC_KEY),
        "state_dir": str(tmp_path / "state"),
        "backend": backend,
        "poll_interval": 1,
        "observe_interval": 0.3,
        "heartbeat_interval": 1,
        "report_interval": 1,
        "wait_timeout": 2,
        "backoff_max": 2,
        "request_timeout": 1,
        **extra,
    }
    p = tmp_path / "agent.json"
    p.write_text(json.dumps(cfg))
    return p


def _applied_version(state: Path) -> object:
    """What the agent's status.json says it applied (it is replaced whole, never half-written)."""
    p = state / "status.json"
    return json.loads(p.read_text()).get("applied_version") if p.exists() else None


def test_restart_reapplies_last_known_good_before_contact_and_survives_control_plane_loss(
    net: NetLab, backend: str, tmp_path: Path
) -> None:
    lab = lab_engine(net)
    src = tmp_path / "src"
    write(lab.bundle("h2"), src / "bundles" / "h2.json")
    log1 = (tmp_path / "run1.log").open("w")
    daemon = net.spawn(
        "h2", str(net_agent()), "run", "--config", str(config(tmp_path, backend, source=str(src))), stderr=log1
    )
    assert wait_until(lambda: not net.tcp("h4", "h2", 8080, timeout=0.3), 15)
    assert net.tcp("h1", "h2", 8080)
    # the agent keeps a bundle as its last known good once the kernel took it: a kill in between
    # leaves the one before (here none), so wait for the state directory before pulling the plug
    assert wait_until(lambda: _applied_version(tmp_path / "state") is not None, 15)
    net.kill(daemon)  # SIGKILL: no chance to clean up
    net.reset("h2")  # as after a reboot: the kernel state is gone
    assert net.tcp("h4", "h2", 8080)
    # restart against a control plane that does not answer (nothing listens on cp:9)
    cfg = config(
        tmp_path, backend, api_url=f"http://{net.v4('cp')}:9", enroll={"pairing_key": "k"}, insecure_http_lab_only=True
    )
    log2 = (tmp_path / "run2.log").open("w")
    daemon = net.spawn("h2", str(net_agent()), "run", "--config", str(cfg), stderr=log2)
    try:
        assert wait_until(lambda: "retry in" in (tmp_path / "run2.log").read_text(), 15)
        text = (tmp_path / "run2.log").read_text()
        assert "re-applied last known good" in text, text
        assert text.index("re-applied last known good") < text.index("retry in"), text
        enforced_baseline(net)
        time.sleep(2)  # several failed contacts later: still enforcing
        enforced_baseline(net)
        status = json.loads(ok(net.agent("h2", "status", "--state-dir", str(tmp_path / "state"), "--json")))
        assert status["counters"]["lkg_reapplied"] >= 1 and status["counters"]["contact_failures"] >= 1
    finally:
        net.kill(daemon, 15)
    enforced_baseline(net)  # stopping the agent leaves enforcement in place


def test_daemon_follows_offline_compiles_over_plain_http_by_set_deltas(
    net: NetLab, backend: str, tmp_path: Path
) -> None:
    """No control plane: `ringfence compile` into a directory, `python -m http.server` on cp."""
    www = tmp_path / "www"
    (tmp_path / "lab.yaml").write_text(LAB_POLICY)

    def compile_lab(roles: dict[str, str], revision: int) -> None:
        rows = [
            {
                "id": h,
                "ips": [net.v4(h), net.v6(h)],
                "tags": {"ringfence:role": role, "ringfence:app": "lab", "ringfence:env": "test"},
            }
            for h, role in roles.items()
        ]
        (tmp_path / "inventory.json").write_text(json.dumps({"workloads": rows}))
        cmd = [str(RINGFENCE), "compile", "--policy", str(tmp_path / "lab.yaml"), "--inventory"]
        cmd += [str(tmp_path / "inventory.json"), "--out", str(www), "--key", str(KEY), "--revision", str(revision)]
        subprocess.run(cmd, check=True, capture_output=True)

    compile_lab(ROLES, 1000)
    served = (tmp_path / "http.log").open("w")
    server = net.spawn(
        "cp", PY, "-m", "http.server", "8000", "--bind", net.v4("cp"), "--directory", str(www), stderr=served
    )
    assert wait_until(lambda: net.exec("h2", PY, "-c", URLOPEN, f"http://{net.v4('cp')}:8000/").returncode == 0, 10)
    log = (tmp_path / "run.log").open("w")
    cfg = config(tmp_path, backend, source=f"http://{net.v4('cp')}:8000")
    daemon = net.spawn("h2", str(net_agent()), "run", "--config", str(cfg), stderr=log)
    try:
        assert wait_until(lambda: not net.tcp("h4", "h2", 8080, timeout=0.3), 15), (tmp_path / "run.log").read_text()
        assert net.tcp("h1", "h2", 8080)
        compile_lab({**ROLES, "h4": "client"}, 2000)  # h4 joins the clients: a set change only
        assert wait_until(lambda: net.tcp("h4", "h2", 8080, timeout=0.3), 15), (tmp_path / "run.log").read_text()
        assert not net.tcp("h3", "h2", 8080)
        requests = (tmp_path / "http.log").read_text()
        assert requests.count('"GET /bundles/h2.json HTTP/1.1" 200') == 1, requests  # the first start only
        assert '"GET /deltas/' in requests and '"GET /heads/h2.json HTTP/1.1" 200' in requests
        assert "version 1001 → 2001, +2 -0 elements" in (tmp_path / "run.log").read_text()
    finally:
        net.kill(daemon, 15)
        net.kill(server)


URLOPEN = "import sys, urllib.request; urllib.request.urlopen(sys.argv[1], timeout=1)"
RINGFENCE = Path(PY).parent / "ringfence"
KEY = PUBLIC_KEY.parent / "test-key.pem"


@pytest.mark.slow
def test_daemon_enrolls_follows_pushes_and_reports_against_the_real_control_plane(
    net: NetLab,
    backend: str,
    tmp_path: Path,
    aws_env: Any,  # noqa: F811 - the fixture
    request: pytest.FixtureRequest,
    aws_wiring: Callable[[], Any],
) -> None:
    """The agent in h2 against ``ringfence serve`` (the real agent-API routes) listening in cp,
    over the moto-backed AWS wiring: the lab hosts are EC2 instances with the lab's addresses, the
    bundles are compute's. Enrolled with its signed identity document (aws-iid); observe mode reports
    would-drops; the operator's switch to enforce and a tag change (a set delta) arrive through
    the wait long-poll, long before the agent's slow poll; the control plane gone, it still enforces."""
    from ringfence import serve
    from ringfence.local.tls import lab_tls
    from tests.agent.netns import listening_socket_in
    from tests.aws.imds import running_imds

    aws = aws_env

    os.environ["RINGFENCE_WAIT_POLL_INTERVAL"] = "0.2"
    try:
        ids = _lab_estate(net, aws, OBSERVE_POLICY)
    finally:
        del os.environ["RINGFENCE_WAIT_POLL_INTERVAL"]
    h2 = ids["h2"]
    (tmp_path / "signing.pub.pem").write_bytes(aws.signing_key.public_pem())
    # the control plane and an IMDS stand-in (the caller's signed identity document) listen in
    # cp; the IMDS at the metadata address on port 80, as on EC2: the control-plane fail-safe
    # admits the control plane's port only, the metadata fail-safe this
    sock = listening_socket_in(net.ns("cp"), net.v4("cp"), 8080)
    sh("ip", "-n", net.ns("cp"), "addr", "replace", "169.254.169.254/32", "dev", "eth0")
    sh("ip", "-n", net.ns("h2"), "route", "replace", "169.254.169.254/32", "dev", "eth0")
    # the lab outlives this test (the metadata tests of the other backend add the same address)
    request.addfinalizer(lambda: net.exec("h2", "ip", "route", "del", "169.254.169.254/32", "dev", "eth0"))
    request.addfinalizer(lambda: net.exec("cp", "ip", "addr", "del", "169.254.169.254/32", "dev", "eth0"))
    by_address = {net.v4(host): iid for host, iid in ids.items()}
    app = serve.ServeApp.over(aws_wiring(), None)
    tls = lab_tls(tmp_path / "tls", net.v4("cp"))  # HTTPS, verified against the lab's own CA
    with (
        serve.serving(app, tls_cert=str(tls.cert), tls_key=str(tls.key), sock=sock),
        running_imds(aws, by_address.get, "169.254.169.254", net.ns("cp"), port=80) as imds_url,
    ):
        cfg = config(
            tmp_path,
            backend,
            workload_id=h2,
            public_key=str(tmp_path / "signing.pub.pem"),
            api_url=f"https://{net.v4('cp')}:8080",
            tls_ca_file=str(tls.ca),
            enroll={"method": "aws-iid", "imds_url": imds_url},
            poll_interval=120,  # a change seen sooner came by the long-poll
            # the agent reports between long-polls: one of 10 s held the would-drop report back
            # that long; pushes end a long-poll at once, however long it may last
            wait_timeout=2,
            request_timeout=5,
        )
        log = tmp_path / "run.log"
        daemon = net.spawn("h2", str(net_agent()), "run", "--config", str(cfg), stderr=log.open("w"))
        try:
            assert wait_until(lambda: (tmp_path / "state" / "bundle.json").exists(), 20), log.read_text()
            assert net.tcp("h4", "h2", 8080)  # observe: passes ...

            def reported() -> list[dict[str, Any]]:
                listed = aws.s3.list_objects_v2(Bucket=aws.bucket, Prefix=f"reports/{h2}/").get("Contents", [])
                return [json.loads(aws.s3.get_object(Bucket=aws.bucket, Key=o["Key"])["Body"].read()) for o in listed]

            def would_drop() -> bool:
                return any(
                    d["src"] == net.v4("h4") and d["action"] == "would-drop" for r in reported() for d in r["drops"]
                )

            assert wait_until(would_drop, 20), log.read_text()  # ... and is reported as a would-drop
            flows = [f for r in reported() for f in r["flows"]]
            if net.exec("h2", "test", "-e", "/proc/net/nf_conntrack").returncode == 0:  # else flows degrade
                assert any(f["src"] == net.v4("h4") and f["dport"] == 8080 for f in flows), flows
            assert aws.store.get(h2).last_heartbeat is not None

            # the operator moves h2 to enforce (admin API, audited): a whole new bundle, pushed
            assert aws.rest("admin", "PUT", f"/admin/workloads/{h2}/mode", {"mode": "enforce"})[0] == 200
            aws.pump()
            pushed = time.monotonic()
            assert wait_until(lambda: not net.tcp("h4", "h2", 8080, timeout=0.3), 20), log.read_text()
            assert net.tcp("h1", "h2", 8080)
            # a tag change (h4 becomes a client): event → ingest → compute → a set delta, pushed
            aws.ec2.create_tags(Resources=[ids["h4"]], Tags=[{"Key": "ringfence:role", "Value": "client"}])
            aws.put(aws.tag_event(ids["h4"], _tags("client"), version=2))
            aws.pump()
            assert wait_until(lambda: net.tcp("h4", "h2", 8080, timeout=0.3), 20), log.read_text()
            assert time.monotonic() - pushed < 60 < 120, "both changes came by the long-poll"
            assert not net.tcp("h3", "h2", 8080)
            assert wait_until(lambda: ", +1 -0 elements" in log.read_text(), 5), log.read_text()  # a delta
        except BaseException:
            net.kill(daemon, 15)
            raise
    # control plane gone: still enforced
    time.sleep(1.5)
    try:
        assert not net.mismatches(allowed=[P("h4", "h2", 8080)], dropped=[P("h3", "h2", 8080)])
    finally:
        net.kill(daemon, 15)


# an HTTP client run inside a lab namespace (the test process is outside the lab)
_HTTP_IN_LAB = """
import json, sys, httpx
method, url, token, body = sys.argv[1], sys.argv[2], sys.argv[3], json.loads(sys.argv[4])
if url.endswith("/v1/enroll"):  # an enrollment: fetch a nonce first, and sign it with the agent's key
    body["nonce"] = httpx.get(url.replace("/enroll", "/nonce"), timeout=10).json()["nonce"]
    import base64
    from cryptography.hazmat.primitives import serialization as s
    from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
    from ringfence.agentwire import proof_message
    key = Ed25519PrivateKey.from_private_bytes(bytes.fromhex(body.pop("agent_seed")))
    body["agent_key"] = key.public_key().public_bytes(s.Encoding.PEM, s.PublicFormat.SubjectPublicKeyInfo).decode()
    proof = key.sign(proof_message("enroll", body["workload_id"], body["nonce"]))
    body["agent_signature"] = base64.b64encode(proof).decode()
headers = {"Authorization": f"Bearer {token}"} if token else {}
r = httpx.request(method, url, json=body, headers=headers, timeout=60)
print(json.dumps({"status": r.status_code, "body": r.json()}))
"""


class _OnPremControlPlane:
    """``ringfence serve --store sqlite:`` in cp (plain HTTP in the lab), called from inside the
    lab with an admin token that may author policy, respond to incidents and onboard."""

    TOKEN = "lab-admin-token-0123456789abcdef"

    def __init__(self, net: NetLab, tmp_path: Path) -> None:
        from ringfence import serve

        self.net, self.tmp_path = net, tmp_path
        (tmp_path / "admin-tokens").write_text(
            f"carol:{serve.token_hash(self.TOKEN)}:policy-author,incident-responder,onboarding\n"
        )
        self.db = tmp_path / "cp-state" / "state.db"
        self.url = f"http://{net.v4('cp')}:8443"

    def start(self) -> subprocess.Popen[str]:
        cmd = [str(RINGFENCE), "serve", "--host", self.net.v4("cp"), "--port", "8443", "--insecure"]
        cmd += ["--store", f"sqlite:{self.db}", "--admin-tokens", str(self.tmp_path / "admin-tokens")]
        log = self.tmp_path / "serve.log"
        proc = self.net.spawn("cp", *cmd, stdout=subprocess.PIPE, stderr=log.open("a"))
        assert proc.stdout is not None and "listening on" in proc.stdout.readline(), log.read_text()
        return proc

    def call(
        self, method: str, path: str, body: dict[str, Any] | None = None, auth: str | None = TOKEN
    ) -> tuple[int, Any]:
        args = (method, self.url + path, auth or "", json.dumps(body or {}))
        answer = json.loads(ok(self.net.exec("cp", PY, "-c", _HTTP_IN_LAB, *args)))
        return answer["status"], answer["body"]

    def register(self, host: str, role: str) -> int:
        spec = {"id": host, "ips": [self.net.v4(host)], "tags": _tags(role)}
        return self.call("POST", "/admin/workloads", spec)[0]

    def agent_config(self, backend: str, pairing_key: str, **extra: object) -> Path:
        return config(
            self.tmp_path,
            backend,
            public_key=str(self.db.parent / "signing-key.pub.pem"),
            api_url=self.url,
            insecure_http_lab_only=True,  # the lab's control plane listens without TLS
            enroll={"pairing_key": pairing_key},
            **extra,
        )


def test_onprem_serve_pairs_pushes_and_survives_kill_9(net: NetLab, backend: str, tmp_path: Path) -> None:
    """``ringfence serve --store sqlite:`` in cp and the agent in h2 with a real firewall:
    workloads registered and a key minted through the admin API, enrollment with it (a used-up or
    another workload's key refused), a registration change pushed, the server SIGKILLed and
    restarted on the same state, and the agent following the next change with the token it holds."""
    cp = _OnPremControlPlane(net, tmp_path)
    start, call, register = cp.start, cp.call, cp.register

    server = start()
    daemon = None
    try:
        assert [register(h, role) for h, role in ROLES.items()] == [201] * len(ROLES)
        status, body = call("POST", "/admin/policies", {"files": {"lab.yaml": LAB_POLICY}, "reason": "lab"})
        assert status == 201, body
        _, key = call("POST", "/admin/pairing-keys", {"workload_id": "h2", "uses": 1, "ttl": 600})
        _, h3_key = call("POST", "/admin/pairing-keys", {"workload_id": "h3", "uses": 1, "ttl": 600})
        status, body = call(
            "POST",
            "/v1/enroll",
            {"method": "pairing", "workload_id": "h2", "pairing_key": h3_key["pairing_key"], "agent_seed": "11" * 32},
            auth=None,
        )
        assert status == 401, "another workload's key is refused"
        cfg = cp.agent_config(
            backend,
            key["pairing_key"],
            poll_interval=120,  # a change seen sooner came by the long-poll
            wait_timeout=10,
            request_timeout=5,
        )
        log = tmp_path / "run.log"
        daemon = net.spawn("h2", str(net_agent()), "run", "--config", str(cfg), stderr=log.open("w"))
        assert wait_until(lambda: not net.tcp("h4", "h2", 8080, timeout=0.3), 30), log.read_text()
        assert net.tcp("h1", "h2", 8080) and not net.tcp("h3", "h2", 8080)
        status, body = call(
            "POST",
            "/v1/enroll",
            {"method": "pairing", "workload_id": "h2", "pairing_key": key["pairing_key"], "agent_seed": "22" * 32},
            auth=None,
        )
        assert status == 401 and "used up" in body["detail"], body

        # h4 becomes a client (a registration update): pushed to h2 as a set delta
        changed = time.monotonic()
        assert register("h4", "client") == 200
        assert wait_until(lambda: net.tcp("h4", "h2", 8080, timeout=0.3), 20), log.read_text()
        assert time.monotonic() - changed < 20 < 120

        # kill -9 and restart on the same state; the agent carries on with its token (its key is
        # used up: it could not enroll again) and follows the next change: h4 quarantined
        net.kill(server)
        server = start()
        changed = time.monotonic()
        assert call("POST", "/admin/workloads/h4/quarantine", {"reason": "lab"})[0] == 200
        assert wait_until(lambda: not net.tcp("h4", "h2", 8080, timeout=0.3), 30), log.read_text()
        assert time.monotonic() - changed < 30 < 120
        assert net.tcp("h1", "h2", 8080)
    finally:
        if daemon is not None:
            net.kill(daemon, 15)
        net.kill(server)


def _lab_estate(net: NetLab, aws: Any, policy: str) -> dict[str, str]:
    """The lab hosts as EC2 instances with their lab addresses and role tags, the policy
    provisioned and every instance's running event through the pipeline: host → instance id."""
    status, _, body = aws.rest("admin", "POST", "/admin/policies", {"files": {"lab.yaml": policy}})
    assert status == 201, body
    vpc = aws.ec2.create_vpc(CidrBlock="10.77.0.0/16")["Vpc"]["VpcId"]
    subnet = aws.ec2.create_subnet(VpcId=vpc, CidrBlock="10.77.0.0/24")["Subnet"]["SubnetId"]
    ami = lab_image(aws.ec2)
    ids = {}
    for host, role in ROLES.items():
        tags = [
            {"Key": "ringfence:role", "Value": role},
            {"Key": "ringfence:app", "Value": "lab"},
            {"Key": "ringfence:env", "Value": "test"},
        ]
        ids[host] = aws.ec2.run_instances(
            ImageId=ami,
            MinCount=1,
            MaxCount=1,
            SubnetId=subnet,
            PrivateIpAddress=net.v4(host),
            TagSpecifications=[{"ResourceType": "instance", "Tags": tags}],
        )["Instances"][0]["InstanceId"]
        aws.put(aws.state_event(ids[host], "running"))
    aws.pump()
    return ids


def _set_holding(net: NetLab, backend: str, address: str) -> str:
    """The kernel set (nft ``s_*``, or the ipset of a bundle set) in h2 that holds ``address``."""
    if backend == "iptables":
        names = ok(net.exec("h2", "ipset", "list", "-n")).split()
        bundle_sets = [n for n in names if n.startswith(("rf-s-", "rf-h-"))]  # not the fail-safe or tracking sets
        held = [n for n in bundle_sets if address in ok(net.exec("h2", "ipset", "list", n))]
    else:
        tables = json.loads(ok(net.exec("h2", "nft", "-j", "list", "table", "inet", "ringfence")))["nftables"]
        held = [
            x["set"]["name"]
            for x in tables
            if x.get("set", {}).get("name", "").startswith("s_") and address in json.dumps(x["set"].get("elem", []))
        ]
    assert held, f"no set in h2's kernel holds {address}"
    return held[0]


@contextlib.contextmanager
def _h2_daemon_paired_with_serve(net: NetLab, backend: str, tmp_path: Path) -> Iterator[Path]:
    """``ringfence serve`` in cp with LAB_POLICY over ROLES, and the daemon in h2 paired with it,
    enforcing (h4 refused, h1 let in); yields the daemon's log; both killed afterwards. No drift
    check within a test: the heartbeat's read alone finds a tamper (every long-poll round, 1 s
    here); drift_interval 0 would turn tamper repair off altogether."""
    cp = _OnPremControlPlane(net, tmp_path)
    server = cp.start()
    daemon = None
    try:
        assert [cp.register(h, role) for h, role in ROLES.items()] == [201] * len(ROLES)
        assert cp.call("POST", "/admin/policies", {"files": {"lab.yaml": LAB_POLICY}, "reason": "lab"})[0] == 201
        _, key = cp.call("POST", "/admin/pairing-keys", {"workload_id": "h2", "uses": 1, "ttl": 600})
        cfg = cp.agent_config(backend, key["pairing_key"], wait_timeout=1, drift_interval=3600)
        log = tmp_path / "run.log"
        daemon = net.spawn("h2", str(net_agent()), "run", "--config", str(cfg), stderr=log.open("w"))
        assert wait_until(lambda: not net.tcp("h4", "h2", 8080, timeout=0.3), 30), log.read_text()
        assert wait_until(lambda: net.tcp("h1", "h2", 8080), 10), log.read_text()
        yield log
    finally:
        if daemon is not None:
            net.kill(daemon, 15)
        net.kill(server)


def test_attack_an_address_added_to_a_bundle_set_is_repaired_by_the_daemons_heartbeat(
    net: NetLab, backend: str, tmp_path: Path
) -> None:
    """Another tool adds h4 to the kernel set of h2's allowed clients (``nft add element inet
    ringfence s_... { h4 }``, or ``ipset add``): h4 reaches h2:8080. The heartbeat's enforced
    digest told the control plane, but nothing on the host repaired it (the drift check compares
    rules and group sets; an API-sourced agent fetches only a new version). The daemon now
    compares the digest it reads for the heartbeat with its bundle's and re-applies."""
    with _h2_daemon_paired_with_serve(net, backend, tmp_path) as log:
        clients = _set_holding(net, backend, net.v4("h1"))
        if backend == "iptables":
            ok(net.exec("h2", "ipset", "add", clients, net.v4("h4")))
        else:
            ok(net.exec("h2", "nft", "add", "element", "inet", "ringfence", clients, f"{{ {net.v4('h4')} }}"))
        repaired = "not those of the enforced bundle"
        # the repair may come within a second: h4 got through, or the agent already found the change
        assert net.tcp("h4", "h2", 8080) or repaired in log.read_text(), "the tamper opened nothing: it proves nothing"
        assert wait_until(lambda: repaired in log.read_text(), 30), log.read_text()
        assert wait_until(lambda: not net.tcp("h4", "h2", 8080), 10) and wait_until(
            lambda: net.tcp("h1", "h2", 8080), 10
        )
        status = _status(net, backend, tmp_path / "state")
        assert status["counters"]["tamper_reapplied"] == 1 and status["last_tamper"]["what"] == "set altered", status
        assert "warning" not in status, status


def test_attack_an_address_added_to_a_bundle_set_with_a_comment_is_repaired(
    net: NetLab, backend: str, tmp_path: Path
) -> None:
    """As above, but the element is added with a comment: ``nft -j`` lists it as ``{"elem":
    {"val": ..., "comment": ...}}``, which the enforced digest's parser skipped, so the digest
    stayed the published one and h4 stayed allowed. Now read (and any element form the agent
    does not know makes the digest altered), so the heartbeat repairs it. (An element with a
    counter is listed the same way; the kernel refuses one in the agent's sets, declared
    without ``counter``.)"""
    if backend != "nftables":
        pytest.skip("nft element comments and counters")
    with _h2_daemon_paired_with_serve(net, backend, tmp_path) as log:
        clients = _set_holding(net, backend, net.v4("h1"))
        repaired = "not those of the enforced bundle"
        for n, extra in enumerate(('comment "ops"', 'comment "ops again"'), start=1):
            element = f"{{ {net.v4('h4')} {extra} }}"
            ok(net.exec("h2", "nft", "add", "element", "inet", "ringfence", clients, element))
            assert net.tcp("h4", "h2", 8080) or log.read_text().count(repaired) >= n, "the tamper opened nothing"
            assert wait_until(lambda n=n: log.read_text().count(repaired) >= n, 30), (extra, log.read_text())
            assert wait_until(lambda: not net.tcp("h4", "h2", 8080, timeout=0.3), 10), extra
            assert wait_until(lambda: net.tcp("h1", "h2", 8080), 10), extra
        status = _status(net, backend, tmp_path / "state")
        assert status["counters"]["tamper_reapplied"] == 2 and status["last_tamper"]["what"] == "set altered", status
        assert "warning" not in status, status


def net_agent() -> Path:
    from ringfence.local.lab import AGENT

    return AGENT


def test_flush_removes_only_ringfence(net: NetLab, backend: str, tmp_path: Path) -> None:
    net.exec("h2", "nft", "add", "table", "inet", "other", check=True)
    try:
        ok(apply(net, backend, lab_engine(net).bundle("h2"), tmp_path / "state"))
        assert "removed" in ok(net.agent("h2", "flush", "--backend", backend))
        assert net.tcp("h4", "h2", 8080)
        assert net.exec("h2", "nft", "list", "table", "inet", "other").returncode == 0
    finally:
        net.exec("h2", "nft", "delete", "table", "inet", "other")


def test_nft_binary_fallback_applies_bundles_and_deltas(net: NetLab, tmp_path: Path) -> None:
    """Without libnftables (forced with RINGFENCE_NFT_CLI=1) the agent drives the `nft` binary."""
    lab = lab_engine(net)
    state = tmp_path / "state"
    path = write(lab.bundle("h2"), tmp_path / "b.json")
    common = ["--public-key", str(PUBLIC_KEY), "--state-dir", str(state)]
    env = ["RINGFENCE_NFT_CLI=1"]
    ok(net.agent("h2", "apply", "--bundle", str(path), *common, env=env))
    enforced_baseline(net)
    deltas = lab.upsert(
        Workload(
            id="h4",
            ips=[net.v4("h4")],
            tags={"ringfence:role": "client", "ringfence:app": "lab", "ringfence:env": "test"},
        )
    )
    dpaths = [str(write(d, tmp_path / f"d{i}.json")) for i, d in enumerate(deltas)]
    ok(net.agent("h2", "apply-delta", *[x for p in dpaths for x in ("--delta", p)], *common, env=env))
    assert net.tcp("h4", "h2", 8080)
    drops = json.loads(ok(net.agent("h2", "drops", "--state-dir", str(state), "--json", env=env)))
    assert "d_in" in drops["counters"]


# --- grouped rules -------------------------------------------------------------------------------


def _lab_workload(net: NetLab, host: str, **tags: str) -> Workload:
    labels = {f"ringfence:{k}": v for k, v in tags.items()}
    return Workload(id=host, ips=[net.v4(host), net.v6(host)], tags={"ringfence:app": "lab", **labels})


def test_grouped_rule_allows_each_members_peers_on_its_own_services_only(
    net: NetLab, backend: str, tmp_path: Path
) -> None:
    _grouped_scenario(net, backend, tmp_path, expanded=False)


@pytest.mark.parametrize("backend", ["nftables"], indirect=True)  # how nftables realises groups
def test_nft_group_past_the_bound_is_expanded_and_allows_the_same(
    net: NetLab, backend: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The same bundle and deltas with the bound at 0: every group realised as plain rules over
    the members' own sets; every allow and deny the concatenated realisation gives, the same."""
    monkeypatch.setenv("RINGFENCE_NFT_GROUP_BOUND", "0")
    _grouped_scenario(net, backend, tmp_path, expanded=True)


def _grouped_scenario(net: NetLab, backend: str, tmp_path: Path, expanded: bool) -> None:
    wls = [
        _lab_workload(net, "h1", role="client", tier="gold"),
        _lab_workload(net, "h2", role="web"),
        _lab_workload(net, "h3", role="db"),
        _lab_workload(net, "h4", role="other"),
    ]
    lab = Lab(GROUP_POLICY, wls)
    doc = lab.bundle("h2")
    # one group: port ranges identical or disjoint, 'any' and all tcp ports in sets of their own
    assert [r.id for r in doc.inbound] == ["grp/client-web"]
    assert [m.id for m in doc.inbound[0].members or []] == [
        "grp/client-web",
        "grp/gold-web",
        "grp/db-web",
        "grp/ops-any",
        "grp/audit-any",
        "grp/scan-all",
        "grp/wide",
    ]
    # wide's tcp/5000-9000 overlaps tcp/5432 and tcp/8080: cut into pieces around them
    wide = next(m for m in doc.inbound[0].members or [] if m.id == "grp/wide")
    assert [s.ports for s in wide.services] == [(5000, 5431), (5432, 5432), (5433, 8079), (8080, 8080), (8081, 9000)]
    assert [m.id for m in doc.outbound[0].members or []] == ["grp/web-db", "grp/web-other"]
    state = tmp_path / "state"
    ok(apply(net, backend, doc, state))
    if expanded:  # plain rules over the members' own sets, all under the group's counter
        rules = ok(net.exec("h2", "nft", "list", "chain", "inet", "ringfence", "input"))
        assert "@g_" not in rules and "@s_" in rules
        # members x joined services x families x (hosts, prefixes): wide's pieces joined back
        assert rules.count('counter name "r_in_0"') > 7 and rules.count("tcp dport 5000-9000") == 4
    elif backend == "nftables":  # one rule per family and kind of service, not one per member and port
        rules = ok(net.exec("h2", "nft", "list", "chain", "inet", "ringfence", "input"))
        # v4: any, icmp type, whole protocol, ports; v6: any, whole protocol (tcp, icmpv6), ports
        assert rules.count('counter name "r_in_0"') == 7
        assert all(f"@g_r_in_0_{x}" in rules for x in ("4a", "4i", "4l", "4p", "6a", "6l", "6p"))
    assert not net.mismatches(
        allowed=[
            P("h1", "h2", 8080), P("h1", "h2", 8080, v6=True), P("h1", "h2", 5353, udp=True),
            P("h3", "h2", 5432), P("h3", "h2", 5432, v6=True),
            P("h2", "h3", 5432), P("h2", "h4", 8080, v6=True),  # outbound group
        ],
        dropped=[
            # nothing across members: the client on the db member's port, the db on the client's
            P("h1", "h2", 5432), P("h1", "h2", 5432, v6=True),
            P("h3", "h2", 8080), P("h3", "h2", 8080, v6=True), P("h3", "h2", 5353, udp=True),
            P("h4", "h2", 8080), P("h4", "h2", 22),
            P("h2", "h4", 5432), P("h2", "h3", 8080),
        ],
    )  # fmt: skip

    # h1 leaves tier gold but stays a client: tcp/8080 still allowed (the client member holds it)
    ok(apply_delta(net, backend, lab.upsert(_lab_workload(net, "h1", role="client")), state))
    assert not net.mismatches(allowed=[P("h1", "h2", 8080), P("h1", "h2", 5353, udp=True)])
    # h1 is no client either: closed; back in gold: tcp/8080 reopens, udp/5353 (client only) does not
    ok(apply_delta(net, backend, lab.upsert(_lab_workload(net, "h1", role="visitor")), state))
    assert not net.mismatches(
        dropped=[P("h1", "h2", 8080), P("h1", "h2", 8080, v6=True), P("h1", "h2", 5353, udp=True)]
    )
    ok(apply_delta(net, backend, lab.upsert(_lab_workload(net, "h1", role="visitor", tier="gold")), state))
    assert not net.mismatches(
        allowed=[P("h1", "h2", 8080), P("h1", "h2", 8080, v6=True)], dropped=[P("h1", "h2", 5353, udp=True)]
    )
    # h1 also scans (gold, scanner): its address is in the ports set (tcp/8080, gold) and in the
    # whole-protocol set (all tcp): every tcp port opens, udp stays shut
    ok(apply_delta(net, backend, lab.upsert(_lab_workload(net, "h1", role="scanner", tier="gold")), state))
    assert not net.mismatches(
        allowed=[P("h1", "h2", 22), P("h1", "h2", 5432, v6=True), P("h1", "h2", 8080)],
        dropped=[P("h1", "h2", 5353, udp=True)],
    )
    # no longer a scanner: the whole-protocol element goes, the gold member's tcp/8080 stays
    ok(apply_delta(net, backend, lab.upsert(_lab_workload(net, "h1", role="visitor", tier="gold")), state))
    assert not net.mismatches(
        allowed=[P("h1", "h2", 8080), P("h1", "h2", 8080, v6=True)],
        dropped=[P("h1", "h2", 22), P("h1", "h2", 5432, v6=True)],
    )
    # h4 in the wide range: both ports inside it open (pieces shared with the client and db
    # members), tcp/22 outside it stays shut; leaving it closes them again
    ok(apply_delta(net, backend, lab.upsert(_lab_workload(net, "h4", role="wide")), state))
    assert not net.mismatches(allowed=[P("h4", "h2", 5432), P("h4", "h2", 8080, v6=True)], dropped=[P("h4", "h2", 22)])
    ok(apply_delta(net, backend, lab.upsert(_lab_workload(net, "h4", role="other")), state))
    assert not net.mismatches(dropped=[P("h4", "h2", 5432), P("h4", "h2", 8080), P("h4", "h2", 8080, v6=True)])
    # h4 becomes a db: the db member's port opens for it, the others stay shut
    ok(apply_delta(net, backend, lab.upsert(_lab_workload(net, "h4", role="db")), state))
    assert not net.mismatches(allowed=[P("h4", "h2", 5432)], dropped=[P("h4", "h2", 8080)])
    # and an 'any' member: everything from h4 once it is ops, udp included
    ok(apply_delta(net, backend, lab.upsert(_lab_workload(net, "h4", role="ops")), state))
    assert not net.mismatches(
        allowed=[
            P("h4", "h2", 8080), P("h4", "h2", 22), P("h4", "h2", 5432),
            P("h4", "h2", 5353, udp=True), P("h4", "h2", 22, v6=True),
        ]
    )  # fmt: skip
    # h3 turns scanner: all tcp ports (v4 and v6), still no udp
    ok(apply_delta(net, backend, lab.upsert(_lab_workload(net, "h3", role="scanner")), state))
    assert not net.mismatches(
        allowed=[P("h3", "h2", 22), P("h3", "h2", 8080, v6=True)], dropped=[P("h3", "h2", 5353, udp=True)]
    )
    if expanded:  # deltas moved the bundle sets only: the kernel holds what a fresh apply loads
        # (inbound: the outbound group has lost all its peers, and an empty group is within even a
        # bound of 0: a fresh apply makes it concatenated, the deltas left it expanded, hysteresis)
        followed_state = _kernel_state(net, ("input",))
        assert "@g_" not in followed_state["chains"]
        net.reset("h2")
        ok(apply(net, backend, lab.bundle("h2"), tmp_path / "fresh"))
        assert followed_state == _kernel_state(net, ("input",))
    elif backend == "nftables":  # the elements deltas reached are those a fresh apply of the same bundle loads
        names = ("g_r_in_0_4p", "g_r_in_0_6p", "g_r_in_0_4a", "g_r_in_0_6a", "g_r_in_0_4l", "g_r_in_0_6l")
        followed = {name: _elements(net, name) for name in names}
        net.reset("h2")
        ok(apply(net, backend, lab.bundle("h2"), tmp_path / "fresh"))
        assert followed == {name: _elements(net, name) for name in followed}
        assert net.v4("h1") in str(followed["g_r_in_0_4p"]) and net.v4("h4") in str(followed["g_r_in_0_4a"])
        assert net.v4("h3") in str(followed["g_r_in_0_4l"]) and "ipv6-icmp" in str(followed["g_r_in_0_6l"])


def _elements(net: NetLab, set_name: str) -> list[str]:
    out = json.loads(ok(net.exec("h2", "nft", "-j", "list", "set", "inet", "ringfence", set_name)))
    elems = next(x["set"] for x in out["nftables"] if "set" in x).get("elem", [])
    return sorted(json.dumps(e, sort_keys=True) for e in elems)


def _kernel_state(net: NetLab, chains: tuple[str, ...] = ("input", "output")) -> dict[str, object]:
    """The chains' rules and the bundle and group sets' elements (not counters, not drop tuples)."""
    text = "".join(ok(net.exec("h2", "nft", "list", "chain", "inet", "ringfence", c)) for c in chains)
    out = json.loads(ok(net.exec("h2", "nft", "-j", "list", "sets", "table", "inet", "ringfence")))
    group = ("g_r_in_",) if chains == ("input",) else ("g_",)
    names = sorted(
        x["set"]["name"] for x in out["nftables"] if "set" in x and x["set"]["name"].startswith(("s_", *group))
    )
    return {"chains": text, **{name: _elements(net, name) for name in names}}


def _group_size(lab: Lab) -> int:
    """The grouped inbound rule's load on h2 (what the nft backend compares with its bound)."""
    from ringfence import bundlewire
    from ringfence_agent.plan import LocalFailsafes, compile_plan, group_load

    plan = compile_plan(bundlewire.bundle_from_json(json.loads(json.dumps(lab.engine.render("h2")))), LocalFailsafes())
    [rule] = [r for r in plan.rules if r.members and r.direction == "inbound"]
    return max(group_load(rule, fam, plan.sets) for fam in (4, 6))


@pytest.mark.parametrize("backend", ["nftables"], indirect=True)  # how nftables realises groups
def test_nft_delta_across_the_group_bound_switches_realisation(
    net: NetLab, backend: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Past the bound a concatenated group becomes plain rules, below half of it concatenated
    again, in between it stays as it is (hysteresis); at each switch the kernel holds what a
    fresh apply of the same bundle loads, and traffic follows the policy throughout."""
    wls = [
        _lab_workload(net, "h1", role="client", tier="gold"),
        _lab_workload(net, "h2", role="web"),
        _lab_workload(net, "h3", role="db"),
        _lab_workload(net, "h4", role="other"),
    ]
    lab = Lab(GROUP_POLICY, wls)
    bound = _group_size(lab)
    monkeypatch.setenv("RINGFENCE_NFT_GROUP_BOUND", str(bound))
    state = tmp_path / "state"
    ok(apply(net, backend, lab.bundle("h2"), state))

    def concatenated() -> bool:
        return "@g_r_in_0_" in ok(net.exec("h2", "nft", "list", "chain", "inet", "ringfence", "input"))

    def fresh_equal() -> None:
        followed = _kernel_state(net)
        net.reset("h2")
        ok(apply(net, backend, lab.bundle("h2"), tmp_path / f"fresh-{time.monotonic_ns()}"))
        assert followed == _kernel_state(net)

    assert concatenated() and net.tcp("h1", "h2", 8080) and not net.tcp("h4", "h2", 8080)
    # h4 turns ops: one 'any' element more per family, past the bound: plain rules
    ok(apply_delta(net, backend, lab.upsert(_lab_workload(net, "h4", role="ops")), state))
    assert _group_size(lab) > bound and not concatenated()
    assert net.tcp("h4", "h2", 22) and net.udp("h4", "h2", 5353) and net.tcp("h4", "h2", 8080, v6=True)
    assert net.tcp("h1", "h2", 8080) and not net.tcp("h1", "h2", 5432)
    fresh_equal()
    # back to 'other': within the bound but not below half of it: stays plain rules
    ok(apply_delta(net, backend, lab.upsert(_lab_workload(net, "h4", role="other")), state))
    assert bound // 2 <= _group_size(lab) <= bound and not concatenated()
    assert not net.tcp("h4", "h2", 8080) and not net.tcp("h4", "h2", 22, v6=True) and net.tcp("h1", "h2", 8080)
    # h1 and h3 leave: below half the bound, concatenated sets again
    ok(apply_delta(net, backend, lab.upsert(_lab_workload(net, "h1", role="visitor")), state))
    ok(apply_delta(net, backend, lab.upsert(_lab_workload(net, "h3", role="other")), state))
    assert _group_size(lab) < bound // 2 and concatenated()
    assert not net.tcp("h1", "h2", 8080) and not net.tcp("h3", "h2", 5432)
    fresh_equal()
    # and a delta within the concatenated realisation moves its elements (no switch)
    ok(apply_delta(net, backend, lab.upsert(_lab_workload(net, "h3", role="db")), state))
    assert concatenated() and net.tcp("h3", "h2", 5432) and not net.tcp("h3", "h2", 8080)
    fresh_equal()


# --- never fail open (issue 10) ---------------------------------------------------------------------


def _status(net: NetLab, backend: str, state: Path) -> dict[str, Any]:
    out: dict[str, Any] = json.loads(
        ok(net.agent("h2", "status", "--state-dir", str(state), "--backend", backend, "--json"))
    )
    return out


def test_apply_after_flush_reapplies_and_status_says_what_the_kernel_holds(
    net: NetLab, backend: str, tmp_path: Path
) -> None:
    """Today: flush, then apply of the same bundle said "already applied: no change" and left no
    table, while status said enforce. The kernel is asked, not the state directory."""
    lab = lab_engine(net)
    state = tmp_path / "state"
    doc = lab.bundle("h2")
    ok(apply(net, backend, doc, state))
    enforced_baseline(net)
    assert _status(net, backend, state)["kernel_programmed"] is True
    ok(net.agent("h2", "flush", "--backend", backend))
    assert net.tcp("h4", "h2", 8080)  # nothing enforced
    status = _status(net, backend, state)
    assert status["kernel_programmed"] is False and status["mode"] is None and status["state_mode"] == "enforce"
    assert "nothing is enforced" in status["warning"]
    out = ok(apply(net, backend, doc, state))
    assert "already applied" not in out and "the kernel no longer held these rules" in out, out
    enforced_baseline(net)
    status = _status(net, backend, state)
    assert status["kernel_programmed"] is True and status["mode"] == "enforce" and "warning" not in status
    assert "already applied" in ok(apply(net, backend, doc, state))  # the kernel holds it now: no change


def test_status_says_when_the_kernel_holds_whole_rules_other_than_the_last_known_goods(
    net: NetLab, backend: str, tmp_path: Path
) -> None:
    """The rules in the kernel are intact (as applied) but another bundle's: status must not
    report the state directory's mode as enforced (as with the posture held for an unusable
    pinned key, while the last known good stays on disk). Applied with another state directory,
    they carry a seal of another key (nftables and iptables alike), which this one reads as not
    its own."""
    lab = lab_engine(net)
    state, elsewhere = tmp_path / "state", tmp_path / "elsewhere"
    ok(apply(net, backend, lab.bundle("h2"), state))
    first = _status(net, backend, state)
    assert first["mode"] == "enforce", json.dumps(first)
    ok(apply(net, backend, lab.bundle("h1"), elsewhere))  # h1's rules now in this kernel
    status = _status(net, backend, state)
    assert status["state_mode"] == "enforce" and status["mode"] is None, status
    # sealed with the other state directory's key: this one cannot vouch for them
    assert status["kernel_programmed"] is False and "another state directory" in status["warning"], status
    ok(apply(net, backend, lab.bundle("h2"), state))
    status = _status(net, backend, state)
    assert status["mode"] == "enforce" and "warning" not in status, status


@pytest.mark.parametrize("corruption", ["invalid-json", "bad-signature"])
def test_a_corrupt_last_known_good_holds_the_failsafe_posture_until_a_verified_bundle_applies(
    net: NetLab, backend: str, tmp_path: Path, corruption: str
) -> None:
    """Today: invalid JSON made the daemon exit before enforcing or fetching (a restart loop, the
    host open), and a bad signature made it refuse the good bundle as a replay. Now the bad state
    is set aside, the host holds fail-safes + default deny, and the good bundle applies."""
    lab = lab_engine(net)
    state = tmp_path / "state"
    good = lab.bundle("h2")
    ok(apply(net, backend, good, state))
    net.reset("h2")  # a reboot: the kernel forgot, the state directory did not
    lkg = state / "bundle.json"
    if corruption == "invalid-json":
        lkg.write_text(lkg.read_text()[:200])  # torn
    else:
        write(forge(good, version=99), lkg)  # tampered: claims a version newer than any good bundle
    www = tmp_path / "www"
    write(good, www / "bundles" / "h2.json")
    admin = {"admin_cidrs": [f"{net.v4('adm')}/32"], "admin_ports": ["tcp/22"]}
    cfg = config(tmp_path, backend, source=f"http://{net.v4('cp')}:8000", **admin)
    run_log = tmp_path / "run.log"
    daemon = net.spawn("h2", str(net_agent()), "run", "--config", str(cfg), stderr=run_log.open("w"))
    server = None
    try:
        # the source is down: the fail-safes and nothing else, never open
        assert wait_until(lambda: "holding the fail-safe posture" in run_log.read_text(), 15), run_log.read_text()
        assert not net.tcp("h1", "h2", 8080) and not net.tcp("h4", "h2", 8080) and not net.tcp("h2", "h3", 5432)
        assert net.tcp("adm", "h2", 22)
        status = _status(net, backend, state)
        assert status["posture"] == "failsafe" and status["kernel_programmed"] is True
        assert status["counters"]["lkg_set_aside"] == 1 and status["bundle_version"] is None
        assert len(list((state / "rejected").glob("*-bundle.json"))) == 1
        assert "set aside" in run_log.read_text()
        server = net.spawn(
            "cp",
            PY,
            "-m",
            "http.server",
            "8000",
            "--bind",
            net.v4("cp"),
            "--directory",
            str(www),
            stderr=subprocess.DEVNULL,
        )
        assert wait_until(lambda: net.tcp("h1", "h2", 8080, timeout=0.3), 20), run_log.read_text()
        assert not net.tcp("h4", "h2", 8080) and net.tcp("h2", "h3", 5432)
        status = _status(net, backend, state)
        assert status["posture"] is None and status["bundle_version"] == good.version and status["mode"] == "enforce"
        assert "replay" not in run_log.read_text() and "rollback" not in run_log.read_text()
    finally:
        net.kill(daemon, 15)
        if server is not None:
            net.kill(server)


def test_the_daemon_repairs_and_reports_a_table_removed_or_changed_behind_its_back(
    net: NetLab, backend: str, tmp_path: Path
) -> None:
    """Drift: someone flushes Ringfence's rules, then inserts an accept into its chain; the
    daemon notices within drift_interval, re-applies and reports the tamper."""
    lab = lab_engine(net)
    src = tmp_path / "src"
    write(lab.bundle("h2"), src / "bundles" / "h2.json")
    run_log = tmp_path / "run.log"
    # the source is polled once (at start): only the drift check can notice
    cfg = config(tmp_path, backend, source=str(src), drift_interval=1, poll_interval=300)
    daemon = net.spawn("h2", str(net_agent()), "run", "--config", str(cfg), stderr=run_log.open("w"))
    try:
        assert wait_until(lambda: not net.tcp("h4", "h2", 8080, timeout=0.3), 15), run_log.read_text()
        ok(net.agent("h2", "flush", "--backend", backend))
        assert wait_until(lambda: "rules were removed in the kernel; re-applied" in run_log.read_text(), 10)
        enforced_baseline(net)
        if backend == "nftables":
            hole = ["nft", "insert", "rule", "inet", "ringfence", "input", "tcp", "dport", "8080", "accept"]
        else:
            hole = ["iptables", "-I", "RF-IN", "1", "-p", "tcp", "--dport", "8080", "-j", "ACCEPT"]
        net.exec("h2", *hole, check=True)
        assert wait_until(lambda: "rules were changed in the kernel; re-applied" in run_log.read_text(), 10)
        enforced_baseline(net)
        status = _status(net, backend, tmp_path / "state")
        # two tampers, each repaired; under load a drift check can fall between the steps of the
        # iptables flush (IPv4, IPv6, the sets) and repair the same flush twice
        assert status["counters"]["tamper_reapplied"] >= 2 and status["kernel_programmed"] is True
        assert status["last_tamper"]["what"] == "changed", status  # the last: the inserted accept
    finally:
        net.kill(daemon, 15)


def test_the_daemon_cuts_a_reverse_shell_when_its_workload_is_quarantined(
    net: NetLab, backend: str, tmp_path: Path
) -> None:
    """The daemon path, not only the CLI: a quarantined bundle arrives from the source, the
    workload's own open connection out (a reverse shell's shape) dies, and the log says so."""
    lab = lab_engine(net)
    src = tmp_path / "src"
    write(lab.bundle("h2"), src / "bundles" / "h2.json")
    run_log = tmp_path / "run.log"
    cfg = config(tmp_path, backend, source=str(src))
    daemon = net.spawn("h2", str(net_agent()), "run", "--config", str(cfg), stderr=run_log.open("w"))
    shell = None
    try:
        assert wait_until(lambda: not net.tcp("h4", "h2", 8080, timeout=0.3), 15), run_log.read_text()
        shell = net.hold("h2", "h3", 5432)
        assert shell.connected and shell.ping()
        lab.upsert(Workload(id="h2", ips=[net.v4("h2"), net.v6("h2")], tags=_tags("web"), quarantined=True))
        write(lab.bundle("h2"), src / "bundles" / "h2.json")
        assert wait_until(lambda: "quarantined False → True" in run_log.read_text(), 15), run_log.read_text()
        text = run_log.read_text()
        assert "open connection(s) the new rules do not admit" in text, text
        assert f"-> {net.v4('h3')}:5432 (default)" in text, text
        assert not shell.ping()
        assert not net.tcp("h1", "h2", 8080) and not net.tcp("h2", "h3", 5432)
    finally:
        net.kill(daemon, 15)
        if shell is not None:
            _close(net, shell)
