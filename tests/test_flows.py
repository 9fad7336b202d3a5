"""Flows in: the VPC Flow Logs parser, addresses resolved as of a flow's time, classification
under policy, and aggregation into the store (SQLite here; the store contract holds DynamoDB to
the same rows: tests/aws/test_store.py)."""

from __future__ import annotations

import dataclasses
import gzip
import time
from pathlib import Path

import pytest

from ringfence.flows.aggregate import merge
from ringfence.flows.classify import Classifier
from ringfence.flows.ingest import FlowIngest, agent_flows
from ringfence.flows.resolve import AddressBook
from ringfence.flows.vpclogs import parse_gzip, parse_text
from ringfence.inventory import load_inventory
from ringfence.policy import load_policy
from ringfence.store.base import InventoryRecord
from ringfence.store.sqlite import SqliteStore

EXAMPLE = Path(__file__).parent.parent / "examples" / "ordering"

V2 = """version account-id interface-id srcaddr dstaddr srcport dstport protocol packets bytes start end action log-status
2 123456789010 eni-1235b8ca123456789 172.31.16.139 172.31.16.21 20641 22 6 20 4249 1418530010 1418530070 ACCEPT OK
2 123456789010 eni-1235b8ca123456789 172.31.9.69 172.31.9.12 49761 3389 6 20 4249 1418530010 1418530070 REJECT OK
2 123456789010 eni-1235b8ca123456789 - - - - - - - 1431280876 1431280934 - NODATA
"""
V5_FIELDS = (
    "version srcaddr dstaddr srcport dstport protocol start end type packets bytes account-id vpc-id subnet-id "
    "instance-id interface-id region az-id sublocation-type sublocation-id action tcp-flags pkt-srcaddr pkt-dstaddr "
    "pkt-src-aws-service pkt-dst-aws-service traffic-path flow-direction log-status"
)
V5_LINE = (
    "5 10.0.0.71 52.95.128.179 34210 80 6 1616729292 1616729349 IPv4 7 471 123456789012 vpc-abcdefab012345678 "
    "subnet-aaaaaaaa012345678 i-0c50d5961bcb2d47b eni-1235b8ca123456789 ap-southeast-2 apse2-az3 - - ACCEPT 3 "
    "10.0.0.71 52.95.128.179 - S3 8 egress OK"
)


def test_default_v2_lines_parse_and_nodata_is_skipped() -> None:
    flows, rep = parse_gzip("a.log.gz", gzip.compress(V2.encode()))
    assert [(f.src, f.dst, f.proto, f.dport, f.observed) for f in flows] == [
        ("172.31.16.139", "172.31.16.21", "tcp", 22, "accept"),
        ("172.31.9.69", "172.31.9.12", "tcp", 3389, "reject"),
    ]
    assert (rep.lines, rep.flows, rep.skipped, rep.malformed) == (3, 2, 1, 0)
    assert flows[0].packets == 20 and flows[0].bytes == 4249 and flows[0].start == 1418530010


def test_a_custom_v5_format_is_read_by_its_header_in_any_order() -> None:
    flows, rep = parse_text("v5.log", [V5_FIELDS, V5_LINE])
    (f,) = flows
    assert (f.src, f.dst, f.dport, f.proto, f.reporter) == (
        "10.0.0.71",
        "52.95.128.179",
        80,
        "tcp",
        "eni-1235b8ca123456789",
    )
    assert rep.fields[1] == "srcaddr" and rep.malformed == 0 and rep.unknown_fields == []
    # a header with fields from a newer version is read past them, never refused
    flows, rep = parse_text("v9.log", [V5_FIELDS + " ecs-cluster-name", V5_LINE + " -"])
    assert len(flows) == 1 and rep.unknown_fields == ["ecs-cluster-name"]


def test_malformed_lines_are_counted_with_file_and_line_and_never_abort_the_file() -> None:
    lines = V2.splitlines()
    bad = [
        lines[0],
        lines[1],
        "2 123 eni-1 10.0.0.1 10.0.0.2 1 22 6 1 1 10 20 ACCEPT",  # a field short
        "2 123 eni-1 10.0.0.1 10.0.0.2 1 twenty-two 6 1 1 10 20 ACCEPT OK",
        "2 123 eni-1 not-an-ip 10.0.0.2 1 22 6 1 1 10 20 ACCEPT OK",
        "2 123 eni-1 10.0.0.1 10.0.0.2 1 22 6 1 1 10 20 MAYBE OK",
        lines[2],
    ]
    flows, rep = parse_gzip("s3://logs/x.gz", gzip.compress("\n".join(bad).encode()))
    assert len(flows) == 2 and rep.malformed == 4
    assert [e.line for e in rep.errors] == [3, 4, 5, 6]
    assert str(rep.errors[0]) == "s3://logs/x.gz:3: 13 fields, the format has 14"
    assert "dstport 'twenty-two' is not a number" in str(rep.errors[1])


@pytest.fixture()
def estate(tmp_path: Path) -> tuple[SqliteStore, FlowIngest]:
    store = SqliteStore(tmp_path / "s.db")
    for w in load_inventory(EXAMPLE / "inventory.yaml"):
        store.observe(InventoryRecord(id=w.id, workload=w, observed_at=1.0))
    ingest = FlowIngest(store, load_policy(EXAMPLE / "policy"))
    ingest.sync(at=100.0)
    return store, ingest


def test_flows_are_classified_allowed_blocked_potentially_blocked_and_unknown(
    estate: tuple[SqliteStore, FlowIngest],
) -> None:
    store, ingest = estate
    batch = {
        "flows": [
            # prod web → prod processing: allowed by ordering/web-to-processing
            {"start": 1000, "end": 1010, "src": "10.1.1.10", "dst": "10.1.2.10", "proto": "tcp", "dport": 8443,
             "packets": 5, "bytes": 500, "direction": "outbound"},
            {"start": 1020, "end": 1030, "src": "10.1.1.11", "dst": "10.1.2.11", "proto": "tcp", "dport": 8443,
             "packets": 5, "bytes": 500, "direction": "outbound"},
        ],
        "drops": [
            # dev web → prod processing: blocked (app groups differ; dev ↛ prod)
            {"time": 1040, "direction": "outbound", "src": "10.2.1.10", "dst": "10.1.2.10", "proto": "tcp",
             "dport": 8443, "action": "drop", "count": 3},
            # payroll dev (observe mode) → the internet: would be blocked
            {"time": 1050, "direction": "outbound", "src": "10.2.10.10", "dst": "93.184.216.34", "proto": "tcp",
             "dport": 443, "action": "would-drop"},
        ],
    }  # fmt: skip
    # within the retention: an agent's flow dated before it (1970 here) is refused
    t0 = time.time() - 3600
    for r in batch["flows"]:
        r["start"] += t0
        r["end"] += t0
    for d in batch["drops"]:
        d["time"] += t0
    # each reported by the agent of its source (an agent's flows must have an end of its own)
    reporter = {"10.1.1.10": "ord-prod-web-1", "10.1.1.11": "ord-prod-web-2", "10.2.1.10": "ord-dev-web-1"}
    reporter["10.2.10.10"] = "pay-dev-web-1"
    ingest.flows(dataclasses.replace(f, reporter=reporter[f.src]) for f in agent_flows("", batch))
    ingest.vpc_object("v.gz", gzip.compress(b"2 1 eni-9 192.0.2.1 192.0.2.2 5 22 6 1 1 1060 1070 ACCEPT OK\n"))
    rows = {(r.src, r.dst, r.port): r for r in merge(store.flow_rows())}
    web = "app=ordering,env=prod,loc=ca,role=web"
    proc = "app=ordering,env=prod,loc=ca,role=processing"
    ok = rows[(web, proc, 8443)]
    assert ok.decision == "allowed" and ok.flows == 2 and ok.packets == 10
    assert (ok.first_seen, ok.last_seen) == (t0 + 1000, t0 + 1030)
    assert "web-to-processing" in ok.rule and "ordering.yaml:" in ok.rule
    dev = rows[("app=ordering,env=dev,loc=ca,role=web", proc, 8443)]
    assert (
        dev.decision == "blocked" and dev.flows == 3 and "override-deny boundaries/dev-never-reaches-prod" in dev.rule
    )
    pay = rows[("app=payroll,env=dev,loc=ca,role=web", "internet", 443)]
    assert pay.decision == "potentially-blocked"
    assert rows[("unknown", "unknown", 22)].decision == "unknown"


def test_an_address_that_moved_resolves_to_its_owner_at_the_flows_time(
    estate: tuple[SqliteStore, FlowIngest],
) -> None:
    store, ingest = estate
    old = store.get("ord-prod-proc-1")
    assert old is not None
    store.observe(old.model_copy(update={"state": "terminated", "observed_at": 2.0}))
    ingest.sync(at=2000.0)
    # a dev database launches with the address the prod processing host had
    (dev_db,) = [w for w in load_inventory(EXAMPLE / "inventory.yaml") if w.id == "ord-dev-db-1"]
    moved = dev_db.model_copy(update={"id": "ord-dev-db-9", "ips": ["10.1.2.10"]})
    store.observe(InventoryRecord(id=moved.id, workload=moved, observed_at=3.0))
    ingest.sync(at=3000.0)
    book = AddressBook(store.address_history(["10.1.1.10", "10.1.2.10"]))
    assert [o.workload_id for o in book.history["10.1.2.10"]] == ["ord-prod-proc-1", "", "ord-dev-db-9"]
    c = Classifier(ingest.policy, book)
    _, before, why_before = c.classify("10.1.1.10", "10.1.2.10", "tcp", 8443, 1000.0)
    _, gone, why_gone = c.classify("10.1.1.10", "10.1.2.10", "tcp", 8443, 2500.0)
    _, after, why_after = c.classify("10.1.1.10", "10.1.2.10", "tcp", 8443, 3500.0)
    assert (before.name, why_before.outcome) == ("ord-prod-proc-1", "allowed")
    assert gone.labels is None and why_gone.outcome == "blocked"  # nobody's: web's outbound default deny
    assert after.name == "ord-dev-db-9" and after.labels is not None and after.labels["env"] == "dev"
    assert why_after.outcome == "blocked"


def test_agent_flows_reads_flow_records_and_folded_drops() -> None:
    flows = agent_flows(
        "w1",
        {"drops": [{"time": 5, "direction": "inbound", "src": "10.0.0.1", "dst": "10.0.0.2", "proto": "udp",
                    "dport": 53, "action": "drop", "rule_id": "r1", "count": 4}]},
    )  # fmt: skip
    assert [(f.count, f.observed, f.rule_id, f.reporter) for f in flows] == [(4, "drop", "r1", "w1")]


def test_the_fast_ingest_path_gives_the_rows_of_deciding_every_flow(
    estate: tuple[SqliteStore, FlowIngest],
) -> None:
    """The records path (plain tuples, a row cache per address pair, decisions cached per label
    pair and address signature) against the Flow path with a fresh ``decide`` for every flow:
    the same rows, counts and verdicts, a moved address included (its owner depends on the time)."""
    import random

    from ringfence.engine.explain import decide
    from ringfence.flows.aggregate import Aggregator
    from ringfence.flows.classify import Classified
    from ringfence.flows.vpclogs import parse_gzip_records

    store, ingest = estate
    old = store.get("ord-prod-proc-1")
    assert old is not None
    store.observe(old.model_copy(update={"state": "terminated", "observed_at": 2.0}))
    ingest.sync(at=2000.0)
    (dev_db,) = [w for w in load_inventory(EXAMPLE / "inventory.yaml") if w.id == "ord-dev-db-1"]
    store.observe(InventoryRecord(id="ord-dev-db-9", workload=dev_db.model_copy(update={"id": "ord-dev-db-9",
                  "ips": ["10.1.2.10"]}), observed_at=3.0))  # fmt: skip
    ingest.sync(at=3000.0)
    ips = [ip for w in load_inventory(EXAMPLE / "inventory.yaml") for ip in w.ips if ":" not in ip]
    rng = random.Random(7)
    lines = ["version account-id interface-id srcaddr dstaddr srcport dstport protocol packets bytes start end "
             "action log-status"]  # fmt: skip
    for i in range(3000):
        src, dst = rng.choice(ips), rng.choice([*ips, "93.184.216.34", "10.77.0.9", "10.0.0.2"])
        port = rng.choice([8443, 5432, 53, 22, 443, 9100, 3389])
        proto = rng.choice([6, 17, 1]) if port == 53 else 6
        t = rng.choice([1000, 2500, 3500, 90000])
        act = rng.choice(["ACCEPT", "REJECT", "-"])
        lines.append(f"2 1 eni-{i % 5} {src} {dst} 40000 {port} {proto} 2 {i} {t} {t + 5} {act} OK")
    lines += ["2 1 eni-1 - - - - - - - 1000 1060 - NODATA", "2 1 eni-1 10.1.1.10 x 1 2 6 1 1 1000 1001 ACCEPT OK"]
    data = gzip.compress("\n".join(lines).encode())
    wanted = sorted(set(ips) | {"93.184.216.34", "10.77.0.9", "10.0.0.2"})
    book = AddressBook(store.address_history(wanted))
    assert len(book.history["10.1.2.10"]) == 3

    class Uncached(Classifier):
        def classify(self, src: str, dst: str, proto: str, port: int | None, at: float):  # type: ignore[no-untyped-def]
            s, d = self.endpoint(src, self.book.owner(src, at)), self.endpoint(dst, self.book.owner(dst, at))
            return s, d, Classified.of(decide(self.policy, s, d, proto, port))

    flows, report = parse_gzip("x.gz", data)
    slow = Aggregator(Uncached(ingest.policy, book))
    slow.add(flows)
    records, report2 = parse_gzip_records("x.gz", data)
    fast = Aggregator(Classifier(ingest.policy, AddressBook(store.address_history(wanted))))
    fast.add_records(records, "vpc")
    assert (report2.flows, report2.skipped, report2.malformed) == (report.flows, report.skipped, report.malformed)
    assert (
        [str(e) for e in report2.errors]
        == [str(e) for e in report.errors]
        == ["x.gz:3003: address '10.1.1.10' or 'x' is not an IP address"]
    )
    assert fast.seen == slow.seen == 3000

    def verdicts(agg: Aggregator) -> dict[tuple[str, str], tuple[object, ...]]:
        # the rule text of a default deny names one workload of the pair: compared without it
        return {k: (r.flows, r.packets, r.bytes, r.first_seen, r.last_seen, r.decision, r.origins, r.sample_src, r.sample_dst,
                    r.rule if "default deny" not in r.rule else "default deny") for k, r in agg.rows.items()}  # fmt: skip

    assert verdicts(fast) == verdicts(slow)
    assert {r.decision for r in fast.rows.values()} >= {"allowed", "blocked", "unknown"}


def test_agent_reports_bench_runs_small() -> None:
    """The inline-reports benchmark (docs/benchmarks.md) runs, and the steady state reads one
    record where the whole-inventory pass reads all 300 (work, not the clock: no flake on a busy
    machine)."""
    from tests.bench.agent_reports_bench import run

    got = run(300, 3)
    assert got["workloads"] == 300 and got["now_ms"] > 0 and got["before_ms"] > 0, got
    assert got["before_records"] == 300 and got["now_records"] == 1, got


def test_an_object_is_read_in_chunks_with_long_lines_dropped_whole() -> None:
    """The chunked reader: a line over MAX_LINE is one malformed line however many chunks it
    spans, a line of exactly MAX_LINE is read, and the last line needs no newline (gzip or not)."""
    import gzip

    from ringfence.flows.vpclogs import MAX_LINE, ParseReport, _lines

    exact = "a" * MAX_LINE
    text = "\n".join(["first", "x" * (3 << 20), exact, "y" * (MAX_LINE + 1), "last"]).encode()
    for data in (text, gzip.compress(text)):
        got = list(_lines(data, ParseReport("f", [])))
        assert got == ["first", None, exact, None, "last"]
