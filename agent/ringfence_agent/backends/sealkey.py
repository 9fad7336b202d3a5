"""The per-host key of the backends' seals (nftables' ``seal_<mac>`` chain, iptables'
``RF-S-<mac>`` chain): one ``seal.key`` in the agent's state directory, read and made here only,
so both backends keep it the same way. Each backend MACs under its own context string.

A seal is bound to the whole apply that wrote it: the MAC also covers a random nonce drawn for
that apply and recorded in ``seal.last`` beside the key, and only the recorded one is accepted.
A MAC of the content alone stayed valid for every table the agent ever sealed (the key never
changes): a process with CAP_NET_ADMIN and no access to the state directory saved the table,
waited for a tightening (a port closed, the admin range narrowed) and put the saved one back,
its seal with it."""

from __future__ import annotations

import contextlib
import hashlib
import hmac
import os
from pathlib import Path

from ringfence_agent.state import atomic_create, atomic_write, read_regular

SEAL_KEY_FILE = "seal.key"
SEAL_RECORD_FILE = "seal.last"  # the nonce of the last whole apply's seal (hex)


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
        self.record_path = state_dir / SEAL_RECORD_FILE if state_dir is not None else None
        # the nonce of this process's last seal when seal.last could not take it (checked first:
        # the file may still name an earlier apply's)
        self._nonce: str | None = None

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
        line = key.hex() + "\n"
        if atomic_create(path, line, mode=0o600):
            return key
        try:
            return _parse_key(read_regular(path, 256))  # another process made it first: its key
        except (OSError, ValueError):
            atomic_write(path, line, mode=0o600)  # none usable there (appliers hold the state lock): replaced
            return key

    def recorded(self) -> str | None:
        """The nonce of the last whole apply's seal: this process's own when ``seal.last`` could
        not take it, else the file's; None when there is none or it cannot be read."""
        if self._nonce is not None or self.record_path is None:
            return self._nonce
        try:
            return _parse_nonce(read_regular(self.record_path, 256))
        except (OSError, ValueError):
            return None

    def seal(self, held: str, key: bytes, nonce: str | None = None) -> str:
        """The MAC of ``held`` for the apply of ``nonce`` (by default the one recorded last)."""
        bound = (self.recorded() if nonce is None else nonce) or ""
        return hmac.new(key, self.context + bound.encode() + b"\n" + held.encode(), hashlib.sha256).hexdigest()[
            : self.length
        ]

    def new_seal(self, held: str) -> str | None:
        """The seal of a whole apply that left ``held`` in the kernel: a fresh nonce, recorded
        before the caller writes the seal (a seal in the kernel whose nonce is not on record
        would be taken for an earlier apply's, never the other way round); None without a key."""
        key = self.get(create=True)
        if key is None:
            return None
        nonce = os.urandom(16).hex()
        self._record(nonce)
        return self.seal(held, key, nonce)

    def forget(self) -> None:
        """A whole apply whose seal could not be made (the kernel could not be read back): a
        nonce no seal carries goes on record, so the previous apply's seal, which the new rules
        replaced, is not accepted if that table is put back."""
        self._record(os.urandom(16).hex())

    def _record(self, nonce: str) -> None:
        self._nonce = None
        if self.record_path is not None:
            try:
                atomic_write(self.record_path, nonce + "\n", mode=0o600)
                return
            except OSError:
                # a full disk still lets the old record go: no other process then accepts any seal
                # (it re-applies); a read-only one keeps it, naming the previous apply's seal
                with contextlib.suppress(OSError):
                    self.record_path.unlink()
        self._nonce = nonce

    def missing(self) -> str | None:
        """What a seal cannot be checked without, in words (``status`` shows it); None when the
        key and the record of the last seal are both there."""
        if self.get() is None:
            where = self.path or "no state directory"
            return f"the agent's seal key ({where}) is missing or unreadable: its seal cannot be checked"
        if self.recorded() is None:
            where = self.record_path or "no state directory"
            return (
                f"the record of the agent's last seal ({where}) is missing or unreadable: "
                "its seal cannot be told from an earlier apply's"
            )
        return None

    def sealed(self, held: str, seal: str | None) -> bool:
        """Whether ``seal`` is this host's seal of ``held`` written by the last whole apply
        (False without a key or a record of that apply)."""
        key, nonce = self.get(), self.recorded()
        return (
            seal is not None
            and key is not None
            and nonce is not None
            and hmac.compare_digest(self.seal(held, key, nonce), seal)
        )


def _parse_key(raw: bytes) -> bytes:
    key = bytes.fromhex(raw.decode("ascii").strip())
    if len(key) != 32:
        raise ValueError("the seal key is not 32 bytes")
    return key


def _parse_nonce(raw: bytes) -> str:
    nonce = raw.decode("ascii").strip()
    if len(bytes.fromhex(nonce)) != 16:
        raise ValueError("the seal record is not a 16-byte nonce")
    return nonce
