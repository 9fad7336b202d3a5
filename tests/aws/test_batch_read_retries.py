"""How long a batch's describes retry. Ingest's reads make three calls in every account, the
control account's own included, so whoever throttles EC2 in one account and Region (its
administrator, its operators' load, Ringfence's own reconcile) holds the batch's other events up by
a few seconds only; lifecycle's make five, because a failed lifecycle action comes back only after
the queue's 360 s visibility timeout, past the hooks' 120 s / 60 s heartbeat timeouts. Neither
backs off into the batch's reserve: the batch always ends within the invocation's 60 s and hands
on what it did. The real ingest and lifecycle handlers over moto; time is virtual (botocore's
retry sleeps are counted, not slept)."""

from __future__ import annotations

import json
import random
import re
from typing import Any

import pytest
from botocore.awsrequest import AWSResponse

from tests.aws.conftest import ACCOUNT, Env
from tests.aws.test_ingest_batch_limits import (
    MEMBER,
    READ_ONLY,
    THROTTLED,
    TIMEOUT_S,
    Context,
    VirtualClock,
    _body_of,
    _handed_to_compute,
    _member_event,
    _member_instances,
    _queue,
    _xml,
    on_member_describes,
)
from tests.aws.test_member_lifecycle import _member_launch, _state
from tests.aws.test_pipeline import boot


def test_a_short_member_throttle_does_not_cost_a_lifecycle_action(env: Env, monkeypatch: pytest.MonkeyPatch) -> None:
    """Three throttled DescribeInstances in a row in the member account (a burst of a few
    seconds): the launch action is still observed and handed on in this invocation, not failed to
    come back after the hook has abandoned the launch."""
    new, asg = _member_launch(env, monkeypatch, "ringfence-member-lifecycle")
    throttled = {"n": 0}

    def burst() -> AWSResponse | None:
        if throttled["n"] < 3:
            throttled["n"] += 1
            return _xml(503, THROTTLED)
        return None

    calls = on_member_describes(env, burst)
    msgs = env.receive("lifecycle")
    assert len(msgs) == 1
    random.seed(1)
    clock = VirtualClock(monkeypatch)
    out = env.fn["lifecycle"].handler(env.sqs_event(msgs), Context(clock))

    n = {"throttled": throttled["n"], "member": calls["member"]}
    assert out == {"batchItemFailures": []}, f"the throttle burst failed the launch action: {n}"
    assert n["throttled"] == 3 and n["member"] >= 4, n
    assert clock.now() < TIMEOUT_S
    assert env.store.get(new) is not None, "the new instance is in the inventory"
    handed = [json.loads(m["Body"]) for m in env.receive("perimeter")]
    assert any(new in h.get("ids", []) for h in handed), f"the launch is handed on to the perimeter: {handed}"
    assert _state(asg, new) == "Pending:Wait", "the hook waits for compute, not for its timeout"


HOME_REGIONS = ("us-east-1", "eu-west-1", "eu-central-1")


def _home_event(env: Env, iid: str, region: str) -> dict[str, Any]:
    ev = env.state_event(iid, "stopped")
    ev["region"] = region
    ev["resources"] = [f"arn:aws:ec2:{region}:{ACCOUNT}:instance/{iid}"]
    return ev


@pytest.mark.parametrize("seed", [1, 2])
def test_attack_control_account_throttling_in_several_regions_does_not_hold_a_member_accounts_event(
    env: Env, monkeypatch: pytest.MonkeyPatch, seed: int
) -> None:
    """EC2 in the control account is throttled in three Regions (its operators' load, reconcile, a
    developer's reads where workloads share the account) while a batch holds an event of each of
    them and one of a member account: the member's event is applied and handed on, and the batch
    ends within the invocation's time; the control account's events fail, to be retried."""
    monkeypatch.setenv("RINGFENCE_ACCOUNT_ROLES", json.dumps({MEMBER: READ_ONLY}))
    boot(env)
    env.load_functions()
    m_id = _member_instances(env, 1)[0]
    _handed_to_compute(env)  # boot's hand-offs are done with
    calls: dict[str, int] = {}

    def throttle_home(request: Any, **_: Any) -> AWSResponse | None:
        auth = request.headers.get("Authorization", b"")
        auth = auth.decode() if isinstance(auth, bytes) else auth
        m = re.search(r"Credential=[^/]+/\d+/([^/]+)/ec2/", auth)
        if m and m.group(1) in HOME_REGIONS:
            calls[m.group(1)] = calls.get(m.group(1), 0) + 1
            return _xml(503, THROTTLED)
        return None

    env.hook("before-send.ec2.DescribeInstances", throttle_home)
    home = [_home_event(env, f"i-0aaaaaaaaaaaaaaa{k}", r) for k, r in enumerate(HOME_REGIONS, 1)]
    msgs = _queue(env, [*home, _member_event(env, m_id)])
    bodies = _body_of(msgs)
    random.seed(seed)
    clock = VirtualClock(monkeypatch)
    out = env.fn["ingest"].handler(env.sqs_event(msgs), Context(clock))
    took = clock.now()

    failed = {bodies[f["itemIdentifier"]]["account"] for f in out["batchItemFailures"]}
    assert took < TIMEOUT_S, f"the batch ran ~{took:.0f} s of a {TIMEOUT_S:.0f} s invocation"
    assert failed == {ACCOUNT}, f"only the throttled control account's events fail ({took:.0f} s): {out}"
    assert len(out["batchItemFailures"]) == len(HOME_REGIONS)
    assert env.store.get(m_id) is not None and m_id in _handed_to_compute(env)
    assert all(n <= 3 for n in calls.values()), f"three calls per throttled place, not the standard seven: {calls}"
    assert took < 15, f"three throttled places cost ~{took:.0f} s, not the batch's time"


def test_a_lifecycle_read_stops_retrying_in_time_for_the_batch_to_end(
    env: Env, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A member account throttled throughout, each throttled answer taking 12 s (a batch client
    allows 3 s to connect, 10 s to read): lifecycle's five calls would run past the invocation's
    60 s, so the retries stop before one would back off into the batch's reserve, and the batch
    ends in time (its action fails, to be retried)."""
    from aws_lambda_powertools.utilities.batch.exceptions import BatchProcessingError

    _member_launch(env, monkeypatch, "ringfence-member-lifecycle")
    clock = VirtualClock(monkeypatch)

    def slow_throttle() -> AWSResponse | None:
        clock.added += 12.0
        return _xml(503, THROTTLED)

    n = on_member_describes(env, slow_throttle)
    msgs = env.receive("lifecycle")
    random.seed(1)
    try:
        out = env.fn["lifecycle"].handler(env.sqs_event(msgs), Context(clock))
    except BatchProcessingError:  # the batch's only action failed
        out = {"batchItemFailures": [{"itemIdentifier": m["MessageId"]} for m in msgs]}
    took = clock.now()
    assert took < TIMEOUT_S, f"the batch ran ~{took:.0f} s of a {TIMEOUT_S:.0f} s invocation ({n})"
    assert 2 <= n["member"] < 5, f"retried until the deadline's reserve, then stopped: {n}"
    assert len(out["batchItemFailures"]) == 1
