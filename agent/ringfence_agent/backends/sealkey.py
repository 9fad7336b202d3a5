"""The per-host key of the backends' seals (nftables' ``seal_<mac>`` chain, iptables'
``RF-S-<mac>`` chain): one ``seal.key`` in the agent's state directory, read and made here only,
so both backends keep it the same way. Each backend MACs under its own context string."""

from __future__ import annotations

import contextlib
import hashlib
import hmac
import os
import tempfile
from pathlib import Path

from ringfence_agent.state import read_regular

SEAL_KEY_FILE = "seal.key"


class SealKey:
    """The per-host secret the seal is keyed with: 32 random bytes (hex) in ``seal.key`` in the
    state directory, mode 0600, made by the first apply that needs it (written whole under a
    temporary name, then linked: never seen half-written, never over one another process made).

    Reading never creates it: no key, or one that cannot be read, seals nothing (the table reads
    as altered: ``status`` says so, ``apply`` programs it again). When the file cannot be written
    (a read-only state directory) or holds no key, the apply seals with a key kept in this
    process's memory only: its own checks still tell intact from altered, any other process
    (``status``, a restarted daemon) sees altered and re-applies, never open. Without a state
    directory (the backend used as a library) the key is always that in-memory one."""

    def __init__(self, state_dir: Path | None, context: bytes, length: int = 64) -> None:
        self.path = state_dir / SEAL_KEY_FILE if state_dir is not None else None
        self.context = context  # what the MAC is of: one backend's seal is never another's
        self.length = length  # hex digits of the MAC kept (iptables: a chain name holds 28 characters)
        self._memory: bytes | None = None  # the key of this process's seals when the file has none

    def get(self, create: bool = False) -> bytes | None:
        """The key (None: none to check a seal with); ``create``: for a seal, always one."""
        if self.path is not None:
            try:
                return _parse_key(read_regular(self.path, 256))
            except (OSError, ValueError):
                if create:
                    with contextlib.suppress(OSError, ValueError):
                        return self._create(self.path)
        if create and self._memory is None:
            self._memory = os.urandom(32)
        return self._memory

    @staticmethod
    def _create(path: Path) -> bytes:
        path.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
        key = os.urandom(32)
        fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", dir=path.parent)  # mode 0600
        try:
            with os.fdopen(fd, "wb") as f:
                f.write(key.hex().encode() + b"\n")
                f.flush()
                os.fsync(f.fileno())
            try:
                os.link(tmp, path)
            except FileExistsError:
                try:
                    return _parse_key(read_regular(path, 256))  # another process made it first: its key
                except (OSError, ValueError):
                    os.replace(tmp, path)  # none usable there (appliers hold the state lock): replaced
        finally:
            with contextlib.suppress(FileNotFoundError):
                os.unlink(tmp)
        dfd = os.open(path.parent, os.O_RDONLY)
        try:
            os.fsync(dfd)
        finally:
            os.close(dfd)
        return key

    def seal(self, held: str, key: bytes) -> str:
        return hmac.new(key, self.context + held.encode(), hashlib.sha256).hexdigest()[: self.length]

    def sealed(self, held: str, seal: str | None) -> bool:
        """Whether ``seal`` is this host's seal of ``held`` (False without a key)."""
        key = self.get()
        return seal is not None and key is not None and hmac.compare_digest(self.seal(held, key), seal)


def _parse_key(raw: bytes) -> bytes:
    key = bytes.fromhex(raw.decode("ascii").strip())
    if len(key) != 32:
        raise ValueError("the seal key is not 32 bytes")
    return key
