"""Governed labels decided by the time of each write, attacked through the real pipeline (moto
EventBridge → SQS → ingest / reconcile → compute → S3).

The rule: a privileged value is in force only while the *last* write of its dimension that
governance knows of (by the call's CloudTrail time; an observation of another value counts as a
write by nobody known) set exactly that value and was an allowed tagger's call or an admin grant
that still stands. Each test performs an attack that worked when approvals were decided from the
stored state alone, and asserts that it fails: the developer's box is in no production host's
SSH peer set, and where the developer made the move a finding names them.
"""

from __future__ import annotations

import datetime as dt
from typing import Any

import pytest

from ringfence.store.dynamodb import DynamoStore
from tests.aws.conftest import Env
from tests.aws.test_governance import (
    DEVELOPER,
    ESCALATION,
    TAGGER_ROLE,
    create_tags_event,
    governed_estate,
    retag,
    ssh_peers,
)
from tests.aws.test_pipeline import _ctx, _scheduled

REVOKE = {"ringfence:app": "ordering", "ringfence:role": "web", "ringfence:env": "dev"}


def _tag_live(env: Env, iid: str, tags: dict[str, str]) -> None:
    """Tag the live instance only: its events are delivered later (or never)."""
    env.ec2.create_tags(Resources=[iid], Tags=[{"Key": k, "Value": v} for k, v in tags.items()])


def _held_by(env: Env, since: int) -> list[str]:
    return [a.principal for a in env.store.audit_log()[since:] if a.action == "label.held"]


def _not_privileged(env: Env, est: dict[str, Any]) -> None:
    rec = env.store.get(est["dev"])
    assert rec.labels.get("role") != "jumpbox" and rec.labels.get("app") != "admin", rec.labels
    assert rec.workload.held_labels is not None
    assert not any(ssh_peers(env, est).values()), "the developer's box is a production host's SSH peer"


def test_attack_delayed_tagger_approval_after_a_revocation_approves_nothing(env: Env) -> None:
    """The tagging role set jumpbox at t1 (its CloudTrail event lags), then revoked it; the
    developer set jumpbox again (held, a finding). The t1 event, delivered last (a late delivery
    or a DLQ redrive), is older than the revocation: it approves nothing."""
    est = governed_estate(env)
    dev = est["dev"]
    t1 = dt.datetime.now(dt.UTC) - dt.timedelta(minutes=10)
    retag(env, dev, ESCALATION, None)
    late = create_tags_event(dev, ESCALATION, TAGGER_ROLE)
    late["time"] = t1.strftime("%Y-%m-%dT%H:%M:%SZ")
    retag(env, dev, REVOKE, TAGGER_ROLE, version=3)
    assert env.store.get(dev).labels["role"] == "web"
    n = len(env.store.audit_log())
    retag(env, dev, ESCALATION, DEVELOPER, version=4)
    assert _held_by(env, n) == [DEVELOPER]
    env.put(late)
    env.pump()
    _not_privileged(env, est)
    assert not [a for a in env.store.audit_log()[n:] if a.action == "label.approve"]
    # the tagging role approving it now (a call after the developer's) does put it in force
    approve = create_tags_event(dev, ESCALATION, TAGGER_ROLE)
    approve["time"] = (dt.datetime.now(dt.UTC) + dt.timedelta(seconds=2)).strftime("%Y-%m-%dT%H:%M:%SZ")
    env.put(approve)
    env.pump()
    assert env.store.get(dev).labels["role"] == "jumpbox"


def test_attack_revocation_coalesced_with_a_reescalation_is_held_and_names_the_developer(env: Env) -> None:
    """Approved jumpbox; the tagging role revokes it and, before ingest describes the instance,
    the developer puts it back: no observation sees the value change. The developer's call, after
    the approval, takes it back (held, a finding), whatever order the events arrive in."""
    est = governed_estate(env)
    dev = est["dev"]
    retag(env, dev, ESCALATION, TAGGER_ROLE)
    assert env.store.get(dev).labels["role"] == "jumpbox"
    n = len(env.store.audit_log())
    _tag_live(env, dev, REVOKE)
    _tag_live(env, dev, ESCALATION)
    revoke = create_tags_event(dev, REVOKE, TAGGER_ROLE)
    again = create_tags_event(dev, ESCALATION, DEVELOPER)
    # one second apart, as CloudTrail records them (the revocation first)
    later = dt.datetime.now(dt.UTC) + dt.timedelta(seconds=1)
    again["time"] = later.strftime("%Y-%m-%dT%H:%M:%SZ")
    env.put(env.tag_event(dev, REVOKE, version=3))
    env.put(env.tag_event(dev, ESCALATION, version=4))
    env.put(again)  # the developer's call delivered first
    env.put(revoke)
    env.pump()
    _not_privileged(env, est)
    assert _held_by(env, n) == [DEVELOPER]


def test_attack_grant_does_not_outlive_a_revocation(env: Env) -> None:
    """An incident's admin grant of jumpbox stands while the box stays a jumpbox; once the tagging
    role takes the tags off, the developer putting them back is held and named."""
    from ringfence.clouds.aws.wiring import Wiring
    from ringfence.control.governance import bind_labels
    from ringfence.control.wiring import Config

    est = governed_estate(env)
    dev = est["dev"]
    retag(env, dev, ESCALATION, DEVELOPER)
    bind_labels(
        Wiring(Config.from_env()),
        dev,
        {"role": "jumpbox", "app": "admin"},
        "arn:aws:iam::123456789012:user/alice",
        "INC-42 temporary bastion",
    )
    env.pump()
    assert env.store.get(dev).labels["role"] == "jumpbox"
    assert env.store.get(dev).workload.label_grants == {"role": "jumpbox", "app": "admin"}
    retag(env, dev, REVOKE, TAGGER_ROLE, version=3)
    assert env.store.get(dev).labels["role"] == "web"
    assert env.store.get(dev).workload.label_grants == {}, "the grant ended with the revocation"
    n = len(env.store.audit_log())
    retag(env, dev, ESCALATION, DEVELOPER, version=4)
    _not_privileged(env, est)
    assert _held_by(env, n) == [DEVELOPER]


@pytest.mark.slow
def test_attack_reconcile_snapshot_does_not_restore_a_revoked_privilege(env: Env, monkeypatch: Any) -> None:
    """Reconcile lists the estate while jumpbox is approved; meanwhile the tagging role revokes it
    (stored: web) and the developer sets it again. Reconcile decides from the record as stored
    when it writes, not from its snapshot: the developer's jumpbox is held, and their call named."""
    est = governed_estate(env)
    dev = est["dev"]
    retag(env, dev, ESCALATION, TAGGER_ROLE)
    assert env.store.get(dev).labels["role"] == "jumpbox"
    n = len(env.store.audit_log())
    orig = DynamoStore.all_records
    state: dict[str, Any] = {}

    def all_records(self: DynamoStore) -> list[Any]:
        snap = orig(self)
        if not state:
            retag(env, dev, REVOKE, TAGGER_ROLE, version=3)
            state["revoked"] = env.store.get(dev)
            _tag_live(env, dev, ESCALATION)
        return snap

    monkeypatch.setattr(DynamoStore, "all_records", all_records)
    env.fn["reconcile"].handler(_scheduled(), _ctx())
    monkeypatch.setattr(DynamoStore, "all_records", orig)
    assert state["revoked"].labels["role"] == "web"
    env.pump()
    _not_privileged(env, est)
    env.put(env.tag_event(dev, {**REVOKE, **ESCALATION}, version=9))
    env.put(create_tags_event(dev, ESCALATION, DEVELOPER))
    env.pump()
    _not_privileged(env, est)
    assert _held_by(env, n) == [DEVELOPER]


def test_attack_reconcile_snapshot_does_not_undo_an_approval_that_landed_meanwhile(env: Env, monkeypatch: Any) -> None:
    """The reverse: the tagging role's approval is stored after reconcile's snapshot. Reconcile
    must not re-hold it (nothing would ever lift that hold: reconcile and the aws.tag event name
    nobody)."""
    est = governed_estate(env)
    dev = est["dev"]
    _tag_live(env, dev, ESCALATION)
    orig = DynamoStore.all_records
    state: dict[str, Any] = {}

    def all_records(self: DynamoStore) -> list[Any]:
        snap = orig(self)
        if not state:
            env.put(create_tags_event(dev, ESCALATION, TAGGER_ROLE))
            env.drain("ingest", "ingest")
            state["approved"] = env.store.get(dev)
        return snap

    monkeypatch.setattr(DynamoStore, "all_records", all_records)
    env.fn["reconcile"].handler(_scheduled(), _ctx())
    monkeypatch.setattr(DynamoStore, "all_records", orig)
    env.pump()
    assert state["approved"].labels["role"] == "jumpbox"
    rec = env.store.get(dev)
    assert rec.labels["role"] == "jumpbox" and rec.workload.held_labels is None
    assert all(ssh_peers(env, est).values())


def test_attack_a_concurrent_newer_observation_does_not_drop_the_developers_call(env: Env, monkeypatch: Any) -> None:
    """Approved jumpbox; revoked and put back by the developer (no observation saw it). The
    developer's CloudTrail call is ingested while another invocation stores a newer observation of
    the instance between this one's read and its write: the call is recorded on top of the newer
    observation (held, named), not dropped with the older one."""
    est = governed_estate(env)
    dev = est["dev"]
    retag(env, dev, ESCALATION, TAGGER_ROLE)
    n = len(env.store.audit_log())
    _tag_live(env, dev, REVOKE)
    _tag_live(env, dev, ESCALATION)
    orig = DynamoStore.get_many
    state: dict[str, Any] = {}

    def get_many(self: DynamoStore, ids: list[str]) -> dict[str, Any]:
        read = orig(self, ids)
        if not state and dev in ids:
            state["racing"] = True
            # another invocation (a state-change event) describes later and writes first
            env.put(env.state_event(dev, "running"))
            env.drain("ingest", "ingest")
            state["between"] = env.store.get(dev)
        return read

    monkeypatch.setattr(DynamoStore, "get_many", get_many)
    env.put(create_tags_event(dev, ESCALATION, DEVELOPER))
    env.drain("ingest", "ingest")
    monkeypatch.setattr(DynamoStore, "get_many", orig)
    env.pump()
    assert state.get("between") is not None and state["between"].labels["role"] == "jumpbox"
    _not_privileged(env, est)
    assert _held_by(env, n) == [DEVELOPER]
