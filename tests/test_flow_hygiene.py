"""``labels check --flows``: what flow rows (a VPC Flow Log ingested into SQLite) reveal about
labels — private addresses no workload holds, and a workload whose traffic contradicts its role."""

from __future__ import annotations

import gzip
import json
import subprocess
import sys
import time
from pathlib import Path

import pytest

from ringfence.flows.hygiene import flow_findings
from ringfence.flows.ingest import FlowIngest
from ringfence.inventory import load_inventory
from ringfence.policy import load_policy
from ringfence.store.base import InventoryRecord
from ringfence.store.sqlite import SqliteStore

EXAMPLE = Path(__file__).parent.parent / "examples" / "ordering"
CLI = str(Path(sys.executable).parent / "ringfence")
DB = "app=ordering,env=prod,loc=ca,role=database"
WEB = "app=ordering,env=prod,loc=ca,role=web"

SEEN = [
    ("10.5.5.5", "10.1.2.10", 8443, "REJECT"),  # an address no workload holds → prod processing
    ("10.1.1.10", "10.5.5.6", 9000, "REJECT"),  # prod web → another unknown address
    ("93.184.216.50", "10.1.0.10", 22, "REJECT"),  # the internet: not a finding of this kind
    # the prod database, acting like anything but one: it calls out to four peers
    ("10.1.3.10", "10.1.1.10", 8080, "REJECT"),
    ("10.1.3.10", "10.1.2.10", 8443, "REJECT"),
    ("10.1.3.10", "10.1.10.10", 443, "REJECT"),
    ("10.1.3.10", "93.184.216.34", 443, "REJECT"),
    ("10.1.1.10", "10.1.3.10", 8080, "REJECT"),  # and is called on a port no rule gives a database
    ("10.1.1.10", "10.1.3.10", 5432, "REJECT"),  # a port databases do serve: a policy matter, not a label one
    ("10.1.2.10", "10.1.3.10", 5432, "ACCEPT"),  # allowed: evidence of nothing wrong
    ("10.1.1.11", "10.1.2.11", 8443, "ACCEPT"),
]


@pytest.fixture()
def flows(tmp_path: Path) -> str:
    store = SqliteStore(tmp_path / "flows.db")
    for w in load_inventory(EXAMPLE / "inventory.yaml"):
        store.observe(InventoryRecord(id=w.id, workload=w, observed_at=1.0))
    ingest = FlowIngest(store, load_policy(EXAMPLE / "policy"))
    now = int(time.time())
    ingest.sync(at=now - 3600.0)
    lines = ["version srcaddr dstaddr dstport protocol packets bytes start end action log-status"]
    lines += [f"2 {s} {d} {p} 6 2 100 {now - 300} {now - 200} {a} OK" for s, d, p, a in SEEN]
    ingest.vpc_object("seen.log.gz", gzip.compress("\n".join(lines).encode()))
    return str(tmp_path / "flows.db")


def test_unknown_addresses_and_traffic_that_contradicts_a_role(flows: str) -> None:
    policy = load_policy(EXAMPLE / "policy")
    found = flow_findings(policy, load_inventory(EXAMPLE / "inventory.yaml"), SqliteStore(Path(flows)).flow_rows())
    by_kind: dict[str, list[dict[str, object]]] = {}
    for f in found:
        by_kind.setdefault(str(f["kind"]), []).append(f)
    assert [f["address"] for f in by_kind["flows/unknown-address"]] == ["10.5.5.5", "10.5.5.6"]
    assert "93.184.216.50" not in json.dumps(found)
    (fan,) = by_kind["flows/outbound-fanout"]
    assert fan["group"] == DB and fan["workloads"] == ["ord-prod-db-1"] and len(fan["peers"]) == 4  # type: ignore[arg-type]
    assert "internet tcp/443" in fan["peers"]  # type: ignore[operator]
    (port,) = by_kind["flows/unexpected-port"]
    assert (port["group"], port["port"], port["peer"]) == (DB, "tcp/8080", WEB)
    assert "ord-prod-db-1" in str(port["message"]) and "no rule gives role database that port" in str(port["message"])
    # a higher bar for fan-out: the database's four peers no longer qualify
    assert not [f for f in flow_findings(policy, [], SqliteStore(Path(flows)).flow_rows(), 5) if "fanout" in f["kind"]]


def test_labels_check_reports_them_with_the_flows_store(flows: str) -> None:
    argv = [CLI, "labels", "check", "--policy", str(EXAMPLE / "policy"), "--inventory", str(EXAMPLE / "inventory.yaml")]
    r = subprocess.run([*argv, "--flows", f"sqlite:{flows}"], capture_output=True, text=True, check=True)
    assert "finding flows/unknown-address: 10.5.5.5 (a private address no known workload held)" in r.stdout
    assert f"finding flows/outbound-fanout: {DB} (ord-prod-db-1) connects out to 4 peers" in r.stdout
    assert "4 findings" in r.stdout
    doc = json.loads(
        subprocess.run(
            [*argv, "--flows", f"sqlite:{flows}", "--json"], capture_output=True, text=True, check=True
        ).stdout
    )
    assert sorted(f["kind"] for f in doc["findings"]) == [
        "flows/outbound-fanout",
        "flows/unexpected-port",
        "flows/unknown-address",
        "flows/unknown-address",
    ]
    assert "0 findings" in subprocess.run(argv, capture_output=True, text=True, check=True).stdout


def test_labels_check_reads_the_estate_from_the_store(flows: str) -> None:
    # no inventory file: the store's inventory (as reconcile and ingest keep it) is the estate
    argv = [CLI, "labels", "check", "--policy", str(EXAMPLE / "policy"), "--flows", f"sqlite:{flows}"]
    r = subprocess.run(argv, capture_output=True, text=True, check=True)
    assert "ord-prod-web-9: UNLABELED" in r.stdout and "20 workloads" in r.stdout and "4 findings" in r.stdout
    r = subprocess.run(argv[:5], capture_output=True, text=True, check=False)
    assert r.returncode == 1 and "--inventory FILE, or --flows" in r.stderr


def test_labels_check_sends_the_flow_findings_to_the_siem(flows: str, tmp_path: Path) -> None:
    """``labels check --flows --siem``: each finding from flows goes to the SIEM as a Detection
    Finding valid against the OCSF schema, with a uid that a second run repeats (a SIEM dedupes)."""
    from tests.siem.test_siem import validate

    argv = [CLI, "labels", "check", "--policy", str(EXAMPLE / "policy"), "--inventory", str(EXAMPLE / "inventory.yaml")]
    runs = []
    for k in range(2):
        out = tmp_path / f"siem-{k}.jsonl"
        subprocess.run([*argv, "--flows", f"sqlite:{flows}", "--siem", f"file:{out}"], check=True, capture_output=True)
        runs.append([json.loads(line) for line in out.read_text().splitlines()])
    flows_sent = [e for e in runs[0] if e["finding_info"]["analytic"]["name"].startswith("flows/")]
    for e in flows_sent:
        validate(e)
    assert sorted(e["finding_info"]["analytic"]["name"] for e in flows_sent) == [
        "flows/outbound-fanout",
        "flows/unexpected-port",
        "flows/unknown-address",
        "flows/unknown-address",
    ]
    assert {e["resources"][0]["uid"] for e in flows_sent} >= {"10.5.5.5", "10.5.5.6", DB}
    assert [e["finding_info"]["uid"] for e in runs[0]] == [e["finding_info"]["uid"] for e in runs[1]]
