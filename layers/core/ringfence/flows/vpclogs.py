"""VPC Flow Logs delivered to S3: gzip text, the default v2 format or a custom v3–v5 one.

Each file starts with a header naming its fields (S3 delivery writes it), which is honoured:
fields are found by name, so any custom order and any version's fields are read. A file
without a header is read in the default v2 order. A malformed line is counted and reported with
the file and line number; it never aborts the file. ``NODATA``/``SKIPDATA`` records and lines
without addresses carry no flow and are skipped (counted).
"""

from __future__ import annotations

import ipaddress
import time
import zlib
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
MAX_AHEAD = 86400  # seconds a record's start or end may lie after the parse's now (later: malformed)
# memory: an object is decompressed and read a line at a time, never whole
MAX_LINE = 8192  # bytes of one line (a v5 line with every field is under 1 KiB); longer: malformed
MAX_OBJECT_BYTES = 512 << 20  # decompressed bytes read of one object; the rest is not read (malformed)
_CHUNK = 1 << 20  # decompressed bytes read at a time
_IN = 64 << 10  # compressed bytes fed to the decompressor at a time


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
        at = self._pos.get
        self._at = tuple(
            at(name, -1)
            for name in (
                "log-status", "pkt-srcaddr", "srcaddr", "pkt-dstaddr", "dstaddr", "protocol", "start", "end",
                "action", "dstport", "packets", "bytes", "interface-id", "instance-id",
            )
        )  # fmt: skip
        self._good: dict[str, str] = {}  # address as written → canonical (as inventory addresses)
        self._limit = int(time.time()) + MAX_AHEAD

    def lines(self, lines: Iterable[str | None]) -> Iterator[Flow]:
        for r in self.records(lines):
            yield Flow(
                start=r[0], end=r[1], src=r[2], dst=r[3], proto=r[4], dport=r[5], packets=r[6], bytes=r[7],
                origin="vpc", observed=r[8], reporter=r[9],
            )  # fmt: skip

    def object_records(self, data: bytes) -> Iterator[Record]:
        """:meth:`records` of a delivered object's bytes (gzip, or plain text), decompressed and
        read a line at a time (:data:`MAX_LINE`, :data:`MAX_OBJECT_BYTES`)."""
        return self.records(_lines(data, self.report))

    def records(self, lines: Iterable[str | None]) -> Iterator[Record]:
        """The flows as plain tuples (:data:`Record`): what the ingest folds, without a ``Flow``
        object per line (building one cost more than parsing the line). A line given as None
        was longer than :data:`MAX_LINE` (malformed)."""
        report = self.report
        good = self._good
        at = self._at
        for n, raw in enumerate(lines, 1):
            if raw is None:
                report.lines += 1
                report.bad(n, f"the line is longer than {MAX_LINE} bytes")
                continue
            parts = raw.split()
            if not parts:
                continue
            if n == 1 and not self._header_seen and parts[0] == "version":
                self._index(parts)  # the header S3 delivery writes: the file's own field order
                self._header_seen = True
                at = self._at
                continue
            report.lines += 1
            if self._missing:
                report.bad(n, f"the format has no {', '.join(self._missing)} field")
                continue
            if len(parts) != self._width:
                report.bad(n, f"{len(parts)} fields, the format has {self._width}")
                continue
            try:
                rec = _record(parts, at, good, self._limit)
            except ValueError as exc:
                report.bad(n, str(exc))
                continue
            if rec is None:
                report.skipped += 1
                continue
            report.flows += 1
            yield rec


# (start, end, src, dst, proto, dport, packets, bytes, observed, reporter): a VPC flow as a tuple
Record = tuple[float, float, str, str, str, int | None, int, int, str, str]
# protocol numbers as the log writes them → names, without an int() per line
_PROTO = {"1": "icmp", "6": "tcp", "17": "udp", "58": "icmpv6"}


def _record(parts: list[str], at: tuple[int, ...], good: dict[str, str], limit: int) -> Record | None:
    # field positions looked up once per format (-1: absent), not by name per line
    i_status, i_psrc, i_src, i_pdst, i_dst, i_proto, i_start, i_end, i_action, i_dport, i_pk, i_by, i_if, i_inst = at
    status = parts[i_status] if i_status >= 0 else "-"
    if status != "OK" and status != "-":
        if status in ("NODATA", "SKIPDATA"):
            return None
        raise ValueError(f"log-status {status!r} is not OK, NODATA or SKIPDATA")
    # pkt-srcaddr/pkt-dstaddr: the packet's own addresses (differ from srcaddr behind a NAT
    # gateway or for traffic through a middlebox) — those name the workloads
    src = parts[i_psrc] if i_psrc >= 0 else "-"
    if src == "-":
        src = parts[i_src]
    dst = parts[i_pdst] if i_pdst >= 0 else "-"
    if dst == "-":
        dst = parts[i_dst]
    proto = parts[i_proto]
    start, end = parts[i_start], parts[i_end]
    if src == "-" or dst == "-" or proto == "-":
        return None
    if start == "-" or end == "-":
        raise ValueError("start or end is missing")
    # addresses repeat: each checked and written canonically once (the memo bounded: memory)
    s, d = good.get(src), good.get(dst)
    if s is None or d is None:
        s, d = _canonical(src), _canonical(dst)
        if s is None or d is None:
            raise ValueError(f"address {src!r} or {dst!r} is not an IP address")
        if len(good) < 100_000:
            good[src], good[dst] = s, d
    src, dst = s, d
    action = parts[i_action] if i_action >= 0 else "-"
    if action == "ACCEPT":
        observed = "accept"
    elif action == "REJECT":
        observed = "reject"
    elif action == "-":
        observed = "accept"
    else:
        raise ValueError(f"action {action!r} is not ACCEPT or REJECT")
    pname = _PROTO.get(proto)
    if pname is None:
        pname = proto_name(_int(proto, "protocol"))
    dport: int | None = None
    if pname == "tcp" or pname == "udp":
        dport_s = parts[i_dport] if i_dport >= 0 else "-"
        if dport_s != "-":
            dport = int(dport_s) if dport_s.isdecimal() else _int(dport_s, "dstport")
            if dport > 65535:
                raise ValueError(f"dstport {dport} is out of range")
    packets = parts[i_pk] if i_pk >= 0 else "-"
    nbytes = parts[i_by] if i_by >= 0 else "-"
    reporter = parts[i_if] if i_if >= 0 else "-"
    if reporter == "-":
        reporter = parts[i_inst] if i_inst >= 0 else "-"
    # str.isdecimal() is exactly what int() reads, never negative: the checked conversion
    # (_int) only for what fails it, which then says why
    t0 = int(start) if start.isdecimal() else _int(start, "start")
    t1 = int(end) if end.isdecimal() else _int(end, "end")
    if t0 > limit or t1 > limit:
        raise ValueError(f"start {start} or end {end} is more than a day ahead")
    if t1 < t0:
        raise ValueError(f"end {end} is before start {start}")
    return (
        float(t0),  # exact: below the limit, far below 2**53
        float(t1),
        src,
        dst,
        pname,
        dport,
        0 if packets == "-" else int(packets) if packets.isdecimal() else _int(packets, "packets"),
        0 if nbytes == "-" else int(nbytes) if nbytes.isdecimal() else _int(nbytes, "bytes"),
        observed,
        "" if reporter == "-" else reporter,
    )


def _canonical(v: str) -> str | None:
    """An IPv4 or IPv6 address (no zone index) as inventory addresses are written (``FD00::31``
    is ``fd00::31``), or None."""
    if "%" in v:
        return None
    try:
        return ipaddress.ip_address(v).compressed
    except ValueError:
        return None


def parse_text(
    file: str, text: IO[str] | Iterable[str], fields: list[str] | None = None
) -> tuple[list[Flow], ParseReport]:
    p = Parser(file, fields)
    flows = list(p.lines(text))
    return flows, p.report


def _lines(data: bytes, report: ParseReport) -> Iterator[str | None]:
    """An object's lines (gzip when it starts with gzip's magic, else plain text), decompressed
    as they are read; None for a line longer than :data:`MAX_LINE` (the rest of it read and
    dropped). Past :data:`MAX_OBJECT_BYTES` decompressed, or where the gzip stream breaks, reading
    stops and the reason is a malformed line. Read in chunks split at newlines, not a line at a
    time: ``readline`` per line made parsing 70 % slower, and memory stays one chunk plus one line."""
    chunks = _gunzip(data) if data[:2] == b"\x1f\x8b" else (data[i : i + _CHUNK] for i in range(0, len(data), _CHUNK))
    total = n = 0
    rest = b""  # the unfinished line the last chunk ended with
    skipping = False  # that line is already longer than MAX_LINE: dropped to its end
    try:
        for chunk in chunks:
            over = total + len(chunk) > MAX_OBJECT_BYTES
            if over:  # the lines that end within the limit are read, the rest is not
                chunk = chunk[: MAX_OBJECT_BYTES - total]
            total += len(chunk)
            lines = (rest + chunk).split(b"\n")
            rest = lines.pop()
            for line in lines:
                n += 1
                if skipping or len(line) > MAX_LINE:
                    skipping = False
                    yield None
                else:
                    yield line.decode("utf-8", errors="replace")
            if over:
                report.bad(
                    n + 1, f"the object is more than {MAX_OBJECT_BYTES} bytes decompressed: the rest is not read"
                )
                return
            if len(rest) > MAX_LINE:
                skipping, rest = True, b""
    except (OSError, EOFError, zlib.error) as exc:
        report.bad(n + 1, f"the gzip stream breaks after {total} bytes ({exc}): the rest is not read")
        return
    if rest or skipping:
        yield None if skipping else rest.decode("utf-8", errors="replace")


def _gunzip(data: bytes) -> Iterator[bytes]:
    """``data``'s gzip members decompressed, at most ``_CHUNK`` bytes at a time, the compressed
    bytes fed ``_IN`` at a time, never copied whole (memory: a chunk, whatever the ratio or the
    number of members). Where the stream breaks (a truncated member, bytes after a member that
    are neither a member nor zero padding, a corrupt block), what was decompressed before the
    break has been yielded, then the error is raised (GzipFile lost the chunk it was reading)."""
    view = memoryview(data)
    at = 0
    while at < len(view):
        d = zlib.decompressobj(wbits=31)
        pos, buf = at, memoryview(b"")
        while not d.eof:
            if not buf:
                if pos >= len(view):
                    tail = d.flush()
                    if tail:
                        yield tail
                    raise EOFError("Compressed file ended before the end-of-stream marker was reached")
                buf = view[pos : pos + _IN]
                pos += len(buf)
            out = d.decompress(buf, _CHUNK)
            if out:
                yield out
            buf = memoryview(d.unconsumed_tail)
        at = pos - len(d.unused_data)
        if view[at : at + 2].tobytes() != b"\x1f\x8b":
            if bytes(view[at:]).strip(b"\x00"):
                raise zlib.error(f"not a gzip member after the last one ({bytes(view[at : at + 2])!r})")
            return


def parse_gzip_records(file: str, data: bytes, fields: list[str] | None = None) -> tuple[list[Record], ParseReport]:
    """:func:`parse_gzip` as plain tuples (what the ingest folds)."""
    p = Parser(file, fields)
    records = list(p.object_records(data))
    return records, p.report


def parse_gzip(file: str, data: bytes, fields: list[str] | None = None) -> tuple[list[Flow], ParseReport]:
    """A delivered object's bytes (gzip; plain text is read as it is)."""
    p = Parser(file, fields)
    flows = list(p.lines(_lines(data, p.report)))
    return flows, p.report
