"""Engine benchmarks (pytest-benchmark). Under the default ``--benchmark-disable`` each runs once
as a smoke test at small N; run ``pytest tests/bench --benchmark-enable`` for timings."""

from __future__ import annotations

from typing import Any

import pytest

from ringfence import synth
from ringfence.bench import CHANGE_KINDS, format_text, run_bench
from ringfence.engine import Engine
from ringfence.engine.connectivity import compute, compute_inventory
from ringfence.policy import Policy, load_policy_texts

N = 300


@pytest.fixture(scope="module")
def estate() -> tuple[Policy, list[Any]]:
    e = synth.generate(N, seed=1)
    return load_policy_texts(e.policy_texts), e.workloads


def test_bench_full_compile(benchmark: Any, estate: tuple[Policy, list[Any]]) -> None:
    policy, workloads = estate

    def compile_all() -> int:
        engine = Engine(policy)
        engine.load(workloads)
        return sum(len(engine.render(wid)["inbound"]) for wid in engine.workloads)  # type: ignore[arg-type]

    assert benchmark(compile_all) > 0


def test_bench_incremental_relabel(benchmark: Any, estate: tuple[Policy, list[Any]]) -> None:
    policy, workloads = estate
    engine = Engine(policy)
    engine.load(workloads)
    w = next(w for w in workloads if w.tags.get("ringfence:role") == "web")
    flips = [w.model_copy(update={"tags": {**w.tags, "ringfence:role": role}}) for role in ("app", "web")]
    state = {"i": 0}

    def change() -> None:
        state["i"] += 1
        upd = engine.upsert(flips[state["i"] % 2])
        assert set(upd.bundles) == upd.rebuilt

    benchmark(change)
    assert engine.workloads[w.id].labels["role"] in ("app", "web")


def test_bench_connectivity(benchmark: Any, estate: tuple[Policy, list[Any]]) -> None:
    policy, workloads = estate
    engine = Engine(policy)
    engine.load(workloads)
    matrix = benchmark(compute, policy, engine.workloads.values())
    assert matrix.allowed_pair_count() > 0


def test_bench_connectivity_from_inventory(benchmark: Any, estate: tuple[Policy, list[Any]]) -> None:
    policy, workloads = estate
    matrix = benchmark(compute_inventory, policy, workloads)
    assert matrix.allowed_pair_count() > 0


EXPECTED_KEYS = {
    "workloads",
    "rules",
    "full_compile_s",
    "incremental_p50_s",
    "incremental_p99_s",
    "naive_pair_rules",
    "compiled_rules",
    "compiled_set_elements",
    "bundle_bytes_total",
    "peak_rss_mb",
    "policy_load_s",
}


def test_run_bench_result_keys_and_sanity() -> None:
    result = run_bench(N, seed=1, changes=30)
    assert set(result) >= EXPECTED_KEYS
    assert result["workloads"] == N
    assert result["changes"] == 30
    assert 0 < result["incremental_p50_s"] <= result["incremental_p99_s"]
    assert result["full_compile_s"] > 0
    assert result["naive_pair_rules"] > result["allowed_workload_pairs"] > 0
    assert result["compiled_rules"] > 0 and result["compiled_set_elements"] > 0
    assert result["bundle_bytes_total"] > 1000 and result["peak_rss_mb"] > 10
    assert set(result["incremental_p50_by_kind_s"]) <= set(CHANGE_KINDS)
    text = format_text(result)
    assert f"{N:,} workloads" in text and "incremental" in text


def test_run_bench_is_reproducible_in_counts() -> None:
    a, b = run_bench(200, seed=5, changes=10), run_bench(200, seed=5, changes=10)
    for key in ("rules", "naive_pair_rules", "compiled_rules", "compiled_set_elements", "bundle_bytes_total"):
        assert a[key] == b[key], key
