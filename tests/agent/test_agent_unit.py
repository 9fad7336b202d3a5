"""Unit tests: plan and rule generation, backends' text, acceptance rules, config, buffers."""

from __future__ import annotations

import io
import json
import subprocess
import sys
from dataclasses import replace
from pathlib import Path

import pytest

from ringfence.agentwire import DropEvent, FlowRecord, ReportBatch
from ringfence.bundlewire import Bundle, SetDelta, Verifier, bundle_from_json, load_bundle, load_delta, sign, to_json
from ringfence.enums import Mode
from ringfence_agent.backends import ApplyError, DropTuple, ElementChange, Observation
from ringfence_agent.backends.iptables import IptablesRenderer
from ringfence_agent.backends.nft import NftRenderer
from ringfence_agent.backends.windows import WindowsPlanBackend
from ringfence_agent.config import ConfigError, load_config
from ringfence_agent.core import Agent, Rejected, effective_bundle
from ringfence_agent.daemon import backoff_delay
from ringfence_agent.plan import (
    GroupChange,
    LocalFailsafes,
    Match,
    Plan,
    PlanError,
    PlanSet,
    compile_plan,
    group_changes,
    group_load,
    joined_ports,
    service_covers,
    span_entries,
)
from ringfence_agent.reports import (
    BoundedBuffer,
    DropCollector,
    Spool,
    drop_key,
    make_batches,
    parse_conntrack,
    summarize_flows,
)
from ringfence_agent.state import StateDir
from tests.agent.bundles import GOLDEN, PUBLIC_KEY, forge, key, resign
from tests.conftest import rule_parts

PROC = GOLDEN / "bundle-ord-prod-proc-1.json"
PROC2 = GOLDEN / "bundle-ord-prod-proc-1-after-scale-out.json"
DELTA = GOLDEN / "delta-ord-prod-proc-1-scale-out.json"
OBSERVE = GOLDEN / "bundle-pay-dev-web-1-observe.json"
QUARANTINED = GOLDEN / "bundle-ord-prod-web-1-quarantined.json"
LOCAL = LocalFailsafes(admin_cidrs=("192.0.2.0/24",), dns_resolvers=("10.0.0.53",), control_plane=("198.51.100.7",))


def set_of(path: Path, rule_id: str, direction: str = "inbound") -> str:
    """The name of the set a golden bundle's rule uses (names are content hashes: look them up)."""
    doc = json.loads(path.read_text())
    return next(r["set"] for r in rule_parts(doc[direction]) if r["id"] == rule_id)


# the golden bundle's sets, by the rule that uses them
BOUNDARY = set_of(PROC, "boundaries/dev-never-reaches-prod")
WEB = set_of(PROC, "ordering/web-to-processing")
DB = set_of(PROC, "ordering/processing-to-database", "outbound")


def golden(path: Path) -> Bundle:
    return load_bundle(path.read_bytes())


class FakeBackend:
    name = "fake"

    def __init__(self) -> None:
        self.applied: list[object] = []
        self.deltas: list[ElementChange] = []
        self.fail = False

    def render(self, plan: object) -> str:
        return ""

    def apply(self, plan: object) -> None:
        if self.fail:
            raise ApplyError("boom")
        self.applied.append(plan)

    def render_delta(self, change: ElementChange) -> str:
        return ""

    def apply_delta(self, change: ElementChange) -> None:
        if self.fail:
            raise ApplyError("boom")
        self.deltas.append(change)

    def flush(self) -> bool:
        return True

    def observe(self, plan: object, previous: dict[str, int]) -> Observation:
        return Observation()


def make_agent(tmp_path: Path, wid: str | None = "ord-prod-proc-1") -> tuple[Agent, FakeBackend]:
    backend = FakeBackend()
    agent = Agent(wid, Verifier.from_file(PUBLIC_KEY), backend, StateDir(tmp_path / "state"), LOCAL, log=lambda m: None)
    return agent, backend


# --- plan and rendering --------------------------------------------------------------------------


def test_plan_merges_failsafes_and_keeps_bundle_order() -> None:
    plan = compile_plan(golden(PROC), LOCAL)
    fs = plan.failsafes
    assert fs.admin_v4 == ("10.99.0.0/24", "192.0.2.0/24")
    assert fs.dns_v4 == ("10.0.0.2/32", "10.0.0.53/32")
    assert fs.control_v4 == ("198.51.100.7/32",)
    assert fs.metadata_v4 == ("169.254.169.254/32",) and fs.metadata_v6 == ("fd00:ec2::254/128",)
    assert [r.rule_id for r in plan.by_direction("inbound")] == [r.id for r in golden(PROC).inbound]
    assert plan.rules[0].action == "override-deny" and plan.rules[0].counter == "r_in_0"


def test_nft_text_failsafes_first_rules_in_order_default_last() -> None:
    text = NftRenderer().render(compile_plan(golden(PROC), LOCAL))
    assert text.startswith("table inet ringfence\ndelete table inet ringfence\ntable inet ringfence {")
    chain = text.split("chain input {", 1)[1].split("}\n\tchain output", 1)[0]
    lines = [line.strip() for line in chain.strip().splitlines()]
    # the loopback fail-safe admits this host's own sources only (review r9: forwarded into lo)
    assert lines[1] == 'iif "lo" fib saddr type local accept comment "failsafe loopback"'
    assert lines[2].startswith("ct state established,related accept")
    first_rule = next(i for i, line in enumerate(lines) if "counter name r_in_" in line)
    last_failsafe = max(i for i, line in enumerate(lines) if "failsafe" in line)
    assert last_failsafe < first_rule
    order = [int(line.split("counter name r_in_")[1].split()[0]) for line in lines if "counter name r_in_" in line]
    assert order == sorted(order)
    assert lines[-1] == 'counter name d_in drop comment "default enforce"'
    # a drop rule records its tuple in a rule of its own, just before the verdict
    track = "update @t_r_in_0_4 { ip saddr . ip daddr . meta l4proto . th sport . th dport }"
    for s in (f"s_{BOUNDARY}_4h", f"s_{BOUNDARY}_4"):
        i = lines.index(f"ip saddr @{s} {track}")
        assert lines[i + 1] == f'ip saddr @{s} counter name r_in_0 drop comment "boundaries/dev-never-reaches-prod"'
    assert "counter name r_in_0 update" not in text
    # single addresses in hash sets (fast deltas), prefixes in interval sets
    assert f"set s_{WEB}_4 {{ type ipv4_addr; flags interval; elements = {{ 10.1.1.10/31 }} }}" in text
    assert f"set s_{DB}_6h {{ type ipv6_addr; elements = {{ fd00:1::3:10 }} }}" in text
    assert f"ip6 saddr @s_{DB}_6" not in text  # outbound uses daddr
    assert f"ip6 daddr @s_{DB}_6 tcp dport 5432 counter name r_out_1 accept" in text
    assert "ip saddr @fs_admin_4 tcp dport 22 accept" in text
    assert "ip daddr @fs_cp_4 tcp dport 443 meta skuid 0 accept" in text  # the control plane's port only, root only
    # the metadata endpoint: its service ports only (the lab proves another port is dropped)
    meta = [line for line in text.splitlines() if "@fs_meta_4" in line]
    assert [m.split("@fs_meta_4 ")[1].split(" accept")[0] for m in meta] == [
        "tcp dport 80",
        "udp dport 53",
        "tcp dport 53",
        "udp dport 123",
    ]
    assert "elements = { 10.99.0.0/24, 192.0.2.0/24 }" in text


def test_nft_observe_accepts_but_counts_and_idle_removes_table() -> None:
    plan = compile_plan(golden(OBSERVE), LOCAL)
    text = NftRenderer().render(plan)
    assert " drop" not in text.replace("would-drop", "")
    assert 'counter name d_in accept comment "default observe"' in text
    idle = compile_plan(replace(golden(OBSERVE), mode=Mode.IDLE), LOCAL)
    assert NftRenderer().render(idle) == "table inet ringfence\ndelete table inet ringfence\n"


def test_nft_quarantine_keeps_only_failsafes() -> None:
    plan = compile_plan(golden(QUARANTINED), LOCAL)
    assert plan.rules == [] and plan.mode == "enforce"
    text = NftRenderer().render(plan)
    assert "counter name r_" not in text and "counter name d_in drop" in text and "@fs_admin_4" in text


def test_nft_delta_deletes_before_adds() -> None:
    change = ElementChange("rf_x", add_v4=("10.0.0.4/31",), remove_v4=("10.0.0.4/32",), add_v6=("fd00::1/128",))
    text = NftRenderer.render_delta(change)
    assert text.splitlines() == [
        "delete element inet ringfence s_rf_x_4h { 10.0.0.4 }",
        "add element inet ringfence s_rf_x_4 { 10.0.0.4/31 }",
        "add element inet ringfence s_rf_x_6h { fd00::1 }",
    ]


@pytest.mark.parametrize(
    ("field", "value", "message"),
    [
        ("sets", {'rf_x"; flush ruleset; "': {"version": 1, "v4": [], "v6": []}}, "set name"),
        ("sets", {"rf_x": {"version": 1, "v4": ["10.0.0.1/33"], "v6": []}}, "not a CIDR"),
        ("sets", {"rf_x": {"version": 1, "v4": ["fd00::/64"], "v6": []}}, "mixed up"),
    ],
)
def test_plan_refuses_unsafe_names_and_addresses(field: str, value: object, message: str) -> None:
    doc = bundle_from_json({**to_json(golden(PROC)), "inbound": [], "outbound": [], field: value})
    with pytest.raises(PlanError, match=message):
        compile_plan(doc, LOCAL)


def test_rule_ids_are_sanitised_in_comments() -> None:
    doc = golden(PROC)
    rule = replace(doc.inbound[1], id='evil" ; flush ruleset ; "')
    doc = replace(doc, inbound=[rule])
    text = NftRenderer().render(compile_plan(doc, LOCAL))
    assert "flush ruleset" in text and '"evil_ _ flush ruleset _ _"' in text


def test_iptables_text_mirrors_the_plan() -> None:
    r = IptablesRenderer()
    plan = compile_plan(golden(PROC), LOCAL)
    sets = r.sets_script(plan, "a")
    assert f"create rf-s-{WEB}-4a hash:net family inet" in sets
    assert f"add rf-s-{WEB}-4a 10.1.1.10/31" in sets
    v4 = r.rules_script(plan, 4, "a", ["INPUT"])
    assert "-I INPUT 1 -j RF-IN" in v4 and "-I OUTPUT" not in v4
    lines = v4.splitlines()
    admin = lines.index("-A RF-IN -p tcp --dport 22 -m set --match-set rf-fs-admin-4a src -j ACCEPT")
    deny = next(i for i, line in enumerate(lines) if "r_in_0 boundaries/dev-never-reaches-prod" in line)
    assert admin < deny and lines[deny].endswith("-j DROP")
    assert lines[-2] == '-A RF-OUT -m comment --comment "d_out default enforce" -j DROP'
    v6 = r.rules_script(plan, 6, "a", [])
    assert "icmp-type" not in v6 and "neighbour-solicitation" in v6
    # every drop point feeds a (src, dport, dst) set, then a (src, sport, dst) set, then decides
    i = lines.index("-A RF-OUT -j SET --add-set rf-t-d_out-4a src,dst,dst --exist")
    assert lines[i + 1] == "-A RF-OUT -j SET --add-set rf-ts-d_out-4a src,src,dst --exist"
    assert lines[deny - 2].endswith("-j SET --add-set rf-t-r_in_0-4a src,dst,dst --exist")
    assert lines[deny - 1].endswith("-j SET --add-set rf-ts-r_in_0-4a src,src,dst --exist")
    assert "create rf-ts-r_in_0-6a hash:ip,port,ip family inet6 timeout 60 maxelem 1024 -exist" in sets


def test_iptables_splits_zero_prefix_for_ipset() -> None:
    doc = golden(PROC)
    sets = dict(doc.sets)
    sets[WEB] = replace(sets[WEB], v4=["0.0.0.0/0"])
    script = IptablesRenderer().sets_script(compile_plan(replace(doc, sets=sets), LOCAL), "b")
    assert f"add rf-s-{WEB}-4b 0.0.0.0/1" in script and f"add rf-s-{WEB}-4b 128.0.0.0/1" in script


def test_windows_plan_content() -> None:
    out = io.StringIO()
    WindowsPlanBackend(out).apply(compile_plan(golden(PROC), LOCAL))
    text = out.getvalue()
    assert "Get-NetFirewallRule -Group 'Ringfence' -ErrorAction SilentlyContinue | Remove-NetFirewallRule" in text
    assert (
        "-DisplayName 'failsafe admin' -Direction Inbound -Action Allow -Profile Any -RemoteAddress '10.99.0.0/24','192.0.2.0/24' -Protocol TCP -LocalPort 22"
        in text
    )
    # the dev-prod boundary's sources: dev, and ord-prod-web-9 (env typo: a missing env counts as dev)
    assert "-Direction Inbound -Action Block -Profile Any -RemoteAddress '10.1.1.19/32','10.2.0.10/32'" in text
    assert "-DisplayName 'ordering/web-to-processing (tcp/8443)' -Direction Inbound -Action Allow" in text
    assert (
        "-Direction Outbound -Action Allow -Profile Any -RemoteAddress '10.1.3.10/32','fd00:1::3:10/128' -Protocol TCP -RemotePort 5432"
        in text
    )
    assert text.rstrip().endswith("-DefaultInboundAction Block -DefaultOutboundAction Block -LogBlocked True")
    observe = io.StringIO()
    WindowsPlanBackend(observe).apply(compile_plan(golden(OBSERVE), LOCAL))
    assert "-DefaultInboundAction Allow" in observe.getvalue() and "Action Block" not in observe.getvalue()


def test_windows_plan_refuses_block_over_admin_range() -> None:
    local = LocalFailsafes(admin_cidrs=("10.2.0.0/16",))
    with pytest.raises(PlanError, match="lock the operator out"):
        WindowsPlanBackend(io.StringIO()).render(compile_plan(golden(PROC), local))


# --- acceptance ----------------------------------------------------------------------------------


def test_apply_then_delta_then_equivalent_bundle(tmp_path: Path) -> None:
    agent, backend = make_agent(tmp_path)
    assert agent.apply_bundle(golden(PROC)).changed
    res = agent.apply_delta(load_delta(DELTA.read_bytes()))
    assert res.changed and backend.deltas == [ElementChange(WEB, add_v4=("10.1.1.12/32",))]
    assert agent.revision == 2
    # the engine's whole bundle at revision 2 equals bundle 1 + delta
    assert effective_bundle(golden(PROC), [load_delta(DELTA.read_bytes())]).content() == golden(PROC2).content()
    assert not agent.apply_bundle(golden(PROC2)).changed
    assert len(backend.applied) == 1
    assert agent.state.load_deltas() == [] and agent.state.load_bundle() == golden(PROC2)


@pytest.mark.parametrize(
    ("doc", "reason"),
    [
        (lambda: forge(golden(PROC2), version=9), "signature does not verify"),
        (lambda: resign(golden(PROC2), workload_id="ord-prod-db-1"), "this agent is 'ord-prod-proc-1'"),
        (lambda: resign(golden(PROC2), version=1), "rollback refused"),
        (lambda: resign(golden(PROC2), version=2), "replay refused"),  # same version, other content
        (lambda: replace(golden(PROC2), signature=None), "not signed"),
    ],
)
def test_refused_bundles_leave_state_untouched(tmp_path: Path, doc: object, reason: str) -> None:
    agent, backend = make_agent(tmp_path)
    agent.apply_bundle(resign(golden(PROC), version=2))
    before = (agent.state.bundle_path.read_bytes(), len(backend.applied))
    with pytest.raises(Rejected, match=reason):
        agent.apply_bundle(doc())  # type: ignore[operator]
    assert (agent.state.bundle_path.read_bytes(), len(backend.applied)) == before
    assert agent.state.read_json("status.json")["counters"]["rejected"] == 1


def test_bundle_from_another_key_is_refused(tmp_path: Path) -> None:
    from ringfence.bundle import SigningKey

    agent, _ = make_agent(tmp_path)
    with pytest.raises(Rejected, match="not a pinned key"):
        agent.apply_bundle(sign(golden(PROC), SigningKey.generate()))


def test_delta_acceptance(tmp_path: Path) -> None:
    agent, backend = make_agent(tmp_path)
    delta = load_delta(DELTA.read_bytes())
    with pytest.raises(Rejected, match="no bundle applied"):
        agent.apply_delta(delta)
    agent.apply_bundle(golden(PROC))
    with pytest.raises(Rejected, match="signature"):
        agent.apply_delta(replace(delta, add=["10.6.6.6/32"]))
    with pytest.raises(Rejected, match="not in the applied bundle"):
        agent.apply_delta(sign(replace(delta, set="rf_0000000000000000"), key()))
    with pytest.raises(Rejected, match="fetch the whole bundle"):
        agent.apply_delta(sign(replace(delta, from_version=5, to_version=6), key()))
    with pytest.raises(Rejected, match="absent"):
        agent.apply_delta(sign(replace(delta, remove=["10.9.9.9/32"]), key()))
    assert backend.deltas == []
    agent.apply_delta(delta)
    assert not agent.apply_delta(delta).changed  # replay: already applied


def test_failed_backend_apply_keeps_previous_state(tmp_path: Path) -> None:
    agent, backend = make_agent(tmp_path)
    agent.apply_bundle(golden(PROC))
    backend.fail = True
    with pytest.raises(ApplyError):
        agent.apply_bundle(golden(PROC2))
    assert agent.state.load_bundle() == golden(PROC) and agent.revision == 1
    assert agent.state.read_json("status.json")["counters"]["apply_failures"] == 1


def test_last_known_good_is_reverified_and_reapplied(tmp_path: Path) -> None:
    agent, _ = make_agent(tmp_path)
    agent.apply_bundle(golden(PROC))
    agent.apply_delta(load_delta(DELTA.read_bytes()))
    again, backend = make_agent(tmp_path)
    res = again.reapply_last_known_good()
    assert res.changed and again.revision == 2
    assert backend.applied[0].sets[WEB].v4 == ("10.1.1.10/31", "10.1.1.12/32")  # type: ignore[attr-defined]
    # a tampered state file is refused, not applied
    state = json.loads(again.state.bundle_path.read_text())
    state["mode"] = "idle"
    again.state.bundle_path.write_text(json.dumps(state))
    third, backend3 = make_agent(tmp_path)
    with pytest.raises(Rejected, match="unusable"):
        third.reapply_last_known_good()
    assert backend3.applied == []


def test_a_last_known_good_the_kernel_refuses_at_boot_leaves_the_failsafe_posture_not_an_open_host(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """The kernel refuses the re-apply at start (a transient error, a lock held) and the control
    plane is out of reach: the daemon holds the fail-safe posture instead of leaving the host as
    it booted, keeps the file for the next start, and the next start re-applies it."""
    from ringfence_agent.config import AgentConfig
    from ringfence_agent.daemon import Daemon

    agent, _ = make_agent(tmp_path)
    agent.apply_bundle(golden(PROC))
    cfg = AgentConfig(
        workload_id="ord-prod-proc-1",
        public_key=PUBLIC_KEY,
        state_dir=tmp_path / "state",
        backend="dry-run",
        source="http://127.0.0.1:9",
        admin_cidrs=["192.0.2.0/24"],
    )

    class RefusesOnce(FakeBackend):
        def apply(self, plan: object) -> None:
            try:
                super().apply(plan)
            finally:
                self.fail = False

    refused_once = RefusesOnce()
    refused_once.fail = True  # the first apply: the last known good
    daemon = Daemon(cfg)
    daemon.agent.backend = refused_once
    daemon.start_enforcing()
    err = capsys.readouterr().err
    assert "boom" in err and "holding the fail-safe posture" in err, err
    held = refused_once.applied[-1]
    assert len(refused_once.applied) == 1 and held.version == 0 and held.failsafes.admin_v4 == ("192.0.2.0/24",)  # type: ignore[attr-defined]
    assert daemon.agent.bundle is None, "nothing held in memory: the next fetch is the whole bundle"
    assert StateDir(tmp_path / "state").read_json("status.json")["posture"] == "failsafe"
    assert StateDir(tmp_path / "state").load_bundle() == golden(PROC), "kept for the next start"
    again, backend = make_agent(tmp_path)
    assert again.reapply_last_known_good().changed and backend.applied[0].version == golden(PROC).version  # type: ignore[attr-defined]


def test_first_bundle_pins_identity(tmp_path: Path) -> None:
    agent, _ = make_agent(tmp_path, wid=None)
    agent.apply_bundle(golden(PROC))
    assert agent.state.identity() == "ord-prod-proc-1"
    again, _ = make_agent(tmp_path, wid=None)
    with pytest.raises(Rejected, match="this agent is 'ord-prod-proc-1'"):
        again.apply_bundle(golden(GOLDEN / "bundle-ord-prod-db-1.json"))


# --- config --------------------------------------------------------------------------------------


def test_config_valid_yaml(tmp_path: Path) -> None:
    p = tmp_path / "agent.yaml"
    p.write_text(
        "workload_id: w1\npublic_key: key.pem\nstate_dir: st\nsource: /srv/rf\n"
        "admin_cidrs: [10.0.0.0/8]\ndns_resolvers: [10.0.0.2]\napi_url: null\n"
    )
    cfg = load_config(p)
    assert cfg.public_key == tmp_path / "key.pem" and cfg.state_dir == tmp_path / "st"
    assert cfg.local_failsafes().admin_cidrs == ("10.0.0.0/8",)


def test_config_pairing_key_file_is_relative_to_the_config_file(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    (tmp_path / "etc").mkdir()
    (tmp_path / "etc" / "pairing.key").write_text("k-123\n")
    p = tmp_path / "etc" / "agent.yaml"
    p.write_text(
        "workload_id: w1\npublic_key: key.pem\napi_url: https://rf.example.com\nenroll: {pairing_key_file: pairing.key}\n"
    )
    monkeypatch.chdir("/")  # as under systemd
    cfg = load_config(p)
    assert cfg.enroll is not None and cfg.enroll.pairing_key_file == tmp_path / "etc" / "pairing.key"
    assert cfg.enroll.key() == "k-123"


def test_config_api_url_ip_is_a_failsafe(tmp_path: Path) -> None:
    p = tmp_path / "agent.json"
    p.write_text(
        json.dumps(
            {
                "workload_id": "w1",
                "public_key": "/k",
                "api_url": "https://10.9.8.7:8080/",
                "enroll": {"pairing_key": "k"},
            }
        )
    )
    cfg = load_config(p)
    assert cfg.api_url == "https://10.9.8.7:8080" and "10.9.8.7" in cfg.local_failsafes().control_plane
    assert cfg.local_failsafes().control_ports == ("tcp/8080",)  # the control plane's port, not every port


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("workload_id: w1\npublic_key: k\n", "exactly one of api_url"),
        ("workload_id: w1\npublic_key: k\nsource: /x\nadmin_cidrs: [10.0.0.1/8]\n", "admin_cidrs: .*host bits set"),
        ("workload_id: w1\npublic_key: k\nsource: /x\nadmin_ports: [ssh]\n", "tcp/22"),
        ("workload_id: w1\npublic_key: k\nsource: /x\nbackend: pf\n", "backend"),
        ("workload_id: w1\npublic_key: k\nsource: /x\nmystery: 1\n", "mystery"),
        ("workload_id: w1\npublic_key: k\napi_url: ftp://x\n", "http"),
        ("workload_id: w1\npublic_key: k\napi_url: https://x\n", "enroll section"),
        ("- a\n- b\n", "mapping"),
        ("workload_id: [\n", "not valid YAML"),
        ("public_key: k\nsource: /x\n", "workload_id: Field required"),
        (
            "workload_id: w1\npublic_key: k\nsource: /x\npoll_interval: soon\n",
            "poll_interval: Input should be a number",
        ),
        (
            "workload_id: w1\npublic_key: k\nsource: /x\nwait_timeout: 301\n",
            "wait_timeout: .*less than or equal to 300",
        ),
        ("workload_id: w1\npublic_key: k\nsource: /x\nmax_buffered_records: 5\n", "greater than or equal to 10"),
        ("workload_id: w1\npublic_key: k\nsource: /x\ndhcp: 1\n", "dhcp: Input should be true or false"),
        ("workload_id: w1\npublic_key: k\nsource: /x\ndns_resolvers: 10.0.0.2\n", "dns_resolvers: .*list of strings"),
        ("workload_id: w1\npublic_key: k\napi_url: https://x\nenroll: {method: pairing}\n", "needs pairing_key"),
        ("workload_id: w1\npublic_key: k\napi_url: https://x\nenroll: {pairing_key: k, x: 1}\n", "enroll.x: Extra"),
        ("workload_id: w1\npublic_key: k\napi_url: https://x\nenroll: {method: tpm}\n", "enroll.method"),
        ("workload_id: w1\npublic_key: k\nsource: /x\nboot_posture: closed\n", "boot_posture: .*'failsafe' or 'open'"),
        (
            "workload_id: w1\npublic_key: k\nsource: /x\ndrift_interval: -1\n",
            "drift_interval: .*greater than or equal to 0",
        ),
        ("workload_id: w1\npublic_key: k\nsource: /x\ncut_revoked_connections: maybe\n", "cut_revoked_connections"),
    ],
)
def test_config_errors_are_clear(tmp_path: Path, text: str, message: str) -> None:
    p = tmp_path / "agent.yaml"
    p.write_text(text)
    with pytest.raises(ConfigError, match=message):
        load_config(p)


def test_config_checks_every_setting_and_validates_when_built_in_code() -> None:
    import dataclasses

    from ringfence_agent import config

    fields = {f.name for f in dataclasses.fields(config.AgentConfig)}
    assert fields - {"enroll"} == set(config._CONFIG_TYPES)
    assert set(config._RANGES) <= fields
    assert {f.name for f in dataclasses.fields(config.Enrollment)} == set(config._ENROLLMENT_TYPES)
    with pytest.raises(ValueError, match="observe_interval"):
        config.AgentConfig(workload_id="w", public_key=PUBLIC_KEY, source="/x", observe_interval=0.1)
    cfg = config.AgentConfig(workload_id="w", public_key=str(PUBLIC_KEY), source="/x", poll_interval=5)  # type: ignore[arg-type]
    assert cfg.public_key == PUBLIC_KEY and cfg.poll_interval == 5.0 and isinstance(cfg.poll_interval, float)


# --- reports -------------------------------------------------------------------------------------


def _drop(i: int, count: int = 1) -> DropEvent:
    return DropEvent(
        time=1.0,
        direction="inbound",
        src=f"10.0.0.{i}",
        dst="10.0.1.1",
        proto="tcp",
        dport=22,
        action="drop",
        count=count,
    )


def test_bounded_buffer_folds_and_discards_oldest() -> None:
    buf: BoundedBuffer[DropEvent] = BoundedBuffer(3)
    for i in range(5):
        buf.add(drop_key(_drop(i)), _drop(i))
    buf.add(drop_key(_drop(4)), _drop(4, 2))
    assert len(buf) == 3 and buf.discarded == 2
    taken = buf.take(10)
    assert [e.src for e in taken] == ["10.0.0.2", "10.0.0.3", "10.0.0.4"] and taken[-1].count == 3


def test_folding_keeps_a_source_port_only_when_every_drop_had_it() -> None:
    buf: BoundedBuffer[DropEvent] = BoundedBuffer(10)
    one = replace(_drop(1), sport=40000)
    buf.add(drop_key(one), one)
    buf.add(drop_key(one), one)  # the same connection's retransmission
    retry = replace(one, sport=40001)  # a new attempt, a new ephemeral port
    (e,) = buf.take(10)
    assert (e.sport, e.count) == (40000, 2)
    buf.add(drop_key(one), one)
    buf.add(drop_key(retry), retry)
    (e,) = buf.take(10)
    assert (e.sport, e.count) == (None, 2)  # still one event: reports stay bounded by destinations


def test_spool_is_capped_on_disk(tmp_path: Path) -> None:
    spool = Spool(tmp_path / "spool.jsonl", 4096)
    for i in range(100):
        spool.append(ReportBatch(drops=[_drop(i % 250)]))
    assert (tmp_path / "spool.jsonl").stat().st_size <= 4096
    assert spool.discarded > 0
    kept = spool.pop_all()
    assert 0 < len(kept) < 100 and kept[-1].drops[0].src == "10.0.0.99"


def test_batches_respect_api_limits() -> None:
    drops = [_drop(i % 250) for i in range(1200)]
    batches = make_batches(drops, [], 7)
    assert [len(b.drops) for b in batches] == [500, 500, 200] and batches[0].dropped_records == 7
    assert all(len(b.dumps()) < 256 * 1024 for b in batches)


def test_drop_collector_reports_only_new_packets() -> None:
    plan = compile_plan(golden(PROC), LOCAL)
    col = DropCollector()
    obs = Observation({"r_in_0": 3}, [DropTuple("r_in_0", "10.2.1.10", "10.1.2.10", "tcp", 8443, 3)])
    (e,) = col.events(plan, obs, now=5.0)
    assert (e.rule_id, e.direction, e.count, e.action, e.dport) == (
        "boundaries/dev-never-reaches-prod",
        "inbound",
        3,
        "drop",
        8443,
    )
    obs2 = Observation(
        {"r_in_0": 5, "d_out": 1},
        [
            DropTuple("r_in_0", "10.2.1.10", "10.1.2.10", "tcp", 8443, 5),
            DropTuple("d_out", "10.1.2.10", "8.8.8.8", "udp", 53, 1),
        ],
    )
    events = col.events(plan, obs2, now=6.0)
    assert [(x.rule_id, x.count) for x in events] == [("boundaries/dev-never-reaches-prod", 2), (None, 1)]
    observe = compile_plan(golden(OBSERVE), LOCAL)
    (w,) = DropCollector().events(observe, Observation({}, [DropTuple("d_in", "1.2.3.4", "10.2.10.10", "udp", 9, 1)]))
    assert w.action == "would-drop" and w.rule_id is None


def test_drop_collector_carries_source_ports_and_skipped_points() -> None:
    plan = compile_plan(golden(PROC), LOCAL)
    col = DropCollector(linger=60)
    first = DropTuple("r_in_0", "10.2.1.10", "10.1.2.10", "tcp", 8443, 1, sport=40000)
    (e,) = col.events(plan, Observation({"r_in_0": 1}, [first]), now=0.0)
    assert (e.sport, e.dport, e.count) == (40000, 8443, 1)
    # r_in_0 did not move: the backend skips listing it, and nothing is reported
    assert col.events(plan, Observation({"r_in_0": 1, "d_in": 1}, []), now=10.0) == []
    # it moves again: listed with the old element still in it; only the new attempt is reported
    second = DropTuple("r_in_0", "10.2.1.10", "10.1.2.10", "tcp", 8443, 1, sport=40001)
    (e,) = col.events(plan, Observation({"r_in_0": 2, "d_in": 1}, [first, second]), now=20.0)
    assert (e.sport, e.count) == (40001, 1)
    # once the kernel has let an element expire, the same tuple coming back is new
    col.events(plan, Observation({"r_in_0": 2, "d_in": 2}, []), now=100.0)
    (e,) = col.events(plan, Observation({"r_in_0": 3, "d_in": 2}, [first]), now=110.0)
    assert (e.sport, e.count) == (40000, 1)


def test_parse_conntrack_proc_format() -> None:
    lines = [
        "ipv4     2 tcp      6 431999 ESTABLISHED src=10.77.0.1 dst=10.77.0.2 sport=40000 dport=8080 packets=5 bytes=300 "
        "src=10.77.0.2 dst=10.77.0.1 sport=8080 dport=40000 packets=4 bytes=250 [ASSURED] mark=0 zone=0 use=2",
        "ipv6     10 udp      17 29 src=fd77::2 dst=fd77::3 sport=5000 dport=5353 src=fd77::3 dst=fd77::2 sport=5353 dport=5000 mark=0 use=2",
        "ipv4     2 tcp      6 10 CLOSE src=127.0.0.1 dst=127.0.0.1 sport=1 dport=2 src=127.0.0.1 dst=127.0.0.1 sport=2 dport=1 use=1",
    ]
    flows = parse_conntrack(lines, {"10.77.0.2", "fd77::2"}, now=1.0)
    assert [(f.direction, f.src, f.dst, f.proto, f.dport, f.packets, f.bytes) for f in flows] == [
        ("inbound", "10.77.0.1", "10.77.0.2", "tcp", 8080, 9, 550),
        ("outbound", "fd77::2", "fd77::3", "udp", 5353, 0, 0),
    ]
    assert isinstance(flows[0], FlowRecord)
    again = replace(flows[0], sport=40001, packets=1, bytes=60, start=0.5, end=3.0)
    (summary, _) = summarize_flows([flows[0], again, flows[1]])
    assert (summary.sport, summary.packets, summary.bytes, summary.start, summary.end) == (None, 10, 610, 0.5, 3.0)


def test_backoff_has_jitter_and_cap() -> None:
    import random

    rng = random.Random(1)
    delays = [backoff_delay(n, 60, rng) for n in range(1, 12)]
    assert all(d <= 60 for d in delays) and delays[-1] >= 30 and len(set(delays)) == len(delays)


def test_state_writes_are_atomic_files(tmp_path: Path) -> None:
    st = StateDir(tmp_path / "s")
    st.save_applied(golden(PROC), [load_delta(DELTA.read_bytes())])
    assert st.load_bundle() == golden(PROC) and len(st.load_deltas()) == 1
    assert sorted(p.name for p in (tmp_path / "s").iterdir()) == ["bundle.json", "deltas.jsonl"]
    assert oct((tmp_path / "s" / "bundle.json").stat().st_mode & 0o777) == "0o600"
    assert isinstance(st.load_deltas()[0], SetDelta)


@pytest.mark.parametrize(
    "text",
    [
        "10.0.0.0/8",
        "10.0.0.1",
        "010.0.0.1/32",
        "10.0.0.1/8",
        "fd00::1/128",
        "FD00::1/128",
        "fd00:0::1/128",
        "::ffff:1.2.3.4/128",
        "10.0.0.0/33",
        "1.2.3.4/0032",
        "1.2.3.4/",
        "fd00::/200",
        "x",
    ],
)
def test_fast_cidr_path_agrees_with_ipaddress(text: str) -> None:
    import ipaddress

    from ringfence_agent.plan import split_cidrs

    try:
        net = ipaddress.ip_network(text, strict=True)
    except ValueError:
        with pytest.raises(PlanError):
            split_cidrs([text], "x")
        return
    v4, v6 = split_cidrs([text], "x")
    assert (v4 or v6) == (str(net),)


def test_packaging_unit_and_installer_agree() -> None:
    pkg = Path(__file__).resolve().parents[2] / "agent" / "packaging"
    unit = (pkg / "ringfence-agent.service").read_text()
    installer = (pkg / "install.sh").read_text()
    embedded = installer.split("cat > /etc/systemd/system/ringfence-agent.service <<'UNIT'\n", 1)[1].split("UNIT\n", 1)[
        0
    ]
    assert embedded == unit
    assert "Before=network-pre.target" in unit and "ringfence-agent run --config /etc/ringfence/agent.json" in unit
    assert "--artifact-sha256" in (pkg / "cloud-init.yaml").read_text()
    proc = subprocess.run(["sh", "-n", str(pkg / "install.sh")], capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr


def test_installer_writes_a_config_the_agent_accepts(tmp_path: Path) -> None:
    """Run the config-writing part of install.sh against a temp dir and validate it."""
    installer = (Path(__file__).resolve().parents[2] / "agent" / "packaging" / "install.sh").read_text()
    block = installer.split("umask 077\n", 1)[1].split("} > /etc/ringfence/agent.json", 1)[0] + "}"
    script = (
        'WORKLOAD_ID=\'i-0abc"\\\'; API_URL=https://10.0.0.9:8080; SOURCE=""; ADMIN_CIDRS=" 10.99.0.0/24 192.0.2.0/24"\n'
        + block
        + f" > {tmp_path}/agent.json\n"
    )
    subprocess.run(["sh", "-c", "PAIRING_KEY=k\n" + script], check=True)
    cfg = load_config(tmp_path / "agent.json")
    assert cfg.workload_id == 'i-0abc"\\' and cfg.admin_cidrs == ["10.99.0.0/24", "192.0.2.0/24"]
    assert cfg.enroll is not None and str(cfg.enroll.pairing_key_file) == "/etc/ringfence/pairing-key"
    subprocess.run(["sh", "-c", 'PAIRING_KEY=""\n' + script], check=True)
    cfg = load_config(tmp_path / "agent.json")
    assert cfg.enroll is not None and cfg.enroll.method == "aws-iid"


INSTALLER = Path(__file__).resolve().parents[2] / "agent" / "packaging" / "install.sh"


def test_attack_installer_refuses_a_pairing_key_on_the_command_line(tmp_path: Path) -> None:
    """A key given as an argument is in every user's ``ps`` and in shell history: refused before
    anything is installed (no --api-url either, so a broken refusal still stops before work)."""
    for argv, env in (
        (["--pairing-key", "s3cret-key"], {}),
        (["--pairing-key=s3cret-key"], {}),
        ([], {"RF_PAIRING_KEY": "s3cret-key"}),
    ):
        run = subprocess.run(
            ["sh", str(INSTALLER), "--source", str(tmp_path), *argv],
            capture_output=True,
            text=True,
            env={"PATH": "/usr/bin:/bin", **env},
            stdin=subprocess.DEVNULL,
        )
        assert run.returncode == 2, (argv, run.stderr)
        assert "refused" in run.stderr and "--pairing-key-file" in run.stderr, run.stderr
        assert "s3cret-key" not in run.stderr, "nor is the key echoed back"


def test_installer_reads_the_pairing_key_from_a_file_or_stdin(tmp_path: Path) -> None:
    """The installer's pairing-key block, run as the installer runs it: the key from a file or
    from standard input (``-``), whitespace trimmed; a missing or empty file is an error."""
    text = INSTALLER.read_text()
    block = text.split("# --- pairing key", 1)[1].split("# --- end pairing key", 1)[0]
    script = block + 'printf "%s" "$PAIRING_KEY"\n'

    def run(key_file: str, stdin: str = "") -> subprocess.CompletedProcess[str]:
        return subprocess.run(
            ["sh", "-c", f"set -eu\nPAIRING_KEY=''\nPAIRING_KEY_FILE='{key_file}'\n" + script],
            input=stdin,
            capture_output=True,
            text=True,
            env={"PATH": "/usr/bin:/bin"},
        )

    (tmp_path / "key").write_text("pk-abc_123\n")
    assert run(str(tmp_path / "key")).stdout == "pk-abc_123"
    assert run("-", "pk-from-stdin\n").stdout == "pk-from-stdin"
    missing = run(str(tmp_path / "nope"))
    assert missing.returncode == 2 and "cannot read" in missing.stderr
    (tmp_path / "empty").write_text("\n")
    empty = run(str(tmp_path / "empty"))
    assert empty.returncode == 2 and "no key" in empty.stderr
    assert run("").stdout == "", "no file: no key (the agent enrolls with its cloud identity)"


def test_daemon_once_with_static_dir_and_dry_run(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    from ringfence.staticlayout import Head
    from ringfence_agent.config import AgentConfig
    from ringfence_agent.daemon import Daemon

    src = tmp_path / "src"
    for d in ("bundles", "heads", f"deltas/{WEB}"):
        (src / d).mkdir(parents=True)
    (src / "bundles" / "ord-prod-proc-1.json").write_bytes(PROC.read_bytes())
    (src / "deltas" / WEB / "1.json").write_bytes(DELTA.read_bytes())  # the delta leaving version 1
    sets = {name: s.version for name, s in golden(PROC).sets.items()} | {WEB: 2}
    (src / "heads" / "ord-prod-proc-1.json").write_text(Head("ord-prod-proc-1", 2, 1, sets).dumps())
    cfg = AgentConfig(
        workload_id="ord-prod-proc-1",
        public_key=PUBLIC_KEY,
        state_dir=tmp_path / "state",
        backend="dry-run",
        source=str(src),
    )
    assert Daemon(cfg).run(once=True) == 0
    status = StateDir(tmp_path / "state")
    assert status.load_bundle() == golden(PROC) and [d.to_version for d in status.load_deltas()] == [2]
    out = capsys.readouterr()
    assert f"add element inet ringfence s_{WEB}_4h {{ 10.1.1.12 }}" in out.out
    # a second start re-applies the last known good first, then finds nothing new
    assert Daemon(cfg).run(once=True) == 0
    err = capsys.readouterr().err
    assert "re-applied last known good: ord-prod-proc-1 revision 2" in err and "rejected" not in err


def test_daemon_follows_a_plain_http_static_source(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    import functools
    import http.server
    import threading

    from ringfence_agent.config import AgentConfig
    from ringfence_agent.daemon import Daemon

    (tmp_path / "www" / "bundles").mkdir(parents=True)
    (tmp_path / "www" / "bundles" / "ord-prod-proc-1.json").write_bytes(PROC2.read_bytes())
    handler = functools.partial(http.server.SimpleHTTPRequestHandler, directory=str(tmp_path / "www"))
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        base = f"http://127.0.0.1:{server.server_address[1]}"
        cfg = AgentConfig(
            workload_id="ord-prod-proc-1",
            public_key=PUBLIC_KEY,
            state_dir=tmp_path / "st",
            backend="dry-run",
            source=base,
        )
        assert "127.0.0.1" in cfg.local_failsafes().control_plane
        assert Daemon(cfg).run(once=True) == 0
        assert StateDir(tmp_path / "st").load_bundle() == golden(PROC2)
        assert "ip daddr @fs_cp_4 tcp dport" in capsys.readouterr().out
        # the source goes away: the next start still enforces the last known good
        server.shutdown()
        server.server_close()
        assert Daemon(cfg).run(once=True) == 0
        err = capsys.readouterr().err
        assert "re-applied last known good" in err and "still enforcing revision 2" in err
    finally:
        server.server_close()


def test_reports_spool_when_unreachable_and_discard_when_refused(tmp_path: Path) -> None:
    from ringfence_agent.config import AgentConfig
    from ringfence_agent.daemon import Daemon
    from ringfence_agent.sources import SourceError, Unreachable

    cfg = AgentConfig(
        workload_id="w", public_key=PUBLIC_KEY, state_dir=tmp_path / "st", backend="dry-run", source=str(tmp_path)
    )
    daemon = Daemon(cfg)

    class Down:
        kind = "api"

        def __init__(self) -> None:
            self.error: Exception | None = Unreachable("down")
            self.sent: list[ReportBatch] = []

        def report(self, batch: ReportBatch) -> None:
            if self.error is not None:
                raise self.error
            self.sent.append(batch)

    src = Down()
    daemon.source = src  # type: ignore[assignment]
    daemon.drops.add(drop_key(_drop(1)), _drop(1))
    with pytest.raises(Unreachable):
        daemon.send_reports()
    assert (tmp_path / "st" / "spool.jsonl").exists()
    src.error = SourceError("HTTP 413")
    daemon.send_reports()  # the spooled batch is refused: discarded and counted, not retried forever
    assert not (tmp_path / "st" / "spool.jsonl").exists() and daemon.drops.discarded == 1
    src.error = None
    daemon.send_reports()
    assert src.sent[-1].dropped_records == 1


def test_daemon_does_not_spin_when_the_announced_version_is_refused(tmp_path: Path) -> None:
    import threading

    from ringfence_agent.config import AgentConfig
    from ringfence_agent.daemon import Daemon

    cfg = AgentConfig(
        workload_id="ord-prod-proc-1",
        public_key=PUBLIC_KEY,
        state_dir=tmp_path / "st",
        backend="dry-run",
        source=str(tmp_path),
        poll_interval=1,
        heartbeat_interval=1,
    )
    daemon = Daemon(cfg)
    forged = forge(golden(PROC2), version=7)

    class Announcer:
        kind = "api"
        fetches = 0

        def __init__(self) -> None:
            self.waits = 0

        def wait(self, version: int | None, timeout: float, stop: threading.Event) -> int | None:
            self.waits += 1
            return 7  # "version 7 is out", at once, every time

        def announced(self) -> int | None:
            return None

        def bundle(self) -> Bundle | None:
            return forged

        def settled(self) -> None:
            return None

        def deltas(self, since: int, sets: dict[str, int], bundle_version: int) -> list[SetDelta] | None:
            return None

        def heartbeat(self, hb: object) -> int | None:
            return 7

        def report(self, batch: ReportBatch) -> None:
            return None

    class Stop(threading.Event):
        """The daemon's stop event: the sync loop's pauses are recorded (in order with the source's
        waits) and skipped, so the test counts what the loop asked for instead of timing it; other
        threads (the observer) still wait for real."""

        def wait(self, timeout: float | None = None) -> bool:
            if threading.current_thread() is t and timeout is not None:
                calls.append(("pause", timeout))
                return self.is_set()
            return super().wait(timeout)

    calls: list[tuple[str, float]] = []
    src = Announcer()
    waits = src.wait

    def wait(version: int | None, timeout: float, stop: threading.Event) -> int | None:
        calls.append(("wait", timeout))
        if src.waits == 5:
            daemon.stop.set()  # enough rounds to see the pattern
        return waits(version, timeout, stop)

    src.wait = wait  # type: ignore[method-assign]
    daemon.source = src  # type: ignore[assignment]
    daemon.stop = Stop()
    t = threading.Thread(target=daemon.run)
    t.start()
    t.join(timeout=60)
    assert not t.is_alive()
    waited = [i for i, (what, _) in enumerate(calls) if what == "wait"]
    assert len(waited) == 6, calls
    # never back to the source without a pause first: each round waits at least half the backoff
    # cap, min(backoff_max, poll_interval) = 1 s (full jitter: 0.5-1 × it), instead of spinning
    for prev, i in zip([-1, *waited], waited, strict=False):
        pauses = [d for what, d in calls[prev + 1 : i] if what == "pause"]
        assert pauses and sum(pauses) >= 0.5, (i, calls)
    assert daemon.state.read_json("status.json")["counters"]["rejected"] == 1  # refused once, reported once


def test_flow_source_degrades_clearly(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    import shutil

    from ringfence_agent.reports import FlowSource

    monkeypatch.setattr(shutil, "which", lambda name: None)
    src = FlowSource(tmp_path / "no-such-file")
    assert src.kind == "unavailable" and src.lines() == []
    (tmp_path / "ct").write_text(
        "ipv4 2 udp 17 29 src=10.0.0.1 dst=10.0.0.2 sport=1 dport=53 src=10.0.0.2 dst=10.0.0.1 sport=53 dport=1 use=1\n"
    )
    assert FlowSource(tmp_path / "ct").kind == "proc"


def test_state_dir_is_locked_against_other_processes(tmp_path: Path) -> None:
    make_agent(tmp_path)  # this process takes the lock
    code = (
        "import sys; from pathlib import Path; from ringfence_agent.state import StateDir, StateLocked\n"
        f"try:\n    StateDir(Path({str(tmp_path / 'state')!r})).lock()\nexcept StateLocked as e:\n    print(e); sys.exit(3)\n"
    )
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert proc.returncode == 3 and "in use by another ringfence-agent" in proc.stdout


def test_aws_iid_enrollment_reads_imdsv2_and_sends_document_and_signature(tmp_path: Path) -> None:
    """By default the agent sends the form the AWS control plane verifies: checked with its real code."""
    import base64
    import http.server
    import threading

    from cryptography.hazmat.primitives import hashes
    from cryptography.hazmat.primitives.asymmetric import padding, rsa

    from ringfence.clouds.aws.enroll import verify_iid
    from ringfence_agent import enroll
    from ringfence_agent.sources import ApiSource, Unreachable

    seen: dict[str, object] = {}
    region_key = rsa.generate_private_key(public_exponent=65537, key_size=2048)  # stands in for AWS's
    document = b'{"instanceId": "i-0abc", "accountId": "111122223333", "region": "ca-central-1"}'
    signature = base64.encodebytes(region_key.sign(document, padding.PKCS1v15(), hashes.SHA256()))

    class Imds(http.server.BaseHTTPRequestHandler):
        def log_message(self, *a: object) -> None:
            pass

        def do_PUT(self) -> None:
            assert self.path == "/latest/api/token" and self.headers["X-aws-ec2-metadata-token-ttl-seconds"] == "60"
            self._reply(b"tok-1")

        def do_GET(self) -> None:
            assert self.headers["X-aws-ec2-metadata-token"] == "tok-1"  # IMDSv2 only
            body = {
                "/latest/dynamic/instance-identity/document": document,
                "/latest/dynamic/instance-identity/signature": signature,
            }[self.path]
            self._reply(body)

        def _reply(self, body: bytes) -> None:
            self.send_response(200)
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

    class Cp(Imds):
        def do_GET(self) -> None:
            self._reply(b'{"nonce": "n-1", "expires_in": 60}')

        def do_POST(self) -> None:
            seen["enroll"] = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
            self._reply(b'{"workload_id": "i-0abc", "token": "t", "expires_in": 60, "public_key_pem": ""}')

    servers = [http.server.ThreadingHTTPServer(("127.0.0.1", 0), h) for h in (Imds, Cp)]
    for s in servers:
        threading.Thread(target=s.serve_forever, daemon=True).start()
    try:
        imds, cp = (f"http://127.0.0.1:{s.server_address[1]}" for s in servers)
        src = ApiSource(cp, "i-0abc", enroll.aws_iid(imds), StateDir(tmp_path / "st"), 2, 2)
        src.enroll()
        sent = seen["enroll"]
        assert isinstance(sent, dict) and sent["method"] == "aws-iid" and sent["nonce"] == "n-1"
        assert sent["document"] == document.decode()
        identity = verify_iid(sent["document"], sent["document_signature"], region_key.public_key())
        assert (identity.instance_id, identity.account) == ("i-0abc", "111122223333")
        assert src.token == "t" and StateDir(tmp_path / "st").read_json("token.json")["token"] == "t"
        # no metadata service (not on EC2, or blocked): a clear, retryable error
        src2 = ApiSource(
            cp, "i-0abc", enroll.aws_iid("http://127.0.0.1:9", timeout=0.5), StateDir(tmp_path / "s2"), 2, 2
        )
        with pytest.raises(Unreachable, match="IMDSv2"):
            src2.enroll()
    finally:
        for s in servers:
            s.shutdown()
            s.server_close()


# --- grouped rules -------------------------------------------------------------------------------


def _grouped_plan() -> Plan:
    """Inbound: one grouped rule; a and b share tcp/8080 (and one address), c has tcp/5432 + icmp/8."""
    svc = {
        "8080": {"proto": "tcp", "ports": [8080, 8080], "icmp_type": None},
        "5432": {"proto": "tcp", "ports": [5432, 5432], "icmp_type": None},
        "ping": {"proto": "icmp", "ports": None, "icmp_type": 8},
        "dns": {"proto": "udp", "ports": [53, 53], "icmp_type": None},
    }
    doc = json.loads(PROC.read_text())
    doc["sets"] = {
        "rf_a": {"version": 1, "v4": ["10.0.0.1/32", "10.0.1.0/24"], "v6": ["fd00::1/128"]},
        "rf_b": {"version": 1, "v4": ["10.0.0.0/31"], "v6": []},
        "rf_c": {"version": 1, "v4": ["10.0.2.1/32"], "v6": []},
    }
    doc["inbound"] = [
        {
            "id": "p/a",
            "action": "allow",
            "set": None,
            "services": [],
            "members": [
                {"id": "p/a", "set": "rf_a", "services": [svc["8080"], svc["dns"]]},
                {"id": "p/b", "set": "rf_b", "services": [svc["8080"]]},
                {"id": "p/c", "set": "rf_c", "services": [svc["5432"], svc["ping"]]},
            ],
        }
    ]
    doc["outbound"] = []
    return compile_plan(load_bundle(json.dumps(doc)), LOCAL)


def test_grouped_rule_covers_unite_members_per_service() -> None:
    plan = _grouped_plan()
    rule = plan.rules[0]
    assert [m.rule_id for m in rule.members] == ["p/a", "p/b", "p/c"] and rule.set is None
    covers = service_covers(rule, 4, plan.sets)
    # a's 10.0.0.1 and b's 10.0.0.0/31 overlap on tcp/8080: one cover, no overlapping elements
    assert covers[("tcp", 8080, 8080)] == ("10.0.0.0/31", "10.0.1.0/24")
    assert covers[("udp", 53, 53)] == ("10.0.0.1/32", "10.0.1.0/24")
    assert covers[("tcp", 5432, 5432)] == ("10.0.2.1/32",) and covers[("icmp", 8, 8)] == ("10.0.2.1/32",)
    assert service_covers(rule, 6, plan.sets) == {
        ("tcp", 8080, 8080): ("fd00::1/128",),
        ("udp", 53, 53): ("fd00::1/128",),
        ("tcp", 5432, 5432): (),  # c has no IPv6 address: an empty cover, the set is still declared
    }


def test_nft_grouped_rule_is_one_rule_per_family_and_kind() -> None:
    text = NftRenderer().render(_grouped_plan())
    assert (
        "set g_r_in_0_4p { type ipv4_addr . inet_proto . inet_service; flags interval; elements = { "
        "10.0.2.1 . tcp . 5432, 10.0.0.0/31 . tcp . 8080, 10.0.1.0/24 . tcp . 8080, 10.0.0.1 . udp . 53, "
        "10.0.1.0/24 . udp . 53 } }" in text
    )
    assert "set g_r_in_0_4i { type ipv4_addr . icmp_type; flags interval; elements = { 10.0.2.1 . 8 } }" in text
    assert "set g_r_in_0_6i" not in text  # icmp/8 is IPv4 only
    rules = [line.strip() for line in text.splitlines() if "counter name r_in_0" in line]
    assert rules == [
        'ip saddr . icmp type @g_r_in_0_4i counter name r_in_0 accept comment "p/a"',
        'ip saddr . meta l4proto . th dport @g_r_in_0_4p counter name r_in_0 accept comment "p/a"',
        'ip6 saddr . meta l4proto . th dport @g_r_in_0_6p counter name r_in_0 accept comment "p/a"',
    ]


def test_delta_on_a_member_set_moves_only_what_the_union_loses() -> None:
    plan = _grouped_plan()
    # b loses 10.0.0.0/31 → its cover on tcp/8080 shrinks to what a still holds (10.0.0.1)
    changes = group_changes(plan, "rf_b", PlanSet((), ()), remove=("10.0.0.0/31",))
    assert changes == (GroupChange("r_in_0", 4, ("tcp", 8080, 8080), ("10.0.0.1/32",), ("10.0.0.0/31",)),)
    # a gains 10.0.5.5: tcp/8080 (shared with b) and udp/53 (a alone: the delta as it is)
    new_a = PlanSet(("10.0.0.1/32", "10.0.1.0/24", "10.0.5.5/32"), ("fd00::1/128",))
    changes = group_changes(plan, "rf_a", new_a, add=("10.0.5.5/32",))
    assert set(changes) == {
        GroupChange("r_in_0", 4, ("tcp", 8080, 8080), ("10.0.5.5/32",), ()),
        GroupChange("r_in_0", 4, ("udp", 53, 53), ("10.0.5.5/32",), ()),
    }
    # a loses 10.0.0.1, which b's /31 still covers on tcp/8080: only udp/53 changes
    new_a = PlanSet(("10.0.1.0/24",), ("fd00::1/128",))
    changes = group_changes(plan, "rf_a", new_a, remove=("10.0.0.1/32",))
    assert changes == (GroupChange("r_in_0", 4, ("udp", 53, 53), (), ("10.0.0.1/32",)),)
    text = NftRenderer.render_delta(ElementChange("rf_a", remove_v4=("10.0.0.1/32",), groups=changes))
    assert text.splitlines() == [
        "delete element inet ringfence s_rf_a_4h { 10.0.0.1 }",
        "delete element inet ringfence g_r_in_0_4p { 10.0.0.1 . udp . 53 }",
    ]
    assert group_changes(plan, "rf_unused", PlanSet((), ())) == ()


def _mixed_group_plan() -> Plan:
    """Inbound: one grouped rule mixing kinds: a on tcp/8080, a scanner and a jumpbox on all tcp
    ports (the jumpbox also on all ICMPv6 types), n on any protocol; the scanner's and n's
    addresses overlap a's."""
    doc = json.loads(PROC.read_text())
    doc["sets"] = {
        "rf_a": {"version": 1, "v4": ["10.0.0.1/32"], "v6": ["fd00::1/128"]},
        "rf_s": {"version": 1, "v4": ["10.0.0.0/31"], "v6": []},
        "rf_j": {"version": 1, "v4": ["10.0.3.0/24"], "v6": ["fd00::3/128"]},
        "rf_n": {"version": 1, "v4": ["10.0.0.1/32"], "v6": []},
    }
    all_tcp = {"proto": "tcp", "ports": None, "icmp_type": None}
    doc["inbound"] = [
        {
            "id": "p/a",
            "action": "allow",
            "set": None,
            "services": [],
            "members": [
                {"id": "p/a", "set": "rf_a", "services": [{"proto": "tcp", "ports": [8080, 8080], "icmp_type": None}]},
                {"id": "p/s", "set": "rf_s", "services": [all_tcp]},
                {
                    "id": "p/j",
                    "set": "rf_j",
                    "services": [all_tcp, {"proto": "icmpv6", "ports": None, "icmp_type": None}],
                },
                {"id": "p/n", "set": "rf_n", "services": [{"proto": "any", "ports": None, "icmp_type": None}]},
            ],
        }
    ]
    doc["outbound"] = []
    return compile_plan(load_bundle(json.dumps(doc)), LOCAL)


def test_nft_group_keeps_whole_protocols_and_any_in_sets_of_their_own() -> None:
    text = NftRenderer().render(_mixed_group_plan())
    sets = {line.split()[1]: line.strip() for line in text.splitlines() if line.strip().startswith("set g_r_in_0_")}
    # 10.0.0.1 is allowed on tcp/8080 (a), on all tcp (the scanner's /31) and on any (n): three
    # elements in three sets, none overlapping another in its own set
    assert sets == {
        "g_r_in_0_4a": "set g_r_in_0_4a { type ipv4_addr; flags interval; elements = { 10.0.0.1 } }",
        "g_r_in_0_6a": "set g_r_in_0_6a { type ipv6_addr; flags interval; }",
        "g_r_in_0_4l": "set g_r_in_0_4l { type ipv4_addr . inet_proto; flags interval; "
        "elements = { 10.0.0.0/31 . tcp, 10.0.3.0/24 . tcp } }",
        "g_r_in_0_6l": "set g_r_in_0_6l { type ipv6_addr . inet_proto; flags interval; "
        "elements = { fd00::3 . ipv6-icmp, fd00::3 . tcp } }",
        "g_r_in_0_4p": "set g_r_in_0_4p { type ipv4_addr . inet_proto . inet_service; flags interval; "
        "elements = { 10.0.0.1 . tcp . 8080 } }",
        "g_r_in_0_6p": "set g_r_in_0_6p { type ipv6_addr . inet_proto . inet_service; flags interval; "
        "elements = { fd00::1 . tcp . 8080 } }",
    }
    rules = [line.strip() for line in text.splitlines() if "counter name r_in_0" in line]
    assert rules == [
        'ip saddr @g_r_in_0_4a counter name r_in_0 accept comment "p/a"',
        'ip saddr . meta l4proto @g_r_in_0_4l counter name r_in_0 accept comment "p/a"',
        'ip saddr . meta l4proto . th dport @g_r_in_0_4p counter name r_in_0 accept comment "p/a"',
        'ip6 saddr @g_r_in_0_6a counter name r_in_0 accept comment "p/a"',
        'ip6 saddr . meta l4proto @g_r_in_0_6l counter name r_in_0 accept comment "p/a"',
        'ip6 saddr . meta l4proto . th dport @g_r_in_0_6p counter name r_in_0 accept comment "p/a"',
    ]


def test_delta_on_whole_protocol_and_any_members() -> None:
    plan = _mixed_group_plan()
    # the scanner loses its /31: all tcp is shared with the jumpbox, whose /24 stays; a's
    # tcp/8080 element for 10.0.0.1 lives in another set and is untouched
    changes = group_changes(plan, "rf_s", PlanSet((), ()), remove=("10.0.0.0/31",))
    assert changes == (GroupChange("r_in_0", 4, ("tcp", 0, 65535), (), ("10.0.0.0/31",)),)
    text = NftRenderer.render_delta(ElementChange("rf_s", remove_v4=("10.0.0.0/31",), groups=changes))
    assert text.splitlines() == [
        "delete element inet ringfence s_rf_s_4 { 10.0.0.0/31 }",
        "delete element inet ringfence g_r_in_0_4l { 10.0.0.0/31 . tcp }",
    ]
    # the jumpbox gains 10.0.0.0/31's neighbour 10.0.0.2: shared all-tcp cover grows by it, its
    # ICMPv6 is IPv6 only and unchanged
    new_j = PlanSet(("10.0.0.2/32", "10.0.3.0/24"), ("fd00::3/128",))
    assert group_changes(plan, "rf_j", new_j, add=("10.0.0.2/32",)) == (
        GroupChange("r_in_0", 4, ("tcp", 0, 65535), ("10.0.0.2/32",), ()),
    )
    # the jumpbox's IPv6 address goes: it alone carries icmpv6, all tcp on v6 is its alone too
    changes = group_changes(plan, "rf_j", PlanSet(("10.0.3.0/24",), ()), remove=("fd00::3/128",))
    assert set(changes) == {
        GroupChange("r_in_0", 6, ("icmpv6", 0, 255), (), ("fd00::3/128",)),
        GroupChange("r_in_0", 6, ("tcp", 0, 65535), (), ("fd00::3/128",)),
    }
    text = NftRenderer.render_delta(ElementChange("rf_j", remove_v6=("fd00::3/128",), groups=changes))
    assert "delete element inet ringfence g_r_in_0_6l { fd00::3 . ipv6-icmp }" in text.splitlines()
    # n (any) gains an address: the delta as it is, into the address-only set
    changes = group_changes(plan, "rf_n", PlanSet(("10.0.0.1/32", "10.0.9.9/32"), ()), add=("10.0.9.9/32",))
    assert changes == (GroupChange("r_in_0", 4, ("any", 0, 0), ("10.0.9.9/32",), ()),)
    text = NftRenderer.render_delta(ElementChange("rf_n", add_v4=("10.0.9.9/32",), groups=changes))
    assert "add element inet ringfence g_r_in_0_4a { 10.0.9.9 }" in text.splitlines()


def test_iptables_and_windows_expand_a_grouped_rule_into_its_members() -> None:
    plan = _grouped_plan()
    text = IptablesRenderer().rules_script(plan, 4, "a", [])
    lines = [line for line in text.splitlines() if "r_in_0" in line]
    assert lines == [
        '-A RF-IN -p tcp --dport 8080 -m set --match-set rf-s-rf_a-4a src -m comment --comment "r_in_0 p/a" -j ACCEPT',
        '-A RF-IN -p udp --dport 53 -m set --match-set rf-s-rf_a-4a src -m comment --comment "r_in_0 p/a" -j ACCEPT',
        '-A RF-IN -p tcp --dport 8080 -m set --match-set rf-s-rf_b-4a src -m comment --comment "r_in_0 p/b" -j ACCEPT',
        '-A RF-IN -p tcp --dport 5432 -m set --match-set rf-s-rf_c-4a src -m comment --comment "r_in_0 p/c" -j ACCEPT',
        '-A RF-IN -p icmp --icmp-type 8 -m set --match-set rf-s-rf_c-4a src -m comment --comment "r_in_0 p/c" -j ACCEPT',
    ]
    ps = WindowsPlanBackend(io.StringIO()).render(plan)
    assert (
        "-DisplayName 'p/b (tcp/8080)' -Direction Inbound -Action Allow -Profile Any -RemoteAddress '10.0.0.0/31'" in ps
    )
    assert "-DisplayName 'p/c (icmp/8)'" in ps


def test_backends_that_expand_members_join_cut_port_ranges_back() -> None:
    pieces = (Match("tcp", (1, 5)), Match("udp", (53, 53)), Match("tcp", (10, 15)), Match("tcp", (6, 9)))
    assert joined_ports((*pieces, Match("icmp", None, 8), Match("tcp", (20, 21)))) == (
        Match("tcp", (1, 15)),
        Match("tcp", (20, 21)),
        Match("udp", (53, 53)),
        Match("icmp", None, 8),
    )
    plan = _scanner_cut_plan()
    lines = [x for x in IptablesRenderer().rules_script(plan, 4, "a", []).splitlines() if "c/scan" in x]
    assert lines == [
        '-A RF-IN -p tcp --dport 1:65535 -m set --match-set rf-s-rf_s-4a src -m comment --comment "r_in_0 c/scan" -j ACCEPT'
    ]
    ps = WindowsPlanBackend(io.StringIO()).render(plan)
    assert "-DisplayName 'c/scan (tcp/1-65535)'" in ps and "c/scan (tcp/9100)" not in ps
    # nftables keeps the pieces: its elements must not overlap the monitoring member's
    assert (
        "elements = { 10.0.9.1 . tcp . 1-9099, 10.0.8.1 . tcp . 9100, 10.0.9.1 . tcp . 9100, "
        "10.0.9.1 . tcp . 9101-65535 }" in NftRenderer().render(plan)
    )


# --- nftables: a grouped rule past the bound is expanded ----------------------------------------


def test_nft_expands_a_group_past_its_bound_into_member_rules_over_their_sets() -> None:
    plan = _grouped_plan()  # v4: a 2 services x 2 prefixes + b 1 x 1 + c 2 x 1 = 7; v6: 2
    assert group_load(plan.rules[0], 4, plan.sets) == 7 and group_load(plan.rules[0], 6, plan.sets) == 2
    assert NftRenderer(group_bound=7).concatenated(plan) == {"r_in_0"}
    assert NftRenderer(group_bound=6).concatenated(plan) == frozenset()
    text = NftRenderer(group_bound=6).render(plan)
    assert "g_r_in_0" not in text
    rules = [line.strip() for line in text.splitlines() if "counter name r_in_0" in line]
    assert rules[:4] == [
        'ip saddr @s_rf_a_4h tcp dport 8080 counter name r_in_0 accept comment "p/a"',
        'ip saddr @s_rf_a_4 tcp dport 8080 counter name r_in_0 accept comment "p/a"',
        'ip6 saddr @s_rf_a_6h tcp dport 8080 counter name r_in_0 accept comment "p/a"',
        'ip6 saddr @s_rf_a_6 tcp dport 8080 counter name r_in_0 accept comment "p/a"',
    ]
    assert rules[-2:] == [  # icmp/8: IPv4 only
        'ip saddr @s_rf_c_4h icmp type 8 counter name r_in_0 accept comment "p/c"',
        'ip saddr @s_rf_c_4 icmp type 8 counter name r_in_0 accept comment "p/c"',
    ]
    assert len(rules) == 4 + 4 + 4 + 4 + 2  # a: 8080, 53; b: 8080; c: 5432, icmp
    # the group keeps its one counter, so drop and hit reporting sees the same rule either way,
    # named by every member it counts (not the first member alone)
    assert plan.counter_map()["r_in_0"] == ("inbound", "p/a+p/b+p/c", "allow")
    assert 'counter r_in_0 { comment "allow p/a+p/b+p/c" }' in text


def _scanner_cut_plan() -> Plan:
    """A scanner's tcp/1-65535, cut around the monitoring member's tcp/9100 in one grouped rule."""
    doc = json.loads(PROC.read_text())
    doc["sets"] = {"rf_s": {"version": 1, "v4": ["10.0.9.1/32"]}, "rf_m": {"version": 1, "v4": ["10.0.8.1/32"]}}
    tcp = [[1, 9099], [9100, 9100], [9101, 65535]]
    doc["inbound"] = [
        {
            "id": "c/mon",
            "action": "allow",
            "set": None,
            "services": [],
            "members": [
                {"id": "c/mon", "set": "rf_m", "services": [{"proto": "tcp", "ports": [9100, 9100]}]},
                {"id": "c/scan", "set": "rf_s", "services": [{"proto": "tcp", "ports": r} for r in tcp]},
            ],
        }
    ]
    doc["outbound"] = []
    plan = compile_plan(load_bundle(json.dumps(doc)), LOCAL)
    return plan


def test_group_load_weighs_a_port_range_by_the_blocks_the_kernel_stores() -> None:
    """A delta on a concatenated group costs per kernel entry it touches: a wide port range cut
    into pieces is many (24-56 ms deltas at 500-1,000 elements, docs/benchmarks.md), so the bound
    counts them and such a group is expanded into member rules sooner."""
    assert span_entries(("tcp", 9100, 9100)) == 1
    assert span_entries(("tcp", 0, 65535)) == span_entries(("any", 0, 0)) == span_entries(("icmp", 8, 8)) == 1
    assert span_entries(("tcp", 8, 15)) == 1  # one aligned block
    assert span_entries(("tcp", 1024, 65535)) == 6  # 1024-2047, 2048-4095, ..., 32768-65535
    assert span_entries(("udp", 1, 6)) == 4  # 1, 2-3, 4-5, 6
    plan = _scanner_cut_plan()
    weights = 1 + sum(span_entries(("tcp", lo, hi)) for lo, hi in ((1, 9099), (9100, 9100), (9101, 65535)))
    assert group_load(plan.rules[0], 4, plan.sets) == weights > 4  # 4 elements, far more entries
    assert NftRenderer(group_bound=weights - 1).concatenated(plan) == frozenset()
    assert NftRenderer(group_bound=weights).concatenated(plan) == {"r_in_0"}


def test_nft_expanded_group_joins_cut_pieces_back() -> None:
    plan = _scanner_cut_plan()
    text = NftRenderer(group_bound=3).render(plan)  # 4 elements: expanded
    scan = [line.strip() for line in text.splitlines() if '"c/scan"' in line]
    assert scan == [
        'ip saddr @s_rf_s_4h tcp dport 1-65535 counter name r_in_0 accept comment "c/scan"',
        'ip saddr @s_rf_s_4 tcp dport 1-65535 counter name r_in_0 accept comment "c/scan"',
        'ip6 saddr @s_rf_s_6h tcp dport 1-65535 counter name r_in_0 accept comment "c/scan"',
        'ip6 saddr @s_rf_s_6 tcp dport 1-65535 counter name r_in_0 accept comment "c/scan"',
    ]


def test_nft_group_delta_routes_by_realisation_with_hysteresis() -> None:
    from ringfence_agent.backends.nft import NftBackend

    plan = _grouped_plan()  # load 7 (v4)
    grown = PlanSet(("10.0.0.0/31", "10.0.7.7/32"), ())  # b: one prefix more → 8
    shrunk = PlanSet((), ())  # b: none → 6
    empty_a = PlanSet((), ())  # a: none → 3 (b's 1, c's 2), v6 0

    def route(bound: int, realised: dict[str, bool] | None, name: str, new: PlanSet) -> frozenset[str] | None:
        backend = NftBackend(group_bound=bound)
        backend.realised = realised
        return backend.group_delta(plan, name, new)

    # concatenated: stays while within the bound; past it, re-apply (None)
    assert route(8, {"r_in_0": True}, "rf_b", grown) == {"r_in_0"}
    assert route(7, {"r_in_0": True}, "rf_b", grown) is None
    # expanded: stays while not below half the bound (no group elements to move), else re-apply
    assert route(7, {"r_in_0": False}, "rf_b", shrunk) == frozenset()
    assert route(7, {"r_in_0": False}, "rf_a", empty_a) == frozenset()  # 3 >= 7 // 2
    assert route(8, {"r_in_0": False}, "rf_a", empty_a) is None  # 3 < 8 // 2
    # a set no group uses: nothing to move, no re-apply
    assert route(7, {"r_in_0": True}, "rf_unused", PlanSet((), ())) == frozenset()
    # a process that applied nothing: the realisation follows from the size outside [bound/2, bound]
    assert route(6, None, "rf_b", grown) == frozenset()  # 7 > 6: expanded, and stays
    assert route(20, None, "rf_b", grown) == {"r_in_0"}  # 7 < 10: concatenated, and stays
    assert route(10, None, "rf_b", grown) is None  # 5 <= 7 <= 10: unknown, re-apply


@pytest.mark.parametrize("posture", ["failsafe", "open"])
def test_the_boot_posture_without_a_bundle(tmp_path: Path, posture: str, capsys: pytest.CaptureFixture[str]) -> None:
    """No valid bundle at start: ``failsafe`` programs fail-safes then drop; ``open`` touches nothing."""
    from ringfence_agent.config import AgentConfig
    from ringfence_agent.daemon import Daemon

    cfg = AgentConfig(
        workload_id="w1",
        public_key=PUBLIC_KEY,
        state_dir=tmp_path / "state",
        backend="dry-run",
        source="http://localhost:8000",  # a name: resolved from /etc/hosts, no DNS query
        admin_cidrs=["192.0.2.0/24"],
        boot_posture=posture,  # type: ignore[arg-type]
    )
    assert cfg.source_hosts() == ["localhost"]
    Daemon(cfg).start_enforcing()
    out, err = capsys.readouterr()
    status = StateDir(tmp_path / "state").read_json("status.json")
    if posture == "open":
        assert out == "" and "posture" not in status
        return
    assert "holding the fail-safe posture" in err and "admin 192.0.2.0/24" in err
    assert "control plane 127.0.0.1/32" in err  # the source's name, resolved for the posture
    assert "fs_admin_4 { type ipv4_addr; flags interval; elements = { 192.0.2.0/24 } }" in out
    assert 'counter name d_in drop comment "default enforce"' in out
    assert status["posture"] == "failsafe" and status["counters"]["failsafe_postures"] == 1
