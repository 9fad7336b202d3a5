"""``explain`` and ``policy test`` decide a flow between workloads with several addresses per
(source address, destination address) pair of one family, as the kernel and the connectivity
matrix do: a packet carries one address of each end, so a rule matched through one address and
another matched through a different address never let one packet through together.

- the top-level verdict is allow iff some pair is allowed (``policy_verdict``: every side as if
  enforced), and ``by_address`` lists every pair when some pair is decided otherwise;
- ``expect: deny`` holds only when every pair is denied, ``expect: allow`` when some pair is allowed.
"""

from __future__ import annotations

import json
import subprocess
import sys
from dataclasses import replace
from pathlib import Path
from typing import Any

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from ringfence.addresses import Address
from ringfence.engine import Engine
from ringfence.engine.connectivity import compute
from ringfence.engine.explain import Decision, Endpoint, decide, workload_endpoint
from ringfence.model import Workload
from ringfence.policy import load_policy_texts
from ringfence.policytests import run_tests
from tests.test_engine_properties import IPS4, IPS6, RANDOM_PROBES, random_policy_texts, workloads

BIN = Path(sys.executable).parent / "ringfence"

HEAD = """labels:
  dimensions:
    role: {keys: ["ringfence:role"]}
defaults:
  mode: enforce
"""

# (a) the client's outbound allows a v4 list, the server's inbound a v6 list: no packet gets through
CROSS = (
    HEAD
    + """ip_lists:
  - {name: v4only, cidrs: [10.1.0.0/24]}
  - {name: v6only, cidrs: ["fd01::/64"]}
rulesets:
  - name: r
    scope: all()
    same: []
    rules:
      - {name: out-v4, from: role == client, to: {ip_list: v4only}, services: [tcp/80]}
      - {name: in-v6, from: {ip_list: v6only}, to: role == server, services: [tcp/80]}
tests:
  - {name: client reaches server, from: {workload: c}, to: {workload: s}, port: tcp/80, expect: allow}
"""
)
CROSS_INV = [
    {"id": "c", "ips": ["10.1.0.1", "fd01::1"], "tags": {"ringfence:role": "client"}},
    {"id": "s", "ips": ["10.1.0.2", "fd01::2"], "tags": {"ringfence:role": "server"}},
]

# (b) an override-deny covers one of web1's two addresses: the other still reaches db1
DENY = (
    HEAD
    + """ip_lists:
  - {name: quarantine-net, cidrs: [10.9.0.0/24]}
rulesets:
  - name: r
    scope: all()
    same: []
    rules:
      - {name: web-db, from: role == web, to: role == db, services: [tcp/5432]}
      - {name: no-quarantine-net, from: {ip_list: quarantine-net}, to: role == db, services: [tcp/5432], action: override-deny}
tests:
  - {name: web is cut off from db, from: {workload: web1}, to: {workload: db1}, port: tcp/5432, expect: deny}
"""
)
DENY_INV = [
    {"id": "web1", "ips": ["10.9.0.5", "10.1.0.5"], "tags": {"ringfence:role": "web"}},
    {"id": "db1", "ips": ["10.1.0.2"], "tags": {"ringfence:role": "db"}},
]


def rf(*args: str, ok: bool | None = True) -> subprocess.CompletedProcess[str]:
    proc = subprocess.run([str(BIN), *args], capture_output=True, text=True, timeout=120)
    if ok is not None:
        assert (proc.returncode == 0) == ok, proc.stdout + proc.stderr
    return proc


def estate(tmp_path: Path, policy: str, inventory: list[dict[str, Any]]) -> tuple[str, str, str]:
    pol = tmp_path / "policy"
    pol.mkdir()
    (pol / "p.yaml").write_text(policy)
    inv = tmp_path / "inv.json"
    inv.write_text(json.dumps(inventory))
    return str(pol), str(pol / "p.yaml"), str(inv)


def test_cli_no_address_pair_gets_through_is_deny_and_expect_allow_fails(tmp_path: Path) -> None:
    """(a): each side allows through a different family. The pooled verdict said ALLOW and the
    test passed; the kernel drops v4 (server's inbound) and v6 (client's outbound)."""
    pol_dir, pol, inv = estate(tmp_path, CROSS, CROSS_INV)
    args = ("explain", "--policy", pol, "--inventory", inv, "--from", "c", "--to", "s", "--port", "tcp/80")
    out = rf(*args).stdout
    assert out.splitlines()[0] == "c → s tcp/80: DENY", out
    assert "10.1.0.1 → 10.1.0.2: DENY — inbound on s: no rule allows it (default deny)" in out
    assert "fd01::1 → fd01::2: DENY — outbound on c: no rule allows it (default deny)" in out
    doc = json.loads(rf(*args, "--json").stdout)
    assert (doc["verdict"], doc["policy_verdict"]) == ("deny", "deny")
    # alike by verdict, denied by different sides: each pair with what denies it, as the text says
    assert [(p["from"], p["verdict"], p["denied_by"]) for p in doc["by_address"]] == [
        ("10.1.0.1", "deny", "inbound on s: no rule allows it (default deny)"),
        ("fd01::1", "deny", "outbound on c: no rule allows it (default deny)"),
    ]

    test = rf("policy", "test", pol_dir, "--inventory", inv, ok=False).stdout
    assert "FAIL  client reaches server" in test and "expected allow, policy says deny for every address pair" in test

    matrix = json.loads(rf("connectivity", "--policy", pol, "--inventory", inv, "--workloads", "--json").stdout)
    assert matrix["pairs"] == []  # the matrix agrees: nothing open


def test_cli_one_address_pair_open_is_allow_and_expect_deny_fails(tmp_path: Path) -> None:
    """(b): the override-deny covers 10.9.0.5 only; 10.1.0.5 → 10.1.0.2 is open in the kernel
    and the matrix. The boundary test passed and provision stored the version; now it fails,
    naming the open pair, and provision refuses."""
    pol_dir, pol, inv = estate(tmp_path, DENY, DENY_INV)
    args = ("explain", "--policy", pol, "--inventory", inv, "--from", "web1", "--to", "db1", "--port", "tcp/5432")
    out = rf(*args).stdout
    assert out.splitlines()[0] == "web1 → db1 tcp/5432: ALLOW", out
    assert "the sides above are 10.1.0.5 → 10.1.0.2's" in out
    assert "10.1.0.5 → 10.1.0.2: ALLOW" in out
    assert "10.9.0.5 → 10.1.0.2: DENY — inbound: override-deny r/no-quarantine-net" in out
    doc = json.loads(rf(*args, "--json").stdout)
    assert doc["policy_verdict"] == "allow"
    assert doc["sides_for"] == {"from": "10.1.0.5", "to": "10.1.0.2"}
    assert sorted((p["from"], p["policy_verdict"]) for p in doc["by_address"]) == [
        ("10.1.0.5", "allow"),
        ("10.9.0.5", "deny"),
    ]

    test = rf("policy", "test", pol_dir, "--inventory", inv, ok=False).stdout
    assert "FAIL  web is cut off from db" in test
    assert "expected deny, policy says allow for 10.1.0.5 → 10.1.0.2" in test

    store = str(tmp_path / "store")
    prov = rf("policy", "provision", pol_dir, "--inventory", inv, "--store", store, "-m", "cut web off", ok=False)
    assert "provisioned" not in prov.stdout

    matrix = json.loads(rf("connectivity", "--policy", pol, "--inventory", inv, "--workloads", "--json").stdout)
    assert [(p["from"], p["to"], p["services"]) for p in matrix["pairs"]] == [("web1", "db1", ["tcp/5432"])]


def test_cli_expect_allow_holds_for_some_pair_and_says_which(tmp_path: Path) -> None:
    """``expect: allow`` means the source can reach the destination (some address pair): it
    passes, and says which pairs are allowed; an address named with ``ip:`` asserts that one."""
    text = DENY.replace("expect: deny}", "expect: allow}") + (
        "  - {name: quarantined address cut off, from: {ip: 10.9.0.5}, to: {workload: db1}, port: tcp/5432, expect: deny}\n"
        "  - {name: other address open, from: {ip: 10.1.0.5}, to: {workload: db1}, port: tcp/5432, expect: allow}\n"
    )
    pol_dir, _, inv = estate(tmp_path, text, DENY_INV)
    out = rf("policy", "test", pol_dir, "--inventory", inv).stdout
    assert "ok    web is cut off from db (allowed for 10.1.0.5 → 10.1.0.2 only)" in out
    assert "ok    quarantined address cut off\n" in out and "ok    other address open\n" in out


# --- property: explain's top level is what the pairs, and the matrix, decide ---------------------

_RANK = {"deny": 0, "would-deny": 1, "allow": 2}


STAGED_ON_ONE_PAIR = (
    HEAD
    + """ip_lists:
  - {name: v6net, cidrs: ["fd01::/64"]}
rulesets:
  - name: r
    scope: all()
    same: []
    rules:
      - {name: out-any, from: role == client, to: {ip_list: any}, services: [tcp/80]}
  - name: st
    scope: all()
    same: []
    staged: true
    rules:
      - {name: in-v6-staged, from: {ip_list: v6net}, to: role == server, services: [tcp/80]}
"""
)


def test_cli_a_staged_verdict_of_one_pair_shows_that_pairs_sides(tmp_path: Path) -> None:
    """Every pair denied live, a staged rule would open the v6 pair: the sides shown were the v4
    pair's (the first of the live best), so "staged rulesets would make this: ALLOW" came with no
    staged rule anywhere in the text or the JSON. The pair deciding the staged verdict is shown."""
    _, pol, inv = estate(tmp_path, STAGED_ON_ONE_PAIR, CROSS_INV)
    args = ("explain", "--policy", pol, "--inventory", inv, "--from", "c", "--to", "s", "--port", "tcp/80")
    out = rf(*args).stdout
    assert "st/in-v6-staged [staged]" in out and "staged rulesets would make this: ALLOW" in out, out
    assert "fd01::1 → fd01::2: DENY (staged: ALLOW)" in out, out
    doc = json.loads(rf(*args, "--json").stdout)
    assert (doc["verdict"], doc["staged_verdict"]) == ("deny", "allow")
    assert doc["sides_for"] == {"from": "fd01::1", "to": "fd01::2"}
    assert [[r["id"] for r in s["rules"]] for s in doc["sides"]] == [["r/out-any"], ["st/in-v6-staged"]]
    assert [(p["from"], p["staged_verdict"]) for p in doc["by_address"]] == [("10.1.0.1", None), ("fd01::1", "allow")]


def _pairs(src: Endpoint, dst: Endpoint) -> list[tuple[Address | None, Address | None]]:
    return [
        (sa, da)
        for sa in src.addrs or (None,)
        for da in dst.addrs or (None,)
        if sa is None or da is None or sa[0] == da[0]
    ]


def _one(ep: Endpoint, addr: Address | None) -> Endpoint:
    return ep if addr is None else replace(ep, addrs=(addr,))


def _check(top: Decision, per: list[tuple[Address | None, Address | None, Decision]]) -> None:
    if not per:
        return  # no pair of one family: judged whole
    policy = [p.policy_verdict for _, _, p in per]
    assert top.policy_verdict == ("allow" if "allow" in policy else "deny"), (top, policy)
    assert top.verdict == max((p.verdict for _, _, p in per), key=_RANK.__getitem__)
    staged = max((p.staged_verdict or p.verdict for _, _, p in per), key=_RANK.__getitem__)
    assert (top.staged_verdict or top.verdict) == staged
    top_key = (top.verdict, top.policy_verdict, staged)
    differs = any((p.verdict, p.policy_verdict, p.staged_verdict or p.verdict) != top_key for _, _, p in per)
    assert bool(top.by_address) == differs
    if top.by_address:
        assert [(a, b, v) for a, b, v in top.by_address] == [(a, b, p.verdict) for a, b, p in per]


@st.composite
def multi_address_estates(draw: Any) -> list[Workload]:
    """2–5 workloads, most with several addresses (v4 and v6, some shared) that the random
    policies' IP lists (corp, servers, most with an exclusion, v6) tell apart."""
    out = []
    for i in range(draw(st.integers(min_value=2, max_value=5))):
        w = draw(workloads(f"w{i}"))
        ips = draw(st.lists(st.sampled_from(IPS4 + IPS6), min_size=1, max_size=4, unique=True))
        out.append(w.model_copy(update={"ips": ips}))
    return out


@settings(max_examples=200, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(multi_address_estates(), random_policy_texts(), st.sampled_from(RANDOM_PROBES))
def test_explain_top_level_equals_pairs_matrix_and_policy_tests(
    initial: list[Workload], text: str, probe: tuple[str, int]
) -> None:
    """Random estates (0–3 addresses per workload, v4 and v6, shared; modes, quarantine) and random
    policies (IP lists holding all, some, one-excluded and IPv6 addresses; deny, override-deny,
    staged): for every workload pair, explain's top-level verdicts are what the address pairs
    decide one by one, the matrix lists the pair iff the policy verdict is allow, and a policy
    test ``expect: deny`` passes iff every pair is denied, ``expect: allow`` iff some pair is allowed."""
    proto, port = probe
    ids = [w.id for w in initial]
    port_text = f"{proto}/{port}"
    tests = [
        f"  - {{name: '{a} {b} {expect}', from: {{workload: {a}}}, to: {{workload: {b}}}, port: {port_text}, "
        f"expect: {expect}}}"
        for a in ids
        for b in ids
        if a != b
        for expect in ("allow", "deny")
    ]
    pol = load_policy_texts({"p.yaml": text + ("tests:\n" + "\n".join(tests) + "\n" if tests else "")})
    engine = Engine(pol)
    engine.load(initial)
    matrix = compute(pol, engine.workloads.values())
    services = {(a, b): edge.services for a, b, edge in matrix.workload_pairs()}
    results = {r.test.name: r for r in run_tests(pol, engine.workloads)}
    for s in engine.workloads.values():
        for d in engine.workloads.values():
            if s.id == d.id:
                continue
            src, dst = workload_endpoint(s), workload_endpoint(d)
            top = decide(pol, src, dst, proto, port)
            per = [(sa, da, decide(pol, _one(src, sa), _one(dst, da), proto, port)) for sa, da in _pairs(src, dst)]
            _check(top, per)
            if not s.quarantined and not d.quarantined:
                assert any(r.matches(proto, port) for r in services.get((s.id, d.id), ())) == (
                    top.policy_verdict == "allow"
                ), f"{s.id} {s.addrs} -> {d.id} {d.addrs} {proto}/{port}: matrix disagrees with explain"
            if top.sides and per:
                some = any(p.policy_verdict == "allow" for _, _, p in per)
                assert results[f"{s.id} {d.id} allow"].passed == some
                assert results[f"{s.id} {d.id} deny"].passed == (not some)
