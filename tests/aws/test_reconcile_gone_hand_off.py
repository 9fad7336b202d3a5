"""Reconcile: an instance a run stored gone whose hand-off to compute then failed leaves its peers'
sets on the next run. Nothing redelivers a scheduled run as an event source redelivers an event:
the next run (or Lambda's retry) finds the record stored terminated and has nothing to store for
it, and a warm compute keeps the instance in its peers' sets until a rebuild. Against the moto
server, through the real reconcile, compute and agent-API handlers."""

from __future__ import annotations

import json
from typing import Any

import pytest
from botocore.exceptions import ClientError

from ringfence.local.lambdas import load_functions, retire_functions
from tests.aws.conftest import ROOT, Env, ip_of
from tests.aws.test_pipeline import _ctx, _scheduled, boot, in_set


def reconcile_container(env: Env) -> None:
    """A fresh reconcile container, whose clients carry the hooks registered since; compute stays
    warm, as in AWS, holding the engine it built."""
    retire_functions([env.fn["reconcile"]])
    env.fn["reconcile"] = load_functions(["reconcile"], ROOT / "functions", keep_clients=True)["reconcile"]


def leaves_listing(env: Env, iid: str) -> None:
    """From now on EC2's listing leaves ``iid`` out, as it does a while after it terminated."""

    def drop(parsed: dict[str, Any], **_: Any) -> None:
        for res in parsed.get("Reservations", []):
            res["Instances"] = [i for i in res.get("Instances", []) if i["InstanceId"] != iid]

    env.hook("after-call.ec2.DescribeInstances", drop)


def compute_messages(env: Env, refuse: int = 0) -> list[tuple[bool, list[str]]]:
    """Every message sent to compute's queues from now on, as (priority lane, ids): the first
    ``refuse`` of them refused (SQS 503) instead."""
    sent: list[tuple[bool, list[str]]] = []
    left = [refuse]

    def send(params: dict[str, Any], **_: Any) -> None:
        lanes = {env.queues["compute"]: False, env.queues["compute_priority"]: True}
        if params.get("QueueUrl") not in lanes:
            return
        if left[0] > 0:
            left[0] -= 1
            raise ClientError({"Error": {"Code": "ServiceUnavailable", "Message": "sqs 503"}}, "SendMessage")
        sent.append((lanes[params["QueueUrl"]], json.loads(params["MessageBody"]).get("ids") or []))

    env.hook("before-parameter-build.sqs.SendMessage", send)
    return sent


@pytest.mark.parametrize("listed", [True, False], ids=["listed-terminated", "gone-from-the-listing"])
def test_an_instance_stored_gone_whose_hand_off_failed_leaves_its_peers_sets_on_the_next_run(
    env: Env, listed: bool
) -> None:
    """The database terminates with no event reaching ingest. Reconcile stores it terminated (as
    EC2 lists it, or as a tombstone once EC2 no longer does), then its message to compute is
    refused: the run fails. The next run finds the record stored terminated, nothing to store:
    the database must still leave the processing hosts' sets."""
    est = boot(env)
    db, proc = est["ids"]["db"][0], est["ids"]["proc"][0]
    db_ip = ip_of(env, db)
    assert in_set(env.bundle(proc), db_ip)
    env.ec2.terminate_instances(InstanceIds=[db])  # its event lost
    if not listed:
        leaves_listing(env, db)
    sent = compute_messages(env, refuse=1)
    reconcile_container(env)
    with pytest.raises(ClientError, match="ServiceUnavailable"):
        env.fn["reconcile"].handler(_scheduled(), _ctx())
    assert env.store.get(db).state == "terminated", "the run stored the database gone"
    assert not sent, "the run's hand-off was refused"
    env.pump()
    assert in_set(env.bundle(proc), db_ip), "compute never heard: the hole the next run closes"
    env.fn["reconcile"].handler(_scheduled(), _ctx())  # the retry, or the next schedule
    env.pump()
    assert not in_set(env.bundle(proc), db_ip), "the gone database is still allowed in its peers' sets"
    assert any(urgent and db in ids for urgent, ids in sent), "a removal: in compute's priority lane"


def test_a_run_after_a_removal_was_computed_republishes_nothing(env: Env) -> None:
    """A run after the one whose removal compute applied hands the tombstone on again (it cannot
    tell it was applied): compute finds nothing to change, publishes no set delta and no bundle."""
    est = boot(env)
    db, proc = est["ids"]["db"][0], est["ids"]["proc"][0]
    db_ip = ip_of(env, db)
    env.ec2.terminate_instances(InstanceIds=[db])
    leaves_listing(env, db)
    sent = compute_messages(env)
    reconcile_container(env)
    assert db in env.fn["reconcile"].handler(_scheduled(), _ctx())["gone"]
    env.pump()
    assert not in_set(env.bundle(proc), db_ip)
    head = env.store.head()
    ids = [i for group in est["ids"].values() for i in group if i != db]
    pointers = {w: p.version for w, p in env.store.bundle_pointers(ids).items()}
    del sent[:]
    second = env.fn["reconcile"].handler(_scheduled(), _ctx())
    assert not second["changed"] and not second["failed"]
    assert (True, [db]) in sent, "the recent tombstone is handed on again"
    env.pump()
    assert env.store.head().revision == head.revision, "compute published something for an unchanged estate"
    assert {w: p.version for w, p in env.store.bundle_pointers(ids).items()} == pointers
