"""DynamoStore.audit_with on the moto server: an administrator's change and its audit record are
one TransactWriteItems (the change's items, the chain item, the id claim, the head), so a Lambda
killed between "record" and "change" is no longer possible: both are written or neither. A change
refused by its own condition leaves no record; a lost race for the chain's head is retried."""

from __future__ import annotations

from collections.abc import Callable, Iterator
from typing import Any

import pytest
from botocore.exceptions import EndpointConnectionError

from ringfence.audit import AuditRecord, verify
from ringfence.model import Mode
from ringfence.store.base import ChangeFailed, ConflictError, OperatorChange, PolicyActivation
from ringfence.store.dynamodb import DynamoStore
from ringfence.store.sqlite import SqliteStore
from ringfence.versions import PolicyVersion

from .conftest import Env
from .test_store import WID, make_dynamo, rec


class Killed(BaseException):
    """The Lambda's process ending where it stands (a timeout, an out-of-memory kill): no handler
    of ours runs after it."""


@pytest.fixture
def store(moto_url: str) -> Iterator[DynamoStore]:
    from ringfence.store import dynamodb

    dynamodb._CHAIN_WRITERS.clear()  # no head remembered from another test's tables
    st = make_dynamo(moto_url)
    assert isinstance(st, DynamoStore)
    assert st.observe(rec(1.0, "prod"))
    yield st
    dynamodb._CHAIN_WRITERS.clear()


def _hook(store: DynamoStore, event: str, handler: Any) -> Any:
    events = store.audit_table.meta.client.meta.events
    events.register(event, handler)
    return lambda: events.unregister(event, handler)


def _quarantined(store: DynamoStore) -> bool:
    got = store.get(WID)
    assert got is not None
    return got.op_quarantined


def _claims(store: DynamoStore) -> list[str]:
    """The id claims in the audit table, read raw (a record half written would show here)."""
    items = store.audit_table.scan(ConsistentRead=True)["Items"]
    return sorted(str(i["pk"]) for i in items if str(i["pk"]).startswith("id#"))


@pytest.mark.parametrize("when", ["before-call", "after-call"])
def test_a_kill_between_the_record_and_the_change_leaves_both_or_neither(store: DynamoStore, when: str) -> None:
    """The process is killed at the first write's call (before it is sent, or once it committed
    and before anything else runs). Either way the audit log and the store agree: a record of a
    quarantine exactly when the quarantine is in force. (Written first, the record alone stood
    with no quarantine and no ``.failed``: this test failed on that code, ``after-call``.)"""
    calls: list[str] = []

    def kill(**_: Any) -> None:
        calls.append(when)
        raise Killed

    unhook = _hook(store, f"{when}.dynamodb.TransactWriteItems", kill)
    try:
        with pytest.raises(Killed):
            store.audit_with(
                AuditRecord(principal="alice", action="workload.quarantine", target=WID),
                OperatorChange(WID, quarantined=True),
            )
    finally:
        unhook()
    assert calls == [when]
    recorded = [r.action for r in store.audit_log()]
    assert recorded == (["workload.quarantine"] if _quarantined(store) else []), "both or neither"
    assert recorded == ([] if when == "before-call" else ["workload.quarantine"])
    assert verify(store.audit_log(), store.audit_head()).ok


def test_a_change_refused_by_its_condition_writes_no_record(store: DynamoStore) -> None:
    """An unknown workload (the record's existence check) and a lost compare-and-swap of the
    active policy: ChangeFailed carrying the change's own error, no chain item, no id claim, the
    head unmoved, and nothing of the change (no quarantine item for the unknown workload)."""
    first = store.audit(AuditRecord(principal="alice", action="x", target="t"))
    head = store.audit_head()
    with pytest.raises(ChangeFailed) as caught:
        store.audit_with(
            AuditRecord(principal="alice", action="workload.quarantine", target="i-unknown"),
            OperatorChange("i-unknown", quarantined=True),
        )
    assert isinstance(caught.value.cause, KeyError)
    assert store.state.get_item(Key={"pk": "quarantine", "sk": "i-unknown"}, ConsistentRead=True).get("Item") is None

    store.activate_policy(PolicyVersion(number=1, keys={}, digest="d1", author="a"), expected_active=None)
    late = PolicyVersion(number=2, keys={}, digest="d2", author="b")
    with pytest.raises(ChangeFailed) as caught:
        store.audit_with(
            AuditRecord(principal="bob", action="policy.provision", target="policy/v2"),
            PolicyActivation(late, expected_active=None),  # read before v1 became active
        )
    assert isinstance(caught.value.cause, ConflictError)
    assert "policy version 1 became active meanwhile" in str(caught.value.cause)
    active = store.active_policy()
    assert active is not None and active.number == 1
    assert store.state.get_item(Key={"pk": "policy", "sk": "v00000002"}, ConsistentRead=True).get("Item") is None
    assert store.audit_log() == [first] and store.audit_head() == head and _claims(store) == [f"id#{first.id}"]


def test_a_lost_race_for_the_head_is_sealed_again_and_retried(store: DynamoStore, moto_url: str) -> None:
    """Another process appends between this one's read of the head and its transaction: the
    transaction is cancelled by the head's condition alone (the change's own condition held), so
    the record is sealed on the new head and the transaction made again, change and all."""
    other = DynamoStore("rf-inventory", "rf-state", "rf-audit", resource=store.ddb, one_audit_writer=False)
    assert store.audit(AuditRecord(principal="alice", action="first", target="t")).seq == 1  # head remembered
    sent: list[int] = []
    raced: list[AuditRecord] = []

    def race(params: dict[str, Any], **_: Any) -> None:
        sent.append(len(params["TransactItems"]))
        if not raced:  # a Lambda elsewhere appends first
            raced.append(AuditRecord(principal="bob", action="elsewhere", target="t"))
            raced[0] = other.audit(raced[0])

    unhook = _hook(store, "before-parameter-build.dynamodb.TransactWriteItems", race)
    try:
        sealed = store.audit_with(
            AuditRecord(principal="alice", action="workload.quarantine", target=WID),
            OperatorChange(WID, quarantined=True),
        )
    finally:
        unhook()
    # ours (2 change items + 3 chain items) twice, the other's (3) once in between
    assert sent == [5, 3, 5]
    log = store.audit_log()
    assert [(r.seq, r.action) for r in log] == [(1, "first"), (2, "elsewhere"), (3, "workload.quarantine")]
    assert log[-1] == sealed and sealed.prev == raced[0].hash
    assert verify(log, store.audit_head()).ok and _quarantined(store)


def test_a_transaction_whose_answer_was_lost_is_read_back(store: DynamoStore) -> None:
    """The call fails without a cancellation (a dropped connection): the record's id claim says
    whether the transaction committed. Committed: the caller gets its record (the change is in
    force with it); not sent: ChangeFailed with the error, nothing written."""

    def lost(**_: Any) -> None:
        raise EndpointConnectionError(endpoint_url="https://dynamodb")

    unhook = _hook(store, "after-call.dynamodb.TransactWriteItems", lost)
    try:
        sealed = store.audit_with(
            AuditRecord(principal="alice", action="workload.quarantine", target=WID),
            OperatorChange(WID, quarantined=True),
        )
    finally:
        unhook()
    assert store.audit_log() == [sealed] and _quarantined(store)

    unhook = _hook(store, "before-call.dynamodb.TransactWriteItems", lost)
    try:
        with pytest.raises(ChangeFailed) as caught:
            store.audit_with(
                AuditRecord(principal="alice", action="workload.mode", target=WID),
                OperatorChange(WID, set_mode=True, mode=Mode.IDLE),
            )
    finally:
        unhook()
    assert isinstance(caught.value.cause, EndpointConnectionError)
    got = store.get(WID)
    assert got is not None and got.op_mode is None and store.audit_log() == [sealed]


def test_records_queued_behind_a_write_carry_their_changes(store: DynamoStore) -> None:
    """The group commit carries a change with its record: quarantines audited from many threads
    at once all land with their records, in one chain, each change with its own record."""
    import threading

    ids = [f"i-{n:017x}" for n in range(12)]
    for wid in ids:
        assert store.observe(rec(1.0, "prod", wid=wid))
    got: dict[str, Any] = {}

    def one(wid: str) -> None:
        try:
            got[wid] = store.audit_with(
                AuditRecord(principal="alice", action="workload.quarantine", target=wid),
                OperatorChange(wid, quarantined=True) if wid != ids[5] else OperatorChange("i-gone", quarantined=True),
            )
        except Exception as exc:
            got[wid] = exc

    threads = [threading.Thread(target=one, args=(wid,)) for wid in ids]
    for t in threads:
        t.start()
    for t in threads:
        t.join(60)
    log = store.audit_log()
    assert verify(log, store.audit_head()).ok
    assert isinstance(got[ids[5]], ChangeFailed), "refused alone"
    assert sorted(r.target for r in log) == sorted(w for w in ids if w != ids[5])
    assert all(got[r.target] == r for r in log), "each caller got its record as stored"
    quarantined = {w for w in ids if (g := store.get(w)) is not None and g.op_quarantined}
    assert quarantined == {r.target for r in log}


def test_sqlite_takes_the_same_changes(tmp_path: Any) -> None:
    """The change descriptions are the store's interface: SQLite applies them in its transaction."""
    st = SqliteStore(tmp_path / "s.db")
    assert st.observe(rec(1.0, "prod"))
    st.audit_with(AuditRecord(principal="a", action="workload.quarantine", target=WID), OperatorChange(WID, True))
    got = st.get(WID)
    assert got is not None and got.op_quarantined
    st.close()


class LossyProxy:
    """An HTTP proxy in front of the moto server that can lose the answer of a TransactWriteItems
    writing the audit table once moto committed it (``lose``: one mode per such call, consumed in
    order; 'reset' closes the connection unanswered, '500' answers InternalServerError), so that
    botocore's own retry sends the committed transaction again. ``seen``: per such call, moto's
    status and error code; ``tokens``: its ClientRequestToken."""

    def __init__(self, upstream: str) -> None:
        import http.client
        import http.server
        import json
        import socketserver
        import threading

        self.up = upstream.removeprefix("http://")
        self.lose: list[str] = []
        self.seen: list[str] = []
        self.tokens: list[str | None] = []
        proxy = self

        class Handler(http.server.BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def log_message(self, *_: Any) -> None:
                pass

            def do_POST(self) -> None:
                body = self.rfile.read(int(self.headers.get("Content-Length", 0)))
                conn = http.client.HTTPConnection(proxy.up, timeout=60)
                conn.request(
                    "POST", self.path, body=body, headers={k: v for k, v in self.headers.items() if k != "Host"}
                )
                answer = conn.getresponse()
                data = answer.read()
                mode = None
                if self.headers.get("X-Amz-Target", "").endswith("TransactWriteItems") and b"rf-audit" in body:
                    code = json.loads(data).get("__type", "").split("#")[-1] if answer.status != 200 else "ok"
                    proxy.seen.append(f"{answer.status}:{code}")
                    proxy.tokens.append(json.loads(body).get("ClientRequestToken"))
                    mode = proxy.lose.pop(0) if proxy.lose else None
                if mode == "reset":
                    self.close_connection = True
                    self.connection.shutdown(2)
                    return
                if mode == "500":
                    status, data = 500, json.dumps({"__type": "InternalServerError", "message": "lost"}).encode()
                    headers = [("Content-Type", "application/x-amz-json-1.0")]
                else:
                    status = answer.status
                    headers = [(k, v) for k, v in answer.getheaders() if k.lower() not in DROPPED]
                self.send_response(status)
                for k, v in headers:
                    self.send_header(k, v)
                self.send_header("Content-Length", str(len(data)))
                self.end_headers()
                self.wfile.write(data)

        class Server(socketserver.ThreadingMixIn, http.server.HTTPServer):
            daemon_threads = True

        self.server = Server(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}"
        threading.Thread(target=self.server.serve_forever, daemon=True).start()

    def stop(self) -> None:
        self.server.shutdown()
        self.server.server_close()


DROPPED = ("transfer-encoding", "connection", "content-length")


@pytest.fixture
def proxy(moto_url: str) -> Iterator[LossyProxy]:
    px = LossyProxy(moto_url)
    yield px
    px.stop()


def _through(px: LossyProxy) -> DynamoStore:
    """A store on the same tables whose DynamoDB calls go through the proxy, with the control
    plane's retry configuration (botocore's standard retry)."""
    import boto3

    from ringfence.clouds.aws.clients import RETRIES

    ddb = boto3.resource("dynamodb", endpoint_url=px.url, config=RETRIES)
    return DynamoStore("rf-inventory", "rf-state", "rf-audit", resource=ddb)


@pytest.mark.parametrize("lost", ["500", "reset"])
def test_a_committed_transaction_retried_by_botocore_is_read_back_as_written(
    store: DynamoStore, proxy: LossyProxy, lost: str
) -> None:
    """The transaction (a quarantine and its record) commits; its answer is lost (a 500, a
    dropped connection); botocore sends it again, which is cancelled by the items it wrote (the
    id claim, the chain item, the head). That is read back (the claim holds the sealed seq, the
    chain item there the sealed hash): the caller gets its record. (Read as "audit record exists"
    before: ConflictError for a quarantine in force with its record.) moto ignores the
    ClientRequestToken that makes DynamoDB answer such a retry as the success it was."""
    st = _through(proxy)
    proxy.lose = [lost]
    sealed = st.audit_with(
        AuditRecord(principal="alice", action="workload.quarantine", target=WID), OperatorChange(WID, quarantined=True)
    )
    assert proxy.seen == ["200:ok", "400:TransactionCanceledException"], "committed, then retried by botocore"
    assert proxy.tokens[0] and proxy.tokens == proxy.tokens[:1] * 2, "the retry carries the chunk's token"
    assert store.audit_log() == [sealed] and _quarantined(store)
    assert verify(store.audit_log(), store.audit_head()).ok
    # the head this writer remembers is not trusted: the next record follows the chain
    assert st.audit(AuditRecord(principal="alice", action="next", target="t")).seq == 2
    with pytest.raises(ConflictError, match="exists"):  # a record truly submitted twice still is refused
        st.audit(sealed.model_copy(update={"seq": 0, "hash": "", "prev": ""}))


def _queued_behind_a_slow_write(st: DynamoStore, calls: list[Callable[[], Any]]) -> list[Any]:
    """Run ``calls`` on threads while a write of ``st``'s group commit is held in flight, so that
    they all queue and go together in the next write; their outcomes (or exceptions), in order."""
    import threading
    import time

    release = threading.Event()
    started: list[int] = []

    def slow(**_: Any) -> None:
        started.append(1)
        if len(started) == 1:
            release.wait(20)

    unhook = _hook(st, "before-call.dynamodb.TransactWriteItems", slow)
    got: list[Any] = [None] * len(calls)

    def run(k: int) -> None:
        try:
            got[k] = calls[k]()
        except Exception as exc:
            got[k] = exc

    try:
        blocker = threading.Thread(target=lambda: st.audit(AuditRecord(principal="x", action="slow", target="t")))
        blocker.start()
        while not started:
            time.sleep(0.01)
        threads = [threading.Thread(target=run, args=(k,)) for k in range(len(calls))]
        for t in threads:
            t.start()
        while st._chain_writer().group.queued < len(calls):
            time.sleep(0.01)
        release.set()
        for t in [blocker, *threads]:
            t.join(30)
    finally:
        release.set()
        unhook()
    return got


def _same_workload_calls(st: Any) -> list[Callable[[], Any]]:
    return [
        lambda: st.audit_with(
            AuditRecord(principal="a", action="workload.mode", target=WID),
            OperatorChange(WID, set_mode=True, mode=Mode.OBSERVE),
        ),
        lambda: st.audit_with(
            AuditRecord(principal="b", action="workload.quarantine", target=WID), OperatorChange(WID, quarantined=True)
        ),
        lambda: st.audit(AuditRecord(principal="c", action="agent.enroll", target="i-1")),
        lambda: st.audit(AuditRecord(principal="d", action="agent.enroll", target="i-2")),
    ]


@pytest.mark.parametrize("keys_checked", [True, False])
def test_changes_of_one_item_queued_together_all_land(
    store: DynamoStore, monkeypatch: pytest.MonkeyPatch, keys_checked: bool
) -> None:
    """A mode and a quarantine of one workload and two plain records queued behind one write: one
    transaction with two operations on the workload's item is refused whole by DynamoDB
    (ValidationException), which failed every record of it, the plain ones included. The chunk
    now ends before a record touching an item already in it, so each lands, as on SQLite. With
    that check off (``keys_checked`` False: a refusal of that kind the check would not foresee),
    the refused chunk is split and retried: the same outcome."""
    if not keys_checked:
        monkeypatch.setattr(store, "_touches", lambda rec, part: set())
    got = _queued_behind_a_slow_write(store, _same_workload_calls(store))
    assert all(isinstance(g, AuditRecord) for g in got), got
    log = store.audit_log()
    assert verify(log, store.audit_head()).ok
    assert sorted(r.action for r in log[1:]) == ["agent.enroll", "agent.enroll", "workload.mode", "workload.quarantine"]
    assert sorted(log[1:], key=lambda r: r.seq) == sorted(got, key=lambda r: r.seq), "each caller got its record"
    now = store.get(WID)
    assert now is not None and now.op_mode == Mode.OBSERVE and now.op_quarantined


def test_sqlite_lands_the_same_changes_of_one_item(tmp_path: Any) -> None:
    """What DynamoDB must match: SQLite makes all four."""
    import threading

    st = SqliteStore(tmp_path / "s.db")
    assert st.observe(rec(1.0, "prod"))
    got: list[Any] = []
    threads = [threading.Thread(target=lambda c=c: got.append(c())) for c in _same_workload_calls(st)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(30)
    assert len(got) == 4 and all(isinstance(g, AuditRecord) for g in got)
    now = st.get(WID)
    assert now is not None and now.op_mode == Mode.OBSERVE and now.op_quarantined
    st.close()


def test_two_activations_queued_together_one_wins(store: DynamoStore) -> None:
    """Two provisions over the same active version queued in one write: both write ``policy/active``,
    so they go in two transactions; the first wins, the second is refused by its own compare-and-swap
    (ChangeFailed with ConflictError: the admin answers 409), its record and version unwritten."""

    def provision(n: int) -> Callable[[], Any]:
        pv = PolicyVersion(number=n, keys={}, digest=f"d{n}", author="a")
        return lambda: store.audit_with(
            AuditRecord(principal="a", action="policy.provision", target=f"policy/v{n}"),
            PolicyActivation(pv, expected_active=None),
        )

    got = _queued_behind_a_slow_write(store, [provision(1), provision(2)])
    won = [g for g in got if isinstance(g, AuditRecord)]
    lost = [g for g in got if isinstance(g, ChangeFailed)]
    assert len(won) == 1 and len(lost) == 1, got
    assert isinstance(lost[0].cause, ConflictError)
    active = store.active_policy()
    assert active is not None and f"policy/v{active.number}" == won[0].target
    assert [r.action for r in store.audit_log()] == ["slow", "policy.provision"]
    assert verify(store.audit_log(), store.audit_head()).ok


def test_threads_changing_the_same_workloads_all_land(store: DynamoStore) -> None:
    """A few threads of one process (one group commit) quarantining, releasing and setting the
    mode of the same three workloads, with plain records and changes of an unknown workload: every
    change lands with its record (only the unknown workload's are refused, with no record), the
    chain verifies, and each workload's quarantine is what its last record says."""
    import random
    import threading

    wids = [f"i-{n:017x}" for n in range(3)]
    for wid in wids:
        assert store.observe(rec(1.0, "prod", wid=wid))
    results: list[tuple[str, str, Any]] = []
    lock = threading.Lock()

    def one(t: int) -> None:
        rnd = random.Random(t)
        for k in range(10):
            kind = rnd.choice(["plain", "q", "r", "m", "gone"])
            wid = "i-gone" if kind == "gone" else rnd.choice(wids)
            r = AuditRecord(principal=f"t{t}", action=kind, target=wid, reason=str(k))
            change = {
                "q": OperatorChange(wid, quarantined=True),
                "r": OperatorChange(wid, quarantined=False),
                "m": OperatorChange(wid, set_mode=True, mode=Mode.IDLE),
                "gone": OperatorChange(wid, quarantined=True),
            }.get(kind)
            try:
                out: Any = store.audit_with(r, change) if change else store.audit(r)
            except Exception as exc:
                out = exc
            with lock:
                results.append((kind, r.id, out))

    threads = [threading.Thread(target=one, args=(t,)) for t in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(60)
    assert len(results) == 40
    log = store.audit_log()
    assert verify(log, store.audit_head()).ok
    for kind, _, out in results:
        if kind == "gone":
            assert isinstance(out, ChangeFailed) and isinstance(out.cause, KeyError), out
        else:
            assert isinstance(out, AuditRecord), out
    assert sorted(r.id for r in log) == sorted(rid for kind, rid, _ in results if kind != "gone")
    for wid in wids:
        last = [r.action for r in log if r.target == wid and r.action in ("q", "r")]
        got = store.get(wid)
        assert got is not None and got.op_quarantined == (last[-1:] == ["q"]), (wid, last)
        assert got.op_mode == (Mode.IDLE if any(r.target == wid and r.action == "m" for r in log) else None)


def _policy_files(note: str) -> dict[str, str]:
    from tests.aws.conftest import LABEL_TESTS, POLICY_DIR

    files = {p.name: p.read_text() for p in sorted(POLICY_DIR.glob("*.yaml")) if p.name != "tests.yaml"}
    files["tests.yaml"] = LABEL_TESTS + f"# {note}\n"
    return files


def test_admin_changes_whose_answer_was_lost_are_done_and_sent_to_the_siem(
    env: Env, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The real admin function, its DynamoDB calls through the proxy: a quarantine and a
    provision whose transaction committed and whose answer was lost, retried by botocore. Both
    are answered as done (the quarantine 200, the version 201), the new version's files stay in
    the bucket, and the SIEM gets both committed records. (Before: the quarantine answered 500
    although in force, and the provision removed the files of the version it had made active,
    sent nothing to the SIEM and recorded no ``.failed``.)"""
    import json
    import time

    from ringfence.clouds.aws import clients
    from tests.aws.test_pipeline import boot
    from tests.aws.test_siem_lambda import siem_sink

    est = boot(env)
    sqs, queue = siem_sink(env, monkeypatch)
    px = LossyProxy(env.url)
    try:
        monkeypatch.setenv("AWS_ENDPOINT_URL_DYNAMODB", px.url)
        clients._clients.clear()
        env.load_functions()  # a cold container, its DynamoDB client through the proxy
        web = est["ids"]["web"][0]
        px.lose = ["reset"]
        status, _, body = env.rest("admin", "POST", f"/admin/workloads/{web}/quarantine", {"reason": "IR-9"})
        assert status == 200, body
        px.lose = ["500"]
        status, _, answer = env.rest("admin", "POST", "/admin/policies", {"files": _policy_files("v-next")})
        assert status == 201, answer
    finally:
        monkeypatch.delenv("AWS_ENDPOINT_URL_DYNAMODB")
        clients._clients.clear()
        px.stop()
    assert px.seen[-2:] == ["200:ok", "400:TransactionCanceledException"]
    assert px.seen.count("400:TransactionCanceledException") == 2, px.seen
    st = env.store
    got = st.get(web)
    assert got is not None and got.op_quarantined
    active = st.active_policy()
    assert active is not None and active.number == answer["version"]
    for key in active.keys.values():
        env.s3.head_object(Bucket=env.bucket, Key=key)  # the active version's files are there
    log = st.audit_log()
    assert verify(log, st.audit_head()).ok
    assert [r.action for r in log[-2:]] == ["workload.quarantine", "policy.provision"]
    assert not [r for r in log if r.action.endswith((".failed", ".abandoned"))]
    sent: set[str] = set()
    deadline = time.time() + 20
    while not {r.hash for r in log[-2:]} <= sent:
        assert time.time() < deadline, sent
        msgs = sqs.receive_message(QueueUrl=queue, WaitTimeSeconds=1).get("Messages", [])
        sent |= {json.loads(m["Body"])["detail"]["unmapped"]["audit"]["hash"] for m in msgs}


def test_two_provisions_queued_together_one_wins_the_other_is_answered_409(env: Env) -> None:
    """Two provisions over the same active version, by the admin function's Admin at once (as
    two requests to ``ringfence serve``), queued in one write of the process's group commit: both
    write ``policy/active``, which one transaction cannot hold (it failed both, 500). Now one is
    provisioned (201) and the other loses the compare-and-swap (409, its version abandoned), as
    on SQLite."""
    import threading
    import time

    from tests.aws.conftest import OPERATOR

    env.provision_example_policy()
    st = env.store
    admin = env.fn["admin"].admin()
    answers: list[tuple[int, Any]] = []

    def provision(note: str) -> Callable[[], Any]:
        def call() -> Any:
            out = admin.provision(OPERATOR, _policy_files(note), "CHG-2")
            answers.append((out.status, out.body))

        return call

    release = threading.Event()
    started: list[int] = []

    def slow(**_: Any) -> None:
        started.append(1)
        if len(started) == 1:
            release.wait(20)

    unhook = _hook(st, "before-call.dynamodb.TransactWriteItems", slow)
    try:
        blocker = threading.Thread(target=lambda: st.audit(AuditRecord(principal="x", action="slow", target="t")))
        blocker.start()
        while not started:
            time.sleep(0.01)
        threads = [threading.Thread(target=provision(n)) for n in ("a", "b")]
        for t in threads:
            t.start()
        deadline = time.time() + 20
        while st._chain_writer().group.queued < 2:
            assert time.time() < deadline, "the two provisions queue behind the slow write"
            time.sleep(0.01)
        release.set()
        for t in [blocker, *threads]:
            t.join(30)
    finally:
        release.set()
        unhook()
    assert sorted(s for s, _ in answers) == [201, 409], answers
    won = next(b for s, b in answers if s == 201)
    active = st.active_policy()
    assert active is not None and active.number == won["version"]
    log = st.audit_log()
    assert verify(log, st.audit_head()).ok
    assert [r.action for r in log if r.action.startswith("policy.provision")][-3:] == [
        "policy.provision",
        "policy.provision",
        "policy.provision.abandoned",
    ]


def test_a_provision_misread_as_not_written_keeps_the_files_of_its_active_version(
    env: Env, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Should the store answer a committed activation with an error (here its read-back made to
    say "not written", as the retry's cancellation was read before), the admin function removes
    the version's files only if the store shows it is not active: it is, so they stay and it is
    answered as provisioned, with no ``.abandoned``/``.failed`` record."""
    from ringfence.clouds.aws import clients

    env.provision_example_policy()
    px = LossyProxy(env.url)
    try:
        monkeypatch.setattr(DynamoStore, "_landed", lambda self, rec: False)
        monkeypatch.setenv("AWS_ENDPOINT_URL_DYNAMODB", px.url)
        clients._clients.clear()
        env.load_functions()
        px.lose = ["500"]
        status, _, answer = env.rest("admin", "POST", "/admin/policies", {"files": _policy_files("v-next")})
    finally:
        monkeypatch.delenv("AWS_ENDPOINT_URL_DYNAMODB")
        clients._clients.clear()
        px.stop()
    # committed, botocore's retry cancelled (read as a lost compare-and-swap), the record alone
    # refused (its id exists)
    assert px.seen == ["200:ok", *["400:TransactionCanceledException"] * 2]
    assert status == 201, answer
    st = env.store
    active = st.active_policy()
    assert active is not None and active.number == answer["version"]
    for key in active.keys.values():
        env.s3.head_object(Bucket=env.bucket, Key=key)
    log = st.audit_log()
    assert [r.action for r in log[-1:]] == ["policy.provision"] and verify(log, st.audit_head()).ok
