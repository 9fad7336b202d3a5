"""moto in a process of its own, with Ringfence's extensions, for :class:`ringfence.local.aws.EmbeddedAws`.

Why a process: moto is pure Python. Run on a thread of the demo's process, every AWS call a
handler makes waited for the GIL held by the other handlers, the router and compute (a GetItem
took ~4 ms on an idle moto and ~150 ms beside busy threads), which is what the time-to-policy
figures measured. In its own process moto answers at its own pace, as AWS would.

The extensions (:mod:`moto_lifecycle`, :mod:`moto_trail`) patch moto's models, so they are
installed here; what the event router reads from them (the trail's records, the lifecycle actions
waiting with their tokens — AWS hands both out only as events) is served on two extra paths
(and one for what a WebSocket client would have received),
next to moto's own ``/moto-api/``:

- ``GET /_ringfence/trail?account=A&region=R&since=SEQ`` → ``[{"seq": n, "detail": {...}}, ...]``
- ``GET /_ringfence/lifecycle-actions?account=A&region=R`` → ``[{<PendingAction fields>,
  "remaining": seconds until the hook's default result}, ...]``
- ``GET /_ringfence/connection-data?account=A&region=R&connection=C`` → ``{"data": base64}``:
  what was posted to a WebSocket connection (``PostToConnection``), which AWS delivers to the
  client and moto keeps.
- ``GET /_ringfence/changes?after=N&wait=S`` → ``{"seq": n}``: the count of calls that changed
  instances, their tags or Auto Scaling groups (:mod:`moto_changes`), answered once it is above
  ``N`` or after ``S`` seconds (at most 5), so a watcher looks when there is news.
- ``GET /_ringfence/instances?account=A&region=R`` → ``{"instances": [{"id", "state", "private_ip",
  "tags"}], "groups": [{"name", "arn", "members": [{"id", "lifecycle_state"}]}]}``: what the event
  router and the lab's hypervisor look at, read from moto's models. Both looked with
  DescribeInstances of every instance whenever moto changed; serialising that XML was most of
  what moto did during a 50-instance scale-out (a lab cost: in AWS, EventBridge and the
  hypervisor read the cloud's own state).
- ``GET /_ringfence/calls`` → ``{"service.Action": [count, seconds], ...}``: every call moto
  answered so far and the time it spent in each (its own work, serialisation included), so a
  benchmark can say which calls a run's time went to.

Run as ``python -m ringfence.local.motoproc [--host 127.0.0.1] [--port 0]``: it prints
``port <n>`` once serving and exits when its standard input closes (so it never outlives the
process that started it, even one killed with SIGKILL) or on SIGTERM.
"""

from __future__ import annotations

import argparse
import base64
import dataclasses
import json
import logging
import os
import signal
import sys
import threading
import time
from collections.abc import Callable, Iterable, Iterator, Mapping
from typing import Any
from urllib.parse import parse_qs

from . import moto_changes, moto_lifecycle, moto_trail

PREFIX = "/_ringfence/"
WORKER_THREADS = 128  # waitress's pool: every long-poll holds one while it waits

StartResponse = Callable[[str, list[tuple[str, str]]], Any]
Wsgi = Callable[[dict[str, Any], StartResponse], Iterable[bytes]]


def _trail(q: dict[str, str]) -> list[dict[str, Any]]:
    recs = moto_trail.records_since(q["account"], q["region"], int(q.get("since", "0")))
    return [{"seq": r.seq, "detail": r.detail} for r in recs]


def _lifecycle_actions(q: dict[str, str]) -> list[dict[str, Any]]:
    now = time.monotonic()
    out = []
    for a in moto_lifecycle.pending_actions(q["account"], q["region"]):
        d = dataclasses.asdict(a)
        d["remaining"] = a.deadline - now  # monotonic clocks differ between processes
        del d["deadline"]
        out.append(d)
    return out


def _connection_data(q: dict[str, str]) -> dict[str, Any]:
    from moto.apigatewaymanagementapi.models import apigatewaymanagementapi_backends

    conn = apigatewaymanagementapi_backends[q["account"]][q["region"]].connections[q["connection"]]
    return {"data": base64.b64encode(conn.data).decode()}


def _changes(q: dict[str, str]) -> dict[str, Any]:
    return {"seq": moto_changes.wait_after(int(q.get("after", "-1")), min(float(q.get("wait", "0")), 5.0))}


def _private_ip(instance: Any) -> str | None:
    try:
        return str(instance.private_ip_address) if instance.private_ip_address else None
    except (LookupError, AttributeError):  # an instance whose primary interface is gone has none
        return None


def _instances(q: dict[str, str]) -> dict[str, Any]:
    from moto.autoscaling.models import autoscaling_backends
    from moto.ec2.models import ec2_backends

    ec2 = ec2_backends[q["account"]][q["region"]]
    asg = autoscaling_backends[q["account"]][q["region"]]
    # copies first: moto's request threads change these dicts while this one reads them
    instances = [i for r in list(ec2.reservations.values()) for i in list(r.instances)]
    return {
        "instances": [
            {
                "id": i.id,
                "state": i._state.name,
                "private_ip": _private_ip(i),
                "tags": dict(ec2.tags.get(i.id, {})),
            }
            for i in instances
        ],
        "groups": [
            {
                "name": g.name,
                "arn": g.arn,
                "members": [
                    {"id": m.instance.id, "lifecycle_state": m.lifecycle_state} for m in list(g.instance_states)
                ],
            }
            for g in list(asg.autoscaling_groups.values())
        ],
    }


_calls: dict[str, list[float]] = {}  # "service.Action" → [count, seconds]
_calls_lock = threading.Lock()


def count_calls() -> None:
    """Account every call moto's responses answer (see ``/_ringfence/calls``)."""
    from moto.core.responses import BaseResponse

    orig = BaseResponse.call_action

    def call_action(self: Any) -> Any:
        t = time.perf_counter()
        try:
            return orig(self)
        finally:
            key = f"{getattr(self, 'service_name', '?')}.{self._get_action()}"
            spent = time.perf_counter() - t
            with _calls_lock:
                c = _calls.setdefault(key, [0, 0.0])
                c[0] += 1
                c[1] += spent

    BaseResponse.call_action = call_action  # type: ignore[method-assign]


def _calls_route(q: dict[str, str]) -> dict[str, list[float]]:
    with _calls_lock:
        return {k: [v[0], round(v[1], 4)] for k, v in _calls.items()}


ROUTES: dict[str, Callable[[dict[str, str]], Any]] = {
    "calls": _calls_route,
    "changes": _changes,
    "trail": _trail,
    "lifecycle-actions": _lifecycle_actions,
    "connection-data": _connection_data,
    "instances": _instances,
}


def with_length(moto_app: Wsgi) -> Wsgi:
    """moto's answers with a Content-Length: some come without one, and an HTTP/1.1 server must
    then end the body by closing the connection (waitress does), leaving the client's pooled
    connection half-closed. moto builds every answer in memory, so nothing streams here."""

    def app(environ: dict[str, Any], start_response: StartResponse) -> Iterable[bytes]:
        answered: list[tuple[str, list[tuple[str, str]]]] = []

        def write(data: bytes) -> None:  # WSGI's legacy write(): Flask (moto) never uses it
            raise NotImplementedError("write() of a WSGI answer")

        def capture(status: str, headers: list[tuple[str, str]], exc_info: Any = None) -> Any:
            answered[:] = [(status, list(headers))]
            return write

        chunks = moto_app(environ, capture)
        try:
            body = b"".join(chunks)
        finally:
            if hasattr(chunks, "close"):
                chunks.close()
        status, headers = answered[0]
        code = int(status.split()[0])
        bodiless = environ.get("REQUEST_METHOD") == "HEAD" or code < 200 or code in (204, 304)
        if not bodiless and not any(k.lower() == "content-length" for k, _ in headers):
            headers.append(("Content-Length", str(len(body))))
        start_response(status, headers)
        return [body]

    return app


def with_extensions(moto_app: Wsgi) -> Wsgi:
    """moto's WSGI app, with the extension paths answered before moto's dispatcher sees them."""

    def app(environ: dict[str, Any], start_response: StartResponse) -> Iterable[bytes]:
        path = str(environ.get("PATH_INFO", ""))
        if not path.startswith(PREFIX):
            if path == "/moto-api/reset":  # every instance and group gone: news for the watchers
                try:
                    return moto_app(environ, start_response)
                finally:
                    moto_changes.bump()
            return moto_app(environ, start_response)
        route = ROUTES.get(path[len(PREFIX) :])
        q = {k: v[-1] for k, v in parse_qs(str(environ.get("QUERY_STRING", ""))).items()}
        try:
            if route is None:
                raise LookupError(f"no such extension path: {path}")
            status, body = "200 OK", json.dumps(route(q)).encode()
        except (LookupError, ValueError) as e:  # a missing parameter, an unknown account/region
            status, body = "400 Bad Request", json.dumps({"error": f"{type(e).__name__}: {e}"}).encode()
        start_response(status, [("Content-Type", "application/json"), ("Content-Length", str(len(body)))])
        return [body]

    return app


# Services whose moto backend follows from the request's signing scope and the few environ fields
# in :func:`_dispatch_key` alone (moto's ``infer_service_region_host``: no path or body sniffing).
_SCOPE_ROUTED = frozenset(
    {
        "apigateway", "autoscaling", "dynamodb", "ec2", "events", "execute-api", "iam", "kms", "lambda",
        "logs", "monitoring", "s3", "scheduler", "secretsmanager", "sqs", "ssm", "sts",
    }
)  # fmt: skip


def _dispatch_key(environ: dict[str, Any]) -> tuple[str, ...] | None:
    """What moto's dispatcher decides a signed request's backend by, for the services above;
    ``None`` for anything else (moto decides, uncached)."""
    path = str(environ.get("PATH_INFO", ""))
    if path.startswith(("/moto-api", "/latest/", "/favicon")):
        return None
    try:
        _, _, region, service, _ = str(environ["HTTP_AUTHORIZATION"]).split(",")[0].split()[1].split("/")
    except (KeyError, IndexError, ValueError):
        return None
    if service.lower() not in _SCOPE_ROUTED:
        return None
    target = str(environ.get("HTTP_X_AMZ_TARGET", "")).split(".")[0]  # DynamoDB vs its Streams, API version
    s3control = path.startswith("/v20180820/") or "s3-control" in str(environ.get("HTTP_HOST", ""))
    return (service, region, target, str(path.startswith("/@connections")), str(s3control))


class MemoizedDispatch:
    """moto's :class:`DomainDispatcherApplication`, with the backend app it picks remembered per
    :func:`_dispatch_key`. Why: moto picks it for every request under one lock, matching the host
    it infers against every backend's URL patterns (hundreds of regular expressions); with a dozen
    handler threads calling at once, a py-spy profile of a 10-instance scale-out found 80 % of
    moto's threads queued on that lock (its holder waiting for the GIL), so every call took
    ~100 ms. The first request of each key still goes through moto's own choice, and
    ``tests/local/test_motoproc.py`` checks that the remembered app is the one moto picks."""

    def __init__(self, dispatcher: Any) -> None:
        self.dispatcher = dispatcher
        self._chosen: dict[tuple[str, ...], Any] = {}

    def application(self, environ: dict[str, Any]) -> Any:
        key = _dispatch_key(environ)
        backend_app = self._chosen.get(key) if key is not None else None
        if backend_app is None:
            backend_app = self.dispatcher.get_application(environ)
            if key is not None:
                self._chosen[key] = backend_app
        return backend_app

    def __call__(self, environ: dict[str, Any], start_response: StartResponse) -> Iterable[bytes]:
        return self.application(environ)(environ, start_response)  # type: ignore[no-any-return]


def cache_event_paths() -> None:
    """moto's EventBridge, made to parse each JSONPath once. For every event and every target of a
    matching rule, moto parses the target's input paths with ``jsonpath_ng.ext.parse``, which
    builds a new yacc parser each time: ~9 ms of moto's CPU per event delivered, a PutEvents of
    ten entries ~90 ms, the largest share of moto's work in a 50-instance scale-out. The paths
    are a handful of constants (``$.detail``, …) and a parsed path is only read afterwards, so
    one parse each is kept."""
    import functools

    import jsonpath_ng.ext as ext  # moto.events.utils imports ``parse`` from here at every call

    if getattr(ext.parse, "_ringfence_cached", False):  # type: ignore[attr-defined]
        return
    cached = functools.lru_cache(maxsize=512)(ext.parse)  # type: ignore[attr-defined]
    cached._ringfence_cached = True  # type: ignore[attr-defined]
    ext.parse = cached  # type: ignore[attr-defined]


def cheap_bookkeeping() -> None:
    """Per-request costs of moto's that scale with nothing a test needs, found in py-spy profiles
    of the moto process during a 50-instance scale-out (its one core was the lab's limit):

    * SQS checked each message it hands out against the queue's retention period by computing
      *every* attribute of the queue — counting its in-flight messages among them — once per
      message and per attribute: a quarter of moto's CPU went to ``ReceiveMessage`` and
      ``GetQueueAttributes``. The check reads the one attribute here (the same rule).
    * SQS's ``SendMessage`` read ``ContentBasedDeduplication`` from that same whole-queue
      attribute dict, up to three times per message: three quarters of ``PutEvents``' time
      (each event sent to its queue target) went to counting queues' messages. A queue's
      attributes are now a read-only mapping that computes each attribute when it is read
      (:class:`_QueueAttributes`, the same values).
    * Every response looked up its handler class's method names with ``inspect.getmembers``;
      a class's methods do not change while the server runs, so they are looked up once."""
    import functools

    import moto.core.responses as responses
    from moto.core.utils import method_names_from_class, unix_time
    from moto.sqs.models import Message, Queue, SQSBackend

    def within_retention(self: Any, queue_name: str, message: Message) -> bool:
        retention = int(self.get_queue(queue_name).message_retention_period)
        return bool(retention + message.sent_timestamp / 1000 > unix_time())  # type: ignore[operator]

    SQSBackend.is_message_valid_based_on_retention_period = within_retention  # type: ignore[method-assign]
    Queue.attributes = property(_QueueAttributes)  # type: ignore[assignment,method-assign]
    responses.method_names_from_class = functools.lru_cache(maxsize=None)(method_names_from_class)  # type: ignore[attr-defined]


def plain_attribute_values() -> None:
    """moto's DynamoDB answers, serialised without walking every attribute value through its
    shape. moto's JSON serialiser looks each of an ``AttributeValue``'s ten members up under
    several spellings (aliases, ``xform_name``) for every attribute of every item answered:
    about half of moto's DynamoDB time in a 50-instance scale-out, whose ``UpdateItem`` and
    ``BatchGetItem`` answers hold whole items. An attribute value moto hands the serialiser is
    already in the wire form (``{"S": "..."}``), so one made only of strings, booleans, string
    sets, lists and maps is written as it is; anything else (binary values, a value with more or
    other keys) still goes through moto's walk. A test holds the two to the same JSON."""
    from moto.core.serialize import JSONSerializer

    original = JSONSerializer._serialize_type_structure
    if getattr(original, "_ringfence_plain", False):
        return

    def serialize_structure(self: Any, serialized: Any, value: Any, shape: Any, key: str) -> None:
        dynamodb = key and shape.name == "AttributeValue" and self.service_model.service_name == "dynamodb"
        if dynamodb and _in_wire_form(value):
            serialized[self.get_serialized_name(shape, key)] = value
            return
        original(self, serialized, value, shape, key)

    serialize_structure._ringfence_plain = True  # type: ignore[attr-defined]
    JSONSerializer._serialize_type_structure = serialize_structure  # type: ignore[method-assign]


def _in_wire_form(value: Any) -> bool:
    """Whether ``value`` is a DynamoDB attribute value that moto's serialiser would copy unchanged
    (else the serialiser must walk it)."""
    if type(value) is not dict or len(value) != 1:
        return False
    ((kind, inner),) = value.items()
    if kind in ("S", "N"):
        return type(inner) is str
    if kind in ("BOOL", "NULL"):
        return type(inner) is bool
    if kind in ("SS", "NS"):
        return type(inner) is list and all(type(x) is str for x in inner)
    if kind == "M":
        return type(inner) is dict and all(_in_wire_form(member) for member in inner.values())
    if kind == "L":
        return type(inner) is list and all(_in_wire_form(item) for item in inner)
    return False


class _QueueAttributes(Mapping[str, Any]):
    """moto's ``Queue.attributes`` (the same keys and values), each computed when read: moto
    builds the whole dict, message counts included, where it reads one attribute."""

    def __init__(self, queue: Any) -> None:
        self._q = queue

    def _names(self) -> list[str]:
        q = self._q
        names = list(q.BASE_ATTRIBUTES)
        if q.fifo_queue:
            names += q.FIFO_ATTRIBUTES
        if q.kms_master_key_id:
            names += q.KMS_ATTRIBUTES
        return names

    def __getitem__(self, name: str) -> Any:
        from moto.core.utils import camelcase_to_underscores

        if name not in self._names():
            raise KeyError(name)
        value = getattr(self._q, camelcase_to_underscores(name))
        if name == "RedrivePolicy" and value:
            return json.dumps(value)
        return str(value).lower() if isinstance(value, bool) else value

    def __iter__(self) -> Iterator[str]:
        return iter(self._names())

    def __len__(self) -> int:
        return len(self._names())


def serialise_transactions() -> None:
    """moto's DynamoDB ``TransactWriteItems``, one at a time and without a copy of every table.

    moto snapshots each table a transaction touches with ``copy.deepcopy`` (to roll back by
    putting the copy in the table's place) while other request threads write to it. Under the
    lab's concurrency that raised "dictionary changed size during iteration" (766 server errors in
    one bench run) and could lose writes; and the audit table, which every audited action writes
    with a transaction (:meth:`ringfence.store.dynamodb.DynamoStore.audit`), is copied whole on each
    one, so a bench grew moto past 6 GB. Here transactions run one at a time, every condition is
    checked first, and only a transaction whose conditions all hold is applied, with the same
    backend calls moto makes (DynamoDB's own all-or-nothing, without the copy). What this does
    not handle (a key of the wrong shape, a missing table) goes to moto's own code."""
    from moto.dynamodb.comparisons import get_filter_expression
    from moto.dynamodb.exceptions import TransactionCanceledException
    from moto.dynamodb.models import DynamoDBBackend

    orig = DynamoDBBackend.transact_write_items
    if getattr(orig, "_ringfence_serialised", False):
        return
    lock = threading.Lock()

    def planned(self: Any, transact_items: list[dict[str, Any]]) -> list[tuple[str, dict[str, Any], Any]] | None:
        """Each operation with its key and whether its condition holds; None: leave it to moto."""
        out = []
        keys = set()
        for item in transact_items:
            if len(item) != 1:
                return None
            op_type, op = next(iter(item.items()))
            if op_type not in ("ConditionCheck", "Put", "Delete", "Update"):
                return None
            table = self.get_table(op["TableName"])
            if op_type == "Put":
                attrs = op["Item"]
                key = {table.hash_key_attr: attrs[table.hash_key_attr]}
                if table.range_key_attr is not None:
                    key[table.range_key_attr] = attrs[table.range_key_attr]
            else:
                key = op["Key"]
            unique = (op["TableName"], json.dumps(key, sort_keys=True, default=str))
            if unique in keys:
                return None  # moto raises the right error for two operations on one item
            keys.add(unique)
            cond = op.get("ConditionExpression")
            holds = cond is None or get_filter_expression(
                cond, op.get("ExpressionAttributeNames"), op.get("ExpressionAttributeValues")
            ).expr(self.get_item(op["TableName"], key))
            out.append((op_type, op, key if holds else None))
        return out

    def transact_write_items(self: Any, transact_items: list[dict[str, Any]]) -> Any:
        with lock:
            try:
                ops = planned(self, transact_items) if len(transact_items) <= 100 else None
            except Exception:  # moto's own code reports what is wrong
                ops = None
            if ops is None:
                return orig(self, transact_items)
            if any(key is None for _, _, key in ops):
                raise TransactionCanceledException(
                    [
                        (None, None, None)
                        if key is not None
                        else ("ConditionalCheckFailed", "The conditional request failed", None)
                        for _, _, key in ops
                    ]
                )
            for op_type, op, key in ops:
                names, values = op.get("ExpressionAttributeNames"), op.get("ExpressionAttributeValues")
                if op_type == "Put":
                    self.put_item(op["TableName"], op["Item"])
                elif op_type == "Delete":
                    self.delete_item(op["TableName"], key)
                elif op_type == "Update":
                    self.update_item(
                        op["TableName"],
                        key,
                        update_expression=op["UpdateExpression"],
                        expression_attribute_names=names,
                        expression_attribute_values=values,
                    )
            return None

    transact_write_items._ringfence_serialised = True  # type: ignore[attr-defined]
    DynamoDBBackend.transact_write_items = transact_write_items  # type: ignore[method-assign]


def one_dynamodb_request_at_a_time() -> None:
    """moto's DynamoDB answers one request at a time, as DynamoDB applies each item's writes whole.

    moto's ``UpdateItem`` reads the item, checks the condition, and then creates the item (a
    new item *replacing* whatever is stored under the key) or changes it in place; ``PutItem``
    checks its condition and then stores. Two requests on one item from request threads of their
    own interleave: two first writes of one key both find it missing and the later creation
    drops what the other wrote meanwhile, and two conditional writes both pass their condition.
    Compute records each launch action of an instance in its hold on threads of its own (one per
    launch hook, the first writes of a fresh item): one action vanished from the hold, its claim
    failed and it was left to time out (one CI run, pytest -n 4). DynamoDB never does that, so
    the lab must not. moto's DynamoDB is pure Python, its work holding the GIL anyway, so one
    request at a time should cost little (not measured by a bench run yet). Transactions go
    through here too (and then :func:`serialise_transactions`)."""
    from moto.dynamodb.responses import DynamoHandler

    orig = DynamoHandler.call_action
    if getattr(orig, "_ringfence_one_at_a_time", False):
        return
    lock = threading.Lock()

    def call_action(self: Any) -> Any:
        with lock:
            return orig(self)

    call_action._ringfence_one_at_a_time = True  # type: ignore[attr-defined]
    DynamoHandler.call_action = call_action  # type: ignore[method-assign]


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m ringfence.local.motoproc", description=__doc__.splitlines()[0])
    ap.add_argument("--host", default="127.0.0.1", help="address to bind (default: 127.0.0.1)")
    ap.add_argument("--port", type=int, default=0, help="port to bind (default: 0, a free one)")
    args = ap.parse_args(argv)

    # No public AMI catalog: moto loads its 1,290 into every region's EC2 backend after each reset
    # (~0.1-0.3 s a reset) and an unfiltered DescribeImages serialised them all (~2 s). The lab
    # launches from an image of its own (``estate.lab_image``).
    os.environ.setdefault("MOTO_EC2_LOAD_DEFAULT_AMIS", "false")
    from moto.moto_server.werkzeug_app import DomainDispatcherApplication, create_backend_app
    from waitress.server import create_server

    count_calls()  # first: the other extensions wrap what it wraps, and are counted with it
    moto_lifecycle.install()
    moto_trail.install()
    moto_changes.install()
    serialise_transactions()
    one_dynamodb_request_at_a_time()
    cache_event_paths()
    cheap_bookkeeping()
    plain_attribute_values()

    app = with_extensions(with_length(MemoizedDispatch(DomainDispatcherApplication(create_backend_app))))
    # waitress, not moto's werkzeug server: werkzeug closes every connection after its answer
    # ("Connection: close" always), so each AWS call of the lab was a TCP connection and a new
    # thread of moto's; waitress keeps clients' connections alive and answers from a pool. The
    # pool outnumbers the long-polls that hold a thread each (SQS ReceiveMessage, the changes
    # path); clients' pools (64 connections per botocore client) fit the connection limit.
    server = create_server(
        app,
        host=args.host,
        port=args.port,
        threads=WORKER_THREADS,
        connection_limit=4096,
        asyncore_use_poll=True,  # select() stops at descriptor 1024
        channel_timeout=600,
        ident="moto",
    )
    logging.getLogger("waitress").setLevel(logging.ERROR)  # "task queue depth" warnings under a storm

    def stop(*_: object) -> None:
        # at once: moto's state dies with the process anyway, and an orderly interpreter exit
        # took ~2 s (0.4 s of it CPU) after waitress's loop ended, which every stop waited for
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(0)

    signal.signal(signal.SIGTERM, stop)

    def watch_parent() -> None:
        sys.stdin.buffer.read()  # returns at EOF: the parent closed the pipe, or died
        os.kill(os.getpid(), signal.SIGTERM)

    threading.Thread(target=watch_parent, name="parent-watch", daemon=True).start()
    print(f"port {server.effective_port}", flush=True)
    server.run()
    return 0


if __name__ == "__main__":
    sys.exit(main())
