"""Bundle signing keys held by AWS services. Only the compute function is configured with one.

The default (:class:`KmsSigner`, reference ``kms-sign:<key ARN>``) never holds the key: a
non-exportable KMS key of spec ``ECC_NIST_EDWARDS25519`` signs each document's manifest
(``ED25519_SHA_512``, ``MessageType=RAW``; KMS signs at most 4096 bytes, which is why signatures
cover a small manifest holding the document's SHA-256 — docs/bundle.md), and its key policy lets
only the compute role call ``kms:Sign``. The algorithm follows the key's spec, so an ECDSA P-256
key works the same way (moto, which has no Edwards keys, tests the KMS path with one); agents
verify Ed25519 only, so only an Ed25519 key can sign bundles.

Otherwise the Ed25519 private key (PKCS#8 PEM) sits in a Secrets Manager secret whose resource
policy denies everyone but the compute role; an SSM SecureString works the same. With
:class:`KmsWrappedSigner` the PEM is a KMS ciphertext decrypted with ``kms:Decrypt`` at cold start.
In those three cases the key lives in the compute function's memory while warm.
"""

from __future__ import annotations

import base64
import hashlib
from typing import Any

from cryptography.hazmat.primitives import serialization

from ringfence import bundlewire as wire
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


# KMS key spec → (SigningAlgorithm, the algorithm's name in signatures)
KMS_ALGORITHMS: dict[str, tuple[str, str]] = {
    "ECC_NIST_EDWARDS25519": ("ED25519_SHA_512", "ed25519"),
    "ECC_NIST_P256": ("ECDSA_SHA_256", "ecdsa-p256-sha256"),
}


class KmsSigner:
    """A non-exportable KMS key signs (``kms:Sign``, ``MessageType=RAW``): the private key never
    leaves KMS. The signing algorithm follows the key's spec (:data:`KMS_ALGORITHMS`)."""

    def __init__(self, kms: Any, key: str) -> None:
        self._kms = kms
        self._key = key
        pub = kms.get_public_key(KeyId=key)
        spec = pub.get("KeySpec") or pub.get("CustomerMasterKeySpec")  # moto gives only the latter
        if spec not in KMS_ALGORITHMS:
            raise ValueError(f"KMS key {key} has spec {spec}: bundle signing needs {' or '.join(KMS_ALGORITHMS)}")
        self.algorithm, self.alg = KMS_ALGORITHMS[spec]
        der = bytes(pub["PublicKey"])
        if self.alg == "ed25519":
            raw = wire.ed25519_raw_from_spki_der(der)
            self._key_id = wire.key_id_of_raw(raw)  # the id agents compute from the pinned PEM
            self._pem = wire.ed25519_pem_of_raw(raw)
        else:
            self._key_id = hashlib.sha256(der).hexdigest()[:16]
            self._pem = serialization.load_der_public_key(der).public_bytes(
                serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo
            )

    @property
    def key_id(self) -> str:
        return self._key_id

    def sign(self, message: bytes) -> bytes:
        if not 0 < len(message) <= wire.MAX_MANIFEST_BYTES:  # KMS's limit for RAW (botocore does not check it)
            raise wire.BundleError(f"KMS signs 1 to {wire.MAX_MANIFEST_BYTES} bytes, not {len(message)}")
        out = self._kms.sign(KeyId=self._key, Message=message, MessageType="RAW", SigningAlgorithm=self.algorithm)
        return bytes(out["Signature"])

    def public_pem(self) -> bytes:
        return self._pem


def from_reference(ref: str, clients: Any) -> _KeySigner | KmsSigner:
    """``kms-sign:<key id or ARN>`` (the key signs), ``secretsmanager:<id>``, ``ssm:<name>`` or
    ``kms:<base64 ciphertext>`` (a wrapped PEM); ``clients(name)`` gives a client."""
    kind, _, rest = ref.partition(":")
    if kind == "kms-sign":
        return KmsSigner(clients("kms"), rest)
    if kind == "secretsmanager":
        return SecretsManagerSigner(clients("secretsmanager"), rest)
    if kind == "ssm":
        return SsmSigner(clients("ssm"), rest)
    if kind == "kms":
        return KmsWrappedSigner(clients("kms"), rest)
    raise ValueError(f"signing key reference must start with kms-sign:, secretsmanager:, ssm: or kms: (got {kind!r})")
