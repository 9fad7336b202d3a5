"""Issue 10, the signing key: in the demo, ``ringfence serve`` (the agent API) runs as a process of
its own, started with the stack's environment — and, as the agent-API function in the stack, without
``RINGFENCE_SIGNING_KEY``. Only compute and publish hold it: the embedded AWS gives it to those
functions' invocations (``ringfence.local.lambdas.FUNCTION_ENVIRONMENT``), never to the process
environment that serve inherits."""

from __future__ import annotations

import json
import os
from pathlib import Path

import httpx

from ringfence.demo.live import Live
from ringfence.demo.offline import example_dir
from ringfence.demo.report import Report
from ringfence.local import lambdas
from tests.aws.conftest import Env
from tests.aws.test_pipeline import agent_key, boot, iid_document

KEY = "RINGFENCE_SIGNING_KEY"


def environ_of(pid: int) -> dict[str, str]:
    raw = Path(f"/proc/{pid}/environ").read_bytes()
    return dict(item.decode().partition("=")[::2] for item in raw.split(b"\0") if item)


def test_attack_the_demos_serve_process_holds_no_signing_key(env: Env, tmp_path: Path) -> None:
    est = boot(env)  # compute signs every bundle: it has the key, through its own environment
    web = est["ids"]["web"][0]
    assert KEY not in os.environ, "the shared process environment holds no signing key"
    assert KEY in lambdas.FUNCTION_ENVIRONMENT["compute"] and KEY in lambdas.FUNCTION_ENVIRONMENT["publish"]
    assert {f for f, e in lambdas.FUNCTION_ENVIRONMENT.items() if KEY in e} == {"compute", "publish"}
    os.environ[KEY] = env.aws.compute_env()[KEY]  # even when the operator's shell had it set
    live = Live(example_dir(None), tmp_path, Report(tmp_path, "dry-run", quiet=True), dry_run=True)
    live.aws = env.aws
    live.work.mkdir(parents=True)
    try:
        live._launch_serve()  # as the demo starts it
        live._await_serve()
        assert live.serve is not None
        served = environ_of(live.serve.pid)
        assert KEY not in served, "ringfence serve (the agent API) was started with the signing key"
        assert served["RINGFENCE_BUCKET"] == env.bucket, "it is the stack's environment"
        # and it serves what compute signed, to an agent enrolled through it
        assert live.tls_context is not None
        with httpx.Client(base_url=live.api_base, verify=live.tls_context, timeout=30) as http:
            nonce = http.get("/v1/nonce").json()["nonce"]
            doc = iid_document(env, web)
            req = {
                "method": "aws-iid",
                "nonce": nonce,
                "document": doc,
                "document_signature": env.iid.sign(doc),
                "agent_key": agent_key(web).pem,
                "agent_signature": agent_key(web).prove("enroll", web, nonce),
            }
            got = http.post("/v1/enroll", content=json.dumps(req))
            assert got.status_code == 200, got.text
            token = got.json()["token"]
            bundle = http.get(f"/v1/agents/{web}/bundle", headers={"Authorization": f"Bearer {token}"})
            assert bundle.status_code == 200, bundle.text
        ptr = env.store.bundle_pointer(web)
        assert ptr is not None and bundle.content == env.s3.get_object(Bucket=env.bucket, Key=ptr.key)["Body"].read()
    finally:
        os.environ.pop(KEY, None)
        live._kill_own()
