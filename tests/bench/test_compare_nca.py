"""Ringfence's matrix equals network-config-analyzer's on a small exported estate (skips without NCA)."""

from __future__ import annotations

from pathlib import Path

import pytest

from tests.bench.compare_nca import NCA, parse_nca_connection, representatives, run


def test_parse_nca_connection_forms() -> None:
    assert parse_nca_connection("{protocols:TCP,dst_ports:22,88,3268-3269}") == {
        "tcp": [(22, 22), (88, 88), (3268, 3269)]
    }
    assert parse_nca_connection("{protocols:TCP, UDP,dst_ports:53}") == {"tcp": [(53, 53)], "udp": [(53, 53)]}
    assert parse_nca_connection("{protocols:ICMP,icmp_type:8}") == {"icmp": [(8, 8)]}
    assert parse_nca_connection("All connections")["tcp"] == [(1, 65535)]


def test_representatives_keep_two_per_label_set() -> None:
    heps = [{"metadata": {"name": f"h{i}", "labels": {"role": "web" if i < 3 else "db"}}} for i in range(5)]
    assert representatives(heps) == {"h0", "h1", "h3", "h4"}


@pytest.mark.skipif(not NCA.exists(), reason="network-config-analyzer not installed in /tmp/nca (see compare_nca.py)")
def test_matrix_agrees_with_nca(tmp_path: Path) -> None:
    result = run(workloads=60, apps=2, seed=2, keep=tmp_path)
    assert result["nca_pairs"] > 100
    assert result["agree"], result
    # the floor (python + import yaml + parsing the same files) does a strict part of our CLI's work
    assert 0 < result["floor_wall_median_s"] < result["ours_cli_wall_median_s"], result
