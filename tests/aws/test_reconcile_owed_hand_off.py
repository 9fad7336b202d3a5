"""Reconcile: what a run stored and then failed to hand to compute is marked owed in the store, and
a later run hands it on however long the compute queue refused, past RINGFENCE_GONE_RESEND_WINDOW
too (before, a queue outage longer than the window lost a removal until a rebuild, and a tag
change or a stop whose hand-off failed was never handed on). Against the moto server, through the
real reconcile, compute and agent-API handlers; the marks' writes and deletes recorded and judged
against both deployments' IAM."""

from __future__ import annotations

import pytest
from botocore.exceptions import ClientError

from ringfence.store.base import OWED_WRITERS
from tests.aws.conftest import Env, ip_of
from tests.aws.test_function_iam import (
    SAM,
    Recorder,
    Request,
    allowed,
    refusals,
    sam_statements,
    terraform_statements,
)
from tests.aws.test_pipeline import _ctx, _scheduled, boot, in_set
from tests.aws.test_reconcile_gone_hand_off import compute_messages, leaves_listing, reconcile_container


def owed(env: Env) -> list[str]:
    return sorted(m.workload_id for m in env.store.owed_compute())


def marked(rec: Recorder) -> set[str]:
    """The kinds of owed-mark writes reconcile made."""
    return {
        a
        for a, t, c in rec.calls.get("reconcile", [])
        if t == "state" and c.get("dynamodb:LeadingKeys") == ["owed#reconcile"]
    }


def test_attack_a_removal_refused_by_compute_for_longer_than_the_resend_window_still_leaves_its_peers_sets(
    env: Env, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The database terminates with no event reaching ingest; reconcile stores its tombstone and
    compute's queue refuses the hand-off. The outage outlasts the re-send window (0 s here: every
    later run finds the tombstone outside it). The next run, the queue healthy, must still hand
    the database to compute in the priority lane, and the processing hosts' sets drop it."""
    monkeypatch.setenv("RINGFENCE_GONE_RESEND_WINDOW", "0")
    est = boot(env)
    db, proc = est["ids"]["db"][0], est["ids"]["proc"][0]
    db_ip = ip_of(env, db)
    assert in_set(env.bundle(proc), db_ip)
    env.ec2.terminate_instances(InstanceIds=[db])  # its event lost
    leaves_listing(env, db)
    sent = compute_messages(env, refuse=1)
    reconcile_container(env)
    rec = Recorder(env)
    with pytest.raises(ClientError, match="ServiceUnavailable"):
        env.fn["reconcile"].handler(_scheduled(), _ctx())
    assert env.store.get(db).state == "terminated" and not sent
    assert owed(env) == [db], "the refused removal was not marked owed"
    assert [m.urgent for m in env.store.owed_compute()] == [True]
    env.pump()
    assert in_set(env.bundle(proc), db_ip), "compute never heard"
    env.fn["reconcile"].handler(_scheduled(), _ctx())  # past the window: only the mark names it
    env.pump()
    assert (True, [db]) in sent, "the owed removal was not handed on in the priority lane"
    assert not in_set(env.bundle(proc), db_ip), "the gone database is still allowed in its peers' sets"
    assert owed(env) == [], "a mark handed on stays"
    assert {"UpdateItem", "DeleteItem"} <= marked(rec)
    assert not refusals(rec, ("reconcile",))


def test_a_tag_change_a_run_stored_whose_hand_off_failed_is_handed_on_by_the_next_run(env: Env) -> None:
    """A web host loses its role tag with no event reaching ingest: reconcile stores the drift,
    then compute's queue refuses it. The next run finds nothing more to store (the window covers
    tombstones only): the mark hands it on, and the processing host's sets drop the web host."""
    est = boot(env)
    web, proc = est["ids"]["web"][0], est["ids"]["proc"][0]
    web_ip = ip_of(env, web)
    assert in_set(env.bundle(proc), web_ip)
    env.ec2.delete_tags(Resources=[web], Tags=[{"Key": "ringfence:role"}])  # its event lost
    sent = compute_messages(env, refuse=1)
    reconcile_container(env)
    with pytest.raises(ClientError, match="ServiceUnavailable"):
        env.fn["reconcile"].handler(_scheduled(), _ctx())
    assert "role" not in env.store.get(web).labels, "the run stored the drift"
    assert [(m.workload_id, m.urgent) for m in env.store.owed_compute()] == [(web, False)]
    env.pump()
    assert in_set(env.bundle(proc), web_ip), "compute never heard"
    second = env.fn["reconcile"].handler(_scheduled(), _ctx())
    assert second["changed"] == [], "nothing more to store: only the mark hands it on"
    env.pump()
    assert any(web in ids for _, ids in sent)
    assert not in_set(env.bundle(proc), web_ip), "the retagged host is still allowed as web"
    assert owed(env) == []


def test_a_drain_refused_by_compute_keeps_the_marks(env: Env) -> None:
    """The queue still refuses when the next run drains: the marks stay for the run after."""
    env.provision_example_policy()
    env.store.owe_compute(["i-0000000000000dead"], urgent=True)
    sent = compute_messages(env, refuse=1)
    reconcile_container(env)
    env.fn["reconcile"].handler(_scheduled(), _ctx())
    assert not any("i-0000000000000dead" in ids for _, ids in sent)
    assert owed(env) == ["i-0000000000000dead"]
    env.fn["reconcile"].handler(_scheduled(), _ctx())
    assert (True, ["i-0000000000000dead"]) in sent and owed(env) == []


MARKS = {"ingest", "lifecycle", "gcpevents", "azureevents"}  # the functions whose hand-offs may fail
DRAINS = {"reconcile", "cloudreconcile"}  # the scheduled passes: they mark and drain
SERVE = "serve"  # ringfence serve --store aws: marks with the operator's credentials


def test_each_owed_partition_is_granted_to_its_writer_alone_and_drained_by_the_passes() -> None:
    """In template.yaml and in infra/ alike: a mark's write (DynamoStore.owe_compute) to the
    functions that hand on what they store, each in its own partition (owed#<function>) and in no
    other function's, nor serve's, nor the legacy ``owed`` one (a compromised writer can delay
    only its own marks), the conditional delete in every owed partition (serve's too) to the
    scheduled passes alone, and with those grants no other item of the state table (the same
    attributes elsewhere)."""
    attrs = ["nonce", "pk", "sk", "urgent"]
    partitions = ["owed", *(f"owed#{w}" for w in OWED_WRITERS)]
    # owed#serve: `ringfence serve --store aws`'s (the operator's credentials), written by no
    # Lambda role (the loop below: another's partition to each) and drained by the passes
    assert set(OWED_WRITERS) == MARKS | DRAINS | {SERVE}
    assert SERVE not in SAM

    def mark(pk: str) -> Request:
        return ("UpdateItem", "state", {"dynamodb:LeadingKeys": [pk], "dynamodb:Attributes": attrs})

    def drain(pk: str) -> Request:
        return ("DeleteItem", "state", {"dynamodb:LeadingKeys": [pk], "dynamodb:Attributes": ["nonce", "pk", "sk"]})

    for fn in SAM:
        for where, statements_of in (("template.yaml", sam_statements), ("infra/", terraform_statements)):
            statements = statements_of(fn)
            assert allowed(statements, mark(f"owed#{fn}")) == (fn in MARKS | DRAINS), (where, fn, "mark")
            for pk in partitions:
                if pk != f"owed#{fn}":
                    assert not allowed(statements, mark(pk)), (where, fn, "writes another's partition", pk)
                assert allowed(statements, drain(pk)) == (fn in DRAINS), (where, fn, "drain", pk)
            if fn in MARKS | DRAINS:
                for pk in ("policy", "engine", f"bundle#{'i-1'}", "owedx", "owed#", "owed#compute", "quarantine"):
                    for action in ("UpdateItem", "DeleteItem"):
                        other = (action, "state", {"dynamodb:LeadingKeys": [pk], "dynamodb:Attributes": attrs})
                        assert not allowed(statements, other), (where, fn, action, pk)
