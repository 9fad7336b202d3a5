"""A quarantine only the administrator's role releases: the real handlers over the moto server,
their DynamoDB calls recorded and judged against the SAM and Terraform statements
(tests/aws/test_function_iam.py).

A quarantine is the state item ``quarantine``/``<workload id>`` (DynamoStore.set_operator): the
event-fed roles, whose governance quarantines, may only put it; deleting it is the admin
function's alone. A record reads quarantined while the item exists or its own ``op_quarantined``
(from before the item) says so, so writing the record does not release it."""

from __future__ import annotations

import logging
from typing import Any

import pytest

from ringfence.clouds.aws.wiring import Wiring
from ringfence.control.wiring import Config
from tests.aws.conftest import Env, ip_of
from tests.aws.test_function_iam import (
    ATTACKER_FED,
    Recorder,
    allowed,
    refusals,
    requests_of,
    sam_statements,
    terraform_statements,
)
from tests.aws.test_governance import DEVELOPER, ESCALATION, quarantine_mode_with_a_dev_web, retag
from tests.aws.test_pipeline import boot, in_set

# the roles whose code quarantines (governance, under ``on_privileged_change: quarantine``)
QUARANTINES = ("ingest", "lifecycle", "reconcile", "gcpevents", "azureevents", "cloudreconcile")


def _releases(wid: str) -> list[tuple[str, str, dict[str, list[str]]]]:
    """Every write that would end a quarantine, in every form: its item deleted (alone, in a batch
    or a transaction), updated (a TTL added: DynamoDB would delete it) or put with a TTL, and the
    record's own mark written false."""
    item = {"dynamodb:LeadingKeys": ["quarantine"], "dynamodb:Attributes": ["pk", "sk"]}
    return [
        ("DeleteItem", "state", item),
        ("BatchWriteItem", "state", item),
        ("UpdateItem", "state", {**item, "dynamodb:Attributes": ["pk", "sk", "ttl"]}),
        ("PutItem", "state", {**item, "dynamodb:Attributes": ["pk", "sk", "ttl"]}),
        ("UpdateItem", "inventory", {"dynamodb:LeadingKeys": [wid], "dynamodb:Attributes": ["id", "op_quarantined"]}),
    ]


def _quarantine_item(env: Env, wid: str) -> dict[str, Any] | None:
    item: dict[str, Any] | None = (
        env.ddb.Table("rf-state").get_item(Key={"pk": "quarantine", "sk": wid}, ConsistentRead=True).get("Item")
    )
    return item


def test_attack_an_event_fed_role_cannot_release_a_quarantine(env: Env) -> None:
    """An incident responder quarantines a workload (the real admin route). Code in an event-fed
    role (ingest's, say) then writes what it may and more: the record's ``op_quarantined`` false
    (before: granted to every role that quarantines, as IAM cannot hold it to true; now refused,
    and done here anyway, in moto, which checks no IAM) and asks compute to re-read the
    workload. Before, compute signed the workload unquarantined. Now the quarantine item stands
    (deleting or expiring it is refused to every such role in both deployments) and compute,
    warm or cold, signs the quarantine bundle again."""
    rec = Recorder(env)  # before the first call: the functions keep the clients they made
    est = boot(env)
    wid = est["ids"]["web"][0]
    status, _, body = env.rest("admin", "POST", f"/admin/workloads/{wid}/quarantine", {"reason": "ir-7"})
    assert status == 200, body
    env.pump()
    assert env.bundle(wid).quarantined
    assert _quarantine_item(env, wid) is not None
    assert not refusals(rec, ("admin", "compute"))

    for fn in ATTACKER_FED:
        for where, statements_of in (("template.yaml", sam_statements), ("infra/", terraform_statements)):
            statements = statements_of(fn)
            granted = [w for w in _releases(wid) if allowed(statements, w)]
            assert not granted, (where, fn, granted)
    for where, statements_of in (("template.yaml", sam_statements), ("infra/", terraform_statements)):
        delete = ("DeleteItem", "state", {"dynamodb:LeadingKeys": ["quarantine"], "dynamodb:Attributes": ["pk", "sk"]})
        assert allowed(statements_of("admin"), delete), (where, "the administrator releases")

    # what code in such a role writes: the record's mark false (refused by its role now, but
    # written all the same here), and the item put again (granted: it can only quarantine)
    clear = {
        "TableName": "rf-inventory",
        "Key": {"id": wid},
        "UpdateExpression": "SET op_quarantined = :f",
        "ExpressionAttributeValues": {":f": False},
    }
    again = {"TableName": "rf-state", "Item": {"pk": "quarantine", "sk": wid}}
    env.ddb.meta.client.update_item(**clear)
    env.ddb.meta.client.put_item(**again)
    for fn in QUARANTINES:
        for where, statements_of in (("template.yaml", sam_statements), ("infra/", terraform_statements)):
            [update] = requests_of("UpdateItem", clear)
            [put] = requests_of("PutItem", again)
            assert not allowed(statements_of(fn), update), (where, fn, "op_quarantined")
            assert allowed(statements_of(fn), put), (where, fn, "the item put: a quarantine")
    assert env.store.get(wid).op_quarantined  # type: ignore[union-attr]

    # then the compute message its role may send: compute re-reads the record (warm), and a cold
    # compute rebuilds from every record
    Wiring(Config.from_env()).enqueue_compute([wid])
    env.drain("compute", "compute")
    assert env.bundle(wid).quarantined, "the quarantine stands after a warm compute"
    env.load_functions()
    Wiring(Config.from_env()).enqueue_compute([wid])
    env.drain("compute", "compute")
    assert env.bundle(wid).quarantined, "the quarantine stands after a rebuild"


def test_the_administrators_release_unquarantines_and_its_calls_are_granted(env: Env) -> None:
    """The admin route's quarantine puts the item; its release deletes it and clears the
    record's mark in one transaction, audited as before; the next bundle is unquarantined. A
    record quarantined by its mark alone (an upgraded deployment's) is quarantined until then."""
    rec = Recorder(env)
    est = boot(env)
    wid, old = est["ids"]["web"][0], est["ids"]["db"][0]
    assert env.rest("admin", "POST", f"/admin/workloads/{wid}/quarantine", {"reason": "ir-7"})[0] == 200
    env.pump()
    assert env.bundle(wid).quarantined
    status, _, body = env.rest("admin", "DELETE", f"/admin/workloads/{wid}/quarantine", {"reason": "fixed"})
    assert status == 200 and body["quarantined"] is False, body
    env.pump()
    assert not env.bundle(wid).quarantined
    assert _quarantine_item(env, wid) is None and not env.store.get(wid).op_quarantined  # type: ignore[union-attr]
    actions = [a.action for a in env.store.audit_log() if a.target == wid]
    assert actions[-2:] == ["workload.quarantine", "workload.release"], actions

    # quarantined before the upgrade: the record's mark, no item
    env.ddb.Table("rf-inventory").update_item(
        Key={"id": old}, UpdateExpression="SET op_quarantined = :t", ExpressionAttributeValues={":t": True}
    )
    env.load_functions()  # a cold compute: rebuilt from every record
    Wiring(Config.from_env()).enqueue_compute([old])
    env.drain("compute", "compute")
    assert env.bundle(old).quarantined and _quarantine_item(env, old) is None
    assert env.rest("admin", "DELETE", f"/admin/workloads/{old}/quarantine", {"reason": "upgraded"})[0] == 200
    env.pump()
    assert not env.bundle(old).quarantined
    item = env.ddb.Table("rf-inventory").get_item(Key={"id": old}, ConsistentRead=True)["Item"]
    assert "op_quarantined" not in item
    assert not refusals(rec, ("admin", "compute", "ingest", "publish"))


def test_governance_quarantines_from_ingest_with_the_item_alone(env: Env) -> None:
    """Under ``on_privileged_change: quarantine`` a developer's unapproved retag is quarantined by
    ingest (governance): the quarantine item put in a transaction with a check of the record,
    both granted to its role in both deployments, and nothing written on the record's
    ``op_quarantined``; the bundle signed is the quarantine bundle."""
    rec = Recorder(env)
    dev = quarantine_mode_with_a_dev_web(env)
    retag(env, dev, ESCALATION, DEVELOPER)
    assert env.store.get(dev).op_quarantined  # type: ignore[union-attr]
    assert env.bundle(dev).quarantined
    assert _quarantine_item(env, dev) is not None
    item = env.ddb.Table("rf-inventory").get_item(Key={"id": dev}, ConsistentRead=True)["Item"]
    assert "op_quarantined" not in item
    writes = {(a, t, c["dynamodb:LeadingKeys"][0]) for a, t, c in rec.calls.get("ingest", []) if c}
    assert ("PutItem", "state", "quarantine") in writes and ("ConditionCheckItem", "inventory", dev) in writes
    assert not refusals(rec, ("ingest", "compute", "admin"))


ALIAS = "i-0forgedalias0000"


def test_attack_a_record_under_another_key_cannot_release_a_quarantine_or_stop_compute(
    env: Env, caplog: pytest.LogCaptureFixture
) -> None:
    """The quarantine (and the operator's mode) are looked up by a record's key, the engine keys a
    workload by the id in the record's ``workload`` document. Code in an event-fed role, which may
    write any inventory key's cloud fields, a new key too, stores the quarantined workload's own
    document under a fresh key and sends the compute message its role may send. Before: a warm
    compute compiled that record as the victim, unquarantined, and signed it (the quarantine item
    untouched), and every cold compute failed on the duplicate workload id until the record was
    removed, so nothing was published for anyone. Now every read of the stores leaves such a
    record out (logged, counted): warm and cold, the victim's bundle is the quarantine bundle,
    and the others' keep being published."""
    caplog.set_level(logging.WARNING, logger="ringfence.store")
    est = boot(env)
    wid = est["ids"]["web"][0]
    status, _, body = env.rest("admin", "POST", f"/admin/workloads/{wid}/quarantine", {"reason": "ir-7"})
    assert status == 200, body
    env.pump()
    assert env.bundle(wid).quarantined

    item = env.ddb.Table("rf-inventory").get_item(Key={"id": wid}, ConsistentRead=True)["Item"]
    alias = {
        "TableName": "rf-inventory",
        "Key": {"id": ALIAS},
        "UpdateExpression": "SET workload = :w, #st = :s, observed_at = :t, labels = :l, problems = :p",
        "ExpressionAttributeNames": {"#st": "state"},
        "ExpressionAttributeValues": {
            ":w": item["workload"],
            ":s": "running",
            ":t": item["observed_at"] + 1,
            ":l": item.get("labels", "{}"),
            ":p": "[]",
        },
    }
    for fn in QUARANTINES:  # granted to them in both deployments: the reads must hold
        for where, statements_of in (("template.yaml", sam_statements), ("infra/", terraform_statements)):
            [update] = requests_of("UpdateItem", alias)
            assert allowed(statements_of(fn), update), (where, fn)
    env.ddb.meta.client.update_item(**alias)
    assert _quarantine_item(env, wid) is not None

    Wiring(Config.from_env()).enqueue_compute([ALIAS])
    assert not any(r.get("batchItemFailures") for r in env.drain("compute", "compute"))
    assert env.bundle(wid).quarantined, "the quarantine stands after a warm compute"
    env.load_functions()
    Wiring(Config.from_env()).enqueue_compute([wid, ALIAS])
    assert not any(r.get("batchItemFailures") for r in env.drain("compute", "compute")), "a rebuild failed"
    assert env.bundle(wid).quarantined, "the quarantine stands after a rebuild"
    assert env.store.get(ALIAS) is None
    assert any(ALIAS in r.getMessage() and wid in r.getMessage() for r in caplog.records), "logged, both ids"

    # the others are still published: an instance launched now reaches its peers' bundles
    extra = est["run"]("processing", est["subnets"]["app"], 1)[0]
    env.put(env.state_event(extra, "running"))
    env.pump()
    assert in_set(env.bundle(est["ids"]["db"][0]), ip_of(env, extra))
    assert env.bundle(wid).quarantined
