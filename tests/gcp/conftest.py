"""The GCP side against the local Google API stand-in (:mod:`ringfence.local.gcp_api`), one server
per test module, through the real SDK clients; the control plane is the local wiring (SQLite)."""

from __future__ import annotations

import base64
import json
import time
import uuid
from collections.abc import Iterator
from typing import Any

import pytest

from ringfence.clouds.gcp.clients import Endpoints
from ringfence.clouds.gcp.config import GcpConfig
from ringfence.clouds.gcp.instances import LabelSource
from ringfence.clouds.onprem import OnPremAdmin
from ringfence.local.gcp_api import GcpApi
from ringfence.local.wiring import LocalWiring
from tests.onprem.conftest import policy_files, signing_key_file

PROJECT, NUMBER, ZONE, ORG = "shop-prod", 4711, "europe-west1-b", "987654"
TAGGER = "tagger@shop-prod.iam.gserviceaccount.com"
PUSHER = "eventarc-push@shop-prod.iam.gserviceaccount.com"
EVENTS_AUDIENCE = "https://ringfence.example.com/gcp/events"
IDENTITY_AUDIENCE = "ringfence-agent-api"


@pytest.fixture(scope="module")
def gcp() -> Iterator[GcpApi]:
    with GcpApi() as api:
        api.add_project(PROJECT, NUMBER)
        yield api


def gcp_config(api: GcpApi, source: LabelSource = LabelSource.SECURE_TAGS) -> GcpConfig:
    return GcpConfig(
        projects={PROJECT: NUMBER},
        label_source=source,
        tag_parents=[f"organizations/{ORG}"],
        identity_audience=IDENTITY_AUDIENCE,
        events_audience=EVENTS_AUDIENCE,
        push_service_accounts=[PUSHER],
        jwks_url=api.jwks_url,
        endpoints=Endpoints(compute=api.url, resource_manager=api.url, anonymous=True),
    )


def gcp_environment(api: GcpApi) -> dict[str, str]:
    """The RINGFENCE_GCP_* environment of a control plane served by ``api`` (serve, the function)."""
    return {
        "RINGFENCE_GCP_PROJECTS": f"{PROJECT}={NUMBER}",
        "RINGFENCE_GCP_TAG_PARENTS": f"organizations/{ORG}",
        "RINGFENCE_GCP_EVENTS_AUDIENCE": EVENTS_AUDIENCE,
        "RINGFENCE_GCP_PUSH_SERVICE_ACCOUNTS": PUSHER,
        "RINGFENCE_GCP_IDENTITY_AUDIENCE": IDENTITY_AUDIENCE,
        "RINGFENCE_GCP_JWKS_URL": api.jwks_url,
        "RINGFENCE_GCP_COMPUTE_ENDPOINT": api.url,
        "RINGFENCE_GCP_RESOURCE_MANAGER_ENDPOINT": api.url,
        "RINGFENCE_GCP_ANONYMOUS": "1",
    }


def web_vm(api: GcpApi, ip: str) -> dict[str, Any]:
    """A VM with the secure tags of an ordering web server in prod."""
    inst = api.add_instance(PROJECT, ZONE, vm_name(), [ip])
    for k, v in {"ringfence-role": "web", "ringfence-app": "ordering", "ringfence-env": "prod"}.items():
        api.bind_tag(PROJECT, ZONE, inst["id"], ORG, k, v)
    return inst


def gcp_policy_files() -> dict[str, str]:
    """The example policy, with a GCP service account among the allowed taggers."""
    files = policy_files()
    files["labels.yaml"] = files["labels.yaml"].replace(
        'taggers: ["arn:aws:iam::*:role/ringfence-tagging"]',
        f'taggers: ["arn:aws:iam::*:role/ringfence-tagging", "{TAGGER}"]',
    )
    assert TAGGER in files["labels.yaml"]
    return files


@pytest.fixture(scope="module")
def wiring(tmp_path_factory: pytest.TempPathFactory) -> Iterator[LocalWiring]:
    """One provisioned control plane per module (each test works on VMs of its own)."""
    tmp_path = tmp_path_factory.mktemp("gcp")
    w = LocalWiring(tmp_path / "state" / "state.db", signing_key=signing_key_file(tmp_path))
    w.cfg.enroll_methods.append("gcp-jwt")
    r = OnPremAdmin(w).provision("alice", gcp_policy_files(), "initial")
    assert r.status == 201, r.body
    yield w
    w.close()


def vm_name() -> str:
    return f"vm-{uuid.uuid4().hex[:8]}"


# --- audit log entries, shaped as cloud_events.md §3.2/§3.3 ---------------------------------------


def audit_entry(
    method: str,
    inst: dict[str, Any],
    *,
    principal: str = TAGGER,
    request: dict[str, Any] | None = None,
    first: bool = True,
    last: bool = True,
    operation: str | None = None,
    severity: str = "NOTICE",
) -> dict[str, Any]:
    zone = inst["zone"].rsplit("/", 1)[-1]
    project = inst["selfLink"].split("/projects/", 1)[1].split("/", 1)[0]
    entry: dict[str, Any] = {
        "protoPayload": {
            "@type": "type.googleapis.com/google.cloud.audit.AuditLog",
            "serviceName": "compute.googleapis.com",
            "methodName": method,
            "resourceName": f"projects/{project}/zones/{zone}/instances/{inst['name']}",
            "authenticationInfo": {"principalEmail": principal},
            "response": {"@type": "type.googleapis.com/operation", "targetId": inst["id"], "status": "RUNNING"},
        },
        "insertId": uuid.uuid4().hex[:12],
        "resource": {
            "type": "gce_instance",
            "labels": {"zone": zone, "instance_id": inst["id"], "project_id": project},
        },
        "timestamp": "2026-12-02T14:00:00.000Z",
        "severity": severity,
        "logName": f"projects/{project}/logs/cloudaudit.googleapis.com%2Factivity",
    }
    if request is not None and first:
        entry["protoPayload"]["request"] = request
    if operation is not None:
        entry["operation"] = {"id": operation, "producer": "compute.googleapis.com", "first": first, "last": last}
        if first and not last:
            entry["operation"]["first"] = True
    return entry


def push_body(entry: dict[str, Any]) -> bytes:
    """A Pub/Sub push delivery of ``entry``."""
    data = base64.b64encode(json.dumps(entry).encode()).decode()
    return json.dumps(
        {
            "message": {"data": data, "messageId": uuid.uuid4().hex, "publishTime": "2026-12-02T14:00:01Z"},
            "subscription": f"projects/{PROJECT}/subscriptions/ringfence-push",
        }
    ).encode()


def push_token(api: GcpApi, *, email: str = PUSHER, audience: str = EVENTS_AUDIENCE, **extra: Any) -> str:
    now = int(time.time())
    claims = {
        "aud": audience,
        "azp": "1234",
        "email": email,
        "email_verified": True,
        "exp": now + 3600,
        "iat": now,
        "iss": "https://accounts.google.com",
        "sub": "1234",
        **extra,
    }
    return api.sign_token(claims)
