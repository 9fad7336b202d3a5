"""Rule suggestions from observed flows: real flow rows (a VPC Flow Log ingested into SQLite), the
suggestion loaded with the example policy by the real loader, and the engine showing that what was
observed becomes allowed while what was not stays blocked; lateral movement flagged, not proposed."""

from __future__ import annotations

import gzip
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml

from ringfence.engine import Engine
from ringfence.engine.explain import decide, labels_endpoint, workload_endpoint
from ringfence.flows.ingest import FlowIngest
from ringfence.flows.suggest import _term, merged_policy, port_specs, suggest
from ringfence.inventory import load_inventory
from ringfence.policy import Policy, load_policy
from ringfence.policytests import run_tests
from ringfence.selectors import In, parse
from ringfence.store.base import InventoryRecord
from ringfence.store.sqlite import SqliteStore

EXAMPLE = Path(__file__).parent.parent / "examples" / "ordering"
CLI = str(Path(sys.executable).parent / "ringfence")
# payroll is a crown-jewel app: a label group of that name says so (the policy's own word)
CROWN = "label_groups:\n  - {name: crown-jewels, dimension: app, values: [payroll]}\n"

# (src, dst, dport, action): what the wire showed
SEEN = [
    ("10.1.1.10", "10.1.2.10", 8444, "REJECT"),  # prod web → prod processing: new ports, blocked
    ("10.1.1.11", "10.1.2.11", 8445, "REJECT"),
    ("10.1.1.10", "10.1.2.10", 8447, "REJECT"),  # 8446 never seen: no range over it
    ("10.1.2.10", "10.1.3.10", 6432, "REJECT"),  # prod processing → prod database (a pooler)
    ("10.2.1.10", "10.2.2.10", 9000, "REJECT"),  # dev web → dev processing
    ("10.2.2.10", "10.1.3.10", 5432, "REJECT"),  # dev processing → prod database: env crossing
    ("10.1.2.10", "10.1.11.10", 1433, "REJECT"),  # ordering → payroll's database: crown jewel
    ("93.184.216.40", "10.1.1.10", 8080, "REJECT"),  # the internet → web directly
    ("10.5.5.5", "10.1.2.10", 8443, "REJECT"),  # an address no workload holds
    ("10.1.1.10", "93.184.216.34", 443, "REJECT"),  # web → the internet: no label rule for it
    ("10.1.1.10", "10.1.2.10", 8443, "ACCEPT"),  # allowed today: pinned with include_allowed
]
WEB, PROC, DB = (f"app=ordering,env=prod,loc=ca,role={r}" for r in ("web", "processing", "database"))


def policy_dir(tmp_path: Path) -> Path:
    d = tmp_path / "policy"
    shutil.copytree(EXAMPLE / "policy", d)
    (d / "crown.yaml").write_text(CROWN)
    return d


@pytest.fixture()
def seen(tmp_path: Path) -> tuple[Path, str, Policy]:
    pdir = policy_dir(tmp_path)
    policy = load_policy(pdir)
    db = tmp_path / "flows.db"
    store = SqliteStore(db)
    for w in load_inventory(EXAMPLE / "inventory.yaml"):
        store.observe(InventoryRecord(id=w.id, workload=w, observed_at=1.0))
    ingest = FlowIngest(store, policy)
    now = int(time.time())
    ingest.sync(at=now - 3600.0)
    lines = ["version srcaddr dstaddr dstport protocol packets bytes start end action log-status"]
    for i, (s, d, port, action) in enumerate(SEEN):
        lines.append(f"2 {s} {d} {port} 6 4 400 {now - 600 + i} {now - 500 + i} {action} OK")
    ingest.vpc_object("seen.log.gz", gzip.compress("\n".join(lines).encode()))
    return pdir, f"sqlite:{db}", policy


def test_ports_are_exact_and_ranges_only_where_every_port_was_seen() -> None:
    assert port_specs("tcp", [8445, 8444, 8447, 8444]) == ["tcp/8444-8445", "tcp/8447"]
    assert port_specs("udp", [53]) == ["udp/53"]


@pytest.mark.parametrize("value", ["web", "a:b/c.d", "we b", "web\n", "it's"])
def test_a_proposed_selector_term_names_exactly_the_value_seen(value: str) -> None:
    """A value is written bare only when the whole of it is plain: 'web\n' bare parses as 'web'
    (another workload's value); quoted it round-trips (a quote itself cannot be, and is dropped)."""
    assert parse(_term("app", [value])) == In("app", frozenset({value.replace("'", "")}))


def test_observed_flows_become_allowed_and_nothing_broader(seen: tuple[Path, str, Policy]) -> None:
    _, spec, policy = seen
    sug = suggest(policy, SqliteStore(Path(spec[7:])).flow_rows(), "ordering", include_allowed=True)
    rules = {r.name: r for r in sug.rules}
    assert set(rules) == {
        "web-to-processing-prod-ca-tcp",
        "processing-to-database-prod-ca-tcp",
        "web-to-processing-dev-ca-tcp",
    }, sug.yaml
    r = rules["web-to-processing-prod-ca-tcp"]
    assert r.from_ == "app == ordering && env == prod && loc == ca && role == web"
    assert r.to == "app == ordering && env == prod && loc == ca && role == processing"
    assert r.services == ["tcp/8444-8445", "tcp/8447"] and r.same == ["app", "env", "loc"]
    assert "any" not in sug.yaml and "all()" not in sug.yaml.replace("scope: all()", "")
    flagged = {(f.kind, f.flow.port) for f in sug.flagged}
    assert flagged == {("env-crossing", 5432), ("crown-jewel", 1433), ("from-internet", 8080), ("from-unknown", 8443)}
    assert {(f.kind, f.flow.dst) for f in sug.skipped} == {("to-outside", "internet")}
    assert [(p.src, p.dst, p.port) for p in sug.pinned] == [(WEB, PROC, 8443)]

    # the file loads with the policy by the real loader, and its tests (one per observed flow) pass
    merged = merged_policy(policy, sug)
    doc = yaml.safe_load(sug.yaml)
    assert len(doc["tests"]) == 6 and all(t["expect"] == "allow" for t in doc["tests"])
    engine = Engine(merged)
    engine.load(load_inventory(EXAMPLE / "inventory.yaml"))
    results = run_tests(merged, engine.workloads)
    assert all(t.passed for t in results), [t.report() for t in results if not t.passed]

    # the engine: observed flows allowed (by the suggested rules), a sample of unobserved ones not
    ws = engine.workloads

    def verdict(p: Policy, src: str, dst: str, port: int) -> tuple[str, str]:
        d = decide(p, workload_endpoint(ws[src]), workload_endpoint(ws[dst]), "tcp", port)
        deciding = [s.deciding.id for s in d.sides if s.deciding is not None]
        return d.policy_verdict, ",".join(deciding)

    for src, dst, port in [
        ("ord-prod-web-1", "ord-prod-proc-1", 8444),
        ("ord-prod-web-2", "ord-prod-proc-2", 8445),
        ("ord-prod-web-1", "ord-prod-proc-1", 8447),
        ("ord-prod-proc-1", "ord-prod-db-1", 6432),
        ("ord-dev-web-1", "ord-dev-proc-1", 9000),
    ]:
        assert verdict(policy, src, dst, port)[0] == "deny"  # blocked before
        after, by = verdict(merged, src, dst, port)
        assert after == "allow" and by.startswith(f"{sug.ruleset}/"), (src, dst, port, by)
    for src, dst, port in [
        ("ord-prod-web-1", "ord-prod-proc-1", 8446),  # the gap in the ports
        ("ord-prod-web-1", "ord-prod-proc-1", 9000),  # dev's port, not prod's
        ("ord-dev-web-1", "ord-dev-proc-1", 8444),  # prod's port, not dev's
        ("ord-prod-proc-1", "ord-prod-web-1", 8444),  # the reverse direction
        ("ord-prod-lb-1", "ord-prod-proc-1", 8444),  # another role
        ("ord-prod-web-1", "ord-prod-db-1", 6432),  # web skipping a tier
        ("ord-dev-proc-1", "ord-prod-db-1", 5432),  # flagged, not proposed
        ("ord-prod-proc-1", "pay-prod-db-1", 1433),  # flagged, not proposed
        ("ord-dev-web-1", "ord-prod-proc-1", 8444),  # dev → prod on a suggested port
    ]:
        assert verdict(merged, src, dst, port)[0] == "deny", (src, dst, port)
    # hypothetical workloads of another loc or app are not opened either
    other = labels_endpoint(merged, {"app": "payroll", "env": "prod", "role": "web"})
    proc = labels_endpoint(merged, {"app": "payroll", "env": "prod", "role": "processing"})
    assert decide(merged, other, proc, "tcp", 8444).policy_verdict == "deny"


def test_an_override_deny_keeps_a_flow_flagged_not_proposed(seen: tuple[Path, str, Policy], tmp_path: Path) -> None:
    pdir, spec, _ = seen
    # a boundary around the pooler port: no allow can open it, so the suggestion must not pretend to
    (pdir / "pooler.yaml").write_text(
        "rulesets:\n  - name: no-pooler\n    scope: all()\n    same: []\n    rules:\n"
        "      - {name: never, from: all(), to: role == database, services: [tcp/6432], action: override-deny}\n"
    )
    policy = load_policy(pdir)
    sug = suggest(policy, SqliteStore(Path(spec[7:])).flow_rows(), "ordering")
    assert not any(r.name.startswith("processing-to-database") for r in sug.rules)
    (held,) = [f for f in sug.flagged if f.kind == "override-deny"]
    assert held.flow.port == 6432 and "no-pooler/never" in held.reason and "pooler.yaml:" in held.reason


def test_min_flows_env_and_an_app_with_nothing_to_suggest(seen: tuple[Path, str, Policy]) -> None:
    _, spec, policy = seen
    rows = SqliteStore(Path(spec[7:])).flow_rows()
    dev = suggest(policy, rows, "ordering", env="dev")
    assert [r.name for r in dev.rules] == ["web-to-processing-dev-ca-tcp"]
    assert {f.kind for f in dev.flagged} == {"env-crossing"}  # dev processing → prod database
    assert suggest(policy, rows, "ordering", min_flows=2).rules == []
    none = suggest(policy, rows, "core")
    assert none.rules == [] and yaml.safe_load(none.yaml) == {"rulesets": [], "tests": []}
    merged_policy(policy, none)  # still a valid policy file


def test_the_cli_writes_a_file_that_validates_tests_and_explains(
    seen: tuple[Path, str, Policy], tmp_path: Path
) -> None:
    pdir, spec, _ = seen
    inv = str(EXAMPLE / "inventory.yaml")
    out = tmp_path / "suggested.yaml"
    run = subprocess.run(
        [CLI, "suggest", "--app", "ordering", "--policy", str(pdir), "--flows", spec, "--inventory", inv,
         "--out", str(out)],
        capture_output=True, text=True, check=False,
    )  # fmt: skip
    assert run.returncode == 0, run.stderr
    assert "3 rules proposed" in run.stderr and "4 flagged" in run.stderr and "policy tests pass, 0 fail" in run.stderr
    text = out.read_text()
    assert "# FLAGGED, not proposed" in text and "[env-crossing] crosses environments: dev → prod" in text
    shutil.copy(out, pdir / "suggested-ordering.yaml")
    for argv in (["policy", "validate", str(pdir)], ["policy", "test", str(pdir), "--inventory", inv]):
        r = subprocess.run([CLI, *argv], capture_output=True, text=True, check=False)
        assert r.returncode == 0, r.stdout + r.stderr
    explain = [CLI, "explain", "--policy", str(pdir), "--inventory", inv, "--from", "ord-prod-web-1", "--to"]
    r = subprocess.run([*explain, "ord-prod-proc-1", "--port", "tcp/8445"], capture_output=True, text=True, check=True)
    assert "suggested-ordering/web-to-processing-prod-ca-tcp" in r.stdout and "suggested-ordering.yaml:" in r.stdout
    r = subprocess.run([*explain, "ord-prod-proc-1", "--port", "tcp/8446"], capture_output=True, text=True, check=True)
    assert "default deny" in r.stdout or "deny" in r.stdout.splitlines()[0]
    js = subprocess.run(
        [CLI, "suggest", "--app", "ordering", "--policy", str(pdir), "--flows", spec, "--json"],
        capture_output=True, text=True, check=True,
    ).stdout  # fmt: skip
    assert '"kind": "crown-jewel"' in js


def test_a_flow_the_policy_allows_now_is_not_proposed_again(seen: tuple[Path, str, Policy], tmp_path: Path) -> None:
    pdir, spec, _ = seen
    # since the flows were seen, the owner opened prod web → processing on 8444-8445 by hand
    (pdir / "opened.yaml").write_text(
        "rulesets:\n  - name: opened\n    scope: app == ordering\n    rules:\n"
        "      - {name: more-ports, from: role == web, to: role == processing, services: [tcp/8444-8445]}\n"
    )
    policy = load_policy(pdir)
    rows = SqliteStore(Path(spec[7:])).flow_rows()
    sug = suggest(policy, rows, "ordering")
    (prod,) = [r for r in sug.rules if r.name == "web-to-processing-prod-ca-tcp"]
    assert prod.services == ["tcp/8447"]
    assert sorted(f.flow.port or 0 for f in sug.skipped if f.kind == "allowed-now") == [8444, 8445]
    pinned = suggest(policy, rows, "ordering", include_allowed=True).pinned
    assert sorted(p.port or 0 for p in pinned) == [8443, 8444, 8445]
