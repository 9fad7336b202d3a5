"""What a process's concurrent requests share (``ringfence serve`` answers a fleet from a thread
pool): compute messages sent together go as one (real SQS), a policy is read from the bucket once
however many threads ask for it first (real S3), enrollments that come together are checked
with EC2 in one DescribeInstances call (real EC2 API)."""

from __future__ import annotations

import json
import threading
from typing import Any

from ringfence import agentapi
from ringfence.clouds.aws.wiring import Wiring
from ringfence.control.agents import AgentApi
from ringfence.control.wiring import Config
from tests.describes import HeldDescribes

from .conftest import ACCOUNT, REGION, Env
from .test_pipeline import agent_key, boot, iid_document


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


def test_enrollments_that_come_while_ec2_is_asked_share_the_next_describe(env: Env) -> None:
    est = boot(env)
    ids = [i for tier in est["ids"].values() for i in tier]
    gone = ids.pop()
    env.ec2.terminate_instances(InstanceIds=[gone])
    w = Wiring(Config.from_env())
    api = AgentApi(w)

    def request(iid: str) -> agentapi.EnrollRequest:
        doc, nonce, key = iid_document(env, iid), api.nonce().body["nonce"], agent_key(iid)
        return agentapi.EnrollRequest(
            method="aws-iid",
            nonce=nonce,
            document=doc,
            document_signature=env.iid.sign(doc),
            agent_key=key.pem,
            agent_signature=key.prove("enroll", iid, nonce),
        )

    requests = {iid: request(iid) for iid in [*ids, gone]}
    answers: dict[str, Any] = {}
    threads = {
        iid: threading.Thread(target=lambda i=iid: answers.__setitem__(i, api.enroll(requests[i]))) for iid in requests
    }
    first, *rest = requests
    with HeldDescribes(w.ec2_for(ACCOUNT, REGION)) as held:
        threads[first].start()
        assert held.first_in.wait(10)
        for iid in rest:
            threads[iid].start()
        while w.live.queued < len(rest):
            threading.Event().wait(0.01)
        held.release()
        for t in threads.values():
            t.join(10)
    assert held.asked == [[first], sorted(rest)], (
        "the first alone, then every enrollment that came meanwhile in one call"
    )
    assert {iid: a.status for iid, a in answers.items()} == {**dict.fromkeys(ids, 200), gone: 401}
    assert "not running" in answers[gone].body["detail"], "each answer is its own instance's"
    assert {a.body["workload_id"] for a in answers.values() if a.status == 200} == set(ids)
