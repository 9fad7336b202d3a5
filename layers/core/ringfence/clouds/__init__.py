"""Cloud adapters. Only modules under here (and ``ringfence.store`` adapters) import cloud SDKs."""

from __future__ import annotations

import logging
import threading
from collections.abc import Callable
from typing import Any


def every(name: str, run: Callable[[], Any], seconds: float, stop: threading.Event) -> threading.Thread:
    """``run()`` now and then every ``seconds`` until ``stop`` is set, in a daemon thread named
    ``name`` (a cloud's scheduled pass under ``ringfence serve``)."""

    def loop() -> None:
        while True:
            try:
                run()
            except Exception:  # a bug must not end the schedule: logged, retried next time
                logging.getLogger("ringfence.clouds").exception("%s failed", name)
            if stop.wait(seconds):
                return

    t = threading.Thread(target=loop, name=name, daemon=True)
    t.start()
    return t
