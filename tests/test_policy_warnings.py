"""Policy warnings: rules that can never match and selectors matching no workload are warnings at
validate and provision time (CLI and admin API, audited), never errors; and findings in
``labels check`` when the estate moves under them."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import yaml

from ringfence.inventory import load_inventory
from ringfence.policy import load_policy
from ringfence.policywarnings import estate_warnings, policy_warnings, warnings

EXAMPLE = Path(__file__).parent.parent / "examples" / "ordering"
CLI = str(Path(sys.executable).parent / "ringfence")
INVENTORY = str(EXAMPLE / "inventory.yaml")

# line numbers matter: the warnings name them
MOOT = """\
rulesets:
  - name: moot
    scope: all()
    same: []
    rules:
      - name: dev-web-to-prod-processing
        from: app == ordering && env == dev && role == web
        to: env == prod && role == processing
        services: [tcp/8443]
      - name: no-ports
        from: role == web
        to: role == database
        services: []
      - name: web-and-database
        from: role == lb
        to: role == web && role == database
        services: [tcp/80]
      - name: dev-to-prod-same-env
        from: env == dev && role == web
        to: env == prod && role == web
        services: [tcp/80]
        same: [env]
      - name: payroll-processing
        from: app == payroll && role == web
        to: app == payroll && role == processing
        services: [tcp/8443]
      - name: payroll-dev-web-to-db
        from: app == payroll && env == dev && role == web
        to: app == payroll && role == database
        services: [tcp/1433]
        same: [app, env]
"""


def moot_dir(tmp_path: Path) -> Path:
    d = tmp_path / "policy"
    shutil.copytree(EXAMPLE / "policy", d)
    (d / "moot.yaml").write_text(MOOT)
    return d


def test_the_example_has_no_warnings() -> None:
    assert warnings(load_policy(EXAMPLE / "policy"), load_inventory(EXAMPLE / "inventory.yaml")) == []


def test_each_kind_with_its_file_and_line(tmp_path: Path) -> None:
    policy = load_policy(moot_dir(tmp_path))
    got = {(w.rule, w.kind, w.location.line) for w in policy_warnings(policy)}
    assert got == {
        ("moot/dev-web-to-prod-processing", "shadowed", 6),
        ("moot/no-ports", "no-ports", 10),
        ("moot/web-and-database", "contradiction", 14),
        ("moot/dev-to-prod-same-env", "contradiction", 18),
    }
    (shadowed,) = [w for w in policy_warnings(policy) if w.kind == "shadowed"]
    assert str(shadowed).endswith(
        "moot.yaml:6:9: warning: rule moot/dev-web-to-prod-processing can never allow anything: override-deny "
        f"boundaries/dev-never-reaches-prod ({tmp_path / 'policy' / 'boundaries.yaml'}:8:9) covers it entirely"
    )
    estate = {(w.rule, w.kind) for w in estate_warnings(policy, load_inventory(EXAMPLE / "inventory.yaml"))}
    assert estate == {("moot/payroll-processing", "no-workload"), ("moot/payroll-dev-web-to-db", "no-pair")}


def test_validate_and_provision_warn_and_never_fail(tmp_path: Path) -> None:
    pol = str(moot_dir(tmp_path))
    r = subprocess.run([CLI, "policy", "validate", pol], capture_output=True, text=True, check=False)
    assert (
        r.returncode == 0 and "4 warning(s)" in r.stderr and "moot.yaml:10:9: warning: rule moot/no-ports" in r.stderr
    )
    r = subprocess.run(
        [CLI, "policy", "validate", pol, "--inventory", INVENTORY], capture_output=True, text=True, check=False
    )
    assert r.returncode == 0 and "6 warning(s)" in r.stderr, r.stderr
    assert "moot.yaml:23:9: warning: rule moot/payroll-processing: `to` selector" in r.stderr
    assert "matches no workload of the estate (20 workloads)" in r.stderr
    store = tmp_path / "store"
    r = subprocess.run(
        [CLI, "policy", "provision", pol, "--inventory", INVENTORY, "--store", str(store), "-m", "moot"],
        capture_output=True, text=True, check=False,
    )  # fmt: skip
    assert r.returncode == 0 and "provisioned policy version 1" in r.stdout, r.stderr
    assert "warning: rule moot/no-ports" in r.stderr
    (entry,) = [json.loads(line) for line in (store / "audit.jsonl").read_text().splitlines()]
    assert len(entry["detail"]["warnings"]) == 6 and any("moot/no-ports" in w for w in entry["detail"]["warnings"])


def test_labels_check_finds_what_the_estate_made_moot(tmp_path: Path) -> None:
    # the estate moves: payroll's database is gone, so payroll's web-to-database matches nothing
    inv = yaml.safe_load((EXAMPLE / "inventory.yaml").read_text())
    inv["workloads"] = [w for w in inv["workloads"] if w["id"] != "pay-prod-db-1"]
    (tmp_path / "inv.yaml").write_text(yaml.safe_dump(inv))
    pol = str(EXAMPLE / "policy")
    argv = [CLI, "labels", "check", "--policy", pol, "--inventory", str(tmp_path / "inv.yaml")]
    r = subprocess.run(argv, capture_output=True, text=True, check=True)
    assert "finding policy/no-workload (" in r.stdout and "payroll.yaml:" in r.stdout
    assert "rule payroll/web-to-database: `to` selector" in r.stdout and "1 findings" in r.stdout
    doc = json.loads(subprocess.run([*argv, "--json"], capture_output=True, text=True, check=True).stdout)
    (f,) = doc["findings"]
    assert f["kind"] == "policy/no-workload" and f["rule"] == "payroll/web-to-database"
    assert [w["workload"] for w in doc["workloads"]] == ["ord-prod-web-9"]
    r = subprocess.run(
        [CLI, "labels", "check", "--policy", pol, "--inventory", INVENTORY], capture_output=True, text=True, check=True
    )
    assert "0 findings" in r.stdout


def test_random_policies_warnings_hold_on_every_probed_pair(tmp_path: Path) -> None:
    """An oracle for the exact selector reasoning: on random policies (tests/bench/random_estate),
    a rule called contradictory matches no pair of label sets (the estate's and random ones), and
    a rule called shadowed matches no pair its override-deny does not."""
    import random

    from ringfence.selectors import matcher
    from tests.bench.random_estate import generate

    generate(tmp_path, workloads=300, rules=250, seed=7)
    policy = load_policy(tmp_path / "policy")
    inv = load_inventory(tmp_path / "inventory.yaml")
    probes = {tuple(sorted(policy.labels.resolve(w).labels.items())) for w in inv}
    values: dict[str, set[str]] = {}
    for p in probes:
        for d, v in p:
            values.setdefault(d, set()).add(v)
    rng = random.Random(7)
    for _ in range(150):  # label sets the estate lacks: other combinations, some dimensions unset
        probes.add(tuple(sorted((d, rng.choice(sorted(vs))) for d, vs in values.items() if rng.random() < 0.85)))
    sets = [dict(p) for p in sorted(probes)]
    rules = {r.id: r for r in policy.rules}

    def pairs(rule_id: str) -> set[tuple[int, int]]:
        """The (consumer, provider) probe pairs the rule matches (-1: an IP-list side, never pinned)."""
        r = rules[rule_id]
        ends = []
        for peer in (r.consumer, r.provider):
            m = matcher(peer.selector) if peer.selector is not None else None
            ends.append([i for i, s in enumerate(sets) if m(s)] if m is not None else [-1])
        return {
            (i, j)
            for i in ends[0]
            for j in ends[1]
            if i < 0 or j < 0 or all(d in sets[i] and sets[i].get(d) == sets[j].get(d) for d in r.same)
        }

    found = policy_warnings(policy)
    kinds = {w.kind for w in found}
    assert {"contradiction", "shadowed"} <= kinds, kinds  # the oracle below has something to check
    for w in found:
        if w.kind == "contradiction":
            assert not pairs(w.rule), w
        elif w.kind == "shadowed":
            over = w.message.split("override-deny ")[1].split(" ")[0]
            assert pairs(w.rule) <= pairs(over), w
            assert all(
                any(o.proto == "any" or o.proto == s.proto for o in rules[over].services)
                for s in rules[w.rule].services
            )


def test_a_tagger_of_any_account_is_a_warning_at_its_line(tmp_path: Path) -> None:
    """``arn:aws:iam::*:role/ringfence-tagging`` trusts a role of that name in any account, a
    member account's too: ``policy validate`` (and provision) name it where it is written."""
    pol = tmp_path / "policy"
    shutil.copytree(EXAMPLE / "policy", pol)
    labels = pol / "labels.yaml"
    pinned = labels.read_text()
    assert not [w for w in policy_warnings(load_policy(pol)) if w.kind == "any-account-tagger"]
    labels.write_text(pinned.replace("arn:aws:iam::123456789012:role/", "arn:aws:iam::*:role/"))
    r = subprocess.run([CLI, "policy", "validate", str(pol)], capture_output=True, text=True, check=False)
    assert r.returncode == 0, r.stderr
    line = next(i for i, ln in enumerate(labels.read_text().splitlines(), 1) if "taggers:" in ln)
    assert f"labels.yaml:{line}:" in r.stderr and "names any AWS account" in r.stderr, r.stderr
