"""The agent's own key (``ringfence_agent.agentkey``): created once, 0600, standard PKCS#8, and
signed the same by libcrypto and by ``cryptography`` (Ed25519 is deterministic), so the control
plane's verification (``ringfence.control.credentials.verify_proof``) accepts either."""

from __future__ import annotations

import base64
import stat
from pathlib import Path

import pytest
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from ringfence.agentwire import proof_message
from ringfence.control.credentials import verify_proof
from ringfence.control.enroll import ProofError
from ringfence_agent import agentkey


def test_created_once_0600_and_readable_by_openssl_tools(tmp_path: Path) -> None:
    key = agentkey.AgentKey.load_or_create(tmp_path / "st")
    path = tmp_path / "st" / agentkey.KEY_FILE
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    again = agentkey.AgentKey.load_or_create(tmp_path / "st")
    assert again.public_pem == key.public_pem, "loaded, not replaced"
    private = serialization.load_pem_private_key(path.read_bytes(), password=None)
    assert isinstance(private, Ed25519PrivateKey)
    pub = private.public_key().public_bytes(serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo)
    assert pub.decode() == key.public_pem


def test_libcrypto_and_cryptography_sign_alike_and_the_server_verifies(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    assert agentkey.loaded_libcrypto() is not None, "this test is about the libcrypto path"
    key = agentkey.AgentKey.load_or_create(tmp_path)
    sig = key.prove("token", "w1", "n1")
    verify_proof(key.public_pem, sig, "token", "w1", "n1")
    with pytest.raises(ProofError):
        verify_proof(key.public_pem, sig, "token", "w2", "n1")  # bound to the workload
    with pytest.raises(ProofError):
        verify_proof(key.public_pem, sig, "enroll", "w1", "n1")  # and to the purpose
    monkeypatch.setattr(agentkey, "loaded_libcrypto", lambda: None)
    fallback = agentkey.AgentKey.load_or_create(tmp_path)
    assert fallback.public_pem == key.public_pem
    assert fallback.prove("token", "w1", "n1") == sig
    private = serialization.load_pem_private_key((tmp_path / agentkey.KEY_FILE).read_bytes(), password=None)
    assert isinstance(private, Ed25519PrivateKey)
    assert base64.b64decode(sig) == private.sign(proof_message("token", "w1", "n1"))


def test_a_key_file_that_is_not_ed25519_is_refused(tmp_path: Path) -> None:
    (tmp_path / agentkey.KEY_FILE).write_text("-----BEGIN PRIVATE KEY-----\nAAAA\n-----END PRIVATE KEY-----\n")
    with pytest.raises(ValueError, match="Ed25519"):
        agentkey.AgentKey.load_or_create(tmp_path)
