"""Signing keys held in Secrets Manager, SSM SecureString, or wrapped by KMS (moto server)."""

from __future__ import annotations

import base64

import boto3

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
