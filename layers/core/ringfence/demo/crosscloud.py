"""Step 6 of ``ringfence demo``: the same labels and the same policy on Azure and GCP (issue 11).

The demo's control plane (``ringfence serve`` over the embedded AWS, the router's handlers) also
serves ``POST /azure/events`` and ``POST /gcp/events``, configured at start against a local Azure
Resource Manager (:class:`ringfence.local.azure_arm.ArmServer`) and the local Google APIs
(:class:`ringfence.local.gcp_api.GcpApi`) — the same routes and ingest code as in a deployment,
reading the VMs back through the real SDK clients. The step:

* an Azure VM tagged ``ringfence:app=ordering, role=processing, env=prod`` in ``canadacentral``
  (``loc=ca`` by the example's region map, as the EC2 estate's ``ca-central-1``) is written in ARM
  and announced by an Event Grid delivery with the delivery secret (one without it is refused);
* a GCP VM of another app (secure tags ``ringfence-app=payroll, role=web, env=prod``, zone
  ``northamerica-northeast1-a``) is announced by a Pub/Sub push of its insert's audit entry with a
  signed OIDC token (one for another audience is refused);
* both VMs get a namespace at their addresses (no agent: what is enforced is the EC2 side's
  inbound), and real packets show: the Azure VM reaches the ordering database on 5432 and nothing
  else; the GCP VM is blocked there and reaches its own app's database;
* the Azure VM is retagged ``role=web`` in ARM and its tag write delivered: the database's agent
  gets a set delta (no new bundle) removing its address, and the web tier cannot skip to the
  database from Azure either — while web → processing now opens.

The example policy lets processing (not web) reach the database: the Azure VM starts as
processing so that its first flow is allowed by the policy every EC2 server lives under.
"""

from __future__ import annotations

import ipaddress
import json
import secrets
from dataclasses import dataclass
from typing import Any

from ringfence.demo.live import Flow, Live, _covers
from ringfence.local.azure_arm import ArmServer
from ringfence.local.azure_estate import SUB, retag, seed_vm, vm_id
from ringfence.local.gcp_api import GcpApi
from ringfence.local.gcp_project import NUMBER, PROJECT, gcp_environment, tagged_vm

STEP = 6
DB = "ord-prod-db-1"

AZ_NAME, AZ_ADDRESS = "az-ord-proc-1", "10.50.1.4"  # Azure gives a subnet's first VM .4
AZ_VM_ID = "6a000000-0000-4000-8000-00000000de01"  # its vmId: the workload id
AZ_LOCATION = "canadacentral"
AZURE_TAGS = {"ringfence:app": "ordering", "ringfence:role": "processing", "ringfence:env": "prod"}
AZURE_RETAG = {"ringfence:role": "web"}

GCP_NAME, GCP_ADDRESS = "gcp-pay-web-1", "10.60.1.2"  # GCP gives a subnet's first VM .2
GCP_ZONE = "northamerica-northeast1-a"
GCP_TAGS = {"ringfence-app": "payroll", "ringfence-role": "web", "ringfence-env": "prod"}


@dataclass
class OtherClouds:
    """The local Azure Resource Manager and Google APIs, on loopback of the control plane's
    namespace (the demo process and ``ringfence serve`` share it)."""

    arm: ArmServer
    gcp: GcpApi
    secret: str  # the Event Grid delivery secret serve checks

    @classmethod
    def start(cls) -> OtherClouds:
        arm = ArmServer().start()
        try:
            gcp = GcpApi().start()
        except BaseException:
            arm.stop()
            raise
        gcp.add_project(PROJECT, NUMBER)
        return cls(arm, gcp, secrets.token_urlsafe(24))

    def env(self) -> dict[str, str]:
        """What ``ringfence serve`` reads to serve both event routes (docs/deploy-azure.md, -gcp.md)."""
        return {
            "RINGFENCE_AZURE_SUBSCRIPTIONS": SUB,
            "RINGFENCE_AZURE_ARM_URL": self.arm.url,
            "RINGFENCE_EVENTGRID_SECRET": self.secret,
            **gcp_environment(self.gcp),
        }

    def describe(self) -> str:
        return (
            f"Azure Resource Manager at {self.arm.url} (subscription {SUB}), Google APIs at {self.gcp.url} "
            f"(project {PROJECT}); serve routes POST /azure/events and /gcp/events to them"
        )

    def stop(self) -> None:
        for server in (self.arm, self.gcp):
            try:
                server.stop()
            except Exception:  # noqa: S112 - cleanup goes on
                continue


def _post(d: Live, path: str, body: Any, headers: dict[str, str]) -> tuple[int, Any]:
    data = body if isinstance(body, bytes) else json.dumps(body).encode()
    return d.request("POST", path, data, headers)


def _labels(d: Live, wid: str) -> dict[str, str]:
    rec = d.store.get(wid)
    return dict(rec.labels) if rec is not None and rec.active else {}


def _db_journal(d: Live) -> tuple[int | None, int]:
    """The database agent's applied bundle version and how many deltas it applied on top."""
    from ringfence_agent.state import StateDir

    assert d.fleet is not None
    state = StateDir(d.fleet.get(d.iid(DB)).state_dir)
    bundle = state.load_bundle()
    if bundle is None:
        return None, 0
    return bundle.version, len(state.load_deltas(bundle))


def _removing(d: Live, since: int, address: str) -> dict[str, Any] | None:
    """The first delta the database agent applied after its ``since``-th that removes ``address``."""
    from ringfence_agent.state import StateDir

    assert d.fleet is not None
    state = StateDir(d.fleet.get(d.iid(DB)).state_dir)
    ip = ipaddress.ip_address(address)
    for delta in state.load_deltas()[since:]:
        if any(ip in ipaddress.ip_network(c, strict=False) for c in delta.remove):
            return {
                "set": delta.set,
                "from_version": delta.from_version,
                "to_version": delta.to_version,
                "add": list(delta.add),
                "remove": list(delta.remove),
            }
    return None


def step_cross_cloud(d: Live) -> None:
    from ringfence.clouds.azure.events import WRITE
    from ringfence.local.eventgrid import arm_event, delivery_headers
    from ringfence.local.gcp_events import audit_entry, push_body, push_headers, push_token

    with d.r.step(STEP, "cross-cloud: an Azure VM and a GCP VM under the same labels and policy") as st:
        assert d.clouds is not None and d.fleet is not None
        arm, gcp, secret = d.clouds.arm, d.clouds.gcp, d.clouds.secret
        if d.lab is None:
            d.r.say(
                "dry run: the Azure and GCP VMs get no namespace and send no packet; each flow is judged on "
                "the EC2 end's applied plan"
            )
        d.add_host(AZ_NAME, AZ_ADDRESS)
        d.add_host(GCP_NAME, GCP_ADDRESS)

        # --- Azure: the VM in ARM, its write event delivered by "Event Grid" to POST /azure/events
        tags = ", ".join(f"{k}={v}" for k, v in AZURE_TAGS.items())
        d.r.say(f"Azure: VM {AZ_NAME} {AZ_ADDRESS} in {AZ_LOCATION}, tagged {tags}")
        seed_vm(arm, AZ_NAME, AZ_VM_ID, AZ_ADDRESS, dict(AZURE_TAGS), location=AZ_LOCATION)
        write = [arm_event(WRITE, vm_id(AZ_NAME), "Microsoft.Compute/virtualMachines/write")]
        refused, _ = _post(d, "/azure/events", write, delivery_headers("not-the-secret"))
        d.r.check("Event Grid delivery without the delivery secret refused (HTTP)", 401, refused)
        d.r.check(f"{AZ_NAME} not in the inventory after the refused delivery", {}, _labels(d, AZ_VM_ID))
        answers: list[tuple[int, Any]] = []
        s = d.measure(
            "cross_cloud",
            f"{AZ_NAME} announced (Event Grid)",
            lambda: answers.append(_post(d, "/azure/events", write, delivery_headers(secret))),
            lambda: bool(_labels(d, AZ_VM_ID)),
            answered_phase="ingest",
        )
        status, body = answers[0] if answers else (None, None)
        d.r.say(
            f"  POST /azure/events → {status} {json.dumps(body)[:160]}; enforced by {s.agents} agents after {s.seconds}s"
        )
        d.r.check("POST /azure/events took the VM's write event", f"200 {[AZ_VM_ID]}", _answer(status, body))
        az_labels = _labels(d, AZ_VM_ID)
        d.r.check(
            f"{AZ_NAME}'s labels (tags, loc from its region)",
            "app=ordering env=prod loc=ca role=processing",
            _words(az_labels),
        )
        d.r.check(f"{AZ_NAME}'s arrival enforced by every affected agent", True, s.seconds is not None)

        # --- GCP: a VM of another app, its insert's audit entry pushed by Pub/Sub to POST /gcp/events
        inst = tagged_vm(gcp, [GCP_ADDRESS], GCP_TAGS, name=GCP_NAME, zone=GCP_ZONE)
        gtags = ", ".join(f"{k}={v}" for k, v in GCP_TAGS.items())
        d.r.say(f"GCP: VM {GCP_NAME} {GCP_ADDRESS} in {GCP_ZONE}, secure tags {gtags}")
        pushed = push_body(audit_entry("v1.compute.instances.insert", inst))
        foreign = push_token(gcp, audience="https://elsewhere.example.com/gcp/events")
        refused, _ = _post(d, "/gcp/events", pushed, push_headers(foreign))
        d.r.check("Pub/Sub push with a token for another audience refused (HTTP)", 401, refused)
        d.r.check(f"{GCP_NAME} not in the inventory after the refused push", {}, _labels(d, inst["id"]))
        answers.clear()
        s = d.measure(
            "cross_cloud",
            f"{GCP_NAME} announced (Pub/Sub push)",
            lambda: answers.append(_post(d, "/gcp/events", pushed, push_headers(push_token(gcp)))),
            lambda: bool(_labels(d, inst["id"])),
            answered_phase="ingest",
        )
        status, body = answers[0] if answers else (None, None)
        d.r.say(
            f"  POST /gcp/events → {status} {json.dumps(body)[:160]}; enforced by {s.agents} agents after {s.seconds}s"
        )
        d.r.check("POST /gcp/events took the verified push", f"200 {[inst['id']]}", _answer(status, body))
        gcp_labels = _labels(d, inst["id"])
        d.r.check(
            f"{GCP_NAME}'s labels (secure tags, loc from its region)",
            "app=payroll env=prod loc=ca role=web",
            _words(gcp_labels),
        )
        d.r.check(f"{GCP_NAME}'s arrival enforced by every affected agent", True, s.seconds is not None)

        d.r.check(f"{DB}'s firewall sets hold {AZ_NAME}", True, _covers(d.set_addresses(DB), AZ_ADDRESS))
        d.expect_flows(
            [
                Flow(AZ_NAME, DB, "tcp/5432", True, "Azure processing → EC2 database"),
                Flow(AZ_NAME, DB, "tcp/22", False, "nothing else: SSH is the jumpbox's"),
                Flow(AZ_NAME, "ord-dev-db-1", "tcp/5432", False, "another env's database"),
                Flow(AZ_NAME, "pay-prod-db-1", "tcp/1433", False, "another app's database"),
                Flow(GCP_NAME, DB, "tcp/5432", False, "GCP VM of another app (payroll)"),
                Flow(GCP_NAME, "pay-prod-db-1", "tcp/1433", True, "GCP payroll web → its own database"),
            ]
        )

        # --- a tag change in Azure: the database agent's sets lose the VM by a delta
        before_bundle, before_deltas = _db_journal(d)
        change = ", ".join(f"{k}={v}" for k, v in AZURE_RETAG.items())
        d.r.say(f"Azure: {AZ_NAME} retagged {change} in ARM; its tag write delivered by Event Grid")
        tag_write = [
            arm_event(
                WRITE,
                vm_id(AZ_NAME),
                "Microsoft.Resources/tags/write",
                f"{vm_id(AZ_NAME)}/providers/Microsoft.Resources/tags/default",
            )
        ]
        answers.clear()

        def retagged() -> None:
            retag(arm, vm_id(AZ_NAME), AZURE_RETAG)
            answers.append(_post(d, "/azure/events", tag_write, delivery_headers(secret)))

        s = d.measure(
            "cross_cloud",
            f"{AZ_NAME} {change} (Event Grid)",
            retagged,
            lambda: _labels(d, AZ_VM_ID).get("role") == AZURE_RETAG["ringfence:role"],
            answered_phase="ingest",
        )
        status, body = answers[0] if answers else (None, None)
        d.r.say(f"  POST /azure/events → {status}; enforced by {s.agents} agents after {s.seconds}s")
        d.r.check("POST /azure/events took the tag write", f"200 {[AZ_VM_ID]}", _answer(status, body))
        d.r.check(f"{AZ_NAME}'s tag change enforced by every affected agent", True, s.seconds is not None)
        after_bundle, _ = _db_journal(d)
        delta = _removing(d, before_deltas, AZ_ADDRESS)
        if delta is not None:
            d.r.say(
                f"  {DB}: set {delta['set']} {delta['from_version']} → {delta['to_version']}, "
                f"+{len(delta['add'])} -{len(delta['remove'])} elements"
            )
        d.r.check(f"{DB} got the change as a set delta removing {AZ_ADDRESS}", True, delta is not None)
        d.r.check(f"{DB} still on bundle v{before_bundle} (no whole bundle sent)", before_bundle, after_bundle)
        d.r.check(f"{DB}'s firewall sets still hold {AZ_NAME}", False, _covers(d.set_addresses(DB), AZ_ADDRESS))
        d.expect_flows(
            [
                Flow(AZ_NAME, DB, "tcp/5432", False, "now web: web skips a tier, as on EC2"),
                Flow(AZ_NAME, "ord-prod-proc-1", "tcp/8443", True, "now web: web → processing"),
            ]
        )
        st.timings["azure_vm"] = {
            "name": AZ_NAME,
            "vm_id": AZ_VM_ID,
            "arm_id": vm_id(AZ_NAME),
            "address": AZ_ADDRESS,
            "location": AZ_LOCATION,
            "labels": az_labels,
            "labels_after_retag": _labels(d, AZ_VM_ID),
        }
        st.timings["gcp_vm"] = {
            "name": GCP_NAME,
            "instance_id": inst["id"],
            "address": GCP_ADDRESS,
            "zone": GCP_ZONE,
            "labels": gcp_labels,
        }
        st.timings["db_delta"] = {"bundle_version": after_bundle, "delta": delta}


def _answer(status: int | None, body: Any) -> str:
    changed = body.get("changed") if isinstance(body, dict) else body
    return f"{status} {changed}"


def _words(labels: dict[str, str]) -> str:
    return " ".join(f"{k}={v}" for k, v in sorted(labels.items())) or "none"
