"""An agent's report batch folded into flow rows inline (``ringfence serve --store sqlite:``, the
agent API's ``_ingest_flows``), per report, at N workloads: the address-owner pass over the whole
inventory that every report made before, against the steady state now (the engine head read and
the reporter's own addresses), both with the same 20-flow batch, in one run
(docs/benchmarks.md, "Flows in")::

    .venv/bin/python -m tests.bench.agent_reports_bench [--workloads 1000 5000] [--reports 20]
"""

from __future__ import annotations

import argparse
import json
import statistics
import tempfile
import time
from pathlib import Path

from ringfence.flows.ingest import FlowIngest
from ringfence.model import Workload
from ringfence.policy import load_policy
from ringfence.store.base import InventoryRecord
from ringfence.store.sqlite import SqliteStore

EXAMPLE = Path(__file__).resolve().parents[2] / "examples" / "ordering"
TAGS = {"ringfence:role": "web", "ringfence:app": "ordering", "ringfence:env": "prod", "ringfence:loc": "ca"}


def ip(i: int) -> str:
    return f"10.{i // 65536}.{(i // 256) % 256}.{i % 256}"


def run(n: int, reports: int) -> dict[str, float]:
    policy = load_policy(EXAMPLE / "policy")
    with tempfile.TemporaryDirectory() as tmp:
        store = SqliteStore(Path(tmp) / "s.db")
        store.observe_many(
            [InventoryRecord(id=f"w{i}", workload=Workload(id=f"w{i}", ips=[ip(i)], tags=TAGS), observed_at=1.0)
             for i in range(n)]
        )  # fmt: skip
        ingest = FlowIngest(store, policy)
        ingest.sync()
        now = time.time()
        flows = [
            {"start": now, "end": now + 1, "src": ip(1), "dst": ip(2 + k), "proto": "tcp", "dport": 443,
             "packets": 1, "bytes": 60}
            for k in range(20)
        ]  # fmt: skip
        batch = {"flows": flows}

        def before() -> None:
            ingest.sync()
            ingest.agent_batch("w1", batch)

        def now_() -> None:
            store.head()
            store.inventory_generation()
            ingest.sync_workload("w1")
            ingest.agent_batch("w1", batch)

        # inventory records each variant reads per report: the work, apart from the clock
        read = [0]
        whole, one = store.all_records, store.get

        def all_records() -> list[InventoryRecord]:
            got = whole()
            read[0] += len(got)
            return got

        def get(workload_id: str) -> InventoryRecord | None:
            got = one(workload_id)
            read[0] += got is not None
            return got

        store.all_records, store.get = all_records, get  # type: ignore[method-assign]
        out: dict[str, list[float]] = {"before_ms": [], "now_ms": []}
        records: dict[str, int] = {}
        for _ in range(reports):  # interleaved, each timed alone
            for name, fn in (("before_ms", before), ("now_ms", now_)):
                read[0] = 0
                t0 = time.perf_counter()
                fn()
                out[name].append((time.perf_counter() - t0) * 1e3)
                records[name.replace("_ms", "_records")] = read[0]
        store.close()
    med = {k: round(statistics.median(v), 2) for k, v in out.items()}
    return {"workloads": n, **med, "ratio": round(med["before_ms"] / med["now_ms"], 1), **records}


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--workloads", type=int, nargs="+", default=[1000, 5000])
    ap.add_argument("--reports", type=int, default=20)
    args = ap.parse_args()
    for n in args.workloads:
        print(json.dumps(run(n, args.reports)))


if __name__ == "__main__":
    main()
