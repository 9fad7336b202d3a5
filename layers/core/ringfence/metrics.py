"""The metrics of ``ringfence serve`` in Prometheus' text format (``GET /metrics``).

The Lambda functions publish the same names to CloudWatch (Powertools' metrics); under ``serve``
every :data:`~ringfence.control.wiring.Metric` callable the services take is one
:class:`Counters`, and each name becomes a counter: ``SafeguardsLowered`` is exposed as
``ringfence_safeguards_lowered_total``. prometheus_client (the ``serve`` extra) renders them.
"""

from __future__ import annotations

import logging
import re
import threading
from collections.abc import Callable

from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, Counter, Gauge, generate_latest

__all__ = ["ALERTED", "CONTENT_TYPE_LATEST", "Counters", "prometheus_name"]

log = logging.getLogger("ringfence.metrics")
_WORD = re.compile(r"(?<=[a-z0-9])(?=[A-Z])|(?<=[A-Z])(?=[A-Z][a-z])")


ALERTED = (
    "SafeguardsLowered",
    "AdminActions",
    "AdminRequestsRefused",
    "Enrollments",
    "EnrollmentsRefused",
    "AgentRequestsRefused",
    "AgentRequestsInvalid",
    "AgentRequestsOverAddressLimit",
    "ComputeNotQueued",
    "ComputeOwedNotMarked",
    "OwedMarksMalformed",
    "StoreUnavailable",
    "StoreDamaged",
    "ComputeFailed",
)
"""Counters exposed at zero from the start (docs/serve.md names them for alerts): Prometheus'
``increase()`` cannot count a series that first appears already at 1, so the first lowering of a
safeguard after a restart would raise no alert."""


def prometheus_name(name: str) -> str:
    """``SafeguardsLowered`` → ``ringfence_safeguards_lowered`` (the ``_total`` is the counter's)."""
    return "ringfence_" + _WORD.sub("_", name).lower()


class Counters:
    """A :data:`~ringfence.control.wiring.Metric`: ``counters(name, value)`` adds ``value`` to the
    counter ``name`` (made at its first use, or at zero from the start for :data:`ALERTED`), from
    any thread."""

    def __init__(self) -> None:
        self.registry = CollectorRegistry(auto_describe=True)
        self._by_name: dict[str, Counter] = {}
        self._gauges: dict[str, Gauge] = {}
        self._lock = threading.Lock()
        for name in ALERTED:
            self(name, 0)

    def __call__(self, name: str, value: float) -> None:
        if value < 0:  # every metric the services emit is a count; a counter never goes down
            log.warning("metric %s: %s is not a count, not recorded", name, value)
            return
        counter = self._by_name.get(name)
        if counter is None:
            with self._lock:
                counter = self._by_name.get(name)
                if counter is None:
                    counter = Counter(
                        prometheus_name(name), f"{name} (as the Lambda functions publish it)", registry=self.registry
                    )
                    self._by_name[name] = counter
        counter.inc(value)

    def gauge(self, name: str, doc: str, read: Callable[[], float]) -> None:
        """A gauge ``name`` (``ComputeOwedSeconds``: ``ringfence_compute_owed_seconds``) whose
        value ``read()`` gives at each scrape; named again, it reads the new ``read``."""
        with self._lock:
            gauge = self._gauges.get(name)
            if gauge is None:
                gauge = self._gauges[name] = Gauge(prometheus_name(name), doc, registry=self.registry)
            gauge.set_function(read)

    def exposition(self) -> bytes:
        """Every counter so far, in the text format Prometheus scrapes."""
        return generate_latest(self.registry)
