"""Compute fans publishing out: the real compute and publish handlers over moto.

Compute stays the one ordered writer of the engine's state (and publishes the set deltas, in
order); whole bundles and nudges go over the publish queue to the publish function, which
signs, stores, points (never backwards) and announces. A cold start rebuilds the engine from the
store and adopts what is published instead of republishing it."""

from __future__ import annotations

import json
from typing import Any

import pytest

from ringfence.bundlewire import BundleError, Verifier, check_acceptable, load_bundle
from ringfence.control.api import secret_hash
from ringfence.local.lambdas import deliver_batch
from ringfence.model import Mode

from .conftest import REGION, Env, LambdaContext
from .test_pipeline import boot


def puts(env: Env) -> list[str]:
    """Keys of every S3 PutObject the control plane makes from now on (the hook sees the calls)."""
    keys: list[str] = []
    env.hook("before-parameter-build.s3.PutObject", lambda params, **kw: keys.append(str(params.get("Key"))))
    return keys


def publish_messages(env: Env) -> list[dict[str, Any]]:
    out: list[dict[str, Any]] = []
    while True:
        got = env.sqs.receive_message(QueueUrl=env.queues["publish"], MaxNumberOfMessages=10, AttributeNames=["All"])
        msgs = got.get("Messages", [])
        if not msgs:
            return out
        out.extend(msgs)


def test_a_launch_goes_compute_then_publish_queue_then_worker_to_a_verified_bundle(env: Env) -> None:
    est = boot(env)
    new = est["run"]("web", est["subnets"]["web"], 1)[0]
    env.put(env.state_event(new, "running"))
    env.drain("ingest", "ingest")
    env._drain("compute", "compute")  # compute alone: the publish function has not run yet
    assert env.store.bundle_pointer(new) is None, "compute no longer signs or stores bundles itself"
    assert env.count("publish") >= 1
    compute = env.fn["compute"].service()
    assert compute.engine is not None and new in compute.engine.workloads

    env._drain("publish", "publish")
    ptr = env.store.bundle_pointer(new)
    assert ptr is not None and ptr.key.startswith(f"bundles/{new}/") and ptr.digest and ptr.expires_at
    body = env.s3.get_object(Bucket=env.bucket, Key=ptr.key)["Body"].read()
    doc = load_bundle(body)  # what the agent reads, checked as the agent checks it
    Verifier.from_pem(env.signing_key.public_pem()).verify(doc)
    check_acceptable(doc, new, None)
    assert doc.version == ptr.version and doc.workload_id == new
    # the peers learnt of it by the deltas compute published in order (their chains bridge)
    peer = env.bundle(est["ids"]["proc"][0])
    assert any(ip in s.v4 for s in peer.sets.values() for ip in _ips(env, new))


def _ips(env: Env, iid: str) -> list[str]:
    inst = env.ec2.describe_instances(InstanceIds=[iid])["Reservations"][0]["Instances"][0]
    return [f"{inst['PrivateIpAddress']}/32"]


def test_a_cold_start_adopts_what_is_published_and_republishes_nothing_unchanged(env: Env) -> None:
    est = boot(env)
    before = {w: env.store.bundle_pointer(w) for w in env.fn["compute"].service().engine.workloads}
    assert all(before.values())

    env.load_functions()  # every container cold: compute's engine is gone
    keys = puts(env)
    got = env.fn["compute"].handler(env.sqs_event([_message({"ids": [], "rebuild": True})]), LambdaContext())
    assert got == {"batchItemFailures": []}
    env._drain("publish", "publish")
    assert [k for k in keys if k.startswith(("bundles/", "deltas/", "staging/"))] == [], keys
    compute = env.fn["compute"].service()
    after = {w: env.store.bundle_pointer(w) for w in compute.engine.workloads}
    assert after == before, "every pointer kept: same versions, same documents"
    for w in after:  # the rebuilt engine is at the versions the agents hold
        assert compute.engine.bundle_version(w) == env.fn["agentapi"].api().latest_version(w), w

    # a change after the cold start: only what it touches is published, and it chains on
    keys.clear()
    web = est["ids"]["web"][0]
    env.ec2.create_tags(Resources=[web], Tags=[{"Key": "ringfence:env", "Value": "dev"}])
    env.put(env.tag_event(web, {"ringfence:role": "web", "ringfence:app": "ordering", "ringfence:env": "dev"}, 2))
    env.drain("ingest", "ingest")
    env.drain("compute", "compute")
    bundles = [k for k in keys if k.startswith("bundles/")]
    assert bundles == [k for k in bundles if k.startswith(f"bundles/{web}/")] and len(bundles) == 1, bundles
    for w in after:
        env.bundle(w)  # every agent's view verifies and its deltas bridge from its stored bundle


def test_a_cold_start_after_a_key_rotation_re_signs_every_bundle_with_the_new_key(env: Env) -> None:
    """docs/bundle.md's rotation: the signing secret gets a new key, the next cold start re-signs
    (never adopts) what the old key signed, so the old key can be revoked without an agent left
    on a bundle it would refuse."""
    from ringfence.bundle import SigningKey

    boot(env)
    wids = sorted(env.fn["compute"].service().engine.workloads)
    old = {w: env.store.bundle_pointer(w) for w in wids}
    assert all(p is not None and p.key_id == env.signing_key.key_id for p in old.values())
    new_key = SigningKey.generate()
    sm = env.aws.client("secretsmanager")
    sm.put_secret_value(SecretId=env.aws.names.signing_secret, SecretString=new_key.private_pem().decode())
    env.load_functions()
    env.fn["compute"].handler(env.sqs_event([_message({"ids": [], "rebuild": True})]), LambdaContext())
    env._drain("publish", "publish")
    only_new = Verifier.from_pem(new_key.public_pem())
    only_old = Verifier.from_pem(env.signing_key.public_pem())
    for w in wids:
        ptr = env.store.bundle_pointer(w)
        before = old[w]
        assert ptr is not None and before is not None and ptr.key_id == new_key.key_id, w
        assert ptr.version > before.version, "a new version: the agent fetches it"
        doc = load_bundle(env.s3.get_object(Bucket=env.bucket, Key=ptr.key)["Body"].read())
        only_new.verify(doc)
        with pytest.raises(BundleError, match="not a pinned key"):
            only_old.verify(doc)  # what an agent that revoked the old key still accepts
    # and the next cold start under the same key adopts them again
    env.load_functions()
    keys = puts(env)
    env.fn["compute"].handler(env.sqs_event([_message({"ids": [], "rebuild": True})]), LambdaContext())
    env._drain("publish", "publish")
    assert [k for k in keys if k.startswith("bundles/")] == []


def test_a_cold_start_republishes_what_changed_while_compute_was_down(env: Env) -> None:
    est = boot(env)
    web = est["ids"]["web"][0]
    env.load_functions()
    # the inventory moved while no compute ran (its message was lost with the container)
    env.store.set_operator(web, quarantined=True)
    keys = puts(env)
    env.fn["compute"].handler(env.sqs_event([_message({"ids": [], "rebuild": True})]), LambdaContext())
    env._drain("publish", "publish")
    republished = {k.split("/")[1] for k in keys if k.startswith("bundles/")}
    assert web in republished, "its rules changed: a new bundle"
    assert env.bundle(web).quarantined
    for w in env.fn["compute"].service().engine.workloads:
        env.bundle(w)


def test_a_later_version_is_never_replaced_by_an_older_job(env: Env) -> None:
    est = boot(env)
    web = est["ids"]["web"][0]
    for mode in (Mode.OBSERVE, Mode.ENFORCE):  # two changes of its own rules: two jobs, in order
        env.store.set_operator(web, mode=mode)
        env.fn["compute"].handler(env.sqs_event([_message({"ids": [web]})]), LambdaContext())
    jobs = publish_messages(env)
    mine = [m for m in jobs if any(b["workload_id"] == web for b in json.loads(m["Body"])["bundles"])]
    assert len(mine) == 2
    versions = [next(b for b in json.loads(m["Body"])["bundles"] if b["workload_id"] == web) for m in mine]
    older, newer = sorted(zip(versions, mine, strict=True), key=lambda vm: int(vm[0]["bundle"]["version"]))
    # the workers take them out of order: the newer first
    for _, msg in (newer, older):
        out = env.fn["publish"].handler(env.sqs_event([msg], env.aws.queue_arn("publish")), LambdaContext())
        assert out == {"batchItemFailures": []}
    ptr = env.store.bundle_pointer(web)
    assert ptr is not None and ptr.version == int(newer[0]["bundle"]["version"]) > int(older[0]["bundle"]["version"])
    assert env.bundle(web).mode.value == "enforce"


def test_an_oversized_bundle_is_staged_in_the_bucket_and_the_worker_removes_it(env: Env, monkeypatch: Any) -> None:
    from ringfence.control import compute as compute_mod

    est = boot(env)
    monkeypatch.setattr(compute_mod, "MESSAGE_BUDGET", 100)  # every bundle "too big"
    web = est["ids"]["web"][0]
    env.store.set_operator(web, quarantined=True)
    env.fn["compute"].handler(env.sqs_event([_message({"ids": [web]})]), LambdaContext())
    staged = env.s3.list_objects_v2(Bucket=env.bucket, Prefix="staging/").get("KeyCount", 0)
    assert staged == 1
    d = deliver_batch(
        env.sqs, env.queues["publish"], env.aws.queue_arn("publish"), env.fn["publish"].handler, region=REGION
    )
    assert d is not None and not d.failed and d.error is None
    assert env.s3.list_objects_v2(Bucket=env.bucket, Prefix="staging/").get("KeyCount", 0) == 0
    assert env.bundle(web).quarantined


def test_the_long_poll_wakes_when_the_worker_publishes(env: Env) -> None:
    """The agent API's change watch reads the publish workers' count on the engine head: a wait
    for a workload whose bundle only the worker moves ends when the worker is through."""
    import threading

    est = boot(env)
    web = est["ids"]["web"][0]
    api = env.fn["agentapi"].api()
    version = api.latest_version(web)
    env.store.put_token(secret_hash("web-token"), web, 600)  # each wake-up authorizes the wait again
    answer: dict[str, Any] = {}
    t = threading.Thread(target=lambda: answer.update(r=api.wait(web, version, 20.0, authorization="Bearer web-token")))
    t.start()
    env.store.set_operator(web, quarantined=True)
    env.fn["compute"].handler(env.sqs_event([_message({"ids": [web]})]), LambdaContext())
    env._drain("publish", "publish")
    t.join(15)
    assert not t.is_alive(), "the wait was not woken by the worker's publication"
    assert answer["r"].status == 200 and answer["r"].body["latest_version"] > version


def _message(body: dict[str, Any]) -> dict[str, Any]:
    import hashlib
    import uuid

    text = json.dumps(body)
    return {
        "MessageId": str(uuid.uuid4()),
        "ReceiptHandle": uuid.uuid4().hex,
        "Body": text,
        "MD5OfBody": hashlib.md5(text.encode()).hexdigest(),  # SQS's checksum, not security
        "Attributes": {},
    }
