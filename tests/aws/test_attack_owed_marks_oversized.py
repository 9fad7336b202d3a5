"""A writer of an owed partition (ingest, and the internet-facing gcpevents and azureevents
functions, each granted UpdateItem on its own) writes marks whose sort key is no workload id but a kilobyte
of control characters: JSON escapes each to six, so the drain's one compute message of them was
over SQS's size limit, refused every pass, and with it the real marks beside them, never settled.
The drain (control/wiring.py hand_on_owed) deletes such marks unsent and counts them, reads a
bounded number of marks a pass, and hands each lane on chunk by chunk, settling each chunk queued;
AWS cuts compute messages by their encoded size as well as by their number of ids.

(Ported from a review's reproducer.)"""

from __future__ import annotations

import json
from types import SimpleNamespace
from typing import Any

import pytest

from ringfence.store.base import Store, owed_key
from tests.aws.conftest import Env
from tests.aws.test_function_iam import allowed, requests_of, sam_statements, terraform_statements
from tests.aws.test_pipeline import _ctx, _scheduled
from tests.aws.test_reconcile_gone_hand_off import compute_messages, reconcile_container

from .test_store import store

__all__ = ["store"]  # the parametrized fixture, used by name

JUNK = "\x01" * 1020


def _write_junk_marks(env: Env, n: int) -> None:
    for i in range(n):
        env.store.state.update_item(
            Key={"pk": "owed#ingest", "sk": f"{JUNK}{i:04d}"},
            UpdateExpression="SET nonce = :n, urgent = :u",
            ExpressionAttributeValues={":n": "x", ":u": True},
        )


@pytest.mark.slow
def test_attack_owed_marks_of_escaped_kilobytes_block_no_drain(env: Env) -> None:
    """200 such urgent marks beside a real owed removal. Before: the drain's one urgent message
    (~1.2 MB) was refused by SQS every pass: the removal was never handed on nor settled."""
    env.provision_example_policy()
    env.store.owe_compute(["i-0000000000000dead"], urgent=True)  # a real removal owed
    for fn in ("gcpevents", "azureevents", "ingest"):  # the attack is open to each of them, in its partition
        req = {
            "Key": {"pk": f"owed#{fn}", "sk": JUNK + "0000"},
            "UpdateExpression": "SET nonce = :n, urgent = :u",
            "ExpressionAttributeValues": {":n": "x", ":u": True},
            "TableName": env.store.state.name,
        }
        for statements in (sam_statements(fn), terraform_statements(fn)):
            assert all(allowed(statements, r) for r in requests_of("UpdateItem", req)), fn
    _write_junk_marks(env, 200)
    sent = compute_messages(env)
    reconcile_container(env)
    env.fn["reconcile"].handler(_scheduled(), _ctx())
    owed = [m.workload_id for m in env.store.owed_compute()]
    assert "i-0000000000000dead" not in owed, "the real owed removal is never settled nor handed on"
    assert (True, ["i-0000000000000dead"]) in sent, "handed on in the priority lane"
    assert owed == [], "the marks naming no workload are deleted, not handed on"
    assert not any(JUNK in i for _, ids in sent for i in ids)


def test_a_refused_chunk_of_the_drain_keeps_only_its_own_marks(env: Env, monkeypatch: Any) -> None:
    """Twelve ordinary marks go in chunks of five (OWED_CHUNK scaled down from 500: each mark is
    a call each way, and 1,200 of them took half a minute): the first refused keeps its five
    marks (the next pass's), the other seven are queued and deleted. Before: one refusal kept
    every mark."""
    from ringfence.control import wiring
    from ringfence.control.wiring import COMPUTE_NOT_QUEUED, hand_on_owed

    monkeypatch.setattr(wiring, "OWED_CHUNK", 5)
    ids = [f"i-{n:017x}" for n in range(12)]
    env.store.owe_compute(ids)
    queued: list[list[str]] = []
    metrics: list[tuple[str, float]] = []
    refuse = [1]  # the first chunk

    def enqueue(chunk: list[str], urgent: bool = False) -> None:
        if refuse[0]:
            refuse[0] -= 1
            raise RuntimeError("sqs 503")
        queued.append(list(chunk))

    w = SimpleNamespace(store=env.store, enqueue_compute=enqueue, metric=lambda n, v: metrics.append((n, v)))
    assert hand_on_owed(w, "test") == ids[5:]  # type: ignore[arg-type]
    assert [len(c) for c in queued] == [5, 2]
    assert sorted(m.workload_id for m in env.store.owed_compute()) == ids[:5]
    assert metrics == [(COMPUTE_NOT_QUEUED, 1)]
    assert hand_on_owed(w, "test") == ids[:5] and env.store.owed_compute() == []  # type: ignore[arg-type]


def test_marks_naming_no_workload_are_deleted_counted_and_a_pass_reads_at_most_its_limit(
    store: Store, monkeypatch: Any
) -> None:
    """Both stores: a mark whose id is no workload id (here written through the store itself,
    as any writer of the partition could) is deleted unsent and counted OwedMarksMalformed, and
    a pass hands on at most OWED_READ_LIMIT marks, the rest the next pass's."""
    from ringfence.control import wiring

    monkeypatch.setattr(wiring, "OWED_READ_LIMIT", 3)
    store.owe_compute(["i-0a", "i-0b", "i-0c", "i-0d", "bad id\n"], urgent=False)
    sent: list[list[str]] = []
    metrics: list[tuple[str, float]] = []
    w = SimpleNamespace(
        store=store,
        enqueue_compute=lambda ids, urgent=False: sent.append(list(ids)),
        metric=lambda n, v: metrics.append((n, v)),
    )
    first = wiring.hand_on_owed(w, "test")  # type: ignore[arg-type]
    assert len(first) == 3 and set(first) < {"i-0a", "i-0b", "i-0c", "i-0d"}  # three of four, at random
    assert metrics == [(wiring.OWED_MARKS_MALFORMED, 1)]
    rest = [m.workload_id for m in store.owed_compute()]
    assert sorted(first + rest) == ["i-0a", "i-0b", "i-0c", "i-0d"]
    assert wiring.hand_on_owed(w, "test") == rest  # type: ignore[arg-type]
    assert store.owed_compute() == []


def _drain(store: Store) -> tuple[Any, list[tuple[bool, list[str]]]]:
    sent: list[tuple[bool, list[str]]] = []
    w = SimpleNamespace(
        store=store,
        enqueue_compute=lambda ids, urgent=False: sent.append((urgent, list(ids))),
        metric=lambda n, v: None,
    )
    return w, sent


def test_attack_an_urgent_owed_mark_behind_more_ordinary_marks_than_a_pass_hands_on_goes_first(
    store: Store, monkeypatch: Any
) -> None:
    """Both stores: ordinary marks whose ids sort before ``i-`` (GCP's numeric ids: a backlog
    after an outage, or a writer of the partition planting them), more than a pass hands on, and
    an urgent removal after them. Before: a pass read only the first OWED_READ_LIMIT marks in id
    order, and the removal waited a pass per OWED_READ_LIMIT marks before it."""
    from ringfence.control import wiring

    monkeypatch.setattr(wiring, "OWED_READ_LIMIT", 3)
    low = [f"{n:019d}" for n in range(7)]
    store.owe_compute(low)
    store.owe_compute(["i-0000000000000dead"], urgent=True)
    w, sent = _drain(store)
    queued = wiring.hand_on_owed(w, "test")
    assert (True, ["i-0000000000000dead"]) in sent, "the urgent removal is handed on in the first pass"
    assert len(queued) == 3 and "i-0000000000000dead" in queued
    assert "i-0000000000000dead" not in [m.workload_id for m in store.owed_compute()]


def test_attack_low_owed_marks_planted_again_each_pass_do_not_pin_the_window(store: Store, monkeypatch: Any) -> None:
    """Both stores: a writer of the partition plants, before every pass, as many low ids as a
    pass hands on; a real mark sorts after them. Before: each pass read the planted ids alone
    and the real mark was never handed on. Now each pass chooses among equals at random: the
    real mark goes within a few passes (here at most 30; each misses it with probability 1/4)."""
    from ringfence.control import wiring

    monkeypatch.setattr(wiring, "OWED_READ_LIMIT", 3)
    store.owe_compute(["i-0000000000000beef"])
    w, _ = _drain(store)
    for _ in range(30):
        store.owe_compute([f"{n:019d}" for n in range(3)])  # planted again
        if "i-0000000000000beef" in wiring.hand_on_owed(w, "test"):
            break
    else:
        raise AssertionError("the real mark is never handed on: the planted ids pin every pass")
    assert "i-0000000000000beef" not in [m.workload_id for m in store.owed_compute()]


BIG_NONCE = "x" * (390 * 1024)


def test_attack_owed_marks_with_oversized_nonces_are_read_small_and_settled(env: Env) -> None:
    """A writer of the partition sets marks' nonces to ~390 KB (an attribute it may write).
    Before: the drain kept every nonce read (some 2,700 such marks fill the reconcile function's
    1,024 MB, so every pass died before settling anything). Now a nonce longer than any
    owe_compute writes is read as malformed (""), and such a mark is handed on and deleted
    while still so, without its nonce ever being sent back; a mark written since stays."""
    from ringfence.control.wiring import hand_on_owed

    for fn in ("gcpevents", "azureevents", "ingest"):
        req = {
            "Key": {"pk": f"owed#{fn}", "sk": owed_key("i-0000000000000aaaa")},
            "UpdateExpression": "SET nonce = :n, urgent = :u",
            "ExpressionAttributeValues": {":n": BIG_NONCE, ":u": False},
            "TableName": env.store.state.name,
        }
        for statements in (sam_statements(fn), terraform_statements(fn)):
            assert all(allowed(statements, r) for r in requests_of("UpdateItem", req)), fn
    big = [f"{n:019d}" for n in range(4)] + ["i-0000000000000aaaa"]
    for wid in big:
        env.store.state.update_item(
            Key={"pk": "owed#ingest", "sk": owed_key(wid)},
            UpdateExpression="SET nonce = :n, urgent = :u",
            ExpressionAttributeValues={":n": BIG_NONCE, ":u": False},
        )
    env.store.owe_compute(["i-0000000000000dead"], urgent=True)  # a real removal owed
    marks = env.store.owed_compute()
    assert sum(len(m.nonce) for m in marks) == 32, "only the real mark's nonce is held"
    assert {m.workload_id: m.nonce for m in marks if m.workload_id in big} == dict.fromkeys(big, "")
    # one of them written again properly after the read: kept for the next drain
    env.store.owe_compute(["i-0000000000000aaaa"])
    assert env.store.settle_owed(marks) == [m.workload_id for m in marks if m.workload_id != "i-0000000000000aaaa"]
    assert [(m.workload_id, len(m.nonce)) for m in env.store.owed_compute()] == [("i-0000000000000aaaa", 32)]
    # and a drain hands such marks on and deletes them, blocking nothing
    for wid in big:
        env.store.state.update_item(
            Key={"pk": "owed#ingest", "sk": owed_key(wid)},
            UpdateExpression="SET nonce = :n",
            ExpressionAttributeValues={":n": BIG_NONCE},
        )
    env.store.owe_compute(["i-0000000000000dead"], urgent=True)
    w, sent = _drain(env.store)
    assert sorted(hand_on_owed(w, "test")) == sorted([*big, "i-0000000000000dead"])
    assert (True, ["i-0000000000000dead"]) in sent
    assert env.store.owed_compute() == []


def test_compute_messages_are_cut_by_their_encoded_size_as_well_as_their_ids() -> None:
    """Ids of a kilobyte of control characters each (six escaped): no message body reaches
    COMPUTE_MESSAGE_BYTES, well under SQS's 256 KiB; ordinary ids still go 500 a message."""
    from ringfence.clouds.aws.wiring import COMPUTE_MESSAGE_BYTES, compute_id_chunks

    message: dict[str, Any] = {"ids": [f"{JUNK}{i:04d}" for i in range(200)], "rebuild": False, "publish": []}
    chunks = compute_id_chunks(message)
    assert [i for c in chunks for i in c] == message["ids"] and len(chunks) > 1
    assert all(len(json.dumps({**message, "ids": c})) <= COMPUTE_MESSAGE_BYTES for c in chunks)
    plain = {"ids": [f"i-{n:017x}" for n in range(1200)]}
    assert [len(c) for c in compute_id_chunks(plain)] == [500, 500, 200]
    assert compute_id_chunks({"ids": []}) == [[]]


def test_attack_a_drain_reads_a_bounded_number_of_pages_of_oversized_marks_and_keeps_what_it_read(
    env: Env, monkeypatch: Any
) -> None:
    """A writer of the partition plants marks of ~390 KB each (a nonce it may write): a query
    page holds two of them, and read capacity counts whole items whatever is projected. Before,
    a drain read up to 50,000 marks whatever their size (25,000 pages for as many such marks:
    longer than the reconcile's 900 s, every pass, nothing ever settled), and a page failing late
    lost every mark read before it. Now a drain reads at most OWED_PAGE_BUDGET pages and keeps
    what it read when a later page fails; it starts at a random point of the id space, so the
    real marks after the planted ones are reached, and each pass deletes the planted ones it
    read."""
    from ringfence.control.wiring import hand_on_owed
    from ringfence.store import dynamodb

    monkeypatch.setattr(dynamodb, "OWED_PAGE_BUDGET", 2, raising=False)  # (raising: the revert check)
    # the legacy partition and ingest's alone: the query calls counted below are theirs
    monkeypatch.setattr(dynamodb, "OWED_WRITERS", ("ingest",), raising=False)
    store = env.store
    assert isinstance(store, dynamodb.DynamoStore)
    for n in range(8):
        store.state.update_item(
            Key={"pk": "owed#ingest", "sk": owed_key(f"{n:019d}")},
            UpdateExpression="SET nonce = :n, urgent = :u",
            ExpressionAttributeValues={":n": BIG_NONCE, ":u": False},
        )
    store.owe_compute(["i-0000000000000dead"], urgent=True)  # a real removal owed
    state = store.state
    real_query = state.query
    pages: list[int] = []

    def counted(**kwargs: Any) -> Any:
        page = real_query(**kwargs)
        pages.append(len(page["Items"]))  # the legacy partition's read: one empty page
        return page

    monkeypatch.setattr(state, "query", counted)
    read = store.owed_compute(limit=50_000)
    assert pages[0] == 0 and len(pages) == 3 and 0 < len(read) < 9, (pages, len(read))
    # a start past every slot: the empty half before the wrap costs no page of the budget
    pages.clear()
    past = store.owed_compute(limit=50_000, start="g")
    assert len(past) == len(read) and pages[:2] == [0, 0], (pages, len(past), len(read))

    def second_page_fails(**kwargs: Any) -> Any:
        pages.append(1)
        if len(pages) > 2:  # the legacy partition's, ingest's first page, then throttled
            raise RuntimeError("throttled")
        return real_query(**kwargs)

    pages.clear()
    monkeypatch.setattr(state, "query", second_page_fails)
    assert store.owed_compute(limit=50_000), "the marks read before a failing page are kept"
    monkeypatch.setattr(state, "query", real_query)

    w, sent = _drain(store)
    for _ in range(20):
        if (True, ["i-0000000000000dead"]) in sent:
            break
        hand_on_owed(w, "test")
    assert (True, ["i-0000000000000dead"]) in sent, "the real removal is reached past the planted marks"
