"""Publishing to agents in AWS: the S3 bucket, nudges over the API Gateway WebSocket API."""

from __future__ import annotations

import json
import logging
from typing import Any

from botocore.exceptions import ClientError

from ringfence.control.fanout import in_parallel
from ringfence.control.publish import Publisher, TooLarge

log = logging.getLogger(__name__)


class S3Publisher(Publisher):
    """The bucket is versioned and encrypted; objects are written with SSE (KMS when a key is
    configured)."""

    def __init__(self, s3: Any, bucket: str, kms_key_id: str | None = None) -> None:
        super().__init__()
        self.s3 = s3
        self.bucket = bucket
        self.kms_key_id = kms_key_id

    def _store(self, key: str, body: bytes, content_type: str, **conditions: Any) -> None:
        extra: dict[str, Any] = {"ServerSideEncryption": "AES256"}
        if self.kms_key_id:
            extra = {"ServerSideEncryption": "aws:kms", "SSEKMSKeyId": self.kms_key_id}
        self.s3.put_object(Bucket=self.bucket, Key=key, Body=body, ContentType=content_type, **extra, **conditions)

    def _create(self, key: str, body: bytes, content_type: str) -> bool:
        # S3 conditional write: refused (412) when the key exists, so two publishers cannot race
        try:
            self._store(key, body, content_type, IfNoneMatch="*")
        except ClientError as exc:
            if exc.response.get("Error", {}).get("Code") in ("PreconditionFailed", "ConditionalRequestConflict"):
                return False
            raise
        return True

    def get(self, key: str, max_bytes: int | None = None) -> bytes:
        got = self.s3.get_object(Bucket=self.bucket, Key=key)
        if max_bytes is None:
            return bytes(got["Body"].read())
        try:
            if int(got.get("ContentLength", 0)) > max_bytes:
                raise TooLarge(f"{key}: {got['ContentLength']} bytes, over {max_bytes}")
            data = bytes(got["Body"].read(max_bytes + 1))
        finally:
            got["Body"].close()
        if len(data) > max_bytes:
            raise TooLarge(f"{key}: over {max_bytes} bytes")
        return data

    def get_many(self, keys: list[str]) -> dict[str, bytes]:
        """At once (S3 clients are thread-safe): a cold function read a policy's seven files one
        round trip after another before its first batch."""
        unique = list(dict.fromkeys(keys))
        return dict(zip(unique, in_parallel(self.get, unique), strict=True))

    def delete(self, key: str) -> None:
        self.s3.delete_object(Bucket=self.bucket, Key=key)


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
                # only this gone connection: the agent may have connected again meanwhile
                self.store.drop_connection(workload_id, conn)
            else:
                log.warning("nudge to %s failed: %s", workload_id, exc)
