"""SIEM output: audit records, agents' drops and findings as OCSF 1.7.0 JSON (or CEF), to a file,
syslog, EventBridge or CloudWatch Logs (docs/visibility.md).

:class:`Siem` is what the control plane holds (``BaseWiring.siem``, from ``ringfence serve --siem
SPEC`` or ``$RINGFENCE_SIEM``). Sending never fails the action that caused the event: the audit
record is already in the store (the authority, hash-chained), so a SIEM that is down costs a
logged error and a count in :attr:`Siem.failed`, not a refused provision or a lost agent report.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Iterable
from typing import Any

from ringfence.audit import AuditRecord
from ringfence.siem import ocsf
from ringfence.siem.cef import to_cef
from ringfence.siem.sinks import SiemSpecError, Sink, parse

__all__ = ["Siem", "SiemSpecError", "ocsf", "to_cef"]

log = logging.getLogger("ringfence.siem")


class Siem:
    def __init__(self, sinks: list[tuple[str, Sink]], spec: str = "") -> None:
        self.sinks = sinks
        self.spec = spec
        self.sent = 0
        self.failed = 0

    @classmethod
    def from_spec(cls, spec: str) -> Siem:
        return cls(parse(spec), spec)

    def emit(self, events: Iterable[dict[str, Any]]) -> None:
        batch = list(events)
        if not batch:
            return
        for fmt, sink in self.sinks:
            lines = []
            for e in batch:  # one event that cannot be written costs itself, not the batch
                try:
                    lines.append(
                        (to_cef(e) if fmt == "cef" else json.dumps(e, separators=(",", ":"), sort_keys=True), e)
                    )
                except Exception:
                    self.failed += 1
                    log.exception("SIEM sink %s: an event not formatted, not delivered", type(sink).__name__)
            if not lines:
                continue
            try:
                sink.send(lines)
                self.sent += len(lines)
            except Exception:
                self.failed += len(lines)
                log.exception("SIEM sink %s: %d event(s) not delivered", type(sink).__name__, len(lines))

    def audit(self, rec: AuditRecord) -> None:
        self.emit([ocsf.api_activity(rec)])

    def drops(self, workload_id: str, drops: Iterable[Any]) -> None:
        """An agent's reported drop events (``agentapi.DropEvent``) as Network Activity; one that
        cannot be mapped is counted in :attr:`failed` (this never raises: the batch is stored)."""
        events = []
        for d in drops:
            try:
                events.append(drop_activity(workload_id, d))
            except Exception:
                self.failed += len(self.sinks)
                log.exception("SIEM: a drop event of %s not mapped, not delivered", workload_id)
        self.emit(events)

    def finding(self, event: dict[str, Any]) -> None:
        self.emit([event])

    def close(self) -> None:
        for _, sink in self.sinks:
            sink.close()


def drop_activity(workload_id: str, d: Any) -> dict[str, Any]:
    """One of an agent's drop events (``agentapi.DropEvent``) as OCSF Network Activity."""
    return ocsf.network_activity(
        workload_id,
        time=d.time,
        direction=d.direction,
        src=d.src,
        dst=d.dst,
        proto=d.proto,
        sport=d.sport,
        dport=d.dport,
        rule_id=d.rule_id,
        action=d.action,
        count=d.count,
    )
