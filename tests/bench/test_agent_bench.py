"""Agent benchmarks (real kernel, netns lab). Slow: run with ``RINGFENCE_BENCH=1 pytest tests/bench -s``.

Figures go to docs/benchmarks.md ("Agent"); every ratio there comes from one run of this module.
Results are also written to ``out/agent-bench.json``.
"""

from __future__ import annotations

import ipaddress
import json
import os
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from ringfence.bundle import AddressSetDoc, Bundle, BundleRule, FailsafeDoc, ServiceMatch, SetDelta, sign
from ringfence.model import Mode
from tests.agent.bundles import key, write
from tests.agent.netlab import AGENT, PROBE, PY, Lab, prerequisites

ROOT = Path(__file__).resolve().parents[2]
OUT = ROOT / "out" / "agent-bench.json"

pytestmark = [pytest.mark.slow, pytest.mark.dataplane]
if os.environ.get("RINGFENCE_BENCH") != "1":
    pytest.skip("benchmarks run only with RINGFENCE_BENCH=1", allow_module_level=True)
if (why := prerequisites()) is not None:
    pytest.skip(why, allow_module_level=True)

RESULTS: dict[str, object] = {}
FAILURES: list[int] = []


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
    net = Lab({"c": 1, "s": 2})
    try:
        net.serve("s", tcp=[8080])
        net.exec("c", "sysctl", "-qw", "net.ipv4.ip_local_port_range=1024 65535", check=True)
        yield net
    finally:
        net.close()
        OUT.parent.mkdir(exist_ok=True)
        OUT.write_text(json.dumps(RESULTS, indent=1, sort_keys=True) + "\n")
        print(json.dumps(RESULTS, indent=1, sort_keys=True))


def test_apply_100k_elements_and_one_element_deltas(lab: Lab, tmp_path: Path) -> None:
    for backend in ("nftables", "iptables"):
        lab.reset("s")
        elements = peers(100_000, "10.77.0.1")
        doc = bundle("s", elements)
        path = write(doc, tmp_path / f"big-{backend}.json")
        ddir = tmp_path / f"deltas-{backend}"
        v = 1
        for i in range(30):  # 30 one-element deltas, alternating add / remove of one address
            addr = f"10.99.{i}.1/32"
            write(SetDelta(set="rf_bench000000000000", from_version=v, to_version=v + 1, add=[addr]), ddir / "x.json")
            (ddir / "x.json").unlink()
            d = sign(SetDelta(set="rf_bench000000000000", from_version=v, to_version=v + 1, add=[addr]), key())
            write(d, ddir / f"{v}.json")
            v += 1
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


def _rate(lab: Lab, seconds: float = 2.0) -> float:
    proc = lab.exec("c", PY, str(PROBE), "rate", lab.v4("s"), "8080", str(seconds), timeout=60)
    assert proc.returncode == 0, proc.stderr
    rate, failed = proc.stdout.split()
    FAILURES.append(int(failed))  # connect timeouts (1 s each, so they also lower the rate)
    return float(rate)


def test_new_connection_cost_10k_peers(lab: Lab, tmp_path: Path) -> None:
    lab.reset("s")
    elements = peers(10_000, lab.v4("c"))
    rates: dict[str, list[float]] = {"none": [], "nft_sets": [], "ipset": [], "iptables_linear": []}
    big = write(bundle("s", elements), tmp_path / "10k.json")
    pub = str(Path(__file__).parents[1] / "golden" / "test-key.pub.pem")
    linear = [
        "*filter",
        ":INPUT ACCEPT [0:0]",
        "-A INPUT -i lo -j ACCEPT",
        "-A INPUT -m conntrack --ctstate ESTABLISHED,RELATED -j ACCEPT",
    ]
    # the allowed client last: the worst case a linear chain has to walk
    linear += [f"-A INPUT -s {e} -p tcp --dport 8080 -j ACCEPT" for e in elements if e != f"{lab.v4('c')}/32"]
    linear += [f"-A INPUT -s {lab.v4('c')}/32 -p tcp --dport 8080 -j ACCEPT", "-A INPUT -j DROP", "COMMIT"]

    def setup(kind: str) -> None:
        lab.reset("s")
        lab.exec("s", "iptables", "-F", "INPUT")
        if kind == "nft_sets":
            assert (
                lab.agent(
                    "s", "apply", "--bundle", str(big), "--public-key", pub, "--state-dir", str(tmp_path / "st-n")
                ).returncode
                == 0
            )
        elif kind == "ipset":
            r = lab.agent(
                "s",
                "apply",
                "--bundle",
                str(big),
                "--public-key",
                pub,
                "--backend",
                "iptables",
                "--state-dir",
                str(tmp_path / "st-i"),
            )
            assert r.returncode == 0, r.stderr
        elif kind == "iptables_linear":
            r = lab.exec("s", "iptables-restore", stdin="\n".join(linear) + "\n", timeout=600)
            assert r.returncode == 0, r.stderr

    for _round in range(7):  # interleaved rounds: drift on a shared machine hits every variant alike
        for kind in rates:
            setup(kind)
            rates[kind].append(_rate(lab))
    lab.exec("s", "iptables", "-F", "INPUT")
    lab.reset("s")
    median = {k: sorted(v)[len(v) // 2] for k, v in rates.items()}
    RESULTS["new_connections_per_s"] = {
        "rounds": rates,
        "median": median,
        "slowdown_vs_none": {k: median["none"] / v for k, v in median.items()},
        "connect_timeouts_per_run": list(FAILURES),
    }


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
