"""The hash-chained audit trail, against each real store: the local version store (files), the
SQLite store of ``ringfence serve`` and DynamoStore (moto server).

Each tampering is done the way someone with write access to the storage would do it (rewriting
the file, dropping SQLite's append-only triggers, writing DynamoDB items directly), and
``ringfence audit verify`` (the real CLI, in a subprocess) must fail naming the first bad seq.
"""

from __future__ import annotations

import itertools
import json
import multiprocessing
import os
import sqlite3
import subprocess
import sys
import threading
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import boto3
import pytest

from ringfence.audit import GENESIS, AuditHead, AuditRecord, seal, verify
from ringfence.store.sqlite import SqliteStore
from ringfence.versions import FileVersionStore

from .test_store import make_dynamo


class Raw:
    """One store, its CLI spec, and the raw write access an attacker of that storage has."""

    def __init__(
        self, store: Any, spec: str, read: Callable[[], list[str]], write: Callable[[list[str]], None]
    ) -> None:
        self.store, self.spec, self.read, self.write = store, spec, read, write


def _file(tmp_path: Path) -> Raw:
    root = tmp_path / "store"
    root.mkdir()
    path = root / "audit.jsonl"

    def write(docs: list[str]) -> None:
        path.write_text("".join(d + "\n" for d in docs))

    return Raw(FileVersionStore(root), f"file:{root}", lambda: path.read_text().splitlines(), write)


def _sqlite(tmp_path: Path) -> Raw:
    path = tmp_path / "state.db"
    st = SqliteStore(path)

    def read() -> list[str]:
        with sqlite3.connect(path) as db:
            return [r[0] for r in db.execute("SELECT doc FROM audit ORDER BY seq")]

    def write(docs: list[str]) -> None:
        db = sqlite3.connect(path)
        # the triggers stop the store's own code and a careless operator, not the file's owner
        db.executescript("DROP TRIGGER audit_no_update; DROP TRIGGER audit_no_delete; DELETE FROM audit;")
        for d in docs:
            rec = json.loads(d)
            db.execute("INSERT INTO audit (id, time, doc) VALUES (?, ?, ?)", (rec["id"], rec["time"], d))
        db.commit()
        db.close()

    return Raw(st, f"sqlite:{path}", read, write)


def _dynamodb(moto_url: str) -> Raw:
    st = make_dynamo(moto_url)
    table = boto3.resource("dynamodb").Table("rf-audit")

    def chain_items() -> list[dict[str, Any]]:
        items = table.scan(ConsistentRead=True)["Items"]
        return sorted((i for i in items if i["pk"] == "chain"), key=lambda i: str(i["sk"]))

    def write(docs: list[str]) -> None:
        for i in chain_items():
            table.delete_item(Key={"pk": i["pk"], "sk": i["sk"]})
        for n, d in enumerate(docs, 1):
            table.put_item(Item={"pk": "chain", "sk": f"{n:012d}", "doc": d})

    return Raw(st, "dynamodb:rf-inventory,rf-state,rf-audit", lambda: [str(i["doc"]) for i in chain_items()], write)


@pytest.fixture(params=["file", "sqlite", "dynamodb"])
def raw(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[Raw]:
    if request.param == "file":
        yield _file(tmp_path)
    elif request.param == "sqlite":
        r = _sqlite(tmp_path)
        yield r
        r.store.close()
    else:
        yield _dynamodb(request.getfixturevalue("moto_url"))


def cli(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "ringfence.cli", *args],
        capture_output=True,
        text=True,
        timeout=120,
        env=dict(os.environ),
    )


def fill(raw: Raw, n: int = 5) -> list[AuditRecord]:
    return [
        raw.store.audit(
            AuditRecord(principal=f"p{i}", action="workload.mode", target=f"w{i}", detail={"mode": "observe"})
        )
        for i in range(n)
    ]


def edited(docs: list[str]) -> list[str]:
    doc = json.loads(docs[2])
    doc["principal"] = "someone-else"  # the hash left as it was
    return [*docs[:2], json.dumps(doc), *docs[3:]]


def inserted(docs: list[str]) -> list[str]:
    # a well-formed record sealed after seq 2 and slipped in before the old seq 3
    after = AuditRecord.model_validate_json(docs[1])
    forged = seal(
        AuditRecord(principal="mallory", action="policy.provision", target="policy/v9"),
        AuditHead(seq=2, hash=after.hash),
    )
    return [*docs[:2], forged.model_dump_json(), *docs[2:]]


def appended(docs: list[str]) -> list[str]:
    last = AuditRecord.model_validate_json(docs[-1])
    forged = seal(AuditRecord(principal="mallory", action="x", target="t"), AuditHead(seq=last.seq, hash=last.hash))
    return [*docs, forged.model_dump_json()]


TAMPERING: dict[str, tuple[Callable[[list[str]], list[str]], int, str]] = {
    "edited": (edited, 3, "does not match its hash"),
    "deleted": (lambda d: d[:1] + d[2:], 2, "missing"),
    "deleted-last": (lambda d: d[:-1], 5, "last record(s) are missing"),
    "deleted-first": (lambda d: d[1:], 1, "missing"),
    "reordered": (lambda d: [d[0], d[2], d[1], *d[3:]], 2, "out of order"),
    "inserted": (inserted, 4, "out of order"),
    "appended-without-head": (appended, 6, "appended without the head"),
}


def test_records_are_chained_and_verify(raw: Raw) -> None:
    recs = fill(raw)
    assert [r.seq for r in recs] == [1, 2, 3, 4, 5]
    assert recs[0].prev == GENESIS and all(b.prev == a.hash for a, b in itertools.pairwise(recs))
    assert raw.store.audit_log() == recs
    assert raw.store.audit_head() == AuditHead(seq=5, hash=recs[-1].hash)
    out = cli("audit", "verify", "--store", raw.spec)
    assert out.returncode == 0 and "ok: 5 record(s) chained" in out.stdout, out.stderr
    listed = cli("audit", "list", "--store", raw.spec, "--json")
    assert [json.loads(line)["hash"] for line in listed.stdout.splitlines()] == [r.hash for r in recs]


@pytest.mark.parametrize("kind", list(TAMPERING))
@pytest.mark.slow
def test_attack_tampered_audit_records_fail_verify_at_the_first_bad_seq(raw: Raw, kind: str) -> None:
    fill(raw)
    change, bad_seq, why = TAMPERING[kind]
    raw.write(change(raw.read()))
    verdict = verify(raw.store.audit_log(), raw.store.audit_head())
    assert not verdict.ok and verdict.first_bad_seq == bad_seq and why in verdict.problem, verdict
    out = cli("audit", "verify", "--store", raw.spec)
    assert out.returncode == 1 and f"BROKEN at seq {bad_seq}" in out.stderr, (out.stdout, out.stderr)
    as_json = json.loads(cli("audit", "verify", "--store", raw.spec, "--json").stdout)
    assert as_json["ok"] is False and as_json["first_bad_seq"] == bad_seq


def test_a_record_appended_while_verify_reads_the_log_is_not_a_false_broken(
    raw: Raw, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    """The store is written while ``audit verify`` reads it (no snapshot of log and head): a
    record appended after the log is read, before the head is, used to show as BROKEN."""
    from ringfence import cli as ringfence_cli

    fill(raw)
    cls = type(raw.store)
    read_log = cls.audit_log

    def log_then_append(store: Any) -> list[AuditRecord]:
        log = read_log(store)
        raw.store.audit(AuditRecord(principal="alice", action="workload.release", target="w1"))
        return log

    monkeypatch.setattr(cls, "audit_log", log_then_append)
    assert ringfence_cli.main(["audit", "verify", "--store", raw.spec]) == 0
    assert "ok: 5 record(s) chained" in capsys.readouterr().out
    # the next run reads the record it missed
    assert ringfence_cli.main(["audit", "verify", "--store", raw.spec]) == 0
    assert "ok: 6 record(s) chained" in capsys.readouterr().out


def test_the_heads_read_around_the_log_still_catch_tampering() -> None:
    """With a head read before the log and one after, what verify lets pass is only a log that
    ends between them and holds what it has of them."""
    recs, head = [], AuditHead()
    for i in range(5):
        rec = seal(AuditRecord(principal=f"p{i}", action="x", target="t"), head)
        recs.append(rec)
        head = AuditHead(seq=rec.seq, hash=rec.hash)
    at = {r.seq: AuditHead(seq=r.seq, hash=r.hash) for r in recs}
    assert verify(recs[:4], at[5], head_before=at[3]).ok
    assert verify(recs, at[5], head_before=at[5]).ok
    # the last records gone before the first read of the head
    gone = verify(recs[:2], at[5], head_before=at[3])
    assert not gone.ok and gone.first_bad_seq == 3 and "missing" in gone.problem
    # appended without the head, even the one read after the log
    extra = verify(recs, at[4], head_before=at[3])
    assert not extra.ok and extra.first_bad_seq == 5 and "appended without the head" in extra.problem
    # a record the first head names replaced by one that chains
    other = seal(AuditRecord(principal="mallory", action="x", target="t"), at[2])
    replaced = verify([*recs[:2], other], at[5], head_before=at[3])
    assert not replaced.ok and replaced.first_bad_seq == 3 and "replaced" in replaced.problem
    # the head rolled back between the reads
    back = verify(recs[:3], at[3], head_before=at[4])
    assert not back.ok and "went back" in back.problem


def test_an_untouched_write_after_tampering_does_not_heal_the_chain(raw: Raw) -> None:
    fill(raw)
    raw.write(edited(raw.read()))
    raw.store.audit(AuditRecord(principal="alice", action="workload.release", target="w1"))
    assert verify(raw.store.audit_log(), raw.store.audit_head()).first_bad_seq == 3


def test_what_the_chain_does_not_prove_a_rewritten_chain_and_head(raw: Raw, tmp_path: Path) -> None:
    """Someone who rewrites every record and the head builds a consistent chain: only a head
    anchored elsewhere (docs/visibility.md) shows it. This pins what the docs say."""
    recs = fill(raw, 3)
    head = AuditHead()
    forged = []
    for r in recs:
        f = seal(r.model_copy(update={"principal": "mallory"}), head)
        forged.append(f.model_dump_json())
        head = AuditHead(seq=f.seq, hash=f.hash)
    raw.write(forged)
    if isinstance(raw.store, FileVersionStore):
        (raw.store.root / "audit.head").write_text(head.model_dump_json())
    elif isinstance(raw.store, SqliteStore):
        with sqlite3.connect(raw.store.path) as db:
            db.execute("UPDATE audit_head SET seq = ?, hash = ?", (head.seq, head.hash))
    else:
        boto3.resource("dynamodb").Table("rf-audit").put_item(
            Item={"pk": "head", "sk": "head", "seq": head.seq, "hash": head.hash}
        )
    assert verify(raw.store.audit_log(), raw.store.audit_head()).ok
    # a head saved outside the store before the rewrite shows it
    anchor = tmp_path / "anchors.jsonl"
    anchor.write_text(AuditHead(seq=3, hash=recs[-1].hash).model_dump_json() + "\n")
    out = cli("audit", "verify", "--store", raw.spec, "--anchor", str(anchor))
    assert out.returncode == 1 and "BROKEN at seq 3" in out.stderr and "rewritten" in out.stderr, out.stderr


def test_a_record_id_is_appended_once(raw: Raw) -> None:
    from ringfence.store.base import ConflictError

    if isinstance(raw.store, FileVersionStore):
        pytest.skip("the CLI's file store appends every call (its records are made by the CLI, ids fresh)")
    (first,) = fill(raw, 1)
    with pytest.raises(ConflictError):
        raw.store.audit(AuditRecord(id=first.id, principal="a", action="rewritten", target="t"))
    assert verify(raw.store.audit_log(), raw.store.audit_head()).ok and len(raw.store.audit_log()) == 1


# --- concurrent writers keep one chain -----------------------------------------------------------


def _write_many(spec: str, who: str, n: int, barrier: Any) -> None:
    if spec.startswith("file:"):
        store: Any = FileVersionStore(Path(spec[5:]))
    else:
        store = SqliteStore(spec[7:])
    # generous: four spawned interpreters importing boto3 on a loaded 2-core CI machine
    barrier.wait(240)
    for i in range(n):
        store.audit(AuditRecord(principal=who, action="x", target=str(i)))


def _cancellations(client: Any) -> list[str]:
    """The errors the writers' transactions met (their requests go out concurrently: moto's
    TransactWriteItems did not isolate concurrent transactions — two racing writers both passed
    their conditions and one record was lost — until the embedded moto ran them one at a time,
    ``ringfence.local.motoproc.serialise_transactions``, as DynamoDB isolates them)."""
    cancelled: list[str] = []
    transact = client.transact_write_items

    def call(**kw: Any) -> Any:
        try:
            return transact(**kw)
        except Exception as exc:
            cancelled.append(type(exc).__name__)
            raise

    client.transact_write_items = call
    return cancelled


def _racing(store: Any) -> Any:
    """The same tables through a DynamoStore whose threads race like processes of their own
    (as Lambda instances do: nothing in one process serialises them)."""
    from ringfence.store.dynamodb import DynamoStore

    return DynamoStore("rf-inventory", "rf-state", store.audit_table.name, one_audit_writer=False)


def test_concurrent_threads_keep_one_chain(raw: Raw) -> None:
    dynamo = raw.spec.startswith("dynamodb")
    writers, each = 4, 10 if dynamo else 25
    barrier = threading.Barrier(writers)
    store = _racing(raw.store) if dynamo else raw.store
    cancelled = _cancellations(store.audit_table.meta.client) if dynamo else []

    def run(who: str) -> None:
        barrier.wait(60)
        for i in range(each):
            store.audit(AuditRecord(principal=who, action="x", target=str(i)))

    threads = [threading.Thread(target=run, args=(f"t{k}",)) for k in range(writers)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(120)
    log = raw.store.audit_log()
    assert [r.seq for r in log] == list(range(1, writers * each + 1)), "no seq written twice, none skipped"
    assert verify(log, raw.store.audit_head()).ok
    if dynamo:
        assert "TransactionCanceledException" in cancelled, "the writers raced and the conditions refused the losers"


def test_one_process_groups_its_records_without_racing_itself(request: pytest.FixtureRequest) -> None:
    """Threads of one process (serve's, a demo's handlers) take turns at the chain instead of
    racing for its head: no transaction is cancelled, none waits on a read of the head after the
    first, and records that queue behind a transaction share the next one (59 agents enrolling at
    once made 27,000 transactions for a few hundred records; one each, in line, cost 5 s)."""
    from ringfence.store import dynamodb

    raw = _dynamodb(request.getfixturevalue("moto_url"))
    # a head remembered from an earlier test on this worker (the table since emptied) is stale:
    # the first write would be cancelled and read again, as it should, but not what this counts
    dynamodb._CHAIN_WRITERS.clear()
    client = raw.store.audit_table.meta.client
    cancelled = _cancellations(client)
    transact = client.transact_write_items
    calls: list[int] = []

    def counted(**kw: Any) -> Any:
        calls.append(len(kw["TransactItems"]))
        return transact(**kw)

    client.transact_write_items = counted
    writers, each = 8, 5
    barrier = threading.Barrier(writers)
    written: list[AuditRecord] = []

    def run(who: str) -> None:
        barrier.wait(60)
        for i in range(each):
            written.append(raw.store.audit(AuditRecord(principal=who, action="x", target=str(i))))

    threads = [threading.Thread(target=run, args=(f"t{k}",)) for k in range(writers)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(120)
    log = raw.store.audit_log()
    assert [r.seq for r in log] == list(range(1, writers * each + 1))
    assert verify(log, raw.store.audit_head()).ok
    assert sorted(written, key=lambda r: r.seq) == log, "each caller got its own record as stored"
    assert cancelled == [] and sum(calls) == 2 * writers * each + len(calls), "two items a record, one head a call"
    assert len(calls) <= writers * each


def _held_transactions(client: Any, fail: int = 0) -> tuple[threading.Event, threading.Event, list[int]]:
    """The first transaction waits for ``release``; ``entered`` is set when it is held; the
    ``fail``-th (from 1; 0: none) fails as an unreachable endpoint would. Returns (entered,
    release, the item counts of every transaction)."""
    transact = client.transact_write_items
    entered, release = threading.Event(), threading.Event()
    sizes: list[int] = []

    def held(**kw: Any) -> Any:
        sizes.append(len(kw["TransactItems"]))
        if len(sizes) == 1:
            entered.set()
            assert release.wait(30)
        if len(sizes) == fail:
            raise ConnectionError("DynamoDB unreachable")
        return transact(**kw)

    client.transact_write_items = held
    return entered, release, sizes


def _audit_behind_a_held_write(
    raw: Raw, recs: list[AuditRecord], fail: int = 0
) -> tuple[dict[str, AuditRecord | Exception], list[int]]:
    """``recs[0]`` written by one thread while its transaction is held, the rest queued behind it
    from threads of their own. Returns each record's id → what its caller got, and the item
    counts of the transactions made."""
    from ringfence.store import dynamodb

    dynamodb._CHAIN_WRITERS.clear()
    entered, release, sizes = _held_transactions(raw.store.audit_table.meta.client, fail)
    got: dict[str, AuditRecord | Exception] = {}

    def one(rec: AuditRecord) -> None:
        try:
            got[rec.id] = raw.store.audit(rec)
        except Exception as exc:
            got[rec.id] = exc

    first = threading.Thread(target=one, args=(recs[0],))
    first.start()
    assert entered.wait(30)
    others = [threading.Thread(target=one, args=(r,)) for r in recs[1:]]
    for t in others:
        t.start()
    writer = dynamodb._CHAIN_WRITERS[next(iter(dynamodb._CHAIN_WRITERS))]
    while writer.group.queued < len(others):
        threading.Event().wait(0.01)
    release.set()
    for t in [first, *others]:
        t.join(60)
    return got, sizes


def test_records_queued_behind_a_write_go_together_within_the_transaction_limit(request: pytest.FixtureRequest) -> None:
    raw = _dynamodb(request.getfixturevalue("moto_url"))
    recs = [AuditRecord(principal="agent", action="agent.enroll", target=f"i-{n}") for n in range(61)]
    got, sizes = _audit_behind_a_held_write(raw, recs)
    # the first alone; the sixty queued behind it in two transactions of at most 100 items
    assert sizes == [3, 2 * 49 + 1, 2 * 11 + 1]
    log = raw.store.audit_log()
    assert [r.seq for r in log] == list(range(1, 62)) and verify(log, raw.store.audit_head()).ok
    assert {r.id: r for r in log} == got, "every caller got its record as stored"
    assert log[0].id == recs[0].id, "the held write went first"


def test_a_failed_transaction_fails_only_the_records_it_carried(request: pytest.FixtureRequest) -> None:
    """A group too large for one transaction: when the second of its transactions fails, the
    callers whose records the first wrote get them, the others the error; the chain holds."""
    raw = _dynamodb(request.getfixturevalue("moto_url"))
    recs = [AuditRecord(principal="agent", action="agent.enroll", target=f"i-{n}") for n in range(61)]
    got, sizes = _audit_behind_a_held_write(raw, recs, fail=3)
    assert sizes == [3, 2 * 49 + 1, 2 * 11 + 1]
    log = raw.store.audit_log()
    assert [r.seq for r in log] == list(range(1, 51)) and verify(log, raw.store.audit_head()).ok
    written = {r.id for r in log}
    assert all(got[i] == r for r in log for i in [r.id]), "the written ones got their records"
    failed = [v for k, v in got.items() if k not in written]
    assert len(failed) == 11 and all(isinstance(v, ConnectionError) for v in failed)
    after = raw.store.audit(AuditRecord(principal="next", action="x", target="t"))
    assert after.seq == 51 and verify(raw.store.audit_log(), raw.store.audit_head()).ok


def test_a_record_whose_id_exists_is_refused_alone_and_its_group_is_written(request: pytest.FixtureRequest) -> None:
    from ringfence.store.base import ConflictError

    raw = _dynamodb(request.getfixturevalue("moto_url"))
    fill(raw, 1)
    (existing,) = raw.store.audit_log()
    recs = [
        AuditRecord(principal="a", action="x", target="first"),
        AuditRecord(principal="b", action="x", target="before"),
        AuditRecord(id=existing.id, principal="replay", action="x", target="again"),
        AuditRecord(principal="c", action="x", target="after"),
    ]
    got, sizes = _audit_behind_a_held_write(raw, recs)
    refused = got[existing.id]
    assert isinstance(refused, ConflictError) and "append-only" in str(refused)
    assert sizes == [3, 7, 5], "the three queued went together, and the two others again without the replay"
    log = raw.store.audit_log()
    assert log[1].principal == "a" and sorted(r.principal for r in log[2:]) == ["b", "c"]
    assert [r.seq for r in log] == [1, 2, 3, 4] and verify(log, raw.store.audit_head()).ok
    assert all(isinstance(got[r.id], AuditRecord) for r in recs if r.id != existing.id)


def test_a_remembered_head_another_process_moved_is_read_again(request: pytest.FixtureRequest) -> None:
    """The head this process remembers goes stale when another process appends: the condition
    refuses the write, and the record is chained after the other one, not lost or forked."""
    raw = _dynamodb(request.getfixturevalue("moto_url"))
    fill(raw, 2)
    other = _racing(raw.store)  # another process's writer: appends behind this one's back
    other.audit(AuditRecord(principal="other", action="x", target="t"))
    mine = raw.store.audit(AuditRecord(principal="mine", action="x", target="t"))
    log = raw.store.audit_log()
    assert [r.principal for r in log] == ["p0", "p1", "other", "mine"] and mine.seq == 4
    assert verify(log, raw.store.audit_head()).ok


@pytest.mark.parametrize("kind", ["file", "sqlite"])
def test_concurrent_processes_keep_one_chain(tmp_path: Path, kind: str) -> None:
    raw = _file(tmp_path) if kind == "file" else _sqlite(tmp_path)
    ctx = multiprocessing.get_context("spawn")
    writers, each = 4, 25
    barrier = ctx.Barrier(writers)
    procs = [ctx.Process(target=_write_many, args=(raw.spec, f"p{k}", each, barrier)) for k in range(writers)]
    for p in procs:
        p.start()
    for p in procs:
        p.join(300)
    assert [p.exitcode for p in procs] == [0] * writers
    log = raw.store.audit_log()
    assert [r.seq for r in log] == list(range(1, writers * each + 1))
    assert sorted(r.principal for r in log) == sorted(f"p{k}" for k in range(writers) for _ in range(each))
    assert verify(log, raw.store.audit_head()).ok


def test_records_from_before_chaining_pass_only_in_the_number_allowed(tmp_path: Path) -> None:
    raw = _file(tmp_path)
    old = AuditRecord(principal="a", action="policy.provision", target="policy/1", time=1000.0)
    (raw.store.root / "audit.jsonl").write_text(old.model_dump_json() + "\n")
    new = raw.store.audit(AuditRecord(principal="b", action="policy.provision", target="policy/2"))
    assert new.seq == 1 and new.prev == GENESIS
    verdict = verify(raw.store.audit_log(), raw.store.audit_head(), allow_unchained=1)
    assert verdict.ok and verdict.unchained == 1 and "1 earlier record(s) from before chaining" in verdict.report()
    out = cli("audit", "verify", "--store", raw.spec)
    assert out.returncode == 1 and "BROKEN before the chain: 1 record(s) without a hash" in out.stderr, out.stderr
    assert cli("audit", "verify", "--store", raw.spec, "--allow-unchained", "1").returncode == 0
    listed = cli("audit", "list", "--store", raw.spec).stdout.splitlines()
    assert listed[0].split()[0] == "-" and listed[1].split()[0] == "1"
    raw.write([*raw.read(), old.model_copy(update={"id": "late"}).model_dump_json()])
    assert not verify(raw.store.audit_log(), raw.store.audit_head(), allow_unchained=1).ok, "one after the chain"


@pytest.mark.parametrize(
    "forged",
    [
        pytest.param({"time": 1000.0}, id="back-dated"),
        pytest.param({"seq": 2}, id="claiming-a-seq"),
        pytest.param({"time": 9e9}, id="dated-after-the-chain-began"),
    ],
)
@pytest.mark.slow
def test_attack_a_record_without_a_hash_added_to_the_log_fails_verify(
    raw: Raw, forged: dict[str, Any], request: pytest.FixtureRequest
) -> None:
    """Whoever may write the store adds a record with no hash, which would read as history from
    before chaining ("bob provisioned policy/allow-any-any"): nothing covers such records, so
    verify passes them only in the number the operator allowed, and never one that claims a seq
    or is dated after the chain began."""
    fill(raw, 3)
    fake = AuditRecord(principal="bob", action="policy.provision", target="policy/allow-any-any", **forged)
    if isinstance(raw.store, FileVersionStore):
        raw.write([fake.model_dump_json(), *raw.read()])
    elif isinstance(raw.store, SqliteStore):
        with sqlite3.connect(raw.store.path) as db:  # the triggers stop UPDATE and DELETE, not this
            db.execute(
                "INSERT INTO audit (seq, id, time, doc) VALUES (0, ?, ?, ?)",
                (fake.id, fake.time, fake.model_dump_json()),
            )
    else:
        boto3.resource("dynamodb").Table("rf-audit").put_item(
            Item={"pk": "2026-01-01", "sk": fake.id, "doc": fake.model_dump_json()}
        )
    out = cli("audit", "verify", "--store", raw.spec)
    assert out.returncode == 1 and "BROKEN before the chain" in out.stderr, (out.stdout, out.stderr)
    assert as_json(raw)["ok"] is False


def as_json(raw: Raw) -> dict[str, Any]:
    out: dict[str, Any] = json.loads(cli("audit", "verify", "--store", raw.spec, "--json").stdout)
    return out


def test_verify_that_would_check_nothing_is_an_error(tmp_path: Path) -> None:
    """A mistyped database path, an empty anchor file: errors naming them, never "ok"."""
    missing = tmp_path / "typo" / "state.db"
    out = cli("audit", "verify", "--store", f"sqlite:{missing}")
    assert out.returncode != 0 and "no such database file" in out.stderr and not missing.parent.exists()
    raw = _sqlite(tmp_path)
    fill(raw, 2)
    empty = tmp_path / "heads.jsonl"
    empty.write_text("\n")
    out = cli("audit", "verify", "--store", raw.spec, "--anchor", str(empty))
    assert out.returncode != 0 and f"{empty}: no saved audit head in it" in out.stderr, out.stderr
    raw.store.close()


def test_a_table_item_that_is_no_record_and_a_wrong_table_are_named(request: pytest.FixtureRequest) -> None:
    raw = _dynamodb(request.getfixturevalue("moto_url"))
    fill(raw, 2)
    boto3.resource("dynamodb").Table("rf-audit").put_item(Item={"pk": "note", "sk": "x"})
    out = cli("audit", "verify", "--store", raw.spec)
    assert out.returncode != 0 and "item note/x is no audit record" in out.stderr, out.stderr
    wrong = cli("audit", "verify", "--store", "dynamodb:rf-inventory,rf-state,rf-nope")
    assert wrong.returncode != 0 and "could not be read" in wrong.stderr and "Traceback" not in wrong.stderr


@pytest.mark.slow
def test_anchors_saved_by_audit_head_hold_while_the_chain_grows(raw: Raw, tmp_path: Path) -> None:
    fill(raw, 2)
    anchors = tmp_path / "anchors.jsonl"
    saved = cli("audit", "head", "--store", raw.spec)
    assert saved.returncode == 0 and json.loads(saved.stdout)["seq"] == 2
    anchors.write_text(saved.stdout)
    fill(raw, 3)
    anchors.write_text(anchors.read_text() + cli("audit", "head", "--store", raw.spec).stdout)
    assert cli("audit", "verify", "--store", raw.spec, "--anchor", str(anchors)).returncode == 0
    # truncated to before an anchor and rebuilt consistently: the anchor is missing
    recs = raw.store.audit_log()
    verdict = verify(recs[:3], AuditHead(seq=3, hash=recs[2].hash), [AuditHead(seq=5, hash=recs[4].hash)])
    assert not verdict.ok and verdict.first_bad_seq == 5 and "ends before it" in verdict.problem
    anchors.write_text("not json\n")
    bad = cli("audit", "verify", "--store", raw.spec, "--anchor", str(anchors))
    assert bad.returncode == 1 and f"{anchors}:1: not a saved audit head" in bad.stderr
