"""Agent API (docs/agent-api.md) and admin API against the moto-backed control plane."""

from __future__ import annotations

import contextlib
import json
import time
from collections.abc import Callable
from typing import Any

import pytest

from ringfence import agentapi
from ringfence.bundle import Bundle
from ringfence.control.admin import Admin
from tests.aws.conftest import ACCOUNT, REGION, Env, LambdaContext, ip_of, rest_answer, rest_event
from tests.aws.test_pipeline import (
    AgentKey,
    _ctx,
    _scheduled,
    agent_key,
    boot,
    bridge,
    covered,
    enroll_iid,
    enroll_instance,
    iid_document,
    in_set,
)


def auth(token: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {token}"}


def test_iid_enrollment_then_own_bundle_only(env: Env) -> None:
    est = boot(env)
    web, db = est["ids"]["web"][0], est["ids"]["db"][0]
    status, body = enroll_iid(env, web)
    assert status == 200, body
    resp = agentapi.EnrollResponse.model_validate(body)
    assert resp.workload_id == web and "BEGIN PUBLIC KEY" in resp.public_key_pem
    status, hdrs, doc = env.rest("agentapi", "GET", f"/v1/agents/{web}/bundle", headers=auth(resp.token))
    assert status == 200 and doc["workload_id"] == web
    etag = hdrs["etag"]
    assert etag.startswith(f'"{doc["version"]}-')  # version and the stored bytes: a refresh is a new ETag
    status, _, _ = env.rest(
        "agentapi", "GET", f"/v1/agents/{web}/bundle", headers={**auth(resp.token), "If-None-Match": etag}
    )
    assert status == 304
    # another workload's bundle: 403
    status, _, err = env.rest("agentapi", "GET", f"/v1/agents/{db}/bundle", headers=auth(resp.token))
    assert status == 403 and err["error"] == "forbidden"
    status, _, _ = env.rest("agentapi", "GET", f"/v1/agents/{web}/bundle", headers=auth("not-a-token"))
    assert status == 401


def test_same_document_and_key_re_enroll_another_key_is_refused(env: Env) -> None:
    est = boot(env)
    web = est["ids"]["web"][0]
    doc = iid_document(env, web)
    assert enroll_iid(env, web, doc)[0] == 200
    status, body = enroll_iid(env, web, doc)  # fresh nonce, same document, the same agent key
    assert status == 200, "the bound agent re-enrolls (no 28-day replay lock-out)"
    status, body = enroll_iid(env, web, doc, key=AgentKey())
    assert status == 401 and "another agent key" in body["detail"]


def test_forged_document_and_reused_nonce_are_rejected(env: Env) -> None:
    est = boot(env)
    web, db = est["ids"]["web"][0], est["ids"]["db"][0]
    doc = iid_document(env, web)
    forged = doc.replace(web, db)
    status, body = enroll_iid(env, db, forged, env.iid.sign(doc))
    assert status == 401 and "does not verify" in body["detail"]
    _, _, n = env.rest("agentapi", "GET", "/v1/nonce")
    key = agent_key(web)
    req = {
        "method": "aws-iid",
        "nonce": n["nonce"],
        "document": doc,
        "document_signature": env.iid.sign(doc),
        "agent_key": key.pem,
        "agent_signature": key.prove("enroll", web, n["nonce"]),
    }
    assert env.rest("agentapi", "POST", "/v1/enroll", json.dumps(req))[0] == 200
    doc2 = iid_document(env, db)
    req2 = {
        "method": "aws-iid",
        "nonce": n["nonce"],
        "document": doc2,
        "document_signature": env.iid.sign(doc2),
        "agent_key": agent_key(db).pem,
        "agent_signature": agent_key(db).prove("enroll", db, n["nonce"]),
    }
    status, _, body = env.rest("agentapi", "POST", "/v1/enroll", json.dumps(req2))
    assert status == 401 and "nonce" in body["detail"]


@pytest.fixture
def pairing_on(env: Env, monkeypatch: pytest.MonkeyPatch) -> Env:
    """The AWS stack with pairing enabled (off by default: RINGFENCE_ENROLL_METHODS)."""
    monkeypatch.setenv("RINGFENCE_ENROLL_METHODS", "aws-iid,aws-sts,pairing")
    env.load_functions()
    return env


def test_the_aws_stack_has_pairing_off_by_default(env: Env) -> None:
    register_onprem(env, "dc1-db-1", "192.168.10.5")
    status, _, key = env.rest("admin", "POST", "/admin/pairing-keys", {"workload_id": "dc1-db-1", "uses": 1, "ttl": 60})
    assert status == 201
    status, body = enroll_pairing(env, "dc1-db-1", key["pairing_key"])
    assert status == 400 and "not enabled" in body["detail"]


def register_onprem(env: Env, wid: str, ip: str) -> None:
    from ringfence.model import Workload
    from ringfence.store.base import InventoryRecord

    w = Workload(
        id=wid,
        ips=[ip],
        tags={"ringfence:role": "database", "ringfence:app": "ordering", "ringfence:env": "prod"},
        site="dc1",
    )
    assert w.cloud == "onprem"
    env.store.observe(InventoryRecord(id=wid, workload=w, observed_at=time.time()))


def enroll_pairing(env: Env, wid: str, key: str) -> tuple[int, Any]:
    _, _, n = env.rest("agentapi", "GET", "/v1/nonce")
    req = {"method": "pairing", "nonce": n["nonce"], "workload_id": wid, "pairing_key": key}
    req.update(AgentKey().enroll_fields(wid, n["nonce"]))
    status, _, body = env.rest("agentapi", "POST", "/v1/enroll", json.dumps(req))
    return status, body


def test_pairing_key_enrolls_only_its_workload_a_limited_number_of_times(pairing_on: Env) -> None:
    env = pairing_on
    register_onprem(env, "dc1-db-1", "192.168.10.5")
    register_onprem(env, "dc1-db-2", "192.168.10.6")
    status, _, key = env.rest(
        "admin", "POST", "/admin/pairing-keys", {"workload_id": "dc1-db-1", "uses": 2, "ttl": 600}
    )
    assert status == 201 and key["workload_id"] == "dc1-db-1", key
    # a key issued for dc1-db-1 never enrolls another id, and trying spends nothing
    status, body = enroll_pairing(env, "dc1-db-2", key["pairing_key"])
    assert status == 401 and "not issued for dc1-db-2" in body["detail"]
    for _ in range(2):
        status, body = enroll_pairing(env, "dc1-db-1", key["pairing_key"])
        assert status == 200 and body["workload_id"] == "dc1-db-1", body
    status, body = enroll_pairing(env, "dc1-db-1", key["pairing_key"])
    assert status == 401 and "used up" in body["detail"], "a used-up key is refused"
    assert env.store.get("dc1-db-1").enrolled  # type: ignore[union-attr]


def test_expired_pairing_key_is_refused(pairing_on: Env) -> None:
    env = pairing_on
    from ringfence.control.api import secret_hash

    register_onprem(env, "dc1-db-1", "192.168.10.5")
    env.store.put_pairing(secret_hash("old-key"), "dc1-db-1", uses=5, ttl=-1)
    status, body = enroll_pairing(env, "dc1-db-1", "old-key")
    assert status == 401 and "expired" in body["detail"]


def test_pairing_is_refused_for_cloud_instances(pairing_on: Env) -> None:
    env = pairing_on
    from ringfence.control.api import secret_hash

    est = boot(env)
    web = est["ids"]["web"][0]
    status, _, body = env.rest("admin", "POST", "/admin/pairing-keys", {"workload_id": web, "uses": 1, "ttl": 600})
    assert status == 409 and "cloud identity" in body["detail"], "no key is minted for an EC2 instance"
    status, _, body = env.rest("admin", "POST", "/admin/pairing-keys", {"workload_id": "nobody", "uses": 1, "ttl": 600})
    assert status == 404
    status, _, body = env.rest("admin", "POST", "/admin/pairing-keys", {"uses": 1, "ttl": 600})
    assert status == 422, "a pairing key is issued for one workload"
    # even a key bound to the instance's id (stored before the instance was known) does not enroll it
    env.store.put_pairing(secret_hash("k"), web, uses=1, ttl=600)
    status, body = enroll_pairing(env, web, "k")
    # the answer of any refused pairing key: it tells no one which ids are cloud instances
    assert status == 401 and "pairing key is unknown" in body["detail"], body
    assert env.store.use_pairing(secret_hash("k"), web, agent_key=AgentKey().pem), "the refused attempt spent nothing"


def test_deltas_since_and_409_when_rules_changed(env: Env) -> None:
    est = boot(env)
    proc = est["ids"]["proc"][0]
    tok = enroll_instance(env, proc)
    old = env.bundle(proc)
    v0 = old.version
    new = est["run"]("web", est["subnets"]["web"], 1)[0]
    env.put(env.state_event(new, "running"))
    env.pump()
    status, _, body = env.rest(
        "agentapi", "GET", f"/v1/agents/{proc}/deltas", headers=auth(tok), query={"since": str(v0)}
    )
    assert status == 200
    resp = agentapi.DeltasResponse.model_validate(body)
    assert resp.bundle_version > v0 and resp.deltas
    # applied to the agent's bundle, the deltas give exactly the published sets, now covering the
    # new web server (a /32, or inside a wider canonical cover)
    current = env.bundle(proc)
    bridged = bridge(env, old, resp.deltas)
    assert bridged == {n: set(s.v4) | set(s.v6) for n, s in current.sets.items()}
    assert not in_set(old, ip_of(env, new)) and covered(bridged, ip_of(env, new))
    # the processing tier's own rules change when it is re-tagged dev → deltas cannot bridge
    env.ec2.create_tags(Resources=[proc], Tags=[{"Key": "ringfence:env", "Value": "dev"}])
    env.put(env.state_event(proc, "running"))
    env.pump()
    status, _, _ = env.rest("agentapi", "GET", f"/v1/agents/{proc}/deltas", headers=auth(tok), query={"since": str(v0)})
    assert status == 409


def test_heartbeat_offline_after_timeout_leaves_peer_sets(env: Env) -> None:
    est = boot(env)
    proc, db = est["ids"]["proc"][0], est["ids"]["db"][0]
    tok = enroll_instance(env, proc)
    hb = {"applied_version": 1, "mode": "enforce"}
    status, _, body = env.rest("agentapi", "POST", f"/v1/agents/{proc}/heartbeat", hb, headers=auth(tok))
    assert status == 200 and body["latest_version"] >= 1
    # silence shorter than the timeout: nothing changes
    rec = env.fn["reconcile"]
    out = rec.handler(_scheduled(), _ctx())
    assert proc not in out["offline"]
    # silence longer than the timeout: offline, removed from the database's set
    env.store.set_liveness(proc, heartbeat=time.time() - 3600)
    out = rec.handler(_scheduled(), _ctx())
    assert proc in out["offline"]
    env.pump()
    assert not in_set(env.bundle(db), ip_of(env, proc))
    # it comes back: rejoins
    env.rest("agentapi", "POST", f"/v1/agents/{proc}/heartbeat", hb, headers=auth(tok))
    env.pump()
    assert in_set(env.bundle(db), ip_of(env, proc))


def test_heartbeats_rewrite_the_inventory_liveness_only_once_it_is_stale(env: Env) -> None:
    """A heartbeat right after the enrollment (which recorded the agent's liveness) writes only
    what the agent says it enforces; once the recorded heartbeat is older than a tenth of the
    offline bound (at most a minute), the next heartbeat records it again."""
    writes: list[str] = []  # the tables the control plane's UpdateItem calls name
    env.hook("before-parameter-build.dynamodb.UpdateItem", lambda params, **_: writes.append(params["TableName"]))
    est = boot(env)
    proc = est["ids"]["proc"][0]
    tok = enroll_instance(env, proc)
    enrolled_at = env.store.get(proc).last_heartbeat
    assert enrolled_at is not None
    writes.clear()
    hb = {"applied_version": 1, "mode": "enforce"}
    status, _, _ = env.rest("agentapi", "POST", f"/v1/agents/{proc}/heartbeat", hb, headers=auth(tok))
    assert status == 200
    assert env.store.inventory.name not in writes, "no liveness write while the recorded one is fresh"
    assert env.store.get(proc).last_heartbeat == enrolled_at
    report = env.store.enforcement(proc)
    assert report is not None and report.time > enrolled_at and report.version == 1, "what it says is kept"
    env.store.set_liveness(proc, heartbeat=time.time() - 61)
    before = time.time()
    status, _, _ = env.rest("agentapi", "POST", f"/v1/agents/{proc}/heartbeat", hb, headers=auth(tok))
    assert status == 200
    assert env.store.inventory.name in writes, "the hook sees the handler's writes"
    assert (env.store.get(proc).last_heartbeat or 0) >= before, "stale: recorded again"


def test_reports_validated_and_size_limited(env: Env) -> None:
    est = boot(env)
    web = est["ids"]["web"][0]
    tok = enroll_instance(env, web)
    now = time.time()  # recent: the route refuses flows older than the retention (backdated)
    good = {
        "flows": [
            {
                "start": now - 60,
                "end": now - 59,
                "src": ip_of(env, web),  # its own address: records with neither end its own are not kept
                "dst": "10.1.2.1",
                "proto": "tcp",
                "dport": 443,
                "direction": "outbound",
            }
        ]
    }
    assert env.rest("agentapi", "POST", f"/v1/agents/{web}/reports", good, headers=auth(tok))[0] == 202
    bad = {"flows": [{"start": 1}]}
    status, _, body = env.rest("agentapi", "POST", f"/v1/agents/{web}/reports", bad, headers=auth(tok))
    assert status == 422 and "body.flows.0.end" in body["detail"], body
    huge = json.dumps({"flows": [], "drops": [], "pad": "x" * (agentapi.MAX_REPORT_BYTES + 1)})
    assert env.rest("agentapi", "POST", f"/v1/agents/{web}/reports", huge, headers=auth(tok))[0] == 413
    keys = env.s3.list_objects_v2(Bucket=env.bucket, Prefix=f"reports/{web}/")["KeyCount"]
    assert keys == 1


def test_admin_quarantine_mode_and_audit(env: Env) -> None:
    est = boot(env)
    web, proc = est["ids"]["web"][0], est["ids"]["proc"][0]
    bob = "arn:aws:iam::123456789012:role/secops/bob"
    env.bind(bob, ["incident-responder", "policy-author"])
    status, _, _body = env.rest(
        "admin", "POST", f"/admin/workloads/{web}/quarantine", {"reason": "ir-42"}, principal=bob
    )
    assert status == 200
    env.pump()
    q = env.bundle(web)
    assert q.quarantined and not q.inbound and not q.outbound
    assert not in_set(env.bundle(proc), ip_of(env, web)), "peers drop a quarantined workload"
    status, _, _ = env.rest("admin", "PUT", f"/admin/workloads/{proc}/mode", {"mode": "observe"}, principal=bob)
    assert status == 200
    env.pump()
    assert env.bundle(proc).mode == "observe"
    status, _, body = env.rest("admin", "PUT", f"/admin/workloads/{proc}/mode", {"mode": "bogus"})
    assert status == 422 and "body.mode" in body["detail"], body
    env.rest("admin", "DELETE", f"/admin/workloads/{web}/quarantine", {"reason": "cleared"}, principal=bob)
    env.pump()
    assert not env.bundle(web).quarantined
    log = env.store.audit_log()
    actions = [(r.action, r.principal, r.target) for r in log]
    assert ("policy.provision", "arn:aws:iam::123456789012:user/alice", "policy/v1") in actions
    assert ("workload.quarantine", bob, web) in actions and ("workload.release", bob, web) in actions
    assert ("workload.mode", bob, proc) in actions


def test_bad_policy_is_rejected_and_not_provisioned(env: Env) -> None:
    status, _, body = env.rest(
        "admin",
        "POST",
        "/admin/policies",
        {"files": {"x.yaml": "rulesets: [{name: a, rules: [{from: 'role ==', to: x, services: [web]}]}]"}},
    )
    assert status == 400 and body["error"] == "policy rejected"
    assert env.store.active_policy() is None and env.store.audit_log() == []


def test_policy_file_names_that_are_not_their_own_normal_form_are_refused_and_not_provisioned(
    env: Env, aws_wiring: Callable[[], Any]
) -> None:
    """The Lambda answers as ``ringfence serve`` does (the same request model): 422 naming the
    file, nothing published or numbered; the service refuses them too (400), for any caller."""
    files = {"boundaries.yaml": "rulesets: []\n", "/boundaries.yaml": "rulesets: []\n"}
    status, _, body = env.rest("admin", "POST", "/admin/policies", {"files": files})
    assert status == 422 and "'/boundaries.yaml'" in body["detail"], body
    r = Admin(aws_wiring()).provision("alice", {"a.yaml": "rulesets: []\n", "A.yaml": "rulesets: []\n"})
    assert r.status == 400 and "'A.yaml' differs from 'a.yaml' only in case" in str(r.body), r.body
    listed = env.s3.list_objects_v2(Bucket=env.bucket, Prefix="policies/")
    assert listed.get("KeyCount", 0) == 0
    assert env.store.active_policy() is None and env.store.audit_log() == []
    assert env.rest("admin", "POST", "/admin/policies", {"files": {"p.yaml": "rulesets: []\n"}})[2]["version"] == 1


def test_cold_start_keeps_versions_monotonic(env: Env) -> None:
    est = boot(env)
    db = est["ids"]["db"][0]
    v1 = env.bundle(db).version
    env.load_functions()  # a new container: the engine is rebuilt from the inventory
    env.ec2.create_tags(Resources=[est["ids"]["proc"][1]], Tags=[{"Key": "ringfence:env", "Value": "dev"}])
    env.put(env.state_event(est["ids"]["proc"][1], "running"))
    env.pump()
    v2 = env.bundle(db).version
    assert v2 > v1
    assert env.store.head().clean


def test_websocket_nudge_reaches_a_connected_agent(env: Env, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("RINGFENCE_WEBSOCKET_ENDPOINT", env.url)  # not left for later tests
    env.load_functions()
    est = boot(env)
    proc = est["ids"]["proc"][0]
    tok = enroll_instance(env, proc)

    def connect(token: str | None) -> dict[str, Any]:
        event = {
            "requestContext": {"routeKey": "$connect", "connectionId": "conn-1", "eventType": "CONNECT", "stage": "v1"},
            "queryStringParameters": None,
            "headers": {"Authorization": f"Bearer {token}"} if token else {},
            "isBase64Encoded": False,
        }
        return env.fn["wsconnect"].handler(event, _ctx())  # type: ignore[no-any-return]

    assert connect("bogus")["statusCode"] == 401
    assert connect(tok)["statusCode"] == 200
    new = est["run"]("web", est["subnets"]["web"], 1)[0]
    env.put(env.state_event(new, "running"))
    env.pump()
    data = env.aws.connection_data("conn-1")
    last = json.loads("{" + data.decode().split("{")[-1])
    assert last["latest_version"] == env.bundle(proc).version


def test_expired_deltas_make_the_api_ask_compute_for_a_whole_bundle(env: Env) -> None:
    est = boot(env)
    proc = est["ids"]["proc"][0]
    tok = enroll_instance(env, proc)
    new = est["run"]("web", est["subnets"]["web"], 1)[0]
    env.put(env.state_event(new, "running"))
    env.pump()
    # the delta index expired (TTL) before this agent caught up from its stored bundle
    table = env.ddb.Table("rf-state")
    for item in table.scan()["Items"]:
        if item["pk"].startswith("delta#"):
            table.delete_item(Key={"pk": item["pk"], "sk": item["sk"]})
    status, _, old = env.rest("agentapi", "GET", f"/v1/agents/{proc}/bundle", headers=auth(tok))
    assert status == 200 and not in_set(Bundle.model_validate(old), ip_of(env, new))
    status, _, _ = env.rest(
        "agentapi", "GET", f"/v1/agents/{proc}/deltas", None, auth(tok), {"since": str(old["version"])}
    )
    assert status == 409
    env.pump()  # compute re-renders (and signs) the whole bundle
    status, _, doc = env.rest("agentapi", "GET", f"/v1/agents/{proc}/bundle", headers=auth(tok))
    assert status == 200
    got = Bundle.model_validate(doc)
    assert got.version == env.fn["compute"].service().engine.bundle_version(proc)
    assert in_set(got, ip_of(env, new))


EC2_ONLY_TRUST = {
    "Version": "2012-10-17",
    "Statement": [{"Effect": "Allow", "Principal": {"Service": "ec2.amazonaws.com"}, "Action": "sts:AssumeRole"}],
}


def give_instance_profile(
    env: Env, iid: str, role: str = "web-instance-role", trust: dict[str, Any] | None = None
) -> str:
    """An instance profile holding ``role`` (created with ``trust``, by default EC2's alone),
    attached to the instance (as EC2 launches it)."""
    import boto3

    iam = boto3.client("iam")
    trust = trust or EC2_ONLY_TRUST
    with contextlib.suppress(iam.exceptions.EntityAlreadyExistsException):
        iam.create_role(RoleName=role, AssumeRolePolicyDocument=json.dumps(trust))
    profile = f"{role}-profile"
    with contextlib.suppress(iam.exceptions.EntityAlreadyExistsException):
        iam.create_instance_profile(InstanceProfileName=profile)
        iam.add_role_to_instance_profile(InstanceProfileName=profile, RoleName=role)
    env.ec2.associate_iam_instance_profile(IamInstanceProfile={"Name": profile}, InstanceId=iid)
    return role


def sts_request(
    env: Env,
    iid: str,
    nonce: str,
    sign_nonce: bool = True,
    role: str = "web-instance-role",
    creds: dict[str, Any] | None = None,
) -> dict[str, Any]:
    """What an agent sends for aws-sts: a GetCallerIdentity signed with its instance-profile
    credentials (here: an assumed-role session named after the instance, as EC2 does; or
    ``creds``, an AssumeRole answer's)."""
    import boto3
    from botocore.auth import SigV4Auth
    from botocore.awsrequest import AWSRequest
    from botocore.credentials import Credentials

    if creds is None:
        creds = boto3.client("sts").assume_role(RoleArn=f"arn:aws:iam::{ACCOUNT}:role/{role}", RoleSessionName=iid)[
            "Credentials"
        ]
    url = f"{env.url}/?Action=GetCallerIdentity&Version=2011-06-15"
    req = AWSRequest(method="GET", url=url, headers={"X-Ringfence-Nonce": nonce} if sign_nonce else {})
    SigV4Auth(
        Credentials(creds["AccessKeyId"], creds["SecretAccessKey"], creds["SessionToken"]), "sts", REGION
    ).add_auth(req)
    headers = dict(req.headers.items())
    headers["X-Ringfence-Nonce"] = nonce
    key = agent_key(iid)  # the agent's own key, bound at the first enrollment
    return {
        "method": "aws-sts",
        "nonce": nonce,
        "sts_url": url,
        "sts_headers": headers,
        "agent_key": key.pem,
        "agent_signature": key.prove("enroll", iid, nonce),
    }


@pytest.fixture
def sts_env(env: Env, monkeypatch: pytest.MonkeyPatch) -> Env:
    """The agent API allowing exactly the loopback moto server as its STS endpoint (production:
    AWS's STS host names only)."""
    monkeypatch.setenv("RINGFENCE_STS_ENDPOINTS", env.url)
    monkeypatch.setenv("RINGFENCE_ENROLL_METHODS", "aws-iid,aws-sts")  # off by default
    env.load_functions()
    return env


def test_sts_enrollment_binds_the_nonce_and_refuses_replays(sts_env: Env) -> None:
    env = sts_env
    est = boot(env)
    web = est["ids"]["web"][0]
    give_instance_profile(env, web)
    _, _, n = env.rest("agentapi", "GET", "/v1/nonce")
    req = sts_request(env, web, n["nonce"])
    status, _, body = env.rest("agentapi", "POST", "/v1/enroll", json.dumps(req))
    assert status == 200 and body["workload_id"] == web, body
    status, _, body = env.rest("agentapi", "POST", "/v1/enroll", json.dumps(req))
    assert status == 401 and "nonce" in body["detail"], "a replayed signed request is refused"
    _, _, n2 = env.rest("agentapi", "GET", "/v1/nonce")
    unsigned = sts_request(env, web, n2["nonce"], sign_nonce=False)
    status, _, body = env.rest("agentapi", "POST", "/v1/enroll", json.dumps(unsigned))
    assert status == 401 and "signed" in body["detail"]
    elsewhere = dict(req, nonce=n2["nonce"], sts_url="https://evil.example.com/?Action=GetCallerIdentity")
    elsewhere["sts_headers"] = dict(req["sts_headers"], **{"X-Ringfence-Nonce": n2["nonce"]})
    status, _, body = env.rest("agentapi", "POST", "/v1/enroll", json.dumps(elsewhere))
    assert status == 401 and "STS endpoint" in body["detail"]
    _, _, n3 = env.rest("agentapi", "GET", "/v1/nonce")
    human = sts_request(env, "alice", n3["nonce"])
    status, _, body = env.rest("agentapi", "POST", "/v1/enroll", json.dumps(human))
    assert status == 401 and "instance-profile session" in body["detail"]


def test_two_compute_containers_never_reuse_a_revision(env: Env) -> None:
    est = boot(env)
    db = est["ids"]["db"][0]
    a = env.fn["compute"]  # warm container A
    env.load_functions()
    b = env.fn["compute"]  # container B (cold)
    p1, p2 = est["run"]("processing", est["subnets"]["app"], 2)
    env.put(env.state_event(p1, "running"))
    env.drain("ingest", "ingest")
    env.drain("compute", "compute")  # B: rebuilds, then applies p1
    v1 = env.bundle(db).version
    env.fn["compute"] = a
    env.put(env.state_event(p2, "running"))
    env.drain("ingest", "ingest")
    env.drain("compute", "compute")  # A: its engine is behind the head → rebuilds first
    final = env.bundle(db)
    assert final.version > v1 and env.store.head().clean
    assert in_set(final, ip_of(env, p1)) and in_set(final, ip_of(env, p2))
    assert b.service().engine.revision < a.service().engine.revision


def test_policy_whose_tests_fail_is_not_provisioned(env: Env) -> None:
    policy = (
        "rulesets: [{name: a, scope: all(), rules: [{from: role == web, to: role == db, services: [tcp/5432]}]}]\n"
        "tests:\n"
        "  - {from: {labels: {role: web}}, to: {labels: {role: db}}, port: tcp/22, expect: allow}\n"
    )
    status, _, body = env.rest("admin", "POST", "/admin/policies", {"files": {"p.yaml": policy}})
    assert status == 422 and body["error"] == "policy tests fail"
    assert "expected allow, policy says deny" in body["detail"]
    assert env.store.active_policy() is None and env.store.audit_log() == []


def enrolled_proc(env: Env, monkeypatch: Any) -> tuple[dict[str, Any], str, str, int]:
    """The estate booted with a change watch that looks every 0.1 s, and its first proc instance
    enrolled: (the estate, proc's id, its token, its bundle version)."""
    monkeypatch.setenv("RINGFENCE_WAIT_POLL_INTERVAL", "0.1")
    env.load_functions()
    est = boot(env)
    proc = est["ids"]["proc"][0]
    tok = enroll_instance(env, proc)
    return est, proc, tok, env.bundle(proc).version


def open_wait(env: Env, proc: str, tok: str, query: dict[str, str]) -> tuple[Any, dict[str, Any]]:
    """A long-poll of proc's, open when this returns (through a resolver of its own over the same
    service: a resolver serves one request at a time): its thread, and what it answered once it
    did (status, body, how long it took, when)."""
    import threading

    from ringfence.routes.agent import agent_routes

    waiter = agent_routes(env.fn["agentapi"].api)
    got: dict[str, Any] = {}

    def long_poll() -> None:
        t0 = time.monotonic()
        event = rest_event("GET", f"/v1/agents/{proc}/wait", headers=auth(tok), query=query)
        got["status"], _, got["body"] = rest_answer(waiter.resolve(event, LambdaContext()))
        got["at"] = time.monotonic()
        got["took"] = got["at"] - t0

    t = threading.Thread(target=long_poll)
    t.start()
    time.sleep(0.5)
    assert "status" not in got, got  # current: it waits
    return t, got


def test_wait_answers_at_once_when_behind_and_on_a_change_when_current(env: Env, monkeypatch: Any) -> None:
    est, proc, tok, v = enrolled_proc(env, monkeypatch)
    path = f"/v1/agents/{proc}/wait"

    def wait(version: int, timeout: int) -> tuple[int, Any, float]:
        t0 = time.monotonic()
        status, _, body = env.rest(
            "agentapi", "GET", path, headers=auth(tok), query={"version": str(version), "timeout": str(timeout)}
        )
        return status, body, time.monotonic() - t0

    status, body, took = wait(v - 1, 20)  # behind: at once
    assert status == 200 and body == {"latest_version": v} and took < 2
    status, body, took = wait(v, 1)  # current, nothing changes: at the timeout, same version
    assert status == 200 and body == {"latest_version": v} and 0.9 <= took < 5
    assert env.rest("agentapi", "GET", path, headers=auth("nope"), query={"version": "1"})[0] == 401
    status, _, err = env.rest("agentapi", "GET", path, headers=auth(tok), query={"version": "x"})
    assert status == 422 and "query.version" in err["detail"]

    # a change while waiting: the long-poll answers with the new version long before its timeout
    t, got = open_wait(env, proc, tok, {"version": str(v), "timeout": "20"})
    new = est["run"]("web", est["subnets"]["web"], 1)[0]
    env.put(env.state_event(new, "running"))
    env.pump()
    t.join(25)
    assert got["status"] == 200 and got["body"]["latest_version"] == env.bundle(proc).version > v
    assert got["took"] < 10, got
    assert "deltas" not in got["body"]  # not asked for

    # asked for, the answer carries the deltas since v: what the deltas route answers, as stored
    status, _, body = env.rest(
        "agentapi", "GET", path, headers=auth(tok), query={"version": str(v), "timeout": "20", "deltas": "true"}
    )
    deltas = env.rest("agentapi", "GET", f"/v1/agents/{proc}/deltas", headers=auth(tok), query={"since": str(v)})
    assert status == deltas[0] == 200 and deltas[2]["deltas"] and body["deltas"] == deltas[2]
    assert body["latest_version"] == deltas[2]["bundle_version"]
    # no version applied yet: nothing to bridge from, the version alone
    status, _, body = env.rest(
        "agentapi", "GET", path, headers=auth(tok), query={"version": "-1", "timeout": "20", "deltas": "true"}
    )
    assert status == 200 and body == {"latest_version": env.bundle(proc).version}


def test_wait_is_capped_by_max_wait(env: Env, monkeypatch: Any) -> None:
    monkeypatch.setenv("RINGFENCE_MAX_WAIT", "1")
    monkeypatch.setenv("RINGFENCE_WAIT_POLL_INTERVAL", "0.2")
    env.load_functions()
    est = boot(env)
    proc = est["ids"]["proc"][0]
    tok = enroll_instance(env, proc)
    v = env.bundle(proc).version
    t0 = time.monotonic()
    query = {"version": str(v), "timeout": "300"}
    status, _, body = env.rest("agentapi", "GET", f"/v1/agents/{proc}/wait", headers=auth(tok), query=query)
    assert status == 200 and body == {"latest_version": v} and time.monotonic() - t0 < 4


def test_attack_a_bearer_token_in_the_websocket_url_is_refused(env: Env) -> None:
    """A token in a query string lands in access logs and proxies: $connect refuses it even when
    it is valid, and no nudge connection is recorded for its workload."""
    est = boot(env)
    proc = est["ids"]["proc"][0]
    tok = enroll_instance(env, proc)

    def connect(query: dict[str, str] | None, headers: dict[str, str]) -> dict[str, Any]:
        event = {
            "requestContext": {"routeKey": "$connect", "connectionId": "conn-q", "eventType": "CONNECT", "stage": "v1"},
            "queryStringParameters": query,
            "headers": headers,
            "isBase64Encoded": False,
        }
        return env.fn["wsconnect"].handler(event, _ctx())  # type: ignore[no-any-return]

    refused = connect({"token": tok}, {})
    assert refused["statusCode"] == 400 and "token in the URL" in refused["body"]
    assert connect({"token": tok}, {"Authorization": f"Bearer {tok}"})["statusCode"] == 400
    assert env.store.connection(proc) is None
    assert connect(None, {"authorization": f"Bearer {tok}"})["statusCode"] == 200
    assert env.store.connection(proc) == "conn-q"


def test_heartbeats_with_the_kernels_digest_become_findings(env: Env) -> None:
    """The AWS agent API (the Lambda handler against moto) keeps each heartbeat's claim with the
    digest of the bundle it published; GET /admin/findings compares them (docs/visibility.md)."""
    from ringfence import bundlewire, enforced

    est = boot(env)
    proc = est["ids"]["proc"][0]
    tok = enroll_instance(env, proc)
    status, _, body = env.rest("agentapi", "GET", f"/v1/agents/{proc}/bundle", headers=auth(tok))
    assert status == 200
    doc = bundlewire.bundle_from_json(body if isinstance(body, dict) else json.loads(body))
    status, _, moved = env.rest(
        "agentapi", "GET", f"/v1/agents/{proc}/deltas", headers=auth(tok), query={"since": str(doc.version)}
    )
    assert status == 200
    deltas = [bundlewire.delta_from_json(d) for d in moved["deltas"]]
    latest = moved["bundle_version"]
    reader = "arn:aws:iam::123456789012:role/Readers"
    env.bind(reader, ["reader"])

    def beat(digest: str) -> list[tuple[str, str]]:
        hb = {"applied_version": latest, "mode": doc.mode.value, "kernel_digest": digest}
        status, _, _ = env.rest("agentapi", "POST", f"/v1/agents/{proc}/heartbeat", hb, headers=auth(tok))
        assert status == 200
        rep = env.store.enforcement(proc)
        assert rep is not None and rep.expected_digest == enforced.expected(doc, deltas)
        status, _, found = env.rest("admin", "GET", "/admin/findings", principal=reader)
        assert status == 200, found
        return [(f["kind"], f["workload_id"]) for f in found["findings"] if f["workload_id"] == proc]

    assert beat(enforced.expected(doc, deltas)) == []
    assert beat("0" * 64) == [("kernel-mismatch", proc)]
    # a digest that is not one is refused (422), and stores nothing
    status, _, _ = env.rest(
        "agentapi", "POST", f"/v1/agents/{proc}/heartbeat",
        {"applied_version": latest, "mode": "enforce", "kernel_digest": "x"}, headers=auth(tok),
    )  # fmt: skip
    assert status == 422


def test_a_rising_tamper_counter_in_heartbeats_is_a_tampered_finding_a_falling_one_is_not(env: Env) -> None:
    """The AWS agent API (DynamoDB) keeps the agent's ``tamper_reapplied`` counter with each
    heartbeat's report: the first heartbeat's count is history (a baseline), a heartbeat without
    counters (an old agent) is 0, a rise is a ``tampered`` finding in GET /admin/findings, a fall
    (the agent's state dir reset) is no new one and keeps the one seen."""
    est = boot(env)
    proc = est["ids"]["proc"][0]
    tok = enroll_instance(env, proc)
    reader = "arn:aws:iam::123456789012:role/Readers"
    env.bind(reader, ["reader"])

    def beat(counters: dict[str, int] | None) -> list[dict[str, Any]]:
        hb: dict[str, Any] = {"applied_version": 1, "mode": "enforce"}
        if counters is not None:
            hb["counters"] = counters
        status, _, _ = env.rest("agentapi", "POST", f"/v1/agents/{proc}/heartbeat", hb, headers=auth(tok))
        assert status == 200
        status, _, found = env.rest("admin", "GET", "/admin/findings", principal=reader)
        assert status == 200, found
        return [f for f in found["findings"] if f["workload_id"] == proc and f["kind"] == "tampered"]

    assert beat({"tamper_reapplied": 5, "applied": 1}) == [], "counted before this control plane heard: history"
    assert beat(None) == [], "no counter: 0, a fall"
    rep = env.store.enforcement(proc)
    assert rep is not None and rep.tamper_reapplied == 0 and rep.tampered_at is None
    before = time.time()
    (f,) = beat({"tamper_reapplied": 2})
    assert f["repairs"] == 2 and f["since"] >= before and "re-applied them 2 times" in f["detail"]
    (same,) = beat({"tamper_reapplied": 2})
    assert same["since"] == f["since"], "no rise: the same finding"
    (kept,) = beat({})  # the agent's state dir reset
    assert kept["since"] == f["since"] and kept["repairs"] == 2
    (again,) = beat({"tamper_reapplied": 1})
    assert again["since"] > f["since"] and again["repairs"] == 3


def test_an_agent_enrolling_before_its_launch_is_ingested_gets_its_bundle_once_ingest_records_it(env: Env) -> None:
    """The agent often enrolls before the launch event reaches ingest: it is enrolled at once
    (one DescribeInstances verifies the document), but the agent API writes no inventory record
    (its role may not: a compromised agent API must not write labels); the launch event records
    the instance, and the agent's token then reads its bundle."""
    env.provision_example_policy()
    iid = env.estate()["ids"]["web"][0]  # running in EC2, no event pumped: unknown to the inventory
    assert env.store.get(iid) is None
    described: list[str] = []
    env.hook("before-call.ec2.DescribeInstances", lambda **kw: described.append("x"))
    status, body = enroll_iid(env, iid)
    assert status == 200, body
    assert described == ["x"], "one DescribeInstances per enrollment"
    assert env.store.get(iid) is None, "the agent API recorded nothing"
    token = str(body["token"])
    # not yet in the inventory: its token opens nothing (the agent retries, holding its fail-safes)
    assert env.rest("agentapi", "GET", f"/v1/agents/{iid}/bundle", headers=auth(token))[0] == 401
    env.put(env.state_event(iid, "running"))
    env.pump()  # its launch event: ingest records it, compute publishes its bundle
    rec = env.store.get(iid)
    assert rec is not None and rec.state == "running" and rec.labels.get("role") == "web"
    assert env.rest("agentapi", "GET", f"/v1/agents/{iid}/bundle", headers=auth(token))[0] == 200


def test_an_agent_request_reads_its_record_and_bundle_pointer_with_its_token(env: Env) -> None:
    """Authorizing a request reads the token, the workload's record and its bundle pointer in
    one BatchGetItem; the heartbeat, the wait and the bundle fetch answer from what it read
    instead of reading the record or the pointer again (in AWS, a round trip each)."""
    reads: list[str] = []
    watching = [False]

    def single_reads(params: dict[str, Any], **_: Any) -> None:
        if watching[0]:
            body = params.get("body", b"")
            reads.append(body.decode() if isinstance(body, bytes) else str(body))

    env.hook("before-call.dynamodb.GetItem", single_reads)
    est = boot(env)
    proc = est["ids"]["proc"][0]
    tok = enroll_instance(env, proc)
    status, _, doc = env.rest("agentapi", "GET", f"/v1/agents/{proc}/bundle", headers=auth(tok))
    assert status == 200
    version = int(doc["version"])
    watching[0] = True
    hb = {"applied_version": version, "mode": "enforce"}
    status, _, body = env.rest("agentapi", "POST", f"/v1/agents/{proc}/heartbeat", hb, headers=auth(tok))
    assert status == 200 and body["latest_version"] == version
    status, _, body = env.rest(
        "agentapi", "GET", f"/v1/agents/{proc}/wait", headers=auth(tok), query={"version": "0", "timeout": "0"}
    )
    assert status == 200 and body["latest_version"] == version, "behind: answered at once"
    status, _, _ = env.rest("agentapi", "GET", f"/v1/agents/{proc}/bundle", headers=auth(tok))
    assert status == 200
    watching[0] = False
    assert not [r for r in reads if proc in r], "no GetItem of its record or pointer after the grant"
    # a token that is not the workload's grants nothing, and nothing of its grant is reused
    status, _, _ = env.rest("agentapi", "POST", f"/v1/agents/{proc}/heartbeat", hb, headers=auth("forged"))
    assert status == 401


def test_set_heads_are_read_once_per_change_the_watch_sees(env: Env, monkeypatch: Any) -> None:
    """While the change watch runs (an agent waits), the set heads every heartbeat and wait asks
    for are read from the store once per change it sees, not once per request; a publication
    moves the watch's mark, and the next request reads the new heads and answers the new version."""
    import threading

    from ringfence.routes.agent import agent_routes

    monkeypatch.setenv("RINGFENCE_WAIT_POLL_INTERVAL", "0.1")
    env.load_functions()
    head_reads: list[str] = []

    def count(params: dict[str, Any], **_: Any) -> None:
        body = params.get("body", b"")
        # the requests made here only: the waiter's thread reads too when a change wakes it
        mine = threading.current_thread() is threading.main_thread()
        if mine and b"sethead#" in (body if isinstance(body, bytes) else str(body).encode()):
            head_reads.append("x")

    env.hook("before-call.dynamodb.BatchGetItem", count)
    est = boot(env)
    proc = est["ids"]["proc"][0]
    tok = enroll_instance(env, proc)
    v = env.bundle(proc).version
    api = env.fn["agentapi"].api()
    assert api.w.change_mark() is None, "no watch yet: nothing is kept"
    # a waiting agent keeps the watch looking
    waiter = agent_routes(env.fn["agentapi"].api)
    path = f"/v1/agents/{proc}/wait"
    done: dict[str, Any] = {}

    def long_poll() -> None:
        event = rest_event("GET", path, headers=auth(tok), query={"version": str(v + 1000), "timeout": "4"})
        done["status"] = rest_answer(waiter.resolve(event, LambdaContext()))[0]

    t = threading.Thread(target=long_poll)
    t.start()
    deadline = time.monotonic() + 5
    while api.w.change_mark() is None and time.monotonic() < deadline:
        time.sleep(0.02)
    assert api.w.change_mark() is not None
    hb = {"applied_version": v, "mode": "enforce"}
    head_reads.clear()
    for _ in range(3):
        status, _, body = env.rest("agentapi", "POST", f"/v1/agents/{proc}/heartbeat", hb, headers=auth(tok))
        assert status == 200 and body["latest_version"] == v
    assert len(head_reads) <= 1, "three heartbeats, one read of the heads"
    # a change: a new web instance joins the sets proc's bundle holds
    mark = api.w.change_mark()
    new = est["run"]("web", est["subnets"]["web"], 1)[0]
    env.put(env.state_event(new, "running"))
    env.pump()
    newer = env.bundle(proc).version
    assert newer > v
    while api.w.change_mark() == mark and time.monotonic() < deadline + 5:
        time.sleep(0.02)
    status, _, body = env.rest("agentapi", "POST", f"/v1/agents/{proc}/heartbeat", hb, headers=auth(tok))
    assert status == 200 and body["latest_version"] == newer, "the heads kept before the change are not used"
    t.join(15)
    assert done["status"] == 200


def test_attack_an_open_wait_is_refused_after_an_agent_key_reset_in_aws(env: Env, monkeypatch: Any) -> None:
    """A long-poll opened before an operator resets the agent key (the token revoked) answers
    the next wake-up 401, not the deltas or bundle published after the reset: each wake-up
    authorizes the token again, with the read that brings the bundle pointer."""
    est, proc, tok, v = enrolled_proc(env, monkeypatch)
    t, got = open_wait(env, proc, tok, {"version": str(v), "timeout": "20", "deltas": "true", "bundle": "true"})
    onboarding = "arn:aws:iam::123456789012:role/Onboarding"
    env.bind(onboarding, ["onboarding"])
    reset = {"reason": "agent key stolen"}
    status, _, out = env.rest("admin", "DELETE", f"/admin/workloads/{proc}/agent-key", reset, principal=onboarding)
    assert status == 200 and out["token_revoked"] is True, out
    assert env.rest("agentapi", "GET", f"/v1/agents/{proc}/bundle", headers=auth(tok))[0] == 401
    # a change proc's bundle holds: a new web instance joins its sets
    new = est["run"]("web", est["subnets"]["web"], 1)[0]
    env.put(env.state_event(new, "running"))
    env.pump()
    changed = time.monotonic()
    assert env.bundle(proc).version > v
    t.join(25)
    assert not t.is_alive()
    assert got["status"] == 401, got
    assert "deltas" not in got["body"] and "bundle" not in got["body"], got["body"]
    assert got["at"] - changed < 10, "refused on the wake-up the change caused, not at the timeout"
