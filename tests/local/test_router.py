"""The event router end to end: changes made in moto through boto3 reach the inventory, compute and
the published bundles with no handler called by the test (the admin API provisions policy first,
as a user would); lifecycle hooks hold instances until compute has published their policy."""

from __future__ import annotations

import json
import time
from typing import Any

from ringfence.local import router as rt
from ringfence.local.router import EventRouter, TimelineEntry
from tests.aws.conftest import Env, ip_of
from tests.aws.test_pipeline import in_set
from tests.local.test_moto_lifecycle import launching, states, terminating

WAIT = 60.0


def kind(e: TimelineEntry) -> str:
    return f"CloudTrail {e.detail.get('eventName')}" if e.detail_type == rt.API_CALL else e.detail_type


def computed(r: EventRouter, iid: str, *kinds: str) -> TimelineEntry:
    """The first event of these kinds about ``iid`` that compute acted on. One change often comes
    as several events (the state change and CloudTrail's RunInstances; the tag change and
    CreateTags): whichever ingest takes first carries it, the others find nothing new."""
    e = r.timeline.wait(lambda e: iid in e.instance_ids and kind(e) in kinds and e.computed is not None, WAIT)
    assert e is not None, [x for x in r.timeline.entries() if iid in x.instance_ids]
    return e


def allowed_peer(doc: Any, ip: str) -> bool:
    """``ip`` is in a set an inbound allow rule admits (a workload without an env also sits in the
    dev-prod boundary's deny sets: a missing value counts as both)."""
    rules = [r for r in doc.inbound if r.action == "allow"]
    names = {r.set for r in rules} | {m.set for r in rules for m in r.members or []}
    return any(f"{ip}/32" in s.v4 for n, s in doc.sets.items() if n in names)


LAUNCHED = (rt.STATE_CHANGE, "CloudTrail RunInstances")
TAGGED = (rt.TAG_CHANGE, "CloudTrail CreateTags", "CloudTrail DeleteTags")


def booted(env: Env, make_router: Any, **options: Any) -> tuple[dict[str, Any], EventRouter]:
    """Policy provisioned, the estate launched while the router watches, everything computed."""
    env.provision_example_policy()
    r = make_router(**options)
    est = env.estate()
    assert r.wait_idle(WAIT)
    return est, r


def test_launched_instance_reaches_inventory_and_gets_a_published_bundle(env: Env, make_router: Any) -> None:
    est, r = booted(env, make_router)
    (iid,) = est["run"]("processing", est["subnets"]["app"], 1)
    e = computed(r, iid, *LAUNCHED)
    assert e.changed <= e.put <= e.ingested <= e.computed  # type: ignore[operator]
    rec = env.store.get(iid)
    assert rec is not None and rec.labels["role"] == "processing" and rec.state == "running"
    doc = env.bundle(iid)  # signed, verified with the stack's key
    assert doc.workload_id == iid
    db = env.bundle(est["ids"]["db"][0])
    assert in_set(db, ip_of(env, iid)), "the database's peers now include the new processing instance"
    # the estate itself also went through the router: every instance was announced and computed
    for ids in est["ids"].values():
        for i in ids:
            assert env.store.bundle_pointer(i) is not None


def test_create_tags_reaches_compute(env: Env, make_router: Any) -> None:
    est, r = booted(env, make_router)
    (typo,) = est["run"]("processing", est["subnets"]["app"], 1, env="prdo")
    computed(r, typo, *LAUNCHED)
    db = est["ids"]["db"][0]
    assert not allowed_peer(env.bundle(db), ip_of(env, typo)), "env=prdo is not prod: no access yet"
    env.ec2.create_tags(Resources=[typo], Tags=[{"Key": "ringfence:env", "Value": "prod"}])
    e = computed(r, typo, *TAGGED)
    assert "env=prod" in e.summary or e.detail["eventName"] == "CreateTags"
    assert env.store.get(typo).labels["env"] == "prod"  # type: ignore[union-attr]
    assert allowed_peer(env.bundle(db), ip_of(env, typo))
    # a deleted key is a change too (in changed-tag-keys, absent from the full tag set)
    env.ec2.delete_tags(Resources=[typo], Tags=[{"Key": "ringfence:app"}])
    deleted = r.timeline.wait(lambda x: x.summary == f"{typo} tags -ringfence:app", WAIT)
    assert deleted is not None and r.wait_idle(WAIT)
    assert r.timeline.get(deleted.event_id).computed or r.timeline.get(deleted.event_id).unchanged  # type: ignore[union-attr]
    assert "app" not in env.store.get(typo).labels  # type: ignore[union-attr]


def test_scale_out_waits_in_pending_wait_until_compute_completes_the_action(env: Env, make_router: Any) -> None:
    est, r = booted(env, make_router)
    env.asg.put_lifecycle_hook(AutoScalingGroupName="rf-web-asg", LifecycleHookName="rf-hook", **launching())
    proc = est["ids"]["proc"][0]
    # the moment the router sees an instance InService: was its policy already published?
    published_when_in_service: dict[str, bool] = {}

    def seen(stage: str, e: TimelineEntry) -> None:
        if stage == "put" and e.detail_type == rt.LAUNCH_OK:
            (iid,) = e.instance_ids
            published_when_in_service[iid] = env.store.bundle_pointer(iid) is not None

    r.subscribe(seen)
    env.asg.set_desired_capacity(AutoScalingGroupName="rf-web-asg", DesiredCapacity=3)
    new = states(env.asg)
    assert len(new) == 3 and set(new.values()) == {"Pending:Wait"}, new
    for iid in new:
        action = computed(r, iid, rt.LAUNCH_ACTION)
        ok = r.timeline.wait(lambda e, i=iid: i in e.instance_ids and e.detail_type == rt.LAUNCH_OK, WAIT)
        assert ok is not None, f"{iid} never went InService"
        assert action.ingested <= ok.changed, "held until the lifecycle handler had run"  # type: ignore[operator]
        # the launch passed the perimeter handler on its way to compute: the timeline says when
        assert action.perimeter is not None, "perimeter stamp"
        assert action.ingested <= action.perimeter <= action.computed  # type: ignore[operator]
    assert published_when_in_service == dict.fromkeys(new, True)
    assert set(states(env.asg).values()) == {"InService"}
    assert r.wait_idle(WAIT)
    peers = env.bundle(proc)
    assert all(in_set(peers, ip_of(env, iid)) for iid in new), "processing accepts every new web server"


def test_scale_in_leaves_peers_before_terminating(env: Env, make_router: Any) -> None:
    est, r = booted(env, make_router)
    env.asg.put_lifecycle_hook(AutoScalingGroupName="rf-web-asg", LifecycleHookName="rf-leave", **terminating())
    env.asg.set_desired_capacity(AutoScalingGroupName="rf-web-asg", DesiredCapacity=2)
    assert r.wait_idle(WAIT)
    a, b = sorted(states(env.asg))
    ips = {a: ip_of(env, a), b: ip_of(env, b)}
    proc = est["ids"]["proc"][0]
    assert all(in_set(env.bundle(proc), ip) for ip in ips.values())
    # the moment the router sees an instance terminated: did its peers still accept it?
    peers_when_gone: dict[str, bool] = {}

    def seen(stage: str, e: TimelineEntry) -> None:
        if stage == "put" and e.detail_type == rt.TERMINATE_OK:
            (iid,) = e.instance_ids
            peers_when_gone[iid] = in_set(env.bundle(proc), ips[iid])

    r.subscribe(seen)
    env.asg.set_desired_capacity(AutoScalingGroupName="rf-web-asg", DesiredCapacity=1)
    (leaving,) = [i for i, s in states(env.asg).items() if s == "Terminating:Wait"]
    action = computed(r, leaving, rt.TERMINATE_ACTION)
    gone = r.timeline.wait(lambda e: leaving in e.instance_ids and e.detail_type == rt.TERMINATE_OK, WAIT)
    assert gone is not None and action.ingested <= gone.changed  # type: ignore[operator]
    assert r.wait_idle(WAIT)
    assert peers_when_gone == {leaving: False}, "peers had dropped it before the instance was let go"
    assert not in_set(env.bundle(proc), ips[leaving]), "peers dropped the terminated instance"
    (stays,) = set(ips) - {leaving}
    assert in_set(env.bundle(proc), ips[stays])


def test_poison_messages_end_in_their_dlq_and_the_router_keeps_going(env: Env, make_router: Any) -> None:
    est, r = booted(env, make_router, retry_after=0.0)
    sqs = env.sqs
    sqs.send_message(QueueUrl=env.queues["ingest"], MessageBody="{not json")
    sqs.send_message(QueueUrl=env.queues["lifecycle"], MessageBody=json.dumps({"detail-type": "nonsense"}))
    (iid,) = est["run"]("processing", est["subnets"]["app"], 1)
    computed(r, iid, *LAUNCHED)  # the pipeline still flows around them
    assert r.wait_idle(WAIT)
    counts = r.pending()
    assert counts["dlq"] == 1, counts  # ingest sends what it cannot parse to the DLQ itself
    assert counts["lifecycle_dlq"] == 1, counts  # the lifecycle handler fails it: redriven after 3 receives
    assert counts["ingest"] == counts["lifecycle"] == counts["compute"] == 0
    failures = [d for d in r.deliveries if d.queue == "lifecycle" and d.failed]
    assert len(failures) == 3, "received three times (maxReceiveCount), then moto moved it to the DLQ"


def test_scheduled_reconcile_finds_what_no_event_announced(env: Env, make_router: Any) -> None:
    env.provision_example_policy()
    est = env.estate()  # before the router: no event will ever name these instances
    r = make_router(schedule={"reconcile": 0.3})
    web = est["ids"]["web"][0]
    deadline = time.monotonic() + WAIT
    while env.store.get(web) is None and time.monotonic() < deadline:
        time.sleep(0.1)
    assert env.store.get(web) is not None, "the scheduled reconcile put the instance in the inventory"
    assert not any(web in e.instance_ids for e in r.timeline.entries()), "and no event did"


def test_timeline_listeners_and_watch_interval(env: Env, make_router: Any) -> None:
    seen: list[tuple[str, str]] = []
    est, r = booted(env, make_router, watch_interval=0.1, cloudtrail=False)
    r.subscribe(lambda stage, e: seen.append((stage, e.summary)))
    (iid,) = est["run"]("processing", est["subnets"]["app"], 1)
    computed(r, iid, rt.STATE_CHANGE)
    stages = [s for s, summary in seen if summary == f"{iid} running"]
    assert stages == ["put", "ingested", "computed"], seen
    stats = r.watch_stats()
    assert stats["count"] > 0 and stats["interval"] == 0.1


def test_cloudtrail_events_name_the_caller(env: Env, make_router: Any) -> None:
    import boto3

    est, r = booted(env, make_router)
    iam = env.aws.client("iam")
    iam.create_user(UserName="alice")
    key = iam.create_access_key(UserName="alice")["AccessKey"]
    alice = boto3.client(
        "ec2",
        endpoint_url=env.aws.url,
        region_name=env.aws.region,
        aws_access_key_id=key["AccessKeyId"],
        aws_secret_access_key=key["SecretAccessKey"],
    )
    web = est["ids"]["web"][0]
    alice.create_tags(Resources=[web], Tags=[{"Key": "owner", "Value": "alice"}])
    e = r.timeline.wait(lambda x: x.detail_type == rt.API_CALL and x.detail.get("eventName") == "CreateTags", WAIT)
    assert e is not None and e.instance_ids == (web,)
    who = e.detail["userIdentity"]
    assert who["type"] == "IAMUser" and who["userName"] == "alice" and who["arn"].endswith(":user/alice")
    assert who["accessKeyId"] == key["AccessKeyId"]
    assert e.detail["requestParameters"]["tagSet"]["items"] == [{"key": "owner", "value": "alice"}]
    # Auto Scaling's own launches are recorded as AWS records them
    env.asg.set_desired_capacity(AutoScalingGroupName="rf-web-asg", DesiredCapacity=1)
    runs = [x for x in r.timeline.entries() if x.detail.get("eventName") == "RunInstances"]
    assert len(runs) == 3 and all(x.detail["userIdentity"]["arn"].endswith(":user/moto") for x in runs), (
        "the estate's own launches, by moto's default user (the test's dummy keys)"
    )
    run = r.timeline.wait(lambda x: "invokedBy" in x.detail.get("userIdentity", {}), WAIT)
    assert run is not None and run.detail["userIdentity"]["invokedBy"] == "autoscaling.amazonaws.com"
    assert run.detail["eventName"] == "RunInstances"
    assert run.instance_ids == tuple(states(env.asg))
    # a call that changes nothing is in the trail all the same; ingest finds nothing new
    env.ec2.delete_tags(Resources=[web], Tags=[{"Key": "no-such-key"}])
    noop = r.timeline.wait(lambda x: x.detail.get("eventName") == "DeleteTags", WAIT)
    assert noop is not None
    assert r.wait_idle(WAIT)
    noop = r.timeline.get(noop.event_id)
    assert noop is not None and noop.unchanged and noop.computed is None
    # ingest took them like any other event: nothing failed, nothing dead-lettered
    assert all(x.ingested is not None and x.failed is None for x in r.timeline.entries())
    assert r.pending()["dlq"] == 0


def test_attack_privileged_retag_through_the_router_is_held_unless_by_the_tagging_role(
    env: Env, make_router: Any
) -> None:
    """Governed labels on the demo's path: the caller comes from the trail (moto_trail), not from
    the test. A developer (IAM user) retagging a web server into the jumpbox is held with a
    finding; the same tags set by the example's allowed tagger (role ringfence-tagging, assumed
    through ``EmbeddedAws.client_as``) are approved."""
    est, r = booted(env, make_router)
    web, other = est["ids"]["web"]
    jump = [
        {"Key": "ringfence:app", "Value": "admin"},
        {"Key": "ringfence:role", "Value": "jumpbox"},
        {"Key": "ringfence:env", "Value": "shared"},
    ]
    env.aws.client_as("ec2", "developer", user=True).create_tags(Resources=[web], Tags=jump)

    def audited(action: str, target: str) -> Any:
        return next((a for a in env.store.audit_log() if a.action == action and a.target == target), None)

    deadline = time.monotonic() + WAIT
    while time.monotonic() < deadline and audited("label.held", web) is None:
        time.sleep(0.1)
    assert r.wait_idle(WAIT)
    held = audited("label.held", web)
    assert held is not None and held.principal == f"arn:aws:iam::{env.aws.account}:user/developer"
    rec = env.store.get(web)
    assert rec is not None and rec.workload.held_labels is not None
    assert rec.labels["role"] == "web" and rec.labels["app"] == "ordering"
    # the allowed tagger's call is attributed to its role ARN and approves what it set
    env.aws.client_as("ec2", "ringfence-tagging").create_tags(Resources=[other], Tags=jump)
    deadline = time.monotonic() + WAIT
    while time.monotonic() < deadline and audited("label.approve", other) is None:
        time.sleep(0.1)
    assert r.wait_idle(WAIT)
    approved = audited("label.approve", other)
    assert approved is not None and approved.principal == f"arn:aws:iam::{env.aws.account}:role/ringfence-tagging"
    rec = env.store.get(other)
    assert rec is not None and rec.workload.held_labels is None and rec.labels["role"] == "jumpbox"


def test_disabled_metrics_stay_quiet(env: Env, make_router: Any, monkeypatch: Any, capsys: Any) -> None:
    """EmbeddedAws(metrics=False) sets POWERTOOLS_METRICS_DISABLED; Powertools then keeps every
    metric in memory and prints them once one holds 100 values, unless the router drops them
    after each invocation (as log_metrics does after a flush)."""
    monkeypatch.setenv("POWERTOOLS_METRICS_DISABLED", "true")
    est, r = booted(env, make_router, cloudtrail=False)
    est["run"]("processing", est["subnets"]["app"], 3, env="dev")
    assert r.wait_idle(WAIT)
    assert any(d.queue == "ingest" for d in r.deliveries) and any(d.queue == "compute" for d in r.deliveries)
    for name in ("ingest", "compute"):
        assert r.fn[name].metrics.metric_set == {}, f"{name} kept its metrics"
    assert '"_aws"' not in capsys.readouterr().out


def test_terminate_successful_waits_until_the_instance_is_seen_terminated(aws: Any) -> None:
    """A look's two describes are not one snapshot: an instance can be seen out of its group and
    still running; its "Terminate Successful" comes when a later look sees it terminated."""
    r = EventRouter(aws, functions={})  # not started: _diff alone
    member = rt._Member("rf-web-asg", "arn:aws:autoscaling:::autoScalingGroup:x", "Terminating:Wait")
    before = rt._Look({"i-0aaa1111": rt._Instance("running", {})}, {"i-0aaa1111": member})
    between = rt._Look({"i-0aaa1111": rt._Instance("running", {})}, {})
    assert r._diff(before, between) == []
    after = rt._Look({"i-0aaa1111": rt._Instance("terminated", {})}, {})
    assert [e.entry["DetailType"] for e in r._diff(between, after)] == [rt.STATE_CHANGE, rt.TERMINATE_OK]
    # a detached instance that keeps running is forgotten after a while, never announced
    look = between
    for _ in range(rt.LEAVING_LOOKS + 1):
        nxt = rt._Look({"i-0aaa1111": rt._Instance("running", {})}, {})
        assert r._diff(look, nxt) == []
        look = nxt
    assert look.leaving == {}


# --- the timeline when handlers run concurrently (pure bookkeeping: no router, no clock) ----------


def _entry(eid: str, iid: str) -> TimelineEntry:
    return TimelineEntry(event_id=eid, detail_type=rt.LAUNCH_ACTION, instance_ids=(iid,), summary=eid, changed=0.0)


def test_timeline_compute_answering_an_event_whose_ingest_batch_is_still_running() -> None:
    tl = rt.Timeline()
    seen: list[tuple[str, str]] = []
    tl.subscribe(lambda stage, e: seen.append((stage, e.event_id)))
    tl.put([_entry("a", "i-1"), _entry("b", "i-2")])
    tl.began(["a", "b"], at=10.0)
    # the batch's first record went on to the perimeter and compute before the batch finished
    tl.perimeter(["i-1"], at=10.5, sent={"i-1": 10.2})
    # the lifecycle handler's own message for i-1 (no action in it) does not answer a launch action
    tl.computed(["i-1"], received_at=10.3, at=10.4, sent={"i-1": 10.25}, lifecycles=[])
    assert tl.get("a").computed is None  # type: ignore[union-attr]
    # the perimeter's hand-off, carrying the action, does
    tl.computed(["i-1"], received_at=10.6, at=11.0, sent={"i-1": 10.55}, lifecycles=["i-1"])
    a = tl.get("a")
    assert a is not None and (a.ingested, a.perimeter, a.computed) == (10.2, 10.5, 11.0)
    tl.ingested(["a", "b"], at=12.0, began=10.0)
    a, b = tl.get("a"), tl.get("b")
    assert a is not None and a.ingested == 10.2, "the earlier, per-record ingest time stays"
    assert b is not None and b.ingested == 12.0 and b.computed is None
    assert seen == [("put", "a"), ("put", "b"), ("ingested", "a"), ("computed", "a"), ("ingested", "b")]


def test_timeline_a_handler_that_began_before_the_put_was_recorded_has_begun() -> None:
    """SQS delivers an event while PutEvents is still answering the router: the lifecycle handler
    can begin before the router records the put. The perimeter's answer while that batch runs
    still gives the event its ingest time (it stayed the batch's end, after InService)."""
    tl = rt.Timeline()
    tl.began(["a"], at=10.0)  # before the put is recorded
    tl.put([_entry("a", "i-1")])
    tl.perimeter(["i-1"], at=10.5, sent={"i-1": 10.2})
    tl.computed(["i-1"], received_at=10.6, at=11.0, sent={"i-1": 10.55}, lifecycles=["i-1"])
    tl.ingested(["a"], at=12.0, began=10.0)
    a = tl.get("a")
    assert a is not None and (a.ingested, a.perimeter, a.computed) == (10.2, 10.5, 11.0)


def test_timeline_a_message_sent_before_the_ingest_began_does_not_answer_it() -> None:
    tl = rt.Timeline()
    tl.put([_entry("a", "i-1")])
    tl.began(["a"], at=10.0)
    tl.computed(["i-1"], received_at=10.1, at=10.4, sent={"i-1": 9.9}, lifecycles=["i-1"])  # an older change's message
    tl.ingested(["a"], at=10.5, began=10.0)
    a = tl.get("a")
    assert a is not None and a.computed is None
    tl.settle(before=10.4)  # idle since before the ingest finished: not settled
    assert tl.get("a").unchanged is False  # type: ignore[union-attr]
    tl.computed(["i-1"], received_at=10.6, at=10.9, sent={"i-1": 10.3}, lifecycles=["i-1"])
    assert tl.get("a").computed == 10.9  # type: ignore[union-attr]


def test_timeline_a_lifecycle_action_is_answered_only_by_a_batch_carrying_it() -> None:
    """A compute batch for the same instance's state change (its ids only) does not complete its
    launch action: that comes with the perimeter's hand-off, in a later batch."""
    tl = rt.Timeline()
    tl.put([_entry("a", "i-1")])
    tl.began(["a"], at=10.0)
    tl.ingested(["a"], at=10.2, began=10.0)
    tl.computed(["i-1"], received_at=10.3, at=10.5, sent={"i-1": 10.1}, lifecycles=[])
    assert tl.get("a").computed is None  # type: ignore[union-attr]
    tl.perimeter(["i-1"], at=10.6, sent={"i-1": 10.15})
    tl.computed(["i-1"], received_at=10.7, at=10.9, sent={"i-1": 10.65}, lifecycles=["i-1"])
    a = tl.get("a")
    assert a is not None and (a.perimeter, a.computed) == (10.6, 10.9)


def test_timeline_settles_what_compute_never_named() -> None:
    tl = rt.Timeline()
    tl.put([_entry("a", "i-1"), _entry("b", "i-2")])
    tl.began(["a", "b"], at=1.0)
    tl.ingested(["a"], at=2.0, began=1.0)  # b's batch still running
    tl.settle(before=3.0)
    a, b = tl.get("a"), tl.get("b")
    assert a is not None and a.unchanged and b is not None and not b.unchanged


def test_ingest_and_lifecycle_batches_run_at_once_each_in_a_container_of_its_own(env: Env, make_router: Any) -> None:
    """A router that loads the handlers itself takes several ingest and lifecycle batches at once,
    each extra poller with a module of its own (both keep a batch's state at module level, as a
    Lambda container does); handed one module per function, it runs one poller each, as before."""
    shared = make_router()
    own = EventRouter(env.aws)
    own.start()
    try:
        for name in ("ingest", "lifecycle"):
            assert not [k for k in shared.fn if k.startswith(f"{name}#")]
            assert len([t for t in shared._threads if t.name.startswith(f"ringfence-router-{name}")]) == 1
            extra = [k for k in own.fn if k.startswith(f"{name}#")]
            assert rt.POLLERS[name] > 1 and len(extra) == rt.POLLERS[name] - 1
            modules = [own.fn[name], *(own.fn[k] for k in extra)]
            assert len({id(m) for m in modules}) == len(modules), "a module each"
            threads = [t for t in own._threads if t.name.startswith(f"ringfence-router-{name}")]
            assert len(threads) == rt.POLLERS[name]
    finally:
        own.stop()
