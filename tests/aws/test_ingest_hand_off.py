"""AWS ingest and lifecycle: a change stored by an event whose later step then fails still reaches
compute. The event's redelivery (SQS retries what the batch reports failed) finds the instance
stored as observed, stores nothing and would hand nothing on. Against the moto server, through the
real ingest, lifecycle and compute handlers."""

from __future__ import annotations

import contextlib
import json
import logging
from collections.abc import Iterator
from typing import Any

import pytest
from botocore.exceptions import ClientError

from ringfence.local.lambdas import Delivery, deliver_batch
from tests.aws.conftest import REGION, Env, ip_of
from tests.aws.test_governance import (
    DEVELOPER,
    ESCALATION,
    TAGGER_ROLE,
    create_tags_event,
    governed_estate,
    quarantine_mode_with_a_dev_web,
    ssh_peers,
)
from tests.aws.test_pipeline import boot, in_set
from tests.aws.test_terminate_trust import forged_terminate, send_raw


def refuse_once(env: Env, event_name: str, applies: Any = lambda params: True) -> list[str]:
    """The next call ``event_name`` names (a botocore ``before-call``/``before-parameter-build``
    event) for which ``applies(params)`` holds is throttled, once, in freshly loaded functions;
    the list returned gets an entry when it was."""
    refused: list[str] = []

    def refuse(params: dict[str, Any], **_: Any) -> None:
        if not refused and applies(params):
            refused.append(event_name)
            raise ClientError({"Error": {"Code": "Throttling", "Message": "Rate exceeded"}}, event_name)

    env.load_functions()  # a cold container, whose clients carry the hook
    env.hook(event_name, refuse)
    return refused


def ingest_once(env: Env, fn: str = "ingest") -> Delivery:
    """One batch of the ingest queue (or ``fn``'s: lifecycle) to its function, as Lambda's poller
    hands it over (what fails stays on the queue, visible again at once: SQS's redelivery)."""
    d = deliver_batch(
        env.sqs,
        env.queues[fn],
        env.aws.queue_arn(fn),
        env.fn[fn].handler,
        region=REGION,
        name=fn,
    )
    assert d is not None, f"nothing on the {fn} queue"
    return d


def test_an_observation_stored_before_a_terminate_actions_auto_scaling_read_fails_reaches_compute(env: Env) -> None:
    """A terminate action for the database (not Auto Scaling's: it will be refused) reaches ingest
    after the database moved to env dev. Its observation is stored, then the Auto Scaling read
    that would confirm the action is throttled: the event fails and is delivered again. The
    redelivery stores nothing (the move is stored) and refuses the action: the move must have
    reached compute, or the processing hosts keep allowing the database as a prod peer."""
    est = boot(env)
    db, proc = est["ids"]["db"][0], est["ids"]["proc"][0]
    assert in_set(env.bundle(proc), ip_of(env, db))
    env.ec2.create_tags(Resources=[db], Tags=[{"Key": "ringfence:env", "Value": "dev"}])
    refused = refuse_once(env, "before-call.auto-scaling.DescribeAutoScalingInstances")
    send_raw(env, "ingest", forged_terminate(env, db))
    assert ingest_once(env).failed and refused, "the throttled read fails the event, for SQS to deliver again"
    assert env.store.get(db).labels["env"] == "dev", "the observation was stored before the read"
    assert not ingest_once(env).failed  # the redelivery
    env.pump()
    assert env.store.get(db).state == "running"  # the action is refused: it stays
    assert not in_set(env.bundle(proc), ip_of(env, db)), "the database's move never reached compute"


def test_an_observation_the_lifecycle_function_stored_before_its_auto_scaling_read_fails_reaches_compute(
    env: Env,
) -> None:
    """As above, the terminate action on the lifecycle queue: the lifecycle function stores its
    batch's observation (the database moved to env dev), then the Auto Scaling read confirming
    the action is throttled and the action fails. Its redelivery stores nothing and refuses the
    action: the move must have reached compute with the failed action's batch."""
    est = boot(env)
    db, proc = est["ids"]["db"][0], est["ids"]["proc"][0]
    assert in_set(env.bundle(proc), ip_of(env, db))
    env.ec2.create_tags(Resources=[db], Tags=[{"Key": "ringfence:env", "Value": "dev"}])
    refused = refuse_once(env, "before-call.auto-scaling.DescribeAutoScalingInstances")
    send_raw(env, "lifecycle", forged_terminate(env, db))
    assert ingest_once(env, "lifecycle").failed and refused, "the throttled read fails the action"
    assert env.store.get(db).labels["env"] == "dev", "the observation was stored before the read"
    assert not ingest_once(env, "lifecycle").failed  # the redelivery
    env.pump()
    assert env.store.get(db).state == "running"  # the action is refused: it stays
    assert not in_set(env.bundle(proc), ip_of(env, db)), "the database's move never reached compute"


@pytest.mark.slow
def test_a_taggers_approval_stored_before_its_audit_write_fails_reaches_compute(env: Env) -> None:
    """The tagging role moves the dev box to jumpbox: the tag event holds the move, the CloudTrail
    call approves it. The approval is stored, then its audit record's write is throttled: the
    event fails and is delivered again. The redelivery finds the approval stored and stores
    nothing: the approved jumpbox must have reached compute (every production host's SSH peers)."""
    est = governed_estate(env)
    dev = est["dev"]
    tag_seen_alone(env, dev, ESCALATION, 2)
    assert env.store.get(dev).workload.held_labels is not None, "held until the call's event names its caller"

    refused = refuse_once(env, "before-parameter-build.dynamodb.TransactWriteItems", audit_write)
    env.put(create_tags_event(dev, ESCALATION, TAGGER_ROLE))
    assert ingest_once(env).failed and refused, "the refused audit write fails the event, for SQS to deliver again"
    assert env.store.get(dev).labels["role"] == "jumpbox", "the approval was stored before its audit write"
    assert not ingest_once(env).failed  # the redelivery
    env.pump()
    peers = ssh_peers(env, est)
    assert peers and all(peers.values()), "the approved jumpbox never reached compute"
    assert [a.principal for a in audited(env, "label.approve", dev)] == [TAGGER_ROLE], "an approval in force unaudited"


def audit_write(params: dict[str, Any]) -> bool:
    """A botocore ``TransactWriteItems`` call writing to the audit table."""
    return any(next(iter(i.values()))["TableName"] == "rf-audit" for i in params.get("TransactItems", []))


def quarantine_record(params: dict[str, Any]) -> bool:
    return audit_write(params) and "workload.quarantine" in json.dumps(params, default=str)


def tag_seen_alone(env: Env, wid: str, tags: dict[str, str], version: int) -> None:
    """``tags`` set on ``wid`` and seen by a tag event alone: held, no call names its caller yet."""
    env.ec2.create_tags(Resources=[wid], Tags=[{"Key": k, "Value": v} for k, v in tags.items()])
    live = env.ec2.describe_instances(InstanceIds=[wid])["Reservations"][0]["Instances"][0]["Tags"]
    env.put(env.tag_event(wid, {t["Key"]: t["Value"] for t in live}, version=version))
    env.pump()


def audited(env: Env, action: str, wid: str) -> list[Any]:
    return [a for a in env.store.audit_log() if a.action == action and a.target == wid]


def test_a_finding_whose_audit_write_fails_is_reported_and_quarantined_on_redelivery(env: Env) -> None:
    """Under ``on_privileged_change: quarantine`` a developer moves the dev box to jumpbox: the tag
    event holds the move, the CloudTrail call names the developer. The finding's ``label.held``
    record is refused once: the event fails and is delivered again. The redelivery finds the move
    held as stored: the finding must still be audited and the box quarantined."""
    dev = quarantine_mode_with_a_dev_web(env, bystanders=False)
    tag_seen_alone(env, dev, ESCALATION, 2)
    assert env.store.get(dev).workload.held_labels is not None, "held until the call's event names its caller"
    refused = refuse_once(env, "before-parameter-build.dynamodb.TransactWriteItems", audit_write)
    env.put(create_tags_event(dev, ESCALATION, DEVELOPER))
    assert ingest_once(env).failed and refused, "the refused audit write fails the event, for SQS to deliver again"
    assert not ingest_once(env).failed  # the redelivery
    env.pump()
    assert [a.principal for a in audited(env, "label.held", dev)] == [DEVELOPER], "the finding was never audited"
    assert env.store.get(dev).op_quarantined, "the finding's quarantine was never set"
    assert len(audited(env, "workload.quarantine", dev)) == 1
    assert env.bundle(dev).quarantined


@pytest.mark.slow
def test_a_findings_quarantine_is_never_in_force_without_its_record_and_each_is_written_once(env: Env) -> None:
    """As above, the write of the quarantine's own ``workload.quarantine`` record refused once
    (after ``label.held`` was written). The quarantine is made with its record or not at all, and
    the redelivery, which reports the finding again, writes each record once."""
    dev = quarantine_mode_with_a_dev_web(env, bystanders=False)
    tag_seen_alone(env, dev, ESCALATION, 2)

    refused = refuse_once(env, "before-parameter-build.dynamodb.TransactWriteItems", quarantine_record)
    env.put(create_tags_event(dev, ESCALATION, DEVELOPER))
    assert ingest_once(env).failed and refused
    assert len(audited(env, "label.held", dev)) == 1
    assert not env.store.get(dev).op_quarantined, "a quarantine in force without its audit record"
    assert not ingest_once(env).failed  # the redelivery
    env.pump()
    assert env.store.get(dev).op_quarantined
    assert len(audited(env, "label.held", dev)) == 1, "the finding recorded twice"
    assert len(audited(env, "workload.quarantine", dev)) == 1


@pytest.mark.slow
def test_attack_a_cloudtrail_events_redelivery_after_a_release_neither_quarantines_again_nor_blames_another_move(
    env: Env,
) -> None:
    """A developer moves the dev box to role=jumpbox: named, quarantined. An incident responder
    releases it. Another move, app=admin, is then seen by a tag event alone (held, nobody named yet:
    its call's event has not come). EventBridge and SQS deliver at least once: the developer's
    CloudTrail event arrives again, processed again. The redelivery reports what that event decided, once: no second
    quarantine (the release stands), no second ``label.held`` blaming the developer for app=admin.
    Before, the records' ids were derived from every move held now. (Within 24 h the idempotency
    table answers a copy of a processed event; one that failed after its report is decided again.)"""
    from tests.aws.test_admin_not_queued import RESPONDER

    dev = quarantine_mode_with_a_dev_web(env, bystanders=False)
    move = {"ringfence:role": "jumpbox"}
    tag_seen_alone(env, dev, move, 2)
    env.put(create_tags_event(dev, move, DEVELOPER))
    # the message as EventBridge queued it (its event id with it), read and left visible again
    got = env.sqs.receive_message(QueueUrl=env.queues["ingest"], MaxNumberOfMessages=1, VisibilityTimeout=0)
    [msg] = got["Messages"]
    assert "CreateTags" in msg["Body"]
    env.pump()
    assert env.store.get(dev).op_quarantined and len(audited(env, "workload.quarantine", dev)) == 1
    env.bind(RESPONDER, ["incident-responder"])
    path = f"/admin/workloads/{dev}/quarantine"
    status, _, answer = env.rest("admin", "DELETE", path, {"reason": "IR-12 reviewed"}, principal=RESPONDER)
    assert status == 200 and answer["quarantined"] is False, answer
    env.pump()
    tag_seen_alone(env, dev, {"ringfence:app": "admin"}, 3)
    rec = env.store.get(dev)
    assert rec.workload.held_labels is not None and rec.labels["app"] == "ordering" and not rec.op_quarantined
    # the same event again once its idempotency record has expired (24 h: a message the queue kept,
    # or one redriven from the dead-letter queue, later)
    idem = env.ddb.Table(env.aws.tables["idempotency"])
    for item in idem.scan()["Items"]:
        idem.delete_item(Key={"id": item["id"]})
    env.sqs.send_message(QueueUrl=env.queues["ingest"], MessageBody=msg["Body"])
    env.pump()
    assert not env.store.get(dev).op_quarantined, "the responder's release undone by a redelivery"
    assert not env.bundle(dev).quarantined
    held = audited(env, "label.held", dev)
    assert [(a.principal, a.detail["requested"]) for a in held] == [(DEVELOPER, {"role": "jumpbox"})], held
    assert len(audited(env, "workload.quarantine", dev)) == 1


def redeliver_after_expiry(env: Env, body: str) -> list[dict[str, Any]]:
    """The event ``body`` delivered again once its idempotency record has expired (24 h: a message
    the queue kept, or one redriven from the dead-letter queue, later): the findings it logged."""
    idem = env.ddb.Table(env.aws.tables["idempotency"])
    for item in idem.scan()["Items"]:
        idem.delete_item(Key={"id": item["id"]})
    with findings_logged() as logged:
        env.sqs.send_message(QueueUrl=env.queues["ingest"], MessageBody=body)
        env.pump()
    return logged


@contextlib.contextmanager
def findings_logged() -> Iterator[list[dict[str, Any]]]:
    """The finding lines ``ringfence.findings`` logs inside the block, parsed."""
    logged: list[dict[str, Any]] = []

    class Catch(logging.Handler):
        def emit(self, record: logging.LogRecord) -> None:
            logged.append(json.loads(record.getMessage()))

    findings = logging.getLogger("ringfence.findings")
    catch = Catch(logging.WARNING)
    findings.addHandler(catch)
    try:
        yield logged
    finally:
        findings.removeHandler(catch)


def release(env: Env, wid: str) -> None:
    from tests.aws.test_admin_not_queued import RESPONDER

    env.bind(RESPONDER, ["incident-responder"])
    path = f"/admin/workloads/{wid}/quarantine"
    status, _, answer = env.rest("admin", "DELETE", path, {"reason": "IR-12 reviewed"}, principal=RESPONDER)
    assert status == 200 and answer["quarantined"] is False, answer
    env.pump()


def delivered(env: Env, event: dict[str, Any], name: str) -> str:
    """``event`` put on the bus and processed: the message body as EventBridge queued it (its
    event id with it), to deliver again."""
    env.put(event)
    got = env.sqs.receive_message(QueueUrl=env.queues["ingest"], MaxNumberOfMessages=1, VisibilityTimeout=0)
    [msg] = got["Messages"]
    assert name in msg["Body"]
    env.pump()
    return str(msg["Body"])


@pytest.mark.slow
def test_attack_a_who_only_events_redelivery_after_a_release_blames_nobody_for_a_later_move(env: Env) -> None:
    """role=jumpbox is seen by a tag event alone (held, nobody named); the developer's DeleteTags,
    whose event says who only (not what it set), is named for it: quarantined, then released. A
    later move, app=admin, is held by a tag event alone. The DeleteTags event delivered again
    answers (who only) for every move held now: before, the finding's record id was derived from
    those, and the redelivery wrote a second ``label.held`` blaming the developer for app=admin
    and logged the finding "quarantined" again for the released box."""
    dev = quarantine_mode_with_a_dev_web(env, bystanders=False)
    tag_seen_alone(env, dev, {"ringfence:role": "jumpbox", "owner": "x"}, 2)
    env.ec2.delete_tags(Resources=[dev], Tags=[{"Key": "owner"}])
    event = create_tags_event(dev, {"owner": ""}, DEVELOPER)
    event["detail"]["eventName"] = "DeleteTags"
    event["detail"]["requestParameters"]["tagSet"] = {"items": [{"key": "owner"}]}
    body = delivered(env, event, "DeleteTags")
    assert env.store.get(dev).op_quarantined and len(audited(env, "workload.quarantine", dev)) == 1
    release(env, dev)
    tag_seen_alone(env, dev, {"ringfence:app": "admin"}, 3)
    assert not env.store.get(dev).op_quarantined
    logged = redeliver_after_expiry(env, body)
    held = audited(env, "label.held", dev)
    assert [(a.principal, a.detail["requested"]) for a in held] == [(DEVELOPER, {"role": "jumpbox"})], held
    assert logged == [], "the finding logged again, quarantined, for a released box"
    assert not env.store.get(dev).op_quarantined and len(audited(env, "workload.quarantine", dev)) == 1


@pytest.mark.slow
def test_attack_an_events_redelivery_after_a_grant_shrank_its_moves_reports_nothing_again(env: Env) -> None:
    """The developer's CreateTags sets role=jumpbox and app=admin: named, quarantined, released;
    then a policy author grants app=admin by an admin binding. The same event delivered again
    answers for role=jumpbox alone now: before, the finding's record id was derived from those
    moves, and the redelivery wrote a second ``label.held`` and logged the finding "quarantined"
    again for the released box."""
    from tests.aws.test_admin_bind import AUTHORS, bind

    dev = quarantine_mode_with_a_dev_web(env, bystanders=False)
    move = {"ringfence:role": "jumpbox", "ringfence:app": "admin"}
    tag_seen_alone(env, dev, move, 2)
    body = delivered(env, create_tags_event(dev, move, DEVELOPER), "CreateTags")
    assert env.store.get(dev).op_quarantined
    release(env, dev)
    env.bind(AUTHORS, ["policy-author"])
    status, answer = bind(env, dev, {"labels": {"app": "admin"}, "reason": "INC-9"})
    assert status == 200, answer
    env.pump()
    logged = redeliver_after_expiry(env, body)
    held = audited(env, "label.held", dev)
    assert [a.detail["requested"] for a in held] == [{"role": "jumpbox", "app": "admin"}], held
    assert logged == [], "the finding logged again, quarantined, for a released box"
    assert not env.store.get(dev).op_quarantined and len(audited(env, "workload.quarantine", dev)) == 1


@pytest.mark.slow
def test_a_redelivery_completing_a_report_logs_what_the_findings_record_says(env: Env) -> None:
    """The developer's CreateTags sets role=jumpbox and app=admin; the finding's ``label.held`` is
    written, its quarantine's write refused. Before the redelivery app=admin is granted: the event
    answers for role=jumpbox alone now. The redelivery quarantines and logs the finding once, as
    its record says (both moves), not as the event is decided again."""
    from tests.aws.test_admin_bind import AUTHORS, bind

    dev = quarantine_mode_with_a_dev_web(env, bystanders=False)
    move = {"ringfence:role": "jumpbox", "ringfence:app": "admin"}
    tag_seen_alone(env, dev, move, 2)

    refused = refuse_once(env, "before-parameter-build.dynamodb.TransactWriteItems", quarantine_record)
    env.put(create_tags_event(dev, move, DEVELOPER))
    assert ingest_once(env).failed and refused
    assert not env.store.get(dev).op_quarantined
    env.bind(AUTHORS, ["policy-author"])
    status, answer = bind(env, dev, {"labels": {"app": "admin"}, "reason": "INC-9"})
    assert status == 200, answer
    with findings_logged() as logged:
        assert not ingest_once(env).failed  # the redelivery
    env.pump()
    assert env.store.get(dev).op_quarantined
    held = audited(env, "label.held", dev)
    assert [a.detail["requested"] for a in held] == [{"role": "jumpbox", "app": "admin"}], held
    assert [(f["action"], f["requested"]) for f in logged] == [("quarantined", {"app": "admin", "role": "jumpbox"})]
