"""What ``serve --user`` costs compute: signing bundle manifests through the signer process (a
pipe round trip each) against the key in this process, the same manifests both ways (1,000
bundles for 1,000 workloads). Under the default ``--benchmark-disable`` each runs once as a
smoke test; ``pytest tests/bench/test_signer_bench.py --benchmark-enable`` times them."""

from __future__ import annotations

import os
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from ringfence import bundle
from ringfence.bundlewire import Signer
from ringfence.local.signer_process import SignerProcess

BUNDLES = 1000
pytestmark = pytest.mark.skipif(os.geteuid() != 0, reason="the signer takes a root-owned key only")


@pytest.fixture(scope="module")
def key_path(tmp_path_factory: pytest.TempPathFactory) -> Path:
    d = tmp_path_factory.mktemp("signer")
    d.chmod(0o700)
    bundle.SigningKey.generate().write(d / "signing.pem", d / "signing.pub.pem")
    return d / "signing.pem"


@pytest.fixture(scope="module")
def signer_process(key_path: Path) -> Iterator[SignerProcess]:
    s = SignerProcess.spawn(key_path)
    yield s
    s.close()


GOLDEN = bundle.load_bundle((Path(__file__).parents[1] / "golden" / "bundle-ord-prod-db-1.json").read_text())
DOCS = [GOLDEN.model_copy(update={"workload_id": f"wl-{i}", "signature": None}) for i in range(BUNDLES)]


def sign_all(signer: Signer) -> list[bundle.Bundle]:
    expires = int(time.time()) + 86400  # within the signer's bundle lifetime
    return [bundle.sign(d, signer, expires_at=expires) for d in DOCS]


def test_bench_sign_in_process(benchmark: Any, key_path: Path) -> None:
    signed = benchmark(sign_all, bundle.SigningKey.from_file(key_path))
    assert len(signed) == BUNDLES


def test_bench_sign_through_the_signer_process(benchmark: Any, key_path: Path, signer_process: SignerProcess) -> None:
    signed = benchmark(sign_all, signer_process)
    verifier = bundle.Verifier.from_file(key_path.with_name("signing.pub.pem"))
    verifier.verify(signed[-1])
    assert len(signed) == BUNDLES
