"""`ringfence serve` over the moto-backed AWS wiring: the same routes over HTTP, admin tokens,
identity never taken from the client, many long-polls at once, TLS and the bind rule."""

from __future__ import annotations

import datetime as dt
import json
import os
import ssl
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest

from ringfence import serve
from ringfence.control import agents
from tests.aws.conftest import POLICY_DIR, Env
from tests.aws.test_pipeline import agent_key, boot, iid_document

ALICE_TOKEN = "alice-secret-token-0123456789"


@pytest.fixture
def tokens(tmp_path: Path) -> Path:
    p = tmp_path / "admin-tokens"
    p.write_text(
        f"# who may call the admin API\nalice:{serve.token_hash(ALICE_TOKEN)}:policy-author,incident-responder,onboarding\n"
    )
    return p


@pytest.fixture
def served(env: Env, tokens: Path, monkeypatch: pytest.MonkeyPatch, aws_wiring: Callable[[], Any]) -> Iterator[str]:
    monkeypatch.setenv("RINGFENCE_WAIT_POLL_INTERVAL", "0.5")
    app = serve.ServeApp.over(aws_wiring(), serve.AdminTokens.load(tokens))
    with serve.serving(app) as running:
        yield running.url


def admin_headers(token: str = ALICE_TOKEN) -> dict[str, str]:
    return {"Authorization": f"Bearer {token}"}


def policy_files() -> dict[str, str]:
    from tests.aws.conftest import LABEL_TESTS

    files = {p.name: p.read_text() for p in sorted(POLICY_DIR.glob("*.yaml")) if p.name != "tests.yaml"}
    files["tests.yaml"] = LABEL_TESTS
    return files


def test_admin_api_needs_a_token_and_audits_its_principal_never_a_client_supplied_one(env: Env, served: str) -> None:
    body = {"files": policy_files(), "reason": "first"}
    for headers in ({}, admin_headers("wrong"), {"Authorization": "Basic YWxpY2U6eA=="}):
        r = httpx.post(f"{served}/admin/policies", json=body, headers=headers)
        assert r.status_code == 401 and r.headers["www-authenticate"] == "Bearer", r.text
    assert env.store.active_policy() is None
    # whatever identity the client claims in headers, the audit names the token's principal
    spoof = {**admin_headers(), "X-Amzn-Caller": "arn:aws:iam::1:root", "userArn": "root", "X-Forwarded-For": "1.2.3.4"}
    r = httpx.post(f"{served}/admin/policies", json=body, headers=spoof)
    assert r.status_code == 201, r.text
    (rec,) = env.store.audit_log()
    assert (rec.action, rec.principal) == ("policy.provision", "alice")
    # a bad field is a 422 naming it, over HTTP as in Lambda
    r = httpx.post(f"{served}/admin/pairing-keys", json={"uses": 0}, headers=admin_headers())
    assert r.status_code == 422 and "body.uses" in r.json()["detail"]


def test_agent_api_over_http_enroll_bundle_and_concurrent_long_polls(
    env: Env, served: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    est = boot(env)
    procs = est["ids"]["proc"]
    tokens = {}
    for wid in procs:  # EC2 instances enroll with their signed identity document
        nonce = httpx.get(f"{served}/v1/nonce").json()["nonce"]
        doc = iid_document(env, wid)
        req = {
            "method": "aws-iid",
            "nonce": nonce,
            "document": doc,
            "document_signature": env.iid.sign(doc),
            "agent_key": agent_key(wid).pem,
            "agent_signature": agent_key(wid).prove("enroll", wid, nonce),
        }
        r = httpx.post(f"{served}/v1/enroll", json=req)
        assert r.status_code == 200, r.text
        tokens[wid] = r.json()["token"]
    # a token renewed over HTTP by the agent key's signature (the enrollment's is revoked)
    nonce = httpx.get(f"{served}/v1/nonce").json()["nonce"]
    body = {"nonce": nonce, "signature": agent_key(procs[0]).prove("token", procs[0], nonce)}
    r = httpx.post(f"{served}/v1/agents/{procs[0]}/token", json=body)
    assert r.status_code == 200 and r.json()["expires_in"] == 3600, r.text
    old, tokens[procs[0]] = tokens[procs[0]], r.json()["token"]
    assert (
        httpx.get(f"{served}/v1/agents/{procs[0]}/bundle", headers={"Authorization": f"Bearer {old}"}).status_code
        == 401
    )
    # a bad field of the enrollment is a 422 naming it
    r = httpx.post(f"{served}/v1/enroll", json={"method": "telepathy", "nonce": "n"})
    assert r.status_code == 422 and "body.method" in r.json()["detail"], r.text
    wid = procs[0]
    auth = {"Authorization": f"Bearer {tokens[wid]}"}
    r = httpx.get(f"{served}/v1/agents/{wid}/bundle", headers=auth)
    assert (
        r.status_code == 200
        and r.json()["workload_id"] == wid
        and r.headers["etag"].startswith(f'"{r.json()["version"]}-')
    )
    v = r.json()["version"]
    assert (
        httpx.get(f"{served}/v1/agents/{wid}/bundle", headers={**auth, "If-None-Match": r.headers["etag"]}).status_code
        == 304
    )
    r = httpx.get(f"{served}/v1/agents/{procs[1]}/bundle", headers=auth)
    assert r.status_code == 403
    r = httpx.post(f"{served}/v1/agents/{wid}/heartbeat", json={"applied_version": "x", "mode": None}, headers=auth)
    assert r.status_code == 422 and "body.applied_version" in r.json()["detail"]
    assert httpx.post(f"{served}/v1/agents/{wid}/reports", content=b"x" * (2 << 20), headers=auth).status_code == 413

    # many agents long-poll at once (more than a default thread pool's 40); one change answers them
    results: list[tuple[int, float]] = []
    errors: list[str] = []

    def long_poll(w: str) -> None:
        r = httpx.get(
            f"{served}/v1/agents/{w}/wait",
            params={"version": str(v), "timeout": "20"},
            headers={"Authorization": f"Bearer {tokens[w]}"},
            timeout=30,
        )
        results.append((r.json().get("latest_version", r.status_code), time.monotonic()))
        if r.status_code != 200:
            errors.append(f"{w}: {r.status_code} {r.text}")

    # 60 waits by two tokens stand for 60 agents: lift the per-token limit (tests/local/test_serve_abuse.py)
    monkeypatch.setattr(serve, "WAITS_PER_TOKEN", 30)
    monkeypatch.setattr(agents, "WAITS_PER_WORKLOAD", 30)
    waiters = [threading.Thread(target=long_poll, args=(procs[i % 2],)) for i in range(60)]
    for t in waiters:
        t.start()
    time.sleep(1.5)
    assert results == [], f"nothing changed yet: every wait is still open {errors}"
    new = est["run"]("web", est["subnets"]["web"], 1)[0]
    env.put(env.state_event(new, "running"))
    env.pump()
    pumped = time.monotonic()
    for t in waiters:
        t.join(25)
    assert not errors, errors[:3]
    assert len(results) == 60 and all(latest > v for latest, _ in results)
    # answered by the change (the store is re-read every 0.5 s), not by their 20 s timeout
    assert max(done for _, done in results) - pumped < 5


def self_signed(tmp_path: Path) -> tuple[str, str]:
    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import NameOID

    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "localhost")])
    now = dt.datetime.now(dt.UTC)
    cert = (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(name)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - dt.timedelta(minutes=5))
        .not_valid_after(now + dt.timedelta(days=1))
        .add_extension(
            x509.SubjectAlternativeName([x509.IPAddress(__import__("ipaddress").ip_address("127.0.0.1"))]),
            critical=False,
        )
        .sign(key, hashes.SHA256())
    )
    cert_path, key_path = tmp_path / "cert.pem", tmp_path / "key.pem"
    cert_path.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    key_path.write_bytes(
        key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption())
    )
    return str(cert_path), str(key_path)


def test_tls_and_the_bind_rule(env: Env, tmp_path: Path, aws_wiring: Callable[[], Any]) -> None:
    cert, key = self_signed(tmp_path)
    app = serve.ServeApp.over(aws_wiring(), None)
    with serve.serving(app, tls_cert=cert, tls_key=key) as running:
        assert running.url.startswith("https://127.0.0.1:")
        r = httpx.get(f"{running.url}/v1/nonce", verify=ssl.create_default_context(cafile=cert))
        assert r.status_code == 200 and r.json()["nonce"]
        with pytest.raises(httpx.ConnectError):
            httpx.get(f"{running.url}/v1/nonce")  # not trusted without the certificate
        assert (
            httpx.post(
                f"{running.url}/admin/policies", json={}, verify=ssl.create_default_context(cafile=cert)
            ).status_code
            == 404
        )  # admin API off
    for host in ("0.0.0.0", "10.1.2.3", "::", "example.com"):
        with pytest.raises(serve.ServeError, match="refusing to serve plain HTTP"):
            serve.check_bind(host, tls=False, insecure=False)
        serve.check_bind(host, tls=True, insecure=False)
        serve.check_bind(host, tls=False, insecure=True)
    for host in ("127.0.0.1", "::1", "localhost", "127.0.0.9"):
        serve.check_bind(host, tls=False, insecure=False)


def test_admin_tokens_file_is_checked_and_tokens_are_never_shown(tmp_path: Path) -> None:
    p = tmp_path / "t"
    p.write_text("alice:not-a-hash\n")
    with pytest.raises(serve.ServeError, match=r"t:1: expected principal:sha256hex"):
        serve.AdminTokens.load(p)
    p.write_text("# nothing\n")
    with pytest.raises(serve.ServeError, match="no admin tokens"):
        serve.AdminTokens.load(p)
    token, line = serve.new_admin_token("ops@example.com", ["incident-responder"])
    p.write_text(line + "\n")
    assert token not in p.read_text()
    t = serve.AdminTokens.load(p)
    assert t.principal(f"Bearer {token}") == "ops@example.com"
    assert t.principal(f"Bearer {token}x") is None and t.principal(token) is None and t.principal(None) is None


RINGFENCE = Path(sys.executable).parent / "ringfence"


def test_cli_serves_and_refuses_plain_http_off_loopback(env: Env, tmp_path: Path) -> None:
    out = subprocess.run(
        [str(RINGFENCE), "serve", "--host", "0.0.0.0", "--port", "0"], capture_output=True, text=True, timeout=60
    )
    assert out.returncode == 1 and "refusing to serve plain HTTP on 0.0.0.0" in out.stderr
    tokens = tmp_path / "tokens"
    made = subprocess.run(
        [str(RINGFENCE), "serve-token", "bob", "--role", "policy-author", "--file", str(tokens)],
        capture_output=True,
        text=True,
        check=True,
    )
    token = made.stdout.strip().splitlines()[-1]
    assert oct(tokens.stat().st_mode & 0o777) == "0o600" and token not in tokens.read_text()
    proc = subprocess.Popen(
        [str(RINGFENCE), "serve", "--port", "0", "--store", "aws", "--admin-tokens", str(tokens)],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        env=dict(os.environ),
    )
    try:
        assert proc.stdout is not None
        line = proc.stdout.readline()
        assert "ringfence serve: listening on http://127.0.0.1:" in line and "admin API for 1 principal" in line, line
        url = line.split("listening on ")[1].split()[0]
        assert httpx.get(f"{url}/v1/nonce", timeout=10).status_code == 200
        body = {"files": policy_files(), "reason": "first"}
        r = httpx.post(f"{url}/admin/policies", json=body, headers=admin_headers(token), timeout=30)
        assert r.status_code == 201, r.text
        assert [(a.action, a.principal) for a in env.store.audit_log()] == [("policy.provision", "bob")]
    finally:
        proc.terminate()
        proc.wait(15)
    assert token not in (proc.stderr.read() if proc.stderr else ""), "the token is never logged"
    assert json.dumps(token) not in (proc.stdout.read() if proc.stdout else "")


def test_serve_store_aws_marks_a_failed_hand_off_owed_in_its_own_partition_and_a_pass_hands_it_on(
    env: Env, aws_wiring: Callable[[], Any]
) -> None:
    """`--store aws` may serve the GCP and Azure event routes and passes, whose failed hand-offs
    are marked owed. Before: its wiring named no writer, so every mark was refused (counted
    ComputeOwedNotMarked) and the change waited for a rebuild. Now it marks in ``owed#serve``,
    and the real reconcile pass (its role granted the delete there) hands the mark on."""
    from ringfence.control import wiring
    from tests.aws.test_pipeline import _ctx, _scheduled
    from tests.aws.test_reconcile_gone_hand_off import compute_messages, reconcile_container

    env.provision_example_policy()
    counted: list[tuple[str, float]] = []
    wid = "7f3e0c4a-1b2c-4d5e-8f90-a1b2c3d4e5f6"  # an Azure VM whose change serve's route stored
    wiring.owe_compute(aws_wiring(), [wid], "azure events", lambda n, v: counted.append((n, v)), urgent=[wid])
    assert counted == [], "the mark was refused"
    assert [(m.partition, m.workload_id, m.urgent) for m in env.store.owed_compute()] == [("owed#serve", wid, True)]
    sent = compute_messages(env)
    reconcile_container(env)
    env.fn["reconcile"].handler(_scheduled(), _ctx())
    assert (True, [wid]) in sent, "the pass did not hand serve's mark on"
    assert env.store.owed_compute() == [], "the mark handed on stays"
