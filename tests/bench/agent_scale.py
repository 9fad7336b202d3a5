"""Agent at scale (issue 13): 1,000-element deltas into a 100,000-element set, on the real kernel.

Run as root; it makes a network namespace of its own for each backend and removes it after::

    .venv/bin/python -m tests.bench.agent_scale [--elements 100000] [--delta 1000] [--deltas 10]

Each delta adds ``delta/2`` new /32s and removes ``delta/2`` of the set's own (non-adjacent, so
nothing aggregates): the set stays at its size. The agent applies the bundle, then the deltas one
after another with ``Agent.apply_delta`` (``tests/bench/agent_inner.py``: end to end and per
phase — signature, kernel, journal fdatasync, status file). One JSON document on stdout.
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
from typing import Any

from ringfence.bundle import AddressSetDoc, Bundle, BundleRule, FailsafeDoc, ServiceMatch, SetDelta, sign
from ringfence.model import Mode
from tests.agent.bundles import key, write

ROOT = Path(__file__).resolve().parents[2]
SET = "rf_bench000000000000"


def peers(n: int) -> list[int]:
    """n non-adjacent IPv4 addresses (integers) in 10.100.0.0/14."""
    base = int(ipaddress.IPv4Address("10.100.0.0"))
    return [base + 2 * i for i in range(n)]


def cidr(a: int) -> str:
    return f"{ipaddress.IPv4Address(a)}/32"


def build(tmp: Path, elements: int, size: int, count: int) -> tuple[Path, Path]:
    addrs = peers(elements)
    doc = Bundle(
        workload_id="bench",
        version=1,
        policy_version=1,
        mode=Mode.ENFORCE,
        sets={SET: AddressSetDoc(version=1, v4=[cidr(a) for a in addrs])},
        inbound=[
            BundleRule(
                id="bench/peers", action="allow", set=SET, services=[ServiceMatch(proto="tcp", ports=(8080, 8080))]
            )
        ],
        failsafes=FailsafeDoc(admin_cidrs=["10.77.0.250/32"]),
    )
    path = write(sign(doc, key()), tmp / "bundle.json")
    ddir = tmp / "deltas"
    fresh = int(ipaddress.IPv4Address("10.120.0.0"))
    for v in range(1, 1 + count):
        add = [cidr(fresh + 2 * (i + (v - 1) * size)) for i in range(size // 2)]
        gone = addrs[(v - 1) * (size - size // 2) : v * (size - size // 2)]
        d = SetDelta(set=SET, from_version=v, to_version=v + 1, add=add, remove=[cidr(a) for a in gone])
        write(sign(d, key()), ddir / f"{v}.json")
    return path, ddir


def run_in_netns(backend: str, bundle: Path, ddir: Path, state: Path) -> dict[str, Any]:
    ns = f"rfscale{os.getpid()}"
    subprocess.run(["ip", "netns", "add", ns], check=True)
    try:
        subprocess.run(["ip", "netns", "exec", ns, "ip", "link", "set", "lo", "up"], check=True)
        proc = subprocess.run(
            [
                "ip",
                "netns",
                "exec",
                ns,
                sys.executable,
                str(ROOT / "tests" / "bench" / "agent_inner.py"),
                str(state),
                str(bundle),
                str(ddir),
                backend,
                str(ROOT / "tests" / "golden" / "test-key.pub.pem"),
            ],
            capture_output=True,
            text=True,
            timeout=900,
            env={**os.environ, "PYTHONPATH": os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")])},
        )
        if proc.returncode != 0:
            raise RuntimeError(proc.stderr)
        out: dict[str, Any] = json.loads(proc.stdout)
        return out
    finally:
        subprocess.run(["ip", "netns", "del", ns], check=False)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--elements", type=int, default=100_000)
    ap.add_argument("--delta", type=int, default=1000, help="elements per delta (half added, half removed)")
    ap.add_argument("--deltas", type=int, default=10)
    ap.add_argument("--backend", action="append", help="nftables, iptables (default: nftables)")
    args = ap.parse_args(argv)
    results: dict[str, Any] = {"elements": args.elements, "delta_elements": args.delta, "uptime": os.getloadavg()}
    with tempfile.TemporaryDirectory(prefix="rfscale") as d:
        tmp = Path(d)
        bundle, ddir = build(tmp, args.elements, args.delta, args.deltas)
        for backend in args.backend or ["nftables"]:
            results[backend] = run_in_netns(backend, bundle, ddir, tmp / f"state-{backend}")
    print(json.dumps(results, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
