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


def test_the_admin_function_sends_its_audit_records_to_eventbridge(env: Env, monkeypatch: pytest.MonkeyPatch) -> None:
    est = boot(env)
    events, sqs = boto3.client("events"), boto3.client("sqs")
    events.create_event_bus(Name="rf-siem")
    q = sqs.create_queue(QueueName="siem-sink")["QueueUrl"]
    arn = sqs.get_queue_attributes(QueueUrl=q, AttributeNames=["QueueArn"])["Attributes"]["QueueArn"]
    events.put_rule(Name="ocsf", EventBusName="rf-siem", EventPattern=json.dumps({"source": ["ringfence"]}))
    events.put_targets(Rule="ocsf", EventBusName="rf-siem", Targets=[{"Id": "q", "Arn": arn}])
    monkeypatch.setenv("RINGFENCE_SIEM", "eventbridge:rf-siem")
    env.load_functions()  # the functions' wiring reads the environment when first used
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
