"""VPC Flow Log lines parsed, resolved and classified per second (one core): a generated mix over
the example estate (tier flows, dev → prod, internet, unknown addresses, NODATA), gzip text in the
default v2 format, through the parser and the aggregator (docs/benchmarks.md, "Flows in")."""

from __future__ import annotations

import argparse
import gzip
import json
import random
import tempfile
import time
from pathlib import Path

from ringfence.flows.aggregate import Aggregator
from ringfence.flows.classify import Classifier
from ringfence.flows.resolve import AddressBook, sync_addresses
from ringfence.flows.vpclogs import parse_gzip_records
from ringfence.inventory import load_inventory
from ringfence.policy import load_policy
from ringfence.store.sqlite import SqliteStore

EXAMPLE = Path(__file__).resolve().parents[2] / "examples" / "ordering"


def lines(n: int, ips: list[str], seed: int = 1) -> bytes:
    rng = random.Random(seed)
    outside = ["93.184.216.34", "10.77.0.9", "52.95.128.179"]
    ports = [8080, 8443, 5432, 53, 22, 443, 1433, 9100]
    out = []
    for _ in range(n):
        if rng.random() < 0.01:
            out.append("2 1 eni-1 - - - - - - - 1764680000 1764680060 - NODATA")
            continue
        src = rng.choice(ips)
        dst = rng.choice(ips + outside)
        port = rng.choice(ports)
        proto = 17 if port == 53 else 6
        act = rng.choice(("ACCEPT", "REJECT"))
        out.append(
            f"2 1 eni-1 {src} {dst} {rng.randint(1024, 65535)} {port} {proto} 3 300 1764680000 1764680060 {act} OK"
        )
    return gzip.compress("\n".join(out).encode())


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--lines", type=int, default=1_000_000)
    args = ap.parse_args()
    inv = load_inventory(EXAMPLE / "inventory.yaml")
    policy = load_policy(EXAMPLE / "policy")
    with tempfile.TemporaryDirectory() as tmp:
        store = SqliteStore(Path(tmp) / "s.db")
        sync_addresses(store, inv, [], 0.0)
        ips = [ip for w in inv for ip in w.ips if ":" not in ip]
        data = lines(args.lines, ips)
        t0 = time.process_time()
        records, report = parse_gzip_records("bench.gz", data)  # what FlowIngest.vpc_object does
        t1 = time.process_time()
        wanted = sorted({r[2] for r in records} | {r[3] for r in records})
        agg = Aggregator(Classifier(policy, AddressBook(store.address_history(wanted))))
        agg.add_records(records, "vpc")
        t2 = time.process_time()
    print(
        json.dumps(
            {
                "lines": args.lines,
                "flows": report.flows,
                "rows": len(agg.rows),
                "parse_s": round(t1 - t0, 3),
                "classify_s": round(t2 - t1, 3),
                "lines_per_s": round(args.lines / (t2 - t0)),
            }
        )
    )


if __name__ == "__main__":
    main()
