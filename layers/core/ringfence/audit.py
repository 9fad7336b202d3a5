"""The audit record: who did what to which target, when and why. Append-only and hash-chained, in
every store.

Policy provisions and reverts, mode changes, quarantine and release, pairing keys: the local
version store writes these to ``audit.jsonl``, the AWS store to its audit table, ``ringfence
serve``'s SQLite store to its ``audit`` table. ``principal`` is the IAM principal in AWS and the
operator (``--author``, ``$RINGFENCE_ACTOR``, ``$USER``) locally.

The chain: each record a store appends gets ``seq`` (1, 2, …), ``prev`` (the previous record's
``hash``; :data:`GENESIS` for the first) and ``hash`` (SHA-256 over the canonical JSON of the record
without ``hash``, so ``prev`` is covered). The store writes its *head* (the last ``seq`` and
``hash``) in the same atomic step as the record, and two writers can never both append the same
``seq``. :func:`verify` recomputes the chain and compares its end with the head: an edited,
deleted, reordered or inserted record breaks it, and the first bad ``seq`` is named.

What the chain does not prove: someone who can rewrite every record *and* the head (the database
file, the table) can build a new, consistent chain. A head kept outside the store's trust domain
(``ringfence audit head`` saved elsewhere, then ``verify`` with it as an anchor) shows that. Records
written before chaining existed (no ``hash``) are not protected: ``verify`` passes them only in the
number the operator allows.
"""

from __future__ import annotations

import hashlib
import json
import time
import uuid
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from typing import Any

from pydantic import BaseModel, Field

GENESIS = "0" * 64
"""``prev`` of the first record of a chain."""


def derived_record_id(name: str) -> str:
    """A record id derived from what the record is of (``name``: its kind and the things it names),
    not drawn at random: a step made again (a redelivery, a retry whose commit went unanswered)
    derives the same id and finds its record written (``AuditRecordExists``), so writes none twice.
    The ids earlier releases derived are kept: ``uuid5`` of ``ringfence:`` + ``name``."""
    return uuid.uuid5(uuid.NAMESPACE_URL, f"ringfence:{name}").hex


class AuditRecord(BaseModel):
    id: str = Field(default_factory=lambda: uuid.uuid4().hex)
    time: float = Field(default_factory=time.time)
    principal: str
    action: str  # policy.provision | policy.revert | workload.mode | workload.quarantine | …
    target: str
    detail: dict[str, Any] = Field(default_factory=dict)
    reason: str = ""
    before: str = Field("", description="digest of the state the action changed, as it was ('' if none)")
    after: str = Field("", description="digest of that state as the action left it")
    seq: int = Field(0, description="position in the chain, from 1; 0 until a store appends it")
    prev: str = Field("", description="hash of the record before (GENESIS for the first)")
    hash: str = Field("", description="SHA-256 of the canonical JSON of this record without 'hash'")


class AuditHead(BaseModel):
    """The chain's last ``seq`` and ``hash``, written with each record."""

    seq: int = 0
    hash: str = GENESIS


def state_digest(value: Any) -> str:
    """``sha256:<hex>`` of a value's canonical JSON: the before/after digest of a piece of state."""
    return "sha256:" + hashlib.sha256(canonical(value)).hexdigest()


def canonical(value: Any) -> bytes:
    """Sorted keys, no whitespace, UTF-8: the same value, the same bytes, in every store."""
    return json.dumps(value, sort_keys=True, separators=(",", ":"), ensure_ascii=False, allow_nan=False).encode()


def record_hash(rec: AuditRecord) -> str:
    doc = rec.model_dump(mode="json")
    del doc["hash"]
    return hashlib.sha256(canonical(doc)).hexdigest()


MAX_RECORD_BYTES = 64 * 1024
"""The most a sealed record's canonical JSON may take: far under every store's limit (DynamoDB's
400 KB item), so a record's size is never what makes an audited change lose its record."""

# a text field (reason, target, principal, …) past this many characters is cut, should the record
# be over the limit still with its whole detail summarized
_MAX_FIELD_CHARS = 1024


# detail fields that say what a change did to a safeguard, or what it was judged against: kept
# whole longest, shortened only after every other field (and the reason) has been
SECURITY_FIELDS = frozenset(
    {
        "widens_failsafes",
        "newly_idle",
        "replaces_unverifiable",
        "held",
        "label_grants",
        "labels",
        "labels_in_force",
        "requested",
        "previous",
        "new",
        "old",
        "mode",
        "quarantined",
        "agent_key",
        "next_agent_key",
        "digest",
        "audit_id",
        "forced_past_failing_tests",
    }
)


def _summary(value: Any) -> dict[str, Any]:
    """What stands for a value that did not fit: ``truncated``, its size and its digest (SHA-256
    of a text's UTF-8, of any other value's canonical JSON)."""
    data = value.encode() if isinstance(value, str) else canonical(value)
    out: dict[str, Any] = {"truncated": True, "sha256": hashlib.sha256(data).hexdigest()}
    if isinstance(value, list | dict | str):
        out["count"] = len(value)
    return out


def _size(rec: AuditRecord) -> int:
    return len(canonical(rec.model_dump(mode="json")))


def _most(hi: int, fits: Callable[[int], bool]) -> int:
    """The largest n in 0..hi for which ``fits(n)`` (``fits`` holds for every n below one it holds
    for); -1 if not even 0 fits."""
    lo, best = 0, -1
    while lo <= hi:
        mid = (lo + hi) // 2
        if fits(mid):
            best, lo = mid, mid + 1
        else:
            hi = mid - 1
    return best


def _shortened(value: Any, n: int, cut: int) -> Any:
    """``value``'s summary with, for a list, its first ``n`` items (and, where ``cut`` > 0, the
    next one's first ``cut`` characters as ``"cut_item"``); for a text, its first ``n`` characters."""
    out = _summary(value)
    if isinstance(value, list):
        out["first"] = value[:n]
        if cut > 0:
            out["cut_item"] = value[n][:cut]
    elif isinstance(value, str):
        out["first"] = value[:n]
    return out


def _shorten_field(rec: AuditRecord, detail: dict[str, Any], key: str, limit: int) -> bool:
    """Shorten ``detail[key]`` (in place) to as much of it as lets ``rec`` fit in ``limit``: a
    list its first items, a text its first characters, anything else its summary alone. True if
    the record now fits."""
    value = detail[key]

    def fits(candidate: Any) -> bool:
        return _size(rec.model_copy(update={"detail": {**detail, key: candidate}})) <= limit

    n = -1
    if isinstance(value, list | str):
        n = _most(len(value), lambda k: fits(_shortened(value, k, 0)))
    if n < 0:
        detail[key] = _summary(value)
        return fits(detail[key])
    cut = 0  # a list whose first item alone is too long: that item's beginning
    if isinstance(value, list) and n == 0 and value and isinstance(value[0], str):
        cut = max(_most(len(value[n]), lambda c: fits(_shortened(value, n, c))), 0)
    detail[key] = _shortened(value, n, cut)
    return True


def bounded(rec: AuditRecord, limit: int = MAX_RECORD_BYTES) -> AuditRecord:
    """``rec`` if its canonical JSON fits in ``limit`` bytes. Otherwise a copy shortened, the
    largest part first, until it fits:

    1. the ``detail`` fields over 1 KiB other than :data:`SECURITY_FIELDS`, and a ``reason``
       over 1024 characters (cut to them), by size: a list keeps its first items, a text its
       first characters, each as ``{"truncated": true, "count": …, "sha256": … (of the whole),
       "first": …}`` (a list whose first item is too long: ``cut_item``, that item's beginning;
       anything else: the summary alone);
    2. then the security fields over 1 KiB, the same way (what a change did to a safeguard is
       the last to go); then the small fields;
    3. then, if need be, the whole ``detail`` by one summary and the text fields longer than 1024
       characters cut.

    Each text cut is named in ``detail["truncated_fields"]`` with its length and digest. Every
    store seals through this (:func:`seal`): an action's record is always one its store can hold."""
    if _size(rec) <= limit:
        return rec
    detail = dict(rec.detail)
    work = rec
    sized = {k: len(canonical(detail[k])) for k in detail}

    def by_size(keys: Iterable[str]) -> list[str]:
        return sorted(keys, key=lambda k: sized[k], reverse=True)

    large = {k for k in detail if sized[k] > _MAX_FIELD_CHARS}
    # the large ordinary fields, and an over-long reason among them by its size; then the large
    # security fields; the small fields only after all of them (shortening one gains little)
    steps = by_size(large - SECURITY_FIELDS)
    if len(rec.reason) > _MAX_FIELD_CHARS:
        at = next((i for i, k in enumerate(steps) if sized[k] < len(rec.reason.encode())), len(steps))
        steps.insert(at, "\0reason")
    steps += by_size(large & SECURITY_FIELDS)
    steps += by_size(set(detail) - large - SECURITY_FIELDS) + by_size((set(detail) - large) & SECURITY_FIELDS)
    for key in steps:
        if key == "\0reason":
            detail.setdefault("truncated_fields", {})["reason"] = _summary(rec.reason)
            work = work.model_copy(update={"reason": rec.reason[:_MAX_FIELD_CHARS]})
            if _size(work.model_copy(update={"detail": detail})) <= limit:
                return work.model_copy(update={"detail": detail})
            continue
        if _shorten_field(work, detail, key, limit):
            return work.model_copy(update={"detail": detail})
    summary: dict[str, Any] = {"truncated": True, "detail": _summary(rec.detail)}
    update: dict[str, Any] = {"detail": summary}
    for name in ("principal", "action", "target", "reason", "before", "after"):
        text = getattr(rec, name)
        if len(text) > _MAX_FIELD_CHARS:
            update[name] = text[:_MAX_FIELD_CHARS]
            summary.setdefault("truncated_fields", {})[name] = _summary(text)
    return rec.model_copy(update=update)


def seal(rec: AuditRecord, head: AuditHead) -> AuditRecord:
    """``rec`` as the record after ``head``: its ``seq``, ``prev`` and ``hash`` set, its size
    :func:`bounded`."""
    # bounded as sealed: its seq, prev and a hash's 64 characters counted
    placed = rec.model_copy(update={"seq": head.seq + 1, "prev": head.hash, "hash": "0" * 64})
    linked = bounded(placed).model_copy(update={"hash": ""})
    linked.hash = record_hash(linked)
    return linked


def head_of(rec: AuditRecord) -> AuditHead:
    return AuditHead(seq=rec.seq, hash=rec.hash)


@dataclass(slots=True)
class Verdict:
    ok: bool
    records: int  # chained records checked
    unchained: int  # records from before chaining (no hash), at the start of the log
    first_bad_seq: int | None = None
    problem: str = ""

    def report(self) -> str:
        if self.ok:
            extra = (
                f"; {self.unchained} earlier record(s) from before chaining are not covered" if self.unchained else ""
            )
            return f"ok: {self.records} record(s) chained, the head matches{extra}"
        where = "before the chain" if self.first_bad_seq == 0 else f"at seq {self.first_bad_seq}"
        return f"BROKEN {where}: {self.problem}"


def verify(
    log: list[AuditRecord],
    head: AuditHead | None,
    anchors: list[AuditHead] | None = None,
    *,
    head_before: AuditHead | None = None,
    allow_unchained: int = 0,
) -> Verdict:
    """Check ``log`` (in the store's order) against itself and the store's ``head``.

    Each record must hash to its ``hash``, carry the next ``seq`` and the previous ``hash`` as
    ``prev``; the last must be the head. Records without a hash (written before chaining existed)
    are accepted only before the first chained one, dated before it, and only as many as
    ``allow_unchained`` says: nothing covers them, so anyone who may write the store could add one
    that reads as history; the operator, having checked them, names their number once.
    ``anchors`` are heads kept outside the store (``ringfence audit head`` saved elsewhere): the
    chain must still hold each one, which a rewritten chain with a matching head does not.

    A store that is written while it is read (no snapshot of log and head together): pass the head
    read before the log as ``head_before`` and the one read after it as ``head``. The log must then
    hold ``head_before`` and end no later than ``head``; records appended between the reads may be
    in it or not, so a record appended meanwhile is not a false BROKEN."""
    verdict = _verify_chain(log, head, head if head_before is None else head_before)
    if not verdict.ok:
        return verdict
    by_seq = {r.seq: r.hash for r in log if r.hash}
    for anchor in sorted(anchors or [], key=lambda a: a.seq):
        if anchor.seq not in by_seq:
            return Verdict(
                False,
                verdict.records,
                verdict.unchained,
                anchor.seq,
                f"an anchored head is at seq {anchor.seq}: the chain ends before it (truncated and rebuilt)",
            )
        if by_seq[anchor.seq] != anchor.hash:
            return Verdict(
                False,
                verdict.records,
                verdict.unchained,
                anchor.seq,
                f"seq {anchor.seq} is not the record an anchored head names (the chain was rewritten)",
            )
    if verdict.unchained != allow_unchained:
        return Verdict(
            False,
            verdict.records,
            verdict.unchained,
            0,
            f"{verdict.unchained} record(s) without a hash (from before chaining, or added since) where "
            f"{allow_unchained} were allowed: nothing covers them; check them, then allow that number",
        )
    return verdict


def _verify_chain(log: list[AuditRecord], head: AuditHead | None, head_before: AuditHead | None) -> Verdict:
    unchained = 0
    present = {r.seq for r in log if r.hash}
    expect = AuditHead()
    chained = 0
    by_seq: dict[int, str] = {}
    first_chained = next((r.time for r in log if r.hash), None)
    for rec in log:
        if not rec.hash:
            if chained:
                return Verdict(False, chained, unchained, expect.seq + 1, f"record {rec.id} is not chained")
            # a record from before chaining has no place in it, and is older than its first record
            if rec.seq or rec.prev or (first_chained is not None and rec.time > first_chained):
                return Verdict(
                    False, chained, unchained, 0, f"record {rec.id} has no hash but a seq, a prev or a later time"
                )
            unchained += 1
            continue
        chained += 1
        want = expect.seq + 1
        if rec.seq != want:
            kind = "missing (deleted)" if rec.seq > want and want not in present else "out of order or repeated"
            return Verdict(False, chained, unchained, want, f"expected seq {want}, found {rec.seq}: a record is {kind}")
        if record_hash(rec) != rec.hash:
            return Verdict(False, chained, unchained, rec.seq, f"record {rec.id} does not match its hash (edited)")
        if rec.prev != expect.hash:
            return Verdict(
                False,
                chained,
                unchained,
                rec.seq,
                f"record {rec.id} does not follow seq {expect.seq} (inserted or replaced)",
            )
        expect = head_of(rec)
        by_seq[rec.seq] = rec.hash
    hi = head or AuditHead()
    lo = head_before or AuditHead()

    def broken(seq: int, problem: str) -> Verdict:
        return Verdict(False, chained, unchained, seq, problem)

    if hi.seq < lo.seq:
        return broken(hi.seq + 1, f"the head went back from seq {lo.seq} to {hi.seq} while the log was read")
    if expect.seq > hi.seq:
        return broken(hi.seq + 1, f"the head is at seq {hi.seq}: record(s) after it were appended without the head")
    if expect.seq < lo.seq:
        return broken(expect.seq + 1, f"the head is at seq {lo.seq}: the last record(s) are missing")
    # the log ends between the two reads of the head: what it holds of them must be theirs
    for end in (lo, hi):
        if end.seq and end.seq <= expect.seq and by_seq.get(end.seq) != end.hash:
            return broken(end.seq, "the last record is not the one the head names (replaced)")
    return Verdict(True, chained, unchained)
