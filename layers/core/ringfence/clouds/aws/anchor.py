"""The audit chain's head anchored in S3, outside the audit table's trust domain.

The anchor function (``functions/anchor``) reads the head (one ``GetItem``; its role may write
nothing in the audit table) and writes it to a bucket with Object Lock in compliance mode, which
only it may write: a principal that rewrites the whole chain and its head cannot rewrite what was
anchored. ``ringfence audit verify --anchor s3://BUCKET/PREFIX`` reads every anchor back
(:func:`read_anchors`) and requires the chain to still hold each one (:func:`ringfence.audit.verify`).

Keys are ``<prefix><seq, 12 digits>-<hash>.json``: S3 lists them in chain order, and writing the same
head again only adds a version of the same content.

An anchor is locked for years, so a false one would make every later ``verify`` fail: whoever may
write the audit table (six function roles) could otherwise put a made-up head, wait for the
schedule and put the real one back. So the function anchors a head only where the chain holds it:
the records since the last anchor (one paged ``Query`` of the ``chain`` items) must each hash right
and link from the anchored head to the new one. With no anchor yet, that is the whole chain from
genesis (seq 1, ``prev`` :data:`~ringfence.audit.GENESIS`): a forged record sealed over any head at
seq 1,000,000, and a head naming it, would otherwise be anchored on the first run. A head that does
not is refused (the function fails, its alarm fires) and nothing is written.

The records are checked as the ``Query`` pages arrive, keeping only the last one's ``seq`` and
``hash``: memory does not grow with the chain (a first anchor of a deployment that has audited
for months reads millions). Should the run's time end before the head (``budget``), the last
record verified is anchored instead: a head the chain holds, linked from the last anchor, so an
anchor like any other, and the next run continues from it. No other state is kept: the progress
is in the bucket only this function may write.
"""

from __future__ import annotations

import json
import re
import time
from collections.abc import Callable, Iterable, Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any, Protocol

from pydantic import ValidationError

from ringfence.audit import AuditHead, AuditRecord, record_hash

PREFIX = "anchors/"


class AnchorError(Exception):
    """An anchor could not be read (not an anchor, or none where one was expected)."""


class AnchorRefused(Exception):
    """The head read is not one the chain holds after the last anchor: nothing was anchored."""


class ChainSource(Protocol):
    def audit_head(self) -> AuditHead | None: ...

    def audit_pages(self, after: int, upto: int) -> Iterator[list[AuditRecord]]: ...


def anchor_key(head: AuditHead, prefix: str = PREFIX) -> str:
    return f"{prefix}{head.seq:012d}-{head.hash}.json"


def _key_pattern(prefix: str) -> re.Pattern[str]:
    return re.compile(re.escape(prefix) + r"(\d{12})-([0-9a-f]{64})\.json")


_HASH = re.compile(r"[0-9a-f]{64}")


def check_extends(
    head: AuditHead,
    last: AuditHead | None,
    segment: Iterable[AuditRecord],
    out_of_time: Callable[[], bool] | None = None,
) -> AuditHead:
    """``segment`` (the chain's records after ``last``, up to ``head``, read as it is consumed)
    links the last anchored head to ``head``, each record hashing to its ``hash``; without a last
    anchor, ``last`` is the genesis head (seq 0) and ``segment`` the whole chain from seq 1.
    Returns ``head``; or, should ``out_of_time()`` say so after a record short of the head, that
    record's head (verified from ``last``: the progress to anchor). Only the last record is kept.
    :class:`AnchorRefused` naming why, otherwise."""
    if head.seq < 1 or not _HASH.fullmatch(head.hash):
        raise AnchorRefused(f"the head {head.seq}/{head.hash[:16]} is not one a chain has")
    last = last if last is not None else AuditHead()
    if head.seq < last.seq:
        raise AnchorRefused(f"the head went back to seq {head.seq} from the anchored seq {last.seq}")
    if head.seq == last.seq:
        if head.hash != last.hash:
            raise AnchorRefused(f"the head at seq {head.seq} names another record than the anchored one")
        return head
    want_seq, prev = last.seq + 1, last.hash
    for rec in segment:
        if rec.seq != want_seq:
            raise AnchorRefused(f"the chain has seq {rec.seq} where seq {want_seq} was expected")
        if not rec.hash or record_hash(rec) != rec.hash:
            raise AnchorRefused(f"the chain's record at seq {rec.seq} does not match its hash")
        if rec.prev != prev:
            raise AnchorRefused(f"the chain's record at seq {rec.seq} does not follow seq {rec.seq - 1}")
        prev, want_seq = rec.hash, want_seq + 1
        if rec.seq < head.seq and out_of_time is not None and out_of_time():
            return AuditHead(seq=rec.seq, hash=rec.hash)
    if want_seq != head.seq + 1 or prev != head.hash:
        raise AnchorRefused(f"the chain does not hold the head {head.seq}/{head.hash[:16]}")
    return head


def _drained(pages: Iterable[list[AuditRecord]]) -> Iterator[AuditRecord]:
    """The pages' records in order, each page emptied as it is read: no page is still held while
    the next one is fetched."""
    for page in pages:
        page.reverse()
        while page:
            yield page.pop()


@dataclass(slots=True)
class Anchored:
    head: AuditHead | None  # None: the chain is empty
    key: str | None  # the object written, None when nothing was
    # False: the run's time ended first; ``head`` is the last record verified (anchored as
    # progress), short of the chain's head, and the next run continues from it
    complete: bool = True
    behind: int = 0  # how many records the chain's head is past ``head`` then


class Anchorer:
    """One container's anchoring: the head as read, written when it moved since this container
    last wrote it, and only where the chain holds it after the last anchor (:func:`check_extends`;
    a new container lists the bucket's keys for the last one)."""

    def __init__(
        self,
        store: ChainSource,
        s3: Any,
        bucket: str,
        prefix: str = PREFIX,
        clock: Callable[[], float] = time.time,
    ) -> None:
        self.store, self.s3, self.bucket, self.prefix, self.clock = store, s3, bucket, prefix, clock
        self.last: AuditHead | None = None

    def run(self, budget: float | None = None) -> Anchored:
        """Anchor the head, if the chain holds it after the last anchor. ``budget``: the seconds
        this run may spend reading and checking records; past them, the last record verified is
        anchored instead (``Anchored.complete`` False) and the next run continues from it."""
        head = self.store.audit_head()
        if head is None or head == self.last:
            return Anchored(head, None)
        last = self.last or self.last_anchored()
        # no anchor yet: from genesis, the whole chain (never the head's own record alone)
        start = last.seq if last is not None else 0
        records: Iterable[AuditRecord] = ()
        if head.seq > start >= 0:
            records = _drained(self.store.audit_pages(start, head.seq))
        out_of_time = None
        if budget is not None:
            ends = time.monotonic() + budget
            out_of_time = lambda: time.monotonic() >= ends  # noqa: E731
        held = check_extends(head, last, records, out_of_time)
        behind = head.seq - held.seq
        if held == last:  # a new container: anchored already
            self.last = held
            return Anchored(held, None)
        key = anchor_key(held, self.prefix)
        body = json.dumps({"seq": held.seq, "hash": held.hash, "time": self.clock()}, sort_keys=True)
        # the bucket's default retention locks the object; a put to a bucket with Object Lock must
        # carry a checksum (Content-MD5 or a flexible checksum), hence the explicit algorithm
        self.s3.put_object(
            Bucket=self.bucket, Key=key, Body=body.encode(), ContentType="application/json", ChecksumAlgorithm="SHA256"
        )
        self.last = held
        return Anchored(held, key, complete=behind == 0, behind=behind)

    def last_anchored(self) -> AuditHead | None:
        """The highest head anchored under the prefix, by its key (keys sort in chain order)."""
        pattern, last = _key_pattern(self.prefix), None
        for page in self.s3.get_paginator("list_objects_v2").paginate(Bucket=self.bucket, Prefix=self.prefix):
            for obj in page.get("Contents", []):
                if m := pattern.fullmatch(obj["Key"]):
                    last = AuditHead(seq=int(m[1]), hash=m[2])
        return last


def parse_s3_url(url: str) -> tuple[str, str]:
    """``s3://bucket/prefix`` → (bucket, prefix); no prefix: :data:`PREFIX`."""
    rest = url.removeprefix("s3://")
    bucket, _, prefix = rest.partition("/")
    if not bucket:
        raise AnchorError(f"{url!r}: expected s3://BUCKET[/PREFIX]")
    return bucket, prefix or PREFIX


def read_anchors(s3: Any, bucket: str, prefix: str = PREFIX, workers: int = 16) -> list[tuple[AuditHead, str]]:
    """Every version of every object under ``prefix``, each an anchored head, with where it was
    read (``s3://bucket/key (version …)``). Versions, not just the current objects: a later put to
    an anchor's key (or a delete marker) hides nothing, since the locked versions stay and each one
    counts. An empty listing is an error: a wrong bucket or prefix must not verify as "no anchor
    broken"."""
    versions: list[tuple[str, str]] = []
    for page in s3.get_paginator("list_object_versions").paginate(Bucket=bucket, Prefix=prefix):
        versions += [(v["Key"], v["VersionId"]) for v in page.get("Versions", [])]
    if not versions:
        raise AnchorError(f"no anchor under s3://{bucket}/{prefix}: a wrong bucket or prefix, or none written yet")

    def one(kv: tuple[str, str]) -> tuple[AuditHead, str]:
        key, version = kv
        where = f"s3://{bucket}/{key} (version {version})"
        body = s3.get_object(Bucket=bucket, Key=key, VersionId=version)["Body"].read()
        try:
            doc = json.loads(body)
            # both named: AuditHead's defaults (seq 0, the genesis hash) are no anchor
            if not isinstance(doc, dict) or not {"seq", "hash"} <= doc.keys():
                raise ValueError("seq and hash are required")
            head = AuditHead.model_validate(doc)
        except ValueError as exc:  # JSON and pydantic's errors alike
            reason = exc.errors()[0]["msg"] if isinstance(exc, ValidationError) else str(exc)
            raise AnchorError(f"{where}: not an anchored head ({reason})") from None
        return head, where

    # thousands of hourly anchors a year: fetched in parallel (boto3 clients are thread-safe)
    with ThreadPoolExecutor(max_workers=workers) as pool:
        return list(pool.map(one, versions))
