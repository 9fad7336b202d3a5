"""Resolvers of the library's routes serve many requests at once (``ringfence serve``'s threads),
each route seeing its own request only. Powertools keeps the current event in a class attribute
shared by every resolver; without ``routes.common.Resolver`` this test sees other requests'
tokens and paths."""

from __future__ import annotations

import json
import sys
import threading
import time
from collections.abc import Iterator
from typing import Any

import pytest

from ringfence.control.api import Response
from ringfence.routes.agent import agent_routes
from ringfence.serve import ResolverPool, proxy_event


class Service:
    """Answers a heartbeat with the number in the workload id, for the token of that workload."""

    def authorize(self, authorization: str | None, wid: str, heartbeat: bool = False) -> Response | None:
        time.sleep(0.001)
        if authorization == f"Bearer tok-{wid}":
            return None
        return Response(403, {"error": "forbidden", "detail": f"{authorization} for {wid}"})

    def heartbeat(self, wid: str, hb: Any) -> Response:
        time.sleep(0.001)
        return Response(200, {"latest_version": int(wid.removeprefix("w"))})


@pytest.fixture
def switch_often() -> Iterator[None]:
    old = sys.getswitchinterval()
    sys.setswitchinterval(1e-6)  # threads interleave between any two bytecodes
    yield
    sys.setswitchinterval(old)


def test_concurrent_requests_each_see_their_own_event(switch_often: None) -> None:
    svc = Service()
    pool = ResolverPool(lambda: agent_routes(lambda: svc))  # type: ignore[arg-type,return-value]
    wrong: list[Any] = []

    def agent(i: int) -> None:
        wid = f"w{i}"
        body = json.dumps({"applied_version": 1, "mode": None}).encode()
        for _ in range(30):
            event = proxy_event(
                "POST", f"/v1/agents/{wid}/heartbeat", [("authorization", f"Bearer tok-{wid}")], [], body, "127.0.0.1"
            )
            try:
                out = pool.resolve(event)
            except Exception as exc:  # a crash is a wrong answer too, never a thread quietly gone
                wrong.append((wid, repr(exc)))
                return
            if out["statusCode"] != 200 or json.loads(out["body"])["latest_version"] != i:
                wrong.append((wid, out["statusCode"], out["body"]))

    threads = [threading.Thread(target=agent, args=(i,)) for i in range(24)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert wrong == []
    assert 1 < pool.built <= 24  # resolvers are reused, one per concurrent request
