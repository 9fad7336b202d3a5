"""Flows in: agents' report batches and VPC Flow Log objects → resolved, classified, aggregated
rows in the flow store. The same code for ``ringfence serve``, the demo and the S3-triggered
function ``functions/flows``.
"""

from __future__ import annotations

import hashlib
import ipaddress
import itertools
import logging
import os
import time
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from typing import Any, Protocol

from ringfence.agentapi import MAX_AHEAD, MAX_SPAN
from ringfence.flows.aggregate import DEFAULT_RETENTION_DAYS, Aggregator, FlowRow
from ringfence.flows.classify import Classifier
from ringfence.flows.records import Flow
from ringfence.flows.resolve import (
    NOBODY,
    AddressBook,
    AddressOwner,
    changed_owners,
    current_owners,
    latest_owners,
    sync_addresses,
)
from ringfence.flows.vpclogs import Parser, ParseReport, Record
from ringfence.model import Workload
from ringfence.policy import Policy
from ringfence.store.base import ACTIVE_STATES

log = logging.getLogger(__name__)

MAX_SKEW = MAX_AHEAD  # seconds an agent's flow may end after the ingest's now (clock skew; the report route's)
# memory per VPC Flow Log object (vpc_object)
CHUNK = 20_000  # records parsed, then resolved and folded, at a time
MEMO = 50_000  # entries of each per-address memo kept (past it, forgotten)
ADDRESSES = 200_000  # distinct addresses whose history is held (past it, forgotten and looked up again)
MAX_ROWS = 50_000  # distinct rows per object; flows that would make a further row are dropped and counted
# Distinct rows (UTC day of the flow, ends, proto/port, decision) one reporting workload's flows
# may write per UTC day of ingest: an end is a label set, not an address, so a busy host that
# talks to 100 app groups on 5 ports each makes ~500 a day; the example estate's hosts make < 20.
# Past it, flows of a further row are dropped and counted (FlowRowsCapped): one compromised host
# cannot fill the store, the map and suggestions with rows (30 days x this, at most).
# RINGFENCE_FLOW_ROWS_PER_REPORTER_DAY sets it (serve, the CLI, the flows function).
ROWS_PER_REPORTER_DAY = 1_000
MAX_ROWS_PER_REPORTER_DAY = 10_000  # a day's row-key digests stay one DynamoDB item (< 400 KB)
# an agent's flow may start at most this long before the first interval of its reporter's
# addresses (an interval opens at the ingest pass that first sees the address, after the agent
# has seen flows; an agent stamps a flow when it sees it, so never before its host was enrolled)
BEFORE_FIRST_SEEN = MAX_SPAN


def rows_per_reporter_day(env: dict[str, str] | None = None) -> int:
    """``RINGFENCE_FLOW_ROWS_PER_REPORTER_DAY`` (default :data:`ROWS_PER_REPORTER_DAY`)."""
    raw = (os.environ if env is None else env).get("RINGFENCE_FLOW_ROWS_PER_REPORTER_DAY", "")
    most = int(raw) if raw.strip() else ROWS_PER_REPORTER_DAY
    if not 0 <= most <= MAX_ROWS_PER_REPORTER_DAY:
        raise ValueError(f"RINGFENCE_FLOW_ROWS_PER_REPORTER_DAY must be from 0 to {MAX_ROWS_PER_REPORTER_DAY}")
    return most


class InventoryView(Protocol):
    id: str
    workload: Workload
    state: str
    observed_at: float

    @property
    def active(self) -> bool: ...
    def effective(self) -> Workload: ...


class FlowStore(Protocol):
    """The store's flow part (SQLite and DynamoDB, one contract test: tests/aws/test_store.py)."""

    def all_records(self) -> Sequence[InventoryView]: ...
    def get(self, workload_id: str) -> InventoryView | None: ...
    def note_addresses(self, owners: list[AddressOwner]) -> None: ...
    def address_history(self, addresses: list[str]) -> dict[str, list[AddressOwner]]: ...
    def add_flows(self, rows: list[FlowRow], ttl: int) -> None: ...
    def flow_rows(self, days: int = ...) -> list[FlowRow]: ...
    def admit_flow_keys(
        self, reporter: str, period: str, keys: list[str], most: int, ttl: int
    ) -> tuple[set[str], bool]: ...


def reporter_of(path: str) -> str:
    """The reporting workload of an archived batch: ``<wid>`` of ``…/reports/<wid>/<Y>/<M>/<D>/<uuid>.json``
    (how the agent API archives them); for a file outside that layout, its directory's name."""
    parts = path.replace("\\", "/").split("/")
    for i in range(len(parts) - 2, -1, -1):
        if parts[i] == "reports" and i + 1 < len(parts) - 1:
            return parts[i + 1]
    return parts[-2] if len(parts) > 1 else ""


def _spelled(address: str) -> str:
    """An address as inventory addresses and the history are written (a batch archived before
    the agent API wrote them so may spell one otherwise)."""
    try:
        return ipaddress.ip_address(address).compressed
    except ValueError:
        return address


def agent_flows(workload_id: str, batch: dict[str, Any]) -> list[Flow]:
    """An agent's report batch (:class:`ringfence.agentapi.ReportBatch`, as JSON) as flows."""
    out = []
    for r in batch.get("flows", []):
        out.append(
            Flow(
                start=float(r["start"]),
                end=float(r["end"]),
                src=_spelled(r["src"]),
                dst=_spelled(r["dst"]),
                proto=r["proto"],
                dport=r.get("dport"),
                packets=int(r.get("packets", 0)),
                bytes=int(r.get("bytes", 0)),
                origin="agent",
                observed="accept",
                reporter=workload_id,
                direction=r.get("direction", ""),
            )
        )
    for d in batch.get("drops", []):
        out.append(
            Flow(
                start=float(d["time"]),
                end=float(d["time"]),
                src=_spelled(d["src"]),
                dst=_spelled(d["dst"]),
                proto=d["proto"],
                dport=d.get("dport"),
                origin="agent",
                observed=d["action"],
                reporter=workload_id,
                rule_id=d.get("rule_id"),
                count=int(d.get("count", 1)),
                direction=d.get("direction", ""),
            )
        )
    return out


def _reported_end(f: Flow) -> str | None:
    """The address of the end an agent's record says is the reporter's (by its direction)."""
    return f.src if f.direction == "outbound" else f.dst if f.direction == "inbound" else None


@dataclass(slots=True)
class IngestResult:
    flows: int = 0
    rows: int = 0
    foreign: int = 0  # agent flows whose reported end (by direction) is not the reporter's: not taken
    overflow: int = 0  # flows of an object dropped: they would have made more than MAX_ROWS rows
    capped: int = 0  # rows an agent's flows would have made past its reporter's ROWS_PER_REPORTER_DAY: not stored
    files: list[ParseReport] = field(default_factory=list)

    @property
    def malformed(self) -> int:
        return sum(f.malformed for f in self.files)


def handed_at(get: Callable[[str], InventoryView | None]) -> Callable[[AddressOwner, Workload], float | None]:
    """When an address passed from its latest interval's owner to ``new``, by the inventory (or
    None: not known, the interval opens when the pass sees it). The new owner's record says it
    holds the address since its last observation (``observed_at``: the control plane's, never
    the host's); the old owner's says it no longer does since its own, once it is terminated or
    stopped (a deregistered or terminated record) or lists the address no more. A nobody's
    interval ended no owner's time. The handover is the later of the two: never before the old
    owner let the address go, so a new host still dates no flow into its predecessor's time."""

    def at(last: AddressOwner, new: Workload) -> float | None:
        rec = get(new.id)
        if rec is None:
            return None
        if last.workload_id == NOBODY:
            gone = last.since
        else:
            old = get(last.workload_id)
            if old is None or (old.state in ACTIVE_STATES and last.address in old.workload.ips):
                return None  # its end is not known (an offline twin may still hold it)
            gone = old.observed_at
        return max(rec.observed_at, gone)

    return at


class FlowIngest:
    """Ingest into ``store`` under ``policy`` (the active one), keeping rows ``retention_days``."""

    def __init__(
        self,
        store: FlowStore,
        policy: Policy,
        retention_days: int = DEFAULT_RETENTION_DAYS,
        rows_per_reporter: int | None = None,
    ) -> None:
        self.store = store
        self.policy = policy
        self.ttl = retention_days * 86400
        self.rows_per_reporter = rows_per_reporter_day() if rows_per_reporter is None else rows_per_reporter
        self._records: dict[str, InventoryView] | None = None

    def _get(self, workload_id: str) -> InventoryView | None:
        """A workload's record: as the last :meth:`sync` read them all, else from the store."""
        return self._records.get(workload_id) if self._records is not None else self.store.get(workload_id)

    def sync(self, at: float | None = None) -> int:
        """Note the inventory's current address owners (:mod:`ringfence.flows.resolve`). An
        address that changed hands since the last pass opens its new owner's interval when the
        inventory shows the handover (:func:`handed_at`), not at this pass: a new host's flows
        before the first pass that sees it are its own, not its address's previous owner's."""
        recs = self.store.all_records()
        self._records = {r.id: r for r in recs}  # read again by the flows' check, not per workload
        active = [r.effective() for r in recs if r.active]
        released = [ip for r in recs if not r.active for ip in r.workload.ips]
        now = time.time() if at is None else at
        return sync_addresses(self.store, active, released, now, handed_at(self._records.get))

    def sync_workload(self, workload_id: str, at: float | None = None) -> int:
        """Note one running workload's current addresses (a reporter's, between full
        :meth:`sync` passes); nothing for one unknown or not running (the full pass releases).
        An address another running workload holds too (the same private range in two VPCs or
        sites) is left as the full pass noted it: taking it here would open a new interval at
        every report, and give it back at every pass."""
        rec = self.store.get(workload_id)
        if rec is None or not rec.active:
            return 0
        current = current_owners([rec.effective()])
        latest = latest_owners(self.store, sorted(current))
        for address, last in latest.items():
            if last.workload_id not in (NOBODY, workload_id):
                other = self.store.get(last.workload_id)
                if other is not None and other.active and address in other.workload.ips:
                    del current[address]
        opened = changed_owners(
            current,
            {a: o for a, o in latest.items() if a in current},
            time.time() if at is None else at,
            handed_at(self.store.get),
        )
        if opened:
            self.store.note_addresses(opened)
        return len(opened)

    def flows(self, flows: Iterable[Flow], result: IngestResult | None = None) -> IngestResult:
        """Classify and store ``flows``. An agent's flow is taken only if its own end is the
        reporter's, *when the flow started*: the source for an ``outbound`` record, the
        destination for an ``inbound`` one (a record without a direction, or whose direction names
        the other end, is refused: it would put the reporter's word on the peer's side, and SIEM
        events on the peer's address). A host's agent sees its own traffic only, and flows it
        invents between other workloads (or dates back into the time another workload held its
        address) would steer the dependency map and rule suggestions. Each row records which end
        reported it (:attr:`FlowRow.reported_by`). VPC Flow Logs come from AWS and are taken as
        they are.

        An end is the reporter's at the flow's start when the address history gives it the
        address then; or when the reporter's running inventory record holds the address now and,
        at the start, the history gives it nobody (released, or never noted) or a workload that
        is running and holds it now too (one private range in two VPCs or sites: the history
        names one of the twins); a start before the address's first interval is judged by that
        first interval (one is opened only when an ingest pass notes the owner, so a new host's
        first flows precede it). In the latter cases the reporter's end is resolved to the
        reporter itself, never to the history's owner. A start in (or before) the interval of
        another workload that no longer holds the address (an address taken over after its owner
        went: the old owner's flows are not the new host's to report), or a flow ending later
        than ``MAX_SKEW`` seconds from now (or before it starts), is refused (counted in ``foreign``)."""
        result = result or IngestResult()
        flows = list(flows)
        if not flows:
            return result
        wanted = sorted({f.src for f in flows} | {f.dst for f in flows})
        book = AddressBook(self.store.address_history(wanted))
        now = time.time()
        holding: dict[str, dict[str, Workload]] = {}
        running: dict[str, bool] = {}

        def held(reporter: str) -> dict[str, Workload]:
            """The reporter's addresses now, by its inventory record (read once per reporter,
            and only for flows the history does not give it): none unless it is running."""
            if reporter not in holding:
                rec = self._get(reporter) if reporter else None
                holding[reporter] = current_owners([rec.effective()]) if rec is not None and rec.active else {}
            return holding[reporter]

        def holds_now(workload_id: str, address: str) -> bool:
            k = f"{workload_id}\0{address}"
            if k not in running:
                rec = self._get(workload_id)
                running[k] = rec is not None and rec.active and address in current_owners([rec.effective()])
            return running[k]

        def own(f: Flow, address: str) -> bool:
            o = book.interval(address, f.start)
            return o is not None and o.workload_id == f.reporter

        def twin(f: Flow, address: str) -> bool:
            if address not in held(f.reporter):
                return False
            o = book.interval(address, f.start)
            if o is None:  # before the first interval noted: as its owner (none at all: nobody)
                first = book.history.get(address)
                if not first:
                    return True
                o = first[0]
            return o.workload_id in (NOBODY, f.reporter) or holds_now(o.workload_id, address)

        oldest = now - self.ttl  # a row of an older day would outlive its retention
        firsts: dict[str, float] = {}

        def born(reporter: str) -> float:
            """When the control plane first noted one of the reporter's addresses (its own
            intervals, or the first interval of an address it holds now), less
            ``BEFORE_FIRST_SEEN``; none noted: the retention's start."""
            if reporter not in firsts:
                seen = [o.since for h in book.history.values() for o in h if o.workload_id == reporter]
                seen += [book.history[a][0].since for a in held(reporter) if book.history.get(a)]
                firsts[reporter] = min(seen) - BEFORE_FIRST_SEEN if seen else oldest
            return firsts[reporter]

        kept: list[Flow] = []
        twins: dict[str, list[Flow]] = {}  # reporter → its flows resolved by its own record
        late = 0
        stale = 0  # agent flows before the retention window or before their reporter was first seen
        for f in flows:
            if f.origin != "agent":
                kept.append(f)
            elif not f.start <= f.end <= now + MAX_SKEW:
                late += 1
            elif f.start < oldest or f.start < born(f.reporter):
                stale += 1
            elif (end := _reported_end(f)) is None:
                continue  # no direction: which end saw it is not known
            elif own(f, end):
                kept.append(f)
            elif twin(f, end):
                twins.setdefault(f.reporter, []).append(f)
        taken = len(kept) + sum(len(t) for t in twins.values())
        if taken < len(flows):
            result.foreign += len(flows) - taken
            by = sorted({f.reporter for f in flows if f.origin == "agent"} - {f.reporter for f in kept} - set(twins))
            log.warning(
                "%d agent flows do not name their reporter's address at the end their direction gives, when "
                "they started (%d end in the future, %d start before the retention window or before their "
                "reporter was first seen): not taken (%s)",
                len(flows) - taken,
                late,
                stale,
                by,
            )
        classifier = Classifier(self.policy, book)
        agg = Aggregator(classifier)
        agg.add(f for f in kept if f.origin != "agent")
        rows = agg.rows
        seen = agg.seen
        # each reporter's rows apart: what one workload may add a day is bounded (rows_per_reporter)
        kept_of: dict[str, list[Flow]] = {}
        for f in kept:
            if f.origin == "agent":
                kept_of.setdefault(f.reporter, []).append(f)
        for reporter in sorted(set(kept_of) | set(twins)):
            theirs: dict[tuple[str, str], FlowRow] = {}
            n = 0
            if reporter in kept_of:
                ragg = Aggregator(classifier)
                ragg.add(kept_of[reporter])
                theirs, n = ragg.rows, ragg.seen
            if reporter in twins:
                # the same history but for the reporter's own addresses, which are the reporter's
                mine = {
                    a: [AddressOwner(address=a, since=now, workload_id=w.id, workload=w)]
                    for a, w in held(reporter).items()
                }
                tagg = Aggregator(Classifier(self.policy, AddressBook({**book.history, **mine})))
                tagg.add(twins[reporter])
                for key, row in tagg.rows.items():
                    if key in theirs:
                        theirs[key].add(row)
                    else:
                        theirs[key] = row
                n += tagg.seen
            n -= self._cap(reporter, theirs, result, now)
            for key, row in theirs.items():
                if key in rows:
                    rows[key].add(row)
                else:
                    rows[key] = row
            seen += max(0, n)
        if rows:
            self.store.add_flows(list(rows.values()), self.ttl)
        result.flows += seen
        result.rows += len(rows)
        return result

    def _cap(self, reporter: str, rows: dict[tuple[str, str], FlowRow], result: IngestResult, now: float) -> int:
        """Drop from ``rows`` (one reporter's) those past its rows of the day
        (``rows_per_reporter``, :meth:`FlowStore.admit_flow_keys`); the flows dropped. Logged
        once per reporter and day, counted in ``result.capped`` (rows)."""
        if not rows:
            return 0
        digest = {k: hashlib.blake2b(f"{k[0]}|{k[1]}".encode(), digest_size=10).hexdigest() for k in rows}
        period = time.strftime("%Y-%m-%d", time.gmtime(now))
        admitted, first = self.store.admit_flow_keys(
            reporter, period, sorted(digest.values()), self.rows_per_reporter, 2 * 86400
        )
        out = [k for k, d in digest.items() if d not in admitted]
        if not out:
            return 0
        if first:
            log.warning(
                "%s's flows make more than %d rows today: the flows of further rows are not stored "
                "(FlowRowsCapped; logged once a day)",
                reporter,
                self.rows_per_reporter,
            )
        result.capped += len(out)
        return sum(rows.pop(k).flows for k in out)

    def agent_batch(self, workload_id: str, batch: dict[str, Any]) -> IngestResult:
        return self.flows(agent_flows(workload_id, batch))

    def vpc_object(self, name: str, data: bytes, fields: list[str] | None = None) -> IngestResult:
        """One VPC Flow Log object, read and folded a chunk of lines at a time: the memory it
        takes is bounded whatever its size (:data:`~ringfence.flows.vpclogs.MAX_OBJECT_BYTES`
        decompressed are read, lines of at most ``MAX_LINE`` bytes), by ``CHUNK`` records, the
        memos (``MEMO``, forgotten past it), the addresses looked up (``ADDRESSES``, looked up
        again past it) and the rows (``MAX_ROWS``: flows that would make a further row are
        dropped and counted in ``overflow``)."""
        parser = Parser(name, fields)
        report = parser.report
        result = IngestResult(files=[report])
        book = AddressBook({})
        # plain tuples folded with a decision cache per address pair (docs/benchmarks.md, Flows in)
        agg = Aggregator(Classifier(self.policy, book), max_rows=MAX_ROWS)
        known: set[str] = set()
        chunk: list[Record] = []
        records = parser.object_records(data)
        while True:
            chunk = list(itertools.islice(records, CHUNK))
            if not chunk:
                break
            new = ({r[2] for r in chunk} | {r[3] for r in chunk}) - known
            if len(known) + len(new) > ADDRESSES:
                known.clear()
                book.clear()
                agg.trim(0)  # the memos name intervals of the histories forgotten
                new = {r[2] for r in chunk} | {r[3] for r in chunk}
            if new:
                book.add(self.store.address_history(sorted(new)))
                known |= new
            agg.add_records(chunk, "vpc")
            agg.trim(MEMO)
        for bad in report.errors:
            log.warning("flow log line malformed: %s", bad)
        if agg.overflow:
            log.warning("%s: %d flows not stored: they would make more than %d rows", name, agg.overflow, MAX_ROWS)
        if agg.failed:
            log.warning("%s: %d flows could not be classified", name, agg.failed)
        result.overflow += agg.overflow
        rows = list(agg.rows.values())
        if rows:
            self.store.add_flows(rows, self.ttl)
        result.flows += agg.seen
        result.rows += len(rows)
        return result
