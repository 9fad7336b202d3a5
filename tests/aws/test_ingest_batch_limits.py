"""One account's slow or failing describes never hold up the other accounts' events of an ingest
batch. EC2 rate-limits per account and Region, and the control plane's assumed member role shares
the limit: a member account's administrator throttles it at will (a DescribeInstances loop). The
ingest queue mixes accounts in batches of 10 and the function has 60 s: with botocore's standard
retries (~30 s of backoff per call), the prefetch and then one describe per event of that account
ran the batch past its timeout, which in Lambda fails every event of it, the other accounts'
included, and hands nothing on.

Now a place (account, Region) that throttles, refuses us or cannot be reached fails the batch's
events there at once, the batch's reads retry briefly, and the batch stops taking on events in
time to hand on what it did. The real ingest handler over moto; time is virtual (botocore's retry
sleeps are recorded, not slept, and the Lambda context counts them)."""

from __future__ import annotations

import json
import time
import uuid
from collections.abc import Callable
from typing import Any

import boto3
import botocore.endpoint
import pytest
from botocore.awsrequest import AWSResponse

from ringfence.local.estate import lab_image
from tests.aws.conftest import ACCOUNT, REGION, Env
from tests.aws.test_pipeline import boot

MEMBER = "210987654321"
READ_ONLY = f"arn:aws:iam::{MEMBER}:role/ringfence-member-readonly"
TIMEOUT_S = 60.0  # template.yaml IngestFunction Timeout; infra/modules/ringfence/lambda.tf


class VirtualClock:
    """Real time plus the time botocore would have slept retrying, plus what a test adds."""

    def __init__(self, monkeypatch: pytest.MonkeyPatch) -> None:
        self.t0 = time.monotonic()
        self.added = 0.0
        monkeypatch.setattr(botocore.endpoint.time, "sleep", self.sleep)

    def sleep(self, seconds: float) -> None:
        self.added += seconds

    def now(self) -> float:
        return time.monotonic() - self.t0 + self.added


class Context:
    """The Lambda context of a 60 s invocation, on the virtual clock."""

    function_name = "ringfence-ingest"
    memory_limit_in_mb = 512
    invoked_function_arn = f"arn:aws:lambda:{REGION}:{ACCOUNT}:function:ringfence-ingest"
    aws_request_id = "req-1"

    def __init__(self, clock: VirtualClock) -> None:
        self.clock = clock

    def get_remaining_time_in_millis(self) -> int:
        return max(int((TIMEOUT_S - self.clock.now()) * 1000), 0)


def _xml(status: int, body: str) -> AWSResponse:
    class Raw:
        def stream(self, **_: Any) -> Any:
            yield body.encode()

    return AWSResponse("http://stand-in", status, {"Content-Type": "text/xml"}, Raw())


THROTTLED = (
    "<Response><Errors><Error><Code>RequestLimitExceeded</Code><Message>Request limit exceeded.</Message>"
    "</Error></Errors><RequestID>x</RequestID></Response>"
)
UNAUTHORIZED = (
    "<Response><Errors><Error><Code>UnauthorizedOperation</Code><Message>You are not authorized.</Message>"
    "</Error></Errors><RequestID>x</RequestID></Response>"
)


def _member_instances(env: Env, n: int) -> list[str]:
    """``n`` instances in the member account, run by its administrator."""
    c = boto3.client("sts").assume_role(RoleArn=f"arn:aws:iam::{MEMBER}:role/admin", RoleSessionName="admin")[
        "Credentials"
    ]
    mec2 = boto3.client(
        "ec2",
        region_name=REGION,
        aws_access_key_id=c["AccessKeyId"],
        aws_secret_access_key=c["SecretAccessKey"],
        aws_session_token=c["SessionToken"],
    )
    return [i["InstanceId"] for i in mec2.run_instances(ImageId=lab_image(mec2), MinCount=n, MaxCount=n)["Instances"]]


def on_member_describes(env: Env, answer: Callable[[], AWSResponse | None]) -> dict[str, int]:
    """From now on every DescribeInstances made with the member role's credentials is answered by
    ``answer()`` (None: sent to moto); returns the count of such calls (``member``)."""
    member_keys: set[str] = set()
    calls = {"member": 0}

    def after_assume(parsed: dict[str, Any], **_: Any) -> None:
        creds = parsed.get("Credentials") or {}
        if f"::{MEMBER}:" in (parsed.get("AssumedRoleUser") or {}).get("Arn", "") and creds.get("AccessKeyId"):
            member_keys.add(creds["AccessKeyId"])

    def before_send(request: Any, **_: Any) -> AWSResponse | None:
        auth = request.headers.get("Authorization", b"")
        auth = auth.decode() if isinstance(auth, bytes) else auth
        if any(k in auth for k in member_keys):
            calls["member"] += 1
            return answer()
        return None

    env.hook("after-call.sts.AssumeRole", after_assume)
    env.hook("before-send.ec2.DescribeInstances", before_send)
    return calls


def _member_ec2_answers(env: Env, body: str) -> dict[str, int]:
    """Every member DescribeInstances answered ``body`` (503 for throttling, 403 otherwise)."""
    return on_member_describes(env, lambda: _xml(503 if "RequestLimitExceeded" in body else 403, body))


def _queue(env: Env, events: list[dict[str, Any]]) -> list[dict[str, Any]]:
    for ev in events:
        ev["id"] = str(uuid.uuid4())
        env.sqs.send_message(QueueUrl=env.queues["ingest"], MessageBody=json.dumps(ev))
    msgs: list[dict[str, Any]] = []
    while len(msgs) < len(events):
        got = env.receive("ingest")
        assert got, "every event is on the queue"
        msgs += got
    return msgs


def _member_event(env: Env, iid: str) -> dict[str, Any]:
    ev = env.state_event(iid, "running")
    ev["account"] = MEMBER  # as the member's forwarding rule delivers it (EventBridge keeps its account)
    ev["resources"] = [f"arn:aws:ec2:{REGION}:{MEMBER}:instance/{iid}"]
    return ev


def _handed_to_compute(env: Env) -> set[str]:
    """What compute was handed, in either lane (a stop or a termination takes the priority one)."""
    msgs = [*env.receive("compute_priority"), *env.receive("compute")]
    return {i for m in msgs for i in json.loads(m["Body"]).get("ids", [])}


def _body_of(msgs: list[dict[str, Any]]) -> dict[str, dict[str, Any]]:
    return {m["MessageId"]: json.loads(m["Body"]) for m in msgs}


def test_attack_a_member_accounts_throttling_does_not_hold_another_accounts_event(
    env: Env, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The control account's database stops (it must leave its peers' sets) while the member's
    administrator throttles EC2 in the member account and forwards nine events of their own: the
    stop is ingested and handed to compute within the function's time, and the member's nine
    events are reported as the batch's failures (SQS retries only those)."""
    monkeypatch.setenv("RINGFENCE_ACCOUNT_ROLES", json.dumps({MEMBER: READ_ONLY}))
    est = boot(env)
    env.load_functions()
    m_ids = _member_instances(env, 9)
    calls = _member_ec2_answers(env, THROTTLED)
    _handed_to_compute(env)  # boot's hand-offs are done with

    victim = est["ids"]["db"][0]
    env.ec2.stop_instances(InstanceIds=[victim])
    # the member's events first: the control account's waits behind them in the batch
    msgs = _queue(env, [*(_member_event(env, i) for i in m_ids), env.state_event(victim, "stopped")])
    assert len(msgs) == 10
    bodies = _body_of(msgs)
    clock = VirtualClock(monkeypatch)
    out = env.fn["ingest"].handler(env.sqs_event(msgs), Context(clock))
    took = clock.now()

    failed = {f["itemIdentifier"] for f in out["batchItemFailures"]}
    assert {bodies[m]["account"] for m in failed} == {MEMBER} and len(failed) == 9, out
    assert env.store.get(victim).state == "stopped"  # type: ignore[union-attr]
    assert victim in _handed_to_compute(env), "the stop is handed on to compute in this invocation"
    assert took < TIMEOUT_S, f"the batch ran ~{took:.0f} s of a {TIMEOUT_S:.0f} s invocation"
    assert calls["member"] <= 3, f"one throttled describe (three tries) for the member, not one per event: {calls}"
    assert all(env.store.get(i) is None for i in m_ids)
    assert env.receive("dlq") == []


def test_a_member_account_that_refuses_our_role_costs_one_describe_a_batch(
    env: Env, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A member account whose read-only role is refused EC2 (a changed policy, an SCP): its events
    fail at once after the prefetch's call, not one refused describe each."""
    monkeypatch.setenv("RINGFENCE_ACCOUNT_ROLES", json.dumps({MEMBER: READ_ONLY}))
    est = boot(env)
    env.load_functions()
    m_ids = _member_instances(env, 4)
    calls = _member_ec2_answers(env, UNAUTHORIZED)
    web = est["ids"]["web"][0]
    env.ec2.stop_instances(InstanceIds=[web])
    msgs = _queue(env, [*(_member_event(env, i) for i in m_ids), env.state_event(web, "stopped")])
    bodies = _body_of(msgs)
    out = env.fn["ingest"].handler(env.sqs_event(msgs), Context(VirtualClock(monkeypatch)))
    failed = {f["itemIdentifier"] for f in out["batchItemFailures"]}
    assert {bodies[m]["account"] for m in failed} == {MEMBER} and len(failed) == 4, out
    assert env.store.get(web).state == "stopped"  # type: ignore[union-attr]
    assert calls["member"] == 1, calls


def test_a_batch_past_its_deadline_fails_the_rest_and_hands_on_what_it_did(
    env: Env, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A store slow enough that the batch cannot finish in the invocation's time: the events not
    reached in time fail (SQS retries them), and the batch ends in time to hand on the ones it
    applied, instead of being killed with all of them undone."""
    est = boot(env)
    env.load_functions()
    ids = [i for group in est["ids"].values() for i in group]
    env.ec2.stop_instances(InstanceIds=ids)
    msgs = _queue(env, [env.state_event(i, "stopped") for i in ids])
    _handed_to_compute(env)
    clock = VirtualClock(monkeypatch)

    def slow_store(**_: Any) -> None:
        clock.added += 4.0  # every store call takes 4 s

    env.hook("before-send.dynamodb", slow_store)
    bodies = _body_of(msgs)
    out = env.fn["ingest"].handler(env.sqs_event(msgs), Context(clock))
    took = clock.now()

    failed = {f["itemIdentifier"] for f in out["batchItemFailures"]}
    applied = {bodies[m]["detail"]["instance-id"] for m in bodies if m not in failed}
    left = {bodies[m]["detail"]["instance-id"] for m in failed}
    assert applied and left, f"some events applied, the rest left to the retry: {out}"
    assert took < TIMEOUT_S, f"the batch ran ~{took:.0f} s of a {TIMEOUT_S:.0f} s invocation"
    assert _handed_to_compute(env) == applied, "what was applied is handed on, in this invocation"
    assert all(env.store.get(i).state == "stopped" for i in applied)  # type: ignore[union-attr]
    assert all(env.store.get(i).state == "running" for i in left)  # type: ignore[union-attr]


def test_an_id_ec2_refuses_in_the_prefetch_is_still_described_per_event(
    env: Env, monkeypatch: pytest.MonkeyPatch
) -> None:
    """An error of the request itself (an instance id EC2 does not take) does not make the account
    unavailable: the batch's other events there are described one by one, as before."""
    est = boot(env)
    env.load_functions()
    ids = est["ids"]["web"]
    env.ec2.stop_instances(InstanceIds=ids)
    msgs = _queue(env, [env.state_event(i, "stopped") for i in ids])
    refused: list[int] = []

    def malformed_once(**_: Any) -> AWSResponse | None:
        if refused:
            return None
        refused.append(1)
        return _xml(
            400,
            "<Response><Errors><Error><Code>InvalidInstanceID.Malformed</Code><Message>Invalid id</Message>"
            "</Error></Errors><RequestID>x</RequestID></Response>",
        )

    env.hook("before-send.ec2.DescribeInstances", malformed_once)
    out = env.fn["ingest"].handler(env.sqs_event(msgs), Context(VirtualClock(monkeypatch)))
    assert refused and out == {"batchItemFailures": []}, out
    assert all(env.store.get(i).state == "stopped" for i in ids)  # type: ignore[union-attr]
