"""The GCP side against the local Google API stand-in (:mod:`ringfence.local.gcp_api`), one server
per test module, through the real SDK clients; the control plane is the local wiring (SQLite)."""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import pytest

from ringfence.clouds.onprem import OnPremAdmin
from ringfence.local.gcp_api import GcpApi
from ringfence.local.gcp_project import NUMBER, PROJECT, TAGGER, tagged_vm
from ringfence.local.wiring import LocalWiring
from tests.onprem.conftest import policy_files, signing_key_file


@pytest.fixture(scope="module")
def gcp() -> Iterator[GcpApi]:
    with GcpApi() as api:
        api.add_project(PROJECT, NUMBER)
        yield api


def web_vm(api: GcpApi, ip: str) -> dict[str, Any]:
    """A VM with the secure tags of an ordering web server in prod."""
    return tagged_vm(api, [ip], {"ringfence-role": "web", "ringfence-app": "ordering", "ringfence-env": "prod"})


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
