"""Drop events, flow summaries and their bounded buffers (memory and disk).

Nothing here can block enforcement: collectors only read kernel state, buffers drop the oldest
records when full (and count what they dropped), and the disk spool has a hard byte cap.
"""

from __future__ import annotations

import contextlib
import ipaddress
import json
import os
import re
import shutil
import subprocess
import threading
import time
from collections import OrderedDict
from collections.abc import Iterable
from dataclasses import replace
from pathlib import Path
from typing import Any, Generic, Literal, TypeVar, cast

from ringfence.agentwire import MAX_REPORT_RECORDS, DropEvent, FlowRecord, ReportBatch, ReportProto, ResponseError
from ringfence_agent.backends import TUPLE_LINGER_S, Observation
from ringfence_agent.plan import Plan
from ringfence_agent.state import atomic_write, read_regular, regular_fd

T = TypeVar("T", DropEvent, FlowRecord)
_PROTOS = {"tcp", "udp", "icmp", "icmpv6"}


class BoundedBuffer(Generic[T]):
    """Folds identical records (same key) and keeps at most ``limit`` keys; the oldest go first."""

    def __init__(self, limit: int) -> None:
        self.limit = limit
        self.items: OrderedDict[tuple[Any, ...], T] = OrderedDict()
        self.discarded = 0
        self._lock = threading.Lock()

    def __len__(self) -> int:
        return len(self.items)

    def add(self, key: tuple[Any, ...], record: T, fold: bool = True) -> None:
        with self._lock:
            old = self.items.get(key)
            if old is not None and fold:
                self.items[key] = _fold(old, record)
                return
            self.items[key] = record
            while len(self.items) > self.limit:
                self.items.popitem(last=False)
                self.discarded += 1

    def take(self, n: int) -> list[T]:
        with self._lock:
            out: list[T] = []
            while self.items and len(out) < n:
                out.append(self.items.popitem(last=False)[1])
            return out

    def put_back(self, records: Iterable[T], key_of: Any) -> None:
        for r in records:
            self.add(key_of(r), r)


def _fold(old: Any, new: Any) -> Any:
    if isinstance(old, DropEvent):
        # one source port survives folding only if every folded drop had it (one connection)
        sport = old.sport if old.sport == new.sport else None
        return replace(old, count=old.count + new.count, time=max(old.time, new.time), sport=sport)
    return replace(
        old,
        start=min(old.start, new.start),
        end=max(old.end, new.end),
        packets=max(old.packets, new.packets),
        bytes=max(old.bytes, new.bytes),
    )


def drop_key(e: DropEvent) -> tuple[Any, ...]:
    """Without the source port: each retry of a blocked connection has a new one, and reports
    must stay as bounded as the destinations are."""
    return ("d", e.direction, e.src, e.dst, e.proto, e.dport, e.rule_id, e.action)


def flow_key(f: FlowRecord) -> tuple[Any, ...]:
    """One connection (re-observed connections fold: counters are cumulative, so max wins)."""
    return ("f", f.direction, f.src, f.dst, f.proto, f.sport, f.dport)


def summarize_flows(flows: list[FlowRecord]) -> list[FlowRecord]:
    """Connections → summaries per (direction, src, dst, proto, dport): ephemeral ports folded,
    packets and bytes summed over the connections, first start and last end kept."""
    out: dict[tuple[Any, ...], FlowRecord] = {}
    for f in flows:
        key = (f.direction, f.src, f.dst, f.proto, f.dport)
        old = out.get(key)
        if old is None:
            out[key] = replace(f, sport=None)
        else:
            out[key] = replace(
                old,
                start=min(old.start, f.start),
                end=max(old.end, f.end),
                packets=old.packets + f.packets,
                bytes=old.bytes + f.bytes,
            )
    return list(out.values())


_TupleKey = tuple[str, str, str, str, int | None, int | None]  # point, src, dst, proto, sport, dport


class DropCollector:
    """Turns counter and tuple-table polls into DropEvents (only what is new since the last poll).

    Backends skip listing a drop point whose counter did not move; its tuples are carried over for
    ``linger`` seconds after their last new packet (the kernel's element timeout), so a later poll
    that lists the point again does not report them a second time."""

    def __init__(self, linger: float = TUPLE_LINGER_S) -> None:
        self.linger = linger
        self.counters: dict[str, int] = {}
        self.tuples: dict[_TupleKey, tuple[int, float]] = {}  # → (packets, when they last grew)

    def reset(self) -> None:
        self.counters.clear()
        self.tuples.clear()

    def events(self, plan: Plan, obs: Observation, now: float | None = None) -> list[DropEvent]:
        now = time.time() if now is None else now
        cmap = plan.counter_map()
        action: Literal["drop", "would-drop"] = "drop" if plan.mode == "enforce" else "would-drop"
        out: list[DropEvent] = []
        seen = {
            key: (packets, when)
            for key, (packets, when) in self.tuples.items()
            if obs.counters.get(key[0], 0) == self.counters.get(key[0], 0) and now - when < self.linger
        }
        for t in obs.tuples:
            key = (t.point, t.src, t.dst, t.proto, t.sport, t.dport)
            before, when = self.tuples.get(key, (0, now))
            new = t.packets - before
            if new < 0:
                new = t.packets  # the element expired and came back
            seen[key] = (t.packets, now if new > 0 else when)
            info = cmap.get(t.point)
            if new <= 0 or info is None:
                continue
            direction, rule_id, _ = info
            out.append(
                DropEvent(
                    time=now,
                    direction=direction,
                    src=t.src,
                    dst=t.dst,
                    proto=cast(ReportProto, t.proto) if t.proto in _PROTOS else "other",
                    sport=t.sport,
                    dport=t.dport,
                    rule_id=rule_id,
                    action=action,
                    count=new,
                )
            )
        self.tuples = seen
        self.counters = dict(obs.counters)
        return out


def counter_deltas(before: dict[str, int], after: dict[str, int]) -> dict[str, int]:
    return {k: v - before.get(k, 0) for k, v in after.items() if v - before.get(k, 0) > 0}


# --- flows ---------------------------------------------------------------------------------------

_CT_FIELD = re.compile(r"(\w+)=(\S+)")


def local_addresses() -> set[str]:
    """This host's addresses (from ``ip -j addr``, falling back to nothing)."""
    try:
        proc = subprocess.run(["ip", "-j", "addr", "show"], capture_output=True, text=True, timeout=5, check=False)
        data = json.loads(proc.stdout or "[]")
    except (OSError, subprocess.TimeoutExpired, json.JSONDecodeError):
        return set()
    out: set[str] = set()
    for link in data:
        for a in link.get("addr_info", []):
            if "local" in a:
                out.add(str(ipaddress.ip_address(a["local"])))
    return out


def parse_conntrack(lines: Iterable[str], local: set[str], now: float) -> list[FlowRecord]:
    """Parse ``/proc/net/nf_conntrack`` or ``conntrack -L`` lines (original direction only)."""
    out: list[FlowRecord] = []
    for line in lines:
        words = line.split()
        if not words:
            continue
        proto = next((w for w in words[:4] if w in ("tcp", "udp", "icmp", "icmpv6", "sctp")), "other")
        fields: dict[str, str] = {}
        counts: list[tuple[int, int]] = []
        pk = by = 0
        for k, v in _CT_FIELD.findall(line):
            if k in ("packets", "bytes"):
                if k == "packets":
                    pk = int(v)
                else:
                    by = int(v)
                    counts.append((pk, by))
                continue
            fields.setdefault(k, v)  # first occurrence = original direction
        src, dst = fields.get("src"), fields.get("dst")
        if src is None or dst is None:
            continue
        try:
            src, dst = str(ipaddress.ip_address(src)), str(ipaddress.ip_address(dst))
        except ValueError:
            continue
        if ipaddress.ip_address(src).is_loopback or ipaddress.ip_address(dst).is_loopback:
            continue
        if src in local:
            direction: Literal["inbound", "outbound"] = "outbound"
        elif dst in local:
            direction = "inbound"
        else:
            continue
        sport = int(fields["sport"]) if proto in ("tcp", "udp") and "sport" in fields else None
        dport = int(fields["dport"]) if proto in ("tcp", "udp") and "dport" in fields else None
        packets = sum(c[0] for c in counts)
        nbytes = sum(c[1] for c in counts)
        out.append(
            FlowRecord(
                start=now,
                end=now,
                src=src,
                dst=dst,
                proto=cast(ReportProto, proto) if proto in _PROTOS else "other",
                sport=sport,
                dport=dport,
                packets=packets,
                bytes=nbytes,
                direction=direction,
            )
        )
    return out


class FlowSource:
    """Where conntrack comes from: /proc/net/nf_conntrack, else ``conntrack -L``, else nothing."""

    def __init__(self, proc_path: Path = Path("/proc/net/nf_conntrack")) -> None:
        self.proc_path = proc_path
        self.kind: str
        # readable, not merely there: it is 0440 root, and the unit runs the agent as its own user
        if os.access(proc_path, os.R_OK):
            self.kind = "proc"
        elif shutil.which("conntrack"):
            self.kind = "conntrack-tool"
        else:
            self.kind = "unavailable"

    def lines(self) -> list[str]:
        if self.kind == "proc":
            try:
                return self.proc_path.read_text().splitlines()
            except OSError:
                return []
        if self.kind == "conntrack-tool":
            try:
                proc = subprocess.run(
                    ["conntrack", "-L", "-o", "extended"], capture_output=True, text=True, timeout=10, check=False
                )
            except (OSError, subprocess.TimeoutExpired):
                return []
            return proc.stdout.splitlines()
        return []


class Spool:
    """Report records that could not be sent, on disk, capped at ``max_bytes`` (oldest dropped)."""

    def __init__(self, path: Path, max_bytes: int) -> None:
        self.path = path
        self.max_bytes = max_bytes
        self.discarded = 0

    def append(self, batch: ReportBatch) -> None:
        line = batch.dumps() + "\n"
        if len(line) > self.max_bytes:
            self.discarded += len(batch.flows) + len(batch.drops)
            return
        self.path.parent.mkdir(parents=True, exist_ok=True)
        # appended to the spool itself: never through a link of its name, never to a FIFO
        fd = regular_fd(self.path, os.O_WRONLY | os.O_APPEND | os.O_CREAT)
        with os.fdopen(fd, "a") as f:
            f.write(line)
        self._trim()

    def _read(self) -> str:
        """The spool's text; a spool that is no regular file, or larger than appending makes it, is
        dropped (ValueError is only ever the file's own fault)."""
        try:
            return read_regular(self.path, 2 * self.max_bytes).decode()
        except ValueError:
            with contextlib.suppress(FileNotFoundError):
                self.path.unlink()
            raise

    def _trim(self) -> None:
        try:
            size = os.lstat(self.path).st_size
        except FileNotFoundError:
            return
        if size <= self.max_bytes:
            return
        try:
            lines = self._read().splitlines(keepends=True)
        except (FileNotFoundError, ValueError):
            return
        total = sum(len(x.encode()) for x in lines)
        while lines and total > self.max_bytes:
            dropped = lines.pop(0)
            total -= len(dropped.encode())
            try:
                b = json.loads(dropped)
                self.discarded += len(b.get("flows", [])) + len(b.get("drops", []))
            except json.JSONDecodeError:
                pass
        # a fresh temporary file of its own (never a fixed name someone else may have linked)
        atomic_write(self.path, "".join(lines), durable=False)

    def pop_all(self) -> list[ReportBatch]:
        try:
            text = self._read()
        except (FileNotFoundError, ValueError):
            return []
        self.path.unlink()
        out = []
        for line in text.splitlines():
            try:
                out.append(ReportBatch.loads(line))
            except ResponseError:
                continue
        return out


def make_batches(drops: list[DropEvent], flows: list[FlowRecord], discarded: int) -> list[ReportBatch]:
    """Split into batches within the API limits (record count; size is bounded by the count)."""
    n = MAX_REPORT_RECORDS // 4  # 500 + 500 records stay well under MAX_REPORT_BYTES
    batches = []
    i = 0
    while i < max(len(drops), len(flows)) or (i == 0 and discarded):
        batches.append(
            ReportBatch(drops=drops[i : i + n], flows=flows[i : i + n], dropped_records=discarded if i == 0 else 0)
        )
        i += n
    return batches
