"""The agent's own key: Ed25519, generated on the host at first enrollment, its private half in
the state directory (``agent-key.pem``, PKCS#8, mode 0600) and nowhere else.

The control plane binds the public half to the workload at the first enrollment; afterwards the
agent gets fresh access tokens (and re-enrolls) by signing the server's single-use nonce
(:func:`ringfence.agentwire.proof_message`). A copied identity document or an old token is then
worth nothing without this file.

``cryptography`` is imported only here and only when the agent signs (enrollment, token renewal):
the daemon's steady state does not carry it.
"""

from __future__ import annotations

import base64
import os
from pathlib import Path

from ringfence.agentwire import proof_message

KEY_FILE = "agent-key.pem"


class AgentKey:
    def __init__(self, private_pem: bytes) -> None:
        from cryptography.hazmat.primitives import serialization
        from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

        key = serialization.load_pem_private_key(private_pem, password=None)
        if not isinstance(key, Ed25519PrivateKey):
            raise ValueError("the agent key must be an Ed25519 private key")
        self._key = key
        self.public_pem = (
            key.public_key()
            .public_bytes(serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo)
            .decode()
        )

    @classmethod
    def load_or_create(cls, state_dir: Path) -> AgentKey:
        """The key in ``state_dir``; a new one (written 0600, never replaced) when there is none."""
        path = state_dir / KEY_FILE
        try:
            return cls(path.read_bytes())
        except FileNotFoundError:
            pass
        from cryptography.hazmat.primitives import serialization
        from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

        pem = Ed25519PrivateKey.generate().private_bytes(
            serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
        )
        state_dir.mkdir(parents=True, exist_ok=True, mode=0o700)
        # O_EXCL: created with mode 0600 from the start, and never over a key another process wrote
        try:
            fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        except FileExistsError:
            return cls(path.read_bytes())
        with os.fdopen(fd, "wb") as f:
            f.write(pem)
            f.flush()
            os.fsync(f.fileno())
        return cls(pem)

    def prove(self, purpose: str, workload_id: str, nonce: str) -> str:
        """base64 Ed25519 signature over the proof message for ``purpose`` (enroll, token)."""
        return base64.b64encode(self._key.sign(proof_message(purpose, workload_id, nonce))).decode()
