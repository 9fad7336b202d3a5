"""Attacks on enrollment and tokens (issue 10, "Enrollment binds identity"), each performed against
the real agent-API handler over moto server, and shown to fail."""

from __future__ import annotations

import datetime
import json
import threading
import time
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

import boto3
import pytest
from botocore.auth import SigV4Auth, SigV4QueryAuth
from botocore.awsrequest import AWSRequest
from botocore.credentials import Credentials

from ringfence.clouds.aws import enroll as aws_enroll
from ringfence.clouds.aws.enroll import ProofError, replay_sts, sts_endpoint_allowed, trust_admits_others
from tests.aws.conftest import ACCOUNT, REGION, Env
from tests.aws.test_agent_api import (
    EC2_ONLY_TRUST,
    auth,
    enroll_pairing,
    give_instance_profile,
    pairing_on,
    register_onprem,
    sts_env,
    sts_request,
)
from tests.aws.test_pipeline import AgentKey, agent_key, boot, enroll_iid, iid_document

__all__ = ["pairing_on", "sts_env"]  # the fixtures, used by name


def nonce(env: Env) -> str:
    _, _, n = env.rest("agentapi", "GET", "/v1/nonce")
    return str(n["nonce"])


def enroll(env: Env, req: dict[str, Any]) -> tuple[int, Any]:
    status, _, body = env.rest("agentapi", "POST", "/v1/enroll", json.dumps(req))
    return status, body


def refresh(env: Env, wid: str, key: AgentKey, n: str | None = None) -> tuple[int, Any]:
    n = n or nonce(env)
    body = {"nonce": n, "signature": key.prove("token", wid, n)}
    status, _, out = env.rest("agentapi", "POST", f"/v1/agents/{wid}/token", json.dumps(body))
    return status, out


def bundle_status(env: Env, wid: str, token: str) -> int:
    return int(env.rest("agentapi", "GET", f"/v1/agents/{wid}/bundle", headers=auth(token))[0])


def audits(env: Env, action: str, wid: str) -> list[Any]:
    return [r for r in env.store.audit_log() if r.action == action and r.target == wid]


# --- aws-sts ---------------------------------------------------------------------------------------


def sts_on(env: Env, monkeypatch: pytest.MonkeyPatch) -> None:
    """Enable aws-sts (off by default) and reload the functions."""
    monkeypatch.setenv("RINGFENCE_ENROLL_METHODS", "aws-iid,aws-sts")
    env.load_functions()


def test_attack_sts_on_a_default_stack_is_refused(env: Env) -> None:
    """The agent sends aws-iid only: a default stack does not accept aws-sts at all, so instance-role
    credentials (readable by any local user, or through an SSRF) prove nothing there."""
    est = boot(env)
    web = est["ids"]["web"][0]
    give_instance_profile(env, web)
    status, body = enroll(env, sts_request(env, web, nonce(env)))
    assert status == 400 and "aws-sts" in body["detail"], body
    assert not audits(env, "agent.enroll", web)


def test_attack_sts_endpoint_sts_s3_amazonaws_com_is_refused(env: Env, monkeypatch: pytest.MonkeyPatch) -> None:
    """An S3 bucket named "sts" answers at sts.s3.amazonaws.com: the default allow-list (AWS's STS
    host names, parsed) refuses it before anything is sent."""
    sts_on(env, monkeypatch)
    est = boot(env)
    web = est["ids"]["web"][0]
    n = nonce(env)
    req = sts_request(env, web, n)
    for url in (
        "https://sts.s3.amazonaws.com/?Action=GetCallerIdentity&Version=2011-06-15",
        "https://sts.amazonaws.com.evil.example/?Action=GetCallerIdentity&Version=2011-06-15",
        "https://sts.amazonaws.com@evil.example/?Action=GetCallerIdentity&Version=2011-06-15",
        "http://sts.amazonaws.com/?Action=GetCallerIdentity&Version=2011-06-15",
        "https://sts.amazonaws.com:8443/?Action=GetCallerIdentity&Version=2011-06-15",
    ):
        status, body = enroll(env, dict(req, sts_url=url))
        assert status == 401 and "STS endpoint" in body["detail"], url
    assert env.store.burn_nonce(n), "refused before the nonce was spent"
    for host in ("sts.amazonaws.com", "sts.eu-west-1.amazonaws.com", "sts.us-gov-west-1.amazonaws.com"):
        assert sts_endpoint_allowed(f"https://{host}/?Action=GetCallerIdentity", [])
    assert sts_endpoint_allowed("https://sts.cn-north-1.amazonaws.com.cn/", [])
    assert not sts_endpoint_allowed("https://sts.s3.amazonaws.com/", [])
    assert not sts_endpoint_allowed("https://sts.amazonaws.com.cn.evil.example/", [])


def test_attack_sts_role_that_is_not_the_instance_profile_role_is_refused(sts_env: Env) -> None:
    """Any role whose session name is an instance id used to pass: the role must be the instance's."""
    env = sts_env
    est = boot(env)
    web = est["ids"]["web"][0]
    give_instance_profile(env, web, "web-instance-role")
    give_instance_profile(env, est["ids"]["db"][0], "db-instance-role")  # a real role, another instance's
    status, body = enroll(env, sts_request(env, web, nonce(env), role="db-instance-role"))
    assert status == 401 and "not the instance profile role" in body["detail"], body
    bare = est["ids"]["web"][1]  # no instance profile at all
    status, body = enroll(env, sts_request(env, bare, nonce(env), role="web-instance-role"))
    assert status == 401 and "not the instance profile role" in body["detail"], body
    status, body = enroll(env, sts_request(env, web, nonce(env), role="web-instance-role"))
    assert status == 200 and body["workload_id"] == web, body


def test_attack_sts_with_the_instance_role_cannot_rebind_a_bound_agent_key(sts_env: Env) -> None:
    """Whoever can read the instance role's credentials (any local user, an SSRF to the metadata
    service) proves aws-sts as well as the agent does: with a key of its own it must not take the
    workload's identity over from the agent that enrolled first (which would then never receive
    another bundle, a quarantine included)."""
    env = sts_env
    est = boot(env)
    web = est["ids"]["web"][0]
    give_instance_profile(env, web)
    status, body = enroll_iid(env, web)  # the real agent, with its key
    assert status == 200, body
    token = body["token"]
    thief = AgentKey()
    n = nonce(env)
    req = dict(sts_request(env, web, n), agent_key=thief.pem, agent_signature=thief.prove("enroll", web, n))
    status, body = enroll(env, req)
    assert status == 401 and "another agent key" in body["detail"], body
    assert env.store.agent_key(web) == agent_key(web).pem, "the first binding holds"
    assert bundle_status(env, web, token) == 200, "the real agent's token still works"
    status, body = refresh(env, web, agent_key(web))
    assert status == 200, "and it still renews with its key"
    token = body["token"]  # the renewal revoked the previous one
    assert len(audits(env, "agent.enroll.refused", web)) == 1
    # without a key at all: refused too (its token would have revoked the bound agent's)
    bare = {k: v for k, v in sts_request(env, web, nonce(env)).items() if not k.startswith("agent_")}
    status, body = enroll(env, bare)
    assert status == 401 and "needs agent_key" in body["detail"], body
    assert bundle_status(env, web, token) == 200
    # the same proof with the bound key is a renewal, as before
    assert enroll(env, sts_request(env, web, nonce(env)))[0] == 200


def test_attack_sts_for_a_stopped_instance_is_refused(sts_env: Env) -> None:
    env = sts_env
    est = boot(env)
    web = est["ids"]["web"][0]
    give_instance_profile(env, web)
    env.ec2.stop_instances(InstanceIds=[web])  # inventory has not heard yet: the live state decides
    status, body = enroll(env, sts_request(env, web, nonce(env)))
    assert status == 401 and "not running" in body["detail"], body


class _Redirector(BaseHTTPRequestHandler):
    target = ""

    def log_message(self, format: str, *args: Any) -> None:
        return None

    def do_GET(self) -> None:
        self.send_response(302)
        self.send_header("Location", self.target + self.path)
        self.send_header("Content-Length", "0")
        self.end_headers()


@pytest.fixture
def redirector(env: Env) -> Iterator[str]:
    """A loopback server that redirects every request to moto's STS."""
    handler = type("Handler", (_Redirector,), {"target": env.url})
    server = ThreadingHTTPServer(("127.0.0.1", 0), handler)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        yield f"http://127.0.0.1:{server.server_address[1]}"
    finally:
        server.shutdown()
        server.server_close()


def test_attack_sts_redirect_is_not_followed(env: Env, redirector: str, monkeypatch: pytest.MonkeyPatch) -> None:
    """An allowed endpoint that redirects (to an STS that would answer) is refused, not followed."""
    monkeypatch.setenv("RINGFENCE_STS_ENDPOINTS", redirector)
    sts_on(env, monkeypatch)
    est = boot(env)
    web = est["ids"]["web"][0]
    give_instance_profile(env, web)
    n = nonce(env)
    req = sts_request(env, web, n)
    req["sts_url"] = req["sts_url"].replace(env.url, redirector)
    status, body = enroll(env, req)
    assert status == 401 and "302" in body["detail"], body


def _assumed(role: str, session: str, creds: dict[str, Any] | None = None) -> dict[str, Any]:
    """An AssumeRole answer's credentials (moto does not evaluate trust policies: AWS admits what
    the role's trust policy admits, which is what the tests vary)."""
    keys = {}
    if creds is not None:
        keys = {
            "aws_access_key_id": creds["AccessKeyId"],
            "aws_secret_access_key": creds["SecretAccessKey"],
            "aws_session_token": creds["SessionToken"],
        }
    sts = boto3.client("sts", **keys)
    answer: dict[str, Any] = sts.assume_role(RoleArn=f"arn:aws:iam::{ACCOUNT}:role/{role}", RoleSessionName=session)
    return answer["Credentials"]


SHARED_TRUST = {  # EC2, and the account's principals (role chaining, a user, a CI role...)
    "Version": "2012-10-17",
    "Statement": [
        {"Effect": "Allow", "Principal": {"Service": "ec2.amazonaws.com"}, "Action": "sts:AssumeRole"},
        {"Effect": "Allow", "Principal": {"AWS": f"arn:aws:iam::{ACCOUNT}:root"}, "Action": "sts:AssumeRole"},
    ],
}


def test_attack_sts_session_named_after_another_instance_of_a_role_others_may_assume_is_refused(
    sts_env: Env,
) -> None:
    """Instances A and B share a role (an Auto Scaling group's) whose trust policy also admits the
    account's principals: A's role credentials assume the role again with RoleSessionName=<B>,
    and the ARN, assumed-role/<role>/<B>, is byte for byte the one EC2 gives B. The role is B's
    profile role, but only EC2 names sessions after instances: refused, nothing bound, and B's
    own agent still enrolls. A role EC2 alone may assume still enrolls by aws-sts."""
    env = sts_env
    est = boot(env)
    a, b = est["ids"]["web"][0], est["ids"]["web"][1]
    give_instance_profile(env, a, "shared-web-role", SHARED_TRUST)
    give_instance_profile(env, b, "shared-web-role", SHARED_TRUST)
    a_creds = _assumed("shared-web-role", a)  # what IMDS hands A
    b_named = _assumed("shared-web-role", b, creds=a_creds)  # A's credentials, the session named B
    thief = AgentKey()
    n = nonce(env)
    req = dict(sts_request(env, b, n, creds=b_named), agent_key=thief.pem, agent_signature=thief.prove("enroll", b, n))
    status, body = enroll(env, req)
    assert status == 401, body
    assert "role shared-web-role" in body["detail"] and "admits principals other than EC2" in body["detail"], body
    assert "sessions named after an instance are not proof" in body["detail"], body
    assert env.store.agent_key(b) is None, "nothing bound to B"
    status, body = enroll_iid(env, b)  # B's own agent, its identity document and its key
    assert status == 200 and body["workload_id"] == b, body
    # a role whose trust policy admits EC2 alone: its session names are EC2's, and it enrolls
    db = est["ids"]["db"][0]
    give_instance_profile(env, db, "db-instance-role", EC2_ONLY_TRUST)
    status, body = enroll(env, sts_request(env, db, nonce(env), role="db-instance-role"))
    assert status == 200 and body["workload_id"] == db, body


def test_a_trust_policy_change_decides_sts_enrollments_after_the_cache_ttl(
    sts_env: Env, monkeypatch: pytest.MonkeyPatch
) -> None:
    """An agent-API container keeps a role's verdict ROLE_TRUST_TTL_S (60 s): a role widened to
    other principals refuses sessions once that has passed."""
    env = sts_env
    est = boot(env)
    web = est["ids"]["web"][0]
    give_instance_profile(env, web)
    assert enroll(env, sts_request(env, web, nonce(env)))[0] == 200
    boto3.client("iam").update_assume_role_policy(RoleName="web-instance-role", PolicyDocument=json.dumps(SHARED_TRUST))
    assert enroll(env, sts_request(env, web, nonce(env)))[0] == 200, "the verdict read a moment ago"
    later = time.monotonic() + aws_enroll.ROLE_TRUST_TTL_S + 1
    monkeypatch.setattr(aws_enroll, "_clock", lambda: later)
    status, body = enroll(env, sts_request(env, web, nonce(env)))
    assert status == 401 and "admits principals other than EC2" in body["detail"], body


def _allow(principal: Any, action: Any = "sts:AssumeRole", **more: Any) -> dict[str, Any]:
    return {
        "Version": "2012-10-17",
        "Statement": [{"Effect": "Allow", "Principal": principal, "Action": action, **more}],
    }


def test_trust_policies_that_admit_any_principal_but_ec2_are_refused() -> None:
    ec2 = {"Service": "ec2.amazonaws.com"}
    for refused in (
        _allow({"AWS": f"arn:aws:iam::{ACCOUNT}:root"}),
        _allow("*"),
        _allow({"AWS": "*"}),
        _allow({"Service": ["ec2.amazonaws.com", "lambda.amazonaws.com"]}),  # a function named i-...
        _allow({"Service": "ec2.amazonaws.com", "AWS": f"arn:aws:iam::{ACCOUNT}:root"}),
        _allow({"Federated": "arn:aws:iam::123456789012:oidc-provider/x"}, "sts:AssumeRoleWithWebIdentity"),
        _allow({"Federated": "arn:aws:iam::123456789012:saml-provider/x"}, "sts:AssumeRoleWithSAML"),
        _allow({"CanonicalUser": "abc"}),
        _allow({"AWS": "arn:aws:iam::111122223333:root"}, "sts:*"),
        _allow({"AWS": "arn:aws:iam::111122223333:root"}, "*"),
        _allow({"AWS": "arn:aws:iam::111122223333:root"}, ["sts:TagSession", "STS:assumerole"]),
        _allow({"AWS": "arn:aws:iam::111122223333:root"}, "sts:Assume?ole"),
        {"Statement": [{"Effect": "Allow", "NotPrincipal": ec2, "Action": "sts:AssumeRole"}]},
        {"Statement": [{"Effect": "Allow", "Principal": ec2, "NotAction": "sts:TagSession"}]},
        {"Statement": {"Effect": "Allow", "Principal": {"AWS": "x"}, "Action": "sts:AssumeRole"}},
        {
            "Statement": [
                EC2_ONLY_TRUST["Statement"][0],
                {"Effect": "Allow", "Principal": {"AWS": "x"}, "Action": "sts:*"},
            ]
        },
        {"Version": "2012-10-17"},
        "%7B%22Statement%22%3A%5B%7B%22Effect%22%3A%22Allow%22%2C%22Principal%22%3A%22%2A%22%2C%22Action%22%3A%22sts%3AAssumeRole%22%7D%5D%7D",
        "not json",
    ):
        assert trust_admits_others(refused) is not None, refused
    for ec2_alone in (
        EC2_ONLY_TRUST,
        _allow({"Service": ["ec2.amazonaws.com"]}, ["sts:AssumeRole", "sts:TagSession"]),
        _allow(ec2, "sts:AssumeRole", Condition={"StringEquals": {"aws:SourceAccount": ACCOUNT}}),
        # a Deny narrows; another principal's TagSession alone starts no session
        {
            "Statement": [
                EC2_ONLY_TRUST["Statement"][0],
                {"Effect": "Deny", "Principal": {"AWS": "*"}, "Action": "sts:AssumeRole"},
                {"Effect": "Allow", "Principal": {"AWS": "x"}, "Action": "sts:TagSession"},
            ]
        },
        json.dumps(EC2_ONLY_TRUST),
    ):
        assert trust_admits_others(ec2_alone) is None, ec2_alone


def test_attack_sts_request_http_cannot_send_is_refused_before_the_nonce_is_spent(sts_env: Env) -> None:
    """Unauthenticated input the replay could not send (a CR/LF in a value, a name that is no
    token, a control character or space in the URL) made http.client raise inside the handler
    (a 502), after the nonce was spent; an oversized header was replayed. Each is a 401 now,
    refused before the nonce is spent, and the replay turns what http.client refuses into a
    refusal too."""
    env = sts_env
    est = boot(env)
    web = est["ids"]["web"][0]
    give_instance_profile(env, web)
    n = nonce(env)
    req = sts_request(env, web, n)
    many = {f"X-Extra-{i}": "1" for i in range(20)}
    for bad, says in (
        ({"X-Extra": "a\r\nInjected: 1"}, "visible ASCII"),
        ({"X-Extra": "a\x00b"}, "visible ASCII"),
        ({"Bad Name": "x"}, "not an HTTP header name"),
        ({"X-Long": "a" * 70000}, "larger than"),
        (many, "more than"),
        ({"x-ringfence-nonce": n}, "given twice"),
        ({"Content-Length": "100"}, "the replay's own"),
        ({"Host": "evil.example"}, "Host is not the host"),
    ):
        status, body = enroll(env, dict(req, sts_headers=dict(req["sts_headers"], **bad)))
        assert status == 401 and says in body["detail"], (bad, body)
    for url in (req["sts_url"] + "&x=a b", req["sts_url"] + "&x=\x01", req["sts_url"] + "\r\nX: 1"):
        status, body = enroll(env, dict(req, sts_url=url))
        assert status == 401 and "visible ASCII" in body["detail"], (url, body)
    assert env.store.burn_nonce(n), "all refused before the nonce was spent"
    with pytest.raises(ProofError, match="could not be replayed"):
        replay_sts(req["sts_url"], {"X-Extra": "a\r\nInjected: 1"})
    with pytest.raises(ProofError, match="could not be replayed"):
        replay_sts(req["sts_url"] + "&x=a b", {})


def test_attack_sts_query_presigned_request_with_a_decoy_authorization_is_refused(sts_env: Env) -> None:
    """The nonce check took the first "SignedHeaders=" anywhere in Authorization and ignored a
    signature in the query: a query-presigned GetCallerIdentity that does not sign the nonce (an
    EKS token's, signed over host;x-k8s-aws-id) passed with a decoy header naming
    x-ringfence-nonce. Authorization is parsed whole now (SigV4, scope sts, signing host,
    x-amz-date and the nonce) and the query may carry Action and Version only."""
    env = sts_env
    est = boot(env)
    web = est["ids"]["web"][0]
    give_instance_profile(env, web)
    c = _assumed("web-instance-role", web)
    creds = Credentials(c["AccessKeyId"], c["SecretAccessKey"], c["SessionToken"])
    n = nonce(env)
    base = f"{env.url}/?Action=GetCallerIdentity&Version=2011-06-15"
    presigned = AWSRequest(method="GET", url=base, headers={"x-k8s-aws-id": "cluster"})
    SigV4QueryAuth(creds, "sts", REGION, expires=60).add_auth(presigned)
    decoy = {"x-k8s-aws-id": "cluster", "X-Ringfence-Nonce": n, "Authorization": "SignedHeaders=x-ringfence-nonce"}
    status, body = enroll(env, dict(sts_request(env, web, n), sts_url=presigned.url, sts_headers=decoy))
    assert status == 401 and "query-string signature" in body["detail"], body
    # a real header signature, but for another service, or not over the nonce's time or host
    s3 = AWSRequest(method="GET", url=base, headers={"X-Ringfence-Nonce": n})
    SigV4Auth(creds, "s3", REGION).add_auth(s3)
    good = sts_request(env, web, n)
    signed = good["sts_headers"]["Authorization"]
    for authorization, says in (
        ("SignedHeaders=x-ringfence-nonce", "not one SigV4 signature"),
        ("garbage Credential=x, SignedHeaders=x-ringfence-nonce;host, Signature=00", "not one SigV4 signature"),
        ("SignedHeaders=x-ringfence-nonce, " + signed, "not one SigV4 signature"),
        (s3.headers["Authorization"], "signed for s3"),
        (signed.replace("x-amz-date;", ""), "x-amz-date"),
        (signed.replace("SignedHeaders=host;", "SignedHeaders="), "host"),
    ):
        headers = dict(good["sts_headers"], Authorization=authorization)
        status, body = enroll(env, dict(good, sts_headers=headers))
        assert status == 401 and says in body["detail"], (authorization, body)
    assert env.store.burn_nonce(n), "all refused before the nonce was spent"


# --- aws-iid -----------------------------------------------------------------------------------------


def test_attack_replayed_identity_document_with_another_key_is_refused_and_audited(env: Env) -> None:
    """The document is readable by anything on the instance (and ends up in logs): whoever presents
    it first no longer wins once the agent has claimed it with its key."""
    est = boot(env)
    web = est["ids"]["web"][0]
    doc = iid_document(env, web)
    status, body = enroll_iid(env, web, doc)  # the real agent, with its key
    assert status == 200, body
    thief = AgentKey()
    status, body = enroll_iid(env, web, doc, key=thief)
    assert status == 401 and "another agent key" in body["detail"], body
    refused = audits(env, "agent.enroll.refused", web)
    assert len(refused) == 1 and refused[0].detail["reason"] == "identity already claimed by another agent key"
    # a document without any agent key is worth nothing either
    n = nonce(env)
    bare = {"method": "aws-iid", "nonce": n, "document": doc, "document_signature": env.iid.sign(doc)}
    status, body = enroll(env, bare)
    assert status == 401 and "agent_key" in body["detail"]
    # nor a key whose signature is over another nonce (a captured enrollment request)
    n2 = nonce(env)
    stolen = dict(bare, nonce=n2, agent_key=agent_key(web).pem, agent_signature=agent_key(web).prove("enroll", web, n))
    status, body = enroll(env, stolen)
    assert status == 401 and "does not verify" in body["detail"]


def test_attack_identity_document_of_a_terminated_instance_is_refused(env: Env) -> None:
    est = boot(env)
    web = est["ids"]["web"][0]
    doc = iid_document(env, web)
    env.ec2.terminate_instances(InstanceIds=[web])
    status, body = enroll_iid(env, web, doc)
    assert status == 401 and "not running" in body["detail"], body


# --- tokens ------------------------------------------------------------------------------------------


def test_attack_old_token_after_re_enrollment_is_refused(env: Env) -> None:
    est = boot(env)
    web = est["ids"]["web"][0]
    status, first = enroll_iid(env, web)
    assert status == 200 and bundle_status(env, web, first["token"]) == 200
    status, second = enroll_iid(env, web)
    assert status == 200
    assert bundle_status(env, web, first["token"]) == 401, "re-enrollment revoked the previous token"
    assert bundle_status(env, web, second["token"]) == 200
    status, fresh = refresh(env, web, agent_key(web))
    assert status == 200, fresh
    assert bundle_status(env, web, second["token"]) == 401, "a refresh revoked the previous token"
    assert bundle_status(env, web, fresh["token"]) == 200
    assert len(audits(env, "agent.enroll", web)) == 2 and len(audits(env, "token.refresh", web)) == 1


def test_attack_terminated_workloads_token_is_refused(env: Env) -> None:
    est = boot(env)
    web = est["ids"]["web"][0]
    token = enroll_iid(env, web)[1]["token"]
    assert bundle_status(env, web, token) == 200
    env.ec2.terminate_instances(InstanceIds=[web])
    env.put(env.state_event(web, "terminated"))
    env.pump()
    assert bundle_status(env, web, token) == 401
    assert refresh(env, web, agent_key(web))[0] == 401, "nor does its key get a new one"
    assert audits(env, "token.revoke", web), "the revocation is audited"


def test_a_terminated_instance_keeps_its_named_next_key(env: Env) -> None:
    """An agent-key reset that names the next key leaves a ``nextkey#`` item until that key binds;
    when the instance terminates first, ingest revokes its token but leaves the expectation (and
    the key binding): the functions fed by cloud events may not delete them, else code there could
    drop a running workload's pin (docs/threat-model.md). The instance id is never reused, so the
    item, left in the state table for good, pins nothing else."""
    from ringfence.control.credentials import agent_key_fingerprint

    est = boot(env)
    web = est["ids"]["web"][0]
    assert enroll_iid(env, web)[0] == 200
    env.bind(ONBOARDING, ["onboarding"])
    body = {"reason": "disk replaced", "next_agent_key": agent_key_fingerprint(AgentKey().pem)}
    status, _, out = env.rest("admin", "DELETE", f"/admin/workloads/{web}/agent-key", body, principal=ONBOARDING)
    assert status == 200, out
    state = env.ddb.Table("rf-state")
    assert "Item" in state.get_item(Key={"pk": f"nextkey#{web}", "sk": "key"}), "the reset named the next key"
    env.ec2.terminate_instances(InstanceIds=[web])
    env.put(env.state_event(web, "terminated"))
    env.pump()
    assert env.store.get(web).state == "terminated"
    assert "Item" in state.get_item(Key={"pk": f"nextkey#{web}", "sk": "key"}), "the expectation stays"
    assert env.store.expected_agent_key(web) == body["next_agent_key"]
    assert "Item" not in state.get_item(Key={"pk": f"tokenof#{web}", "sk": "token"}), "the token is revoked"


def test_attack_stopped_workloads_token_is_refused_until_it_runs(env: Env) -> None:
    """Even before ingest revokes (an event still queued), a token of a workload inventory no
    longer has running authorizes nothing."""
    est = boot(env)
    web = est["ids"]["web"][0]
    token = enroll_iid(env, web)[1]["token"]
    env.ec2.stop_instances(InstanceIds=[web])
    env.put(env.state_event(web, "stopped"))
    env.pump()
    assert bundle_status(env, web, token) == 401
    assert refresh(env, web, agent_key(web))[0] == 401


def test_attack_token_refresh_without_the_agent_key_is_refused(env: Env) -> None:
    est = boot(env)
    web, db = est["ids"]["web"][0], est["ids"]["db"][0]
    assert enroll_iid(env, web)[0] == 200
    status, body = refresh(env, web, AgentKey())
    assert status == 401 and "does not verify" in body["detail"], body
    status, body = refresh(env, db, AgentKey())
    assert status == 401 and "no agent key" in body["detail"], "a workload never enrolled has no key to sign with"
    # a captured refresh request (its nonce spent) is refused
    n = nonce(env)
    assert refresh(env, web, agent_key(web), n)[0] == 200
    status, body = refresh(env, web, agent_key(web), n)
    assert status == 401 and "nonce" in body["detail"]
    # a signature for another workload does not transfer
    n = nonce(env)
    forged = {"nonce": n, "signature": agent_key(web).prove("token", db, n)}
    assert env.rest("agentapi", "POST", f"/v1/agents/{web}/token", json.dumps(forged))[0] == 401


def test_attack_websocket_connect_with_a_replaced_token_is_refused(env: Env) -> None:
    """$connect hands the nudges only to the current token's holder, and says when it replaces."""
    from tests.aws.test_pipeline import _ctx

    est = boot(env)
    web = est["ids"]["web"][0]
    old = enroll_iid(env, web)[1]["token"]

    def connect(token: str, conn: str) -> int:
        event = {
            "requestContext": {"routeKey": "$connect", "connectionId": conn, "eventType": "CONNECT", "stage": "v1"},
            "queryStringParameters": None,
            "headers": {"Authorization": f"Bearer {token}"},
            "isBase64Encoded": False,
        }
        return int(env.fn["wsconnect"].handler(event, _ctx())["statusCode"])

    assert connect(old, "conn-1") == 200
    new = refresh(env, web, agent_key(web))[1]["token"]
    assert env.store.connection(web) is None, "a new token drops the connection opened with the old one"
    assert connect(old, "conn-evil") == 401
    assert connect(new, "conn-2") == 200 and env.store.connection(web) == "conn-2"
    assert connect(new, "conn-3") == 200
    replaced = audits(env, "agent.connect", web)
    assert replaced and replaced[-1].detail == {"connection": "conn-3", "replaced": "conn-2"}


def test_the_document_signature_form_the_agent_sends_is_the_one_verified(env: Env) -> None:
    """The agent sends IMDS ``/signature`` (base64 RSA-SHA256, whitespace as IMDS wraps it); a PKCS7
    form (``iid_signature: rsa2048|pkcs7``) is refused with a message naming the setting."""
    import base64
    import textwrap

    est = boot(env)
    web = est["ids"]["web"][0]
    doc = iid_document(env, web)
    wrapped = "\n".join(textwrap.wrap(env.iid.sign(doc), 64))  # as IMDS serves it
    assert enroll_iid(env, web, doc, wrapped)[0] == 200
    pkcs7_like = base64.b64encode(b"\x30\x80" + b"\x00" * 1500).decode()
    status, body = enroll_iid(env, web, doc, pkcs7_like)
    assert status == 401 and "iid_signature to signature" in body["detail"], body


# --- operator reset of a lost agent key ----------------------------------------------------------------

ONBOARDING = "arn:aws:iam::123456789012:role/Onboarding"
RESPONDER = "arn:aws:iam::123456789012:role/IncidentResponders"
READER = "arn:aws:iam::123456789012:role/Readers"


def test_attack_agent_key_reset_revokes_the_old_token_and_lets_a_new_key_enroll(
    env: Env, capsys: pytest.CaptureFixture[str]
) -> None:
    """The instance lost its state directory: a new agent key cannot claim the identity until an
    onboarding operator resets the binding; after the reset the old token is refused and the new
    key enrolls with the instance's identity document. Audited and counted."""
    from tests.aws.test_handler_metrics import emitted

    est = boot(env)
    web = est["ids"]["web"][0]
    env.bind(ONBOARDING, ["onboarding"])
    status, first = enroll_iid(env, web)
    assert status == 200 and bundle_status(env, web, first["token"]) == 200
    fresh = AgentKey()  # the agent after its state directory was wiped
    status, body = enroll_iid(env, web, key=fresh)
    assert status == 401 and "another agent key" in body["detail"], "no self-service re-claim"
    capsys.readouterr()
    path = f"/admin/workloads/{web}/agent-key"
    status, _, out = env.rest("admin", "DELETE", path, {"reason": "disk replaced, CHG-12"}, principal=ONBOARDING)
    assert status == 200, out
    assert out["token_revoked"] is True and out["agent_key_dropped"]
    assert emitted(capsys.readouterr().out).get("AgentKeyResets") == 1
    assert bundle_status(env, web, first["token"]) == 401, "the old token is refused after the reset"
    assert refresh(env, web, agent_key(web))[0] == 401, "and the old key renews nothing"
    status, again = enroll_iid(env, web, key=fresh)
    assert status == 200, again
    assert bundle_status(env, web, again["token"]) == 200
    (rec,) = audits(env, "agent-key.reset", web)
    assert rec.principal == ONBOARDING and rec.reason == "disk replaced, CHG-12"
    assert rec.detail["agent_key"] == out["agent_key_dropped"] and rec.detail["token_revoked"] is True
    # the new key is bound now: the old one (say, a copy someone kept) is refused in turn
    status, body = enroll_iid(env, web)
    assert status == 401 and "another agent key" in body["detail"]


def test_attack_an_identity_document_replayed_after_a_reset_binds_only_the_key_the_operator_named(env: Env) -> None:
    """An instance identity document never expires and has no nonce; copies sit in logs and
    backups. After a reset, whoever first presents one binds their key, unless the operator names
    the reinstalled agent's key (its whole fingerprint, read on the host)."""
    from ringfence.control.credentials import agent_key_fingerprint, agent_key_id

    est = boot(env)
    web = est["ids"]["web"][0]
    env.bind(ONBOARDING, ["onboarding"])
    assert enroll_iid(env, web)[0] == 200
    copied = iid_document(env, web)  # the document as a log or a backup kept it
    fresh = AgentKey()  # the reinstalled agent: its first try is refused
    assert enroll_iid(env, web, key=fresh)[0] == 401
    named = agent_key_fingerprint(fresh.pem)  # as its `ringfence-agent status` shows it on the host
    path = f"/admin/workloads/{web}/agent-key"
    for bad in ("not-a-key-id", agent_key_id(fresh.pem)):  # the 64-bit id is no longer enough to name a key
        status, _, out = env.rest("admin", "DELETE", path, {"next_agent_key": bad}, principal=ONBOARDING)
        assert status == 422 and "next_agent_key" in out["detail"], out
    assert env.store.agent_key(web) is not None, "a bad request resets nothing"
    body = {"reason": "CHG-12 root volume replaced", "next_agent_key": named}
    status, _, out = env.rest("admin", "DELETE", path, body, principal=ONBOARDING)
    assert status == 200 and out["next_agent_key"] == named, out
    thief = AgentKey()
    status, body = enroll_iid(env, web, copied, key=thief)
    assert status == 401 and "not the one named" in body["detail"], body
    assert env.store.agent_key(web) is None, "the replayed document bound nothing"
    assert [r.detail["reason"] for r in audits(env, "agent.enroll.refused", web)][-1] == (
        "not the agent key the operator's reset named"
    )
    status, again = enroll_iid(env, web, key=fresh)
    assert status == 200 and bundle_status(env, web, again["token"]) == 200, again
    status, body = enroll_iid(env, web, copied, key=thief)
    assert status == 401, "and after it, the first binding holds as before"
    (reset,) = audits(env, "agent-key.reset", web)
    assert reset.detail["next_agent_key"] == named


def test_attack_a_replayed_document_racing_a_reset_that_names_the_next_key_binds_nothing(
    env: Env, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The thief's enrollment with a copied identity document read "no key named" just before the
    operator's reset named the reinstalled agent's key, and binds after the reset dropped the old
    one. The store checks the named key in the same atomic step as the binding: the thief binds
    nothing, and the named agent enrolls (an independent review won this race before)."""
    from ringfence.control.credentials import agent_key_fingerprint

    est = boot(env)
    web = est["ids"]["web"][0]
    env.bind(ONBOARDING, ["onboarding"])
    assert enroll_iid(env, web)[0] == 200
    copied = iid_document(env, web)
    fresh, thief = AgentKey(), AgentKey()
    store_cls = type(env.store)
    real_bind = store_cls.bind_agent_key
    resets: list[int] = []

    def reset_then_bind(self: Any, wid: str, pem: str, *args: Any, **kwargs: Any) -> str:
        if not resets and pem == thief.pem:  # the reset lands between the check and the binding
            body = {"reason": "disk replaced", "next_agent_key": agent_key_fingerprint(fresh.pem)}
            path = f"/admin/workloads/{wid}/agent-key"
            resets.append(env.rest("admin", "DELETE", path, body, principal=ONBOARDING)[0])
        return str(real_bind(self, wid, pem, *args, **kwargs))

    monkeypatch.setattr(store_cls, "bind_agent_key", reset_then_bind)
    status, body = enroll_iid(env, web, copied, key=thief)
    assert resets == [200]
    assert status == 401 and "not the one named" in body["detail"], body
    assert env.store.agent_key(web) is None, "the thief's key is not bound"
    status, again = enroll_iid(env, web, key=fresh)
    assert status == 200 and bundle_status(env, web, again["token"]) == 200, again


def pause_after_the_key_check(monkeypatch: pytest.MonkeyPatch) -> tuple[threading.Event, threading.Event]:
    """A token renewal stops after it checked the agent key, before it issues its token: the
    first event is set once it has checked, and it goes on once the second is set."""
    from ringfence.control.agents import AgentApi

    checked, go = threading.Event(), threading.Event()
    real = AgentApi._not_running

    def paused(self: AgentApi, workload_id: str) -> str | None:
        checked.set()
        assert go.wait(30)
        return real(self, workload_id)

    monkeypatch.setattr(AgentApi, "_not_running", paused)
    return checked, go


def test_attack_a_token_renewal_racing_an_agent_key_reset_authorizes_nothing(
    env: Env, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The agent key was stolen; the operator resets it while the thief's renewal is in flight
    (the renewal checked the key before the reset and writes its token after). Before, that token
    authorized for its whole lifetime (an independent review won this race 15 times in 20); a
    token now holds only while the key it was issued under is bound (DynamoDB, as deployed)."""
    est = boot(env)
    web = est["ids"]["web"][0]
    env.bind(ONBOARDING, ["onboarding"])
    assert enroll_iid(env, web)[0] == 200
    stolen = agent_key(web)
    checked, go = pause_after_the_key_check(monkeypatch)
    out: dict[str, tuple[int, Any]] = {}
    renewal = threading.Thread(target=lambda: out.update(renewed=refresh(env, web, stolen)))
    renewal.start()
    assert checked.wait(30), "the renewal checked the stolen key"
    path = f"/admin/workloads/{web}/agent-key"
    status, _, reset = env.rest("admin", "DELETE", path, {"reason": "key stolen"}, principal=ONBOARDING)
    assert status == 200 and reset["agent_key_dropped"], reset
    go.set()
    renewal.join(30)
    status, body = out["renewed"]
    assert status == 401 and "was reset" in body["detail"], body
    assert not audits(env, "token.refresh", web), "no token issued"
    fresh = AgentKey()  # the instance's agent, reinstalled
    status, again = enroll_iid(env, web, key=fresh)
    assert status == 200 and bundle_status(env, web, again["token"]) == 200, again


def test_attack_reader_or_incident_responder_cannot_reset_an_agent_key(env: Env) -> None:
    est = boot(env)
    web = est["ids"]["web"][0]
    token = enroll_iid(env, web)[1]["token"]
    env.bind(RESPONDER, ["incident-responder"])
    env.bind(READER, ["reader"])
    for who in (RESPONDER, READER):
        status, _, body = env.rest("admin", "DELETE", f"/admin/workloads/{web}/agent-key", {}, principal=who)
        assert status == 403 and "agent-key.reset" in body["detail"], body
    assert bundle_status(env, web, token) == 200, "the token still works"
    assert env.store.agent_key(web) == agent_key(web).pem, "the key is still bound"
    denied = [(r.principal, r.detail["action"]) for r in env.store.audit_log() if r.action == "admin.denied"]
    assert denied == [(RESPONDER, "agent-key.reset"), (READER, "agent-key.reset")]
    # an unknown workload: 404 for who may reset
    env.bind(ONBOARDING, ["onboarding"])
    assert env.rest("admin", "DELETE", "/admin/workloads/i-0nothere/agent-key", {}, principal=ONBOARDING)[0] == 404


def test_attack_a_pairing_key_minted_before_the_index_enrolls_nothing(pairing_on: Env) -> None:
    """A pairing key minted before the ``pairingof#<workload>`` index existed (its ``pairing#``
    item alone, as the old code wrote it) is one no revocation finds: before, it still enrolled
    after the operator revoked the workload's pairing keys, until its TTL. Now a key enrolls only
    if its index item exists, so such a key spends nothing, binds nothing and issues no token."""
    from ringfence.control.api import secret_hash

    env = pairing_on
    wid = "dc1-db-1"
    register_onprem(env, wid, "192.168.10.5")
    state = env.ddb.Table("rf-state")
    legacy = f"pairing#{secret_hash('leaked-legacy-key')}"
    ttl = int(time.time()) + 3600
    state.put_item(Item={"pk": legacy, "sk": "pairing", "ttl": ttl, "uses": 3, "workload_id": wid})
    env.bind(ONBOARDING, ["onboarding"])
    path = f"/admin/workloads/{wid}/pairing-keys"
    status, _, out = env.rest("admin", "DELETE", path, {"reason": "key leaked"}, principal=ONBOARDING)
    assert status == 200, out
    status, body = enroll_pairing(env, wid, "leaked-legacy-key")
    assert status == 401 and "pairing key" in body["detail"], body
    assert env.store.agent_key(wid) is None, "nothing bound"
    assert "Item" not in state.get_item(Key={"pk": f"tokenof#{wid}", "sk": "token"}), "no token issued"
    assert state.get_item(Key={"pk": legacy, "sk": "pairing"}).get("Item", {}).get("uses", 3) == 3, "nothing spent"
    # a key minted now (indexed) still enrolls
    status, _, key = env.rest("admin", "POST", "/admin/pairing-keys", {"workload_id": wid, "uses": 1, "ttl": 600})
    assert status == 201, key
    status, body = enroll_pairing(env, wid, key["pairing_key"])
    assert status == 200, body
    assert bundle_status(env, wid, body["token"]) == 404, "its token authorizes (no bundle computed yet)"


# --- the agent key's text: one key, read one way -----------------------------------------------------


def two_keys(signer: AgentKey, named: str, header: str = "Proc-Type: 4,ENCRYPTED") -> str:
    """``signer``'s key in a block with an RFC 1421 header line (cryptography reads it, a reader of
    the first plain block skips it), then the ``named`` key: which key is this text?"""
    return signer.pem.replace("-----BEGIN PUBLIC KEY-----\n", f"-----BEGIN PUBLIC KEY-----\n{header}\n\n") + named


def iid_request(env: Env, wid: str, doc: str, signer: AgentKey, text: str) -> dict[str, Any]:
    """An aws-iid enrollment with a fresh nonce presenting the key text ``text``, signed by ``signer``."""
    n = nonce(env)
    return {
        "method": "aws-iid",
        "nonce": n,
        "document": doc,
        "document_signature": env.iid.sign(doc),
        "agent_key": text,
        "agent_signature": signer.prove("enroll", wid, n),
    }


def test_attack_a_key_text_holding_the_bound_key_and_the_attackers_does_not_take_over_the_workload(env: Env) -> None:
    """A captured identity document and the enrolled agent's public key (no secret) used to take
    the workload over: the signature was checked with the attacker's block, the binding, token
    and audit with the victim's. Now a text with anything but one key is refused before any check."""
    est = boot(env)
    web = est["ids"]["web"][0]
    doc = iid_document(env, web)
    status, body = enroll_iid(env, web, doc)
    assert status == 200, body
    victim_token = body["token"]
    attacker = AgentKey()
    status, answer = enroll(env, iid_request(env, web, doc, attacker, two_keys(attacker, agent_key(web).pem)))
    assert status in (400, 422) and "one Ed25519 public key" in json.dumps(answer), (status, answer)
    # either order, a comment line around it, another key type: one key and nothing else
    for text in (
        agent_key(web).pem + attacker.pem,
        "note\n" + agent_key(web).pem,
        two_keys(attacker, agent_key(web).pem, header="X-Y: z"),
    ):
        status, answer = enroll(env, iid_request(env, web, doc, attacker, text))
        assert status in (400, 422), (status, answer)
    assert bundle_status(env, web, victim_token) == 200, "the enrolled agent's token was revoked"
    assert len(audits(env, "agent.enroll", web)) == 1
    # the agent's own key, written with other line breaks, is the same key (one text per key)
    crlf = agent_key(web).pem.replace("\n", "\r\n")
    status, body = enroll_iid(env, web, doc)
    assert status == 200, body
    status, body = enroll(env, iid_request(env, web, doc, agent_key(web), crlf))
    assert status == 200, body
    assert env.store.agent_key(web) == agent_key(web).pem


def test_attack_an_agent_key_of_another_type_is_refused_not_an_error(env: Env) -> None:
    """An RSA block (with a header line) before an Ed25519 one, or a block that is no key at all:
    a clear refusal, never an exception escaping the unauthenticated enroll route."""
    from cryptography.hazmat.primitives import serialization
    from cryptography.hazmat.primitives.asymmetric import rsa

    est = boot(env)
    web = est["ids"]["web"][0]
    doc = iid_document(env, web)
    rsa_pem = (
        rsa.generate_private_key(public_exponent=65537, key_size=2048)
        .public_key()
        .public_bytes(serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo)
        .decode()
    )
    mine = AgentKey()
    for text in (
        rsa_pem,
        rsa_pem.replace("-----BEGIN PUBLIC KEY-----\n", "-----BEGIN PUBLIC KEY-----\nX-Y: z\n\n") + mine.pem,
        "-----BEGIN PUBLIC KEY-----\nAAAA\n-----END PUBLIC KEY-----\n",
    ):
        status, answer = enroll(env, iid_request(env, web, doc, mine, text))
        assert status in (400, 422) and "one Ed25519 public key" in json.dumps(answer), (status, answer)
    assert env.store.agent_key(web) is None


def test_attack_an_identity_document_from_an_earlier_run_of_the_instance_enrolls_nothing(env: Env) -> None:
    """A copy of the document saved before the instance was stopped and started (from a backup,
    a log, an AMI built from it) names a start that is no longer the instance's: it binds no key,
    even to an instance whose agent has not enrolled yet. The document of this run enrolls."""
    est = boot(env)
    web = est["ids"]["web"][0]
    inst = env.ec2.describe_instances(InstanceIds=[web])["Reservations"][0]["Instances"][0]
    earlier = (inst["LaunchTime"] - datetime.timedelta(days=3)).strftime("%Y-%m-%dT%H:%M:%SZ")
    thief = AgentKey()
    status, body = enroll_iid(env, web, iid_document(env, web, pending=earlier), key=thief)
    assert status == 401 and "from an earlier run" in body["detail"], body
    assert env.store.agent_key(web) is None
    # a few seconds apart (EC2 stamps the two in different places): the same start
    close = (inst["LaunchTime"] - datetime.timedelta(seconds=20)).strftime("%Y-%m-%dT%H:%M:%SZ")
    status, body = enroll_iid(env, web, iid_document(env, web, pending=close))
    assert status == 200, body
