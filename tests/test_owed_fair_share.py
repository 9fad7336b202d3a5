"""How a scheduled pass shares its room among the writers' owed partitions (control/wiring.py
``_fair_share``), apart from any store: the arithmetic the partition attacks rely on."""

from __future__ import annotations

import logging
from collections import Counter
from types import SimpleNamespace

import pytest

from ringfence.control import wiring
from ringfence.control.wiring import _fair_share
from ringfence.store.base import OwedMark


def _group(writer: str, n: int, urgent: int = 0) -> list[OwedMark]:
    return [OwedMark(f"{writer}-{i}", i < urgent, "n", partition=writer) for i in range(n)]


def test_a_room_smaller_than_the_partitions_leaves_no_partition_out_every_pass() -> None:
    """Eight partitions of one mark each and room for five: before, equal sizes kept their read
    order and the first three partitions got a share of 0 every pass, for good."""
    groups = [_group(w, 1) for w in ("owed", "ingest", "lifecycle", "reconcile", "gcp", "azure", "cloud", "serve")]
    seen: Counter[str] = Counter()
    for _ in range(200):
        chosen = _fair_share(groups, 5)
        assert len(chosen) == 5 and len({m.workload_id for m in chosen}) == 5
        seen.update(m.partition for m in chosen)
    # each is chosen with probability 5/8 a pass: 0 in 200 passes is ~1e-85
    assert set(seen) == {g[0].partition for g in groups}, seen


def test_a_flood_takes_only_what_the_smaller_partitions_leave() -> None:
    flood = _group("gcp", 40, urgent=40)
    victims = [_group("ingest", 1), _group("lifecycle", 2, urgent=1)]
    chosen = _fair_share([flood, *victims], 10)
    assert len(chosen) == 10
    by = Counter(m.partition for m in chosen)
    assert by == {"ingest": 1, "lifecycle": 2, "gcp": 7}


def _fake_store(marks: list[OwedMark]) -> tuple[SimpleNamespace, list[OwedMark]]:
    """A store holding ``marks`` (every read returns them all), and the marks it was asked to delete."""
    settled: list[OwedMark] = []

    def settle(chosen: list[OwedMark]) -> list[str]:
        settled.extend(chosen)
        return [m.workload_id for m in chosen]

    return SimpleNamespace(owed_compute=lambda limit=None, start="": list(marks), settle_owed=settle), settled


def _bad(partition: str, n: int) -> list[OwedMark]:
    return [OwedMark(f"bad id {partition} {i}\n", False, "n", partition=partition) for i in range(n)]


def test_the_malformed_marks_log_names_the_partitions_that_held_them(caplog: pytest.LogCaptureFixture) -> None:
    """OwedMarksMalformed's alarm sends the operator to the role that wrote them: the pass's log
    names each partition malformed marks were read in."""
    store, settled = _fake_store([*_bad("owed#gcpevents", 2), *_bad("owed#ingest", 1), *_group("lifecycle", 1)])
    metrics: list[tuple[str, float]] = []
    w = SimpleNamespace(
        store=store, enqueue_compute=lambda ids, urgent=False: None, metric=lambda n, v: metrics.append((n, v))
    )
    with caplog.at_level(logging.WARNING, logger="ringfence.aws"):
        assert wiring.hand_on_owed(w, "test") == ["lifecycle-0"]  # type: ignore[arg-type]
    assert (wiring.OWED_MARKS_MALFORMED, 3) in metrics
    [line] = [r.getMessage() for r in caplog.records if "name no workload" in r.getMessage()]
    assert "3 owed marks" in line and "in owed#gcpevents, owed#ingest," in line, line
    assert len(settled) == 4


def test_a_flood_of_malformed_marks_spends_only_its_share_of_the_deletions(monkeypatch: pytest.MonkeyPatch) -> None:
    """The deletions of malformed marks are shared as the hand-ons are: one partition's flood of
    them, read first, took the whole pass's budget, and another partition's malformed mark was
    neither deleted nor named in the log (each a lead to a different role) while the flood lasted."""
    monkeypatch.setattr(wiring, "OWED_READ_LIMIT", 3)
    store, settled = _fake_store([*_bad("owed#ingest", 10), *_bad("owed#gcpevents", 1)])
    w = SimpleNamespace(store=store, enqueue_compute=lambda ids, urgent=False: None, metric=lambda n, v: None)
    for _ in range(20):  # every pass, whatever its random choice within the flood
        settled.clear()
        wiring.hand_on_owed(w, "test")  # type: ignore[arg-type]
        assert sorted(m.partition for m in settled) == ["owed#gcpevents", "owed#ingest", "owed#ingest"]
