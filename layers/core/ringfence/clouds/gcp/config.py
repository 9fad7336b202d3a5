"""The GCP side's configuration (environment ``RINGFENCE_GCP_*``), apart from the AWS stack's."""

from __future__ import annotations

import os
import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field

from .clients import Endpoints
from .instances import LabelSource
from .oidc import GOOGLE_JWKS


@dataclass
class GcpConfig:
    # project id → project number: the projects this control plane serves (events and enrollments
    # of any other project are refused); the number names the VM in tag bindings
    projects: dict[str, int] = field(default_factory=dict)
    label_source: LabelSource = LabelSource.SECURE_TAGS
    # secure tag keys are trusted only under these parents (organizations/N, projects/NUMBER):
    # required where secure tags are a label source (a project owner can create a key of the same
    # short name in their project); checked when the configuration is made
    tag_parents: list[str] = field(default_factory=list)
    # the audience of instance identity tokens (agents request it); empty: gcp-jwt is off
    identity_audience: str = ""
    # the audience of Pub/Sub push / Eventarc tokens (the push endpoint's URL) and who may push
    events_audience: str = ""
    push_service_accounts: list[str] = field(default_factory=list)
    jwks_url: str = GOOGLE_JWKS
    endpoints: Endpoints = field(default_factory=Endpoints)
    identity_token_ttl: int = 3600  # how long a used token is remembered (Google's tokens last 1 h)

    def __post_init__(self) -> None:
        check_tag_parents(self.tag_parents, self.label_source)

    @classmethod
    def from_env(cls, env: Mapping[str, str] | None = None) -> GcpConfig:
        e = os.environ if env is None else env
        projects: dict[str, int] = {}
        for item in e.get("RINGFENCE_GCP_PROJECTS", "").split(","):
            if not item.strip():
                continue
            pid, sep, num = item.strip().partition("=")
            if not sep or not num.isdigit():
                raise ValueError(f"RINGFENCE_GCP_PROJECTS: {item!r} is not PROJECT_ID=PROJECT_NUMBER")
            projects[pid] = int(num)
        source = e.get("RINGFENCE_GCP_LABEL_SOURCE", LabelSource.SECURE_TAGS.value)
        try:
            label_source = LabelSource(source)
        except ValueError:
            raise ValueError(
                f"RINGFENCE_GCP_LABEL_SOURCE must be one of {', '.join(s.value for s in LabelSource)}, not {source!r}"
            ) from None
        return cls(
            projects=projects,
            label_source=label_source,
            tag_parents=_list(e.get("RINGFENCE_GCP_TAG_PARENTS", "")),
            identity_audience=e.get("RINGFENCE_GCP_IDENTITY_AUDIENCE", ""),
            events_audience=e.get("RINGFENCE_GCP_EVENTS_AUDIENCE", ""),
            push_service_accounts=_list(e.get("RINGFENCE_GCP_PUSH_SERVICE_ACCOUNTS", "")),
            jwks_url=e.get("RINGFENCE_GCP_JWKS_URL", "") or GOOGLE_JWKS,
            endpoints=Endpoints(
                compute=e.get("RINGFENCE_GCP_COMPUTE_ENDPOINT") or None,
                resource_manager=e.get("RINGFENCE_GCP_RESOURCE_MANAGER_ENDPOINT") or None,
                logging=e.get("RINGFENCE_GCP_LOGGING_ENDPOINT") or None,
                anonymous=e.get("RINGFENCE_GCP_ANONYMOUS", "") == "1",
                credentials_config=e.get("RINGFENCE_GCP_CREDENTIALS") or None,
            ),
        )

    def project_of_number(self, number: str) -> str | None:
        return next((p for p, n in self.projects.items() if str(n) == number), None)


def _list(value: str) -> list[str]:
    return [v.strip() for v in value.split(",") if v.strip()]


# what Resource Manager names a tag key's parent (EffectiveTag.tagKeyParentName, which
# secure_tags() compares): an organization by its id, a project by its number; never a folder
_TAG_PARENT = re.compile(r"(organizations|projects)/[0-9]+")


def check_tag_parents(parents: Sequence[str], source: LabelSource) -> None:
    """Refuse a configuration that would trust secure tag keys of any parent, or name a parent in a
    form no tag key's parent ever has (it would match nothing, silently). Raises ValueError."""
    for p in parents:
        if _TAG_PARENT.fullmatch(p):
            continue
        if p.startswith("folders/"):
            hint = "tag keys are created under an organization or a project, never a folder"
        elif p.startswith("projects/"):
            hint = "a project is named by its number here (projects/123456789012), as tagKeyParentName names it"
        else:
            hint = "write organizations/ORGANIZATION_ID (or projects/PROJECT_NUMBER)"
        raise ValueError(f"RINGFENCE_GCP_TAG_PARENTS: {p!r} is not a tag key parent: {hint}")
    if not parents and source is not LabelSource.LABELS:
        raise ValueError(
            f"RINGFENCE_GCP_TAG_PARENTS is empty, and secure tags are a label source "
            f"(RINGFENCE_GCP_LABEL_SOURCE={source.value}): a tag key would be trusted under any parent, "
            "and any project owner can create one named like ours (ringfence-role) in their project. "
            "Set it to the organization that holds the ringfence-* tag keys, organizations/ORGANIZATION_ID "
            "(`gcloud organizations list`), comma-separated if there are several"
        )
