"""The cross-cloud scenario (issue 11) in the lab, with a real agent and a real firewall: one
control plane (``ringfence serve``'s app over the moto-backed AWS wiring) serving an EC2 database,
an Azure VM (the local ARM server, Event Grid deliveries to the real ``POST /azure/events`` route)
and a GCP VM (the local Google APIs, a Pub/Sub push to the real ``POST /gcp/events`` route).

The EC2 instance ``role=db`` of app ``ordering`` runs the agent (aws-iid enrollment); the Azure VM
``app=ordering, role=web, env=prod`` reaches it on 5432 and on nothing else; the GCP VM of another
app is blocked; a tag change in Azure reaches the agent's sets as a delta through the long-poll."""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from ringfence.local.estate import lab_image
from ringfence.local.lab import PY, sh, wait_until
from ringfence.local.lab import Lab as NetLab
from ringfence.local.lab import Probe as P
from tests.agent import dataplane
from tests.agent.bundles import policy_head
from tests.agent.test_agent_dataplane import config, net_agent

# fixtures: the moto-backed AWS control plane (see tests/aws), the local Google APIs
from tests.aws.conftest import env as aws_env  # noqa: F401
from tests.aws.conftest import iid_key, moto_url  # noqa: F401
from tests.gcp.conftest import gcp  # noqa: F401

pytestmark = pytest.mark.dataplane

dataplane.require()

HOSTS = {"db": 3, "azweb": 5, "gcpweb": 6, "cp": 100, "adm": 250}

POLICY = (
    policy_head("role", "app", "env")
    + """
services:
  - {name: db, ports: [tcp/5432]}
rulesets:
  - name: ordering
    scope: app == ordering
    same: [env]
    rules:
      - {name: web-to-db, from: role == web, to: role == db, services: [db]}
  - name: billing
    scope: app == billing
    same: [env]
    rules:
      - {name: web-to-db, from: role == web, to: role == db, services: [db]}
"""
)

# a POST from inside the lab (the control plane listens in cp's namespace): body from a file
_POST_IN_LAB = """
import json, sys, httpx
r = httpx.post(sys.argv[1], content=open(sys.argv[2], "rb").read(), headers=json.loads(sys.argv[3]),
               timeout=60, verify=sys.argv[4])
print(json.dumps({"status": r.status_code, "body": r.json()}))
"""


@pytest.fixture(scope="module")
def net() -> Iterator[NetLab]:
    lab = NetLab(HOSTS)
    try:
        lab.serve("db", tcp=[5432, 8080])
        yield lab
    finally:
        lab.close()


@pytest.mark.slow
def test_an_azure_web_vm_reaches_an_ec2_db_and_a_gcp_vm_of_another_app_does_not(
    net: NetLab,
    tmp_path: Path,
    aws_env: Any,  # noqa: F811 - the fixture
    gcp: Any,  # noqa: F811 - the fixture
    aws_wiring: Any,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    from ringfence import serve
    from ringfence.clouds.azure.arm import StaticTokenCredential
    from ringfence.clouds.azure.events import WRITE
    from ringfence.clouds.azure.wiring import Azure, AzureConfig
    from ringfence.local.azure_arm import ArmServer
    from ringfence.local.azure_estate import SUB, seed_vm, vm_id
    from ringfence.local.eventgrid import arm_event, delivery_headers
    from ringfence.local.gcp_events import audit_entry, push_body, push_token
    from ringfence.local.gcp_project import ORG, PROJECT, ZONE, gcp_environment, vm_name
    from ringfence.local.tls import lab_tls
    from tests.agent.netns import listening_socket_in
    from tests.aws.imds import running_imds
    from tests.azure.conftest import PROD_WEB, SECRET

    aws = aws_env
    for k, v in gcp_environment(gcp).items():
        monkeypatch.setenv(k, v)
    monkeypatch.setenv("RINGFENCE_WAIT_POLL_INTERVAL", "0.2")

    # the EC2 database: an instance with the lab's address, its running event through the pipeline
    status, _, body = aws.rest("admin", "POST", "/admin/policies", {"files": {"lab.yaml": POLICY}})
    assert status == 201, body
    vpc = aws.ec2.create_vpc(CidrBlock="10.77.0.0/16")["Vpc"]["VpcId"]
    subnet = aws.ec2.create_subnet(VpcId=vpc, CidrBlock="10.77.0.0/24")["Subnet"]["SubnetId"]
    ami = lab_image(aws.ec2)
    tags = {"ringfence:role": "db", "ringfence:app": "ordering", "ringfence:env": "prod"}
    db = aws.ec2.run_instances(
        ImageId=ami,
        MinCount=1,
        MaxCount=1,
        SubnetId=subnet,
        PrivateIpAddress=net.v4("db"),
        TagSpecifications=[{"ResourceType": "instance", "Tags": [{"Key": k, "Value": v} for k, v in tags.items()]}],
    )["Instances"][0]["InstanceId"]
    aws.put(aws.state_event(db, "running"))
    aws.pump()

    (tmp_path / "signing.pub.pem").write_bytes(aws.signing_key.public_pem())
    sock = listening_socket_in(net.ns("cp"), net.v4("cp"), 8080)
    sh("ip", "-n", net.ns("cp"), "addr", "replace", "169.254.169.254/32", "dev", "eth0")
    sh("ip", "-n", net.ns("db"), "route", "replace", "169.254.169.254/32", "dev", "eth0")
    tls = lab_tls(tmp_path / "tls", net.v4("cp"))
    url = f"https://{net.v4('cp')}:8080"

    def post(path: str, body: bytes, headers: dict[str, str]) -> tuple[int, Any]:
        f = tmp_path / "post.body"
        f.write_bytes(body)
        out = net.exec("cp", PY, "-c", _POST_IN_LAB, url + path, str(f), json.dumps(headers), str(tls.ca))
        assert out.returncode == 0, out.stderr
        answer = json.loads(out.stdout)
        return answer["status"], answer["body"]

    azweb_id = "6a000000-0000-4000-8000-00000000c001"
    notif = delivery_headers(SECRET)
    with ArmServer() as arm:
        azure = Azure(
            AzureConfig(subscriptions=[SUB], arm_url=arm.url, eventgrid_secret=SECRET), StaticTokenCredential("t")
        )
        app = serve.ServeApp.over(aws_wiring(), None, azure=azure)
        with (
            serve.serving(app, tls_cert=str(tls.cert), tls_key=str(tls.key), sock=sock),
            running_imds(aws, {net.v4("db"): db}.get, "169.254.169.254", net.ns("cp"), port=80) as imds_url,
        ):
            # the Azure web VM: written in ARM, its write event delivered by "Event Grid"
            seed_vm(arm, "web-1", azweb_id, net.v4("azweb"), PROD_WEB)
            write = arm_event(WRITE, vm_id("web-1"), "Microsoft.Compute/virtualMachines/write")
            status, answer = post("/azure/events", json.dumps([write]).encode(), notif)
            assert status == 200 and answer["changed"] == [azweb_id], answer
            # the GCP VM of another app (billing web, secure tags), its insert pushed by Pub/Sub
            inst = gcp.add_instance(PROJECT, ZONE, vm_name(), [net.v4("gcpweb")])
            for k, v in {"ringfence-role": "web", "ringfence-app": "billing", "ringfence-env": "prod"}.items():
                gcp.bind_tag(PROJECT, ZONE, inst["id"], ORG, k, v)
            pushed = push_body(audit_entry("v1.compute.instances.insert", inst))
            bearer = {"Authorization": f"Bearer {push_token(gcp)}", "content-type": "application/json"}
            status, answer = post("/gcp/events", pushed, bearer)
            assert status == 200, answer
            aws.pump()
            assert aws.store.get(azweb_id).labels["role"] == "web"
            assert aws.store.get(inst["id"]).labels["app"] == "billing"

            # no agent yet: everything reaches the database (what follows is the agent's doing)
            assert not net.mismatches(allowed=[P("gcpweb", "db", 5432), P("azweb", "db", 8080)])
            cfg = config(
                tmp_path,
                "nftables",
                workload_id=db,
                public_key=str(tmp_path / "signing.pub.pem"),
                api_url=url,
                tls_ca_file=str(tls.ca),
                enroll={"method": "aws-iid", "imds_url": imds_url},
                poll_interval=120,  # a change seen sooner came by the long-poll
                wait_timeout=10,
                request_timeout=5,
            )
            log = tmp_path / "run.log"
            daemon = net.spawn("db", str(net_agent()), "run", "--config", str(cfg), stderr=log.open("w"))
            try:
                assert wait_until(lambda: (tmp_path / "state" / "bundle.json").exists(), 30), log.read_text()
                assert wait_until(lambda: net.tcp("azweb", "db", 5432, timeout=0.5), 10), log.read_text()
                assert not net.mismatches(
                    dropped=[
                        P("azweb", "db", 8080),  # the same app, another port: nothing else
                        P("gcpweb", "db", 5432),  # another app's web server
                    ]
                )

                # a tag change in Azure (web-1 is no longer a web server): ARM, then its tag write event
                arm.put(vm_id("web-1"), {**arm.get(vm_id("web-1")), "tags": {**PROD_WEB, "ringfence:role": "batch"}})
                tag_write = arm_event(WRITE, vm_id("web-1"), "Microsoft.Resources/tags/write")
                status, answer = post("/azure/events", json.dumps([tag_write]).encode(), notif)
                assert status == 200 and answer["changed"] == [azweb_id], answer
                aws.pump()
                assert wait_until(lambda: not net.tcp("azweb", "db", 5432, timeout=0.3), 20), log.read_text()
                assert wait_until(lambda: "+0 -1 elements" in log.read_text(), 5), log.read_text()  # a set delta
            finally:
                # SIGKILL: a SIGTERM'd agent first sees its long-poll in flight out (wait_timeout,
                # 10 s), which nothing here examines
                net.kill(daemon)
