"""Owed marks (control/wiring.py hand_on_owed) against a writer that plants marks where the drain
reads first. Before: every writer shared the one ``owed`` partition, read in workload id order
from a random start of 4 characters of [0-9a-z]; every EC2 id begins ``i-`` ('-' sorts before
'0'), so every read entered the AWS marks at the first one, and marks planted just below a known
id preceded it from every start. A compromised writer rewriting ~40 oversized marks before each
pass (or 50,000 ordinary ones once, then 5,000 a pass) kept a genuine urgent removal from ever
being handed on, on both stores. Now each writer marks in its own partition (``owed#<function>``,
granted to it alone) read with a page budget of its own, and each partition is read from a random
slot of keys hashed from the ids (owed_key), uniform over the marks present.

Scaled down through the limits, as the review's reproducer was (OWED_SCAN_LIMIT 50 for 50,000,
OWED_READ_LIMIT 5 for 5,000, OWED_PAGE_BUDGET 2 for 16). Against the moto server and SQLite.
(Ported from a review's reproducer.)"""

from __future__ import annotations

import collections
import uuid
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import pytest

from ringfence.control import wiring
from ringfence.store.base import Store, owed_key
from ringfence.store.sqlite import SqliteStore
from tests.aws.test_function_iam import sam_statements, terraform_statements

from .test_store import make_dynamo

G_AWS = "i-0123456789abcdef0"  # the genuine urgent removal (an EC2 id)
G_AZ = "7f3e0c4a-1b2c-4d5e-8f90-a1b2c3d4e5f6"  # an Azure vmId
BIG_NONCE = "x" * (390 * 1024)  # two to a 1 MB query page


def _drain(store: Store) -> tuple[Any, list[tuple[bool, list[str]]]]:
    sent: list[tuple[bool, list[str]]] = []
    w = SimpleNamespace(
        store=store,
        enqueue_compute=lambda ids, urgent=False: sent.append((urgent, list(ids))),
        metric=lambda n, v: None,
    )
    return w, sent


def _pass_handing_on(w: Any, sent: list[Any], wid: str, passes: int, plant: Any) -> int | None:
    """The pass (1-based) that hands ``wid`` on, the writer planting before each; None: none did."""
    for p in range(1, passes + 1):
        plant()
        wiring.hand_on_owed(w, "test")
        if any(wid in ids for _, ids in sent):
            return p
    return None


def _scaled(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(wiring, "OWED_SCAN_LIMIT", 50)
    monkeypatch.setattr(wiring, "OWED_READ_LIMIT", 5)


def _store(kind: str, moto_url: str, tmp_path: Path) -> Any:
    return make_dynamo(moto_url) if kind == "dynamodb" else SqliteStore(tmp_path / "s.db")


@pytest.mark.parametrize("kind", ["dynamodb", "sqlite"])
def test_attack_owed_marks_at_the_i_head_written_again_each_pass_do_not_hold_an_urgent_mark(
    kind: str, moto_url: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A pass's scan limit of ordinary marks at the head of the ``i-`` ids, written again before
    every pass by the urgent mark's own writer. Before: not handed on in 40 passes (every start
    entered the AWS ids at their first). Now the start is uniform over the marks: a pass misses
    the urgent one only when it is the one mark past the scan limit (1 in 51)."""
    _scaled(monkeypatch)
    store = _store(kind, moto_url, tmp_path)
    store.owe_compute([G_AWS], urgent=True)
    w, sent = _drain(store)
    plants = [f"i-00000000000000{k:03x}" for k in range(50)]
    p = _pass_handing_on(w, sent, G_AWS, 10, lambda: store.owe_compute(plants))
    assert p is not None and p <= 3, f"the urgent mark behind the planted i- head: handed on at pass {p}"


@pytest.mark.parametrize("kind", ["dynamodb", "sqlite"])
def test_attack_owed_marks_planted_just_below_a_known_id_do_not_hold_it(
    kind: str, moto_url: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The writer knows the target's id (ingest, gcpevents and azureevents see VM ids) and plants
    ids sorting just below it, again before every pass. Before: they preceded it from every
    start (never handed on). Now their keys' slots are hashed, scattered round the partition."""
    _scaled(monkeypatch)
    store = _store(kind, moto_url, tmp_path)
    store.owe_compute([G_AZ], urgent=True)
    w, sent = _drain(store)
    plants = [G_AZ[:-1] + "5" + f"{k:02d}" for k in range(50)]
    p = _pass_handing_on(w, sent, G_AZ, 10, lambda: store.owe_compute(plants))
    assert p is not None and p <= 3, f"the urgent mark behind the planted ids: handed on at pass {p}"


def _granted_partition(fn: str) -> str:
    """The one partition ``fn``'s role may write owed marks in (its UpdateItem grant with the
    marks' attributes), the same in both deployments: where a compromised ``fn`` plants."""
    found = set()
    for statements in (sam_statements(fn), terraform_statements(fn)):
        for actions, _, conds in statements:
            if "dynamodb:UpdateItem" not in actions:
                continue
            values = {v: vals for _, v, vals in conds}
            if "nonce" in values.get("dynamodb:Attributes", []):
                found.update(values.get("dynamodb:LeadingKeys", []))
    assert len(found) == 1, (fn, found)
    return found.pop()


def test_attack_a_writer_planting_oversized_and_urgent_marks_in_its_partition_delays_no_other_writers_mark(
    moto_url: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """gcpevents (internet-fed) compromised: before every pass it writes, where its grant lets
    it, 8 oversized marks just below the target's id (a page budget's worth and more) and 20
    urgent ordinary ones (a pass hands on 5). ingest's genuine urgent removal must go on the
    first pass, every time. Before: the shared partition's budget went on the planted marks and
    the removal was never handed on."""
    from ringfence.store import dynamodb

    _scaled(monkeypatch)
    monkeypatch.setattr(dynamodb, "OWED_PAGE_BUDGET", 2, raising=False)
    victim: Any = make_dynamo(moto_url)
    victim.owed_writer = "ingest"  # the function the genuine mark's hand-off failed in
    partition = _granted_partition("gcpevents")
    victim.owe_compute([G_AZ], urgent=True)
    below = [G_AZ[:-1] + "5" + f"{k:02d}" for k in range(8)]
    urgent = [str(uuid.UUID(int=k)) for k in range(20)]

    def plant() -> None:
        for sk in below:  # as its grant allows: UpdateItem of pk, sk, nonce, urgent
            # (moto refuses to update a 390 KB item in place to another: shrink it first)
            victim.state.update_item(
                Key={"pk": partition, "sk": sk},
                UpdateExpression="SET nonce = :n",
                ExpressionAttributeValues={":n": "x"},
            )
            victim.state.update_item(
                Key={"pk": partition, "sk": sk},
                UpdateExpression="SET nonce = :n, urgent = :u",
                ExpressionAttributeValues={":n": BIG_NONCE, ":u": False},
            )
        for sk in urgent:
            victim.state.update_item(
                Key={"pk": partition, "sk": sk},
                UpdateExpression="SET nonce = :n, urgent = :u",
                ExpressionAttributeValues={":n": uuid.uuid4().hex, ":u": True},
            )

    w, sent = _drain(victim)
    for attempt in range(3):
        sent.clear()
        p = _pass_handing_on(w, sent, G_AZ, 1, plant)
        assert p == 1, f"attempt {attempt}: the other writer's urgent mark was not handed on in the first pass"
        assert (True, [G_AZ]) in sent or any(u and G_AZ in ids for u, ids in sent)
        victim.owe_compute([G_AZ], urgent=True)  # the next failure of its kind
    assert partition != _granted_partition("ingest"), "two writers share a partition"


def test_attack_a_writer_flooding_urgent_marks_delays_no_other_writers_ordinary_mark(
    moto_url: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """gcpevents compromised writes, where its grant lets it, 20 urgent marks (a pass hands on 5)
    before every pass. ingest's and lifecycle's ordinary marks (a label change taking a workload
    out of a privileged group: a revocation of peer access) and reconcile's urgent one must each
    go on the first pass, every time. Before: the urgent lane was shared out over every partition
    first, the spare room to the biggest group, so the flood took the whole pass and no other
    writer's ordinary mark was handed on in 20 passes (at full scale: 5,000 urgent writes a pass,
    some 6 a second over a 15-minute schedule). Now the room is shared among the partitions
    first, and each spends its share on its own urgent marks first. (DynamoDB alone: SQLite keeps
    one table, one process writing it.)"""
    _scaled(monkeypatch)
    drainer: Any = make_dynamo(moto_url, owed_writer="reconcile")
    ingest: Any = make_dynamo_writer(drainer, "ingest")
    lifecycle: Any = make_dynamo_writer(drainer, "lifecycle")
    partition = _granted_partition("gcpevents")
    genuine = {G_AWS: (ingest, False), "i-0fedcba9876543210": (lifecycle, False), G_AZ: (drainer, True)}

    def plant() -> None:
        for _ in range(20):  # as its grant allows: UpdateItem of pk, sk, nonce, urgent
            wid = str(uuid.uuid4())
            drainer.state.update_item(
                Key={"pk": partition, "sk": owed_key(wid)},
                UpdateExpression="SET nonce = :n, urgent = :u",
                ExpressionAttributeValues={":n": uuid.uuid4().hex, ":u": True},
            )

    w, sent = _drain(drainer)
    for attempt in range(3):
        for wid, (writer, urgent) in genuine.items():
            writer.owe_compute([wid], urgent=urgent)  # the next failure of its kind
        sent.clear()
        plant()
        wiring.hand_on_owed(w, "test")
        for wid, (_, urgent) in genuine.items():
            assert any(u == urgent and wid in ids for u, ids in sent), (
                f"attempt {attempt}: {wid} ({'urgent' if urgent else 'ordinary'}) not handed on in the first pass"
            )
        flood = sum(len(ids) for u, ids in sent if u) - 1
        assert flood == 2, f"the flood took {flood} of the pass's 5, not its partition's share (2)"


def make_dynamo_writer(store: Any, fn: str) -> Any:
    """Another function's store over ``store``'s tables, marking in ``fn``'s partition."""
    from ringfence.store.dynamodb import DynamoStore

    return DynamoStore("rf-inventory", "rf-state", "rf-audit", resource=store.ddb, owed_writer=fn)


@pytest.mark.parametrize("shape", ["aws", "azure", "gcp", "onprem"])
def test_a_drain_starts_near_uniformly_over_the_marks_present_whatever_their_ids(
    shape: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Where 400 passes enter a backlog of 200 marks of each cloud's id shape (one mark read a
    pass, none settled). Before: 100% of AWS and upper-case on-premise passes, 58% Azure and 77%
    GCP entered at the very first mark. Now no mark is entered by more than 12% of them."""
    import random

    rng = random.Random(7)
    ids = {
        "aws": [f"i-{rng.getrandbits(68):017x}" for _ in range(200)],
        "azure": [str(uuid.UUID(int=rng.getrandbits(128))) for _ in range(200)],
        "gcp": [str(rng.randrange(10**18, 10**19)) for _ in range(200)],
        "onprem": [f"WEB-{k:04d}" for k in range(200)],
    }[shape]
    store = SqliteStore(tmp_path / "s.db")
    store.owe_compute(ids)
    monkeypatch.setattr(wiring, "OWED_SCAN_LIMIT", 1)
    firsts: collections.Counter[str] = collections.Counter()

    def refuse(chunk: list[str], urgent: bool = False) -> None:
        firsts.update(chunk)
        raise RuntimeError("kept owed")  # nothing settled: every pass sees the same marks

    w = SimpleNamespace(store=store, enqueue_compute=refuse, metric=lambda n, v: None)
    for _ in range(400):
        wiring.hand_on_owed(w, "test")  # type: ignore[arg-type]
    assert sum(firsts.values()) == 400
    top = firsts.most_common(1)[0][1]
    # uniform starts over the 200 marks' hashed slots: each mark's chance is the gap before its
    # slot, here at most 4.4% (onprem; 2.3-2.9% the others), some 18 of 400 passes. The chance
    # that any mark is entered over 48 times (12%) is at most the sum of the binomial tails
    # P(Bin(400, gap) > 48) over the marks: 2e-10 (onprem), under 1e-16 (the others); and fewer
    # than 60 marks entered, of the 131-137 expected (a Chernoff bound for these negatively
    # associated indicators), under 1e-8. Before, one mark took up to 100% (400), one in all
    assert top <= 48 and len(firsts) >= 60, (shape, firsts.most_common(3), len(firsts))


def test_an_id_marked_by_two_writers_is_handed_on_once_and_both_marks_settled(moto_url: str) -> None:
    """Ingest and lifecycle both failed to hand one instance on: each marked it in its own
    partition. The pass sends the id once (before: twice in one message) and deletes both marks."""
    store = make_dynamo(moto_url, owed_writer="lifecycle")
    store.owe_compute([G_AWS])
    store.owed_writer = "ingest"  # type: ignore[attr-defined]
    store.owe_compute([G_AWS])
    assert sorted(m.partition for m in store.owed_compute()) == ["owed#ingest", "owed#lifecycle"]
    w, sent = _drain(store)
    assert wiring.hand_on_owed(w, "test") == [G_AWS]
    assert sent == [(False, [G_AWS])]
    assert store.owed_compute() == [], "both writers' marks settled"
