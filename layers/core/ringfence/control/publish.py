"""Publishing to agents: signed bundles and set deltas (content-addressed; where is the subclass's), nudges."""

from __future__ import annotations

import hashlib
import json
import logging
import threading
from typing import Any, Protocol

from ringfence import bundle

log = logging.getLogger(__name__)

# the public key(s) of the bundle signing key, PEM, written by compute (the only signer) so that
# the agent API can name the key at enrollment without holding it
PUBLIC_KEYS_KEY = "keys/bundle-signing.pub.pem"


class Conflict(Exception):
    """``put_once``: the key already holds other bytes (a name published once is never reused)."""


class TooLarge(Exception):
    """``get(key, max_bytes=N)``: the document at ``key`` is over ``N`` bytes (none of it returned)."""


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

    def get(self, key: str, max_bytes: int | None = None) -> bytes:
        """The document at ``key``; with ``max_bytes``, :class:`TooLarge` instead of any bigger one,
        of which no more than ``max_bytes + 1`` bytes are read."""
        raise NotImplementedError

    def get_many(self, keys: list[str]) -> dict[str, bytes]:
        """Several documents by key (a policy version's files); a subclass may read them at once."""
        return {k: self.get(k) for k in dict.fromkeys(keys)}

    def delete(self, key: str) -> None:
        """Remove a staged object (only ``staging/`` keys are ever deleted)."""
        raise NotImplementedError

    def _create(self, key: str, body: bytes, content_type: str) -> bool:
        """Store ``body`` only if nothing is at ``key`` (atomically); False when something was."""
        raise NotImplementedError

    def put_once(self, key: str, body: bytes, content_type: str = "application/octet-stream") -> None:
        """Bytes under a name that never changes once published (the agent artifact): the same
        bytes again are a no-op, other bytes raise :class:`Conflict` and leave the first ones."""
        if not self._create(key, body, content_type):
            # read no more than ``body`` could match: whoever may write there (serve --user's user,
            # under root's publish-agent) could have planted a file of any size at the name
            try:
                same = self.get(key, max_bytes=len(body)) == body
            except TooLarge:
                same = False
            if not same:
                raise Conflict(f"{key} is already published with other bytes: a published name is never reused")
            return
        with self._count:
            self.bytes_published += len(body)
            self.objects_published += 1

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


class Notifier(Protocol):
    """What compute tells when a workload's latest version moved (after the store says so)."""

    def nudge(self, workload_id: str, version: int) -> None: ...


class NoNotifier:
    """No push channel: agents learn of changes on their next poll or heartbeat."""

    def nudge(self, workload_id: str, version: int) -> None:
        return None
