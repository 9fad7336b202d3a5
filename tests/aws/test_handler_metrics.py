"""What the handlers publish (CloudWatch embedded metric format on stdout) and how they parse:
compute's failure metric (its Errors alarm cannot see a handled failure), lifecycle and WebSocket
metrics, ingest counting events that are not about instances."""

from __future__ import annotations

import json
from typing import Any

import pytest

from tests.aws.conftest import Env, LambdaContext, fixture
from tests.aws.test_pipeline import boot


def emitted(text: str) -> dict[str, float]:
    """Metric name → sum of the values in the EMF documents printed to stdout."""
    out: dict[str, float] = {}
    for line in text.splitlines():
        try:
            doc = json.loads(line)
        except ValueError:
            continue
        if not isinstance(doc, dict) or "_aws" not in doc:
            continue
        assert doc["_aws"]["CloudWatchMetrics"][0]["Namespace"] == "Ringfence"
        for m in doc["_aws"]["CloudWatchMetrics"][0]["Metrics"]:
            values = doc[m["Name"]]
            out[m["Name"]] = out.get(m["Name"], 0) + sum(values if isinstance(values, list) else [values])
    return out


def test_a_failed_computation_is_counted_and_its_batch_handed_back(
    env: Env, capsys: pytest.CaptureFixture[str]
) -> None:
    est = boot(env)
    capsys.readouterr()

    def fail(**_: Any) -> None:
        raise RuntimeError("SQS is down")

    new = est["run"]("web", est["subnets"]["web"], 1)[0]
    env.put(env.state_event(new, "running"))
    env.drain("ingest", "ingest")
    env.load_functions()  # fresh containers, so their clients carry the hook
    env.hook("before-call.sqs.SendMessage", fail)  # compute cannot hand its bundles on
    (out,) = env.drain("compute", "compute")
    assert out["batchItemFailures"], "the whole batch goes back to the queue"
    assert emitted(capsys.readouterr().out).get("ComputeFailures") == 1
    assert env.count("compute") >= 1, "the failed messages wait for the retry"


def test_a_failed_publish_job_is_counted_and_handed_back(env: Env, capsys: pytest.CaptureFixture[str]) -> None:
    est = boot(env)
    new = est["run"]("web", est["subnets"]["web"], 1)[0]
    env.put(env.state_event(new, "running"))
    env.drain("ingest", "ingest")
    env._drain("compute", "compute")  # compute fans the new bundle out
    capsys.readouterr()

    def fail(**_: Any) -> None:
        raise RuntimeError("S3 is down")

    env.load_functions()  # a fresh publish container, its clients made with the hook
    env.hook("before-call.s3.PutObject", fail)
    (out,) = env._drain("publish", "publish")
    assert out["batchItemFailures"], "the job goes back to the queue"
    assert emitted(capsys.readouterr().out).get("PublishFailures") == 1
    assert env.count("publish") >= 1 and env.store.bundle_pointer(new) is None


def test_a_successful_computation_counts_no_failure(env: Env, capsys: pytest.CaptureFixture[str]) -> None:
    boot(env)
    got = emitted(capsys.readouterr().out)
    assert got.get("BundlesPublished", 0) >= 5 and "ComputeFailures" not in got


def test_lifecycle_counts_actions_and_failures(env: Env, capsys: pytest.CaptureFixture[str]) -> None:
    est = boot(env)
    capsys.readouterr()
    env.asg.set_desired_capacity(AutoScalingGroupName="rf-web-asg", DesiredCapacity=1)
    (new,) = env.asg_instances()
    env.put(env.lifecycle_event(new, launching=True))
    bad = env.lifecycle_event(est["ids"]["web"][0], launching=True)
    del bad["detail"]["LifecycleActionToken"]
    env.put(bad)
    (out,) = env.drain("lifecycle", "lifecycle")
    assert len(out["batchItemFailures"]) == 1, "the malformed action is retried, then redriven to the DLQ"
    got = emitted(capsys.readouterr().out)
    assert got.get("LifecycleActions") == 1 and got.get("LifecycleActionsFailed") == 1
    assert got.get("InventoryChanges", 0) >= 1, "the launching instance entered the inventory"


def test_an_event_not_about_instances_is_counted_not_dead_lettered(
    env: Env, capsys: pytest.CaptureFixture[str]
) -> None:
    ev = fixture("cloudtrail-create-tags.json")  # tags on a volume only: valid, not about instances
    ev["detail"]["requestParameters"]["resourcesSet"]["items"] = [{"resourceId": "vol-0abc"}]
    env.put(ev)
    msgs = env.receive("ingest")
    assert len(msgs) == 1
    out = env.fn["ingest"].handler(env.sqs_event(msgs), LambdaContext())
    assert out == {"batchItemFailures": []}
    assert env.receive("dlq") == []
    assert emitted(capsys.readouterr().out).get("EventsIgnored") == 1


def test_websocket_connections_are_counted(env: Env, capsys: pytest.CaptureFixture[str]) -> None:
    from ringfence.control.api import secret_hash
    from ringfence.model import Workload
    from ringfence.store.base import InventoryRecord

    # a running workload's current token (a token of a workload not in inventory connects nothing)
    env.store.observe(InventoryRecord(id="i-0abc", workload=Workload(id="i-0abc", cloud="aws"), observed_at=1.0))
    env.store.put_token(secret_hash("good-token"), "i-0abc", 600)

    def route(key: str, token: str | None = None) -> dict[str, Any]:
        event = {
            "requestContext": {"routeKey": key, "connectionId": "conn-1", "eventType": "CONNECT", "stage": "v1"},
            "queryStringParameters": None,
            "headers": {"Authorization": f"Bearer {token}"} if token else {},
            "isBase64Encoded": False,
        }
        return env.fn["wsconnect"].handler(event, LambdaContext())  # type: ignore[no-any-return]

    assert route("$connect", "good-token")["statusCode"] == 200
    assert route("$connect", "stale-token")["statusCode"] == 401
    assert route("$connect")["statusCode"] == 401
    assert route("$disconnect")["statusCode"] == 200
    got = emitted(capsys.readouterr().out)
    assert (got.get("NudgeConnections"), got.get("NudgeConnectionsRefused"), got.get("NudgeDisconnects")) == (1, 2, 1)


def test_ingest_parses_each_record_once(env: Env, monkeypatch: pytest.MonkeyPatch) -> None:
    """The batch's describe and each event's apply work from one parse of the record's body."""
    from ringfence.events import Envelope

    est = boot(env)
    parsed: list[str] = []
    real_json, real_obj = Envelope.model_validate_json, Envelope.model_validate

    def count_json(data: Any, **kw: Any) -> Envelope:
        parsed.append("json")
        return real_json(data, **kw)

    def count_obj(obj: Any, **kw: Any) -> Envelope:
        parsed.append("dict")
        return real_obj(obj, **kw)

    monkeypatch.setattr(Envelope, "model_validate_json", count_json)
    monkeypatch.setattr(Envelope, "model_validate", count_obj)
    env.ec2.stop_instances(InstanceIds=est["ids"]["web"])
    for iid in est["ids"]["web"]:
        env.put(env.state_event(iid, "stopped"))
    msgs = env.receive("ingest")
    assert len(msgs) == 2
    out = env.fn["ingest"].handler(env.sqs_event(msgs), LambdaContext())
    assert out == {"batchItemFailures": []}
    assert parsed == ["json", "json"]
    assert {env.store.get(i).state for i in est["ids"]["web"]} == {"stopped"}


def test_agent_and_admin_apis_count_enrollments_refusals_and_actions(
    env: Env, capsys: pytest.CaptureFixture[str]
) -> None:
    from tests.aws.test_pipeline import AgentKey, enroll_iid

    est = boot(env)
    web = est["ids"]["web"][0]
    capsys.readouterr()
    assert enroll_iid(env, web)[0] == 200
    assert enroll_iid(env, web, key=AgentKey())[0] == 401  # the same document, another key: refused
    assert env.rest("agentapi", "GET", f"/v1/agents/{web}/bundle", headers={"Authorization": "Bearer x"})[0] == 401
    assert env.rest("agentapi", "POST", "/v1/enroll", {"method": "telepathy"})[0] == 422
    assert env.rest("admin", "POST", f"/admin/workloads/{web}/quarantine", {"reason": "ir"})[0] == 200
    assert env.rest("admin", "PUT", f"/admin/workloads/{web}/mode", {"mode": "bogus"})[0] == 422
    got = emitted(capsys.readouterr().out)
    assert (got.get("Enrollments"), got.get("EnrollmentsRefused"), got.get("AgentRequestsRefused")) == (1, 2, 1)
    assert (got.get("AdminActions"), got.get("AdminRequestsRefused")) == (1, 1)
