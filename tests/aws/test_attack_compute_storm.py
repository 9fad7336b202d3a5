"""A developer who may tag their own instances flaps their tags (a tag storm): every change is an
ingest event and a compute message, and compute runs one invocation at a time, ten messages
each. An incident responder's quarantine must not wait behind that backlog: it goes to compute's
priority queue, which the same compute function reads beside the compute queue
(docs/threat-model.md, docs/operations.md).

Through the real handlers over moto: the tags change in EC2, the events go through EventBridge,
the ingest handler describes the instances and queues compute, the admin route quarantines."""

from __future__ import annotations

import json
from typing import Any

import pytest

from tests.aws.conftest import Env, ip_of
from tests.aws.test_pipeline import _ctx, _scheduled, boot, in_set
from tests.aws.test_terminate_trust import HOOK, forged_terminate, send_raw

RESPONDER = "arn:aws:iam::123456789012:user/ivy"
DEV = 10
ROUNDS = 8  # DEV x ROUNDS tag events, one ingest invocation each: ~80 compute messages, 8 invocations deep


def _estate_with_dev_instances(env: Env) -> tuple[dict[str, Any], list[str]]:
    """The example policy and estate, plus DEV web instances of the developer's (env=dev), all
    running and computed; returns the estate and the developer's instance ids."""
    env.provision_example_policy()
    est = env.estate()
    dev: list[str] = est["run"]("web", est["subnets"]["app"], DEV, env="dev")
    for iid in [*(i for ids in est["ids"].values() for i in ids), *dev]:
        env.put(env.state_event(iid, "running"))
    env.pump()
    return est, dev


def _storm(env: Env, dev: list[str], rounds: int) -> None:
    for n in range(rounds):
        role = "processing" if n % 2 == 0 else "web"  # both unprivileged: a storm, not an escalation
        env.ec2.create_tags(Resources=dev, Tags=[{"Key": "ringfence:role", "Value": role}])
        entries = []
        for iid in dev:
            ev = env.tag_event(iid, {"ringfence:role": role}, 1000 + n)
            entries.append(
                {
                    "Source": ev["source"],
                    "DetailType": ev["detail-type"],
                    "Detail": json.dumps(ev["detail"]),
                    "Resources": ev["resources"],
                }
            )
        assert env.events.put_events(Entries=entries)["FailedEntryCount"] == 0
        # ingest scales out (concurrency 20) and keeps up; each invocation hands compute a message
        env._drain("ingest", "ingest", batch=1)


def _quarantine(env: Env, victim: str, peer: str, ahead: int) -> int | None:
    """The responder quarantines ``victim``; compute then runs one invocation at a time (reserved
    concurrency 1), its fan-out published after each: the invocation after which the quarantine
    is in force (``victim``'s bundle quarantined, its address gone from ``peer``'s sets)."""
    v_ip = ip_of(env, victim)
    st, _, body = env.rest(
        "admin", "POST", f"/admin/workloads/{victim}/quarantine", {"reason": "IR-7"}, principal=RESPONDER
    )
    assert st == 200, body
    for invocation in range(1, ahead // 10 + 3):
        results = env.drain_compute(invocations=1)
        assert results and not any(r.get("batchItemFailures") for r in results)
        env._drain("publish", "publish")
        if env.bundle(victim).quarantined and not in_set(env.bundle(peer), v_ip):
            return invocation
    return None


@pytest.mark.slow
def test_attack_a_tag_storm_does_not_delay_a_quarantine(env: Env) -> None:
    est, dev = _estate_with_dev_instances(env)
    env.bind(RESPONDER, ["incident-responder"])
    victim, proc = est["ids"]["web"][0], est["ids"]["proc"][0]
    v_ip = ip_of(env, victim)
    assert in_set(env.bundle(proc), v_ip)

    _storm(env, dev, ROUNDS)
    ahead = env.count("compute")  # both lanes: the storm's are all on the compute queue
    assert ahead >= 60, f"the storm queued {ahead} compute messages: not a backlog"

    took = _quarantine(env, victim, proc, ahead)
    # before: the quarantine was computed after the storm's ~ahead/10 invocations
    assert took is not None and took <= 2, f"quarantine in force after {took} compute invocations, {ahead} ahead"
    # the storm's own work is not lost: it is computed after
    assert env.count("compute") > 0
    env.drain("compute", "compute")
    assert env.count("compute") == 0
    assert env.bundle(victim).quarantined


@pytest.mark.slow
def test_attack_a_tag_storm_does_not_delay_a_terminated_workloads_address_leaving_its_peers(env: Env) -> None:
    """A workload terminated during a developer's tag storm: its address leaves its peers' allow
    sets in the first compute invocations, not after the storm's backlog (ceil(K/10) of them),
    while an address-reuse launch could take the address and ride the stale allow. The ingest
    of the real terminate event sends the removal to the priority lane."""
    est, dev = _estate_with_dev_instances(env)
    gone, proc = est["ids"]["web"][0], est["ids"]["proc"][0]
    g_ip = ip_of(env, gone)
    assert in_set(env.bundle(proc), g_ip)

    _storm(env, dev, ROUNDS)
    ahead = env.count("compute")
    assert ahead >= 60, f"the storm queued {ahead} compute messages: not a backlog"

    env.ec2.terminate_instances(InstanceIds=[gone])
    env.put(env.state_event(gone, "terminated"))
    env._drain("ingest", "ingest")
    assert env.store.get(gone).state == "terminated"

    took = None
    for invocation in range(1, ahead // 10 + 3):
        results = env.drain_compute(invocations=1)
        assert results and not any(r.get("batchItemFailures") for r in results)
        env._drain("publish", "publish")
        if not in_set(env.bundle(proc), g_ip):
            took = invocation
            break
    # before: the address stayed in the peer's set for the storm's ~ahead/10 invocations
    assert took is not None and took <= 2, f"address allowed for {took} compute invocations, {ahead} ahead"
    # the storm's own work is computed after, and the address stays out
    assert env.count("compute") > 0
    env.drain("compute", "compute")
    env._drain("publish", "publish")
    assert env.count("compute") == 0
    assert not in_set(env.bundle(proc), g_ip)


def _lane_ids(env: Env, queue: str) -> list[tuple[str, list[str], int]]:
    """(queue, ids, lifecycle actions) of each message waiting on one of compute's lanes, taken
    off it (one in flight would hold the FIFO queue's one group)."""
    out = []
    for m in env.receive(queue):
        b = json.loads(m["Body"])
        out.append((queue, b["ids"], len(b.get("lifecycles") or []) + bool(b.get("lifecycle"))))
        env.sqs.delete_message(QueueUrl=env.queues[queue], ReceiptHandle=m["ReceiptHandle"])
    return out


def test_a_confirmed_terminate_action_and_a_reconcile_removal_take_the_priority_lane(env: Env) -> None:
    """The lifecycle function's removal goes to the priority lane with its terminate action (which
    compute completes); a forged terminate for a running instance, refused, sends nothing there;
    reconcile's removal of an instance gone without an event goes there too."""
    est = boot(env)
    env.asg.put_lifecycle_hook(AutoScalingGroupName="rf-web-asg", LifecycleHookName="rf-hook", **HOOK)
    env.asg.set_desired_capacity(AutoScalingGroupName="rf-web-asg", DesiredCapacity=1)
    (web,) = env.asg_instances()
    env.put(env.state_event(web, "running"))
    env.pump()
    assert env.count("compute") == 0

    db = est["ids"]["db"][0]
    send_raw(env, "lifecycle", forged_terminate(env, db))
    env._drain("lifecycle", "lifecycle")
    assert env.store.get(db).state == "running"
    assert env.count("compute_priority") == 0

    env.asg.terminate_instance_in_auto_scaling_group(InstanceId=web, ShouldDecrementDesiredCapacity=True)
    env.put(env.lifecycle_event(web, launching=False))
    env._drain("lifecycle", "lifecycle")
    urgent = _lane_ids(env, "compute_priority")
    assert urgent == [("compute_priority", [web], 1)], urgent
    assert all(web not in ids for _, ids, _ in _lane_ids(env, "compute"))

    gone = est["ids"]["proc"][0]
    env.ec2.terminate_instances(InstanceIds=[gone])  # no event: reconcile finds it
    env.fn["reconcile"].handler(_scheduled(), _ctx())
    urgent = _lane_ids(env, "compute_priority")
    assert [ids for _, ids, _ in urgent] == [[gone]], urgent
    assert all(gone not in ids for _, ids, _ in _lane_ids(env, "compute"))


@pytest.mark.slow
def test_attack_stopping_and_starting_ones_own_instances_does_not_delay_a_quarantine(env: Env) -> None:
    """Cycling one's own instances (stop, start): each stop takes them out of their peers' sets,
    but a stopped instance keeps its addresses, so it is ordinary work, not the priority lane's;
    before, every stop was urgent and the responder's quarantine waited behind them all
    (security review of the priority lane: 100 stops ahead, in force after 11 invocations)."""
    est, dev = _estate_with_dev_instances(env)
    env.bind(RESPONDER, ["incident-responder"])
    victim, proc = est["ids"]["web"][0], est["ids"]["proc"][0]
    assert in_set(env.bundle(proc), ip_of(env, victim))

    for _ in range(3):
        env.ec2.stop_instances(InstanceIds=dev)
        _states(env, dev, "stopping")
        env.ec2.start_instances(InstanceIds=dev)
        _states(env, dev, "running")
    assert env._count("compute_priority") == 0, "a stop is no priority work"
    ahead = env.count("compute")
    assert ahead >= 20, f"the cycles queued {ahead} compute messages: not a backlog"

    took = _quarantine(env, victim, proc, ahead)
    assert took is not None and took <= 2, f"quarantine in force after {took} compute invocations, {ahead} ahead"
    assert all(env.store.get(i).state == "running" for i in dev)  # type: ignore[union-attr]


def _states(env: Env, ids: list[str], state: str) -> None:
    """State-change events for ``ids`` through EventBridge, one ingest invocation each."""
    entries = []
    for iid in ids:
        ev = env.state_event(iid, state)
        entries.append(
            {
                "Source": ev["source"],
                "DetailType": ev["detail-type"],
                "Detail": json.dumps(ev["detail"]),
                "Resources": ev["resources"],
            }
        )
    for i in range(0, len(entries), 10):
        assert env.events.put_events(Entries=entries[i : i + 10])["FailedEntryCount"] == 0
    env._drain("ingest", "ingest", batch=1)
