"""The audit chain's head anchored in S3, outside the audit table's trust domain.

The anchor function (``functions/anchor``) reads the head (one ``GetItem``; its role may write
nothing in the audit table) and writes it to a bucket with Object Lock in compliance mode, which
only it may write: a principal that rewrites the whole chain and its head cannot rewrite what was
anchored. ``ringfence audit verify --anchor s3://BUCKET/PREFIX`` reads every anchor back
(:func:`read_anchors`) and requires the chain to still hold each one (:func:`ringfence.audit.verify`).

Keys are ``<prefix><seq, 12 digits>-<hash>.json``: S3 lists them in chain order, and writing the same
head again only adds a version of the same content.
"""

from __future__ import annotations

import json
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any, Protocol

from pydantic import ValidationError

from ringfence.audit import AuditHead

PREFIX = "anchors/"


class AnchorError(Exception):
    """An anchor could not be read (not an anchor, or none where one was expected)."""


class HeadSource(Protocol):
    def audit_head(self) -> AuditHead | None: ...


def anchor_key(head: AuditHead, prefix: str = PREFIX) -> str:
    return f"{prefix}{head.seq:012d}-{head.hash}.json"


@dataclass(slots=True)
class Anchored:
    head: AuditHead | None  # None: the chain is empty
    key: str | None  # the object written, None when nothing was


class Anchorer:
    """One container's anchoring: the head as read, written when it moved since this container
    last wrote it (a new container writes once more: the same key, another locked version of the
    same head, which costs one PutObject and needs no read access to the bucket)."""

    def __init__(
        self,
        store: HeadSource,
        s3: Any,
        bucket: str,
        prefix: str = PREFIX,
        clock: Callable[[], float] = time.time,
    ) -> None:
        self.store, self.s3, self.bucket, self.prefix, self.clock = store, s3, bucket, prefix, clock
        self.last: AuditHead | None = None

    def run(self) -> Anchored:
        head = self.store.audit_head()
        if head is None or head == self.last:
            return Anchored(head, None)
        key = anchor_key(head, self.prefix)
        body = json.dumps({"seq": head.seq, "hash": head.hash, "time": self.clock()}, sort_keys=True)
        # the bucket's default retention locks the object; a put to a bucket with Object Lock must
        # carry a checksum (Content-MD5 or a flexible checksum), hence the explicit algorithm
        self.s3.put_object(
            Bucket=self.bucket, Key=key, Body=body.encode(), ContentType="application/json", ChecksumAlgorithm="SHA256"
        )
        self.last = head
        return Anchored(head, key)


def parse_s3_url(url: str) -> tuple[str, str]:
    """``s3://bucket/prefix`` → (bucket, prefix); no prefix: :data:`PREFIX`."""
    rest = url.removeprefix("s3://")
    bucket, _, prefix = rest.partition("/")
    if not bucket:
        raise AnchorError(f"{url!r}: expected s3://BUCKET[/PREFIX]")
    return bucket, prefix or PREFIX


def read_anchors(s3: Any, bucket: str, prefix: str = PREFIX, workers: int = 16) -> list[AuditHead]:
    """Every version of every object under ``prefix``, each an anchored head. Versions, not just
    the current objects: a later put to an anchor's key (or a delete marker) hides nothing, since
    the locked versions stay and each one counts. An empty listing is an error: a wrong bucket or
    prefix must not verify as "no anchor broken"."""
    versions: list[tuple[str, str]] = []
    for page in s3.get_paginator("list_object_versions").paginate(Bucket=bucket, Prefix=prefix):
        versions += [(v["Key"], v["VersionId"]) for v in page.get("Versions", [])]
    if not versions:
        raise AnchorError(f"no anchor under s3://{bucket}/{prefix}: a wrong bucket or prefix, or none written yet")

    def one(kv: tuple[str, str]) -> AuditHead:
        key, version = kv
        body = s3.get_object(Bucket=bucket, Key=key, VersionId=version)["Body"].read()
        try:
            doc = json.loads(body)
            # both named: AuditHead's defaults (seq 0, the genesis hash) are no anchor
            if not isinstance(doc, dict) or not {"seq", "hash"} <= doc.keys():
                raise ValueError("seq and hash are required")
            return AuditHead.model_validate(doc)
        except ValueError as exc:  # JSON and pydantic's errors alike
            reason = exc.errors()[0]["msg"] if isinstance(exc, ValidationError) else str(exc)
            raise AnchorError(f"s3://{bucket}/{key} (version {version}): not an anchored head ({reason})") from None

    # thousands of hourly anchors a year: fetched in parallel (boto3 clients are thread-safe)
    with ThreadPoolExecutor(max_workers=workers) as pool:
        return list(pool.map(one, versions))
