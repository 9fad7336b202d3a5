"""The one gate for dataplane test modules: skip where root, namespaces or nftables are truly
absent, but fail in CI, where they are present and the tests must run. And the fixtures they
share: one lab per module (:func:`lab_fixture`), the host the tests program reset around each
test (:func:`reset_fixture`), and both backends (:func:`backend_fixture`)."""

from __future__ import annotations

import os
import shutil
from collections.abc import Callable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from typing import Any

import pytest

from ringfence.local.lab import Lab as NetLab
from ringfence.local.lab import prerequisites

BACKENDS = ["nftables", "iptables"]


def require() -> None:
    """Call at module level, before the tests are defined."""
    why = prerequisites()
    if why is None:
        return
    if os.environ.get("CI") == "true":
        raise RuntimeError(f"dataplane tests must run in CI but cannot: {why}")
    pytest.skip(f"dataplane tests skipped: {why}", allow_module_level=True)


def iptables_or_skip() -> None:
    """Skip a test that needs iptables-restore and ipset where they are missing; fail in CI."""
    if shutil.which("iptables-restore") is None or shutil.which("ipset") is None:
        if os.environ.get("CI") == "true":
            pytest.fail("iptables/ipset missing in CI (make sysdeps)")
        pytest.skip("iptables-restore / ipset not installed")


@contextmanager
def lab(
    hosts: Mapping[str, int], tcp: Mapping[str, Sequence[int]], udp: Mapping[str, Sequence[int]] = {}
) -> Iterator[NetLab]:
    """A lab of ``hosts`` (name → last octet), each host of ``tcp``/``udp`` serving those ports;
    closed on leaving, whatever happened (its namespaces, named after this process, are deleted:
    pytest-xdist workers never share one)."""
    net = NetLab(hosts)
    try:
        for host in {**tcp, **udp}:
            net.serve(host, tcp=tcp.get(host, ()), udp=udp.get(host, ()))
        yield net
    finally:
        net.close()


def lab_fixture(
    hosts: Mapping[str, int], tcp: Mapping[str, Sequence[int]], udp: Mapping[str, Sequence[int]] = {}
) -> Callable[..., Any]:
    """The module-scoped fixture ``net``, the :func:`lab` of these arguments:
    ``net = dataplane.lab_fixture(HOSTS, {"h2": [22, 8080]})`` at module level."""

    @pytest.fixture(scope="module", name="net")
    def net() -> Iterator[NetLab]:
        with lab(hosts, tcp, udp) as made:
            yield made

    return net


def reset_fixture(host: str = "h2", tables: Sequence[str] = (), after: bool = True) -> Callable[..., Any]:
    """The autouse fixture ``clean``: what Ringfence programmed in ``host`` removed before each
    test (and after it, with ``after``), and the nftables ``tables`` ("family name") a test may
    have added there deleted first."""

    def drop(net: NetLab) -> None:
        for table in tables:
            net.exec(host, "nft", "delete", "table", *table.split())

    @pytest.fixture(autouse=True, name="clean")
    def clean(net: NetLab) -> Iterator[None]:
        net.reset(host)
        drop(net)
        yield
        if after:
            drop(net)
            net.reset(host)

    return clean


def backend_fixture() -> Callable[..., Any]:
    """The module-scoped fixture ``backend``: each test once per backend, iptables only where
    iptables-restore and ipset are installed (:func:`iptables_or_skip`)."""

    @pytest.fixture(scope="module", params=BACKENDS, name="backend")
    def backend(request: pytest.FixtureRequest) -> str:
        if request.param == "iptables":
            iptables_or_skip()
        return str(request.param)

    return backend
