"""A real EC2 client's DescribeInstances calls, recorded, the first held until released: callers
that come meanwhile queue behind it, so a test sees deterministically which call carried them
(a botocore hook on the client; the calls still go to moto)."""

from __future__ import annotations

import threading
from typing import Any


class HeldDescribes:
    def __init__(self, client: Any) -> None:
        self.client = client
        self.asked: list[list[str]] = []  # each call's instance ids, sorted
        self.first_in = threading.Event()
        self._release = threading.Event()

    def _hook(self, params: dict[str, Any], **_: Any) -> None:
        self.asked.append(sorted(params.get("InstanceIds", [])))
        if not self.first_in.is_set():
            self.first_in.set()
            assert self._release.wait(10), "the first describe was never released"

    def release(self) -> None:
        self._release.set()

    def __enter__(self) -> HeldDescribes:
        self.client.meta.events.register("before-parameter-build.ec2.DescribeInstances", self._hook)
        return self

    def __exit__(self, *exc: object) -> None:
        self._release.set()
        self.client.meta.events.unregister("before-parameter-build.ec2.DescribeInstances", self._hook)
