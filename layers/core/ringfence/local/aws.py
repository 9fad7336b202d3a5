"""An embedded AWS: moto in server mode on loopback (a process of its own: :mod:`motoproc`),
holding the control plane's resources.

The demo and the tests run the real handlers in ``functions/`` against it, through boto3 and the
standard endpoint variables — the same code paths as in AWS. Interface::

    from ringfence.local.aws import EmbeddedAws

    with EmbeddedAws() as aws:          # server started, resources created, os.environ set
        aws.url                         # "http://127.0.0.1:<free port>"
        aws.env                         # every variable a handler process needs (AWS_* and RINGFENCE_*),
                                        # except the signing key: only compute and publish have it
                                        # (aws.compute_env, aws.publish_env)
        aws.client("ec2")               # a boto3 client bound to the server
        aws.client_as("ec2", "ringfence-tagging")  # …calling as that IAM role (assumed)
        aws.client_as("ec2", "developer", user=True)  # …calling as that IAM user
        aws.queues["ingest"|"lifecycle"|"perimeter"|"compute"|"compute_priority"|"publish"|"dlq"|"…_dlq"]  # queue URLs
        aws.queue_arn("compute")
        aws.bucket, aws.tables, aws.rules  # names, as RINGFENCE_* carry them
        aws.signing_key                 # ringfence.bundle.SigningKey in the signing-key secret
        aws.iid.sign(document)          # base64 RSA-SHA256, as IMDS /signature; aws.iid.cert_pem
        aws.identity_document(iid)      # the instance's identity document (JSON text), from moto
        aws.reset()                     # empty moto, resources created again (a new signing key);
                                        # stop any EventRouter first, and make a new one after
        aws.trail_since(seq)            # EC2 tag/launch calls with their caller, as CloudTrail records them
        aws.lifecycle_actions()         # Auto Scaling lifecycle actions waiting, with their tokens
    # server stopped, os.environ restored

``EmbeddedAws(region=..., account=..., environ=True, metrics=True, lifecycle_hook_names=...)``: with
``environ=False`` the process environment is left alone (use ``aws.env`` for subprocesses; the
in-process handlers need it); ``metrics=False`` silences Powertools' metric lines on stdout;
``lifecycle_hook_names`` are the hooks whose actions are Ringfence's (default ``ringfence-launch``,
``ringfence-terminate``, as ``LifecycleHookNames``: the lifecycle rule passes no other's). Auto
Scaling lifecycle hooks work (see :mod:`ringfence.local.moto_lifecycle`), and EC2 tag and launch calls are recorded with their
caller as a trail would (:mod:`ringfence.local.moto_trail`). Events do not flow by themselves: run an
:class:`ringfence.local.router.EventRouter` for that.
"""

from __future__ import annotations

import base64
import contextlib
import datetime as dt
import json
import os
import selectors
import subprocess
import sys
import time
from dataclasses import dataclass, field
from typing import Any

import urllib3
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import padding, rsa
from cryptography.x509.oid import NameOID

from ringfence.bundle import SigningKey
from ringfence.clouds.aws.ec2 import LiveInstances
from ringfence.clouds.aws.patterns import INGEST_RULES, lifecycle_rules
from ringfence.control.wiring import DEFAULT_LIFECYCLE_HOOK_NAMES

from . import lambdas, moto_lifecycle, moto_trail  # the extensions' record types; they run in moto's process

REGION = "ca-central-1"
ACCOUNT = "123456789012"  # moto's default account
SIGNERS = ("compute", "publish")  # the functions with the signing key (template.yaml)
# the functions that send to compute's priority lane (template.yaml: ComputePriorityQueuePolicy)
PRIORITY_SENDERS = ("admin", "ingest", "lifecycle", "reconcile")

# the handlers' tables and their keys (template.yaml)
TABLES: dict[str, list[tuple[str, str]]] = {
    "inventory": [("id", "HASH")],
    "state": [("pk", "HASH"), ("sk", "RANGE")],
    "audit": [("pk", "HASH"), ("sk", "RANGE")],
    "idempotency": [("id", "HASH")],
}
# moto's default target input drops the envelope's "account"; real EventBridge delivers the
# whole event to an SQS target, which is what this transformer asks moto for
WHOLE_EVENT = {"InputPathsMap": {}, "InputTemplate": "<aws.events.event.json>"}


@dataclass
class IidKey:
    """A stand-in for AWS's per-region identity-document signing key (RSA-2048, SHA-256): its
    certificate is what ``RINGFENCE_IID_CERT`` pins, :meth:`sign` is what IMDS ``/signature`` gives."""

    private: rsa.RSAPrivateKey
    cert_pem: str

    @classmethod
    def generate(cls) -> IidKey:
        key = rsa.generate_private_key(public_exponent=65537, key_size=2048)
        name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "ringfence embedded IID signer (test only)")])
        now = dt.datetime.now(dt.UTC)
        cert = (
            x509.CertificateBuilder()
            .subject_name(name)
            .issuer_name(name)
            .public_key(key.public_key())
            .serial_number(x509.random_serial_number())
            .not_valid_before(now - dt.timedelta(days=1))
            .not_valid_after(now + dt.timedelta(days=30))
            .sign(key, hashes.SHA256())
        )
        return cls(key, cert.public_bytes(serialization.Encoding.PEM).decode())

    def sign(self, document: str) -> str:
        return base64.b64encode(self.private.sign(document.encode(), padding.PKCS1v15(), hashes.SHA256())).decode()


@dataclass
class Names:
    """Resource names (the test suite's, kept stable: tests and the demo read them)."""

    prefix: str = "rf"
    bucket: str = "ringfence-bundles-test"
    signing_secret: str = "ringfence/signing-key"  # noqa: S105 - a secret name, not a secret

    def table(self, what: str) -> str:
        return f"{self.prefix}-{what}"


@dataclass(frozen=True, slots=True)
class EstateInstance:
    state: str
    private_ip: str | None
    tags: dict[str, str]


@dataclass(frozen=True, slots=True)
class EstateGroup:
    arn: str
    members: dict[str, str]  # instance id → lifecycle state


@dataclass(frozen=True, slots=True)
class Estate:
    """What moto holds now (:meth:`EmbeddedAws.instances`)."""

    instances: dict[str, EstateInstance]
    groups: dict[str, EstateGroup]


@dataclass
class EmbeddedAws:
    """moto server + the stack's resources + the environment the handlers read. See the module doc."""

    region: str = REGION
    account: str = ACCOUNT
    environ: bool = True
    names: Names = field(default_factory=Names)
    iid: IidKey = field(default_factory=IidKey.generate)
    offline_after: int = 600
    metrics: bool = True  # False: Powertools prints no EMF metric lines (a live display stays readable)
    # the lifecycle hooks that are Ringfence's (LifecycleHookNames): the rule passes their actions
    # only, and the handlers read them (RINGFENCE_LIFECYCLE_HOOK_NAMES)
    lifecycle_hook_names: tuple[str, ...] = DEFAULT_LIFECYCLE_HOOK_NAMES

    url: str = field(init=False, default="")
    queues: dict[str, str] = field(init=False, default_factory=dict)
    rules: dict[str, str] = field(init=False, default_factory=dict)  # rule name → target queue key
    signing_key: SigningKey = field(init=False)
    _server: _MotoProcess | None = field(init=False, default=None, repr=False)
    _saved_env: dict[str, str] | None = field(init=False, default=None, repr=False)
    _saved_function_env: dict[str, dict[str, str]] = field(init=False, default_factory=dict, repr=False)
    _clients: dict[str, Any] = field(init=False, default_factory=dict, repr=False)
    _pool: urllib3.HTTPConnectionPool | None = field(init=False, default=None, repr=False)  # extension calls
    _pool_url: str = field(init=False, default="", repr=False)
    # instance → its identity document (every field is fixed at launch)
    _documents: dict[str, str] = field(init=False, default_factory=dict, repr=False)
    # the instances asked about while a describe is in flight share the next (by id)
    _live: LiveInstances = field(init=False, repr=False)

    def __post_init__(self) -> None:
        self._live = LiveInstances(lambda account, region: self.client("ec2"))

    # --- lifecycle ---------------------------------------------------------------------------

    def __enter__(self) -> EmbeddedAws:
        self.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()

    def start(self, *, build: bool = True) -> None:
        """Start moto on 127.0.0.1 (a free port, its own process), set the environment, create the
        resources."""
        self._server = _start_moto()
        self.url = f"http://127.0.0.1:{self._server.port}"
        if self.environ:
            self._saved_env = dict(os.environ)
            self._saved_function_env = {
                f: dict(e) for f in SIGNERS if (e := lambdas.FUNCTION_ENVIRONMENT.get(f)) is not None
            }
            os.environ.update(self.base_env())
        if build:
            self.build()

    def stop(self) -> None:
        """Stop the server and restore the process environment (safe to call twice)."""
        if self._server is not None:
            self._server.stop()
            self._server = None
        if self._saved_env is not None:
            os.environ.clear()
            os.environ.update(self._saved_env)
            for f in SIGNERS:
                lambdas.FUNCTION_ENVIRONMENT.pop(f, None)
            # an enclosing embedded AWS's compute and publish
            lambdas.FUNCTION_ENVIRONMENT.update(self._saved_function_env)
            self._saved_env = None
        for c in self._clients.values():
            c.close()  # its pooled keep-alive connections (moto keeps them open until closed)
        self._clients.clear()
        if self._pool is not None:
            self._pool.close()
            self._pool = None

    def reset(self) -> None:
        """Empty every moto backend and create the resources again (a new signing key)."""
        # generous: on a starved machine (two test workers among other load) a reset of every
        # backend was seen to take over 30 s, failing the test that asked for a fresh moto
        self._extension("/moto-api/reset", method="POST", timeout=120)
        self._documents.clear()
        self.build()

    # --- what AWS hands out only as events (the router reads them) ---------------------------

    def trail_since(self, seq: int) -> list[moto_trail.TrailRecord]:
        """The trail's records (EC2 tag and launch calls, with their caller) after ``seq``."""
        q = f"account={self.account}&region={self.region}&since={seq}"
        return [moto_trail.TrailRecord(r["seq"], r["detail"]) for r in self._extension(f"/_ringfence/trail?{q}")]

    def lifecycle_actions(self) -> list[moto_lifecycle.PendingAction]:
        """The Auto Scaling lifecycle actions now waiting (expired ones applied first)."""
        now, out = time.monotonic(), []
        for r in self._extension(f"/_ringfence/lifecycle-actions?account={self.account}&region={self.region}"):
            r["deadline"] = now + r.pop("remaining")
            out.append(moto_lifecycle.PendingAction(**r))
        return out

    def connection_data(self, connection_id: str) -> bytes:
        """What was posted to a WebSocket connection of the NudgeApi (what its client received)."""
        q = f"account={self.account}&region={self.region}&connection={connection_id}"
        return base64.b64decode(self._extension(f"/_ringfence/connection-data?{q}")["data"])

    def changes_after(self, seq: int, wait: float = 0.0) -> int:
        """How many calls so far changed instances, their tags or Auto Scaling groups
        (:mod:`moto_changes`): answered once the count is above ``seq``, or after ``wait``
        seconds (at most 5). A watcher looks at moto when this moves, not on a timer."""
        got = self._extension(f"/_ringfence/changes?after={seq}&wait={wait}", timeout=wait + 30)
        return int(got["seq"])

    def instances(self) -> Estate:
        """Every instance (state, address, tags) and Auto Scaling group (its members' lifecycle
        states), read from moto's models in one call: what the router and the lab's hypervisor
        look at, without serialising DescribeInstances for every look."""
        got = self._extension(f"/_ringfence/instances?account={self.account}&region={self.region}")
        return Estate(
            instances={
                i["id"]: EstateInstance(i["state"], i.get("private_ip"), dict(i.get("tags") or {}))
                for i in got["instances"]
            },
            groups={
                g["name"]: EstateGroup(g["arn"], {m["id"]: m["lifecycle_state"] for m in g["members"]})
                for g in got["groups"]
            },
        )

    def calls(self) -> dict[str, tuple[int, float]]:
        """Every call moto answered so far: ``"service.Action"`` → (count, seconds moto spent)."""
        return {k: (int(v[0]), float(v[1])) for k, v in self._extension("/_ringfence/calls").items()}

    def _extension(self, path: str, *, method: str = "GET", timeout: float = 30) -> Any:
        # kept-alive connections (urllib3, as boto3's own): the router's watcher asks several of
        # these per look, and a new connection each cost moto an accept and a thread start —
        # a fifth of its CPU in a scale-out. No proxy: it is our loopback moto.
        if self._pool is None or self._pool_url != self.url:
            self._pool, self._pool_url = urllib3.connection_from_url(self.url, maxsize=16), self.url
        resp = self._pool.request(method, path, timeout=timeout, retries=urllib3.Retry(total=2, backoff_factor=0))
        if resp.status >= 400:
            raise RuntimeError(f"{method} {path} on the embedded moto: HTTP {resp.status}: {resp.data[:300]!r}")
        return json.loads(resp.data) if path.startswith("/_ringfence/") else None

    # --- environment -------------------------------------------------------------------------

    def base_env(self) -> dict[str, str]:
        """What any boto3 client (and Powertools) in a handler process needs."""
        return {
            "AWS_ENDPOINT_URL": self.url,
            "AWS_DEFAULT_REGION": self.region,
            "AWS_REGION": self.region,
            "AWS_ACCESS_KEY_ID": "testing",
            "AWS_SECRET_ACCESS_KEY": "testing",
            "AWS_SESSION_TOKEN": "testing",
            "POWERTOOLS_TRACE_DISABLED": "true",
            "POWERTOOLS_SERVICE_NAME": "ringfence",
            "POWERTOOLS_METRICS_NAMESPACE": "Ringfence",
            "POWERTOOLS_LOG_LEVEL": "WARNING",
            "RINGFENCE_AWS_MAX_ATTEMPTS": "6",
            **({} if self.metrics else {"POWERTOOLS_METRICS_DISABLED": "true"}),
        }

    def ringfence_env(self) -> dict[str, str]:
        """The ``RINGFENCE_*`` configuration the handlers read (``Config.from_env``)."""
        n = self.names
        return {
            "RINGFENCE_INVENTORY_TABLE": n.table("inventory"),
            "RINGFENCE_STATE_TABLE": n.table("state"),
            "RINGFENCE_AUDIT_TABLE": n.table("audit"),
            "RINGFENCE_IDEMPOTENCY_TABLE": n.table("idempotency"),
            "RINGFENCE_BUCKET": n.bucket,
            "RINGFENCE_COMPUTE_QUEUE_URL": self.queues["compute"],
            "RINGFENCE_PERIMETER_QUEUE_URL": self.queues["perimeter"],
            "RINGFENCE_DLQ_URL": self.queues["dlq"],
            "RINGFENCE_IID_CERT": self.iid.cert_pem,
            "RINGFENCE_OFFLINE_AFTER": str(self.offline_after),
            "RINGFENCE_LIFECYCLE_HOOK_NAMES": ",".join(self.lifecycle_hook_names),
            "RINGFENCE_RECONCILE_TARGETS": json.dumps(
                [
                    {
                        "account": self.account,
                        "region": self.region,
                        "role_arn": f"arn:aws:iam::{self.account}:role/{n.prefix}-reconcile",
                    }
                ]
            ),
        }

    def compute_env(self) -> dict[str, str]:
        """What the compute function alone has beyond :attr:`env` (template.yaml gives
        RINGFENCE_SIGNING_KEY to ComputeFunction and PublishFunction only, the publish queue's
        URL to compute): never in the process environment, which ``ringfence serve`` (the agent
        API) inherits; in-process compute gets it through
        :data:`ringfence.local.lambdas.FUNCTION_ENVIRONMENT`. A ``Compute`` built on the process
        environment (not through the handler) has no publish queue: it publishes itself."""
        return {
            "RINGFENCE_SIGNING_KEY": f"secretsmanager:{self.names.signing_secret}",
            "RINGFENCE_PUBLISH_QUEUE_URL": self.queues["publish"],
        }

    def priority_env(self) -> dict[str, str]:
        """What the functions of :data:`PRIORITY_SENDERS` have beyond :attr:`env`: compute's
        priority lane (template.yaml gives its URL, and SendMessage on it, to them alone: the
        administrator's changes, and workloads leaving their peers' sets)."""
        return {"RINGFENCE_COMPUTE_PRIORITY_QUEUE_URL": self.queues["compute_priority"]}

    def publish_env(self) -> dict[str, str]:
        """What the publish function alone has beyond :attr:`env`: the signing key."""
        return {"RINGFENCE_SIGNING_KEY": f"secretsmanager:{self.names.signing_secret}"}

    @property
    def env(self) -> dict[str, str]:
        """Every variable a handler process needs (for subprocesses: ``{**os.environ, **aws.env}``),
        but the signing key (:meth:`compute_env`)."""
        return {**self.base_env(), **self.ringfence_env()}

    # --- resources ---------------------------------------------------------------------------

    @property
    def bucket(self) -> str:
        return self.names.bucket

    @property
    def tables(self) -> dict[str, str]:
        return {what: self.names.table(what) for what in TABLES}

    def client(self, service: str) -> Any:
        """A boto3 client bound to this server (cached per service; boto3 clients are thread-safe)."""
        if service not in self._clients:
            import boto3

            self._clients[service] = boto3.client(
                service,
                endpoint_url=self.url,
                region_name=self.region,
                aws_access_key_id="testing",
                aws_secret_access_key="testing",  # noqa: S106 - moto's dummy credentials
                aws_session_token="testing",  # noqa: S106
            )
        return self._clients[service]

    def client_as(self, service: str, name: str, *, user: bool = False) -> Any:
        """A boto3 client calling as IAM role ``name`` (created if missing, then assumed) or, with
        ``user``, as IAM user ``name`` (its access key): the trail (:mod:`moto_trail`) names that
        principal as the caller, as CloudTrail's ``userIdentity`` would."""
        key = f"{service}@{'user' if user else 'role'}/{name}"
        if key not in self._clients:
            import boto3

            iam = self.client("iam")
            if user:
                with contextlib.suppress(iam.exceptions.EntityAlreadyExistsException):
                    iam.create_user(UserName=name)
                k = iam.create_access_key(UserName=name)["AccessKey"]
                creds = {"aws_access_key_id": k["AccessKeyId"], "aws_secret_access_key": k["SecretAccessKey"]}
            else:
                trust = {
                    "Version": "2012-10-17",
                    "Statement": [
                        {
                            "Effect": "Allow",
                            "Principal": {"AWS": f"arn:aws:iam::{self.account}:root"},
                            "Action": "sts:AssumeRole",
                        }
                    ],
                }
                try:
                    arn = iam.create_role(RoleName=name, AssumeRolePolicyDocument=json.dumps(trust))["Role"]["Arn"]
                except iam.exceptions.EntityAlreadyExistsException:
                    arn = iam.get_role(RoleName=name)["Role"]["Arn"]
                c = self.client("sts").assume_role(RoleArn=arn, RoleSessionName=f"{name}-session")["Credentials"]
                creds = {
                    "aws_access_key_id": c["AccessKeyId"],
                    "aws_secret_access_key": c["SecretAccessKey"],
                    "aws_session_token": c["SessionToken"],
                }
            self._clients[key] = boto3.client(service, endpoint_url=self.url, region_name=self.region, **creds)
        return self._clients[key]

    def queue_arn(self, key: str) -> str:
        url = self.queues[key]
        return f"arn:aws:sqs:{self.region}:{self.account}:{url.rsplit('/', 1)[-1]}"

    def build(self) -> None:
        """Create the stack's resources as template.yaml declares them (what the handlers use)."""
        n = self.names
        ddb, s3, sqs, events = self.client("dynamodb"), self.client("s3"), self.client("sqs"), self.client("events")
        for what, keys in TABLES.items():
            ddb.create_table(
                TableName=n.table(what),
                KeySchema=[{"AttributeName": k, "KeyType": t} for k, t in keys],
                AttributeDefinitions=[{"AttributeName": k, "AttributeType": "S"} for k, _ in keys],
                BillingMode="PAY_PER_REQUEST",
            )
        s3.create_bucket(Bucket=n.bucket, CreateBucketConfiguration={"LocationConstraint": self.region})
        s3.put_bucket_versioning(Bucket=n.bucket, VersioningConfiguration={"Status": "Enabled"})

        def queue(name: str, attrs: dict[str, str] | None = None) -> str:
            return str(sqs.create_queue(QueueName=name, Attributes=attrs or {})["QueueUrl"])

        def redrive(dlq_key: str, max_receives: int) -> str:
            return json.dumps({"deadLetterTargetArn": self.queue_arn(dlq_key), "maxReceiveCount": str(max_receives)})

        fifo = {"FifoQueue": "true", "ContentBasedDeduplication": "false"}
        p = n.prefix
        self.queues = {}
        # template.yaml: IngestDLQ (5 receives), LifecycleDLQ (3), ComputeDLQ (FIFO, 5)
        self.queues["dlq"] = queue(f"{p}-ingest-dlq")
        self.queues["lifecycle_dlq"] = queue(f"{p}-lifecycle-dlq")
        self.queues["compute_dlq"] = queue(f"{p}-compute-dlq.fifo", fifo)
        self.queues["ingest"] = queue(f"{p}-ingest", {"VisibilityTimeout": "360", "RedrivePolicy": redrive("dlq", 5)})
        self.queues["lifecycle"] = queue(
            f"{p}-lifecycle", {"VisibilityTimeout": "360", "RedrivePolicy": redrive("lifecycle_dlq", 3)}
        )
        self.queues["compute"] = queue(
            f"{p}-compute.fifo", {**fifo, "VisibilityTimeout": "960", "RedrivePolicy": redrive("compute_dlq", 5)}
        )
        # template.yaml: ComputePriorityQueue (as ComputeQueue; the admin function's urgent work)
        self.queues["compute_priority"] = queue(
            f"{p}-compute-priority.fifo",
            {**fifo, "VisibilityTimeout": "960", "RedrivePolicy": redrive("compute_dlq", 5)},
        )
        # template.yaml: PublishQueue (standard, 5 receives into PublishDLQ)
        self.queues["publish_dlq"] = queue(f"{p}-publish-dlq")
        self.queues["publish"] = queue(
            f"{p}-publish", {"VisibilityTimeout": "360", "RedrivePolicy": redrive("publish_dlq", 5)}
        )
        # template.yaml: PerimeterQueue (3 receives into PerimeterDLQ)
        self.queues["perimeter_dlq"] = queue(f"{p}-perimeter-dlq")
        self.queues["perimeter"] = queue(
            f"{p}-perimeter", {"VisibilityTimeout": "960", "RedrivePolicy": redrive("perimeter_dlq", 3)}
        )
        self.rules = {}
        for rules, target in ((INGEST_RULES, "ingest"), (lifecycle_rules(self.lifecycle_hook_names), "lifecycle")):
            for name, pattern in rules.items():
                rule = f"{p}-{name}"
                events.put_rule(Name=rule, EventPattern=json.dumps(pattern))
                events.put_targets(
                    Rule=rule, Targets=[{"Id": target, "Arn": self.queue_arn(target), "InputTransformer": WHOLE_EVENT}]
                )
                self.rules[rule] = target
        self.signing_key = SigningKey.generate()
        self.client("secretsmanager").create_secret(
            Name=n.signing_secret, SecretString=self.signing_key.private_pem().decode()
        )
        if self.environ:
            os.environ.update(self.ringfence_env())
            os.environ.pop("RINGFENCE_WEBSOCKET_ENDPOINT", None)  # no NudgeApi here: agents long-poll
        # in-process compute and publish (the router's, the tests') get the signing key, nothing else does
        lambdas.FUNCTION_ENVIRONMENT["compute"] = self.compute_env()
        lambdas.FUNCTION_ENVIRONMENT["publish"] = self.publish_env()
        for f in PRIORITY_SENDERS:
            lambdas.FUNCTION_ENVIRONMENT[f] = self.priority_env()

    # --- instances -----------------------------------------------------------------------------

    def identity_document(self, instance_id: str) -> str:
        """The instance identity document IMDS would serve to ``instance_id`` (sign it with
        :attr:`iid`); ``pendingTime`` is the instance's launch time, so it is stable. Every field
        is fixed at launch, so each instance is described once, and the instances whose agents ask
        while a describe is in flight share the next (a scale-out's 50 agents ask at once: 50
        DescribeInstances calls of moto before, 247 before that). By id, never every live
        instance: moto renders each instance it answers with, and one describe of a whole
        estate took two of moto's seconds while the agents it answered were booting."""
        if (doc := self._documents.get(instance_id)) is not None:
            return doc
        inst = self._live.one(self.account, self.region, instance_id)
        if inst is None:
            raise LookupError(f"no instance {instance_id} in the embedded EC2")
        return self._documents.setdefault(instance_id, self._document(inst))  # KeyError: no address yet

    @property
    def documents_queued(self) -> int:
        """Identity documents asked for while a describe is in flight (waiting for the next)."""
        return self._live.queued

    def _document(self, inst: dict[str, Any]) -> str:
        launched = inst["LaunchTime"].astimezone(dt.UTC).strftime("%Y-%m-%dT%H:%M:%SZ")
        return json.dumps(
            {
                "accountId": self.account,
                "architecture": inst.get("Architecture", "x86_64"),
                "availabilityZone": inst["Placement"]["AvailabilityZone"],
                "imageId": inst["ImageId"],
                "instanceId": inst["InstanceId"],
                "instanceType": inst["InstanceType"],
                "pendingTime": launched,
                "privateIp": inst["PrivateIpAddress"],
                "region": self.region,
                "version": "2017-09-30",
            }
        )


@dataclass
class _MotoProcess:
    proc: subprocess.Popen[bytes]
    port: int

    def stop(self) -> None:
        if self.proc.stdin is not None:
            self.proc.stdin.close()  # its cue to shut down
        try:
            self.proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()


def _start_moto(timeout: float = 60.0) -> _MotoProcess:
    """``python -m ringfence.local.motoproc`` (:mod:`motoproc`: why a process of its own), once it
    said which port it serves."""
    proc = subprocess.Popen(
        [sys.executable, "-m", "ringfence.local.motoproc", "--host", "127.0.0.1", "--port", "0"],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
    )
    assert proc.stdout is not None
    # a selector, not select(): a long-lived process (a test worker) may hold over 1024 descriptors
    with selectors.DefaultSelector() as sel:
        sel.register(proc.stdout, selectors.EVENT_READ)
        ready = sel.select(timeout)
    line = proc.stdout.readline().decode() if ready else ""
    if not line.startswith("port "):
        proc.kill()
        proc.wait()
        raise RuntimeError(f"moto did not start within {timeout:.0f} s (exit {proc.returncode}, said {line!r})")
    proc.stdout.close()  # nothing more comes on it; moto's own logs go to stderr
    return _MotoProcess(proc, int(line.split()[1]))
