"""Compare Ringfence's connectivity computation with network-config-analyzer (NCA) on one estate.

Usage (NCA lives in its own virtual environment, never the project's)::

    python3 -m venv /tmp/nca && /tmp/nca/bin/pip install network-config-analyzer==2.1.0
    .venv/bin/python tests/bench/compare_nca.py [--workloads 385] [--apps 3] [--seed 1] [--json]

It generates a synthetic estate (:mod:`ringfence.synth`), exports it with
:func:`ringfence.export.calico.export_calico` as host endpoints + GlobalNetworkPolicies (every
endpoint enforced, no fail-safe policy, no staged rulesets: the pure policy that
:func:`ringfence.engine.connectivity.compute` evaluates), runs ``nca --connectivity`` on it
with ``-o txt_no_fw_rules``, and in the same run times Ringfence (``Engine.load`` +
``connectivity.compute`` + expanding the matrix to workload pairs). Then it parses NCA's
explicit pairs and compares them, endpoint pair by endpoint pair, protocol by protocol and port
by port, with ours. Pairs with an IP range on one side (IP-list rules) are counted but not
compared: the matrix covers workload pairs only.

``tests/bench/test_compare_nca.py`` runs this at a small size when ``/tmp/nca`` exists and skips
otherwise; nothing here installs NCA.
"""

from __future__ import annotations

import argparse
import json
import re
import subprocess
import sys
import tempfile
import time
from collections import defaultdict
from pathlib import Path
from typing import Any

import yaml

from ringfence import synth
from ringfence.engine import Engine
from ringfence.engine.connectivity import compute
from ringfence.export.calico import export_documents
from ringfence.policy import load_policy_texts

NCA = Path("/tmp/nca/bin/nca")
PortSets = dict[str, list[tuple[int, int]]]  # protocol → merged (lo, hi) ranges
_LIMIT = {"tcp": 65535, "udp": 65535, "icmp": 255, "icmpv6": 255}
_LINE = re.compile(r"^(?P<src>\S+) => (?P<dst>\S+) : (?P<conn>.*)$")


def _merge(ranges: list[tuple[int, int]]) -> list[tuple[int, int]]:
    out: list[tuple[int, int]] = []
    for lo, hi in sorted(ranges):
        if out and lo <= out[-1][1] + 1:
            out[-1] = (out[-1][0], max(out[-1][1], hi))
        else:
            out.append((lo, hi))
    return out


def parse_nca_connection(text: str) -> PortSets:
    """``{protocols:TCP, UDP,dst_ports:53}`` / ``All connections`` / ICMP forms → port sets."""
    text = text.strip()
    if text == "All connections":
        return {p: [(0 if p.startswith("icmp") else 1, hi)] for p, hi in _LIMIT.items()}
    out: dict[str, list[tuple[int, int]]] = defaultdict(list)
    for part in re.findall(r"\{([^}]*)\}", text):
        fields = dict(
            re.findall(r"(protocols|dst_ports|icmp_type|icmp_code|src_ports|[a-z_]+):([^:]*?)(?=,[a-z_]+:|$)", part)
        )
        protocols = [p.strip().lower() for p in fields.get("protocols", "").split(",") if p.strip()]
        if "dst_ports" in fields:
            ranges = [_span(s) for s in fields["dst_ports"].split(",") if s.strip()]
        elif "icmp_type" in fields:
            ranges = [_span(s) for s in fields["icmp_type"].split(",") if s.strip()]
        else:
            ranges = []
        for proto in protocols or list(_LIMIT):
            out[proto].extend(ranges or [(0 if proto.startswith("icmp") else 1, _LIMIT.get(proto, 65535))])
    return {p: _merge(r) for p, r in out.items()}


def _span(text: str) -> tuple[int, int]:
    lo, _, hi = text.strip().partition("-")
    return int(lo), int(hi or lo)


def parse_nca_output(text: str, endpoints: set[str]) -> tuple[dict[tuple[str, str], PortSets], int]:
    """(endpoint pairs → port sets, number of lines with an IP range on one side)."""
    pairs: dict[tuple[str, str], dict[str, list[tuple[int, int]]]] = {}
    external = 0
    for line in text.splitlines():
        m = _LINE.match(line.strip())
        if not m:
            continue
        src, dst = m["src"].split("/")[-1], m["dst"].split("/")[-1]
        if src not in endpoints or dst not in endpoints:
            external += 1
            continue
        acc = pairs.setdefault((src, dst), defaultdict(list))
        for proto, ranges in parse_nca_connection(m["conn"]).items():
            acc[proto].extend(ranges)
    return {k: {p: _merge(r) for p, r in v.items()} for k, v in pairs.items()}, external


def representatives(heps: list[dict[str, Any]], per_class: int = 2) -> set[str]:
    """The host endpoints NCA models: the first ``per_class`` of each identical label set."""
    seen: dict[tuple[tuple[str, str], ...], int] = defaultdict(int)
    out: set[str] = set()
    for d in heps:
        key = tuple(sorted(d["metadata"].get("labels", {}).items()))
        if seen[key] < per_class:
            out.add(d["metadata"]["name"])
        seen[key] += 1
    return out


def ours_to_portsets(services: list[Any]) -> PortSets:
    out: dict[str, list[tuple[int, int]]] = defaultdict(list)
    for s in services:
        if s.proto == "any":
            for proto, hi in _LIMIT.items():
                out[proto].append((0 if proto.startswith("icmp") else 1, hi))
        elif s.proto in ("tcp", "udp"):
            out[s.proto].append((max(1, s.lo), s.hi))
        else:
            out[s.proto].append((s.lo, s.hi))
    return {p: _merge(r) for p, r in out.items()}


def run(
    workloads: int = 385, apps: int | None = 3, seed: int = 1, nca: Path = NCA, keep: Path | None = None
) -> dict[str, Any]:
    estate = synth.generate(workloads, seed=seed, apps=apps)
    policy = load_policy_texts(estate.policy_texts)
    docs = export_documents(policy, estate.workloads, modes=False, failsafes=False, staged=False)
    heps = [d for d in docs if d["kind"] == "HostEndpoint"]
    gnps = [d for d in docs if d["kind"] != "HostEndpoint"]
    name_of = {d["spec"]["node"]: d["metadata"]["name"] for d in heps}
    workdir = keep or Path(tempfile.mkdtemp(prefix="rf-nca-"))
    workdir.mkdir(parents=True, exist_ok=True)
    (workdir / "policies.yaml").write_text(yaml.safe_dump_all(gnps, sort_keys=False))
    (workdir / "endpoints.yaml").write_text(
        yaml.safe_dump({"apiVersion": "v1", "kind": "HostEndpointList", "items": heps}, sort_keys=False)
    )
    # Ringfence: compile + matrix + expansion to workload pairs, the same question NCA answers
    t0 = time.perf_counter()
    engine = Engine(policy)
    engine.load(estate.workloads)
    matrix = compute(policy, engine.workloads.values())
    matrix_s = time.perf_counter() - t0
    ours_raw = {(a, b): edge.services for a, b, edge in matrix.workload_pairs()}
    ours_s = time.perf_counter() - t0
    warm = []
    for _ in range(3):  # the same work again, with the interpreter's caches warm
        t1 = time.perf_counter()
        e2 = Engine(policy)
        e2.load(estate.workloads)
        m2 = compute(policy, e2.workloads.values())
        _ = {(a, b): edge.services for a, b, edge in m2.workload_pairs()}
        warm.append(time.perf_counter() - t1)
    # NCA
    out_file = workdir / "nca-out.txt"
    cmd = [str(nca), "--connectivity", str(workdir / "policies.yaml"), "-p", str(workdir / "endpoints.yaml")]
    cmd += ["-o", "txt_no_fw_rules", "-f", str(out_file)]
    t0 = time.perf_counter()
    proc = subprocess.run(cmd, capture_output=True, text=True, check=False)
    nca_s = time.perf_counter() - t0
    if proc.returncode != 0 and not out_file.exists():
        raise RuntimeError(f"nca failed ({proc.returncode}): {proc.stderr[-2000:]}")
    reported = re.search(r"Total run time:\s*([\d.]+)", proc.stdout + proc.stderr)
    theirs, external = parse_nca_output(out_file.read_text(), set(name_of.values()))
    # NCA keeps at most two endpoints per set of identical labels ("isomorphic peers",
    # TopologyObjectsFinder._add_peer), in file order: compare on the endpoints it kept
    kept = representatives(heps)
    ours = {
        (name_of[a], name_of[b]): ours_to_portsets(s)
        for (a, b), s in ours_raw.items()
        if name_of[a] in kept and name_of[b] in kept
    }
    only_ours = sorted(set(ours) - set(theirs))
    only_theirs = sorted(set(theirs) - set(ours))
    port_diffs = sorted(k for k in set(ours) & set(theirs) if ours[k] != theirs[k])
    return {
        "endpoints": len(heps),
        "policies": len(gnps),
        "rules": len(policy.rules),
        "ours_s": round(ours_s, 4),
        "ours_warm_min_s": round(min(warm), 4),
        "ours_group_matrix_s": round(matrix_s, 4),
        "nca_s": round(nca_s, 2),
        "nca_reported_s": float(reported.group(1)) if reported else None,
        "speedup": round(nca_s / ours_s, 1) if ours_s else None,
        "nca_kept_endpoints": len(kept),
        "our_pairs_all_endpoints": len(ours_raw),
        "our_pairs": len(ours),
        "nca_pairs": len(theirs),
        "nca_external_lines": external,
        "agree": not only_ours and not only_theirs and not port_diffs,
        "only_ours": [list(k) for k in only_ours[:20]],
        "only_nca": [list(k) for k in only_theirs[:20]],
        "port_differences": [{"pair": list(k), "ours": ours[k], "nca": theirs[k]} for k in port_diffs[:20]],
        "counts": {"only_ours": len(only_ours), "only_nca": len(only_theirs), "port_differences": len(port_diffs)},
        "workdir": str(workdir),
    }


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    ap.add_argument("--workloads", type=int, default=385)
    ap.add_argument("--apps", type=int, default=3)
    ap.add_argument("--seed", type=int, default=1)
    ap.add_argument("--nca", type=Path, default=NCA)
    ap.add_argument("--keep", type=Path, help="directory for the exported YAML and NCA's output")
    ap.add_argument("--json", action="store_true")
    args = ap.parse_args(argv)
    if not args.nca.exists():
        print(f"{args.nca} not found; install NCA in its own venv (see this script's docstring)", file=sys.stderr)
        return 2
    r = run(args.workloads, args.apps, args.seed, args.nca, args.keep)
    if args.json:
        print(json.dumps(r, indent=1))
    else:
        print(
            f"estate: {r['endpoints']} host endpoints, {r['policies']} GlobalNetworkPolicies ({r['rules']} Ringfence rules)\n"
            f"NCA --connectivity: {r['nca_s']:.2f} s wall (reports {r['nca_reported_s']} s)\n"
            f"Ringfence load + matrix + workload pairs: {r['ours_s'] * 1e3:.1f} ms "
            f"(warm, best of 3: {r['ours_warm_min_s'] * 1e3:.1f} ms; "
            f"before expanding groups to pairs: {r['ours_group_matrix_s'] * 1e3:.1f} ms)\n"
            f"ratio: {r['speedup']}x\n"
            f"NCA models {r['nca_kept_endpoints']} of {r['endpoints']} endpoints (at most 2 per identical label set)\n"
            f"endpoint pairs among those: ours {r['our_pairs']}, NCA {r['nca_pairs']} "
            f"(+{r['nca_external_lines']} IP-range lines; ours over all endpoints: {r['our_pairs_all_endpoints']})\n"
            f"agree: {r['agree']} {r['counts']}"
        )
        for key in ("only_ours", "only_nca", "port_differences"):
            for item in r[key][:5]:
                print(f"  {key}: {item}")
    return 0 if r["agree"] else 1


if __name__ == "__main__":
    raise SystemExit(main())
