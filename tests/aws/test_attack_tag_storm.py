"""A developer's tag storm through moto (EventBridge → SQS → the ingest handler): a tag compute
reads nothing of is stored and never reaches the one serialized compute queue; a label tag does."""

from __future__ import annotations

import json

import pytest

from tests.aws.conftest import Env
from tests.aws.test_ingest_batch_limits import Context, VirtualClock, _queue
from tests.aws.test_pipeline import boot
from tests.storerace import race_a_role_in_before_the_write


def _tag(env: Env, iid: str, key: str, value: str, version: int) -> None:
    env.ec2.create_tags(Resources=[iid], Tags=[{"Key": key, "Value": value}])
    env.put(env.tag_event(iid, {key: value}, version))


def _handed_on(env: Env, queue: str) -> list[str]:
    return [i for m in env.receive(queue) for i in json.loads(m["Body"])["ids"]]


@pytest.mark.slow
def test_attack_a_non_label_tag_storm_sends_nothing_to_compute(env: Env) -> None:
    """A developer whom the guard rail denies the ``ringfence:`` keys flips a tag they may write
    (``scratch``, and ``Name``) N times: each flip was a compute message doing no engine update,
    queued ahead of an admin's quarantine. The records follow the cloud; compute and the
    perimeter hear nothing."""
    est = boot(env)
    env.drain("compute", "compute")
    env.drain("perimeter", "perimeter")
    assert env.count("compute") == 0 and env.count("perimeter") == 0
    web = est["ids"]["web"][0]
    n = 20
    for k in range(n):  # each flip ingested before the next: each one a change of the record
        _tag(env, web, "scratch", f"v{k % 2}", 10 + k)
        env.drain("ingest", "ingest")
        assert (rec := env.store.get(web)) is not None and rec.workload.tags["scratch"] == f"v{k % 2}"
    _tag(env, web, "Name", "renamed-by-dev", 10 + n)
    env.drain("ingest", "ingest")
    rec = env.store.get(web)
    assert rec is not None
    assert rec.workload.tags["scratch"] == f"v{(n - 1) % 2}", "the store stays true to the cloud"
    assert rec.workload.tags["Name"] == "renamed-by-dev" and rec.workload.name == "renamed-by-dev"
    assert env.count("compute") == 0, "no compute message for a tag compute reads nothing of"
    assert env.count("perimeter") == 0


def test_a_label_tag_and_a_perimeter_tag_change_still_reach_compute_and_the_perimeter(env: Env) -> None:
    """What compute reads does reach it: a label key (``ringfence:role``), the env label the
    perimeter places workloads by (``ringfence:env``), and any other key under the labels' prefix
    (``ringfence:perimeter``: every label key starts with it)."""
    est = boot(env)
    env.drain("compute", "compute")
    env.drain("perimeter", "perimeter")
    web, proc, db = est["ids"]["web"][0], est["ids"]["proc"][0], est["ids"]["db"][0]
    _tag(env, web, "ringfence:role", "processing", 10)
    _tag(env, proc, "ringfence:env", "dev", 10)
    _tag(env, db, "ringfence:perimeter", "x", 10)
    env.drain("ingest", "ingest")
    assert sorted(_handed_on(env, "compute")) == sorted([web, proc, db])
    assert sorted(_handed_on(env, "perimeter")) == sorted([web, proc, db])
    assert (rec := env.store.get(web)) is not None and rec.labels["role"] == "processing"
    assert (rec := env.store.get(proc)) is not None and rec.labels["env"] == "dev"


def test_attack_a_concurrent_write_between_read_and_write_still_reaches_compute(
    env: Env, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Ingest reads the instance (role=web), another invocation then stores it as role=database
    and compute compiles that; this event's write of web, retried over the newer record, is
    compared with what it replaced (database), not with its own earlier read (web, equal to what
    it writes): compute and the perimeter are told, or a removed role kept its access. The real
    ingest handler over moto and DynamoDB; the concurrent write goes through the same store."""
    est = boot(env)
    env.load_functions()
    env.drain("compute", "compute")
    env.drain("perimeter", "perimeter")
    assert env.count("compute") == 0 and env.count("perimeter") == 0
    iid = est["ids"]["web"][0]
    s0 = env.store.get(iid)
    assert s0 is not None and s0.workload.tags["ringfence:role"] == "web"
    mod = env.fn["ingest"]
    mod._setup()
    store = mod._svc["wiring"].store
    raced = race_a_role_in_before_the_write(monkeypatch, store, s0)  # between its read and write
    msgs = _queue(env, [env.tag_event(iid, dict(s0.workload.tags), 99)])  # EC2 has it as web
    out = mod.handler(env.sqs_event(msgs), Context(VirtualClock(monkeypatch)))
    assert not out.get("batchItemFailures")
    assert raced == ["database"]
    now = env.store.get(iid)
    assert now is not None and now.workload.tags["ringfence:role"] == "web" and now.labels["role"] == "web"
    handed = {i for q in ("compute", "compute_priority") for m in env.receive(q) for i in json.loads(m["Body"])["ids"]}
    assert iid in handed, "the store moved database -> web: compute must recompile it"
    assert iid in _handed_on(env, "perimeter")
