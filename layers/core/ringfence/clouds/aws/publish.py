"""Publishing to agents: signed bundles and set deltas (content-addressed; in S3 here), nudges."""

from __future__ import annotations

import hashlib
import json
import logging
import threading
from typing import Any, Protocol

from botocore.exceptions import ClientError

from ringfence import bundle

log = logging.getLogger(__name__)

# the public key(s) of the bundle signing key, PEM, written by compute (the only signer) so that
# the agent API can name the key at enrollment without holding it
PUBLIC_KEYS_KEY = "keys/bundle-signing.pub.pem"


class Publisher:
    """Immutable, content-addressed documents for agents: ``bundles/<wid>/<version>-<sha>.json``
    and ``deltas/<set>/<from>-<to>-<sha>.json``, plus reports and policy files under keys the
    caller names. Subclasses store the bytes (S3 here, files in :mod:`ringfence.local.publish`)."""

    def __init__(self) -> None:
        self.bytes_published = 0
        self.objects_published = 0
        self._count = threading.Lock()  # compute uploads from several threads

    def _store(self, key: str, body: bytes, content_type: str) -> None:
        raise NotImplementedError

    def get(self, key: str) -> bytes:
        raise NotImplementedError

    def _put(self, key: str, body: bytes, content_type: str = "application/json") -> None:
        self._store(key, body, content_type)
        with self._count:
            self.bytes_published += len(body)
            self.objects_published += 1

    def put_bundle(self, doc: bundle.Bundle) -> tuple[str, str]:
        body = bundle.dumps(doc).encode()
        sha = hashlib.sha256(body).hexdigest()
        key = f"bundles/{doc.workload_id}/{doc.version:012d}-{sha[:16]}.json"
        self._put(key, body)
        return key, sha

    def put_delta(self, doc: bundle.SetDelta) -> str:
        body = bundle.dumps(doc).encode()
        sha = hashlib.sha256(body).hexdigest()
        key = f"deltas/{doc.set}/{doc.from_version:012d}-{doc.to_version:012d}-{sha[:16]}.json"
        self._put(key, body)
        return key

    def put_json(self, key: str, doc: Any) -> None:
        self._put(key, json.dumps(doc, sort_keys=True).encode())

    def put_text(self, key: str, text: str) -> None:
        """A text object under a caller-chosen key (policy files: ``policies/v<N>/<name>``)."""
        self._put(key, text.encode(), "text/plain; charset=utf-8")

    def put_bytes(self, key: str, body: bytes, content_type: str = "application/octet-stream") -> None:
        """Bytes under a caller-chosen key, stored as they are (the agent wheel: ``agent/<name>``)."""
        self._put(key, body, content_type)


class S3Publisher(Publisher):
    """The bucket is versioned and encrypted; objects are written with SSE (KMS when a key is
    configured)."""

    def __init__(self, s3: Any, bucket: str, kms_key_id: str | None = None) -> None:
        super().__init__()
        self.s3 = s3
        self.bucket = bucket
        self.kms_key_id = kms_key_id

    def _store(self, key: str, body: bytes, content_type: str) -> None:
        extra: dict[str, Any] = {"ServerSideEncryption": "AES256"}
        if self.kms_key_id:
            extra = {"ServerSideEncryption": "aws:kms", "SSEKMSKeyId": self.kms_key_id}
        self.s3.put_object(Bucket=self.bucket, Key=key, Body=body, ContentType=content_type, **extra)

    def get(self, key: str) -> bytes:
        return bytes(self.s3.get_object(Bucket=self.bucket, Key=key)["Body"].read())


class Notifier(Protocol):
    """What compute tells when a workload's latest version moved (after the store says so)."""

    def nudge(self, workload_id: str, version: int) -> None: ...


class WebSocketNotifier:
    """Nudges connected agents over the API Gateway WebSocket API; agents without a live
    connection learn of the change on their next poll/heartbeat."""

    def __init__(self, client: Any | None, store: Any) -> None:
        self.client = client
        self.store = store
        self.sent = 0

    def nudge(self, workload_id: str, version: int) -> None:
        if self.client is None:
            return
        conn = self.store.connection(workload_id)
        if conn is None:
            return
        try:
            self.client.post_to_connection(ConnectionId=conn, Data=json.dumps({"latest_version": version}).encode())
            self.sent += 1
        except ClientError as exc:
            if exc.response.get("Error", {}).get("Code") in ("GoneException", "410"):
                self.store.drop_connection(workload_id)
            else:
                log.warning("nudge to %s failed: %s", workload_id, exc)
