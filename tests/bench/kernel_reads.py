"""What the nftables backend's reads of the kernel cost at a large bundle (real kernel): a whole
apply (its seal included; and, where the agent has it, a whole apply whose seal is checked in a
fresh network namespace, as when the ruleset's generation moved during it), ``held()`` (the seal's digest), ``fingerprint()`` (the daemon's drift
check) and ``enforced()`` (the heartbeat's digest). Run as root; it makes a network namespace of
its own and removes it after::

    .venv/bin/python -m tests.bench.kernel_reads [--elements 100000] [--runs 5]

To compare with another commit, run it with ``PYTHONPATH`` pointing at that tree's ``agent``
and ``layers/core`` (the agent is imported from there). One JSON document on stdout.
"""

from __future__ import annotations

import argparse
import ipaddress
import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

from ringfence.bundle import AddressSetDoc, Bundle, BundleRule, FailsafeDoc, ServiceMatch, sign
from ringfence.model import Mode
from tests.agent.bundles import key, write

INNER = """
import json, statistics, sys, time
from ringfence.bundlewire import load_bundle
from ringfence_agent.backends.nft import NftBackend
from ringfence_agent.plan import LocalFailsafes, compile_plan
runs = int(sys.argv[2])
backend = NftBackend()
plan = compile_plan(load_bundle(open(sys.argv[1], "rb").read()), LocalFailsafes())
out = {"module": sys.modules["ringfence_agent.backends.nft"].__file__}
def timed(name, fn):
    xs = []
    for _ in range(runs):
        t = time.perf_counter(); fn(); xs.append(time.perf_counter() - t)
    out[name] = {"median_s": round(statistics.median(xs), 4), "min_s": round(min(xs), 4), "max_s": round(max(xs), 4)}
timed("apply", lambda: backend.apply(plan))
timed("held", backend.held)
timed("fingerprint", backend.fingerprint)
timed("enforced", backend.enforced)
import ringfence_agent.backends.nft as nft
if hasattr(nft, "_only_one_commit"):  # the seal's check in a fresh namespace, as when the generation moved
    nft._only_one_commit = lambda before: False
    timed("apply_fresh_namespace", lambda: backend.apply(plan))
print(json.dumps(out))
"""


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--elements", type=int, default=100_000)
    ap.add_argument("--runs", type=int, default=5)
    args = ap.parse_args()
    base = int(ipaddress.IPv4Address("10.100.0.0"))
    elements = [f"{ipaddress.IPv4Address(base + 2 * i)}/32" for i in range(args.elements)]
    doc = Bundle(
        workload_id="bench",
        version=1,
        policy_version=1,
        mode=Mode.ENFORCE,
        sets={"rf_bench000000000000": AddressSetDoc(version=1, v4=elements)},
        inbound=[
            BundleRule(
                id="bench/peers",
                action="allow",
                set="rf_bench000000000000",
                services=[ServiceMatch(proto="tcp", ports=(8080, 8080))],
            )
        ],
        failsafes=FailsafeDoc(admin_cidrs=["10.77.0.250/32"]),
    )
    ns = f"rfbench-kr-{os.getpid()}"
    with tempfile.TemporaryDirectory() as tmp:
        path = write(sign(doc, key()), Path(tmp) / "bundle.json")
        subprocess.run(["ip", "netns", "add", ns], check=True)
        try:
            cmd = ["ip", "netns", "exec", ns, sys.executable, "-c", INNER, str(path), str(args.runs)]
            proc = subprocess.run(cmd, capture_output=True, text=True, check=False)
        finally:
            subprocess.run(["ip", "netns", "del", ns], check=False)
    if proc.returncode != 0:
        raise SystemExit(proc.stderr)
    result = json.loads(proc.stdout)
    result["elements"] = args.elements
    print(json.dumps(result, indent=1))


if __name__ == "__main__":
    main()
