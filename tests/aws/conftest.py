"""AWS control-plane test harness: one moto server (loopback, free port) per session; every test
gets a reset moto, freshly created infrastructure and freshly imported handler modules.

Events travel the real path: ``events.put_events`` → moto EventBridge rule → moto SQS →
handler called in-process with an SQS Lambda event built from the received messages.
"""

from __future__ import annotations

import copy
import datetime as dt
import json
import os
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import boto3
import pytest

from ringfence.adminroles import ENV as ADMIN_ROLES_ENV
from ringfence.local.aws import EmbeddedAws, IidKey
from ringfence.local.estate import lab_image
from ringfence.local.lambdas import LambdaContext, deliver_batch, load_functions, retire_functions, sqs_event

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
OPERATOR = "arn:aws:iam::123456789012:user/alice"
FUNCTIONS = ["ingest", "compute", "publish", "lifecycle", "reconcile", "agentapi", "admin", "wsconnect", "perimeter"]
__all__ = ["LambdaContext"]  # the tests import it from here


@pytest.fixture(scope="session")
def moto_url(embedded: EmbeddedAws) -> str:
    return embedded.url


def fixture(name: str) -> dict[str, Any]:
    return json.loads((FIXTURES / name).read_text())


@pytest.fixture(scope="session")
def iid_key(embedded: EmbeddedAws) -> IidKey:
    return embedded.iid


class Env:
    """One test's AWS world and the handlers wired to it."""

    def __init__(self, aws: EmbeddedAws) -> None:
        self.aws = aws
        self.url = aws.url
        self.iid = aws.iid
        self.ec2 = boto3.client("ec2")
        self.asg = boto3.client("autoscaling")
        self.sqs = boto3.client("sqs")
        self.s3 = boto3.client("s3")
        self.events = boto3.client("events")
        self.ddb = boto3.resource("dynamodb")
        self.fn: dict[str, Any] = {}
        self.queues: dict[str, str] = {}
        self.bucket = aws.bucket

    # --- infrastructure -----------------------------------------------------------------------

    def build(self) -> None:
        """A fresh moto with the stack's resources (``EmbeddedAws.reset``), handlers freshly loaded."""
        self.aws.reset()
        # the admin API's role bindings (functions/admin): the tests' default caller holds all
        os.environ[ADMIN_ROLES_ENV] = json.dumps({OPERATOR: ["policy-author", "incident-responder", "onboarding"]})
        self.queues = dict(self.aws.queues)
        self.signing_key = self.aws.signing_key
        self.load_functions()

    def load_functions(self) -> None:
        self.retire()
        self.fn = load_functions(FUNCTIONS, ROOT / "functions")

    def retire(self) -> None:
        """The loaded containers are done: their wirings close (no change watch outlives them)."""
        retire_functions(self.fn.values())
        self.fn = {}

    def hook(self, event_name: str, handler: Callable[..., Any]) -> None:
        """Register a botocore event handler on the session the control plane uses."""
        from ringfence.clouds.aws import clients

        clients.session().events.register(event_name, handler)
        # clients copy the session's event emitter when created: drop the cached ones
        clients._clients.clear()
        clients._assumed.clear()

    def refuse_audit_writes(self) -> list[str]:
        """From now on the audit table refuses every write (throttled), in freshly loaded
        functions: the list returned gets an entry per refusal."""
        from botocore.exceptions import ClientError

        refused: list[str] = []

        def refuse(params: dict[str, Any], **_: Any) -> None:
            tables = {next(iter(i.values()))["TableName"] for i in params.get("TransactItems", [])}
            if "rf-audit" in tables:
                refused.append("audit")
                raise ClientError(
                    {"Error": {"Code": "ProvisionedThroughputExceededException", "Message": "throttled"}},
                    "TransactWriteItems",
                )

        self.load_functions()  # a cold container, whose clients carry the hook
        self.hook("before-parameter-build.dynamodb.TransactWriteItems", refuse)
        return refused

    def bind(self, principal: str, roles: list[str]) -> None:
        """Give an IAM principal admin roles (``RINGFENCE_ADMIN_ROLES``, read per request)."""
        bindings = json.loads(os.environ.get(ADMIN_ROLES_ENV, "{}"))
        os.environ[ADMIN_ROLES_ENV] = json.dumps({**bindings, principal: roles})

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
        ami = lab_image(self.ec2)
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
                            {"Key": "ringfence:role", "Value": role},
                            {"Key": "ringfence:app", "Value": app},
                            {"Key": "ringfence:env", "Value": env},
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
                for k, v in {"ringfence:role": "web", "ringfence:app": "ordering", "ringfence:env": "prod"}.items()
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
        return sqs_event(messages, arn, REGION)

    def drain(self, queue: str, fn: str, batch: int = 10) -> list[dict[str, Any]]:
        """Deliver every message on ``queue`` to function ``fn`` like Lambda's SQS poller does
        (``ringfence.local.lambdas.deliver_batch``): successful records are deleted, failed ones
        stay and are visible again at once (as after the visibility timeout); stops at a failure."""
        if queue == "compute" and fn == "compute":
            # compute fans bundles out to the publish queue: delivered too, as the publish function
            # runs on its own in AWS as soon as compute sent it something
            results = self.drain_compute(batch)
            if not any(r.get("batchItemFailures") for r in results):
                self._drain("publish", "publish", batch)
            return results
        return self._drain(queue, fn, batch)

    def drain_compute(self, batch: int = 10, invocations: int | None = None) -> list[dict[str, Any]]:
        """Deliver compute's two queues to the compute function as Lambda's two event source
        mappings do (at most ``invocations`` batches). The function's reserved concurrency is 1:
        each mapping's pollers take a batch and retry its throttled invocation until the one
        slot is free, so neither queue waits for the other to be empty; while both have
        messages they take turns, a batch each (the priority queue's first). Stops at a failure."""
        results: list[dict[str, Any]] = []
        while True:
            worked = False
            for queue in ("compute_priority", "compute"):
                if invocations is not None and len(results) >= invocations:
                    return results
                d = deliver_batch(
                    self.sqs,
                    self.queues[queue],
                    self.aws.queue_arn(queue),
                    self.fn["compute"].handler,
                    region=REGION,
                    batch_size=batch,
                    name="compute",
                )
                if d is None:
                    continue
                if d.error is not None:
                    raise AssertionError(f"compute raised: {d.error}")
                results.append(d.result or {})
                if d.failed:
                    return results
                worked = True
            if not worked:
                return results

    def _drain(self, queue: str, fn: str, batch: int = 10) -> list[dict[str, Any]]:
        results = []
        while True:
            d = deliver_batch(
                self.sqs,
                self.queues[queue],
                self.aws.queue_arn(queue),
                self.fn[fn].handler,
                region=REGION,
                batch_size=batch,
                name=fn,
            )
            if d is None:
                return results
            if d.error is not None:
                raise AssertionError(f"{fn} raised: {d.error}")
            results.append(d.result or {})
            if d.failed:
                return results

    def pump(self) -> None:
        """Run the pipeline until quiet: lifecycle and ingest queues, the perimeter, then compute."""
        self.drain("lifecycle", "lifecycle")
        self.drain("ingest", "ingest")
        self.drain("perimeter", "perimeter")
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

    def provision_example_policy(self, note: str = "") -> int:
        """``note``: a comment added to tests.yaml, for another version of the same rules (the
        active version's files provisioned again create none)."""
        # the example's tests.yaml names the sample inventory's workload ids, which this moto estate
        # does not have (provisioning refuses tests it cannot run): keep its label-based tests only
        files = {p.name: p.read_text() for p in sorted(POLICY_DIR.glob("*.yaml")) if p.name != "tests.yaml"}
        files["tests.yaml"] = LABEL_TESTS + (f"# {note}\n" if note else "")
        status, _, body = self.rest("admin", "POST", "/admin/policies", {"files": files, "reason": "initial"})
        assert status == 201, body
        return int(body["version"])

    # --- reading back -----------------------------------------------------------------------------

    @property
    def store(self) -> Any:
        from ringfence.store.dynamodb import DynamoStore

        return DynamoStore("rf-inventory", "rf-state", "rf-audit", resource=self.ddb, owed_writer="ingest")

    def bundle(self, wid: str) -> Any:
        """What the workload's agent enforces: the signed bundle the agent API serves with the
        signed deltas it serves after it folded in (each verified), at the newest version."""
        from ringfence.bundle import Verifier, fold_deltas, load_bundle, load_delta

        api = self.fn["agentapi"].api()
        cur = api.current(wid)
        assert isinstance(cur, tuple), f"no bundle for {wid}: {cur}"
        verifier = Verifier.from_pem(self.signing_key.public_pem())
        doc = load_bundle(cur[1])
        verifier.verify(doc)
        got = api.deltas(wid, doc.version)
        assert got.status == 200, f"deltas of {wid} from {doc.version}: {got}"
        deltas = [load_delta(json.dumps(d)) for d in json.loads(got.body)["deltas"]]
        for d in deltas:
            verifier.verify(d)
        return fold_deltas(doc, deltas)

    def count(self, queue: str) -> int:
        """Messages on ``queue``; "compute": on both of compute's queues (its two lanes)."""
        if queue == "compute":
            return self._count("compute") + self._count("compute_priority")
        return self._count(queue)

    def _count(self, queue: str) -> int:
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
    """An API Gateway REST proxy event, as API Gateway builds it for a request: the one builder
    ``ringfence serve`` uses (:func:`ringfence.serve.proxy_event`), from a JSON-able body."""
    from ringfence.serve import proxy_event

    raw = b"" if body is None else (body if isinstance(body, str) else json.dumps(body)).encode()
    return proxy_event(
        method, path, list((headers or {}).items()), list((query or {}).items()), raw, "10.0.0.1", principal
    )


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
def env(embedded: EmbeddedAws) -> Iterator[Env]:
    e = Env(embedded)
    e.build()
    yield e
    e.retire()
    # moto keeps connections alive: a test's clients close theirs rather than wait for the GC
    for c in (e.ec2, e.asg, e.sqs, e.s3, e.events, e.ddb.meta.client):
        c.close()


@pytest.fixture
def gated(env: Env) -> Iterator[Env]:
    """``env`` under the launch lifecycle gate "agent" (RINGFENCE_LIFECYCLE_GATE): a new instance
    goes InService only once its perimeter groups are on and its agent enforces a bundle."""
    os.environ["RINGFENCE_LIFECYCLE_GATE"] = "agent"
    env.load_functions()  # cold start: the handlers read the setting
    try:
        yield env
    finally:
        os.environ.pop("RINGFENCE_LIFECYCLE_GATE", None)


def ip_of(env: Env, iid: str) -> str:
    inst = env.ec2.describe_instances(InstanceIds=[iid])["Reservations"][0]["Instances"][0]
    return str(inst["PrivateIpAddress"])
