"""A GCP project on the local Google APIs (:class:`ringfence.local.gcp_api.GcpApi`): its ids, the
control plane's configuration for it and the environment ``ringfence serve`` reads it from, and
VMs labelled by secure tags (tests and the demo)."""

from __future__ import annotations

import uuid
from collections.abc import Mapping
from typing import Any

from ringfence.clouds.gcp.clients import Endpoints
from ringfence.clouds.gcp.config import GcpConfig
from ringfence.clouds.gcp.instances import LabelSource
from ringfence.local.gcp_api import GcpApi

PROJECT, NUMBER, ZONE, ORG = "shop-prod", 4711, "europe-west1-b", "987654"
TAGGER = "tagger@shop-prod.iam.gserviceaccount.com"  # who changes tags (the audit entries' principal)
PUSHER = "eventarc-push@shop-prod.iam.gserviceaccount.com"  # the push subscription's service account
EVENTS_AUDIENCE = "https://ringfence.example.com/gcp/events"
IDENTITY_AUDIENCE = "ringfence-agent-api"


def gcp_config(api: GcpApi, source: LabelSource = LabelSource.SECURE_TAGS) -> GcpConfig:
    """The control plane's GCP configuration for :data:`PROJECT` served by ``api`` (secure tag keys
    trusted under :data:`ORG` only)."""
    return GcpConfig(
        projects={PROJECT: NUMBER},
        label_source=source,
        tag_parents=[f"organizations/{ORG}"],
        identity_audience=IDENTITY_AUDIENCE,
        events_audience=EVENTS_AUDIENCE,
        push_service_accounts=[PUSHER],
        jwks_url=api.jwks_url,
        endpoints=Endpoints(compute=api.url, resource_manager=api.url, logging=api.url, anonymous=True),
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
        "RINGFENCE_GCP_LOGGING_ENDPOINT": api.url,
        "RINGFENCE_GCP_ANONYMOUS": "1",
    }


def vm_name() -> str:
    return f"vm-{uuid.uuid4().hex[:8]}"


def tagged_vm(
    api: GcpApi, ips: list[str], tags: Mapping[str, str], name: str | None = None, zone: str = ZONE
) -> dict[str, Any]:
    """A VM of :data:`PROJECT` with the secure tags ``tags`` (short key → value, e.g.
    ``{"ringfence-role": "web"}``) bound under :data:`ORG`."""
    inst = api.add_instance(PROJECT, zone, name or vm_name(), ips)
    for k, v in tags.items():
        api.bind_tag(PROJECT, zone, inst["id"], ORG, k, v)
    return inst
