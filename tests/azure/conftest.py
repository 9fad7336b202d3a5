"""Azure tests: the real azure-mgmt clients against the local ARM server (one per module), over
the local control plane (LocalWiring) with the example policy provisioned."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest

from ringfence.clouds.azure.arm import StaticTokenCredential
from ringfence.clouds.azure.wiring import Azure, AzureConfig, attach
from ringfence.control.wiring import Config
from ringfence.local.azure_arm import ArmServer
from ringfence.local.azure_estate import SUB
from ringfence.local.wiring import LocalWiring
from tests.onprem.conftest import policy_files, signing_key_file

OTHER_SUB = "9c2f0000-0000-4000-8000-000000000009"
SECRET = "s3cret-delivery-value"

PROD_WEB = {"ringfence:app": "ordering", "ringfence:role": "web", "ringfence:env": "prod"}


@pytest.fixture(scope="module")
def arm() -> Iterator[ArmServer]:
    with ArmServer(page_size=2) as server:
        yield server


@pytest.fixture
def azure(arm: ArmServer) -> Iterator[Azure]:
    yield Azure(
        AzureConfig(subscriptions=[SUB], arm_url=arm.url, eventgrid_secret=SECRET),
        StaticTokenCredential("local-arm-token"),
    )
    arm.resources.clear()


@pytest.fixture
def wiring(tmp_path: Path, azure: Azure) -> Iterator[LocalWiring]:
    """The local control plane with the example policy and azure-attested enrollment offered."""
    from ringfence.clouds.onprem import OnPremAdmin

    cfg = Config(enroll_methods=["pairing", "azure-attested"])
    w = LocalWiring(tmp_path / "state" / "state.db", signing_key=signing_key_file(tmp_path), cfg=cfg)
    attach(w, azure)
    r = OnPremAdmin(w).provision("alice", policy_files(), "initial")
    assert r.status == 201, r.body
    yield w
    w.close()
