"""Bundle signing keys held by AWS services.

AWS KMS asymmetric keys do not offer Ed25519 (the bundle format's algorithm; see
docs/bundle.md), so KMS cannot sign bundles itself. The default keeps the Ed25519 private key
(PKCS#8 PEM) in a Secrets Manager secret; an SSM SecureString parameter works the same. With
:class:`KmsWrappedSigner` the PEM is stored as a KMS ciphertext and decrypted with
``kms:Decrypt`` at cold start, so the key material is only usable by roles the KMS key policy
allows. In every case the key lives in the Lambda's memory while warm.
"""

from __future__ import annotations

import base64
from typing import Any

from ringfence.bundle import SigningKey


class _KeySigner:
    def __init__(self, key: SigningKey) -> None:
        self._key = key

    @property
    def key_id(self) -> str:
        return self._key.key_id

    def sign(self, message: bytes) -> bytes:
        return self._key.sign(message)

    def public_pem(self) -> bytes:
        return self._key.public_pem()


class SecretsManagerSigner(_KeySigner):
    """The default: ``SecretString`` is the PKCS#8 PEM of an Ed25519 key."""

    def __init__(self, secrets: Any, secret_id: str) -> None:
        pem = secrets.get_secret_value(SecretId=secret_id)["SecretString"]
        super().__init__(SigningKey.from_pem(pem.encode()))


class SsmSigner(_KeySigner):
    """An SSM SecureString parameter holding the PEM."""

    def __init__(self, ssm: Any, name: str) -> None:
        pem = ssm.get_parameter(Name=name, WithDecryption=True)["Parameter"]["Value"]
        super().__init__(SigningKey.from_pem(pem.encode()))


class KmsWrappedSigner(_KeySigner):
    """The PEM encrypted under a KMS key (base64 ciphertext), decrypted once at cold start."""

    def __init__(self, kms: Any, ciphertext_b64: str) -> None:
        pem = kms.decrypt(CiphertextBlob=base64.b64decode(ciphertext_b64))["Plaintext"]
        super().__init__(SigningKey.from_pem(pem))


def from_reference(ref: str, clients: Any) -> _KeySigner:
    """``secretsmanager:<id>``, ``ssm:<name>`` or ``kms:<base64 ciphertext>``; ``clients(name)`` gives a client."""
    kind, _, rest = ref.partition(":")
    if kind == "secretsmanager":
        return SecretsManagerSigner(clients("secretsmanager"), rest)
    if kind == "ssm":
        return SsmSigner(clients("ssm"), rest)
    if kind == "kms":
        return KmsWrappedSigner(clients("kms"), rest)
    raise ValueError(f"signing key reference must start with secretsmanager:, ssm: or kms: (got {kind!r})")
