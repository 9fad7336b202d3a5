"""The agent's own key: Ed25519, generated on the host at first enrollment, its private half in
the state directory (``agent-key.pem``, PKCS#8 PEM, mode 0600) and nowhere else.

The control plane binds the public half to the workload at the first enrollment; afterwards the
agent gets fresh access tokens (and re-enrolls) by signing the server's single-use nonce
(:func:`ringfence.agentwire.proof_message`), or renews a token still valid by signing that token
and the time (:func:`ringfence.agentwire.token_proof_message`). A copied identity document or an old token is then
worth nothing without this file.

Signing uses the libcrypto the process already has mapped (as bundle verification does,
:class:`ringfence.bundlewire.LibcryptoEd25519`); ``cryptography`` only where there is none.
"""

from __future__ import annotations

import base64
import ctypes
import os
import re
from collections.abc import Callable
from pathlib import Path

from ringfence.agentwire import proof_message, token_proof_message
from ringfence.bundlewire import fingerprint_of_raw, key_id_of_raw, loaded_libcrypto
from ringfence_agent.state import read_regular

KEY_FILE = "agent-key.pem"
MAX_KEY_BYTES = 64 * 1024  # a PEM Ed25519 key is ~120 bytes
# DER of an Ed25519 PKCS#8 private key before its 32-byte seed, and of a SubjectPublicKeyInfo
# before the 32-byte public key (RFC 8410): fixed, so no ASN.1 library is needed
_PKCS8_PREFIX = bytes.fromhex("302e020100300506032b657004220420")
_SPKI_PREFIX = bytes.fromhex("302a300506032b6570032100")
_PEM_PRIVATE = re.compile(rb"-----BEGIN PRIVATE KEY-----([A-Za-z0-9+/=\s]*)-----END PRIVATE KEY-----")
_NID_ED25519 = 1087


def _pem(label: str, der: bytes) -> str:
    b64 = base64.b64encode(der).decode()
    lines = [b64[i : i + 64] for i in range(0, len(b64), 64)]
    return f"-----BEGIN {label}-----\n" + "\n".join(lines) + f"\n-----END {label}-----\n"


def _seed_from_pem(data: bytes) -> bytes:
    m = _PEM_PRIVATE.search(data)
    der = base64.b64decode(b"".join(m.group(1).split())) if m else b""
    if len(der) != len(_PKCS8_PREFIX) + 32 or not der.startswith(_PKCS8_PREFIX):
        raise ValueError("the agent key must be an Ed25519 private key (PKCS#8 PEM)")
    return der[len(_PKCS8_PREFIX) :]


class _LibcryptoSigner:
    def __init__(self, lib: ctypes.CDLL, seed: bytes) -> None:
        ptr, size = ctypes.c_void_p, ctypes.c_size_t
        for name, restype, argtypes in (
            ("EVP_PKEY_new_raw_private_key", ptr, [ctypes.c_int, ptr, ctypes.c_char_p, size]),
            ("EVP_PKEY_get_raw_public_key", ctypes.c_int, [ptr, ctypes.c_char_p, ctypes.POINTER(size)]),
            ("EVP_DigestSignInit", ctypes.c_int, [ptr, ptr, ptr, ptr, ptr]),
            ("EVP_DigestSign", ctypes.c_int, [ptr, ctypes.c_char_p, ctypes.POINTER(size), ctypes.c_char_p, size]),
        ):
            fn = getattr(lib, name)
            fn.restype, fn.argtypes = restype, argtypes
        self._lib = lib
        pkey = lib.EVP_PKEY_new_raw_private_key(_NID_ED25519, None, seed, len(seed))
        if not pkey:
            lib.ERR_clear_error()
            raise ValueError("libcrypto refused the Ed25519 private key")
        self._pkey = pkey
        buf, n = ctypes.create_string_buffer(32), ctypes.c_size_t(32)
        if lib.EVP_PKEY_get_raw_public_key(pkey, buf, ctypes.byref(n)) != 1 or n.value != 32:
            lib.ERR_clear_error()
            raise ValueError("libcrypto gave no Ed25519 public key")
        self.public = buf.raw

    def __del__(self) -> None:
        pkey = getattr(self, "_pkey", None)
        if pkey:
            self._lib.EVP_PKEY_free(pkey)

    def sign(self, message: bytes) -> bytes:
        lib = self._lib
        ctx = lib.EVP_MD_CTX_new()
        if not ctx:
            raise MemoryError("EVP_MD_CTX_new failed")
        try:
            sig, n = ctypes.create_string_buffer(64), ctypes.c_size_t(64)
            if (
                lib.EVP_DigestSignInit(ctx, None, None, None, self._pkey) != 1
                or lib.EVP_DigestSign(ctx, sig, ctypes.byref(n), message, len(message)) != 1
            ):
                lib.ERR_clear_error()
                raise ValueError("libcrypto could not sign with the agent key")
            return sig.raw[: n.value]
        finally:
            lib.EVP_MD_CTX_free(ctx)


def _signer(seed: bytes) -> tuple[bytes, Callable[[bytes], bytes]]:
    """(raw public key, sign) for an Ed25519 seed: libcrypto when mapped, else ``cryptography``."""
    lib = loaded_libcrypto()
    if lib is not None:
        try:
            s = _LibcryptoSigner(lib, seed)
            return s.public, s.sign
        except (ValueError, AttributeError):
            pass  # e.g. a FIPS-only provider without Ed25519, or an OpenSSL older than 1.1.1
    from cryptography.hazmat.primitives import serialization
    from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

    key = Ed25519PrivateKey.from_private_bytes(seed)
    raw = key.public_key().public_bytes(serialization.Encoding.Raw, serialization.PublicFormat.Raw)
    return raw, key.sign


class AgentKey:
    def __init__(self, seed: bytes) -> None:
        public, self._sign = _signer(seed)
        self.public_pem = _pem("PUBLIC KEY", _SPKI_PREFIX + public)
        # the id the control plane gives this key (audited with each enrollment), and its whole
        # fingerprint, what an operator's agent-key reset names (``next_agent_key``) so that only
        # this key binds next
        self.key_id = key_id_of_raw(public)
        self.fingerprint = fingerprint_of_raw(public)

    @classmethod
    def load(cls, state_dir: Path) -> AgentKey | None:
        """The key in ``state_dir``, None when there is none (never creates one)."""
        try:
            return cls(_seed_from_pem(read_regular(state_dir / KEY_FILE, MAX_KEY_BYTES)))
        except FileNotFoundError:
            return None

    @classmethod
    def load_or_create(cls, state_dir: Path) -> AgentKey:
        """The key in ``state_dir``; a new one (written 0600, never replaced) when there is none."""
        path = state_dir / KEY_FILE
        try:
            return cls(_seed_from_pem(read_regular(path, MAX_KEY_BYTES)))
        except FileNotFoundError:
            pass
        seed = os.urandom(32)
        state_dir.mkdir(parents=True, exist_ok=True, mode=0o700)
        # O_EXCL: created with mode 0600 from the start, and never over a key another process wrote
        try:
            fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, 0o600)
        except FileExistsError:
            return cls(_seed_from_pem(read_regular(path, MAX_KEY_BYTES)))
        with os.fdopen(fd, "wb") as f:
            f.write(_pem("PRIVATE KEY", _PKCS8_PREFIX + seed).encode())
            f.flush()
            os.fsync(f.fileno())
        return cls(seed)

    def prove(self, purpose: str, workload_id: str, nonce: str) -> str:
        """base64 Ed25519 signature over the proof message for ``purpose`` (enroll, token)."""
        return base64.b64encode(self._sign(proof_message(purpose, workload_id, nonce))).decode()

    def prove_token(self, workload_id: str, token: str, at: int) -> str:
        """base64 Ed25519 signature renewing ``token`` (still valid) at time ``at``, no nonce needed."""
        return base64.b64encode(self._sign(token_proof_message(workload_id, token, at))).decode()
