"""What a failure after a store write costs the owed-to-compute marks (control/wiring.py
owe_compute, hand_on_owed; DynamoStore.owe_compute, owed_compute, settle_owed). Against the moto
server, through the real reconcile and compute handlers:

- a reconcile run that stored drift and then failed one more store write (an agent's offline mark,
  throttled) hands what it stored on, or marks it owed: its retry finds the drift stored already;
- one failed mark write costs no other mark, and each mark not written is counted;
- a mark left without its nonce (any writer of the ``owed`` partition may make one: IAM sees
  attribute names, not an update's REMOVE) is handed on and deleted, and blocks no drain.

(Ported from a review's reproducers.)"""

from __future__ import annotations

import time
from types import SimpleNamespace
from typing import Any

import pytest
from botocore.exceptions import ClientError

from ringfence.control.wiring import COMPUTE_OWED_NOT_MARKED, owe_compute
from ringfence.store.base import owed_key
from tests.aws.conftest import Env, ip_of
from tests.aws.test_function_iam import allowed, requests_of, sam_statements, terraform_statements
from tests.aws.test_pipeline import _ctx, _scheduled, boot, in_set
from tests.aws.test_reconcile_gone_hand_off import compute_messages, reconcile_container


def throttled(op: str) -> ClientError:
    return ClientError({"Error": {"Code": "ProvisionedThroughputExceededException", "Message": "throttled"}}, op)


def throttle_offline_once(env: Env) -> None:
    """The next write of an agent's offline mark (DynamoStore.set_liveness) is throttled past the
    SDK's retries."""
    left = [1]

    def throttle(params: dict[str, Any], **_: Any) -> None:
        if "#offline" in (params.get("UpdateExpression") or "") and left[0] > 0:
            left[0] -= 1
            raise throttled("UpdateItem")

    env.hook("before-parameter-build.dynamodb.UpdateItem", throttle)


def test_attack_a_reconcile_run_failing_after_it_stored_a_role_change_still_hands_it_to_compute(env: Env) -> None:
    """A web host's role tag is removed and its event lost; reconcile stores the drift, then the
    offline mark of a silent agent is throttled and the run fails. Before: nothing was queued nor
    marked owed, and the retry and every later run found the drift stored: the host stayed allowed
    as web in its peers' sets for good."""
    est = boot(env)
    web, proc, other = est["ids"]["web"][0], est["ids"]["proc"][0], est["ids"]["db"][0]
    web_ip = ip_of(env, web)
    assert in_set(env.bundle(proc), web_ip)
    env.store.set_liveness(other, enrolled=True, heartbeat=time.time() - 10 * 86400)  # silent for long
    env.ec2.delete_tags(Resources=[web], Tags=[{"Key": "ringfence:role"}])  # its event lost
    throttle_offline_once(env)
    sent = compute_messages(env)
    reconcile_container(env)
    with pytest.raises(ClientError, match="throttled"):
        env.fn["reconcile"].handler(_scheduled(), _ctx())
    assert "role" not in env.store.get(web).labels, "the run stored the drift"
    env.fn["reconcile"].handler(_scheduled(), _ctx())  # Lambda's retry
    env.fn["reconcile"].handler(_scheduled(), _ctx())  # a later run
    env.pump()
    assert any(web in ids for _, ids in sent), "the stored drift was never handed to compute, nor marked owed"
    assert not in_set(env.bundle(proc), web_ip), "the host that lost its role is still allowed as web"
    assert env.store.get(other).offline, "the retry marks the silent agent offline"


def test_attack_a_reconcile_run_failing_after_it_stored_a_removal_hands_it_on_past_the_resend_window(
    env: Env, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The same failure with a terminated database (event lost) and the re-send window passed (0 s):
    before, its removal was never handed on and its address stayed in the processing hosts' sets."""
    monkeypatch.setenv("RINGFENCE_GONE_RESEND_WINDOW", "0")
    est = boot(env)
    db, proc, other = est["ids"]["db"][0], est["ids"]["proc"][0], est["ids"]["web"][0]
    db_ip = ip_of(env, db)
    assert in_set(env.bundle(proc), db_ip)
    env.store.set_liveness(other, enrolled=True, heartbeat=time.time() - 10 * 86400)
    env.ec2.terminate_instances(InstanceIds=[db])  # its event lost
    throttle_offline_once(env)
    sent = compute_messages(env)
    reconcile_container(env)
    with pytest.raises(ClientError, match="throttled"):
        env.fn["reconcile"].handler(_scheduled(), _ctx())
    assert env.store.get(db).state == "terminated"
    env.fn["reconcile"].handler(_scheduled(), _ctx())
    env.fn["reconcile"].handler(_scheduled(), _ctx())
    env.pump()
    assert (True, [db]) in sent or any(u and db in ids for u, ids in sent), "the removal not sent in the priority lane"
    assert not in_set(env.bundle(proc), db_ip), "the terminated database is still allowed in its peers' sets"


def test_one_failed_mark_write_costs_no_other_mark_and_each_lost_one_is_counted(env: Env) -> None:
    """The urgent lane's one mark is throttled: before, that abandoned the five ordinary marks
    too (one write each, in one try), counted once."""
    left = [1]

    def throttle(params: dict[str, Any], **_: Any) -> None:
        if params.get("Key", {}).get("pk") == "owed#ingest" and left[0] > 0:
            left[0] -= 1
            raise throttled("UpdateItem")

    env.hook("before-parameter-build.dynamodb.UpdateItem", throttle)
    from ringfence.clouds.aws import clients
    from ringfence.store.dynamodb import DynamoStore

    # a store on the control plane's session (the one the hook is registered on), as a function's
    store = DynamoStore(
        "rf-inventory", "rf-state", "rf-audit", resource=clients.resource("dynamodb"), owed_writer="ingest"
    )
    counted: list[tuple[str, float]] = []
    w = SimpleNamespace(store=store, metric=lambda n, v: counted.append((n, v)))
    gone = ["i-00000000000000001"]  # urgent: gave its address back
    rest = [f"i-0000000000000010{i}" for i in range(5)]
    owe_compute(w, gone + rest, "ingest batch", urgent=gone)  # type: ignore[arg-type]
    assert sorted(m.workload_id for m in store.owed_compute()) == rest, "one throttled write lost other marks"
    assert counted == [(COMPUTE_OWED_NOT_MARKED, 1)]
    # and within a lane: the second of three ordinary marks throttled
    left[0] = 0
    seen = [0]

    def second(params: dict[str, Any], **_: Any) -> None:
        if params.get("Key", {}).get("pk") == "owed#ingest":
            seen[0] += 1
            if seen[0] == 2:
                raise throttled("UpdateItem")

    env.hook("before-parameter-build.dynamodb.UpdateItem", second)
    # clients copy the session's handlers when made: a store made after the hook
    w.store = store = DynamoStore(
        "rf-inventory", "rf-state", "rf-audit", resource=clients.resource("dynamodb"), owed_writer="ingest"
    )
    later = ["i-00000000000000201", "i-00000000000000202", "i-00000000000000203"]
    owe_compute(w, later, "ingest batch")  # type: ignore[arg-type]
    marked = {m.workload_id for m in store.owed_compute()}
    assert {later[0], later[2]} <= marked and later[1] not in marked
    assert counted[-1] == (COMPUTE_OWED_NOT_MARKED, 1)


def test_attack_a_nonce_less_owed_mark_blocks_no_drain_and_is_handed_on(env: Env) -> None:
    """A writer of an owed partition (gcpevents and azureevents take internet-fed events)
    leaves a mark without its nonce, as both deployments' grants allow. Before: every read of the
    marks raised KeyError, swallowed by each pass, so no mark was ever drained again (a removal
    owed stayed owed for good)."""
    env.provision_example_policy()
    env.store.owe_compute(["i-0000000000000dead"], urgent=True)  # a removal owed
    for fn in ("gcpevents", "azureevents", "ingest"):  # each in its own partition
        req = {
            "Key": {"pk": f"owed#{fn}", "sk": owed_key("i-0000000000000beef")},
            "UpdateExpression": "SET urgent = :u REMOVE nonce",
            "ExpressionAttributeValues": {":u": True},
            "TableName": env.store.state.name,
        }
        for statements in (sam_statements(fn), terraform_statements(fn)):
            assert all(allowed(statements, r) for r in requests_of("UpdateItem", req)), fn
    env.store.state.update_item(
        Key=req["Key"],
        UpdateExpression=req["UpdateExpression"],
        ExpressionAttributeValues=req["ExpressionAttributeValues"],
    )
    sent = compute_messages(env)
    reconcile_container(env)
    env.fn["reconcile"].handler(_scheduled(), _ctx())
    assert any(u and "i-0000000000000dead" in ids for u, ids in sent), "the owed removal is never handed on"
    assert any("i-0000000000000beef" in ids for _, ids in sent), "the malformed mark is a workload owed too"
    assert env.store.owed_compute() == [], "a drained mark, malformed or not, stays"


def test_a_malformed_mark_written_again_after_the_drain_read_it_survives_the_drain(env: Env) -> None:
    """The drain deletes a mark it read without a nonce only while it still has none: a failure
    that marks the workload again meanwhile (a fresh nonce) keeps its mark for the next drain."""
    env.store.state.update_item(
        Key={"pk": "owed#ingest", "sk": owed_key("i-a")},
        UpdateExpression="SET urgent = :u",
        ExpressionAttributeValues={":u": False},
    )
    env.store.state.put_item(Item={"pk": "owed#ingest", "sk": owed_key("i-b"), "nonce": 7, "urgent": False})
    marks = env.store.owed_compute()
    assert sorted((m.workload_id, m.nonce) for m in marks) == [("i-a", ""), ("i-b", "")]
    env.store.owe_compute(["i-a"])
    assert env.store.settle_owed(marks) == ["i-b"]
    assert [m.workload_id for m in env.store.owed_compute()] == ["i-a"]
