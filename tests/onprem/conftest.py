"""The local control plane (LocalWiring: SQLite store, file publisher, compute worker) on a tmp dir."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest

from ringfence.bundle import SigningKey
from ringfence.clouds.onprem import OnPremAdmin
from ringfence.local.wiring import LocalWiring
from tests.aws.conftest import LABEL_TESTS, POLICY_DIR

ESTATE = [
    {
        "id": "dc1-web-1",
        "ips": ["192.168.10.11"],
        "tags": {"ringfence:role": "web", "ringfence:app": "ordering", "ringfence:env": "prod", "ringfence:loc": "ca"},
    },
    {
        "id": "dc1-proc-1",
        "ips": ["192.168.10.21"],
        "tags": {
            "ringfence:role": "processing",
            "ringfence:app": "ordering",
            "ringfence:env": "prod",
            "ringfence:loc": "ca",
        },
    },
    {
        "id": "dc1-db-1",
        "ips": ["192.168.10.31"],
        "tags": {
            "ringfence:role": "database",
            "ringfence:app": "ordering",
            "ringfence:env": "prod",
            "ringfence:loc": "ca",
        },
    },
]


def policy_files() -> dict[str, str]:
    files = {p.name: p.read_text() for p in sorted(POLICY_DIR.glob("*.yaml")) if p.name != "tests.yaml"}
    files["tests.yaml"] = LABEL_TESTS
    return files


def signing_key_file(d: Path) -> Path:
    key = SigningKey.generate()
    key.write(d / "signing.pem", d / "signing.pub.pem")
    return d / "signing.pem"


@pytest.fixture
def wiring(tmp_path: Path) -> Iterator[LocalWiring]:
    w = LocalWiring(tmp_path / "state" / "state.db", signing_key=signing_key_file(tmp_path))
    yield w
    w.close()


def boot(w: LocalWiring) -> OnPremAdmin:
    """The example policy provisioned over a small registered on-premise estate, computed."""
    admin = OnPremAdmin(w)
    for spec in ESTATE:
        assert admin.register_workload("alice", spec).status == 201
    r = admin.provision("alice", policy_files(), "initial")
    assert r.status == 201, r.body
    assert w.settle(60)
    return admin
