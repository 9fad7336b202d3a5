"""A developer's tag storm through moto (EventBridge → SQS → the ingest handler): a tag compute
reads nothing of is stored and never reaches the one serialized compute queue; a label tag does."""

from __future__ import annotations

import json

from tests.aws.conftest import Env
from tests.aws.test_pipeline import boot


def _tag(env: Env, iid: str, key: str, value: str, version: int) -> None:
    env.ec2.create_tags(Resources=[iid], Tags=[{"Key": key, "Value": value}])
    env.put(env.tag_event(iid, {key: value}, version))


def _handed_on(env: Env, queue: str) -> list[str]:
    return [i for m in env.receive(queue) for i in json.loads(m["Body"])["ids"]]


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
