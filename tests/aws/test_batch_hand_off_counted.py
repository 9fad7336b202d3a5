"""AWS ingest and lifecycle: a batch's hand-off when it ends (``done()``: what its events changed, to
compute and the perimeter, once) that fails is logged and counted as ``ComputeNotQueued``, as every
other hand-off's failure is (the metric an operator's alarm watches), and fails the invocation, so
the whole batch is delivered again and handed on again. Against the moto server, through the real
ingest and lifecycle handlers."""

from __future__ import annotations

import logging

import pytest

from tests.aws.conftest import Env
from tests.aws.test_handler_metrics import emitted
from tests.aws.test_ingest_hand_off import ingest_once, refuse_once
from tests.aws.test_pipeline import boot

HAND_OFF = ("compute", "compute_priority", "perimeter")


def refuse_hand_off(env: Env) -> list[str]:
    """The next message to compute (either lane) or the perimeter is refused, once."""
    urls = {env.queues[q] for q in HAND_OFF if q in env.queues}
    return refuse_once(env, "before-parameter-build.sqs.SendMessage", lambda p: p.get("QueueUrl") in urls)


def test_an_ingest_batchs_failed_hand_off_is_counted_logged_and_retried(
    env: Env, capsys: pytest.CaptureFixture[str], caplog: pytest.LogCaptureFixture
) -> None:
    est = boot(env)
    new = est["run"]("web", est["subnets"]["web"], 1)[0]
    env.put(env.state_event(new, "running"))
    refused = refuse_hand_off(env)
    capsys.readouterr()
    with caplog.at_level(logging.ERROR):
        d = ingest_once(env)
    assert refused and d.error is not None, "the batch's hand-off failed: the invocation fails, for a retry"
    assert emitted(capsys.readouterr().out).get("ComputeNotQueued") == 1, "the failed hand-off was not counted"
    assert any(new in r.getMessage() and "could not be queued" in r.getMessage() for r in caplog.records)
    assert env.store.get(new) is not None, "the observation was stored before the hand-off"
    assert not ingest_once(env).failed  # the batch delivered again
    env.pump()
    assert env.store.bundle_pointer(new) is not None, "the new instance never reached compute"


def test_a_lifecycle_batchs_failed_hand_off_is_counted_logged_and_retried(
    env: Env, capsys: pytest.CaptureFixture[str], caplog: pytest.LogCaptureFixture
) -> None:
    boot(env)
    env.asg.set_desired_capacity(AutoScalingGroupName="rf-web-asg", DesiredCapacity=1)
    (new,) = env.asg_instances()
    env.put(env.lifecycle_event(new, launching=True))
    refused = refuse_hand_off(env)
    capsys.readouterr()
    with caplog.at_level(logging.ERROR):
        d = ingest_once(env, "lifecycle")
    assert refused and d.error is not None, "the batch's hand-off failed: the invocation fails, for a retry"
    assert emitted(capsys.readouterr().out).get("ComputeNotQueued") == 1, "the failed hand-off was not counted"
    assert any(new in r.getMessage() and "could not be queued" in r.getMessage() for r in caplog.records)
    assert not ingest_once(env, "lifecycle").failed  # the batch delivered again
    env.pump()
    assert env.store.bundle_pointer(new) is not None, "the launching instance never reached compute"
