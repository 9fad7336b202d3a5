"""VPC Flow Logs delivered to S3: gzip text, the default v2 format or a custom v3–v5 one.

Each file starts with a header naming its fields (S3 delivery writes it), which is honoured:
fields are found by name, so any custom order and any version's fields are read. A file
without a header is read in the default v2 order. A malformed line is counted and reported with
the file and line number; it never aborts the file. ``NODATA``/``SKIPDATA`` records and lines
without addresses carry no flow and are skipped (counted).
"""

from __future__ import annotations

import gzip
import io
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field
from typing import IO

from ringfence.flows.records import Flow, proto_name

DEFAULT_V2 = [
    "version",
    "account-id",
    "interface-id",
    "srcaddr",
    "dstaddr",
    "srcport",
    "dstport",
    "protocol",
    "packets",
    "bytes",
    "start",
    "end",
    "action",
    "log-status",
]
REQUIRED = ("srcaddr", "dstaddr", "protocol", "start", "end")
# every field name of versions 2–5 (AWS docs, flow-log-records): an unknown name in the header is
# read past (newer versions add fields), never an error
KNOWN = frozenset(
    [
        *DEFAULT_V2,
        "vpc-id",
        "subnet-id",
        "instance-id",
        "tcp-flags",
        "type",
        "pkt-srcaddr",
        "pkt-dstaddr",
        "region",
        "az-id",
        "sublocation-type",
        "sublocation-id",
        "pkt-src-aws-service",
        "pkt-dst-aws-service",
        "flow-direction",
        "traffic-path",
    ]
)
MAX_REPORTED = 100  # malformed lines named one by one, per file; the rest only counted


@dataclass(slots=True)
class Malformed:
    file: str
    line: int
    reason: str

    def __str__(self) -> str:
        return f"{self.file}:{self.line}: {self.reason}"


@dataclass(slots=True)
class ParseReport:
    file: str
    fields: list[str]
    lines: int = 0
    flows: int = 0
    skipped: int = 0  # NODATA / SKIPDATA / no addresses
    malformed: int = 0
    errors: list[Malformed] = field(default_factory=list)
    unknown_fields: list[str] = field(default_factory=list)

    def bad(self, line: int, reason: str) -> None:
        self.malformed += 1
        if len(self.errors) < MAX_REPORTED:
            self.errors.append(Malformed(self.file, line, reason))


def _int(v: str, name: str) -> int:
    try:
        n = int(v)
    except ValueError:
        raise ValueError(f"{name} {v!r} is not a number") from None
    if n < 0:
        raise ValueError(f"{name} {v!r} is negative")
    return n


class Parser:
    """Parse one file's lines; ``report`` says what was read and what was not."""

    def __init__(self, file: str, fields: list[str] | None = None) -> None:
        self.report = ParseReport(file, list(fields or DEFAULT_V2))
        self._header_seen = fields is not None
        self._index(self.report.fields)

    def _index(self, fields: list[str]) -> None:
        self.report.fields = fields
        self.report.unknown_fields = [f for f in fields if f not in KNOWN]
        self._pos = {name: i for i, name in enumerate(fields)}
        self._width = len(fields)
        missing = [f for f in REQUIRED if f not in self._pos]
        self._missing = missing

    def lines(self, lines: Iterable[str]) -> Iterator[Flow]:
        for n, raw in enumerate(lines, 1):
            line = raw.strip()
            if not line:
                continue
            parts = line.split()
            if n == 1 and not self._header_seen and parts[0] == "version":
                self._index(parts)  # the header S3 delivery writes: the file's own field order
                self._header_seen = True
                continue
            self.report.lines += 1
            if self._missing:
                self.report.bad(n, f"the format has no {', '.join(self._missing)} field")
                continue
            if len(parts) != self._width:
                self.report.bad(n, f"{len(parts)} fields, the format has {self._width}")
                continue
            try:
                flow = self._flow(parts)
            except ValueError as exc:
                self.report.bad(n, str(exc))
                continue
            if flow is None:
                self.report.skipped += 1
                continue
            self.report.flows += 1
            yield flow

    def _get(self, parts: list[str], name: str) -> str | None:
        i = self._pos.get(name, -1)
        if i < 0:
            return None
        v = parts[i]
        return None if v == "-" else v

    def _flow(self, parts: list[str]) -> Flow | None:
        status = self._get(parts, "log-status")
        if status in ("NODATA", "SKIPDATA"):
            return None
        if status not in (None, "OK"):
            raise ValueError(f"log-status {status!r} is not OK, NODATA or SKIPDATA")
        # pkt-srcaddr/pkt-dstaddr: the packet's own addresses (differ from srcaddr behind a NAT
        # gateway or for traffic through a middlebox) — those name the workloads
        src = self._get(parts, "pkt-srcaddr") or self._get(parts, "srcaddr")
        dst = self._get(parts, "pkt-dstaddr") or self._get(parts, "dstaddr")
        proto = self._get(parts, "protocol")
        start, end = self._get(parts, "start"), self._get(parts, "end")
        if src is None or dst is None or proto is None:
            return None
        if start is None or end is None:
            raise ValueError("start or end is missing")
        if not _looks_like_address(src) or not _looks_like_address(dst):
            raise ValueError(f"address {src!r} or {dst!r} is not an IP address")
        action = self._get(parts, "action")
        if action not in (None, "ACCEPT", "REJECT"):
            raise ValueError(f"action {action!r} is not ACCEPT or REJECT")
        pname = proto_name(_int(proto, "protocol"))
        dport_s = self._get(parts, "dstport")
        dport = _int(dport_s, "dstport") if dport_s is not None and pname in ("tcp", "udp") else None
        if dport is not None and dport > 65535:
            raise ValueError(f"dstport {dport} is out of range")
        packets = self._get(parts, "packets")
        nbytes = self._get(parts, "bytes")
        return Flow(
            start=float(_int(start, "start")),
            end=float(_int(end, "end")),
            src=src,
            dst=dst,
            proto=pname,
            dport=dport,
            packets=_int(packets, "packets") if packets else 0,
            bytes=_int(nbytes, "bytes") if nbytes else 0,
            origin="vpc",
            observed=(action or "accept").lower(),
            reporter=self._get(parts, "interface-id") or self._get(parts, "instance-id") or "",
        )


def _looks_like_address(v: str) -> bool:
    return ("." in v or ":" in v) and not v.strip("0123456789abcdefABCDEF.:")


def parse_text(
    file: str, text: IO[str] | Iterable[str], fields: list[str] | None = None
) -> tuple[list[Flow], ParseReport]:
    p = Parser(file, fields)
    flows = list(p.lines(text))
    return flows, p.report


def parse_gzip(file: str, data: bytes, fields: list[str] | None = None) -> tuple[list[Flow], ParseReport]:
    """A delivered object's bytes (gzip; plain text is read as it is)."""
    raw = gzip.decompress(data) if data[:2] == b"\x1f\x8b" else data
    return parse_text(file, io.StringIO(raw.decode("utf-8", errors="replace")), fields)
