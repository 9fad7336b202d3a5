"""AWS control-plane test harness: one moto server (loopback, free port) per session; every test
gets a reset moto, freshly created infrastructure and freshly imported handler modules.

Events travel the real path: ``events.put_events`` → moto EventBridge rule → moto SQS →
handler called in-process with an SQS Lambda event built from the received messages.
"""

from __future__ import annotations

import base64
import copy
import datetime as dt
import importlib.util
import json
import logging
import os
import sys
import time
import uuid
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import boto3
import pytest
import requests
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import padding, rsa
from cryptography.x509.oid import NameOID

ROOT = Path(__file__).resolve().parents[2]
FIXTURES = Path(__file__).resolve().parent / "fixtures"
POLICY_DIR = ROOT / "examples" / "ordering" / "policy"
LABEL_TESTS = """
tests:
  - from: {labels: {role: web, app: ordering, env: prod, loc: ca}}
    to: {labels: {role: processing, app: ordering, env: prod, loc: ca}}
    port: tcp/8443
    expect: allow
  - from: {labels: {role: processing, app: ordering, env: dev, loc: ca}}
    to: {labels: {role: database, app: ordering, env: prod, loc: ca}}
    port: tcp/5432
    expect: deny
"""
REGION = "ca-central-1"
ACCOUNT = "123456789012"
FUNCTIONS = ["ingest", "compute", "lifecycle", "reconcile", "agentapi", "admin", "wsconnect", "perimeter"]


@pytest.fixture(scope="session")
def moto_url() -> Iterator[str]:
    from moto.server import ThreadedMotoServer

    logging.getLogger("werkzeug").setLevel(logging.ERROR)
    server = ThreadedMotoServer(ip_address="127.0.0.1", port=0, verbose=False)
    server.start()
    host, port = server.get_host_and_port()
    url = f"http://{host}:{port}"
    old = dict(os.environ)
    os.environ.update(
        {
            "AWS_ENDPOINT_URL": url,
            "AWS_DEFAULT_REGION": REGION,
            "AWS_REGION": REGION,
            "AWS_ACCESS_KEY_ID": "testing",
            "AWS_SECRET_ACCESS_KEY": "testing",
            "AWS_SESSION_TOKEN": "testing",
            "POWERTOOLS_TRACE_DISABLED": "true",
            "POWERTOOLS_SERVICE_NAME": "ringfence",
            "POWERTOOLS_METRICS_NAMESPACE": "Ringfence",
            "POWERTOOLS_LOG_LEVEL": "WARNING",
            "RINGFENCE_AWS_MAX_ATTEMPTS": "6",
        }
    )
    yield url
    server.stop()
    os.environ.clear()
    os.environ.update(old)


def fixture(name: str) -> dict[str, Any]:
    return json.loads((FIXTURES / name).read_text())


@dataclass
class LambdaContext:
    function_name: str = "ringfence-test"
    memory_limit_in_mb: int = 256
    invoked_function_arn: str = f"arn:aws:lambda:{REGION}:{ACCOUNT}:function:ringfence-test"
    aws_request_id: str = field(default_factory=lambda: str(uuid.uuid4()))

    def get_remaining_time_in_millis(self) -> int:
        return 60_000


@dataclass
class IidKey:
    private: rsa.RSAPrivateKey
    cert_pem: str

    def sign(self, document: str) -> str:
        return base64.b64encode(self.private.sign(document.encode(), padding.PKCS1v15(), hashes.SHA256())).decode()


@pytest.fixture(scope="session")
def iid_key() -> IidKey:
    return make_iid_key()


def make_iid_key() -> IidKey:
    key = rsa.generate_private_key(public_exponent=65537, key_size=2048)
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "test-only IID signer")])
    now = dt.datetime.now(dt.UTC)
    cert = (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(name)
        .public_key(key.public_key())
        .serial_number(1)
        .not_valid_before(now - dt.timedelta(days=1))
        .not_valid_after(now + dt.timedelta(days=1))
        .sign(key, hashes.SHA256())
    )
    return IidKey(key, cert.public_bytes(serialization.Encoding.PEM).decode())


class Env:
    """One test's AWS world and the handlers wired to it."""

    def __init__(self, url: str, iid: IidKey) -> None:
        self.url = url
        self.iid = iid
        self.ec2 = boto3.client("ec2")
        self.asg = boto3.client("autoscaling")
        self.sqs = boto3.client("sqs")
        self.s3 = boto3.client("s3")
        self.events = boto3.client("events")
        self.ddb = boto3.resource("dynamodb")
        self.fn: dict[str, Any] = {}
        self.queues: dict[str, str] = {}
        self.bucket = "ringfence-bundles-test"

    # --- infrastructure -----------------------------------------------------------------------

    def build(self) -> None:
        from ringfence.bundle import SigningKey
        from ringfence.clouds.aws.patterns import INGEST_RULES, LIFECYCLE_RULES

        tables = {
            "rf-inventory": [("id", "HASH")],
            "rf-state": [("pk", "HASH"), ("sk", "RANGE")],
            "rf-audit": [("pk", "HASH"), ("sk", "RANGE")],
            "rf-idempotency": [("id", "HASH")],
        }
        for name, keys in tables.items():
            self.ddb.create_table(
                TableName=name,
                KeySchema=[{"AttributeName": k, "KeyType": t} for k, t in keys],
                AttributeDefinitions=[{"AttributeName": k, "AttributeType": "S"} for k, _ in keys],
                BillingMode="PAY_PER_REQUEST",
            )
        self.s3.create_bucket(Bucket=self.bucket, CreateBucketConfiguration={"LocationConstraint": REGION})
        self.s3.put_bucket_versioning(Bucket=self.bucket, VersioningConfiguration={"Status": "Enabled"})
        dlq = self.sqs.create_queue(QueueName="rf-ingest-dlq")["QueueUrl"]
        dlq_arn = self._arn(dlq)
        redrive = json.dumps({"deadLetterTargetArn": dlq_arn, "maxReceiveCount": "3"})
        self.queues = {
            "dlq": dlq,
            "ingest": self.sqs.create_queue(QueueName="rf-ingest", Attributes={"RedrivePolicy": redrive})["QueueUrl"],
            "lifecycle": self.sqs.create_queue(QueueName="rf-lifecycle", Attributes={"RedrivePolicy": redrive})[
                "QueueUrl"
            ],
            "compute": self.sqs.create_queue(
                QueueName="rf-compute.fifo", Attributes={"FifoQueue": "true", "ContentBasedDeduplication": "false"}
            )["QueueUrl"],
        }
        for rules, queue in ((INGEST_RULES, "ingest"), (LIFECYCLE_RULES, "lifecycle")):
            for name, pattern in rules.items():
                self.events.put_rule(Name=f"rf-{name}", EventPattern=json.dumps(pattern))
                # moto's default target input drops the envelope's "account"; real EventBridge
                # delivers the whole event, which is what this transformer asks moto for
                whole = {"InputPathsMap": {}, "InputTemplate": "<aws.events.event.json>"}
                self.events.put_targets(
                    Rule=f"rf-{name}",
                    Targets=[{"Id": "q", "Arn": self._arn(self.queues[queue]), "InputTransformer": whole}],
                )
        self.signing_key = SigningKey.generate()
        sm = boto3.client("secretsmanager")
        sm.create_secret(Name="ringfence/signing-key", SecretString=self.signing_key.private_pem().decode())
        os.environ.update(
            {
                "RINGFENCE_INVENTORY_TABLE": "rf-inventory",
                "RINGFENCE_STATE_TABLE": "rf-state",
                "RINGFENCE_AUDIT_TABLE": "rf-audit",
                "RINGFENCE_IDEMPOTENCY_TABLE": "rf-idempotency",
                "RINGFENCE_BUCKET": self.bucket,
                "RINGFENCE_COMPUTE_QUEUE_URL": self.queues["compute"],
                "RINGFENCE_DLQ_URL": dlq,
                "RINGFENCE_SIGNING_KEY": "secretsmanager:ringfence/signing-key",
                "RINGFENCE_IID_CERT": self.iid.cert_pem,
                "RINGFENCE_OFFLINE_AFTER": "600",
                "RINGFENCE_RECONCILE_TARGETS": json.dumps(
                    [{"account": ACCOUNT, "region": REGION, "role_arn": f"arn:aws:iam::{ACCOUNT}:role/rf-reconcile"}]
                ),
            }
        )
        os.environ.pop("RINGFENCE_WEBSOCKET_ENDPOINT", None)
        self.load_functions()

    def _arn(self, queue_url: str) -> str:
        return str(
            self.sqs.get_queue_attributes(QueueUrl=queue_url, AttributeNames=["QueueArn"])["Attributes"]["QueueArn"]
        )

    def load_functions(self) -> None:
        from ringfence.clouds.aws import clients

        clients.reset()
        for name in FUNCTIONS:
            path = ROOT / "functions" / name / "app.py"
            if not path.exists():
                continue
            mod_name = f"rf_fn_{name}_{uuid.uuid4().hex[:6]}"
            spec = importlib.util.spec_from_file_location(mod_name, path)
            assert spec and spec.loader
            mod = importlib.util.module_from_spec(spec)
            sys.modules[mod_name] = mod
            spec.loader.exec_module(mod)
            self.fn[name] = mod

    def hook(self, event_name: str, handler: Callable[..., Any]) -> None:
        """Register a botocore event handler on the session the control plane uses."""
        from ringfence.clouds.aws import clients

        clients.session().events.register(event_name, handler)
        # clients copy the session's event emitter when created: drop the cached ones
        clients._clients.clear()
        clients._assumed.clear()

    # --- estate -------------------------------------------------------------------------------

    def estate(self) -> dict[str, Any]:
        vpc = self.ec2.create_vpc(CidrBlock="10.1.0.0/16")["Vpc"]["VpcId"]
        subnets = {
            tier: self.ec2.create_subnet(VpcId=vpc, CidrBlock=cidr, AvailabilityZone=f"{REGION}a")["Subnet"]["SubnetId"]
            for tier, cidr in {
                "web": "10.1.1.0/24",
                "app": "10.1.2.0/24",
                "db": "10.1.3.0/24",
                "asg": "10.1.16.0/20",
            }.items()
        }
        ami = self.ec2.describe_images()["Images"][0]["ImageId"]
        self.ami = ami

        def run(role: str, subnet: str, n: int = 1, env: str = "prod", app: str = "ordering") -> list[str]:
            out = self.ec2.run_instances(
                ImageId=ami,
                MinCount=n,
                MaxCount=n,
                InstanceType="t3.micro",
                SubnetId=subnet,
                TagSpecifications=[
                    {
                        "ResourceType": "instance",
                        "Tags": [
                            {"Key": "role", "Value": role},
                            {"Key": "app", "Value": app},
                            {"Key": "env", "Value": env},
                        ],
                    }
                ],
            )
            return [i["InstanceId"] for i in out["Instances"]]

        ids = {
            "web": run("web", subnets["web"], 2),
            "proc": run("processing", subnets["app"], 2),
            "db": run("database", subnets["db"], 1),
        }
        lt = self.ec2.create_launch_template(
            LaunchTemplateName="rf-web", LaunchTemplateData={"ImageId": ami, "InstanceType": "t3.micro"}
        )["LaunchTemplate"]["LaunchTemplateId"]
        self.asg.create_auto_scaling_group(
            AutoScalingGroupName="rf-web-asg",
            LaunchTemplate={"LaunchTemplateId": lt, "Version": "$Latest"},
            MinSize=0,
            MaxSize=1000,
            DesiredCapacity=0,
            VPCZoneIdentifier=subnets["asg"],
            Tags=[
                {
                    "Key": k,
                    "Value": v,
                    "PropagateAtLaunch": True,
                    "ResourceId": "rf-web-asg",
                    "ResourceType": "auto-scaling-group",
                }
                for k, v in {"role": "web", "app": "ordering", "env": "prod"}.items()
            ],
        )
        return {"vpc": vpc, "subnets": subnets, "ids": ids, "run": run}

    def asg_instances(self, group: str = "rf-web-asg") -> list[str]:
        g = self.asg.describe_auto_scaling_groups(AutoScalingGroupNames=[group])["AutoScalingGroups"][0]
        return [i["InstanceId"] for i in g["Instances"]]

    # --- events -------------------------------------------------------------------------------

    def put(self, sample: dict[str, Any]) -> None:
        """Send a real-shaped event through moto EventBridge (the rules route it to SQS)."""
        entry = {
            "Source": sample["source"],
            "DetailType": sample["detail-type"],
            "Detail": json.dumps(sample["detail"]),
            "Resources": sample.get("resources", []),
        }
        if "time" in sample:
            entry["Time"] = dt.datetime.fromisoformat(sample["time"].replace("Z", "+00:00"))
        out = self.events.put_events(Entries=[entry])
        assert out["FailedEntryCount"] == 0, out

    def state_event(self, iid: str, state: str) -> dict[str, Any]:
        ev = copy.deepcopy(fixture("ec2-state-change.json"))
        ev["region"], ev["account"] = REGION, ACCOUNT
        ev["resources"] = [f"arn:aws:ec2:{REGION}:{ACCOUNT}:instance/{iid}"]
        ev["detail"] = {"instance-id": iid, "state": state}
        ev["time"] = dt.datetime.now(dt.UTC).strftime("%Y-%m-%dT%H:%M:%SZ")
        return ev

    def tag_event(self, iid: str, tags: dict[str, str], version: int) -> dict[str, Any]:
        ev = copy.deepcopy(fixture("tag-change.json"))
        ev["region"], ev["account"] = REGION, ACCOUNT
        ev["resources"] = [f"arn:aws:ec2:{REGION}:{ACCOUNT}:instance/{iid}"]
        ev["detail"].update({"tags": tags, "version": version, "changed-tag-keys": sorted(tags)})
        return ev

    def lifecycle_event(self, iid: str, launching: bool = True) -> dict[str, Any]:
        ev = copy.deepcopy(fixture("asg-launch-lifecycle.json" if launching else "asg-terminate-lifecycle.json"))
        ev["region"], ev["account"] = REGION, ACCOUNT
        ev["detail"].update(
            {"EC2InstanceId": iid, "AutoScalingGroupName": "rf-web-asg", "LifecycleHookName": "rf-hook"}
        )
        return ev

    def receive(self, queue: str, max_messages: int = 10) -> list[dict[str, Any]]:
        out = self.sqs.receive_message(
            QueueUrl=self.queues[queue],
            MaxNumberOfMessages=max_messages,
            AttributeNames=["All"],
            MessageAttributeNames=["All"],
            WaitTimeSeconds=0,
        )
        return list(out.get("Messages", []))

    @staticmethod
    def sqs_event(
        messages: list[dict[str, Any]], arn: str = "arn:aws:sqs:ca-central-1:123456789012:q"
    ) -> dict[str, Any]:
        recs = []
        for m in messages:
            attrs = {
                "ApproximateReceiveCount": "1",
                "SentTimestamp": str(int(time.time() * 1000)),
                "SenderId": "AIDAEXAMPLE",
                "ApproximateFirstReceiveTimestamp": str(int(time.time() * 1000)),
            }
            attrs.update(m.get("Attributes", {}))
            if arn.endswith(".fifo"):
                attrs.setdefault("MessageGroupId", "compute")
                attrs.setdefault("MessageDeduplicationId", m["MessageId"])
                attrs.setdefault("SequenceNumber", "1")
            recs.append(
                {
                    "messageId": m["MessageId"],
                    "receiptHandle": m["ReceiptHandle"],
                    "body": m["Body"],
                    "attributes": attrs,
                    "messageAttributes": {},
                    "md5OfBody": m["MD5OfBody"],
                    "eventSource": "aws:sqs",
                    "eventSourceARN": arn,
                    "awsRegion": REGION,
                }
            )
        return {"Records": recs}

    def drain(self, queue: str, fn: str, batch: int = 10) -> list[dict[str, Any]]:
        """Deliver every message on ``queue`` to function ``fn`` like Lambda's SQS poller does:
        successful records are deleted, failed ones stay (and would be retried / redriven)."""
        results = []
        while True:
            msgs = self.receive(queue, batch)
            if not msgs:
                return results
            arn = (
                "arn:aws:sqs:ca-central-1:123456789012:rf-compute.fifo"
                if queue == "compute"
                else self._arn(self.queues[queue])
            )
            out = self.fn[fn].handler(self.sqs_event(msgs, arn), LambdaContext())
            failed = {f["itemIdentifier"] for f in out.get("batchItemFailures", [])}
            results.append(out)
            for m in msgs:
                if m["MessageId"] not in failed:
                    self.sqs.delete_message(QueueUrl=self.queues[queue], ReceiptHandle=m["ReceiptHandle"])
                else:  # as after the visibility timeout: the next drain gets it again
                    self.sqs.change_message_visibility(
                        QueueUrl=self.queues[queue], ReceiptHandle=m["ReceiptHandle"], VisibilityTimeout=0
                    )
            if failed:
                return results

    def pump(self) -> None:
        """Run the pipeline until quiet: lifecycle and ingest queues, then compute."""
        self.drain("lifecycle", "lifecycle")
        self.drain("ingest", "ingest")
        self.drain("compute", "compute")

    # --- APIs -----------------------------------------------------------------------------------

    def rest(
        self,
        fn: str,
        method: str,
        path: str,
        body: Any = None,
        headers: dict[str, str] | None = None,
        query: dict[str, str] | None = None,
        principal: str = "arn:aws:iam::123456789012:user/alice",
    ) -> tuple[int, dict[str, str], Any]:
        event = rest_event(method, path, body, headers, query, principal)
        return rest_answer(self.fn[fn].handler(event, LambdaContext()))

    def provision_example_policy(self) -> int:
        # the example's tests.yaml names the sample inventory's workload ids, which this moto estate
        # does not have (provisioning refuses tests it cannot run): keep its label-based tests only
        files = {p.name: p.read_text() for p in sorted(POLICY_DIR.glob("*.yaml")) if p.name != "tests.yaml"}
        files["tests.yaml"] = LABEL_TESTS
        status, _, body = self.rest("admin", "POST", "/admin/policies", {"files": files, "reason": "initial"})
        assert status == 201, body
        return int(body["version"])

    # --- reading back -----------------------------------------------------------------------------

    @property
    def store(self) -> Any:
        from ringfence.store.dynamodb import DynamoStore

        return DynamoStore("rf-inventory", "rf-state", "rf-audit", resource=self.ddb)

    def bundle(self, wid: str) -> Any:
        """The workload's current signed bundle, as the agent API serves it."""
        from ringfence.bundle import Bundle, Verifier

        cur = self.fn["agentapi"].api().current(wid)
        assert isinstance(cur, tuple), f"no bundle for {wid}: {cur}"
        doc = Bundle.model_validate(cur[1])
        Verifier.from_pem(self.signing_key.public_pem()).verify(doc)
        return doc

    def count(self, queue: str) -> int:
        attrs = self.sqs.get_queue_attributes(
            QueueUrl=self.queues[queue],
            AttributeNames=["ApproximateNumberOfMessages", "ApproximateNumberOfMessagesNotVisible"],
        )["Attributes"]
        return int(attrs["ApproximateNumberOfMessages"]) + int(attrs["ApproximateNumberOfMessagesNotVisible"])


def rest_event(
    method: str,
    path: str,
    body: Any = None,
    headers: dict[str, str] | None = None,
    query: dict[str, str] | None = None,
    principal: str = "arn:aws:iam::123456789012:user/alice",
) -> dict[str, Any]:
    """An API Gateway REST proxy event, as API Gateway builds it for a request."""
    return {
        "resource": path,
        "path": path,
        "httpMethod": method,
        "headers": headers or {},
        "multiValueHeaders": {k: [v] for k, v in (headers or {}).items()},
        "queryStringParameters": query,
        "multiValueQueryStringParameters": {k: [v] for k, v in query.items()} if query else None,
        "pathParameters": None,
        "stageVariables": None,
        "requestContext": {
            "accountId": ACCOUNT,
            "apiId": "api",
            "httpMethod": method,
            "path": path,
            "protocol": "HTTP/1.1",
            "requestId": str(uuid.uuid4()),
            "requestTimeEpoch": int(time.time() * 1000),
            "resourceId": "r",
            "resourcePath": path,
            "stage": "v1",
            "identity": {"userArn": principal, "caller": principal, "sourceIp": "10.0.0.1"},
        },
        "body": body if isinstance(body, str) or body is None else json.dumps(body),
        "isBase64Encoded": False,
    }


def rest_answer(out: dict[str, Any]) -> tuple[int, dict[str, str], Any]:
    """(status, lower-cased headers, JSON body or text) of a proxy integration's answer."""
    text = out.get("body") or ""
    try:
        parsed = json.loads(text) if text else None
    except ValueError:
        parsed = text
    hdrs = {k.lower(): v for k, v in (out.get("headers") or {}).items()}
    for k, v in (out.get("multiValueHeaders") or {}).items():
        hdrs[k.lower()] = v[0]
    return out["statusCode"], hdrs, parsed


@pytest.fixture
def env(moto_url: str, iid_key: IidKey) -> Env:
    requests.post(f"{moto_url}/moto-api/reset", timeout=10)
    e = Env(moto_url, iid_key)
    e.build()
    return e


def ip_of(env: Env, iid: str) -> str:
    inst = env.ec2.describe_instances(InstanceIds=[iid])["Reservations"][0]["Instances"][0]
    return str(inst["PrivateIpAddress"])
