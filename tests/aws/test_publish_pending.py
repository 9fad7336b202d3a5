"""A workload's rebuilt bundle on its way to the publish workers, and everything that may happen
meanwhile: set deltas moving its sets past it, a rebuild that finds an older pointer, a job taken
twice. Compute marks each bundle it hands on as pending on the workload's pointer before any set
head moves (``Store.mark_bundle_pending``); the agent API serves no set delta at or past that
mark over the older bundle, a rebuild adopts no pointer below it, and the workers' pointer write
keeps it. Each test drives the real handlers (moto) and the real agent core (dry-run backend),
and checks what the agent ends up enforcing."""

from __future__ import annotations

import ipaddress
import json
from pathlib import Path
from typing import Any

import pytest

from ringfence.bundlewire import Verifier, load_bundle, load_delta
from ringfence.control.api import secret_hash
from ringfence.model import Mode
from ringfence_agent.core import Agent
from ringfence_agent.plan import LocalFailsafes
from ringfence_agent.state import StateDir
from tests.agent.test_agent_unit import FakeBackend
from tests.aws.conftest import Env, LambdaContext, ip_of
from tests.aws.test_fanout import _message, publish_messages
from tests.aws.test_pipeline import boot


def _agent(env: Env, wid: str, tmp: Path) -> Agent:
    """The workload's agent (the real core, a backend that programs nothing), enforcing what the
    agent API serves now."""
    state = StateDir(tmp / wid)
    state.ensure()
    verifier = Verifier.from_pem(env.signing_key.public_pem())
    agent = Agent(wid, verifier, FakeBackend(), state, LocalFailsafes(), log=lambda s: None)  # type: ignore[arg-type]
    _sync(env, agent)
    assert agent.revision is not None
    return agent


def _sync(env: Env, agent: Agent, timeout: float = 0.0) -> int | None:
    """One round of the daemon's sync (ringfence_agent.daemon): the long-poll's answer from the
    applied revision, with the deltas or the bundle it carries applied; else deltas since the
    applied revision, else the whole bundle and the deltas after it. The latest version the
    agent API announced."""
    api = env.fn["agentapi"].api()
    wid = agent.workload_id
    assert wid is not None
    rev = agent.revision
    if rev is not None:
        env.store.put_token(secret_hash(f"{wid}-token"), wid, 600)  # each wake-up authorizes the wait again
        got = api.wait(wid, rev, timeout, with_deltas=True, with_bundle=True, authorization=f"Bearer {wid}-token")
        body = json.loads(got.body) if isinstance(got.body, bytes) else got.body
        latest = body.get("latest_version")
        if latest is None or latest <= rev:
            return latest
        if "bundle" in body:
            agent.apply_bundle(load_bundle(body["bundle"]))
        for d in (body.get("deltas") or {}).get("deltas", []):
            agent.apply_delta(load_delta(json.dumps(d)))
        if (agent.revision or 0) >= latest:
            return latest
        found = api.deltas(wid, agent.revision or 0)
        if found.status == 200:
            for d in json.loads(found.body)["deltas"]:
                agent.apply_delta(load_delta(json.dumps(d)))
            if (agent.revision or 0) >= latest:
                return latest
    cur = api.current(wid)
    assert isinstance(cur, tuple), cur
    doc = load_bundle(cur[1])
    if agent.revision is None or doc.version > agent.revision:
        agent.apply_bundle(doc)
    after = api.deltas(wid, agent.revision or 0)
    assert after.status == 200, after
    for d in json.loads(after.body)["deltas"]:
        agent.apply_delta(load_delta(json.dumps(d)))
    return api.latest_version(wid)


def _compute(env: Env, body: dict[str, Any]) -> dict[str, Any]:
    out: dict[str, Any] = env.fn["compute"].handler(env.sqs_event([_message(body)]), LambdaContext())
    return out


def _enforced(agent: Agent) -> Any:
    eff = agent.effective()
    assert eff is not None
    return eff


def _holds(agent: Agent, ip: str) -> bool:
    """Some set of what the agent enforces covers the address (a set's cover may merge neighbours)."""
    addr = ipaddress.ip_address(ip)
    return any(addr in ipaddress.ip_network(p) for s in _enforced(agent).sets.values() for p in s.v4)


def test_deltas_never_carry_an_agent_past_its_rebuilt_bundle_still_on_the_publish_queue(
    env: Env, tmp_path: Path
) -> None:
    """One compute batch changes the db's own rules (mode → observe: a whole bundle, queued) and
    adds a peer to a set the db holds (a delta, written by compute itself). Before the fix the
    db agent's long-poll was answered with that delta while the bundle was still queued: the
    agent moved to the bundle's version with its old rules and refused the bundle (a replay)."""
    est = boot(env)
    db = est["ids"]["db"][0]
    agent = _agent(env, db, tmp_path)
    before = agent.revision
    assert _enforced(agent).mode == Mode.ENFORCE
    new_proc = est["run"]("processing", est["subnets"]["app"], 1)[0]
    env.put(env.state_event(new_proc, "running"))
    env.drain("ingest", "ingest")  # the inventory record; compute not run yet
    env.store.set_operator(db, mode=Mode.OBSERVE)
    assert _compute(env, {"ids": [db, new_proc]}) == {"batchItemFailures": []}
    svc = env.fn["compute"].service()
    assert svc.engine is not None
    pending = svc.engine.bundle_version(db)  # the version of the bundle the workers have not published yet
    assert env.store.bundle_pointer(db).version < pending
    # the agent's long-poll, and a deltas request of its own, meanwhile: nothing past the bundle
    _sync(env, agent)
    assert agent.revision is not None and agent.revision < pending, (agent.revision, pending)
    got = env.fn["agentapi"].api().deltas(db, before or 0)
    assert got.status == 200
    assert all(d["to_version"] < pending for d in json.loads(got.body)["deltas"])
    # the workers publish: the agent takes the bundle (its new rules) and the peer with it
    env._drain("publish", "publish")
    _sync(env, agent)
    assert _enforced(agent).mode == Mode.OBSERVE
    assert _holds(agent, ip_of(env, new_proc))
    assert agent.revision == env.fn["agentapi"].api().latest_version(db)


@pytest.mark.slow
def test_a_quarantine_on_the_publish_queue_reaches_the_agent_when_a_later_batch_moves_its_sets(
    env: Env, tmp_path: Path
) -> None:
    """Batch 1 quarantines the db (its bundle queued), batch 2 adds a peer to a set the db holds
    (a delta). Before the fix the db agent took the delta first and then refused the quarantine
    bundle as a rollback: an incident quarantine that never reached the agent."""
    est = boot(env)
    db = est["ids"]["db"][0]
    agent = _agent(env, db, tmp_path)
    env.store.set_operator(db, quarantined=True)
    assert _compute(env, {"ids": [db]}) == {"batchItemFailures": []}
    new_proc = est["run"]("processing", est["subnets"]["app"], 1)[0]
    env.put(env.state_event(new_proc, "running"))
    env.drain("ingest", "ingest")
    assert _compute(env, {"ids": [new_proc]}) == {"batchItemFailures": []}
    _sync(env, agent)  # the workers lag: the agent is answered, but not moved past the quarantine
    assert not _enforced(agent).quarantined
    env._drain("publish", "publish")
    latest = _sync(env, agent)
    assert _enforced(agent).quarantined
    assert agent.revision == latest


def test_a_rebuild_does_not_adopt_a_pointer_older_than_a_bundle_on_the_publish_queue(
    env: Env, monkeypatch: Any
) -> None:
    """A compute run lifts a quarantine, hands the bundle to the workers, fails before its commit;
    the quarantine is put back; the retry rebuilds. Before the fix the rebuild adopted the older
    (quarantined) pointer, at a version below the job in flight, which then landed: the agent was
    served the un-quarantined bundle for good while inventory and engine said quarantined."""
    est = boot(env)
    db = est["ids"]["db"][0]
    env.store.set_operator(db, quarantined=True)
    assert _compute(env, {"ids": [db]}) == {"batchItemFailures": []}
    env._drain("publish", "publish")
    assert env.bundle(db).quarantined
    env.store.set_operator(db, quarantined=False)
    svc = env.fn["compute"].service()
    real = svc.w.store.put_moved
    calls = {"n": 0}

    def flaky(rec: Any) -> None:
        calls["n"] += 1
        if calls["n"] == 1:
            raise RuntimeError("throttled (simulated): the run ends before its commit")
        real(rec)

    monkeypatch.setattr(svc.w.store, "put_moved", flaky)
    first = _message({"ids": [db]})
    assert env.fn["compute"].handler(env.sqs_event([first]), LambdaContext())["batchItemFailures"]
    env.store.set_operator(db, quarantined=True)  # the lift was a mistake
    again = env.fn["compute"].handler(env.sqs_event([first, _message({"ids": [db]})]), LambdaContext())
    assert again == {"batchItemFailures": []}
    env._drain("publish", "publish")  # the failed run's job and the rebuild's, in that order
    ptr = env.store.bundle_pointer(db)
    assert ptr is not None
    assert env.bundle(db).quarantined
    assert svc.engine is not None and svc.engine.bundle_version(db) == ptr.version


def test_two_staged_jobs_of_one_workload_at_one_revision_both_succeed(env: Env, monkeypatch: Any) -> None:
    """A change and the agent API's repair request for the same workload in one batch: two staged
    jobs at one revision. Before the fix they shared the staged key, the first worker deleted it
    and the second job failed on every redelivery (the publish DLQ, its alarm)."""
    from ringfence.control import compute as compute_mod

    est = boot(env)
    monkeypatch.setattr(compute_mod, "MESSAGE_BUDGET", 100)  # every bundle "too big": staged
    web = est["ids"]["web"][0]
    env.store.set_operator(web, quarantined=True)
    out = env.fn["compute"].handler(
        env.sqs_event([_message({"ids": [web]}), _message({"ids": [], "publish": [web]})]), LambdaContext()
    )
    assert out == {"batchItemFailures": []}
    jobs = publish_messages(env)
    staged = [b["staged"] for m in jobs for b in json.loads(m["Body"])["bundles"]]
    assert len(staged) == 2
    for m in jobs:  # one at a time, as two workers would
        got = env.fn["publish"].handler(env.sqs_event([m], env.aws.queue_arn("publish")), LambdaContext())
        assert got == {"batchItemFailures": []}
    # a redelivery of a job done already (its copy deleted) is done, and wakes the long-polls again
    count = env.store.head().published
    got = env.fn["publish"].handler(env.sqs_event([jobs[0]], env.aws.queue_arn("publish")), LambdaContext())
    assert got == {"batchItemFailures": []}
    assert env.store.head().published == count + 1
    assert env.bundle(web).quarantined
    left = env.s3.list_objects_v2(Bucket=env.bucket, Prefix="staging/").get("KeyCount", 0)
    assert left == 0


def test_a_staged_job_whose_copy_is_gone_before_it_was_pointed_at_still_fails(env: Env, monkeypatch: Any) -> None:
    """The other side of counting a missing copy as done: only when the pointer is at the job's
    version or past it. A copy gone with the pointer behind is a failure (redelivered)."""
    from ringfence.control import compute as compute_mod

    est = boot(env)
    monkeypatch.setattr(compute_mod, "MESSAGE_BUDGET", 100)
    web = est["ids"]["web"][0]
    env.store.set_operator(web, quarantined=True)
    assert _compute(env, {"ids": [web]}) == {"batchItemFailures": []}
    jobs = publish_messages(env)
    for m in jobs:
        for b in json.loads(m["Body"])["bundles"]:
            env.s3.delete_object(Bucket=env.bucket, Key=b["staged"])
    got = env.fn["publish"].handler(env.sqs_event(jobs, env.aws.queue_arn("publish")), LambdaContext())
    staged = {m["MessageId"] for m in jobs if json.loads(m["Body"])["bundles"]}
    assert staged and {f["itemIdentifier"] for f in got["batchItemFailures"]} == staged
    assert not env.bundle(web).quarantined


def test_the_dynamodb_store_keeps_the_pending_mark_beside_the_pointer(env: Env) -> None:
    from tests.test_publish_pending_sqlite import check_pending_mark

    check_pending_mark(env.store)
    # the agent's grant reads the pointer with the mark too (one BatchGetItem)
    assert env.store.bundle_pointer("w-1").pending == 7


def test_a_batch_that_failed_after_pointing_is_done_job_by_job_and_wakes_the_long_polls(
    env: Env, monkeypatch: Any
) -> None:
    """A batch of staged jobs fails after its pointers moved (its count on the engine head
    throttled): the handler runs the jobs again one by one. Each is done (its copy is still
    there: the copies go last) and counted, so the long-polls of those workloads wake."""
    from ringfence.control import compute as compute_mod

    est = boot(env)
    monkeypatch.setattr(compute_mod, "MESSAGE_BUDGET", 100)
    web, db = est["ids"]["web"][0], est["ids"]["db"][0]
    for wid in (web, db):
        env.store.set_operator(wid, quarantined=True)
    assert _compute(env, {"ids": [web, db]}) == {"batchItemFailures": []}
    jobs = publish_messages(env)
    worker = env.fn["publish"].service()
    real = worker.w.store.bump_published
    calls: list[Any] = []

    def throttled(workloads: Any) -> int:
        calls.append(workloads)
        if len(calls) == 1:
            raise RuntimeError("ProvisionedThroughputExceededException (simulated)")
        return int(real(workloads))

    monkeypatch.setattr(worker.w.store, "bump_published", throttled)
    count = env.store.head().published
    got = env.fn["publish"].handler(env.sqs_event(jobs, env.aws.queue_arn("publish")), LambdaContext())
    assert got == {"batchItemFailures": []}
    counted = {w for c in calls[1:] for w in c or ()}
    assert {web, db} <= counted
    assert env.store.head().published > count
    assert env.bundle(web).quarantined and env.bundle(db).quarantined
    assert env.s3.list_objects_v2(Bucket=env.bucket, Prefix="staging/").get("KeyCount", 0) == 0


def test_an_agent_that_took_deltas_below_the_mark_is_not_told_of_an_older_newest_version(
    env: Env, tmp_path: Path
) -> None:
    """The agent took a set's delta (batch 1); batch 2 changes the db's own rules and moves that
    set again. While the db's bundle is on its way the agent API counts the set's chain only
    below the bundle's version: as far as the agent already is, never below it (a newest version
    below the one the agent holds reads as a version never published: a finding, no launch)."""
    est = boot(env)
    db = est["ids"]["db"][0]
    agent = _agent(env, db, tmp_path)
    api = env.fn["agentapi"].api()
    first = est["run"]("processing", est["subnets"]["app"], 1)[0]
    env.put(env.state_event(first, "running"))
    env.drain("ingest", "ingest")
    assert _compute(env, {"ids": [first]}) == {"batchItemFailures": []}
    env._drain("publish", "publish")
    _sync(env, agent)
    took = agent.revision
    assert took is not None and _holds(agent, ip_of(env, first))
    second = est["run"]("processing", est["subnets"]["app"], 1)[0]
    env.put(env.state_event(second, "running"))
    env.drain("ingest", "ingest")
    env.store.set_operator(db, mode=Mode.OBSERVE)
    assert _compute(env, {"ids": [db, second]}) == {"batchItemFailures": []}
    assert api.latest_version(db) == took  # the bundle is on its way: nothing past it, nothing below the agent
    _sync(env, agent)
    assert agent.revision == took
    env._drain("publish", "publish")
    latest = _sync(env, agent)
    assert _enforced(agent).mode == Mode.OBSERVE and _holds(agent, ip_of(env, second))
    assert agent.revision == latest


def test_a_publish_job_lost_on_the_way_is_rendered_again_once_its_mark_is_stale(
    env: Env, tmp_path: Path, monkeypatch: Any
) -> None:
    """The db's rules change (a bundle marked pending and queued) and the job is lost (five failed
    receives: the publish DLQ; here, purged). Peers then join a set the db holds: those deltas
    are held back behind the mark, so the agent would miss every set change until something
    re-rendered the db (the refresh, three days on). A heartbeat that finds the mark older than
    PENDING_STALE_S asks compute to render the db again, and the agent catches up."""
    from ringfence.agentapi import Heartbeat
    from ringfence.control import agents

    est = boot(env)
    db = est["ids"]["db"][0]
    agent = _agent(env, db, tmp_path)
    api = env.fn["agentapi"].api()
    env.store.set_operator(db, mode=Mode.OBSERVE)
    assert _compute(env, {"ids": [db]}) == {"batchItemFailures": []}
    marked = env.store.bundle_pointer(db)
    assert marked.in_flight is not None and marked.pending_at is not None
    env.sqs.purge_queue(QueueUrl=env.queues["publish"])  # the job is lost
    peer = est["run"]("processing", est["subnets"]["app"], 1)[0]
    env.put(env.state_event(peer, "running"))
    env.drain("ingest", "ingest")
    assert _compute(env, {"ids": [peer]}) == {"batchItemFailures": []}
    env._drain("publish", "publish")
    _sync(env, agent)
    assert not _holds(agent, ip_of(env, peer)), "held back behind the lost bundle's mark"

    def heartbeat() -> None:
        assert api.heartbeat(db, Heartbeat(applied_version=agent.revision, mode=Mode.ENFORCE)).status == 200

    env._drain("compute", "compute")  # what ingest queued (compute was run directly above)
    heartbeat()
    assert env._drain("compute", "compute") == [], "a fresh mark asks for nothing"
    monkeypatch.setattr(agents, "PENDING_STALE_S", 0.0)  # as if the mark had stood that long
    heartbeat()
    env._drain("compute", "compute")
    env._drain("publish", "publish")
    _sync(env, agent)
    assert _enforced(agent).mode == Mode.OBSERVE and _holds(agent, ip_of(env, peer))
    ptr = env.store.bundle_pointer(db)
    assert ptr.in_flight is None and agent.revision == api.latest_version(db)
