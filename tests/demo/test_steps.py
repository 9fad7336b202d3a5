"""``ringfence demo --steps`` and ``--instances used``: which steps run (with those they build on)
and which of the example's instances the estate then holds."""

from __future__ import annotations

import argparse
from pathlib import Path

import pytest

from ringfence.demo.live import STEPS, run, selected_steps, used_instances
from ringfence.demo.offline import example_dir
from ringfence.local.estate import example_workloads


def test_a_step_brings_the_steps_it_builds_on_in_order() -> None:
    assert selected_steps(None) == STEPS
    assert selected_steps("6") == (6,)
    assert selected_steps("1,6") == (1, 6)
    assert selected_steps("4") == (3, 4)  # 4's flows need 3's fixed tag
    assert selected_steps("5") == (2, 3, 4, 5)  # 5 releases 4's quarantine, scales in what 2 launched
    assert selected_steps("6, 2") == (2, 6)


@pytest.mark.parametrize("spec", ["", "0", "7", "1,x", "one"])
def test_steps_that_do_not_exist_are_refused(spec: str) -> None:
    with pytest.raises(ValueError, match="--steps"):
        selected_steps(spec)


def test_used_instances_are_the_examples_that_the_steps_name() -> None:
    names = {w.id for w in example_workloads(example_dir(None))}
    every = used_instances(STEPS)
    assert len(names) == 20 and set(every) < names and len(every) == 12
    assert used_instances((6,)) == ["ord-dev-db-1", "ord-prod-db-1", "ord-prod-proc-1", "pay-prod-db-1"]
    assert set(used_instances((3, 4))) == set(used_instances((3,))) | set(used_instances((4,)))


def test_the_bench_refuses_a_step_selection_before_starting_anything(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    for extra in ({"steps": "6", "instances": "all"}, {"steps": None, "instances": "used"}):
        args = argparse.Namespace(out=str(tmp_path), dry_run=True, example=None, bench=True, **extra)
        assert run(args) == 2
        assert "not --bench" in capsys.readouterr().err
    args = argparse.Namespace(out=str(tmp_path), dry_run=True, example=None, bench=False, steps="9", instances="all")
    assert run(args) == 2
    assert "--steps '9'" in capsys.readouterr().err
