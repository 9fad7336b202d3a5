"""The state directory's delta journal: one durable write per delta, and after a crash at any
point the state re-applies exactly the firewall before or after the operation that was running."""

from __future__ import annotations

import errno
import json
import os
import random
import time
from collections.abc import Callable
from pathlib import Path

import pytest

from ringfence import bundlewire as wire
from ringfence.bundle import (
    DEFAULT_TTL,
    AddressSetDoc,
    Bundle,
    BundleRule,
    FailsafeDoc,
    GroupMember,
    ServiceMatch,
    SetDelta,
    sign,
    to_wire,
)
from ringfence.model import Mode
from ringfence_agent.backends import ApplyError, ElementChange
from ringfence_agent.backends.nft import NftBackend, NftRenderer
from ringfence_agent.core import Agent, Rejected, effective_bundle, fold_delta, same_firewall
from ringfence_agent.plan import GroupChange, compile_plan
from ringfence_agent.state import StateDir
from tests.agent.bundles import PUBLIC_KEY, key
from tests.agent.test_agent_unit import LOCAL, FakeBackend, Verifier

SET = "rf_journal00000000000"
PUB = Path(__file__).resolve().parents[1] / "golden" / "test-key.pub.pem"


# one expiry for every bundle here (the default TTL from now: an agent refreshes one near its
# expiry): two signed a second apart would otherwise differ, which is a refresh, not a no-op
EXPIRES_AT = int(time.time()) + DEFAULT_TTL


def bundle(version: int, elements: list[str], port: int = 8080) -> wire.Bundle:
    doc = Bundle(
        workload_id="w",
        version=version,
        policy_version=1,
        mode=Mode.ENFORCE,
        sets={SET: AddressSetDoc(version=version, v4=elements)},
        inbound=[BundleRule(id="r", action="allow", set=SET, services=[ServiceMatch(proto="tcp", ports=(port, port))])],
        failsafes=FailsafeDoc(admin_cidrs=["192.0.2.1/32"]),
    )
    return to_wire(sign(doc, key(), expires_at=EXPIRES_AT))


def delta(v: int, add: list[str] = (), remove: list[str] = ()) -> wire.SetDelta:  # type: ignore[assignment]
    return to_wire(sign(SetDelta(set=SET, from_version=v, to_version=v + 1, add=list(add), remove=list(remove)), key()))


def make(path: Path) -> tuple[Agent, FakeBackend]:
    backend = FakeBackend()
    return Agent("w", Verifier.from_file(PUB), backend, StateDir(path), LOCAL, log=lambda m: None), backend


# the operations, in order; each is applied to a running agent
B1 = bundle(1, ["10.0.0.1/32", "10.0.0.3/32"])
B2 = bundle(5, ["10.0.0.1/32", "10.0.0.5/32"], port=9090)  # other rules: a whole-bundle change
OPS: list[wire.Bundle | wire.SetDelta] = [
    B1,
    delta(1, add=["10.0.0.7/32"]),
    delta(2, remove=["10.0.0.3/32"]),
    delta(3, add=["10.0.0.9/32"], remove=["10.0.0.7/32"]),
    B2,
    delta(5, add=["10.0.0.11/32"]),
    delta(6, add=["10.0.0.13/32"]),
]


def run_op(agent: Agent, op: wire.Bundle | wire.SetDelta) -> None:
    if isinstance(op, wire.Bundle):
        agent.apply_bundle(op)
    else:
        agent.apply_delta(op)


class Crash(BaseException):
    """The process stops here: raised instead of the filesystem step and of every one after it."""


DURABLE_STEPS = ("fsync", "fdatasync", "replace", "pwrite", "ftruncate", "unlink")


def crash_at(monkeypatch: pytest.MonkeyPatch, n: int) -> Callable[[], int]:
    """Stop the process at the n-th filesystem step; a positioned write is torn in half."""
    count = 0

    def wrap(name: str) -> Callable[..., object]:
        real = getattr(os, name)

        def step(*args: object) -> object:
            nonlocal count
            count += 1
            if count == n and name == "pwrite":  # half the line reaches the disk
                data = args[1]
                assert isinstance(data, bytes)
                real(args[0], data[: len(data) // 2], args[2])
            if count >= n:
                raise Crash
            return real(*args)

        return step

    for name in DURABLE_STEPS:
        monkeypatch.setattr(os, name, wrap(name))
    return lambda: count


def same(a: wire.Bundle | None, b: wire.Bundle | None) -> bool:
    return (a is None and b is None) or (a is not None and b is not None and same_firewall(a, b))


def test_a_crash_at_any_step_reapplies_the_firewall_before_or_after(tmp_path: Path) -> None:
    agent, _ = make(tmp_path / "expected")
    expected = [agent.effective()]
    for op in OPS:
        run_op(agent, op)
        expected.append(agent.effective())
    n = 0
    while True:
        n += 1
        state = tmp_path / f"crash-{n}"
        agent, _ = make(state)
        running = None
        with pytest.MonkeyPatch.context() as mp:
            crash_at(mp, n)
            for i, op in enumerate(OPS):
                try:
                    run_op(agent, op)
                except Crash:
                    running = i
                    break
        if running is None:
            break  # n is past the last step: every step has been a crash point
        # a new process on the same state directory re-applies the last known good
        again, backend = make(state)
        again.reapply_last_known_good()
        got = again.effective()
        before, after = expected[running], expected[running + 1]
        assert same(got, before) or same(got, after), (n, running, got)
        assert backend.applied == ([] if got is None else [again.plan])
        # and carries on from there to where a crash-free run ends
        for op in OPS[running if same(got, before) else running + 1 :]:
            run_op(again, op)
        final, _ = make(state)
        final.reapply_last_known_good()
        assert same(final.effective(), expected[-1]) and final.revision == again.revision == 7, n
    assert n > 3 * len(OPS)  # every operation had several crash points


def test_a_delta_costs_one_fdatasync_of_the_journal(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    agent, _ = make(tmp_path / "s")
    agent.apply_bundle(B1)
    agent.apply_delta(OPS[1])  # type: ignore[arg-type]
    calls: list[str] = []
    for name in ("fsync", "fdatasync"):
        real = getattr(os, name)
        monkeypatch.setattr(os, name, lambda fd, _n=name, _r=real: (calls.append(_n), _r(fd))[1])
    bundle_bytes = agent.state.bundle_path.read_bytes()
    agent.apply_delta(OPS[2])  # type: ignore[arg-type]
    assert calls == ["fdatasync"]  # no rewrite of the journal, no directory fsync, bundle untouched
    assert agent.state.bundle_path.read_bytes() == bundle_bytes


def test_torn_tail_is_cut_and_overwritten(tmp_path: Path) -> None:
    agent, _ = make(tmp_path / "s")
    for op in OPS[:3]:
        run_op(agent, op)
    journal = agent.state.journal_path
    good = journal.read_bytes()
    journal.write_bytes(good + b'{"format":"ringfence.delta/v2","se')  # a crash while appending
    again, _ = make(tmp_path / "s")
    assert [d.to_version for d in again.deltas] == [2, 3]
    again.apply_delta(OPS[3])  # type: ignore[arg-type]
    assert journal.read_bytes().count(b"\n") == 4 and not journal.read_bytes().endswith(b"se")
    third, _ = make(tmp_path / "s")
    assert [d.to_version for d in third.deltas] == [2, 3, 4]


def test_a_journal_naming_another_bundle_is_ignored(tmp_path: Path) -> None:
    agent, _ = make(tmp_path / "s")
    for op in OPS[:3]:
        run_op(agent, op)
    st = StateDir(tmp_path / "s")
    # a crash inside save_applied: the new bundle is on disk, its journal not yet
    st.bundle_path.write_text(json.dumps(wire.to_json(B2)))
    assert st.load_deltas() == [] and st.load_deltas(B1) == [OPS[1], OPS[2]]


def test_legacy_deltas_file_is_read_and_replaced(tmp_path: Path) -> None:
    st = StateDir(tmp_path / "s")
    st.save_applied(B1, [])
    st.journal_path.unlink()
    (tmp_path / "s" / "deltas.json").write_text(json.dumps([wire.to_json(OPS[1])]))
    agent, _ = make(tmp_path / "s")
    assert agent.revision == 2
    agent.apply_delta(OPS[2])  # type: ignore[arg-type]
    assert not (tmp_path / "s" / "deltas.json").exists()
    assert [d.to_version for d in StateDir(tmp_path / "s").load_deltas()] == [2, 3]


def test_a_delta_that_cannot_be_recorded_is_taken_back_out(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    agent, backend = make(tmp_path / "s")
    for op in OPS[:2]:
        run_op(agent, op)

    def eio(fd: int) -> None:
        raise OSError(errno.EIO, "I/O error")

    monkeypatch.setattr(os, "fdatasync", eio)
    with pytest.raises(ApplyError, match=r"could not record the delta.*undone"):
        agent.apply_delta(OPS[2])  # type: ignore[arg-type]
    change = ElementChange(SET, remove_v4=("10.0.0.3/32",))
    assert backend.deltas[-2:] == [change, change.inverse()]
    assert agent.revision == 2 and sorted(agent.effective().sets[SET].v4) == [
        "10.0.0.1/32",
        "10.0.0.3/32",
        "10.0.0.7/32",
    ]  # type: ignore[union-attr]
    assert [d.to_version for d in StateDir(tmp_path / "s").load_deltas()] == [2]
    monkeypatch.undo()
    agent.apply_delta(OPS[2])  # the disk is back: the same delta applies
    assert [d.to_version for d in StateDir(tmp_path / "s").load_deltas()] == [2, 3]


# --- caches: a delta moves them by the delta only; they must equal a fresh fold -----------------


def test_folding_deltas_in_one_pass_equals_folding_them_one_by_one() -> None:
    rng = random.Random(7)
    universe = [f"10.0.{i // 8}.{i % 8}/32" for i in range(40)] + [f"fd00::{i:x}/128" for i in range(20)]
    start = rng.sample(universe, 25)
    base = wire.Bundle(
        workload_id="w",
        version=1,
        policy_version=1,
        mode=B1.mode,
        sets={
            SET: wire.AddressSetDoc(
                version=1, v4=[x for x in start if ":" not in x], v6=[x for x in start if ":" in x]
            ),
            "other": wire.AddressSetDoc(version=1, v4=["10.9.0.0/16"]),
        },
    )
    deltas: list[wire.SetDelta] = []
    members = list(start)
    for v in range(1, 60):
        remove = rng.sample(members, min(len(members), rng.randint(0, 3)))
        gone = [x for x in universe if x not in members]
        add = rng.sample(gone, min(len(gone), rng.randint(0, 3)))
        if v % 7 == 0 and remove:
            add.append(remove[0])  # removed and added again by the same delta
        members = [x for x in members if x not in remove] + add
        deltas.append(wire.SetDelta(set=SET, from_version=v, to_version=v + 1, add=add, remove=remove))
    for n in range(len(deltas) + 1):
        one_by_one = base
        for d in deltas[:n]:
            one_by_one = fold_delta(one_by_one, d)
        assert effective_bundle(base, deltas[:n]) == one_by_one, n  # same elements, same order


def test_deltas_keep_effective_bundle_versions_and_plan_equal_to_a_fresh_compile(tmp_path: Path) -> None:
    agent, _ = make(tmp_path / "s")
    agent.apply_bundle(B1)  # type: ignore[arg-type]
    assert agent.ensure_plan() is not None
    ops = [
        delta(1, add=["10.0.0.7/32", "fd00::7/128"]),
        delta(2, remove=["10.0.0.3/32"]),
        delta(3, add=["10.0.0.3/32"], remove=["10.0.0.7/32"]),
        delta(4, remove=["fd00::7/128"]),
    ]
    for i, d in enumerate(ops):
        agent.apply_delta(d)
        expected = effective_bundle(B1, ops[: i + 1])
        if i % 2:  # the plan is brought up to date before the effective bundle is asked for, and after
            assert agent.ensure_plan() == compile_plan(expected, LOCAL)
        assert same_firewall(agent.effective(), expected)  # type: ignore[arg-type]
        assert agent.ensure_plan() == compile_plan(expected, LOCAL)
        assert agent.set_versions() == {SET: d.to_version} and agent.revision == d.to_version
    restarted, _ = make(tmp_path / "s")  # from the journal
    assert restarted.set_versions() == {SET: 5} and restarted.revision == 5
    assert same_firewall(restarted.effective(), effective_bundle(B1, ops))  # type: ignore[arg-type]


def test_the_inverse_of_a_change_takes_grouped_rule_elements_back_too() -> None:
    g = GroupChange("r_in_0", 4, ("tcp", 80, 80), add=("10.0.0.1/32",), remove=("10.0.0.0/31",))  # type: ignore[arg-type]
    change = ElementChange(SET, add_v4=("10.0.0.1/32",), groups=(g,))
    back = change.inverse()
    assert back.remove_v4 == ("10.0.0.1/32",) and back.add_v4 == ()
    assert back.groups == (GroupChange("r_in_0", 4, g.span, add=("10.0.0.0/31",), remove=("10.0.0.1/32",)),)
    assert back.inverse() == change


# --- found by review: caches after a consolidating bundle, element order, element text ----------

TCP80 = [ServiceMatch(proto="tcp", ports=(80, 80))]


def grouped(version: int, s_elems: list[str], s_version: int | None = None) -> wire.Bundle:
    """A grouped rule with members on two sets, S and T, sharing tcp/80."""
    doc = Bundle(
        workload_id="w",
        version=version,
        policy_version=1,
        mode=Mode.ENFORCE,
        sets={
            "S": AddressSetDoc(version=s_version or version, v4=s_elems),
            "T": AddressSetDoc(version=1, v4=["10.9.0.1/32"]),
        },
        inbound=[
            BundleRule(
                id="g",
                action="allow",
                set=None,
                services=[],
                members=[GroupMember(id="m1", set="S", services=TCP80), GroupMember(id="m2", set="T", services=TCP80)],
            )
        ],
        failsafes=FailsafeDoc(admin_cidrs=["192.0.2.1/32"]),
    )
    return to_wire(sign(doc, key(), expires_at=EXPIRES_AT))


def set_delta(name: str, v: int, add: tuple[str, ...] = (), remove: tuple[str, ...] = ()) -> wire.SetDelta:
    return to_wire(
        sign(SetDelta(set=name, from_version=v, to_version=v + 1, add=list(add), remove=list(remove)), key())
    )


def test_a_consolidating_bundle_leaves_no_stale_plan_behind(tmp_path: Path) -> None:
    agent, backend = make(tmp_path / "s")
    agent.apply_bundle(grouped(1, ["10.0.0.1/32"]))
    agent.apply_delta(set_delta("S", 1, add=("10.0.0.9/32",)))
    # the same firewall, now as one bundle at the delta's revision: the delta chain goes
    agent.apply_bundle(grouped(2, ["10.0.0.1/32", "10.0.0.9/32"], s_version=2))
    plan = agent.ensure_plan()
    assert plan is not None and plan.sets["S"].v4 == ("10.0.0.1/32", "10.0.0.9/32")
    agent.apply_delta(set_delta("S", 2, remove=("10.0.0.9/32",)))
    (group,) = backend.deltas[-1].groups
    assert group.remove == ("10.0.0.9/32",), "the group's tcp/80 element must go with the member's address"


def test_a_same_content_bundle_is_not_a_replay_whatever_the_element_order(tmp_path: Path) -> None:
    agent, _ = make(tmp_path / "s")
    agent.apply_bundle(bundle(1, ["10.0.0.1/32", "10.0.0.9/32"]))
    agent.apply_delta(delta(1, add=["10.0.0.5/32"]))  # appended after 10.0.0.9/32
    result = agent.apply_bundle(bundle(2, ["10.0.0.1/32", "10.0.0.5/32", "10.0.0.9/32"]))
    assert "already applied" in result.lines[0] and agent.deltas == []
    with pytest.raises(Rejected, match="replay refused"):
        agent.apply_bundle(bundle(2, ["10.0.0.1/32", "10.0.0.6/32", "10.0.0.9/32"]))


def test_a_delta_with_non_canonical_elements_is_refused(tmp_path: Path) -> None:
    agent, backend = make(tmp_path / "s")
    agent.apply_bundle(bundle(1, ["10.0.0.1/32", "10.0.0.7/32"]))
    with pytest.raises(Rejected, match="canonical"):
        agent.apply_delta(delta(1, remove=["10.0.0.7"]))
    assert backend.deltas == [] and agent.revision == 1


# --- nftables realises a big group as plain rules: a delta across the bound re-applies ---------


class RecordingNft(NftBackend):
    """The nftables backend with the kernel replaced by a list of the scripts it would run."""

    def __init__(self, bound: int) -> None:
        super().__init__(group_bound=bound)
        self.scripts: list[str] = []

    def _exec(self, script: str, what: str) -> None:
        self.scripts.append(script)


def test_nft_group_switches_realisation_only_across_the_bound(tmp_path: Path) -> None:
    backend = RecordingNft(bound=4)  # hysteresis: expanded again below 2
    agent = Agent("w", Verifier.from_file(PUB), backend, StateDir(tmp_path / "s"), LOCAL, log=lambda m: None)

    def fresh() -> str:  # what a fresh apply of the effective bundle runs
        eff = agent.effective()
        assert eff is not None
        return NftRenderer(group_bound=4).render(compile_plan(eff, LOCAL))

    agent.apply_bundle(grouped(1, ["10.0.0.1/32"]))  # S 1 + T 1 on tcp/80: 2 elements
    assert "@g_r_in_0_4p" in backend.scripts[-1] and backend.realised == {"r_in_0": True}
    agent.apply_delta(set_delta("S", 1, add=("10.0.0.9/32",)))  # 3: the group's elements move
    assert backend.scripts[-1].splitlines() == [
        "add element inet ringfence s_S_4h { 10.0.0.9 }",
        "add element inet ringfence g_r_in_0_4p { 10.0.0.9 . tcp . 80 }",
    ]
    agent.apply_delta(set_delta("S", 2, add=("10.0.0.20/32",)))  # 4: at the bound, still elements
    assert backend.scripts[-1].startswith("add element") and backend.realised == {"r_in_0": True}
    agent.apply_delta(set_delta("S", 3, add=("10.0.0.30/32",)))  # 5: past it, the whole plan
    assert backend.scripts[-1] == fresh() and "g_r_in_0" not in backend.scripts[-1]
    assert backend.realised == {"r_in_0": False}
    for v, x in ((4, "10.0.0.30/32"), (5, "10.0.0.20/32"), (6, "10.0.0.9/32")):  # 4, 3, 2: not below 2
        agent.apply_delta(set_delta("S", v, remove=(x,)))
        assert backend.scripts[-1] == f"delete element inet ringfence s_S_4h {{ {x.split('/')[0]} }}\n"
    agent.apply_delta(set_delta("S", 7, remove=("10.0.0.1/32",)))  # 1: below half, concatenated again
    assert backend.scripts[-1] == fresh() and "@g_r_in_0_4p" in backend.scripts[-1]
    assert backend.realised == {"r_in_0": True}
    # the plan the agent keeps follows the deltas whichever way they were applied
    plan = agent.ensure_plan()
    assert plan is not None and plan.sets["S"].v4 == ()


def test_a_re_applying_delta_that_cannot_be_recorded_re_applies_the_plan_before_it(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    backend = RecordingNft(bound=2)
    agent = Agent("w", Verifier.from_file(PUB), backend, StateDir(tmp_path / "s"), LOCAL, log=lambda m: None)
    agent.apply_bundle(grouped(1, ["10.0.0.1/32"]))
    before = backend.scripts[-1]

    def full(*args: object) -> None:
        raise OSError("disk full")

    monkeypatch.setattr(agent.state, "append_delta", full)
    with pytest.raises(ApplyError, match="undone"):
        agent.apply_delta(set_delta("S", 1, add=("10.0.0.9/32",)))  # 3 > 2: re-applies
    assert "10.0.0.9" in backend.scripts[-2] and backend.scripts[-1] == before
    assert backend.realised == {"r_in_0": True} and agent.revision == 1


def test_state_files_are_read_as_bounded_regular_files_only(tmp_path: Path) -> None:
    """bundle.json or the journal as a FIFO (a read that never ends), a symlink (to /dev/zero:
    one that never stops), or larger than max_bundle_bytes: refused at once, and the agent sets
    the last known good aside instead of hanging or exhausting its memory."""
    from tests.agent.test_agent_unit import PROC, golden

    state = StateDir(tmp_path / "s", max_bundle_bytes=65536)
    state.save_applied(golden(PROC), [])
    assert state.load_bundle() == golden(PROC)
    bundle = state.bundle_path
    for make, error in (
        (lambda: os.mkfifo(bundle), ValueError),
        (lambda: os.symlink("/dev/zero", bundle), OSError),
        (lambda: bundle.write_bytes(b" " * 65537), ValueError),
    ):
        bundle.unlink()
        make()
        t = time.monotonic()
        with pytest.raises(error):
            state.load_bundle()
        assert time.monotonic() - t < 1
    journal = state.journal_path
    journal.unlink()
    os.mkfifo(journal)
    with pytest.raises(ValueError, match="not a regular file"):
        state.load_deltas(golden(PROC))
    journal.unlink()
    os.symlink("/dev/zero", bundle.with_name("deltas.json"))  # the legacy list
    with pytest.raises(OSError):
        state.load_deltas(golden(PROC))
    # the agent: set aside (the special file moved, not followed), nothing held
    agent = Agent("ord-prod-proc-1", Verifier.from_file(PUBLIC_KEY), FakeBackend(), state, LOCAL, log=lambda m: None)
    assert agent.bundle is None and agent.set_aside is not None and not os.path.lexists(bundle)
    assert list((state.path / "rejected").glob("*-bundle.json"))


def test_status_is_best_effort_on_a_filesystem_that_refuses_writes(tmp_path: Path) -> None:
    """status.json is not the firewall: a write that fails is counted and told once, never raised."""
    state = StateDir(tmp_path / "s")
    state.ensure()
    state.update_status(applied_version=1)
    told: list[str] = []
    state.on_status_error = told.append
    os.chmod(state.path, 0o500)
    try:
        if os.access(state.path, os.W_OK):  # root ignores the mode: a status.json that is a directory
            os.chmod(state.path, 0o700)
            (state.path / "status.json").unlink()
            (state.path / "status.json").mkdir()
        state.update_status(applied_version=2)
        state.update_status(applied_version=3)
    finally:
        os.chmod(state.path, 0o700)
    assert state.status_write_failures == 2 and len(told) == 1 and "still enforcing" in told[0]
