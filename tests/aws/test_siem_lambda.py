"""``RINGFENCE_SIEM`` in the functions: the real admin function (moto server behind it) sends each
audit record it writes to the stack's EventBridge bus as OCSF API Activity, next to the chain."""

from __future__ import annotations

import json
import time
from typing import Any

import boto3
import pytest

from tests.aws.conftest import OPERATOR, Env
from tests.aws.test_pipeline import boot
from tests.siem.test_siem import validate


def siem_sink(env: Env, monkeypatch: pytest.MonkeyPatch) -> tuple[Any, str]:
    """The stack's SIEM bus (``RINGFENCE_SIEM``) with a rule sending Ringfence's events to an SQS
    queue the test reads; the functions load again to take the setting. (sqs client, queue url)"""
    events, sqs = boto3.client("events"), boto3.client("sqs")
    events.create_event_bus(Name="rf-siem")
    q = sqs.create_queue(QueueName="siem-sink")["QueueUrl"]
    arn = sqs.get_queue_attributes(QueueUrl=q, AttributeNames=["QueueArn"])["Attributes"]["QueueArn"]
    events.put_rule(Name="ocsf", EventBusName="rf-siem", EventPattern=json.dumps({"source": ["ringfence"]}))
    events.put_targets(Rule="ocsf", EventBusName="rf-siem", Targets=[{"Id": "q", "Arn": arn}])
    monkeypatch.setenv("RINGFENCE_SIEM", "eventbridge:rf-siem")
    env.load_functions()  # the functions' wiring reads the environment when first used
    return sqs, q


def test_the_admin_function_sends_its_audit_records_to_eventbridge(env: Env, monkeypatch: pytest.MonkeyPatch) -> None:
    est = boot(env)
    sqs, q = siem_sink(env, monkeypatch)
    db = est["ids"]["db"][0]
    status, _, body = env.rest("admin", "POST", f"/admin/workloads/{db}/quarantine", {"reason": "IR-3"})
    assert status == 200, body
    got: list[dict[str, Any]] = []
    deadline = time.time() + 20
    while not got and time.time() < deadline:
        got = [json.loads(m["Body"]) for m in sqs.receive_message(QueueUrl=q, WaitTimeSeconds=1).get("Messages", [])]
    (event,) = got
    assert event["detail-type"] == "OCSF API Activity"
    detail = event["detail"]
    validate(detail)
    last = env.store.audit_log()[-1]
    assert detail["unmapped"]["audit"]["hash"] == last.hash and last.action == "workload.quarantine"
    assert detail["actor"]["user"]["name"] == OPERATOR and detail["resources"][0]["uid"] == db


def test_a_governance_finding_reaches_the_siem_as_a_detection_finding(
    env: Env, monkeypatch: pytest.MonkeyPatch, tmp_path: Any
) -> None:
    from tests.aws.test_governance import DEVELOPER, ESCALATION, governed_estate, retag

    out = tmp_path / "siem.jsonl"
    monkeypatch.setenv("RINGFENCE_SIEM", f"file:{out}")
    env.load_functions()
    est = governed_estate(env)
    retag(env, est["dev"], ESCALATION, DEVELOPER)
    events = [json.loads(line) for line in out.read_text().splitlines()]
    for e in events:
        validate(e)
    (finding,) = [e for e in events if e["class_uid"] == 2004]
    assert finding["resources"][0]["uid"] == est["dev"] and finding["severity_id"] == 4
    assert finding["unmapped"]["ringfence"]["principal"] == DEVELOPER
    held = [e for e in events if e["class_uid"] == 6003 and e["api"]["operation"] == "label.held"]
    assert len(held) == 1, "the audit record of the hold is there too"


def test_the_reconcile_function_announces_an_agent_behind_its_policy(
    env: Env, monkeypatch: pytest.MonkeyPatch, tmp_path: Any
) -> None:
    """The scheduled reconcile function sends effective-policy findings to the SIEM once each: an
    enrolled agent whose heartbeat says it enforces an older version than the one published
    longer than the bound ago."""
    from ringfence.store.base import EnforcementReport
    from tests.aws.test_pipeline import _ctx, _scheduled

    out = tmp_path / "siem.jsonl"
    monkeypatch.setenv("RINGFENCE_SIEM", f"file:{out}")
    env.load_functions()
    est = boot(env)
    env.pump()
    db = est["ids"]["db"][0]
    ptr = env.store.bundle_pointer(db)
    assert ptr is not None
    env.store.set_liveness(db, enrolled=True, heartbeat=time.time())
    env.store.put_enforcement(
        EnforcementReport(workload_id=db, time=time.time(), version=ptr.version - 1, latest_version=ptr.version)
    )
    env.store.put_bundle_pointer(ptr.model_copy(update={"published_at": time.time() - 600}))
    first = env.fn["reconcile"].handler(_scheduled(), _ctx())
    again = env.fn["reconcile"].handler(_scheduled(), _ctx())
    assert first["findings_announced"] == 1 and again["findings_announced"] == 0
    (finding,) = [
        e
        for e in map(json.loads, out.read_text().splitlines())
        if e["class_uid"] == 2004 and e["finding_info"]["analytic"]["name"].startswith("effective-policy/")
    ]
    validate(finding)
    assert finding["resources"][0]["uid"] == db
    assert finding["finding_info"]["analytic"]["name"] == "effective-policy/not-enforced"
