"""Where SIEM events go: a file (JSON lines), syslog (RFC 5424 over UDP or TCP), Amazon EventBridge
(PutEvents) or CloudWatch Logs (PutLogEvents). Each sink takes a batch of already formatted lines
(OCSF JSON or CEF) with their OCSF events beside them (EventBridge needs the class as detail-type).

A spec names one sink (several with commas):

    file:/var/log/ringfence/siem.jsonl      syslog://host:514 (UDP)   syslog+tcp://host:601
    eventbridge:BUS-NAME-OR-ARN             cloudwatch:LOG-GROUP
    cef+file:/path  cef+syslog://host:514   (CEF lines instead of OCSF JSON; any sink)
"""

from __future__ import annotations

import contextlib
import datetime as dt
import os
import socket
import threading
import uuid
from collections.abc import Sequence
from pathlib import Path
from typing import Any, Protocol

Batch = Sequence[tuple[str, dict[str, Any]]]  # (formatted line, its OCSF event)


class SiemSpecError(ValueError):
    """A SIEM spec that names no known sink."""


class Sink(Protocol):
    def send(self, batch: Batch) -> None: ...

    def close(self) -> None: ...


class FileSink:
    """Appends one line per event; a lock keeps lines whole across threads (O_APPEND across processes)."""

    def __init__(self, path: Path) -> None:
        self.path = path
        path.parent.mkdir(parents=True, exist_ok=True)
        self._lock = threading.Lock()

    def send(self, batch: Batch) -> None:
        data = "".join(line + "\n" for line, _ in batch).encode()
        with self._lock:
            fd = os.open(self.path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o640)
            try:
                os.write(fd, data)
            finally:
                os.close(fd)

    def close(self) -> None:
        pass


# syslog severity from OCSF severity_id: 1 Informational → 6, 2 Low → 5 (notice), 3 Medium → 4
# (warning), 4 High → 3 (err), 5 Critical → 2, 6 Fatal → 1
_SYSLOG_SEVERITY = {0: 6, 1: 6, 2: 5, 3: 4, 4: 3, 5: 2, 6: 1}
FACILITY_LOG_AUDIT = 13  # RFC 5424 facility 13: log audit


def rfc5424(line: str, event: dict[str, Any], hostname: str, app: str = "ringfence") -> bytes:
    """``<PRI>1 TIMESTAMP HOSTNAME APP-NAME PROCID MSGID - MSG`` (no structured data; MSG is the line)."""
    pri = FACILITY_LOG_AUDIT * 8 + _SYSLOG_SEVERITY.get(int(event.get("severity_id", 1)), 6)
    try:
        when = dt.datetime.fromtimestamp(event["time"] / 1000, dt.UTC).isoformat(timespec="milliseconds")
        when = when.replace("+00:00", "Z")
    except (KeyError, TypeError, ValueError, OverflowError, OSError):
        when = "-"  # RFC 5424 NILVALUE: a time no timestamp can say costs the timestamp, not the message
    msgid = str(event.get("class_uid", "-"))
    host = "".join(c for c in hostname if 33 <= ord(c) <= 126)[:255] or "-"
    return f"<{pri}>1 {when} {host} {app} {os.getpid()} {msgid} - {line}".encode()


class SyslogSink:
    """RFC 5424 messages: one datagram each over UDP, octet-counted frames (RFC 6587) over TCP."""

    def __init__(self, host: str, port: int, tcp: bool = False, timeout: float = 5.0) -> None:
        self.addr, self.tcp, self.timeout = (host, port), tcp, timeout
        self.hostname = socket.gethostname()
        self._sock: socket.socket | None = None
        self._lock = threading.Lock()

    def _socket(self) -> socket.socket:
        if self._sock is None:
            if self.tcp:
                self._sock = socket.create_connection(self.addr, timeout=self.timeout)
            else:
                family = socket.getaddrinfo(*self.addr, type=socket.SOCK_DGRAM)[0][0]
                self._sock = socket.socket(family, socket.SOCK_DGRAM)
        return self._sock

    def send(self, batch: Batch) -> None:
        msgs = [rfc5424(line, event, self.hostname) for line, event in batch]
        with self._lock:
            try:
                s = self._socket()
                for m in msgs:
                    if self.tcp:
                        s.sendall(b"%d " % len(m) + m)
                    else:
                        s.sendto(m, self.addr)
            except OSError:
                self.close_locked()  # reconnect on the next batch
                raise

    def close_locked(self) -> None:
        if self._sock is not None:
            self._sock.close()
            self._sock = None

    def close(self) -> None:
        with self._lock:
            self.close_locked()


def _aws_client(service: str) -> Any:
    import boto3
    from botocore.config import Config

    return boto3.client(service, config=Config(connect_timeout=5, read_timeout=10, retries={"max_attempts": 3}))


class EventBridgeSink:
    """PutEvents to a bus, ten entries a call: source ``ringfence``, detail-type the OCSF class
    (``OCSF API Activity``…), detail the OCSF event (CEF lines as ``{"cef": line}``)."""

    def __init__(self, bus: str, client: Any = None) -> None:
        self.bus = bus
        self.client = client or _aws_client("events")

    def send(self, batch: Batch) -> None:
        entries = [
            {
                "Source": "ringfence",
                "DetailType": f"OCSF {event.get('class_name', 'Event')}",
                "Detail": line if line.startswith("{") else _json({"cef": line}),
                "EventBusName": self.bus,
            }
            for line, event in batch
        ]
        failed = 0
        for i in range(0, len(entries), 10):
            out = self.client.put_events(Entries=entries[i : i + 10])
            failed += int(out.get("FailedEntryCount", 0))
        if failed:
            raise RuntimeError(f"EventBridge refused {failed} of {len(entries)} SIEM event(s) on {self.bus}")

    def close(self) -> None:
        pass


class CloudWatchLogsSink:
    """PutLogEvents to a log group, in a stream of this process's own (created on first use)."""

    def __init__(self, group: str, client: Any = None) -> None:
        self.group = group
        self.client = client or _aws_client("logs")
        self.stream = f"ringfence-{socket.gethostname()}-{os.getpid()}-{uuid.uuid4().hex[:8]}"
        self._created = False
        self._lock = threading.Lock()

    def send(self, batch: Batch) -> None:
        stamped = sorted(((int(e["time"]), line) for line, e in batch), key=lambda x: x[0])
        events = [{"timestamp": t, "message": line} for t, line in stamped]
        with self._lock:
            if not self._created:
                with contextlib.suppress(self.client.exceptions.ResourceAlreadyExistsException):
                    self.client.create_log_stream(logGroupName=self.group, logStreamName=self.stream)
                self._created = True
            rejected = []
            for i in range(0, len(events), 1000):
                out = self.client.put_log_events(
                    logGroupName=self.group, logStreamName=self.stream, logEvents=events[i : i + 1000]
                )
                if out.get("rejectedLogEventsInfo"):
                    rejected.append(out["rejectedLogEventsInfo"])
        if rejected:
            # CloudWatch takes the call but drops events older than 14 days (or the group's
            # retention) or more than 2 hours ahead: say so instead of losing them quietly
            raise RuntimeError(f"CloudWatch Logs {self.group} rejected SIEM events: {rejected}")

    def close(self) -> None:
        pass


def _json(value: object) -> str:
    import json

    return json.dumps(value, separators=(",", ":"), sort_keys=True)


def parse(spec: str) -> list[tuple[str, Sink]]:
    """``spec`` → [(format, sink)]: format ``ocsf`` or ``cef``."""
    out: list[tuple[str, Sink]] = []
    for part in (p.strip() for p in spec.split(",")):
        if not part:
            continue
        fmt, rest = ("cef", part[4:]) if part.startswith("cef+") else ("ocsf", part)
        out.append((fmt, _sink(rest, part)))
    if not out:
        raise SiemSpecError(f"SIEM spec {spec!r}: names no sink")
    return out


def _sink(rest: str, part: str) -> Sink:
    kind, _, target = rest.partition(":")
    if kind == "file" and target:
        return FileSink(Path(target))
    if kind in ("syslog", "syslog+udp", "syslog+tcp") and target.startswith("//"):
        host, _, port = target[2:].rstrip("/").rpartition(":")
        host = host.strip("[]")
        if host and port.isdigit() and 0 < int(port) < 65536:
            return SyslogSink(host, int(port), tcp=kind == "syslog+tcp")
    if kind == "eventbridge" and target:
        return EventBridgeSink(target)
    if kind == "cloudwatch" and target:
        return CloudWatchLogsSink(target)
    raise SiemSpecError(
        f"SIEM spec {part!r}: expected file:PATH, syslog://HOST:PORT, syslog+tcp://HOST:PORT, "
        "eventbridge:BUS, cloudwatch:LOG-GROUP (each optionally cef+…)"
    )
