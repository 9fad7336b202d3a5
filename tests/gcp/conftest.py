"""The GCP side against the local Google API stand-in (:mod:`ringfence.local.gcp_api`), one server
per test module, through the real SDK clients; the control plane is the local wiring (SQLite)."""

from __future__ import annotations

import json
from collections.abc import Iterator
from typing import Any

import pytest

from ringfence.clouds.gcp.ingest import GcpIngest
from ringfence.clouds.onprem import OnPremAdmin
from ringfence.local.gcp_api import GcpApi
from ringfence.local.gcp_events import audit_entry, logged, push_body, push_token
from ringfence.local.gcp_project import NUMBER, PROJECT, TAGGER, ZONE, tagged_vm
from ringfence.local.wiring import LocalWiring
from ringfence.routes.gcp import EVENTS_PATH, gcp_event_routes
from ringfence.serve import proxy_event
from tests.onprem.conftest import policy_files, signing_key_file


@pytest.fixture(scope="module")
def gcp() -> Iterator[GcpApi]:
    with GcpApi() as api:
        api.add_project(PROJECT, NUMBER)
        yield api


def web_vm(api: GcpApi, ip: str) -> dict[str, Any]:
    """A VM with the secure tags of an ordering web server in prod."""
    return tagged_vm(api, [ip], {"ringfence-role": "web", "ringfence-app": "ordering", "ringfence-env": "prod"})


def post(ingest: GcpIngest, body: bytes, token: str | None) -> tuple[int, Any]:
    headers = [("Authorization", f"Bearer {token}")] if token else []
    event = proxy_event("POST", EVENTS_PATH, headers, [], body, "127.0.0.1")
    out = gcp_event_routes(lambda: ingest).resolve(event, None)
    return out["statusCode"], json.loads(out["body"])


def deliver(gcp: GcpApi, ingest: GcpIngest, entry: dict[str, Any]) -> dict[str, Any]:
    """A genuine entry: written to Cloud Logging (the local API's), then pushed by the sink."""
    logged(gcp, entry)
    status, body = post(ingest, push_body(entry), push_token(gcp))
    assert status == 200, body
    return body


def set_labels(gcp: GcpApi, inst: dict[str, Any], labels: dict[str, str], **how: Any) -> dict[str, Any]:
    """Set the VM's whole label set (in ZONE) and return the setLabels audit entry of that call
    (``how``: :func:`audit_entry`'s principal, operation, first/last), to deliver or replay."""
    gcp.set_labels(PROJECT, ZONE, inst["name"], labels)
    request = {"labels": [{"key": k, "value": v} for k, v in labels.items()]}
    return audit_entry("v1.compute.instances.setLabels", inst, request=request, **how)


def gcp_policy_files() -> dict[str, str]:
    """The example policy, with a GCP service account among the allowed taggers."""
    files = policy_files()
    files["labels.yaml"] = files["labels.yaml"].replace(
        'taggers: ["arn:aws:iam::123456789012:role/ringfence-tagging"]',
        f'taggers: ["arn:aws:iam::123456789012:role/ringfence-tagging", "{TAGGER}"]',
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
