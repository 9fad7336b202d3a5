"""Unit tests of what a revoking apply cuts: conntrack parsing, the plan's admission verdicts (in
the order the backends render), the ctnetlink delete message, and when the agent asks for a cut.
The cut itself, against the kernel, is in test_agent_dataplane.py (nftables and iptables)."""

from __future__ import annotations

import socket
import struct
from dataclasses import replace

import pytest

from ringfence import bundle
from ringfence.bundlewire import Bundle, SetDelta, load_bundle
from ringfence_agent.core import Agent
from ringfence_agent.plan import Admitter, Flow, LocalFailsafes, compile_plan
from ringfence_agent.sessions import (
    Deleted,
    Session,
    SessionCutter,
    delete_message,
    destroy_message,
    flow_of,
    parse_sessions,
    session_cutter,
)
from tests.agent.bundles import GROUP_POLICY, LAB_POLICY, PRECEDENCE_POLICY, Lab, workloads

HOSTS = {
    "h1": ("10.77.0.1", "fd77::1", "client"),
    "h2": ("10.77.0.2", "fd77::2", "web"),
    "h3": ("10.77.0.3", "fd77::3", "db"),
    "h4": ("10.77.0.4", "fd77::4", "other"),
    "adm": ("10.77.0.250", "fd77::fa", "admin"),
}
LOCAL = LocalFailsafes(dns_resolvers=("10.0.0.53",), control_plane=("198.51.100.7",))


def wire(doc: bundle.Bundle) -> Bundle:
    return load_bundle(bundle.dumps(doc).encode())


def admitter(policy: str = LAB_POLICY, local: LocalFailsafes = LOCAL, **changes: object) -> Admitter:
    doc = wire(Lab(policy, workloads(HOSTS)).bundle("h2"))
    plan = compile_plan(doc, local)
    for k, v in changes.items():
        setattr(plan, k, v)
    return Admitter(plan)


def verdict(a: Admitter, direction: str, peer: str, proto: str, dport: int | None = None, **kw: int) -> tuple:
    v = a.admits(Flow(direction, peer, proto, dport=dport, **kw))  # type: ignore[arg-type]
    return v.admitted, v.by


def test_rules_fail_safes_and_default_in_the_rendered_order() -> None:
    a = admitter()
    assert verdict(a, "inbound", "10.77.0.1", "tcp", 8080) == (True, "lab/client-to-web")
    assert verdict(a, "inbound", "fd77::1", "udp", 5353) == (True, "lab/client-to-web")
    assert verdict(a, "inbound", "10.77.0.1", "tcp", 5432) == (False, "default")  # allowed peer, other port
    assert verdict(a, "inbound", "10.77.0.4", "tcp", 8080) == (False, "default")
    assert verdict(a, "outbound", "10.77.0.3", "tcp", 5432) == (True, "lab/web-to-db")
    assert verdict(a, "outbound", "10.77.0.4", "tcp", 8080) == (False, "default")
    # fail-safes: admin range on the admin ports only, DNS on 53, metadata on its ports, control plane on 443
    assert verdict(a, "inbound", "10.77.0.250", "tcp", 22) == (True, "failsafe admin")
    assert verdict(a, "inbound", "10.77.0.250", "tcp", 8080) == (False, "default")
    assert verdict(a, "inbound", "10.77.0.1", "tcp", 22) == (False, "default")
    assert verdict(a, "outbound", "10.0.0.53", "udp", 53) == (True, "failsafe dns")
    assert verdict(a, "outbound", "10.0.0.53", "tcp", 80) == (False, "default")
    assert verdict(a, "outbound", "169.254.169.254", "tcp", 80) == (True, "failsafe metadata")
    assert verdict(a, "outbound", "169.254.169.254", "tcp", 22) == (False, "default")
    assert verdict(a, "outbound", "198.51.100.7", "tcp", 443) == (True, "failsafe control-plane")
    assert verdict(a, "outbound", "198.51.100.7", "tcp", 9999) == (False, "default")
    assert verdict(a, "inbound", "198.51.100.7", "tcp", 8080) == (False, "default")
    assert a.admits(Flow("outbound", "10.77.0.9", "udp", sport=68, dport=67)).by == "failsafe dhcp"
    assert a.admits(Flow("inbound", "10.77.0.9", "udp", sport=67, dport=68)).by == "failsafe dhcp"


def test_override_deny_beats_a_later_allow_and_a_deny_catches_what_no_allow_took() -> None:
    a = admitter(PRECEDENCE_POLICY)
    assert verdict(a, "inbound", "10.77.0.250", "tcp", 8080) == (False, "guard/admins-never-web")
    assert verdict(a, "inbound", "10.77.0.1", "tcp", 8080) == (True, "lab/client-to-web")
    assert verdict(a, "inbound", "10.77.0.4", "tcp", 8080) == (False, "guard/strangers-out")


def test_observe_and_idle_admit_everything() -> None:
    assert admitter(mode="observe").admits(Flow("inbound", "10.77.0.4", "tcp", dport=8080)).admitted
    assert admitter(mode="idle").admits(Flow("inbound", "10.77.0.4", "tcp", dport=8080)).admitted


def test_a_grouped_rule_admits_each_member_on_its_own_services() -> None:
    hosts = {**HOSTS, "h3": ("10.77.0.3", "fd77::3", "db"), "h5": ("10.77.0.5", "fd77::5", "ops")}
    plan = compile_plan(wire(Lab(GROUP_POLICY, workloads(hosts)).bundle("h2")), LOCAL)
    assert any(r.members for r in plan.rules)
    a = Admitter(plan)
    assert a.admits(Flow("inbound", "10.77.0.1", "tcp", dport=8080)).admitted  # client: tcp/8080
    assert not a.admits(Flow("inbound", "10.77.0.1", "tcp", dport=5432)).admitted
    assert a.admits(Flow("inbound", "10.77.0.3", "tcp", dport=5432)).admitted  # db: tcp/5432, icmp/8
    assert a.admits(Flow("inbound", "10.77.0.3", "icmp", icmp_type=8)).admitted
    assert not a.admits(Flow("inbound", "10.77.0.3", "icmp", icmp_type=13)).admitted
    assert a.admits(Flow("inbound", "fd77::5", "udp", dport=9)).admitted  # ops: any


def test_a_prefix_set_admits_every_address_inside_it() -> None:
    a = admitter(local=LocalFailsafes(admin_cidrs=("192.0.2.0/24", "2001:db8::/48")))
    assert a.admits(Flow("inbound", "192.0.2.77", "tcp", dport=22)).by == "failsafe admin"
    assert a.admits(Flow("inbound", "2001:db8:0:ffff::1", "tcp", dport=22)).by == "failsafe admin"
    assert not a.admits(Flow("inbound", "192.0.2.77", "tcp", dport=3389)).admitted  # the policy says tcp/22
    assert not a.admits(Flow("inbound", "192.0.3.1", "tcp", dport=22)).admitted
    assert not a.admits(Flow("inbound", "2001:db8:1::1", "tcp", dport=22)).admitted


PROC_LINES = [
    # /proc/net/nf_conntrack: family prefix, IPv6 in full, zone always shown
    "ipv6     10 tcp      6 431999 ESTABLISHED src=fd77:0000:0000:0000:0000:0000:0000:0001 "
    "dst=fd77:0000:0000:0000:0000:0000:0000:0002 sport=50204 dport=8080 src=fd77:0000:0000:0000:0000:0000:0000:0002 "
    "dst=fd77:0000:0000:0000:0000:0000:0000:0001 sport=8080 dport=50204 [ASSURED] mark=0 zone=0 use=2",
    "ipv4     2 icmp     1 29 src=10.77.0.3 dst=10.77.0.2 type=8 code=0 id=77 src=10.77.0.2 dst=10.77.0.3 "
    "type=0 code=0 id=77 mark=0 zone=0 use=2",
    # conntrack -L: no family; counters with accounting; a zone
    "tcp      6 119 TIME_WAIT src=10.77.0.1 dst=10.77.0.2 sport=56860 dport=8080 packets=3 bytes=100 "
    "src=10.77.0.2 dst=10.77.0.1 sport=8080 dport=56860 packets=2 bytes=50 [ASSURED] mark=0 zone=3 use=1",
    # DNAT: the client asked for :80, the host's input hook saw :8080
    "tcp      6 300 ESTABLISHED src=10.77.0.4 dst=203.0.113.9 sport=40000 dport=80 "
    "src=10.77.0.2 dst=10.77.0.4 sport=8080 dport=40000 [ASSURED] mark=0 use=1",
    "conntrack v1.4.7 (conntrack-tools): 4 flow entries have been shown.",
    "",
]


def test_conntrack_lines_are_parsed_from_proc_and_the_tool() -> None:
    v6, icmp, closed, dnat = parse_sessions(PROC_LINES)
    assert (v6.family, v6.proto, v6.src, v6.dst, v6.sport, v6.dport, v6.state) == (
        6,
        "tcp",
        "fd77::1",
        "fd77::2",
        50204,
        8080,
        "ESTABLISHED",
    )
    assert icmp.icmp == (8, 0, 77) and icmp.sport is None and icmp.reply_src == "10.77.0.2"
    assert closed.state == "TIME_WAIT" and closed.zone == 3
    assert (dnat.dst, dnat.reply_src, dnat.reply_sport) == ("203.0.113.9", "10.77.0.2", 8080)


def test_direction_comes_from_this_hosts_addresses_after_nat() -> None:
    local = {"10.77.0.2", "fd77::2"}
    v6, icmp, _, dnat = parse_sessions(PROC_LINES)
    assert flow_of(v6, local) == Flow("inbound", "fd77::1", "tcp", 50204, 8080)
    assert flow_of(icmp, local) == Flow("inbound", "10.77.0.3", "icmp", None, None, 8)
    assert flow_of(dnat, local) == Flow("inbound", "10.77.0.4", "tcp", 40000, 8080)
    out = Session(4, "tcp", 6, "10.77.0.2", "10.77.0.3", 41000, 5432, "10.77.0.3", 5432)
    assert flow_of(out, local) == Flow("outbound", "10.77.0.3", "tcp", 41000, 5432)
    itself = Session(4, "tcp", 6, "10.77.0.2", "10.77.0.2", 41000, 22, "10.77.0.2", 22)
    assert flow_of(itself, local) is None  # loopback: always allowed
    forwarded = Session(4, "tcp", 6, "10.1.0.5", "10.2.0.6", 41000, 22, "10.2.0.6", 22)
    assert flow_of(forwarded, local) is None  # not seen by the input or output hook


def _attrs(data: bytes) -> dict[int, bytes]:
    out: dict[int, bytes] = {}
    off = 0
    while off + 4 <= len(data):
        size, kind = struct.unpack_from("=HH", data, off)
        out[kind & 0x7FFF] = data[off + 4 : off + size]
        off += (size + 3) & ~3
    return out


def test_the_delete_message_carries_the_original_tuple() -> None:
    s = Session(6, "tcp", 6, "fd77::1", "fd77::2", 50204, 8080, "fd77::2", 8080, zone=7)
    msg = delete_message(s, 42)
    assert msg is not None
    length, kind, flags, seq, _ = struct.unpack_from("=IHHII", msg)
    assert (length, kind, flags, seq) == (len(msg), (1 << 8) | 2, 1 | 4, 42)
    assert msg[16] == socket.AF_INET6
    top = _attrs(msg[20:])
    assert struct.unpack("!H", top[18][:2])[0] == 7  # CTA_ZONE
    tup = _attrs(top[1])  # CTA_TUPLE_ORIG
    ip, proto = _attrs(tup[1]), _attrs(tup[2])
    assert ip[3] == socket.inet_pton(socket.AF_INET6, "fd77::1") and ip[4] == socket.inet_pton(
        socket.AF_INET6, "fd77::2"
    )
    assert (
        proto[1][0] == 6
        and struct.unpack("!H", proto[2][:2])[0] == 50204
        and struct.unpack("!H", proto[3][:2])[0] == 8080
    )
    icmp = delete_message(Session(4, "icmp", 1, "10.0.0.1", "10.0.0.2", None, None, "10.0.0.2", None, (8, 0, 77)), 1)
    assert icmp is not None
    p = _attrs(_attrs(_attrs(icmp[20:])[1])[2])
    assert struct.unpack("!H", p[4][:2])[0] == 77 and p[5][0] == 8 and p[6][0] == 0
    assert delete_message(Session(4, "gre", 47, "10.0.0.1", "10.0.0.2", 1, 2, "10.0.0.2", 2), 1) is None


def test_the_cutter_deletes_only_what_the_plan_drops_and_skips_closed_connections() -> None:
    sessions = [
        Session(4, "tcp", 6, "10.77.0.1", "10.77.0.2", 40001, 8080, "10.77.0.2", 8080, state="ESTABLISHED"),
        Session(4, "tcp", 6, "10.77.0.4", "10.77.0.2", 40002, 8080, "10.77.0.2", 8080, state="ESTABLISHED"),
        Session(4, "tcp", 6, "10.77.0.4", "10.77.0.2", 40003, 8080, "10.77.0.2", 8080, state="TIME_WAIT"),
        Session(4, "tcp", 6, "10.77.0.250", "10.77.0.2", 40004, 22, "10.77.0.2", 22, state="ESTABLISHED"),
        Session(4, "tcp", 6, "10.77.0.2", "10.77.0.4", 40005, 4444, "10.77.0.4", 4444, state="ESTABLISHED"),
    ]
    asked: list[list[Session]] = []

    def delete(doomed: list[Session]) -> Deleted:
        asked.append(doomed)
        return Deleted(deleted=len(doomed))

    cutter = SessionCutter(lambda: sessions, lambda: {"10.77.0.2"}, delete, abort=None)
    plan = admitter().plan
    report = cutter.cut(plan)
    assert asked == [[sessions[1], sessions[4]]]
    assert report.listed == 5 and report.deleted.deleted == 2
    assert report.lines()[0].startswith("cut 2 open connection(s) the new rules do not admit (2 of 5 tracked")
    assert "  cut outbound tcp 10.77.0.2:40005 -> 10.77.0.4:4444 (default)" in report.lines()
    # a delta: only the peers it changed
    asked.clear()
    assert [s for s, _, _ in cutter.cut(plan, peers=["10.77.0.0/30"]).cut] == []
    assert [s for s, _, _ in cutter.cut(plan, peers=["10.77.0.4/32"]).cut] == [sessions[1], sessions[4]]
    # nothing is listed outside enforce
    plan.mode = "observe"
    assert cutter.cut(plan).listed == 0


def test_only_the_kernel_backends_cut() -> None:
    assert session_cutter("nftables") is not None and session_cutter("iptables") is not None
    assert session_cutter("dry-run") is None and session_cutter("windows-plan") is None
    assert session_cutter("nftables", enabled=False) is None


@pytest.mark.parametrize(
    ("action", "remove", "add", "revokes"),
    [
        ("allow", True, False, True),
        ("allow", False, True, False),
        ("deny", False, True, True),
        ("deny", True, False, False),
    ],
)
def test_a_delta_revokes_when_an_allow_loses_or_a_drop_gains(
    action: str, remove: bool, add: bool, revokes: bool
) -> None:
    doc = wire(Lab(LAB_POLICY, workloads(HOSTS)).bundle("h2"))
    rule = doc.inbound[0]
    assert rule.set is not None or rule.members
    name = rule.set or next(m.set for m in rule.members or () if m.set)
    doc = replace(doc, inbound=[replace(rule, action=action)])
    d = SetDelta(
        set=name,
        from_version=1,
        to_version=2,
        add=["10.9.9.9/32"] if add else [],
        remove=["10.77.0.1/32"] if remove else [],
    )
    assert Agent._delta_revokes(doc, d) is revokes


def test_a_delta_brings_the_plan_up_to_date_only_when_a_connection_of_its_peers_is_open() -> None:
    """The plan's copy of a large set costs O(set) to refresh: a delta pays it only when needed."""
    open_one = Session(4, "tcp", 6, "10.77.0.4", "10.77.0.2", 40002, 8080, "10.77.0.2", 8080, state="ESTABLISHED")
    plan = admitter().plan
    asked: list[int] = []

    def plan_now() -> object:
        asked.append(1)
        return plan

    cutter = SessionCutter(lambda: [open_one], lambda: {"10.77.0.2"}, lambda d: Deleted(deleted=len(d)), abort=None)
    assert cutter.cut(plan_now, peers=["10.77.0.9/32"]).cut == [] and asked == []  # type: ignore[arg-type]
    assert len(cutter.cut(plan_now, peers=["10.77.0.4/32"]).cut) == 1 and asked == [1]  # type: ignore[arg-type]


def test_the_destroy_message_names_this_hosts_end_of_the_connection() -> None:
    inbound = Session(4, "tcp", 6, "10.77.0.1", "10.77.0.2", 40001, 8080, "10.77.0.2", 8080)
    msg = destroy_message(inbound, Flow("inbound", "10.77.0.1", "tcp", 40001, 8080), 9)
    assert msg is not None
    length, kind, flags, seq, _ = struct.unpack_from("=IHHII", msg)
    assert (length, kind, flags, seq) == (len(msg), 21, 1 | 4, 9)  # SOCK_DESTROY, request + ack
    family, proto = msg[16], msg[17]
    sport, dport = struct.unpack_from("!HH", msg, 24)
    src, dst = msg[28:32], msg[44:48]
    assert (family, proto, sport, dport) == (socket.AF_INET, socket.IPPROTO_TCP, 8080, 40001)
    assert src == socket.inet_aton("10.77.0.2") and dst == socket.inet_aton("10.77.0.1")
    out = Session(6, "tcp", 6, "fd77::2", "fd77::3", 41000, 5432, "fd77::3", 5432)
    msg6 = destroy_message(out, Flow("outbound", "fd77::3", "tcp", 41000, 5432), 1)
    assert msg6 is not None and struct.unpack_from("!HH", msg6, 24) == (41000, 5432)
    assert msg6[28:44] == socket.inet_pton(socket.AF_INET6, "fd77::2")
    udp = Session(4, "udp", 17, "10.77.0.1", "10.77.0.2", 40001, 53, "10.77.0.2", 53)
    assert destroy_message(udp, Flow("inbound", "10.77.0.1", "udp", 40001, 53), 1) is None


LISTENER_SURVIVES = """
import socket, sys, time
from ringfence_agent.plan import Flow
from ringfence_agent.sessions import Session, destroy_sockets

def cut_of(client):
    port = client.getsockname()[1]
    s = Session(4, "tcp", 6, "127.0.0.1", "127.0.0.1", port, 8080, "127.0.0.1", 8080)
    return s, Flow("inbound", "127.0.0.1", "tcp", port, 8080)

srv = socket.socket()
srv.bind(("0.0.0.0", 8080))
srv.listen()
srv.settimeout(2)
ended = socket.create_connection(("127.0.0.1", 8080))
served, _ = srv.accept()
cut = cut_of(ended)
ended.close()
time.sleep(0.1)
served.close()
time.sleep(0.2)
first = destroy_sockets([cut])  # the connection ended: the kernel's lookup falls back to the listener
live = socket.create_connection(("127.0.0.1", 8080), timeout=2)  # refused if the listener was aborted
served, _ = srv.accept()
second = destroy_sockets([cut_of(live)])
try:
    served.send(b"x")
    aborted = False
except OSError:
    aborted = True
print(first.deleted, first.gone, second.deleted, aborted)
"""


def test_a_cut_of_a_connection_that_just_ended_never_aborts_the_ports_listener(tmp_path: object) -> None:
    """SOCK_DESTROY of an address pair whose connection has just ended made the kernel fall back
    to the port's listening socket and abort it: the service refused every later connection (a
    revocation racing a client's close did that to a lab server in CI). The socket is now looked
    up first and destroyed by its cookie, never a listener; a live one is still aborted."""
    import os
    import subprocess
    import sys

    from tests.agent import dataplane

    dataplane.require()
    ns = f"rft-listen-{os.getpid()}"
    subprocess.run(["ip", "netns", "add", ns], check=True)
    try:
        subprocess.run(["ip", "netns", "exec", ns, "ip", "link", "set", "lo", "up"], check=True)
        out = subprocess.run(
            ["ip", "netns", "exec", ns, sys.executable, "-c", LISTENER_SURVIVES],
            capture_output=True,
            text=True,
            timeout=60,
        )
    finally:
        subprocess.run(["ip", "netns", "del", ns], check=False)
    assert out.returncode == 0, out.stderr
    assert out.stdout.split() == ["0", "1", "1", "True"], out.stdout


MANY_CUT = """
import errno, socket, time
from ringfence_agent.plan import Flow
from ringfence_agent.sessions import Session, destroy_sockets

def listener(family, port):
    srv = socket.socket(family)
    if family == socket.AF_INET6:
        srv.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 0)  # IPv4 clients too (mapped)
    srv.bind(("::" if family == socket.AF_INET6 else "0.0.0.0", port))
    srv.listen(512)
    srv.settimeout(5)
    return srv

def connect(srv, port):
    client = socket.create_connection(("127.0.0.1", port), timeout=5)
    served, _ = srv.accept()
    return client, served

def cut_of(client, port):
    cport = client.getsockname()[1]
    s = Session(4, "tcp", 6, "127.0.0.1", "127.0.0.1", cport, port, "127.0.0.1", port)
    return s, Flow("inbound", "127.0.0.1", "tcp", cport, port)

servers = {8080: listener(socket.AF_INET, 8080), 8081: listener(socket.AF_INET6, 8081)}
pairs = [(port, *connect(servers[port], port)) for port in [8080, 8081] * 160]  # 320
doomed, kept = pairs[:300], pairs[300:]
cut = [cut_of(client, port) for port, client, _ in doomed]
ended = []  # connections that end just before the cut: their lookups meet the listener
for port in (8080, 8081, 8080):
    client, served = connect(servers[port], port)
    ended.append(cut_of(client, port))
    client.close()
    time.sleep(0.05)
    served.close()
time.sleep(0.2)
result = destroy_sockets(cut[:150] + ended + cut[150:])

def aborted(served):
    try:
        served.send(b"x")
        return False
    except OSError as exc:
        return exc.errno == errno.ECONNABORTED

cut_aborted = sum(aborted(served) for _, _, served in doomed)
kept_alive = sum(not aborted(served) for _, _, served in kept)
for port, srv in servers.items():  # refused if a listener was aborted
    client, served = connect(srv, port)
print(result.deleted, result.gone, len(result.failed), cut_aborted, kept_alive)
"""


def test_a_cut_of_many_connections_aborts_exactly_those_and_no_listener() -> None:
    """300 connections (two chunks of lookups and of aborts), half to an IPv4 listener and half
    to a dual-stack one (its IPv4 connections are IPv6 sockets with mapped addresses), among
    them three that just ended (their lookups fall back to the listeners): exactly the 300 are
    aborted, the ended ones count as gone, 20 other connections and both listeners live on."""
    import os
    import subprocess
    import sys

    from tests.agent import dataplane

    dataplane.require()
    ns = f"rft-many-{os.getpid()}"
    subprocess.run(["ip", "netns", "add", ns], check=True)
    try:
        subprocess.run(["ip", "netns", "exec", ns, "ip", "link", "set", "lo", "up"], check=True)
        out = subprocess.run(
            ["ip", "netns", "exec", ns, sys.executable, "-c", MANY_CUT],
            capture_output=True,
            text=True,
            timeout=120,
        )
    finally:
        subprocess.run(["ip", "netns", "del", ns], check=False)
    assert out.returncode == 0, out.stderr
    assert out.stdout.split() == ["300", "3", "0", "300", "20"], out.stdout
