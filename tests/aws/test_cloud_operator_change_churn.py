"""An EC2 instance's ``governed_rev`` moves on ordinary governance decisions (each write of a
governed tag: its tag event and its CloudTrail call), which anyone who may tag it makes (a
developer, the tagging role, the instance itself). An operator's change of a cloud workload is
therefore not conditional on it (a cloud id is never reused: there is no other host to protect):
a tag write landing between the change's read and its write neither refuses a quarantine nor a
binding, which is decided again over it. The real AWS functions over moto."""

from __future__ import annotations

import datetime as dt
from typing import Any

import pytest

from ringfence.control import admin as admin_service
from tests.aws.conftest import ACCOUNT, Env
from tests.aws.test_admin_bind import AUTHORS, bind, held_estate
from tests.aws.test_governance import DEVELOPER, TAGGER_ROLE, governed_estate, retag

RITA = f"arn:aws:iam::{ACCOUNT}:user/rita"  # incident-responder


def test_a_developers_tag_write_between_a_quarantines_read_and_write_does_not_refuse_it(
    env: Env, monkeypatch: pytest.MonkeyPatch
) -> None:
    dev = governed_estate(env)["dev"]
    env.bind(RITA, ["incident-responder"])
    rev0 = env.store.get(dev).governed_rev
    real = admin_service.is_deregistered  # called once the route has read the record
    done: list[int] = []

    def meanwhile(*args: Any, **kwargs: Any) -> Any:
        if not done:
            done.append(1)  # the developer writes the governed role (held or not: decided, a new version)
            retag(env, dev, {"ringfence:role": "processing"}, DEVELOPER, version=3)
        return real(*args, **kwargs)

    monkeypatch.setattr(admin_service, "is_deregistered", meanwhile)
    status, _, answer = env.rest(
        "admin", "POST", f"/admin/workloads/{dev}/quarantine", {"reason": "IR-1"}, principal=RITA
    )
    rec = env.store.get(dev)
    assert done and rec.governed_rev != rev0, "the tag write landed between the read and the write"
    assert status == 200, answer
    assert rec.op_quarantined
    assert not [a for a in env.store.audit_log() if a.action == "workload.quarantine.failed"]


def test_a_taggers_write_of_another_governed_key_inside_a_binding_is_decided_again_not_refused(env: Env) -> None:
    dev = held_estate(env)["dev"]
    env.bind(AUTHORS, ["policy-author"])
    budget, inside = [1], [False]

    def tagger_write_first(params: dict[str, Any], **_: Any) -> None:
        """Before the binding's record write (its first): the tagging role approves app=admin."""
        key = params.get("Key", {}).get("id")
        if inside[0] or budget[0] <= 0 or params.get("TableName") != "rf-inventory" or key not in (dev, {"S": dev}):
            return
        if "workload = :w" not in str(params.get("UpdateExpression")):
            return
        budget[0] -= 1
        inside[0] = True
        try:
            # a second after the developer's escalation: CloudTrail says whole seconds, and in the
            # same second a tagger's call never outranks another principal's (fail closed)
            later = dt.datetime.now(dt.UTC) + dt.timedelta(seconds=1)
            retag(env, dev, {"ringfence:app": "admin"}, TAGGER_ROLE, version=7, at=later)
        finally:
            inside[0] = False

    env.load_functions()
    env.hook("before-parameter-build.dynamodb.UpdateItem", tagger_write_first)
    rev0 = env.store.get(dev).governed_rev
    status, answer = bind(env, dev, {"labels": {"role": "jumpbox"}, "reason": "CHG-8"})
    rec = env.store.get(dev)
    assert budget[0] == 0 and rec.governed_rev > rev0, "the tagger's write landed inside the binding"
    assert status == 200, answer
    assert rec.workload.label_grants.get("role") == "jumpbox"
    assert rec.labels.get("app") == "admin"  # the tagger's approval stands beside it
