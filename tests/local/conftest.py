"""The embedded AWS and its event router, as the demo runs them: tests change moto through boto3
and read the outcome; the router alone carries events to the handlers."""

from __future__ import annotations

from collections.abc import Iterator

import pytest

from ringfence.local.aws import EmbeddedAws
from ringfence.local.router import EventRouter
from tests.aws.conftest import Env


@pytest.fixture
def aws(embedded: EmbeddedAws) -> EmbeddedAws:
    embedded.reset()
    return embedded


@pytest.fixture
def env(embedded: EmbeddedAws) -> Iterator[Env]:
    """A fresh world (reset moto, resources, handlers loaded) with the test helpers of tests/aws;
    its handlers' containers are retired after the test."""
    e = Env(embedded)
    e.build()
    yield e
    e.retire()


@pytest.fixture
def make_router(env: Env) -> Iterator[type[EventRouter]]:
    """``make_router(**options)``: a started router over ``env``'s handlers, stopped after the test."""
    started: list[EventRouter] = []

    def make(**options: object) -> EventRouter:
        r = EventRouter(env.aws, functions=env.fn, **options)  # type: ignore[arg-type]
        r.start()
        started.append(r)
        return r

    yield make  # type: ignore[misc]
    for r in started:
        r.stop()
    for r in started:
        assert not r.errors, r.errors
