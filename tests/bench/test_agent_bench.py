"""Agent benchmarks (real kernel, netns lab). Slow: run with ``RINGFENCE_BENCH=1 pytest tests/bench -s``.

Figures go to docs/benchmarks.md ("Agent"); every ratio in one run comes from that run. Results
are also written to ``out/agent-bench.json`` (or ``RINGFENCE_BENCH_OUT``); the new-connection
rounds of several runs pool with ``python -m tests.bench.conn_pool FILE...``.
"""

from __future__ import annotations

import ipaddress
import json
import os
import random
import shutil
import statistics
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from ringfence.bundle import AddressSetDoc, Bundle, BundleRule, FailsafeDoc, ServiceMatch, SetDelta, sign
from ringfence.local.lab import AGENT, PY, Lab, prerequisites
from ringfence.model import Mode
from ringfence_agent.plan import LocalFailsafes, compile_plan
from tests.agent.bundles import key, write
from tests.bench.conn_pool import median_ci

ROOT = Path(__file__).resolve().parents[2]
OUT = Path(os.environ.get("RINGFENCE_BENCH_OUT", ROOT / "out" / "agent-bench.json"))

pytestmark = [pytest.mark.slow, pytest.mark.dataplane]
if os.environ.get("RINGFENCE_BENCH") != "1":
    pytest.skip("benchmarks run only with RINGFENCE_BENCH=1", allow_module_level=True)
if (why := prerequisites()) is not None:
    pytest.skip(why, allow_module_level=True)

RESULTS: dict[str, object] = {}
DELTAS = int(os.environ.get("RINGFENCE_BENCH_DELTAS", "100"))
# new-connection variants → the lab host serving them (each its own namespace and firewall)
VARIANTS = {"none": "s0", "stateful_minimal": "sm", "nft_sets": "sn", "ipset": "si", "iptables_linear": "sl"}
# what any stateful firewall costs (conntrack), to tell it from the cost of Ringfence's rules and sets
STATEFUL_MINIMAL = """table inet bench {
  chain input {
    type filter hook input priority 0; policy drop;
    iif lo accept
    ct state established,related accept
    tcp dport 8080 accept
  }
}
"""


def peers(n: int, include: str) -> list[str]:
    """n non-adjacent /32s in 10.100.0.0/14 (no aggregation possible), plus ``include``."""
    base = int(ipaddress.IPv4Address("10.100.0.0"))
    out = [f"{ipaddress.IPv4Address(base + 2 * i)}/32" for i in range(n - 1)]
    return sorted([*out, f"{include}/32"], key=lambda c: int(ipaddress.ip_network(c).network_address))


def bundle(wid: str, elements: list[str], version: int = 1) -> Bundle:
    doc = Bundle(
        workload_id=wid,
        version=version,
        policy_version=1,
        mode=Mode.ENFORCE,
        sets={"rf_bench000000000000": AddressSetDoc(version=1, v4=elements)},
        inbound=[
            BundleRule(
                id="bench/peers-to-web",
                action="allow",
                set="rf_bench000000000000",
                services=[ServiceMatch(proto="tcp", ports=(8080, 8080))],
            )
        ],
        failsafes=FailsafeDoc(admin_cidrs=["10.77.0.250/32"]),
    )
    return sign(doc, key())


@pytest.fixture(scope="module")
def lab() -> Iterator[Lab]:
    net = Lab({"c": 1, "s": 2, **{host: 10 + i for i, host in enumerate(VARIANTS.values())}})
    try:
        net.serve("s", tcp=[8080])
        net.exec("c", "sysctl", "-qw", "net.ipv4.ip_local_port_range=1024 65535", check=True)
        yield net
    finally:
        net.close()
        OUT.parent.mkdir(parents=True, exist_ok=True)
        OUT.write_text(json.dumps(RESULTS, indent=1, sort_keys=True) + "\n")
        print(json.dumps(RESULTS, indent=1, sort_keys=True))


def test_apply_100k_elements_and_one_element_deltas(lab: Lab, tmp_path: Path) -> None:
    for backend in ("nftables", "iptables"):
        lab.reset("s")
        elements = peers(100_000, "10.77.0.1")
        doc = bundle("s", elements)
        path = write(doc, tmp_path / f"big-{backend}.json")
        ddir = tmp_path / f"deltas-{backend}"
        signer = key()
        for v in range(1, 1 + DELTAS):  # one-element deltas: one new address each
            addr = f"10.99.{v // 250}.{v % 250 + 1}/32"
            d = sign(SetDelta(set="rf_bench000000000000", from_version=v, to_version=v + 1, add=[addr]), signer)
            write(d, ddir / f"{v}.json")
        proc = lab.exec(
            "s",
            PY,
            str(Path(__file__).parent / "agent_inner.py"),
            str(tmp_path / f"st-{backend}"),
            str(path),
            str(ddir),
            backend,
            str(Path(__file__).parents[1] / "golden" / "test-key.pub.pem"),
            timeout=600,
        )
        assert proc.returncode == 0, proc.stderr
        inner = json.loads(proc.stdout)
        # the same through the CLI (process start-up, verification and state writes included)
        lab.reset("s")
        t = time.perf_counter()
        cli = lab.agent(
            "s",
            "apply",
            "--bundle",
            str(path),
            "--public-key",
            str(Path(__file__).parents[1] / "golden" / "test-key.pub.pem"),
            "--backend",
            backend,
            "--state-dir",
            str(tmp_path / f"cli-{backend}"),
            timeout=600,
        )
        inner["cli_apply_s"] = time.perf_counter() - t
        assert cli.returncode == 0, cli.stderr
        assert lab.tcp("c", "s", 8080)
        RESULTS[f"apply_100k_{backend}"] = inner


def _counter(lab: Lab, host: str, backend: str, state: Path, name: str) -> int:
    proc = lab.agent(host, "drops", "--backend", backend, "--state-dir", str(state), "--json")
    assert proc.returncode == 0, proc.stderr
    return int(json.loads(proc.stdout)["counters"].get(name, 0))


def test_new_connection_cost_10k_peers(lab: Lab, tmp_path: Path) -> None:
    """Kernel CPU per new connection: a C client connects and closes COUNT times per run; one
    server namespace per variant, so rounds interleave the variants without reconfiguring."""
    if shutil.which("gcc") is None:
        pytest.skip("gcc is needed to build the C load generator")
    load = tmp_path / "connload"
    subprocess.run(["gcc", "-O2", "-o", str(load), str(Path(__file__).parent / "connload.c")], check=True)
    client = lab.v4("c")
    elements = peers(10_000, client)
    assert f"{client}/32" in elements and len(elements) == 10_000
    pub = str(Path(__file__).parents[1] / "golden" / "test-key.pub.pem")
    doc = bundle("s", elements)
    big = write(doc, tmp_path / "10k.json")
    counter = next(r.counter for r in compile_plan(doc, LocalFailsafes()).rules if r.rule_id == "bench/peers-to-web")
    servers = {}
    for kind, host in VARIANTS.items():
        lab.reset(host)
        servers[kind] = lab.spawn(host, str(load), "serve", "8080", stdout=subprocess.PIPE)
        assert servers[kind].stdout is not None and servers[kind].stdout.readline().strip() == "ready"
    states = {"nft_sets": tmp_path / "st-n", "ipset": tmp_path / "st-i"}
    for kind, backend in (("nft_sets", "nftables"), ("ipset", "iptables")):
        args = ["apply", "--bundle", str(big), "--public-key", pub, "--backend", backend]
        r = lab.agent(VARIANTS[kind], *args, "--state-dir", str(states[kind]), timeout=600)
        assert r.returncode == 0, r.stderr
    linear = [
        "*filter",
        ":INPUT ACCEPT [0:0]",
        "-A INPUT -i lo -j ACCEPT",
        "-A INPUT -m conntrack --ctstate ESTABLISHED,RELATED -j ACCEPT",
    ]
    # the allowed client last: the worst case a linear chain has to walk
    linear += [f"-A INPUT -s {e} -p tcp --dport 8080 -j ACCEPT" for e in elements if e != f"{client}/32"]
    linear += [f"-A INPUT -s {client}/32 -p tcp --dport 8080 -j ACCEPT", "-A INPUT -j DROP", "COMMIT"]
    r = lab.exec(VARIANTS["iptables_linear"], "iptables-restore", stdin="\n".join(linear) + "\n", timeout=600)
    assert r.returncode == 0, r.stderr
    r = lab.exec(VARIANTS["stateful_minimal"], "nft", "-f", "-", stdin=STATEFUL_MINIMAL)
    assert r.returncode == 0, r.stderr
    # nothing filters the baseline server
    assert "RF-IN" not in lab.exec(VARIANTS["none"], "iptables-save").stdout
    assert lab.exec(VARIANTS["none"], "nft", "list", "ruleset").stdout.strip() == ""

    count = int(os.environ.get("RINGFENCE_BENCH_CONNECTIONS", "4000"))
    rounds = int(os.environ.get("RINGFENCE_BENCH_ROUNDS", "30"))
    runs: dict[str, list[dict[str, float]]] = {k: [] for k in VARIANTS}
    rng = random.Random(1)
    for _ in range(1 + rounds):  # round 0 warms caches and conntrack, and is not counted
        order = list(VARIANTS)
        rng.shuffle(order)  # interleaved, in a new order each round: drift hits every variant alike
        for kind in order:
            sched0 = _sched_ns(servers[kind].pid)
            proc = lab.exec("c", str(load), "connect", lab.v4(VARIANTS[kind]), "8080", str(count), timeout=300)
            assert proc.returncode == 0, proc.stderr
            ok, failed, wall, cpu, p50, p90 = (int(x) for x in proc.stdout.split())
            server_cpu = _sched_ns(servers[kind].pid) - sched0
            runs[kind].append(
                {
                    "ok": ok,
                    "failed": failed,
                    "cpu_us_per_conn": (cpu + server_cpu) / ok / 1000,
                    "client_cpu_us_per_conn": cpu / ok / 1000,
                    "connect_p50_us": p50 / 1000,
                    "connect_p90_us": p90 / 1000,
                    "conn_per_s": ok / (wall / 1e9),
                }
            )
    made = {k: sum(int(r["ok"]) for r in v) for k, v in runs.items()}
    # the peer-set lookup is on the measured path: every connection's SYN was accepted by the
    # set rule (one packet per SYN; retransmits only add), not by a rule before it
    assert _counter(lab, VARIANTS["nft_sets"], "nftables", states["nft_sets"], counter) >= made["nft_sets"]
    assert _counter(lab, VARIANTS["ipset"], "iptables", states["ipset"], counter) >= made["ipset"]
    save = lab.exec(VARIANTS["iptables_linear"], "iptables-save", "-c", "-t", "filter").stdout
    last = next(line for line in save.splitlines() if f"-s {client}/32" in line)
    assert int(last.split(":")[0].lstrip("[")) >= made["iptables_linear"]
    for kind, host in VARIANTS.items():
        lab.kill(servers[kind])
        lab.exec(host, "iptables", "-F", "INPUT")
        lab.exec(host, "nft", "delete", "table", "inet", "bench")
        lab.reset(host)
    runs = {k: v[1:] for k, v in runs.items()}  # drop the warm-up round

    def paired(kind: str, base: str, metric: str) -> dict[str, float]:
        """variant ÷ base within each round (higher = slower), over the rounds."""
        pairs = zip(runs[kind], runs[base], strict=True)
        if metric == "conn_per_s":
            return median_ci([b[metric] / r[metric] for r, b in pairs])
        return median_ci([r[metric] / b[metric] for r, b in pairs])

    metrics = ("cpu_us_per_conn", "connect_p50_us", "conn_per_s")
    RESULTS["new_connections"] = {
        "connections_per_run": count,
        "rounds": rounds,
        "runs": runs,
        "median": {k: {m: statistics.median(r[m] for r in v) for m in metrics} for k, v in runs.items()},
        "slowdown_vs_none": {m: {k: paired(k, "none", m) for k in VARIANTS} for m in metrics},
        "slowdown_vs_stateful_minimal": {k: paired(k, "stateful_minimal", "cpu_us_per_conn") for k in VARIANTS},
        "extra_cpu_us_vs_none": {
            k: median_ci(
                [r["cpu_us_per_conn"] - b["cpu_us_per_conn"] for r, b in zip(runs[k], runs["none"], strict=True)]
            )
            for k in VARIANTS
        },
        "connect_timeouts": {k: sum(int(r["failed"]) for r in v) for k, v in runs.items()},
    }


def _sched_ns(pid: int) -> int:
    """Time the process has been on a CPU (ns), softirq work run in its context included."""
    return int(Path(f"/proc/{pid}/schedstat").read_text().split()[0])


def test_idle_daemon_cpu_and_rss(lab: Lab, tmp_path: Path) -> None:
    lab.reset("s")
    src = tmp_path / "src"
    write(bundle("s", peers(10_000, lab.v4("c"))), src / "bundles" / "s.json")
    cfg = tmp_path / "agent.json"
    cfg.write_text(
        json.dumps(
            {
                "workload_id": "s",
                "public_key": str(Path(__file__).parents[1] / "golden" / "test-key.pub.pem"),
                "state_dir": str(tmp_path / "st"),
                "source": str(src),
            }
        )
    )
    p = lab.spawn("s", str(AGENT), "run", "--config", str(cfg), stderr=subprocess.DEVNULL)
    try:
        time.sleep(5)  # start-up and first apply
        window = float(os.environ.get("RINGFENCE_BENCH_IDLE_S", "60"))
        tick = os.sysconf("SC_CLK_TCK")

        def cpu() -> float:
            fields = Path(f"/proc/{p.pid}/stat").read_text().rsplit(")", 1)[1].split()
            return (
                int(fields[11]) + int(fields[12]) + int(fields[13]) + int(fields[14])
            ) / tick  # incl. children (nft)

        c0, t0 = cpu(), time.monotonic()
        time.sleep(window)
        c1, t1 = cpu(), time.monotonic()
        mem = {
            line.split(":")[0]: int(line.split()[1])
            for line in Path(f"/proc/{p.pid}/status").read_text().splitlines()
            if line.startswith(("VmHWM", "VmRSS"))
        }
        RESULTS["idle_daemon"] = {
            "window_s": t1 - t0,
            "cpu_percent": 100 * (c1 - c0) / (t1 - t0),
            "peak_rss_mb": mem["VmHWM"] / 1024,
            "rss_mb": mem["VmRSS"] / 1024,
            "set_elements": 10_000,
        }
    finally:
        lab.kill(p, 15)
    assert sys.platform == "linux"
