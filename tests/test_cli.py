"""The real ``ringfence`` console script, end to end on the shipped example."""

from __future__ import annotations

import argparse
import json
import shutil
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

from ringfence.cli import build_parser
from tests.conftest import EXAMPLE, ROOT

BIN = Path(sys.executable).parent / "ringfence"
POLICY = str(EXAMPLE / "policy")
INVENTORY = str(EXAMPLE / "inventory.yaml")


def rf(*args: str, cwd: Path | None = None, ok: bool = True) -> subprocess.CompletedProcess[str]:
    proc = subprocess.run([str(BIN), *args], capture_output=True, text=True, cwd=cwd or ROOT, timeout=120)
    if ok:
        assert proc.returncode == 0, proc.stdout + proc.stderr
    return proc


def test_validate() -> None:
    assert "13 rules" in rf("policy", "validate", POLICY).stdout


def test_validate_reports_every_problem_and_exits_1(tmp_path: Path) -> None:
    bad = tmp_path / "bad.yaml"
    bad.write_text(
        "rulesets:\n  - name: x\n    scope: tier == a\n    rules:\n      - {from: all(), to: all(), services: [nope]}\n"
    )
    proc = rf("policy", "validate", str(bad), ok=False)
    assert proc.returncode == 1
    assert f"{bad}:3:12: unknown label dimension 'tier'" in proc.stderr
    assert f"{bad}:5:" in proc.stderr and "undefined service 'nope'" in proc.stderr


def test_policy_tests_pass_on_example() -> None:
    out = rf("policy", "test", POLICY, "--inventory", INVENTORY).stdout
    assert "13 passed, 0 failed" in out


def test_failing_policy_test_exits_nonzero_with_readable_diff(tmp_path: Path) -> None:
    pol = tmp_path / "policy"
    shutil.copytree(EXAMPLE / "policy", pol)
    tests = (
        (pol / "tests.yaml")
        .read_text()
        .replace(
            "    port: tcp/5432\n    expect: deny\n  - name: dev never",
            "    port: tcp/5432\n    expect: allow\n  - name: dev never",
            1,
        )
    )
    (pol / "tests.yaml").write_text(tests)
    proc = rf("policy", "test", str(pol), "--inventory", INVENTORY, ok=False)
    assert proc.returncode == 1
    assert "FAIL  web cannot skip a tier to the database" in proc.stdout
    assert "expected allow, policy says deny" in proc.stdout
    assert "no rule matches: default deny" in proc.stdout
    assert "12 passed, 1 failed" in proc.stdout


def test_explain_text_and_json() -> None:
    out = rf(
        "explain",
        "--policy",
        POLICY,
        "--inventory",
        INVENTORY,
        "--from",
        "ord-dev-proc-1",
        "--to",
        "ord-prod-db-1",
        "--port",
        "tcp/5432",
    ).stdout
    assert "DENY" in out and "boundaries/dev-never-reaches-prod" in out and "boundaries.yaml:8:9" in out
    js = json.loads(
        rf(
            "explain",
            "--policy",
            POLICY,
            "--inventory",
            INVENTORY,
            "--from",
            "role=processing,app=ordering,env=prod,loc=ca",
            "--to",
            "10.1.3.10",
            "--port",
            "tcp/5432",
            "--json",
        ).stdout
    )
    assert js["verdict"] == "allow"
    assert {s["deciding_rule"] for s in js["sides"]} == {"ordering/processing-to-database"}


def test_explain_bad_endpoint_is_a_clear_error() -> None:
    proc = rf(
        "explain",
        "--policy",
        POLICY,
        "--inventory",
        INVENTORY,
        "--from",
        "nobody",
        "--to",
        "ord-prod-db-1",
        "--port",
        "tcp/5432",
        ok=False,
    )
    assert proc.returncode == 1 and "'nobody' is not a workload id in the inventory" in proc.stderr


def test_connectivity_json() -> None:
    doc = json.loads(rf("connectivity", "--policy", POLICY, "--inventory", INVENTORY, "--workloads", "--json").stdout)
    pairs = {(r["from"], r["to"]): r["services"] for r in doc["pairs"]}
    assert pairs[("ord-prod-proc-1", "ord-prod-db-1")] == ["tcp/5432"]
    assert ("ord-prod-web-1", "ord-prod-db-1") not in pairs
    assert ("ord-dev-proc-1", "ord-prod-db-1") not in pairs
    assert doc["allowed_workload_pairs"] == len(doc["pairs"])


def _rule_ids(doc: dict[str, Any], row: dict[str, Any]) -> list[str]:
    return [doc["rules"][i]["id"] for i in doc["rule_sets"][row["rule_set"]]]


def test_connectivity_equals_the_matrix_over_compiled_states() -> None:
    """The command builds no engine; its pairs and groups are those of the engine's states, each rule
    and each combination of allowing rules listed once and referred to by number."""
    from ringfence.engine import Engine
    from ringfence.engine.connectivity import compute, group_name
    from ringfence.inventory import load_inventory
    from ringfence.policy import load_policy

    policy = load_policy(Path(POLICY))
    engine = Engine(policy)
    engine.load(load_inventory(Path(INVENTORY)))
    m = compute(policy, engine.workloads.values(), include_staged=True)
    base = ("connectivity", "--policy", POLICY, "--inventory", INVENTORY, "--staged", "--json")
    doc = json.loads(rf(*base, "--workloads").stdout)
    assert {(r["from"], r["to"]): (r["services"], _rule_ids(doc, r)) for r in doc["pairs"]} == {
        (a, b): ([str(x) for x in e.services], e.rules) for a, b, e in m.workload_pairs()
    }
    assert len({r["id"] for r in doc["rules"]}) == len(doc["rules"])
    assert len({tuple(s) for s in doc["rule_sets"]}) == len(doc["rule_sets"])
    groups = json.loads(rf(*base).stdout)
    names = [g["name"] for g in groups["groups"]]
    assert {(names[r["from"]], names[r["to"]]): (r["services"], _rule_ids(groups, r)) for r in groups["edges"]} == {
        (group_name(s), group_name(d)): ([str(x) for x in e.services], e.rules) for (s, d), e in m.edges.items()
    }
    assert {g["name"]: g["workloads"] for g in groups["groups"]} == {group_name(k): len(v) for k, v in m.groups.items()}
    text = rf(*base[:-1]).stdout
    assert (
        text.splitlines()[-1] == f"{len(m.edges)} allowed group pairs, {m.allowed_pair_count()} workload pairs in all"
    )


def test_the_cli_imports_only_what_a_command_needs() -> None:
    """The fixed cost of every command is Python's start and the CLI module: no pydantic, no compiler."""
    code = "import sys, ringfence.cli; ringfence.cli.build_parser(); print(sorted(sys.modules))"
    loaded = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    for heavy in ("pydantic", "ringfence.engine.compiler", "ringfence.bundle", "cryptography", "yaml"):
        assert f"'{heavy}'" not in loaded, f"{heavy} imported before a command runs"
    from ringfence import bundle

    args = build_parser().parse_args(["compile", "--policy", "p", "--inventory", "i", "--out", "o"])
    assert args.expires_in == bundle.DEFAULT_TTL, "the parser's default, written out, is the bundles' lifetime"


def test_labels_check_reports_and_strict_fails() -> None:
    proc = rf("labels", "check", "--policy", POLICY, "--inventory", INVENTORY, "--strict", ok=False)
    assert proc.returncode == 1
    assert "ord-prod-web-9: UNLABELED" in proc.stdout and "did you mean 'prod'?" in proc.stdout


def test_provision_versions_diff(tmp_path: Path) -> None:
    store = str(tmp_path / "store")
    pol = tmp_path / "policy"
    shutil.copytree(EXAMPLE / "policy", pol)
    assert (
        "provisioned policy version 1"
        in rf(
            "policy",
            "provision",
            str(pol),
            "--inventory",
            INVENTORY,
            "--store",
            store,
            "-m",
            "initial",
            "--author",
            "alice",
        ).stdout
    )
    # the same content from another checkout is the same version
    other = tmp_path / "elsewhere" / "policy"
    shutil.copytree(pol, other)
    out = rf("policy", "provision", str(other), "--inventory", INVENTORY, "--store", store, "-m", "again").stdout
    assert "identical to active version 1" in out
    # the draft drops the jumpbox rule and opens web → database directly
    (pol / "boundaries.yaml").write_text((pol / "boundaries.yaml").read_text().split("  - name: admin")[0])
    (pol / "tests.yaml").write_text(
        (pol / "tests.yaml").read_text().split("  - name: jumpbox reaches")[0]
        + "  - name: keep\n    from: {workload: ord-prod-proc-1}\n    to: {workload: ord-prod-db-1}\n"
        "    port: tcp/5432\n    expect: allow\n"
    )
    out = rf("policy", "diff", str(pol), "--inventory", INVENTORY, "--store", store).stdout
    assert "draft vs active version 1" in out
    assert "- admin/jumpbox-ssh" in out
    assert "access lost" in out and "admin-jump-1 → ord-prod-db-1 tcp/22" in out
    assert "access gained" not in out
    rf("policy", "provision", str(pol), "--inventory", INVENTORY, "--store", store, "-m", "retire the jumpbox")
    versions = rf("policy", "versions", "--store", store).stdout.splitlines()
    assert len(versions) == 2 and "alice" in versions[0] and "retire the jumpbox" in versions[1]
    # the estate moved on: the jumpbox is now tagged as a bastion, so version 1's jumpbox test fails
    moved = tmp_path / "moved.yaml"
    moved.write_text(Path(INVENTORY).read_text().replace("role: jumpbox", "role: bastion"))
    refused = rf("policy", "revert", "1", "--store", store, "--inventory", str(moved), "-m", "back", ok=False)
    assert refused.returncode != 0 and "jumpbox reaches prod database" in refused.stderr
    assert "policy test(s) of version 1 fail now: nothing reverted" in refused.stderr
    assert len(rf("policy", "versions", "--store", store).stdout.splitlines()) == 2
    assert (
        "content of version 1"
        in rf("policy", "revert", "1", "--store", store, "--inventory", INVENTORY, "-m", "jumpbox still needed").stdout
    )
    audit = [json.loads(line) for line in (tmp_path / "store" / "audit.jsonl").read_text().splitlines()]
    assert [(a["action"], a["target"]) for a in audit] == [
        ("policy.provision", "policy/1"),
        ("policy.provision", "policy/2"),
        ("policy.revert", "policy/3"),
    ]
    assert audit[2]["detail"]["reverted_to"] == 1 and audit[2]["principal"]
    assert "forced_past_failing_tests" not in audit[2]["detail"]
    assert "no differences" in rf("policy", "diff", str(EXAMPLE / "policy"), "--store", store).stdout
    stored = tmp_path / "store" / "versions" / "000001.json"
    assert not stored.stat().st_mode & 0o222, "provisioned versions are read-only"


def test_provision_refuses_when_tests_fail(tmp_path: Path) -> None:
    pol = tmp_path / "policy"
    shutil.copytree(EXAMPLE / "policy", pol)
    (pol / "ordering.yaml").write_text(
        (pol / "ordering.yaml").read_text().replace("services: [postgres]", "services: [ssh]")
    )
    proc = rf(
        "policy", "provision", str(pol), "--inventory", INVENTORY, "--store", str(tmp_path / "s"), "-m", "x", ok=False
    )
    assert proc.returncode == 1 and "policy test(s) fail: nothing provisioned" in proc.stderr
    assert not (tmp_path / "s" / "versions").exists()


def test_compile_signs_and_bundle_verify(tmp_path: Path) -> None:
    rf("keygen", "--out", str(tmp_path / "keys"))
    rf(
        "compile",
        "--policy",
        POLICY,
        "--inventory",
        INVENTORY,
        "--out",
        str(tmp_path / "out"),
        "--key",
        str(tmp_path / "keys" / "bundle-signing.pem"),
    )
    b = tmp_path / "out" / "bundles" / "ord-prod-db-1.json"
    assert (
        "ok: bundle for ord-prod-db-1"
        in rf("bundle", "verify", str(b), "--public-key", str(tmp_path / "keys" / "bundle-signing.pub.pem")).stdout
    )
    b.write_text(b.read_text().replace('"enforce"', '"idle"'))
    proc = rf("bundle", "verify", str(b), "--public-key", str(tmp_path / "keys" / "bundle-signing.pub.pem"), ok=False)
    assert "signature does not verify" in proc.stderr


def test_policy_schema_matches_committed_copy() -> None:
    assert rf("policy", "schema").stdout == (ROOT / "docs" / "policy.schema.json").read_text()


@pytest.mark.slow
def test_demo_runs(tmp_path: Path) -> None:
    out = rf("demo", "--offline", "--out", str(tmp_path / "demo")).stdout
    assert "13 passed, 0 failed" in out
    assert "ord-prod-web-1 → ord-prod-proc-1 tcp/8443 is now DENY" in out
    assert len(list((tmp_path / "demo" / "bundles").glob("*.json"))) == 20
    # the console script is not on PATH after `make`: the closing hint names it where it is
    assert "try: .venv/bin/ringfence explain" in out


def test_example_files_validate_against_the_published_schema() -> None:
    import jsonschema
    import yaml

    schema = json.loads((ROOT / "docs" / "policy.schema.json").read_text())
    for path in sorted((EXAMPLE / "policy").glob("*.yaml")):
        jsonschema.validate(yaml.safe_load(path.read_text()), schema)
        assert path.read_text().startswith("# yaml-language-server: $schema=../../../docs/policy.schema.json")


def test_compile_keeps_workload_ids_out_of_path_syntax(tmp_path: Path) -> None:
    inv = tmp_path / "inv.yaml"
    inv.write_text(
        "workloads:\n  - {id: ../../escape, ips: [10.0.0.1], tags: {ringfence:role: web, ringfence:app: ordering, ringfence:env: prod}}\n"
        "  - {id: /subscriptions/s/vm/x, ips: [10.0.0.2], tags: {ringfence:role: db, ringfence:app: ordering, ringfence:env: prod}}\n"
    )
    rf("compile", "--policy", POLICY, "--inventory", str(inv), "--out", str(tmp_path / "out"))
    names = sorted(p.name for p in (tmp_path / "out" / "bundles").iterdir())
    assert names == ["%2Fsubscriptions%2Fs%2Fvm%2Fx.json", "..%2F..%2Fescape.json"]
    assert not (tmp_path / "escape.json").exists()


def test_later_compiles_have_higher_versions(tmp_path: Path) -> None:
    versions = []
    for run in ("a", "b"):
        rf("compile", "--policy", POLICY, "--inventory", INVENTORY, "--out", str(tmp_path / run))
        versions.append(json.loads((tmp_path / run / "bundles" / "ord-prod-db-1.json").read_text())["version"])
    assert versions[1] > versions[0]


def test_non_utf8_policy_is_a_clear_error(tmp_path: Path) -> None:
    bad = tmp_path / "p.yaml"
    bad.write_bytes(b"services: []\n# \xff\n")
    proc = rf("policy", "validate", str(bad), ok=False)
    assert proc.returncode == 1 and "not UTF-8 text" in proc.stderr and "Traceback" not in proc.stderr


def test_bench_json_has_the_documented_keys() -> None:
    result = json.loads(rf("bench", "--workloads", "200", "--changes", "20", "--json").stdout)
    for key in (
        "workloads",
        "rules",
        "full_compile_s",
        "incremental_p50_s",
        "incremental_p99_s",
        "naive_pair_rules",
        "compiled_rules",
        "compiled_set_elements",
        "bundle_bytes_total",
        "peak_rss_mb",
        "avg_notified_per_change",
        "avg_necessary_per_change",
        "notified_vs_necessary",
    ):
        assert key in result, key
    assert result["workloads"] == 200 and result["naive_pair_rules"] > 0
    # the reference ran on every change and the engine reached every agent it names
    assert result["necessary_sampled_changes"] == 20 and result["necessary_not_notified"] == 0
    assert result["avg_notified_per_change"] >= result["avg_necessary_per_change"] > 0


def test_export_calico(tmp_path: Path) -> None:
    import yaml

    rf("export", "calico", "--policy", POLICY, "--inventory", INVENTORY, "--out", str(tmp_path / "calico.yaml"))
    docs = list(yaml.safe_load_all((tmp_path / "calico.yaml").read_text()))
    kinds = {d["kind"] for d in docs}
    assert {"HostEndpoint", "GlobalNetworkPolicy"} <= kinds
    assert sum(d["kind"] == "HostEndpoint" for d in docs) == 20


def test_forced_revert_past_failing_tests_is_audited(tmp_path: Path) -> None:
    store = str(tmp_path / "store")
    rf("policy", "provision", str(EXAMPLE / "policy"), "--inventory", INVENTORY, "--store", store, "-m", "one")
    pol = tmp_path / "policy"
    shutil.copytree(EXAMPLE / "policy", pol)
    (pol / "tests.yaml").write_text((pol / "tests.yaml").read_text().split("  - name: jumpbox reaches")[0])
    (pol / "boundaries.yaml").write_text((pol / "boundaries.yaml").read_text().split("  - name: admin")[0])
    rf("policy", "provision", str(pol), "--inventory", INVENTORY, "--store", store, "-m", "two")
    moved = tmp_path / "moved.yaml"
    moved.write_text(Path(INVENTORY).read_text().replace("role: jumpbox", "role: bastion"))
    proc = rf("policy", "revert", "1", "--store", store, "--inventory", str(moved), "--force", "-m", "outage")
    assert "content of version 1" in proc.stdout and "--force" in proc.stderr
    audit = [json.loads(line) for line in (tmp_path / "store" / "audit.jsonl").read_text().splitlines()]
    assert audit[-1]["action"] == "policy.revert" and audit[-1]["detail"]["forced_past_failing_tests"] >= 1


def _undocumented(parser: argparse.ArgumentParser, path: str) -> list[str]:
    """Every argument and subcommand under ``parser`` that has no help text, by command path."""
    missing = []
    for action in parser._actions:
        if isinstance(action, argparse._HelpAction):
            continue
        name = "/".join(action.option_strings) or action.dest
        if not (action.help or "").strip():
            missing.append(f"{path} {name}")
        if isinstance(action, argparse._SubParsersAction):
            documented = {a.dest for a in action._choices_actions if (a.help or "").strip()}
            for sub_name, sub in action.choices.items():
                if sub_name not in documented:
                    missing.append(f"{path} {sub_name} (subcommand)")
                missing += _undocumented(sub, f"{path} {sub_name}")
    return missing


def test_every_argument_and_subcommand_has_help() -> None:
    assert _undocumented(build_parser(), "ringfence") == []


def test_the_help_walk_finds_an_undocumented_argument() -> None:
    parser = build_parser()
    parser.add_argument("--no-help-here")
    assert _undocumented(parser, "ringfence") == ["ringfence --no-help-here"]


def test_connectivity_output_read_partly_is_not_an_error(tmp_path: Path) -> None:
    """Output is streamed: a reader that stops early (`| head`) ends the command quietly."""
    from tests.bench.random_estate import generate

    generate(tmp_path, workloads=200, rules=40)
    cmd = [sys.executable, "-m", "ringfence.cli", "connectivity", "--workloads", "--json"]
    cmd += ["--policy", str(tmp_path / "policy"), "--inventory", str(tmp_path / "inventory.yaml")]
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    assert proc.stdout is not None and proc.stderr is not None
    assert proc.stdout.read(10) == b'{"format":'
    proc.stdout.close()  # far more than a pipe's buffer is left to write
    err = proc.stderr.read()
    proc.wait(timeout=60)
    assert b"Traceback" not in err and proc.returncode == 141
