"""Compare Ringfence's connectivity computation with network-config-analyzer (NCA) on one estate.

Usage (NCA lives in its own virtual environment, never the project's)::

    python3 -m venv /tmp/nca && /tmp/nca/bin/pip install network-config-analyzer==2.1.0
    .venv/bin/python tests/bench/compare_nca.py [--workloads 385] [--apps 3] [--seed 1] [--json]

It generates a synthetic estate (:mod:`ringfence.synth`), exports it with
:func:`ringfence.export.calico.export_calico` as host endpoints + GlobalNetworkPolicies (every
endpoint enforced, no fail-safe policy, no staged rulesets: the pure policy that
:func:`ringfence.engine.connectivity.compute` evaluates), runs ``nca --connectivity`` on it
with ``-o txt_no_fw_rules``, and in the same run times Ringfence. Then it parses NCA's
explicit pairs and compares them, endpoint pair by endpoint pair, protocol by protocol and port
by port, with ours. Pairs with an IP range on one side (IP-list rules) are counted but not
compared: the matrix covers workload pairs only.

What is timed on each side:

* NCA: the wall and CPU time of ``nca --connectivity`` as a process (interpreter start, imports,
  YAML parsing, the analysis, writing its output), and the "Total run time" it reports itself
  (everything but interpreter start and imports).
* Ringfence **as a user runs it**: ``ringfence connectivity --json`` as a process on files of the
  same estate (interpreter start, imports, policy and inventory YAML, the matrix, writing the
  JSON), wall and CPU, median of a few runs. This is the comparison to quote: both whole processes.
* Ringfence in process, **matrix**: :func:`~ringfence.engine.connectivity.compute_inventory` — inventory
  records (already parsed) → labels → the complete group-level matrix (every group's members,
  every allowed group pair with its services and rules). Timed cold (the first call in the
  process) and then ``--repeat`` times more.
* separately: expanding the matrix to every (source, destination) workload pair as a dict
  (``pairs``); loading the policy YAML (``policy load``, :func:`load_policy_texts`); loading the
  inventory YAML (``inventory load``, :func:`load_inventory` on a file of the same records); and
  the previous path, ``Engine.load`` + :func:`compute` + pairs (``engine path``), for reference.

Before each of our timed calls the garbage the harness left behind is collected (outside the
timer; the garbage collector stays on, so collections our own allocations trigger are timed).
What existed before the run (the harness, a test worker's heap) is frozen out of the collector
(``gc.freeze``): collections scan what the run made, as they would in the CLI's own process.
Ratios are NCA's time over ours, each named by what the two sides include.

``tests/bench/test_compare_nca.py`` runs this at a small size when ``/tmp/nca`` exists and skips
otherwise; nothing here installs NCA.
"""

from __future__ import annotations

import argparse
import gc
import json
import re
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from collections import defaultdict
from collections.abc import Callable
from pathlib import Path
from typing import Any

import yaml

from ringfence import synth
from ringfence.engine import Engine
from ringfence.engine.connectivity import Matrix, compute, compute_inventory
from ringfence.export.calico import export_documents
from ringfence.inventory import load_inventory
from ringfence.policy import load_policy_texts

NCA = Path("/tmp/nca/bin/nca")
PortSets = dict[str, list[tuple[int, int]]]  # protocol → merged (lo, hi) ranges
_LIMIT = {"tcp": 65535, "udp": 65535, "icmp": 255, "icmpv6": 255}
_LINE = re.compile(r"^(?P<src>\S+) => (?P<dst>\S+) : (?P<conn>.*)$")


# python + PyYAML reading our inputs and nothing more: no Python tool on this parser is faster
_FLOOR = """
import pathlib, sys, yaml
for f in sorted(pathlib.Path(sys.argv[1]).glob("*.yaml")) + [pathlib.Path(sys.argv[2])]:
    yaml.load(f.read_text(), Loader=yaml.CSafeLoader)
"""


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


def _seconds(fn: Callable[[], object], times: int) -> list[float]:
    out = []
    for _ in range(times):
        gc.collect()  # the garbage of whatever ran before is not ours to pay for; our own is
        t0 = time.perf_counter()
        fn()
        out.append(time.perf_counter() - t0)
    return out


def _children_cpu() -> float:
    """User + system CPU seconds of the finished child processes so far."""
    ru = resource.getrusage(resource.RUSAGE_CHILDREN)
    return ru.ru_utime + ru.ru_stime


def _pairs(matrix: Matrix) -> dict[tuple[str, str], Any]:
    return {(a, b): edge.services for a, b, edge in matrix.workload_pairs()}


def _engine_path(policy: Any, workloads: list[Any]) -> dict[tuple[str, str], Any]:
    engine = Engine(policy)
    engine.load(workloads)
    return _pairs(compute(policy, engine.workloads.values()))


def run(
    workloads: int = 385,
    apps: int | None = 3,
    seed: int = 1,
    nca: Path = NCA,
    keep: Path | None = None,
    repeat: int = 20,
) -> dict[str, Any]:
    # Whatever the caller holds is frozen out of the collector, so each gc.collect() before a
    # timed call scans only what this run made. In a pytest worker that had run half the suite,
    # the ~40 full-heap collections took 280 s of a 4 s test.
    gc.freeze()
    try:
        return _run(workloads, apps, seed, nca, keep, repeat)
    finally:
        gc.unfreeze()


def _run(workloads: int, apps: int | None, seed: int, nca: Path, keep: Path | None, repeat: int) -> dict[str, Any]:
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
    inventory_file = workdir / "inventory.yaml"
    inventory_file.write_text(
        yaml.safe_dump({"workloads": [w.model_dump(mode="json", exclude_defaults=True) for w in estate.workloads]})
    )
    # Ringfence: the group matrix, cold (first call in this process) and then `repeat` times more
    gc.collect()
    t0 = time.perf_counter()
    matrix = compute_inventory(policy, estate.workloads)
    matrix_cold = time.perf_counter() - t0
    matrix_s = _seconds(lambda: compute_inventory(policy, estate.workloads), repeat)
    gc.collect()
    t0 = time.perf_counter()
    ours_raw = _pairs(matrix)
    pairs_cold = time.perf_counter() - t0
    pairs_s = _seconds(lambda: _pairs(matrix), repeat)
    policy_s = _seconds(lambda: load_policy_texts(estate.policy_texts), 5)
    inventory_s = _seconds(lambda: load_inventory(inventory_file), 5)
    engine_s = _seconds(lambda: _engine_path(policy, estate.workloads), 5)
    assert load_inventory(inventory_file) == estate.workloads
    # NCA
    out_file = workdir / "nca-out.txt"
    cmd = [str(nca), "--connectivity", str(workdir / "policies.yaml"), "-p", str(workdir / "endpoints.yaml")]
    cmd += ["-o", "txt_no_fw_rules", "-f", str(out_file)]
    cpu0 = _children_cpu()
    t0 = time.perf_counter()
    proc = subprocess.run(cmd, capture_output=True, text=True, check=False)
    nca_s = time.perf_counter() - t0
    nca_cpu = _children_cpu() - cpu0
    # ours as a user runs it: the CLI as a whole process, on files of the same estate
    policy_dir = workdir / "policy"
    policy_dir.mkdir(exist_ok=True)
    for name, text in estate.policy_texts.items():
        (policy_dir / name).write_text(text)
    ours_cmd = [str(Path(sys.executable).with_name("ringfence")), "connectivity", "--policy", str(policy_dir)]
    ours_cmd += ["--inventory", str(inventory_file), "--json"]
    # the floor for any Python tool on PyYAML: start the interpreter, import yaml, parse the same
    # files with libyaml (CSafeLoader), nothing else; timed the same way, interleaved with ours
    floor_cmd = [sys.executable, "-c", _FLOOR, str(policy_dir), str(inventory_file)]
    cli_wall, cli_cpu, floor_wall, floor_cpu = [], [], [], []
    for _ in range(max(3, repeat // 4)):
        for cmd_, wall, cpu in ((ours_cmd, cli_wall, cli_cpu), (floor_cmd, floor_wall, floor_cpu)):
            cpu0 = _children_cpu()
            t0 = time.perf_counter()
            subprocess.run(cmd_, stdout=subprocess.DEVNULL, check=True)
            wall.append(time.perf_counter() - t0)
            cpu.append(_children_cpu() - cpu0)
    if proc.returncode != 0 and not out_file.exists():
        raise RuntimeError(f"nca failed ({proc.returncode}): {proc.stderr[-2000:]}")
    reported = re.search(r"Total run time:\s*([\d.]+)", proc.stdout + proc.stderr)
    nca_reported = float(reported.group(1)) if reported else None
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
    med = statistics.median
    matrix_med, pairs_med, policy_med = med(matrix_s), med(pairs_s), med(policy_s)

    def ratio(theirs_s: float | None, ours_s: float) -> float | None:
        return round(theirs_s / ours_s, 1) if theirs_s and ours_s else None

    return {
        "endpoints": len(heps),
        "policies": len(gnps),
        "rules": len(policy.rules),
        "label_groups": len(matrix.groups),
        "group_edges": len(matrix.edges),
        "repeat": repeat,
        "ours_matrix_cold_s": round(matrix_cold, 5),
        "ours_matrix_median_s": round(matrix_med, 5),
        "ours_matrix_min_s": round(min(matrix_s), 5),
        "ours_matrix_max_s": round(max(matrix_s), 5),
        "ours_pairs_cold_s": round(pairs_cold, 5),
        "ours_pairs_median_s": round(pairs_med, 5),
        "policy_load_median_s": round(policy_med, 5),
        "inventory_load_median_s": round(med(inventory_s), 5),
        "engine_path_median_s": round(med(engine_s), 5),
        "nca_s": round(nca_s, 2),
        "nca_reported_s": nca_reported,
        "nca_cpu_s": round(nca_cpu, 2),
        "ours_cli_wall_median_s": round(med(cli_wall), 4),
        "ours_cli_cpu_median_s": round(med(cli_cpu), 4),
        "ours_cli_command": " ".join(ours_cmd),
        "floor_wall_median_s": round(med(floor_wall), 4),
        "floor_cpu_median_s": round(med(floor_cpu), 4),
        "ratios": {
            "whole_process_wall: nca/ours_cli": ratio(nca_s, med(cli_wall)),
            "whole_process_cpu: nca/ours_cli": ratio(nca_cpu, med(cli_cpu)),
            "ceiling, whole_process_wall: nca/(python + import yaml + parse the inputs)": ratio(nca_s, med(floor_wall)),
            "nca_wall/matrix_cold": ratio(nca_s, matrix_cold),
            "nca_wall/matrix_median": ratio(nca_s, matrix_med),
            "nca_reported/matrix_median": ratio(nca_reported, matrix_med),
            "nca_wall/(matrix+pairs)_median": ratio(nca_s, matrix_med + pairs_med),
            "nca_wall/(policy_load+matrix)_median": ratio(nca_s, policy_med + matrix_med),
            "nca_reported/(policy_load+inventory_load+matrix+pairs)_median": ratio(
                nca_reported, policy_med + med(inventory_s) + matrix_med + pairs_med
            ),
            "nca_wall/engine_path_median": ratio(nca_s, med(engine_s)),
        },
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
    ap.add_argument("--repeat", type=int, default=20, help="timed runs of our side after the cold one")
    ap.add_argument("--json", action="store_true")
    args = ap.parse_args(argv)
    if not args.nca.exists():
        print(f"{args.nca} not found; install NCA in its own venv (see this script's docstring)", file=sys.stderr)
        return 2
    r = run(args.workloads, args.apps, args.seed, args.nca, args.keep, args.repeat)
    if args.json:
        print(json.dumps(r, indent=1))
    else:
        ms = 1e3
        print(
            f"estate: {r['endpoints']} host endpoints, {r['policies']} GlobalNetworkPolicies "
            f"({r['rules']} Ringfence rules; {r['label_groups']} label groups, {r['group_edges']} allowed group pairs)\n"
            f"NCA --connectivity: {r['nca_s']:.2f} s wall, {r['nca_cpu_s']:.2f} s CPU (reports {r['nca_reported_s']} s)\n"
            f"ringfence connectivity --json (whole process, median): {r['ours_cli_wall_median_s'] * 1e3:.0f} ms wall, "
            f"{r['ours_cli_cpu_median_s'] * 1e3:.0f} ms CPU\n"
            f"floor (python, import yaml, parse the same files; median): {r['floor_wall_median_s'] * 1e3:.0f} ms wall\n"
            f"Ringfence matrix (inventory -> labels -> group matrix): cold {r['ours_matrix_cold_s'] * ms:.2f} ms; "
            f"{r['repeat']} more: median {r['ours_matrix_median_s'] * ms:.2f}, "
            f"min {r['ours_matrix_min_s'] * ms:.2f}, max {r['ours_matrix_max_s'] * ms:.2f} ms\n"
            f"  + expansion to {r['our_pairs_all_endpoints']} workload pairs: median {r['ours_pairs_median_s'] * ms:.2f} ms "
            f"(cold {r['ours_pairs_cold_s'] * ms:.2f})\n"
            f"  policy load {r['policy_load_median_s'] * ms:.1f} ms, inventory load "
            f"{r['inventory_load_median_s'] * ms:.1f} ms (medians; not in the matrix figure)\n"
            f"  previous path (Engine.load + compute + pairs): median {r['engine_path_median_s'] * ms:.1f} ms"
        )
        for name, value in r["ratios"].items():
            print(f"ratio {name}: {value}x")
        print(
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
