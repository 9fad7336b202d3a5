"""What a process's concurrent requests share (``ringfence serve`` answers a fleet from a thread
pool): compute messages sent together go as one (real SQS), a policy is read from the bucket once
however many threads ask for it first (real S3)."""

from __future__ import annotations

import json
import threading
from typing import Any

from ringfence.clouds.aws.wiring import Wiring
from ringfence.control.wiring import Config

from .conftest import Env


def test_compute_messages_sent_while_one_is_in_flight_reach_the_queue_together(env: Env) -> None:
    w = Wiring(Config.from_env())
    real_send = w.sqs.send_message
    first_in, release = threading.Event(), threading.Event()

    def slow_first(**kwargs: Any) -> Any:
        if not first_in.is_set():
            first_in.set()
            assert release.wait(10)
        return real_send(**kwargs)

    w.sqs.send_message = slow_first
    threads = [threading.Thread(target=w.enqueue_compute, args=([f"i-{n:03d}"],)) for n in range(12)]
    threads[0].start()
    assert first_in.wait(10)
    for t in threads[1:]:
        t.start()
    while w._compute_sends.queued < 11:
        threading.Event().wait(0.01)
    release.set()
    for t in threads:
        t.join(10)
    bodies = [json.loads(m["Body"]) for m in env.receive("compute")]
    assert len(bodies) == 2, "the first message, then the eleven that queued behind it in one"
    assert sorted(i for b in bodies for i in b["ids"]) == [f"i-{n:03d}" for n in range(12)]


def test_a_policy_is_read_from_the_bucket_once_however_many_threads_ask_first(env: Env) -> None:
    env.provision_example_policy()
    w = Wiring(Config.from_env())
    reads: list[str] = []
    real_get = w.publisher.get

    def counted(key: str) -> bytes:
        reads.append(key)
        return real_get(key)

    w.publisher.get = counted  # type: ignore[method-assign]
    got: list[Any] = []
    threads = [threading.Thread(target=lambda: got.append(w.active_policy())) for _ in range(16)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(10)
    active = w.store.active_policy()
    assert active is not None and len(got) == 16
    assert sorted(reads) == sorted(active.keys.values()), "each policy file read once"
    assert len({id(policy) for _, policy in got}) == 1, "every thread got the one loaded policy"
    assert w.mapper() is got[0][1].labels
