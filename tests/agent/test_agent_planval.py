"""Plan validation against hostile or odd signed documents (security review M4, M5, L2, L4):
every address and name that reaches a backend's text is checked in the plan, and every refusal is
a :class:`PlanError` (a rejected document), never an exception that escapes the agent."""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest

from ringfence.bundlewire import bundle_from_json, to_json
from ringfence_agent.backends import ApplyError, ElementChange
from ringfence_agent.backends.iptables import IptablesRenderer, ipset_name
from ringfence_agent.backends.nft import NftRenderer
from ringfence_agent.backends.windows import WindowsPlanBackend
from ringfence_agent.config import ConfigError, load_config
from ringfence_agent.core import Rejected
from ringfence_agent.plan import (
    Failsafes,
    LocalFailsafes,
    Match,
    Plan,
    PlanError,
    PlanMember,
    PlanRule,
    PlanSet,
    compile_plan,
    safe_comment,
    split_cidrs,
)
from tests.agent.test_agent_state import SET, bundle, delta, make
from tests.agent.test_agent_unit import LOCAL, PROC, golden


def with_sets(sets: dict[str, object], **extra: object) -> object:
    """The golden bundle with other sets (and no rules), through the wire parser."""
    return bundle_from_json({**to_json(golden(PROC)), "inbound": [], "outbound": [], "sets": sets, **extra})


# --- L2: prefix lengths are ASCII decimals, every refusal a PlanError --------------------------


@pytest.mark.parametrize(
    "text",
    [
        "10.0.0.0/\u00b2",  # superscript two: str.isdigit() is true, int() raises
        "10.0.0.0/\u0668",  # Arabic-Indic eight: int() reads 8
        "10.0.0.0/\uff18",  # fullwidth eight
        "fd00::/\u0666\u0664",
        "1.2.3.4\x00/32",  # inet_pton raises ValueError on a NUL
        "\uff11.2.3.4/32",
    ],
)
def test_non_ascii_or_nul_cidrs_are_plan_errors(text: str) -> None:
    with pytest.raises(PlanError, match="not a CIDR"):
        split_cidrs([text], "x")


def test_a_prefix_length_with_a_leading_zero_comes_out_canonical() -> None:
    assert split_cidrs(["10.0.0.0/024", "fd00::/064"], "x") == (("10.0.0.0/24",), ("fd00::/64",))


def test_delta_with_a_unicode_digit_prefix_is_a_rejected_delta(tmp_path: Path) -> None:
    agent, backend = make(tmp_path / "s")
    agent.apply_bundle(bundle(1, ["10.0.0.1/32"]))
    for bad in ("10.0.0.0/\u00b2", "10.0.0.0/\u0668"):
        with pytest.raises(Rejected, match="not a CIDR"):
            agent.apply_delta(delta(1, add=[bad]))
    assert backend.deltas == []


# --- L4: comments bounded in bytes, set names matched whole -------------------------------------


def test_comments_are_bounded_in_utf8_bytes() -> None:
    cjk = "\u898f" * 120  # 360 bytes in UTF-8
    text = safe_comment(cjk)
    assert len(text.encode()) <= 120 and text == "\u898f" * 40
    assert len(safe_comment("a" + cjk, 200).encode()) <= 200  # a character cut in half is dropped
    assert safe_comment("plain-id/1") == "plain-id/1"


def test_a_long_cjk_rule_id_fits_nft_and_iptables_comment_limits() -> None:
    doc = golden(PROC)
    rid = "\u898f" * 120
    tcp80 = {"proto": "tcp", "ports": [80, 80], "icmp_type": None}
    rule = {"id": rid, "set": None, "services": [tcp80], "action": "deny"}
    doc = bundle_from_json({**to_json(doc), "inbound": [rule], "outbound": []})
    plan = compile_plan(doc, LOCAL)
    nft = NftRenderer().render(plan)
    comments = [line.split('comment "', 1)[1].split('"')[0] for line in nft.splitlines() if 'comment "' in line]
    assert any("\u898f" in c for c in comments)
    assert max(len(c.encode()) for c in comments) < 128  # nft: 128 bytes with the NUL
    ipt = IptablesRenderer().rules_script(plan, 4, "a", []) + IptablesRenderer().rules_script(plan, 6, "a", [])
    comments = [line.split('--comment "', 1)[1].split('"')[0] for line in ipt.splitlines() if '--comment "' in line]
    assert any("\u898f" in c for c in comments)
    assert max(len(c.encode()) for c in comments) < 256  # xt_comment: 256 bytes with the NUL


@pytest.mark.parametrize("name", ["abc\n", "abc\nflush ruleset", "a" * 25, "", "a-b"])
def test_set_names_are_matched_whole(name: str) -> None:
    with pytest.raises(PlanError, match="set name"):
        compile_plan(with_sets({name: {"version": 1, "v4": [], "v6": []}}), LOCAL)


# --- M4: IPv6 scope ids are no addresses; PowerShell output quotes every value -----------------

EVIL = "fe80::1%$(Start-Process calc.exe)/128"
EVIL_QUOTE = "fe80::1%'; Start-Process calc.exe; '/128"


@pytest.mark.parametrize("text", [EVIL, EVIL_QUOTE, "fe80::1%eth0/128", "fe80::1%eth0", "fe80::1%1"])
def test_scope_ids_are_refused(text: str) -> None:
    with pytest.raises(PlanError, match="scope id"):
        split_cidrs([text], "x")


def test_a_bundle_set_or_failsafe_with_a_scope_id_does_not_compile() -> None:
    with pytest.raises(PlanError, match="scope id"):
        compile_plan(with_sets({"S": {"version": 1, "v4": [], "v6": [EVIL]}}), LOCAL)
    for local in (
        LocalFailsafes(admin_cidrs=(EVIL,)),
        LocalFailsafes(dns_resolvers=("fe80::1%$(calc)",)),
        LocalFailsafes(control_plane=("fe80::1%eth0",)),
    ):
        with pytest.raises(PlanError, match="scope id"):
            compile_plan(with_sets({}), local)


def test_a_delta_with_a_scope_id_is_rejected(tmp_path: Path) -> None:
    agent, backend = make(tmp_path / "s")
    agent.apply_bundle(bundle(1, ["10.0.0.1/32"]))
    with pytest.raises(Rejected, match="scope id"):
        agent.apply_delta(delta(1, add=[EVIL]))
    assert backend.deltas == []


_Q = "'(?:[^'\u2018-\u201b]|['\u2018-\u201b]{2})*'"  # a single-quoted PowerShell string
_ARG = rf"(?:-[A-Za-z]+|[A-Za-z0-9.,\-]+|{_Q}(?:,{_Q})*)"
_RULE_LINE = re.compile(f"New-NetFirewallRule(?: {_ARG})+")


def test_windows_plan_quotes_every_value_even_of_an_unvalidated_plan() -> None:
    """Defence in depth: a plan that skipped validation still renders no PowerShell code."""
    evil_id = "it's \u2018x\u2019; $(Start-Process calc.exe) `n\n# x"
    plan = Plan(
        workload_id="w\n$(Start-Process calc.exe)",
        version=1,
        mode="enforce",
        quarantined=False,
        sets={
            "S": PlanSet(("10.0.0.1/32",), (EVIL, EVIL_QUOTE, "fe80::3%\u2019; calc.exe; \u2018/128")),
            "E": PlanSet((), ()),
        },
        rules=[
            PlanRule("inbound", 0, evil_id, "allow", "S", (Match("tcp", (80, 80)),)),
            PlanRule("outbound", 0, evil_id, "override-deny", "S", (Match("tcp", (25, 25)),)),
            PlanRule(
                "inbound", 1, evil_id, "allow", None, (), (PlanMember(evil_id, "E\n$(x)", (Match("tcp", (1, 2)),)),)
            ),
        ],
        failsafes=Failsafes(
            admin_v6=(EVIL_QUOTE.replace("::1", "::2"),), admin_ports=(Match("tcp", (22, 22)),), dns_v6=(EVIL,)
        ),
    )
    plan.sets["E\n$(x)"] = PlanSet((), ())
    text = WindowsPlanBackend().render(plan)
    rules = [line for line in text.splitlines() if line.startswith("New-NetFirewallRule")]
    assert len(rules) >= 4
    for line in text.splitlines():
        assert line.startswith(
            ("#", "$ErrorActionPreference = 'Stop'", "Get-NetFirewallRule -Group 'Ringfence'", "Set-", "New-")
        )
        if line.startswith("New-NetFirewallRule"):
            assert _RULE_LINE.fullmatch(line), line
    assert "-RemoteAddress '10.0.0.1/32','fe80::1%$(Start-Process calc.exe)/128','fe80::1%''; Start-Process" in text


@pytest.mark.parametrize("field", ["admin_cidrs", "dns_resolvers", "control_plane"])
def test_the_config_refuses_scope_ids_that_would_fail_every_bundle(tmp_path: Path, field: str) -> None:
    p = tmp_path / "agent.json"
    p.write_text(json.dumps({"workload_id": "w1", "public_key": "/k", "source": "/x", field: ["fe80::1%eth0"]}))
    with pytest.raises(ConfigError, match=f"{field}: .*scope id"):
        load_config(p)


def test_an_api_url_with_a_scope_id_adds_no_failsafe_that_fails_every_bundle(tmp_path: Path) -> None:
    p = tmp_path / "agent.json"
    cfg = {"workload_id": "w1", "public_key": "/k", "api_url": "https://[fe80::1%25eth0]:8080/"}
    p.write_text(json.dumps({**cfg, "enroll": {"pairing_key": "k"}}))
    local = load_config(p).local_failsafes()
    assert not any("%" in x for x in local.control_plane)
    compile_plan(with_sets({}), local)


# --- M5: fail-safe lists are CIDR covers; overlapping set elements are refused before the kernel -


def test_failsafe_lists_from_bundle_and_config_are_collapsed() -> None:
    doc = with_sets({}, failsafes={"admin_cidrs": ["192.0.2.1/32", "fd00::1/128"], "dns_resolvers": ["10.0.0.53"]})
    local = LocalFailsafes(
        admin_cidrs=("192.0.2.0/24", "fd00::/64", "192.0.2.0/24"),
        dns_resolvers=("10.0.0.53", "10.0.0.52"),
        control_plane=("198.51.100.7", "198.51.100.7/32"),
    )
    fs = compile_plan(doc, local).failsafes
    assert fs.admin_v4 == ("192.0.2.0/24",) and fs.admin_v6 == ("fd00::/64",)
    assert fs.dns_v4 == ("10.0.0.52/31",) and fs.control_v4 == ("198.51.100.7/32",)
    nft = NftRenderer().render(compile_plan(doc, local))
    assert "set fs_admin_4 { type ipv4_addr; flags interval; elements = { 192.0.2.0/24 } }" in nft


@pytest.mark.parametrize(
    ("v4", "v6"),
    [
        (["192.0.2.1/32", "192.0.2.0/24"], []),
        (["10.0.0.0/8", "10.1.0.0/16"], []),
        (["10.0.0.1/32", "10.0.0.1/32"], []),
        (["10.0.0.1/32", "10.0.0.1"], []),  # the same address, one written without its /32
        (["10.0.0.0/24", "10.0.0.0/25"], []),
        ([], ["fd00::/64", "fd00::5/128"]),
        ([], ["::/0", "fd00::/8"]),
    ],
)
def test_a_set_whose_elements_overlap_does_not_compile(v4: list[str], v6: list[str]) -> None:
    with pytest.raises(PlanError, match="overlap"):
        compile_plan(with_sets({"S": {"version": 1, "v4": v4, "v6": v6}}), LOCAL)


def test_a_disjoint_cover_compiles_as_it_is() -> None:
    v4 = ["10.0.0.0/25", "10.0.0.128/32", "10.0.0.130/31", "0.0.0.0/8"]
    v6 = ["fd00::/64", "fd00:0:0:1::1/128"]
    plan = compile_plan(with_sets({"S": {"version": 1, "v4": v4, "v6": v6}}), LOCAL)
    assert plan.sets["S"].v4 == tuple(v4) and plan.sets["S"].v6 == tuple(v6)


@pytest.mark.parametrize(
    ("start", "add", "remove"),
    [
        (["10.0.0.1/32"], ["10.0.0.0/24"], []),  # a prefix over a member
        (["10.0.0.0/24"], ["10.0.0.1/32"], []),  # a member inside a prefix
        (["10.0.0.0/24"], ["10.0.0.0/16"], []),
        (["10.0.0.0/24"], ["10.0.0.128/25"], []),
        (["10.0.0.1/32"], ["10.0.0.5/32", "10.0.0.5/32"], []),  # twice in one delta
        (["10.0.0.1/32"], ["10.0.1.0/24", "10.0.1.7/32"], []),  # the delta's own elements overlap
        (["10.0.0.0/31", "10.0.0.9/32"], ["10.0.0.0/28"], ["10.0.0.0/31"]),  # the rest still overlaps
        (["10.0.0.1/32"], ["0.0.0.0/0"], []),
    ],
)
def test_a_delta_that_would_make_a_set_overlap_is_rejected_untouched(
    tmp_path: Path, start: list[str], add: list[str], remove: list[str]
) -> None:
    agent, backend = make(tmp_path / "s")
    agent.apply_bundle(bundle(1, start))
    with pytest.raises(Rejected, match="overlaps"):
        agent.apply_delta(delta(1, add=add, remove=remove))
    assert backend.deltas == [] and agent.effective().sets[SET].v4 == start  # type: ignore[union-attr]
    agent.apply_delta(delta(1, add=["10.9.9.9/32"]))  # the set version did not move


@pytest.mark.parametrize(
    ("start", "add", "remove"),
    [
        (["10.0.0.0/32", "10.0.0.1/32"], ["10.0.0.0/31"], ["10.0.0.0/32", "10.0.0.1/32"]),  # merged
        (["10.0.0.0/31"], ["10.0.0.0/32", "10.0.0.1/32"], ["10.0.0.0/31"]),  # split
        (["10.0.0.0/24"], ["10.0.1.0/24", "10.0.0.0/24"], ["10.0.0.0/24"]),  # removed and added back
        (["10.0.0.0/25"], ["10.0.0.128/25", "10.0.1.1/32"], []),  # adjacent, not overlapping
    ],
)
def test_deltas_that_keep_the_set_disjoint_apply(
    tmp_path: Path, start: list[str], add: list[str], remove: list[str]
) -> None:
    agent, backend = make(tmp_path / "s")
    agent.apply_bundle(bundle(1, start))
    agent.apply_delta(delta(1, add=add, remove=remove))
    assert len(backend.deltas) == 1
    compile_plan(agent.effective(), LOCAL)  # type: ignore[arg-type]


# --- M6: every ipset the agent creates is in its rf- namespace and fits ipset's 31 characters ----


def test_ipset_names_are_rf_prefixed_bounded_and_stable() -> None:
    assert ipset_name("blocklist", 4, "a") == "rf-s-blocklist-4a"
    assert ipset_name("a" * 23, 6, "b") == f"rf-s-{'a' * 23}-6b"  # 31 characters: still readable
    long = ipset_name("a" * 24, 4, "a")
    assert long.startswith("rf-h-") and long.endswith("-4a") and len(long) <= 31
    assert long == ipset_name("a" * 24, 4, "a") != ipset_name("b" * 24, 4, "a")
    assert ipset_name("a" * 24, 6, "b") == long[:-3] + "-6b"


def test_every_ipset_in_the_iptables_scripts_is_rf_prefixed_and_fits() -> None:
    sets = {n: {"version": 1, "v4": ["10.0.0.1/32"], "v6": ["fd00::1/128"]} for n in ("blocklist", "x" * 24, "y" * 24)}
    tcp = [{"proto": "tcp", "ports": [80, 80], "icmp_type": None}]
    rules = [{"id": f"r{i}", "set": n, "services": tcp, "action": "deny"} for i, n in enumerate(sets)]
    plan = compile_plan(with_sets(sets, inbound=rules), LOCAL)
    r = IptablesRenderer()
    text = r.sets_script(plan, "b") + r.rules_script(plan, 4, "b", []) + r.rules_script(plan, 6, "b", [])
    names = set(re.findall(r"^(?:create|flush|add) (\S+)", text, re.M))
    names |= set(re.findall(r"--(?:match|add)-set (\S+)", text))
    assert len(names) > 20
    assert all(n.startswith("rf-") and len(n) <= 31 for n in names), sorted(names)
    delta = r.delta_script(ElementChange("x" * 24, add_v4=("10.0.0.2/32",)), "b")
    assert delta == f"add {ipset_name('x' * 24, 4, 'b')} 10.0.0.2/32\n"


def test_two_sets_on_one_ipset_name_are_refused_not_merged(monkeypatch: pytest.MonkeyPatch) -> None:
    import ringfence_agent.backends.iptables as ipt

    sets = {n: {"version": 1, "v4": [f"10.0.0.{i}/32"], "v6": []} for i, n in enumerate(("a" * 24, "b" * 24))}
    plan = compile_plan(with_sets(sets), LOCAL)
    monkeypatch.setattr(ipt, "ipset_name", lambda name, family, gen: f"rf-h-0000000000000000-{family}{gen}")
    with pytest.raises(ApplyError, match="map to one ipset name"):
        IptablesRenderer().sets_script(plan, "a")
