"""End to end through moto: EventBridge rules → SQS → ingest → compute → S3, plus the faults."""

from __future__ import annotations

import itertools
import json
from typing import Any

import pytest
from botocore.awsrequest import AWSResponse

from tests.aws.conftest import ACCOUNT, REGION, Env, fixture, ip_of


def boot(env: Env) -> dict[str, Any]:
    """Policy provisioned, the estate running, a state-change event for every instance."""
    env.provision_example_policy()
    est = env.estate()
    for ids in est["ids"].values():
        for iid in ids:
            env.put(env.state_event(iid, "running"))
    env.pump()
    return est


def in_set(doc: Any, ip: str) -> bool:
    return any(f"{ip}/32" in s.v4 or any(_covers(c, ip) for c in s.v4) for s in doc.sets.values())


def _covers(cidr: str, ip: str) -> bool:
    import ipaddress

    return ipaddress.ip_address(ip) in ipaddress.ip_network(cidr)


def covered(sets: dict[str, set[str]], ip: str) -> bool:
    return any(_covers(c, ip) for elems in sets.values() for c in elems)


def bridge(env: Env, old: Any, deltas: list[dict[str, Any]]) -> dict[str, set[str]]:
    """The sets of bundle ``old`` moved along ``deltas`` as an agent applies them: each signature
    verified, each delta continuing its set's chain."""
    from ringfence.bundle import Verifier, load_delta

    verifier = Verifier.from_pem(env.signing_key.public_pem())
    sets = {n: (s.version, set(s.v4) | set(s.v6)) for n, s in old.sets.items()}
    for raw in deltas:
        d = load_delta(json.dumps(raw))
        verifier.verify(d)
        version, elems = sets[d.set]
        assert version == d.from_version, (d.set, version, d.from_version)
        sets[d.set] = (d.to_version, (elems - set(d.remove)) | set(d.add))
    return {n: e for n, (_, e) in sets.items()}


def test_estate_events_build_inventory_and_signed_bundles(env: Env) -> None:
    est = boot(env)
    recs = {r.id: r for r in env.store.all_records()}
    web1 = est["ids"]["web"][0]
    assert recs[web1].labels == {"role": "web", "app": "ordering", "env": "prod", "loc": "ca"}
    assert recs[web1].workload.vpc == est["vpc"] and recs[web1].workload.ips == [ip_of(env, web1)]
    db = env.bundle(est["ids"]["db"][0])
    proc_ip = ip_of(env, est["ids"]["proc"][0])
    assert in_set(db, proc_ip), "the database accepts the processing tier"
    assert not in_set(db, ip_of(env, web1)), "web never reaches the database directly"
    # compute published content-addressed, encrypted objects
    keys = [o["Key"] for o in env.s3.list_objects_v2(Bucket=env.bucket, Prefix="bundles/")["Contents"]]
    assert len(keys) >= 5 and all(k.endswith(".json") for k in keys)
    head = env.s3.head_object(Bucket=env.bucket, Key=keys[0])
    assert head["ServerSideEncryption"] == "AES256"


@pytest.mark.slow
def test_scale_out_lifecycle_publishes_then_continues(env: Env) -> None:
    est = boot(env)
    completed: list[dict[str, Any]] = []

    def complete(request: Any, **_: Any) -> AWSResponse:
        # this lifecycle event is synthesized (the fixture's token), so moto's CompleteLifecycleAction
        # (ringfence.local.moto_lifecycle; tests/local drive real hooks) would refuse it: stand in
        # at the HTTP layer and record what was published at the moment the action was completed
        raw = request.body.decode() if isinstance(request.body, bytes) else request.body
        params = dict(p.split("=", 1) for p in raw.split("&"))
        iid = params["InstanceId"]
        completed.append(
            {"instance": iid, "result": params["LifecycleActionResult"], "ptr": env.store.bundle_pointer(iid)}
        )
        return _xml(
            200,
            "<CompleteLifecycleActionResponse><CompleteLifecycleActionResult/><ResponseMetadata><RequestId>x</RequestId></ResponseMetadata></CompleteLifecycleActionResponse>",
        )

    env.hook("before-send.auto-scaling.CompleteLifecycleAction", complete)
    env.asg.set_desired_capacity(AutoScalingGroupName="rf-web-asg", DesiredCapacity=1)
    new = env.asg_instances()[0]
    proc = est["ids"]["proc"][0]
    before = env.bundle(proc)
    env.put(env.lifecycle_event(new, launching=True))
    env.pump()
    assert completed and completed[0]["instance"] == new and completed[0]["result"] == "CONTINUE"
    assert completed[0]["ptr"] is not None, "the new instance's bundle was published before CONTINUE"
    after = env.bundle(proc)
    assert in_set(after, ip_of(env, new)) and after.version > before.version
    # the peer can bridge by delta
    tok = enroll_instance(env, proc)
    status, _, body = env.rest(
        "agentapi",
        "GET",
        f"/v1/agents/{proc}/deltas",
        headers={"Authorization": f"Bearer {tok}"},
        query={"since": str(before.version)},
    )
    assert status == 200, body
    # the signed deltas take the peer from `before` to exactly the published sets, which cover the
    # new instance's address (as a /32 or within a wider canonical cover)
    bridged = bridge(env, before, body["deltas"])
    assert bridged == {n: set(s.v4) | set(s.v6) for n, s in after.sets.items()}
    assert not in_set(before, ip_of(env, new)) and covered(bridged, ip_of(env, new))
    # terminate (scale-in held by a terminate hook): leaves peers' sets before CONTINUE
    env.asg.put_lifecycle_hook(
        AutoScalingGroupName="rf-web-asg",
        LifecycleHookName="rf-leave",
        LifecycleTransition="autoscaling:EC2_INSTANCE_TERMINATING",
        HeartbeatTimeout=300,
        DefaultResult="CONTINUE",
    )
    env.asg.terminate_instance_in_auto_scaling_group(InstanceId=new, ShouldDecrementDesiredCapacity=True)
    env.put(env.lifecycle_event(new, launching=False))
    env.pump()
    assert completed[-1]["instance"] == new
    assert not in_set(env.bundle(proc), ip_of(env, new))
    # still running in Terminating:Wait: a reconcile must not bring it back
    env.fn["reconcile"].handler(_scheduled(), _ctx())
    env.pump()
    assert env.store.get(new).state == "terminating"
    assert not in_set(env.bundle(proc), ip_of(env, new))


def test_lifecycle_without_policy_is_left_to_time_out(env: Env, caplog: Any) -> None:
    est = env.estate()
    calls: list[str] = []
    env.hook("before-send.auto-scaling.CompleteLifecycleAction", lambda **kw: calls.append("x"))
    env.put(env.lifecycle_event(est["ids"]["web"][0], launching=True))
    env.pump()
    assert calls == []
    assert "will time out into its configured default result" in caplog.text


def test_duplicate_event_is_processed_once(env: Env) -> None:
    est = boot(env)
    web = est["ids"]["web"][0]
    describes: list[str] = []
    env.hook("before-call.ec2.DescribeInstances", lambda **kw: describes.append("d"))
    ev = env.state_event(web, "running")
    env.put(ev)
    msgs = env.receive("ingest")
    assert len(msgs) == 1
    dup = dict(msgs[0], MessageId="dup-" + msgs[0]["MessageId"])
    out = env.fn["ingest"].handler(env.sqs_event([msgs[0], dup]), _ctx())
    assert out == {"batchItemFailures": []}
    assert len(describes) == 1, "the second copy (same event id) was answered from the idempotency table"


def test_out_of_order_tag_events_keep_newest(env: Env) -> None:
    est = boot(env)
    web = est["ids"]["web"][0]
    env.ec2.create_tags(Resources=[web], Tags=[{"Key": "ringfence:env", "Value": "dev"}])
    newest = env.tag_event(
        web, {"ringfence:role": "web", "ringfence:app": "ordering", "ringfence:env": "dev"}, version=5
    )
    older = env.tag_event(
        web, {"ringfence:role": "web", "ringfence:app": "ordering", "ringfence:env": "prod"}, version=4
    )
    env.put(newest)
    env.pump()
    env.put(older)
    env.pump()
    rec = env.store.get(web)
    assert rec.workload.tags["ringfence:env"] == "dev" and rec.tag_version == 5
    assert rec.labels["env"] == "dev"


@pytest.mark.slow
def test_lost_event_is_fixed_by_reconcile(env: Env) -> None:
    est = boot(env)
    extra = est["run"]("processing", est["subnets"]["app"], 1)[0]  # no event for this one
    env.ec2.terminate_instances(InstanceIds=[est["ids"]["web"][1]])  # nor for this
    assert env.store.get(extra) is None
    out = env.fn["reconcile"].handler(_scheduled(), _ctx())
    assert extra in out["changed"] and est["ids"]["web"][1] in out["changed"]
    env.pump()
    db = env.bundle(est["ids"]["db"][0])
    assert in_set(db, ip_of(env, extra))
    assert env.store.get(est["ids"]["web"][1]).state == "terminated"


def test_malformed_event_goes_to_dlq_and_nothing_else_is_affected(env: Env) -> None:
    est = boot(env)
    env.ec2.create_tags(Resources=[est["ids"]["web"][0]], Tags=[{"Key": "ringfence:env", "Value": "dev"}])
    bad = env.state_event(est["ids"]["web"][0], "running")
    bad["detail"] = {"state": "running"}  # no instance-id
    env.put(bad)
    env.put(env.state_event(est["ids"]["web"][0], "running"))
    msgs = env.receive("ingest")
    assert len(msgs) == 2
    out = env.fn["ingest"].handler(env.sqs_event(msgs), _ctx())
    assert out == {"batchItemFailures": []}
    dlq = env.receive("dlq")
    assert len(dlq) == 1 and "instance-id" in dlq[0]["MessageAttributes"]["reason"]["StringValue"]
    assert env.store.get(est["ids"]["web"][0]).workload.tags["ringfence:env"] == "dev"


def test_describe_throttling_is_retried(env: Env) -> None:
    est = boot(env)
    web = est["ids"]["web"][0]
    throttled: list[int] = []

    def throttle(**_: Any) -> AWSResponse | None:
        if len(throttled) < 2:
            throttled.append(1)
            return _xml(
                503,
                "<Response><Errors><Error><Code>RequestLimitExceeded</Code><Message>Request limit exceeded."
                "</Message></Error></Errors><RequestID>x</RequestID></Response>",
            )
        return None

    env.hook("before-send.ec2.DescribeInstances", throttle)
    env.ec2.create_tags(Resources=[web], Tags=[{"Key": "ringfence:env", "Value": "dev"}])
    env.put(env.state_event(web, "running"))
    env.pump()
    assert len(throttled) == 2
    assert env.store.get(web).workload.tags["ringfence:env"] == "dev"


def test_cloudtrail_mixed_resources_filtered_by_prefix(env: Env) -> None:
    est = boot(env)
    web = est["ids"]["web"][0]
    ev = fixture("cloudtrail-create-tags.json")
    ev["detail"]["requestParameters"]["resourcesSet"]["items"].append({"resourceId": web})
    ev["detail"]["requestParameters"]["resourcesSet"]["items"].append({"resourceId": "vol-0abc"})
    env.ec2.create_tags(Resources=[web], Tags=[{"Key": "Name", "Value": "NonCompliantName"}])
    env.put(ev)
    env.pump()
    assert env.store.get(web).workload.name == "NonCompliantName"
    assert env.store.get("sg-11bbcc22") is None


# --- helpers -----------------------------------------------------------------------------------


def _xml(status: int, body: str) -> AWSResponse:
    class Raw:
        def stream(self, **_: Any) -> Any:
            yield body.encode()

    return AWSResponse("http://stand-in", status, {"Content-Type": "text/xml"}, Raw())


def _ctx() -> Any:
    from tests.aws.conftest import LambdaContext

    return LambdaContext()


def _scheduled() -> dict[str, Any]:
    return {
        "version": "0",
        "id": "sched-1",
        "detail-type": "Scheduled Event",
        "source": "aws.events",
        "account": "123456789012",
        "time": "2026-01-01T00:00:00Z",
        "region": "ca-central-1",
        "resources": [],
        "detail": {},
    }


def iid_document(env: Env, iid: str, pending: str | None = None) -> str:
    """The instance's identity document as EC2 issues it; ``pending``: its pendingTime (default:
    the instance's LaunchTime, the start this document is of)."""
    if pending is None:
        inst = env.ec2.describe_instances(InstanceIds=[iid])["Reservations"][0]["Instances"][0]
        pending = inst["LaunchTime"].strftime("%Y-%m-%dT%H:%M:%SZ")
    return json.dumps(
        {
            "accountId": ACCOUNT,
            "architecture": "x86_64",
            "availabilityZone": f"{REGION}a",
            "imageId": "ami-1",
            "instanceId": iid,
            "instanceType": "t3.micro",
            "pendingTime": pending,
            "privateIp": ip_of(env, iid),
            "region": REGION,
            "version": "2017-09-30",
        }
    )


class AgentKey:
    """An agent's own Ed25519 key, as the agent generates it (tests sign proofs with it)."""

    def __init__(self) -> None:
        from cryptography.hazmat.primitives import serialization
        from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

        self.private = Ed25519PrivateKey.generate()
        self.pem = (
            self.private.public_key()
            .public_bytes(serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo)
            .decode()
        )

    def prove(self, purpose: str, wid: str, nonce: str) -> str:
        import base64

        from ringfence.agentwire import proof_message

        return base64.b64encode(self.private.sign(proof_message(purpose, wid, nonce))).decode()

    def enroll_fields(self, wid: str, nonce: str) -> dict[str, str]:
        """What an enrollment request carries of the agent's key: the key and its proof."""
        return {"agent_key": self.pem, "agent_signature": self.prove("enroll", wid, nonce)}


AGENT_KEYS: dict[str, AgentKey] = {}


def agent_key(iid: str) -> AgentKey:
    """The one key of the (simulated) agent on ``iid``."""
    return AGENT_KEYS.setdefault(iid, AgentKey())


def enroll_iid(
    env: Env, iid: str, document: str | None = None, signature: str | None = None, key: AgentKey | None = None
) -> tuple[int, Any]:
    _, _, n = env.rest("agentapi", "GET", "/v1/nonce")
    doc = document or iid_document(env, iid)
    key = key or agent_key(iid)
    req = {
        "method": "aws-iid",
        "nonce": n["nonce"],
        "document": doc,
        "document_signature": signature or env.iid.sign(doc),
        "agent_key": key.pem,
        "agent_signature": key.prove("enroll", iid, n["nonce"]),
    }
    status, _, body = env.rest("agentapi", "POST", "/v1/enroll", json.dumps(req))
    return status, body


def enroll_instance(env: Env, iid: str) -> str:
    """An EC2 instance's agent token, enrolled with its identity document (pairing keys are for
    on-premise workloads only)."""
    status, body = enroll_iid(env, iid)
    assert status == 200, body
    return str(body["token"])


def test_published_state_equals_a_full_recompile_and_deltas_bridge(env: Env) -> None:
    """Many incremental changes later, every published bundle has the content a fresh full compile
    gives, and an agent holding an old bundle reaches the newest sets by applying the deltas."""
    from ringfence.bundle import Bundle, Verifier, load_delta
    from ringfence.engine import Engine

    est = boot(env)
    proc = est["ids"]["proc"][0]
    tok = enroll_instance(env, proc)
    old = env.bundle(proc)
    added = est["run"]("web", est["subnets"]["web"], 4) + est["run"]("processing", est["subnets"]["app"], 2)
    for iid in added:
        env.put(env.state_event(iid, "running"))
    env.pump()
    env.ec2.terminate_instances(InstanceIds=[added[0]])
    env.put(env.state_event(added[0], "terminated"))
    env.ec2.create_tags(Resources=[added[1]], Tags=[{"Key": "ringfence:env", "Value": "dev"}])
    env.put(env.state_event(added[1], "running"))
    env.pump()

    # 1. published == full recompile (content: everything but versions and signatures)
    pv = env.store.active_policy()
    from ringfence.policy import load_policy_texts

    texts = {n: env.s3.get_object(Bucket=env.bucket, Key=k)["Body"].read().decode() for n, k in pv.keys.items()}
    fresh = Engine(load_policy_texts(texts), policy_version=pv.number)
    fresh.load(r.effective() for r in env.store.all_records() if r.active)
    assert len(fresh.workloads) == 5 + 6 - 1
    for wid in fresh.workloads:
        assert env.bundle(wid).content() == Bundle.model_validate(fresh.render(wid)).content(), wid

    # 2. an agent at the old version applies the signed deltas and reaches the newest sets
    status, _, body = env.rest(
        "agentapi",
        "GET",
        f"/v1/agents/{proc}/deltas",
        headers={"Authorization": f"Bearer {tok}"},
        query={"since": str(old.version)},
    )
    assert status == 200, body
    assert len(body["deltas"]) >= 2
    verifier = Verifier.from_pem(env.signing_key.public_pem())
    sets = {n: (s.version, set(s.v4) | set(s.v6)) for n, s in old.sets.items()}
    for raw in body["deltas"]:
        d = load_delta(json.dumps(raw))
        verifier.verify(d)
        version, elems = sets[d.set]
        assert version == d.from_version
        sets[d.set] = (d.to_version, (elems - set(d.remove)) | set(d.add))
    new = env.bundle(proc)
    assert body["bundle_version"] == new.version
    assert {n: e for n, (_, e) in sets.items()} == {n: set(s.v4) | set(s.v6) for n, s in new.sets.items()}


@pytest.mark.slow
def test_publish_failure_leaves_hook_pending_then_retry_rebuilds_and_completes(env: Env, caplog: Any) -> None:
    """S3 refuses a write mid-publication: the launch is not completed, the head stays dirty;
    the redelivered batch rebuilds at a fresh revision, republishes, then completes CONTINUE."""
    est = boot(env)
    db = est["ids"]["db"][0]
    v_before = env.bundle(db).version
    completed: list[str] = []
    failures: list[int] = []

    def complete(request: Any, **_: Any) -> AWSResponse:
        completed.append("x")
        return _xml(
            200,
            "<CompleteLifecycleActionResponse><CompleteLifecycleActionResult/><ResponseMetadata><RequestId>x</RequestId></ResponseMetadata></CompleteLifecycleActionResponse>",
        )

    def refuse_once(request: Any, **_: Any) -> AWSResponse | None:
        if "/bundles/" in request.url and not failures:
            failures.append(1)
            return _xml(403, "<Error><Code>AccessDenied</Code><Message>Access Denied</Message></Error>")
        return None

    env.load_functions()  # fresh containers, so their clients carry the hooks below
    env.hook("before-send.auto-scaling.CompleteLifecycleAction", complete)
    env.hook("before-send.s3.PutObject", refuse_once)
    new = est["run"]("processing", est["subnets"]["app"], 1)[0]
    env.put(env.lifecycle_event(new, launching=True))
    env.drain("lifecycle", "lifecycle")
    env.drain("perimeter", "perimeter")  # the ENIs get their groups; the action goes on to compute
    out = env.drain("compute", "compute")
    assert out[0]["batchItemFailures"], "the batch failed and stays on the queue"
    assert completed == [] and "will time out into its configured default result" in caplog.text
    assert env.store.head().clean is False
    env.drain("compute", "compute")  # redelivered after the visibility timeout
    assert completed == ["x"]
    head = env.store.head()
    assert head.clean is True
    db_after = env.bundle(db)
    assert db_after.version > v_before and in_set(db_after, ip_of(env, new))


def test_new_policy_version_rebuilds_every_bundle(env: Env) -> None:
    est = boot(env)
    db = est["ids"]["db"][0]
    before = env.bundle(db)
    assert before.policy_version == 1
    assert env.provision_example_policy("version 2: the same rules") == 2
    env.pump()
    after = env.bundle(db)
    assert after.policy_version == 2 and after.version > before.version
    assert after.content() | {"policy_version": 1} == before.content()
    # the perimeter's changes are audited too (perimeter.apply): the policy's records are these
    assert [r.action for r in env.store.audit_log() if r.action.startswith("policy.")] == [
        "policy.provision",
        "policy.provision",
    ]


def test_a_batch_of_events_costs_one_describe_call(env: Env) -> None:
    est = boot(env)
    calls: list[str] = []
    env.hook("before-call.ec2.DescribeInstances", lambda **kw: calls.append("d"))
    new = est["run"]("web", est["subnets"]["web"], 8)
    for iid in new:
        env.put(env.state_event(iid, "running"))
    msgs = env.receive("ingest")
    assert len(msgs) == 8
    out = env.fn["ingest"].handler(env.sqs_event(msgs), _ctx())
    assert out == {"batchItemFailures": []}
    assert calls == ["d"]
    assert all(env.store.get(i) is not None for i in new)


def test_a_batch_hands_its_changes_on_once_and_again_when_retried(env: Env, monkeypatch: Any) -> None:
    """Ingest hands a batch's changed workloads to compute and the perimeter in one message each
    (a scale-out's events were one message each, and the perimeter ran one tiny batch after
    another). A hand-off that fails after the events were recorded as done fails the batch, and
    its retry, answered from the idempotency table, still hands them on."""
    est = boot(env)
    env.pump()
    new = est["run"]("web", est["subnets"]["web"], 4)
    for iid in new:
        env.put(env.state_event(iid, "running"))
    msgs = env.receive("ingest")
    assert len(msgs) == 4
    svc = env.fn["ingest"]._setup()
    real = svc["wiring"].sqs
    failing = {"left": 1}

    class FailsOnce:
        def __getattr__(self, name: str) -> Any:
            return getattr(real, name)

        def send_message(self, **kw: Any) -> Any:
            if failing["left"]:
                failing["left"] -= 1
                raise RuntimeError("SQS unavailable")
            return real.send_message(**kw)

    monkeypatch.setattr(svc["wiring"], "sqs", FailsOnce())
    with pytest.raises(RuntimeError, match="SQS unavailable"):
        env.fn["ingest"].handler(env.sqs_event(msgs), _ctx())
    assert env.count("compute") == 0 and env.count("perimeter") == 0
    assert all(env.store.get(i) is not None for i in new), "the events themselves were recorded"
    out = env.fn["ingest"].handler(env.sqs_event(msgs), _ctx())  # Lambda's retry of the batch
    assert out == {"batchItemFailures": []}
    (compute,) = env.receive("compute")
    (perimeter,) = env.receive("perimeter")
    assert sorted(json.loads(compute["Body"])["ids"]) == sorted(new)
    assert sorted(json.loads(perimeter["Body"])["ids"]) == sorted(new)


def test_a_batch_of_launch_actions_reaches_compute_in_two_messages_in_either_order(env: Env) -> None:
    """Three launch actions in one lifecycle batch: one perimeter message (their instances and
    actions), one compute message from the lifecycle handler (their instances), one from the perimeter once every ENI carries its groups (the
    three actions, naming their instances). The hand-off alone is enough: compute publishes and
    completes all three even when the lifecycle handler's message is lost."""
    boot(env)
    env.pump()
    completed: list[tuple[str, bool]] = []

    def complete(request: Any, **_: Any) -> AWSResponse:
        raw = request.body.decode() if isinstance(request.body, bytes) else request.body
        iid = dict(p.split("=", 1) for p in raw.split("&"))["InstanceId"]
        completed.append((iid, env.store.bundle_pointer(iid) is not None))
        return _xml(
            200,
            "<CompleteLifecycleActionResponse><CompleteLifecycleActionResult/><ResponseMetadata><RequestId>x</RequestId></ResponseMetadata></CompleteLifecycleActionResponse>",
        )

    env.hook("before-send.auto-scaling.CompleteLifecycleAction", complete)
    env.asg.set_desired_capacity(AutoScalingGroupName="rf-web-asg", DesiredCapacity=3)
    new = env.asg_instances()
    for iid in new:
        env.put(env.lifecycle_event(iid, launching=True))
    (out,) = env.drain("lifecycle", "lifecycle")
    assert out == {"batchItemFailures": []}
    (to_perimeter,) = env.receive("perimeter")  # one message for the batch: its instances and actions
    sent = json.loads(to_perimeter["Body"])
    assert sorted(sent["ids"]) == sorted(new)
    assert sorted(lc["instance_id"] for lc in sent["lifecycles"]) == sorted(new)
    env.sqs.change_message_visibility(
        QueueUrl=env.queues["perimeter"], ReceiptHandle=to_perimeter["ReceiptHandle"], VisibilityTimeout=0
    )
    (lost,) = env.receive("compute")
    assert sorted(json.loads(lost["Body"])["ids"]) == sorted(new) and not json.loads(lost["Body"]).get("lifecycles")
    env.sqs.delete_message(QueueUrl=env.queues["compute"], ReceiptHandle=lost["ReceiptHandle"])
    env.drain("perimeter", "perimeter")
    (handoff,) = env.receive("compute")
    body = json.loads(handoff["Body"])
    assert sorted(body["ids"]) == sorted(new)
    assert sorted(lc["instance_id"] for lc in body["lifecycles"]) == sorted(new)
    env.sqs.change_message_visibility(
        QueueUrl=env.queues["compute"], ReceiptHandle=handoff["ReceiptHandle"], VisibilityTimeout=0
    )
    env.drain("compute", "compute")
    assert sorted(completed) == sorted((iid, True) for iid in new), "each published, then completed"


def test_one_action_each_splits_a_hand_off_into_the_messages_it_stands_for() -> None:
    from ringfence.control.compute import one_action_each

    a, b = {"instance_id": "i-a", "transition": "x"}, {"instance_id": "i-b", "transition": "x"}
    plain = {"ids": ["i-c"], "lifecycle": None}
    got = one_action_each([plain, {"ids": ["i-a", "i-b"], "lifecycle": None, "lifecycles": [a, b]}])
    assert got == [
        plain,
        {"ids": ["i-a", "i-b"], "lifecycle": None},
        {"ids": [], "lifecycle": a},
        {"ids": [], "lifecycle": b},
    ]


def test_a_batch_of_launch_actions_is_described_once(env: Env) -> None:
    boot(env)
    env.asg.set_desired_capacity(AutoScalingGroupName="rf-web-asg", DesiredCapacity=3)
    new = env.asg_instances()
    assert len(new) == 3
    for iid in new:
        env.put(env.lifecycle_event(iid, launching=True))
    described: list[str] = []
    env.hook("before-call.ec2.DescribeInstances", lambda **kw: described.append("d"))
    (out,) = env.drain("lifecycle", "lifecycle")
    assert out == {"batchItemFailures": []}
    assert len(described) == 1, "one DescribeInstances for the batch's three actions, not one each"
    assert all(env.store.get(iid) is not None for iid in new), "every launching instance entered the inventory"


@pytest.mark.slow
def test_moved_records_name_every_workload_whose_latest_version_moved(env: Env) -> None:
    """The agent API wakes a waiting agent only when a moved record names it (control.changes):
    through the real handlers, each batch's record names every workload whose latest version —
    as the agent API computes it — moved, and the records chain from commit to commit."""
    est = boot(env)
    api = env.fn["agentapi"].api()
    everyone = [i for ids in est["ids"].values() for i in ids]

    def latest() -> dict[str, int | None]:
        return {w: api.latest_version(w) for w in everyone}

    before, base = latest(), env.store.head().revision
    changes: list[Any] = []
    web = est["ids"]["web"][0]
    env.ec2.create_tags(Resources=[web], Tags=[{"Key": "ringfence:env", "Value": "dev"}])
    changes.append(
        env.tag_event(web, {"ringfence:role": "web", "ringfence:app": "ordering", "ringfence:env": "dev"}, 2)
    )
    new = est["run"]("web", est["subnets"]["web"], 1)[0]
    everyone.append(new)
    changes.append(env.state_event(new, "running"))
    env.ec2.terminate_instances(InstanceIds=[est["ids"]["proc"][1]])
    changes.append(env.state_event(est["ids"]["proc"][1], "terminated"))
    for ev in changes:
        env.put(ev)
        env.pump()
    after = latest()
    moved = {w for w in everyone if after[w] != before.get(w)}
    assert len(moved) > 3  # the changes reached peers, not only their subjects
    recs = env.store.moved_after(base)
    assert recs and recs[0].previous == base and recs[-1].revision == env.store.head().revision
    assert all(a.revision == b.previous for a, b in itertools.pairwise(recs))
    named = {w for r in recs for w in (everyone if r.workloads is None else r.workloads)}
    assert moved <= named, f"moved but not named: {sorted(moved - named)}"


def test_a_lifecycle_batch_reads_its_instances_inventory_records_once(env: Env) -> None:
    """Three launch actions in one batch: one DescribeInstances and one read of the stored records
    for all three (not one per action), and each is recorded as launching."""
    boot(env)
    env.asg.set_desired_capacity(AutoScalingGroupName="rf-web-asg", DesiredCapacity=3)
    new = env.asg_instances()
    calls: list[str] = []

    def count(params: dict[str, Any], **_: Any) -> None:
        tables = params.get("RequestItems") or {params.get("TableName"): None}
        calls.extend(str(t) for t in tables if "inventory" in str(t).lower())

    env.hook("before-parameter-build.dynamodb.BatchGetItem", count)
    env.hook("before-parameter-build.dynamodb.GetItem", count)
    described: list[str] = []
    env.hook("before-call.ec2.DescribeInstances", lambda **kw: described.append("x"))
    for iid in new:
        env.put(env.lifecycle_event(iid, launching=True))
    (out,) = env.drain("lifecycle", "lifecycle")
    assert out == {"batchItemFailures": []}
    assert described == ["x"] and len(calls) == 1, (described, calls)
    assert all((rec := env.store.get(iid)) is not None and rec.state in ("pending", "running") for iid in new)


def test_a_change_that_moves_no_policy_is_not_handed_to_compute(env: Env) -> None:
    """An instance going from pending to running is recorded, but it is in peers' sets either way
    and nothing about it changed: no compute message (compute is one serialized queue). A tag
    change that relabels it is handed on."""
    est = boot(env)
    env.drain("compute", "compute")
    web = est["ids"]["web"][0]
    rec = env.store.get(web)
    assert rec is not None and rec.state == "running"
    t = rec.observed_at + 0.001
    pending = rec.model_copy(
        update={"state": "pending", "observed_at": t, "workload": rec.workload.model_copy(update={"observed_at": t})}
    )
    assert env.store.observe(pending)
    env.put(env.state_event(web, "running"))
    env.drain("ingest", "ingest")
    assert env.store.get(web).state == "running", "the state change is recorded"
    assert env.count("compute") == 0 and env.count("perimeter") == 0, "and not handed on"
    env.ec2.create_tags(Resources=[web], Tags=[{"Key": "ringfence:role", "Value": "processing"}])
    env.put(env.tag_event(web, {"ringfence:role": "processing"}, 2))
    env.drain("ingest", "ingest")
    (msg,) = env.receive("compute")
    assert web in json.loads(msg["Body"])["ids"]
