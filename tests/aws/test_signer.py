"""Signing keys: a KMS key that signs (moto server; a stated test double for Ed25519), or the PEM held in
Secrets Manager, SSM SecureString, or wrapped by KMS (moto server)."""

from __future__ import annotations

import base64

import boto3
import pytest
from cryptography.hazmat.primitives import serialization

from ringfence import bundle
from ringfence.clouds.aws.signer import from_reference
from tests.aws.conftest import Env


def _check(signer: object, key: bundle.SigningKey) -> None:
    doc = bundle.sign(bundle.SetDelta(set="rf_x", from_version=1, to_version=2, add=["10.0.0.1/32"]), signer)  # type: ignore[arg-type]
    bundle.Verifier.from_pem(key.public_pem()).verify(doc)


def test_secrets_manager_ssm_and_kms_wrapped(env: Env) -> None:
    key = bundle.SigningKey.generate()
    boto3.client("secretsmanager").create_secret(Name="k2", SecretString=key.private_pem().decode())
    boto3.client("ssm").put_parameter(Name="/rf/key", Value=key.private_pem().decode(), Type="SecureString")
    kms = boto3.client("kms")
    kid = kms.create_key(Description="ringfence signing key wrapper")["KeyMetadata"]["KeyId"]
    blob = base64.b64encode(kms.encrypt(KeyId=kid, Plaintext=key.private_pem())["CiphertextBlob"]).decode()
    for ref in ("secretsmanager:k2", "ssm:/rf/key", f"kms:{blob}"):
        signer = from_reference(ref, lambda n: boto3.client(n))
        assert signer.key_id == key.key_id
        _check(signer, key)


def test_kms_signer_signs_manifests_with_a_non_exportable_key_in_moto(env: Env) -> None:
    """The KMS path end to end on moto server. moto has no Edwards keys, so the key here is
    ECDSA P-256: the same KmsSigner, its algorithm chosen from the key's spec."""
    from cryptography.hazmat.primitives import hashes
    from cryptography.hazmat.primitives.asymmetric import ec

    from ringfence.clouds.aws.signer import KmsSigner

    kms = boto3.client("kms")
    arn = kms.create_key(KeySpec="ECC_NIST_P256", KeyUsage="SIGN_VERIFY")["KeyMetadata"]["Arn"]
    signer = from_reference(f"kms-sign:{arn}", lambda n: boto3.client(n))
    assert isinstance(signer, KmsSigner) and signer.algorithm == "ECDSA_SHA_256"
    doc = bundle.Bundle(workload_id="i-0abc", version=3, policy_version=1, mode="enforce", expires_at=2_000_000_000)
    message = bundle.manifest(doc, signer.key_id)
    assert len(message) <= 4096
    sig = signer.sign(message)
    public = serialization.load_pem_public_key(signer.public_pem())
    assert isinstance(public, ec.EllipticCurvePublicKey)
    public.verify(sig, message, ec.ECDSA(hashes.SHA256()))  # raises if KMS did not sign exactly this
    verdict = kms.verify(KeyId=arn, Message=message, MessageType="RAW", Signature=sig, SigningAlgorithm="ECDSA_SHA_256")
    assert verdict["SignatureValid"]
    # agents verify Ed25519 only: an ECDSA key cannot sign bundles for them
    with pytest.raises(bundle.BundleError, match="ed25519 signatures only"):
        bundle.sign(doc, signer)
    # KMS signs at most 4096 bytes (RAW); botocore does not check, so the signer does
    with pytest.raises(bundle.BundleError, match="1 to 4096 bytes"):
        signer.sign(b"x" * 4097)


def test_kms_ed25519_signer_request_shape() -> None:
    """TEST DOUBLE, stated as such: moto lacks ECC_NIST_EDWARDS25519, so botocore's Stubber stands
    in for KMS's GetPublicKey and Sign on a real client (which still validates every parameter
    against the KMS service model). It checks the request exactly — KeySpec-derived algorithm
    ED25519_SHA_512, MessageType RAW, the ≤4096-byte manifest as the message — and answers with a
    real Ed25519 signature by a local key, which the agent's verifier must accept."""
    from botocore.stub import Stubber

    from ringfence import bundlewire as wire
    from ringfence.clouds.aws.signer import KmsSigner

    local = bundle.SigningKey.generate()  # plays the key inside KMS
    der = local._private.public_key().public_bytes(
        serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo
    )
    arn = "arn:aws:kms:ca-central-1:123456789012:key/1234abcd-12ab-34cd-56ef-1234567890ab"
    kms = boto3.client("kms", region_name="ca-central-1", aws_access_key_id="x", aws_secret_access_key="x")
    doc = bundle.Bundle(workload_id="i-0abc", version=7, policy_version=2, mode="enforce", expires_at=2_000_000_000)
    message = bundle.manifest(doc, local.key_id)
    with Stubber(kms) as stub:
        stub.add_response(
            "get_public_key",
            {
                "KeyId": arn,
                "PublicKey": der,
                "KeySpec": "ECC_NIST_EDWARDS25519",
                "KeyUsage": "SIGN_VERIFY",
                "SigningAlgorithms": ["ED25519_SHA_512", "ED25519_PH_SHA_512"],
            },
            {"KeyId": arn},
        )
        stub.add_response(
            "sign",
            {"KeyId": arn, "Signature": local.sign(message), "SigningAlgorithm": "ED25519_SHA_512"},
            {"KeyId": arn, "Message": message, "MessageType": "RAW", "SigningAlgorithm": "ED25519_SHA_512"},
        )
        signer = from_reference(f"kms-sign:{arn}", lambda n: kms)
        assert isinstance(signer, KmsSigner) and signer.key_id == local.key_id
        assert signer.public_pem() == local.public_pem()  # what agents pin
        signed = bundle.sign(doc, signer)
        stub.assert_no_pending_responses()
    assert len(message) <= 4096
    # the real agent's verifier (bundlewire, libcrypto) accepts what the KMS key signed
    wire.Verifier.from_pem(signer.public_pem()).verify(wire.load_bundle(bundle.dumps(signed)))
