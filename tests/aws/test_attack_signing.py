"""The signing key out of reach of the internet-facing agent API (issue 10, "The signing key").

Attacks performed against the real handlers on moto server and against the stack definitions
(SAM and Terraform): the agent-API function has no key in its wiring, environment or IAM, and
what it serves is byte for byte what compute signed; only compute can use the key."""

from __future__ import annotations

import json
import os
from typing import Any

import pytest

from ringfence import bundle
from ringfence.control.wiring import NoSigningKey
from tests.aws.conftest import Env, LambdaContext, ip_of, rest_event
from tests.aws.test_agent_api import auth
from tests.aws.test_pipeline import boot, enroll_instance
from tests.aws.test_static import ROOT, hcl, template

KEY_ACTIONS = ("secretsmanager:", "ssm:GetParameter", "kms:Sign")


def _actions(statements: list[dict[str, Any]]) -> list[str]:
    out: list[str] = []
    for st in statements:
        if "If" in st:  # !If [condition, statement, AWS::NoValue]
            st = st["If"][1]
        acts = st.get("Action", st.get("actions", []))
        out += [acts] if isinstance(acts, str) else list(acts)
    return out


def _resources(statements: list[dict[str, Any]], action: str) -> list[str]:
    out: list[str] = []
    for st in statements:
        acts = st.get("Action", [])
        if action in ([acts] if isinstance(acts, str) else acts):
            res = st["Resource"]
            out += [json.dumps(r) for r in (res if isinstance(res, list) else [res])]
    return out


def test_attack_agent_api_function_holds_no_signing_key_in_sam() -> None:
    t = template()
    res = t["Resources"]
    assert "RINGFENCE_SIGNING_KEY" not in t["Globals"]["Function"]["Environment"]["Variables"]
    api = res["AgentApiFunction"]["Properties"]
    assert "RINGFENCE_SIGNING_KEY" not in api.get("Environment", {}).get("Variables", {})
    statements = [s for p in api["Policies"] for s in p["Statement"]]
    for action in _actions(statements):
        assert not action.startswith(KEY_ACTIONS[0]) and action not in KEY_ACTIONS[1:], action
    # kms:Decrypt on the data key (tables, queues, bucket), never on anything holding a signing key
    assert _resources(statements, "kms:Decrypt") == [json.dumps({"GetAtt": "Key.Arn"})]
    # it cannot plant a bundle or a delta of its own in the bucket agents are served from
    assert all("reports/" in r for r in _resources(statements, "s3:PutObject"))
    # only compute (set deltas) and publish (bundles) are configured with the key, and only their
    # roles may use it; neither is behind an API
    signers = ("ComputeFunction", "PublishFunction")
    for name in signers:
        fn = res[name]["Properties"]
        assert "RINGFENCE_SIGNING_KEY" in fn["Environment"]["Variables"], name
        assert {e["Type"] for e in fn["Events"].values()} == {"SQS"}, name
    roles = [{"GetAtt": "ComputeFunctionRole.Arn"}, {"GetAtt": "PublishFunctionRole.Arn"}]
    others = [n for n, r in res.items() if r["Type"] == "AWS::Serverless::Function" and n not in signers]
    for name in others:
        assert "RINGFENCE_SIGNING_KEY" not in res[name]["Properties"].get("Environment", {}).get("Variables", {})
    for slot in ("SigningKey", "SigningKeyB"):  # the two slots a rotation goes through
        key = res[slot]["Properties"]
        assert key["KeySpec"] == "ECC_NIST_EDWARDS25519" and key["KeyUsage"] == "SIGN_VERIFY"
        policy = {s["Sid"]: s for s in key["KeyPolicy"]["Statement"]}
        assert policy["AccountAdministersButDoesNotSign"]["NotAction"] == "kms:Sign"
        assert policy["OnlyComputeAndPublishSign"]["Principal"] == {"AWS": roles}
        deny = policy["NoOneElseSigns"]
        assert deny["Effect"] == "Deny" and deny["Action"] == "kms:Sign" and deny["Principal"] == {"AWS": "*"}
        assert deny["Condition"]["ArnNotEquals"]["aws:PrincipalArn"] == roles
    secret = res["SigningSecretPolicy"]["Properties"]["ResourcePolicy"]["Statement"][0]
    assert secret["Effect"] == "Deny" and secret["Action"] == "secretsmanager:GetSecretValue"
    assert secret["Condition"]["ArnNotEquals"]["aws:PrincipalArn"] == roles


def test_attack_agent_api_function_holds_no_signing_key_in_terraform() -> None:
    mod = ROOT / "infra/modules/ringfence"
    loc: dict[str, Any] = {}
    for block in hcl(mod / "lambda.tf").get("locals", []):
        loc.update(block)
    text = (mod / "lambda.tf").read_text()
    assert "RINGFENCE_SIGNING_KEY" not in json.dumps(loc["common_env"])
    agentapi = text.split("    agentapi = [", 1)[1].split("\n    ]", 1)[0]
    for action in ("secretsmanager", "kms:Sign", "ssm:"):
        assert action not in agentapi, action
    assert '"s3:PutObject"], resources = ["${aws_s3_bucket.bundles.arn}/reports/*"]' in agentapi
    for name, fn in loc["functions"].items():
        assert ("RINGFENCE_SIGNING_KEY" in json.dumps(fn["env"])) == (name in ("compute", "publish")), name
    signing = (mod / "signing.tf").read_text()
    assert 'customer_master_key_spec = "ECC_NIST_EDWARDS25519"' in signing
    assert 'not_actions = ["kms:Sign"]' in signing
    assert 'identifiers = [aws_iam_role.fn["compute"].arn, aws_iam_role.fn["publish"].arn]' in signing
    assert signing.count("values   = [local.compute_role, local.publish_role]") == 2
    assert signing.count('variable = "aws:PrincipalArn"') == 2  # the key's and the secret's deny


def _raw(env: Env, path: str, token: str, query: dict[str, str] | None = None) -> dict[str, Any]:
    out: dict[str, Any] = env.fn["agentapi"].handler(rest_event("GET", path, None, auth(token), query), LambdaContext())
    return out


def test_attack_agent_api_serves_compute_signed_bytes_without_a_key(env: Env) -> None:
    est = boot(env)  # compute (with the key) signs every bundle
    proc = est["ids"]["proc"][0]
    # the agent API's container starts as deployed: no RINGFENCE_SIGNING_KEY in its environment
    # (the embedded AWS gives it to compute's invocations only, never to the process)
    assert "RINGFENCE_SIGNING_KEY" not in os.environ
    env.fn["agentapi"]._svc.clear()
    tok = enroll_instance(env, proc)
    first = _raw(env, f"/v1/agents/{proc}/bundle", tok)
    assert first["statusCode"] == 200
    # a new web server: compute signs a delta for the set processing accepts from
    new = est["run"]("web", est["subnets"]["web"], 1)[0]
    env.put(env.state_event(new, "running"))
    env.pump()
    objects = {o["Key"] for o in env.s3.list_objects_v2(Bucket=env.bucket)["Contents"]}
    api = env.fn["agentapi"].api()
    with pytest.raises(NoSigningKey):
        api.w.signer  # noqa: B018 - the attack: ask the internet-facing function for the key
    store = env.store
    ptr = store.bundle_pointer(proc)
    assert ptr is not None
    got = _raw(env, f"/v1/agents/{proc}/bundle", tok)
    assert got["statusCode"] == 200
    assert got["body"].encode() == api.w.publisher.get(ptr.key)  # served bytes == compute's signed bytes
    doc = bundle.load_bundle(got["body"])
    deltas = _raw(env, f"/v1/agents/{proc}/deltas", tok, {"since": str(doc.version)})
    assert deltas["statusCode"] == 200
    served = json.loads(deltas["body"])["deltas"]
    assert served, "the new web server reaches processing by a signed delta"
    stored = [
        api.w.publisher.get(p.key).strip()
        for name in doc.sets
        for p in store.deltas_after(name, doc.version)
        if p.to_version <= json.loads(deltas["body"])["bundle_version"]
    ]
    assert sorted(json.dumps(json.loads(b), sort_keys=True) for b in stored) == sorted(
        json.dumps(d, sort_keys=True) for d in served
    )
    for raw in stored:
        assert raw in deltas["body"].encode()  # each delta document verbatim
    verifier = bundle.Verifier.from_pem(env.signing_key.public_pem())
    verifier.verify(doc)
    for d in served:
        verifier.verify(bundle.load_delta(json.dumps(d)))
    assert any(f"{ip_of(env, new)}/32" in d["add"] for d in served)
    # serving wrote nothing: no re-signed bundle written back (today's materialization is gone)
    assert {o["Key"] for o in env.s3.list_objects_v2(Bucket=env.bucket)["Contents"]} == objects
