"""Issue 10, control plane: the stack hosts the hash-pinned agent artifact. ``ringfence
publish-agent`` (the real CLI) puts the wheel, its ``.sha256`` and the installer into the stack's
bucket (moto S3, server mode), the real agent-API handler serves them at ``GET /v1/agent/{name}``,
and the real install.sh artifact check accepts the fetched wheel and refuses a tampered one."""

from __future__ import annotations

import base64
import hashlib
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

from ringfence import cli
from tests.agent.test_agent_artifact import INSTALLER, install
from tests.aws.conftest import Env, LambdaContext, rest_event


def fetch(env: Env, name: str) -> tuple[int, str, bytes]:
    """(status, content type, body bytes) of the real agent-API handler's answer, no token."""
    out: dict[str, Any] = env.fn["agentapi"].handler(rest_event("GET", f"/v1/agent/{name}"), LambdaContext())
    body = out.get("body") or ""
    raw = base64.b64decode(body) if out.get("isBase64Encoded") else body.encode()
    headers = {k.lower(): v for k, v in (out.get("headers") or {}).items()}
    headers |= {k.lower(): v[0] for k, v in (out.get("multiValueHeaders") or {}).items()}
    return out["statusCode"], headers.get("content-type", ""), raw


@pytest.fixture
def published(env: Env, artifact: tuple[Path, str], capsys: pytest.CaptureFixture[str]) -> tuple[str, str]:
    wheel, digest = artifact
    assert cli.main(["publish-agent", "--dir", str(wheel.parent), "--store", "aws"]) == 0
    out = capsys.readouterr().out
    assert f"url path /v1/agent/{wheel.name}" in out and f"sha256 {digest}" in out, out
    return wheel.name, digest


def test_the_published_wheel_is_served_byte_for_byte(env: Env, published: tuple[str, str]) -> None:
    """The bytes served are the wheel's (its digest). That those bytes install is
    tests/agent/test_agent_artifact.py's; the installer's own download and install over the agent
    API is test_install_sh_downloads_the_wheel_over_https_from_the_agent_api_and_checks_it."""
    name, digest = published
    status, kind, body = fetch(env, name)
    assert status == 200 and kind == "application/octet-stream"
    assert hashlib.sha256(body).hexdigest() == digest
    status, _, side = fetch(env, f"{name}.sha256")
    assert status == 200 and side.decode().split() == [digest, name]
    installer = f"install-{hashlib.sha256(INSTALLER.read_bytes()).hexdigest()[:16]}.sh"
    status, kind, script = fetch(env, installer)
    assert status == 200 and kind.startswith("text/") and script == INSTALLER.read_bytes()
    # no mutable name is written (hosts pin the installer by digest); one an earlier publish
    # wrote is still served, so user data made then keeps working until it is replaced
    assert fetch(env, "install.sh")[0] == 404
    env.s3.put_object(Bucket=env.bucket, Key="agent/install.sh", Body=b"#!/bin/sh\n")
    assert fetch(env, "install.sh")[:1] == (200,)


def test_attack_tampered_wheel_in_the_bucket_is_refused_by_the_installer(
    env: Env, published: tuple[str, str], tmp_path: Path
) -> None:
    """Whoever can write the bucket (or sits on the download path) swaps the wheel and its .sha256
    alike: the server then vouches for the evil bytes, but the digest the operator gave the host
    does not."""
    name, digest = published
    _, _, body = fetch(env, name)
    evil = bytearray(body)
    evil[len(evil) // 2] ^= 0x01
    env.s3.put_object(Bucket=env.bucket, Key=f"agent/{name}", Body=bytes(evil))
    env.s3.put_object(
        Bucket=env.bucket, Key=f"agent/{name}.sha256", Body=f"{hashlib.sha256(evil).hexdigest()}  {name}\n"
    )
    status, _, served = fetch(env, name)
    assert status == 200 and served == bytes(evil)
    fetched = tmp_path / "dl" / name
    fetched.parent.mkdir()
    fetched.write_bytes(served)
    out = install(tmp_path, ARTIFACT_FILE=str(fetched), ARTIFACT_SHA256=digest)
    assert out.returncode == 3 and f"not {digest}: refused, nothing installed" in out.stderr, out.stderr
    assert not (tmp_path / "venv").exists()


@pytest.mark.parametrize(
    "name",
    [
        "../keys/bundle-signing.pub.pem",
        "..%2fkeys%2fbundle-signing.pub.pem",
        "%2e%2e%2fkeys%2fbundle-signing.pub.pem",
        "%2e%2e",
        "..",
        "bundle-signing.pub.pem",
        "ringfence_agent-0.1.0-py3-none-any.whl.evil",
        "ringfence_agent-../../keys-py3-none-any.whl",
        "ringfence_agent-0.1.0-py3-none-any.whl%00",
    ],
)
def test_attack_agent_artifact_route_reads_nothing_but_the_artifact(env: Env, name: str) -> None:
    """The route is unauthenticated and reads the bucket that holds every workload's bundle and
    the signing public keys: only the artifact's own names reach it."""
    env.s3.put_object(Bucket=env.bucket, Key="keys/bundle-signing.pub.pem", Body=b"not for you")
    env.s3.put_object(Bucket=env.bucket, Key="agent/bundle-signing.pub.pem", Body=b"not for you")
    status, _, body = fetch(env, name)
    assert status == 404 and b"not for you" not in body


def test_publish_agent_never_puts_other_bytes_under_a_name_in_the_bucket(
    env: Env,
    published: tuple[str, str],
    artifact: tuple[Path, str],
    tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
) -> None:
    """S3 conditional write (If-None-Match: *): a second publish of the same build is a no-op,
    other bytes under a published name are refused and the first bytes stay."""
    name, digest = published
    assert cli.main(["publish-agent", "--dir", str(artifact[0].parent), "--store", "aws"]) == 0
    other = tmp_path / "other"
    other.mkdir()
    data = bytearray(artifact[0].read_bytes())
    data[len(data) // 2] ^= 0x01
    (other / name).write_bytes(bytes(data))
    capsys.readouterr()
    assert cli.main(["publish-agent", "--dir", str(other), "--store", "aws"]) != 0
    assert "already published with other bytes" in capsys.readouterr().err
    assert hashlib.sha256(fetch(env, name)[2]).hexdigest() == digest


def test_an_artifact_name_not_published_is_404(env: Env) -> None:
    status, _, body = fetch(env, "ringfence_agent-9.9.9-py3-none-any.whl")
    assert status == 404 and b"publish-agent" in body


def test_ringfence_serve_hosts_what_publish_agent_stored_beside_its_database(
    artifact: tuple[Path, str],
    tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
) -> None:
    """On premise: ``publish-agent --store sqlite:PATH`` writes where ``ringfence serve --store
    sqlite:PATH`` reads; the wheel crosses real HTTP as bytes, not base64 text."""
    import httpx

    from ringfence import serve
    from ringfence.local.wiring import LocalWiring

    wheel, digest = artifact
    db = tmp_path / "rf" / "state.db"
    assert cli.main(["publish-agent", "--dir", str(wheel.parent), "--store", f"sqlite:{db}"]) == 0
    assert f"sha256 {digest}" in capsys.readouterr().out
    with LocalWiring(db) as w, serve.serving(serve.ServeApp.over(w, None)) as running:
        client = httpx.Client(base_url=running.url)
        r = client.get(f"/v1/agent/{wheel.name}")
        assert r.status_code == 200 and r.headers["content-type"] == "application/octet-stream"
        assert hashlib.sha256(r.content).hexdigest() == digest
        assert client.get("/v1/agent/..%2fstate.db").status_code == 404


@pytest.mark.slow
def test_install_sh_downloads_the_wheel_over_https_from_the_agent_api_and_checks_it(
    env: Env,
    published: tuple[str, str],
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    aws_wiring: Callable[[], Any],
) -> None:
    """The installer's own download (curl --proto '=https', Accept: application/octet-stream) from
    the agent API's route over TLS, the stack's moto bucket behind it: the right digest installs,
    any other is refused."""
    from ringfence import serve
    from ringfence.local.tls import lab_tls

    name, digest = published
    tls = lab_tls(tmp_path / "tls", "127.0.0.1")
    monkeypatch.setenv("CURL_CA_BUNDLE", str(tls.ca))  # the lab's CA; curl trusts nothing else here
    app = serve.ServeApp.over(aws_wiring(), None)
    with serve.serving(app, tls_cert=str(tls.cert), tls_key=str(tls.key)) as running:
        url = f"{running.url}/v1/agent/{name}"
        assert url.startswith("https://127.0.0.1:")
        out = install(tmp_path / "bad", ARTIFACT_URL=url, ARTIFACT_SHA256="0" * 64)
        assert out.returncode == 3 and f"not {'0' * 64}: refused" in out.stderr, out.stderr  # downloaded, then refused
        out = install(tmp_path, ARTIFACT_URL=url, ARTIFACT_SHA256=digest)
    assert out.returncode == 0, out.stderr
    assert (tmp_path / "venv/bin/ringfence-agent").exists()
