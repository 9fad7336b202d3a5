"""The SQS poller (ringfence.local.lambdas.deliver_batch) against moto's queues: batches, partial
batch failures kept on the queue, FIFO order across batches, a raising handler, redrive to the DLQ."""

from __future__ import annotations

import gc
import json
import sys
import uuid
import weakref
from typing import Any

from ringfence.local.aws import EmbeddedAws
from ringfence.local.lambdas import LambdaContext, deliver_batch, load_functions, retire_functions


class Recorder:
    """A handler that records the bodies it is given and fails the ones it is told to."""

    def __init__(self, fail: set[int] | None = None, raises: bool = False) -> None:
        self.seen: list[int] = []
        self.fail = fail or set()
        self.raises = raises

    def __call__(self, event: dict[str, Any], context: LambdaContext) -> dict[str, Any]:
        assert context.get_remaining_time_in_millis() > 0
        if self.raises:
            raise RuntimeError("boom")
        failures = []
        for rec in event["Records"]:
            n = json.loads(rec["body"])["n"]
            self.seen.append(n)
            assert rec["eventSource"] == "aws:sqs" and rec["attributes"]["ApproximateReceiveCount"]
            if n in self.fail:
                failures.append({"itemIdentifier": rec["messageId"]})
                self.fail.discard(n)  # fails once
        return {"batchItemFailures": failures}


def send(aws: EmbeddedAws, queue: str, n: int) -> None:
    sqs = aws.client("sqs")
    fifo = queue == "compute"
    for i in range(n):
        extra = {"MessageGroupId": "compute", "MessageDeduplicationId": uuid.uuid4().hex} if fifo else {}
        sqs.send_message(QueueUrl=aws.queues[queue], MessageBody=json.dumps({"n": i}), **extra)


def deliver(aws: EmbeddedAws, queue: str, handler: Any, **kw: Any) -> Any:
    return deliver_batch(
        aws.client("sqs"), aws.queues[queue], aws.queue_arn(queue), handler, region=aws.region, name=queue, **kw
    )


def test_fifo_order_across_batches_and_a_failed_record_comes_back_first(aws: EmbeddedAws) -> None:
    send(aws, "compute", 25)
    h = Recorder(fail={12})
    first = deliver(aws, "compute", h)
    assert [json.loads(m["Body"])["n"] for m in first.messages] == list(range(10))
    assert first.failed == set() and first.received_at <= first.done_at
    second = deliver(aws, "compute", h, retry_after=0)
    assert len(second.failed) == 1
    third = deliver(aws, "compute", h)
    assert json.loads(third.messages[0]["Body"])["n"] == 12, "the failed message is redelivered, in its place"
    while deliver(aws, "compute", h) is not None:
        pass
    # 13..19 were reported processed (a FIFO handler should fail everything after a failure; compute
    # fails whole batches): only 12 comes back, before anything later in the group
    assert h.seen == [*range(20), 12, *range(20, 25)]
    assert deliver(aws, "compute", h) is None


def test_a_raising_handler_keeps_the_whole_batch(aws: EmbeddedAws) -> None:
    send(aws, "ingest", 3)
    d = deliver(aws, "ingest", Recorder(raises=True), retry_after=0)
    assert d.error == "RuntimeError: boom" and len(d.failed) == 3
    h = Recorder()
    deliver(aws, "ingest", h)
    assert sorted(h.seen) == [0, 1, 2]


def test_a_message_that_keeps_failing_is_redriven_to_the_dlq(aws: EmbeddedAws) -> None:
    send(aws, "lifecycle", 1)
    for _ in range(3):  # the lifecycle queue's maxReceiveCount
        d = deliver(aws, "lifecycle", Recorder(fail={0}), retry_after=0)
        assert d is not None and d.failed
    assert deliver(aws, "lifecycle", Recorder()) is None
    dlq = aws.client("sqs").receive_message(QueueUrl=aws.queues["lifecycle_dlq"])["Messages"]
    assert [json.loads(m["Body"])["n"] for m in dlq] == [0]


def test_retired_containers_stop_their_agent_api_change_watch(aws: EmbeddedAws) -> None:
    """A retired container's wiring is closed: the agent API's change watch, started by a waiting
    long-poll, stops at once instead of polling the store after its AWS is reset or stopped."""
    fns = load_functions(["agentapi", "ingest"])
    changes = fns["agentapi"].api().w.changes
    changes.wait(0)
    changes.wait(0.05)  # waited: the watch runs
    watcher = changes._watcher
    assert watcher is not None and watcher.is_alive()
    fns["ingest"]._setup()  # a container holding its wiring bare (not inside a service)
    retire_functions(fns.values())
    watcher.join(10)
    assert not watcher.is_alive() and changes._watcher is None


def test_a_retired_container_is_garbage(aws: EmbeddedAws) -> None:
    """Retired containers leave nothing that keeps them alive: a process that cold-starts handlers
    again and again (the router's containers, the test suite) does not grow with each one."""
    fns = load_functions(["agentapi", "ingest", "compute", "publish"])
    fns["agentapi"].api().w.changes.wait(0)  # a used wiring, as a served container holds
    fns["ingest"]._setup()
    names = [m.__name__ for m in fns.values()]
    refs = [weakref.ref(m) for m in fns.values()]
    assert all(n in sys.modules for n in names)
    retire_functions(fns.values())
    del fns
    gc.collect()
    assert not any(n in sys.modules for n in names)
    assert [r() for r in refs] == [None] * len(refs)
