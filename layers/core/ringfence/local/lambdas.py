"""Invoking the real handlers in ``functions/`` as Lambda invokes them, in this process.

- :func:`load_functions` imports ``functions/<name>/app.py`` as fresh modules (one "container"
  each: module-level state such as a warm engine lives as long as the module); a function named
  in :data:`FUNCTION_ENVIRONMENT` runs with that environment on top of the process's (as Lambda
  gives each function its own: the signing key reaches compute only);
- :func:`retire_functions` ends them (their wirings closed), as Lambda retires a container;
- :class:`LambdaContext` is the context object the handlers (and Powertools) read;
- :func:`sqs_event` and :func:`deliver_batch` do what Lambda's SQS event-source mapping does:
  receive up to a batch, invoke with ``{"Records": [...]}``, delete what succeeded, leave the
  reported failures (``batchItemFailures``; every record when the handler raises) to become
  visible again — after the queue's visibility timeout on AWS, after ``retry_after`` here — until
  the queue's redrive policy moves them to its dead-letter queue.
"""

from __future__ import annotations

import functools
import importlib.util
import logging
import math
import sys
import time
import uuid
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path
from types import ModuleType
from typing import Any

from ringfence.control.wiring import FUNCTION_ENV

log = logging.getLogger("ringfence.local")

FUNCTIONS = ("ingest", "compute", "publish", "lifecycle", "reconcile", "agentapi", "admin", "wsconnect", "perimeter")

# function name → the variables only that function's invocations see (``ringfence.clouds.aws.
# wiring.FUNCTION_ENV``), never put in the process environment. The embedded AWS registers
# compute's and publish's RINGFENCE_SIGNING_KEY here (template.yaml gives it to ComputeFunction and
# PublishFunction alone), compute's RINGFENCE_PUBLISH_QUEUE_URL and the priority lane's senders'
# (admin, ingest, lifecycle, reconcile) RINGFENCE_COMPUTE_PRIORITY_QUEUE_URL.
FUNCTION_ENVIRONMENT: dict[str, dict[str, str]] = {}


def _with_environment(handler: Any, extra: dict[str, str]) -> Any:
    @functools.wraps(handler)
    def invoke(event: Any, context: Any) -> Any:
        token = FUNCTION_ENV.set(dict(extra))
        try:
            return handler(event, context)
        finally:
            FUNCTION_ENV.reset(token)

    return invoke


def functions_dir() -> Path:
    """``functions/`` of the source tree this package runs from (the demo and tests run from it)."""
    here = Path(__file__).resolve()
    for parent in here.parents:
        if (parent / "functions" / "compute" / "app.py").is_file():
            return parent / "functions"
    raise FileNotFoundError(
        f"functions/ not found above {here}: the embedded control plane runs the handlers from a source checkout"
    )


@dataclass
class LambdaContext:
    function_name: str = "ringfence-local"
    memory_limit_in_mb: int = 512
    invoked_function_arn: str = "arn:aws:lambda:ca-central-1:123456789012:function:ringfence-local"
    aws_request_id: str = field(default_factory=lambda: str(uuid.uuid4()))
    timeout_s: float = 60.0
    started: float = field(default_factory=time.monotonic)

    def get_remaining_time_in_millis(self) -> int:
        return max(int((self.timeout_s - (time.monotonic() - self.started)) * 1000), 0)


def load_functions(
    names: Iterable[str] = FUNCTIONS, directory: Path | None = None, *, keep_clients: bool = False
) -> dict[str, ModuleType]:
    """Import each ``functions/<name>/app.py`` as a new module (cold start). Reads the process
    environment, so the embedded AWS must have set it; cached boto3 clients are dropped first
    (kept with ``keep_clients``: another container of a function already loaded, same AWS)."""
    from ringfence.clouds.aws import clients

    if not keep_clients:
        clients.reset()
    base = directory or functions_dir()
    out: dict[str, ModuleType] = {}
    for name in names:
        path = base / name / "app.py"
        if not path.exists():
            continue
        mod_name = f"rf_fn_{name}_{uuid.uuid4().hex[:6]}"
        spec = importlib.util.spec_from_file_location(mod_name, path)
        if spec is None or spec.loader is None:
            raise ImportError(f"cannot load handler {path}")
        mod = importlib.util.module_from_spec(spec)
        sys.modules[mod_name] = mod
        spec.loader.exec_module(mod)
        if name in FUNCTION_ENVIRONMENT and hasattr(mod, "handler"):
            vars(mod)["handler"] = _with_environment(mod.handler, FUNCTION_ENVIRONMENT[name])
        out[name] = mod
    return out


def retire_functions(functions: Iterable[ModuleType]) -> None:
    """The containers of :func:`load_functions` are done (their AWS is reset or stopping): every
    wiring their services hold (``_svc``) is closed, so nothing of theirs keeps polling the store
    in the background (the agent API's change watch), and each module leaves ``sys.modules``, so
    the container (its engine, caches and clients) is garbage once the caller lets go of it. A
    process that cold-starts containers again and again (the test suite) grew by ~3 GB without."""
    for mod in functions:
        for svc in list(getattr(mod, "_svc", {}).values()):
            wiring = getattr(svc, "w", svc)  # the services keep theirs as ``w``; ingest keeps it bare
            close = getattr(wiring, "close", None)
            if callable(close):
                close()
        if sys.modules.get(mod.__name__) is mod:
            del sys.modules[mod.__name__]


def sqs_event(messages: list[dict[str, Any]], arn: str, region: str) -> dict[str, Any]:
    """The Lambda event for SQS messages as ``ReceiveMessage(AttributeNames=[All])`` returned them."""
    now = str(int(time.time() * 1000))
    recs = []
    for m in messages:
        attrs = {
            "ApproximateReceiveCount": "1",
            "SentTimestamp": now,
            "SenderId": "AIDAEXAMPLE",
            "ApproximateFirstReceiveTimestamp": now,
        }
        attrs.update(m.get("Attributes", {}))
        if arn.endswith(".fifo"):
            attrs.setdefault("MessageGroupId", "compute")
            attrs.setdefault("MessageDeduplicationId", m["MessageId"])
            attrs.setdefault("SequenceNumber", "1")
        recs.append(
            {
                "messageId": m["MessageId"],
                "receiptHandle": m["ReceiptHandle"],
                "body": m["Body"],
                "attributes": attrs,
                "messageAttributes": {
                    k: {
                        "stringValue": v.get("StringValue"),
                        "binaryValue": v.get("BinaryValue"),
                        "stringListValues": [],
                        "binaryListValues": [],
                        "dataType": v.get("DataType", "String"),
                    }
                    for k, v in m.get("MessageAttributes", {}).items()
                },
                "md5OfBody": m["MD5OfBody"],
                "eventSource": "aws:sqs",
                "eventSourceARN": arn,
                "awsRegion": region,
            }
        )
    return {"Records": recs}


@dataclass
class Delivery:
    """One invocation by the SQS poller: what was received, what failed, how long it took."""

    queue: str
    messages: list[dict[str, Any]]
    failed: set[str]  # message ids left on the queue
    received_at: float  # wall clock
    done_at: float
    result: dict[str, Any] | None = None  # what the handler returned
    error: str | None = None  # the handler raised (every record failed)

    @property
    def succeeded(self) -> list[dict[str, Any]]:
        return [m for m in self.messages if m["MessageId"] not in self.failed]


def deliver_batch(
    sqs: Any,
    queue_url: str,
    arn: str,
    handler: Any,
    *,
    region: str,
    batch_size: int = 10,
    retry_after: float = 0.0,
    name: str = "",
    wait_seconds: int = 0,
) -> Delivery | None:
    """Receive one batch from ``queue_url`` and hand it to ``handler`` as Lambda's SQS poller does.
    ``None`` when the queue had nothing visible (within ``wait_seconds``, a long poll: Lambda's
    pollers long-poll too)."""
    out = sqs.receive_message(
        QueueUrl=queue_url,
        MaxNumberOfMessages=batch_size,
        AttributeNames=["All"],
        MessageAttributeNames=["All"],
        WaitTimeSeconds=wait_seconds,
    )
    msgs: list[dict[str, Any]] = list(out.get("Messages", []))
    if not msgs:
        return None
    received = time.time()
    error, result = None, None
    try:
        result = handler(sqs_event(msgs, arn, region), LambdaContext(function_name=name or "ringfence-local"))
        failed = {str(f["itemIdentifier"]) for f in (result or {}).get("batchItemFailures", [])}
    except Exception as exc:  # the invocation failed: Lambda retries the whole batch
        log.exception("handler for %s raised: the whole batch stays on the queue", name or queue_url)
        failed = {m["MessageId"] for m in msgs}
        error = f"{type(exc).__name__}: {exc}"
    ok = [m for m in msgs if m["MessageId"] not in failed]
    for i in range(0, len(ok), 10):
        sqs.delete_message_batch(
            QueueUrl=queue_url,
            Entries=[{"Id": str(n), "ReceiptHandle": m["ReceiptHandle"]} for n, m in enumerate(ok[i : i + 10])],
        )
    for m in msgs:
        if m["MessageId"] in failed:  # visible again after "the visibility timeout"
            sqs.change_message_visibility(
                QueueUrl=queue_url, ReceiptHandle=m["ReceiptHandle"], VisibilityTimeout=math.ceil(retry_after)
            )
    return Delivery(name or queue_url, msgs, failed, received, time.time(), result, error)
