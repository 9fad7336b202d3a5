"""Over the real ``ringfence serve``: ``SafeguardsLowered`` (an alarm watches it) counts a safeguard
actually lowered. Before, releasing a workload that was not quarantined counted, as did setting
idle a workload already idle: an alarm that fires on no-ops is one operators learn to ignore."""

from __future__ import annotations

import httpx
from prometheus_client.parser import text_string_to_metric_families

from tests.onprem.conftest import Served


def lowered(served: Served) -> float:
    r = httpx.get(served.url + "/metrics", headers={"Authorization": f"Bearer {served.tokens['rita']}"}, timeout=30)
    assert r.status_code == 200
    for family in text_string_to_metric_families(r.text):
        for sample in family.samples:
            if sample.name == "ringfence_safeguards_lowered_total":
                return sample.value
    raise AssertionError("ringfence_safeguards_lowered_total not exposed")


def test_safeguards_lowered_counts_only_a_safeguard_lowered(served: Served) -> None:
    assert lowered(served) == 0
    for _ in range(2):  # never quarantined: nothing lowered
        assert (
            served.call("ivy", "DELETE", "/admin/workloads/dc1-web-1/quarantine", {"reason": "noop"}).status_code == 200
        )
    assert lowered(served) == 0
    assert served.call("ivy", "POST", "/admin/workloads/dc1-web-1/quarantine", {"reason": "IR-1"}).status_code == 200
    assert (
        served.call("ivy", "DELETE", "/admin/workloads/dc1-web-1/quarantine", {"reason": "IR-1 closed"}).status_code
        == 200
    )
    assert lowered(served) == 1
    for _ in range(2):  # idle once, then idle again: one lowering
        assert (
            served.call(
                "paula", "PUT", "/admin/workloads/dc1-db-1/mode", {"mode": "idle", "reason": "CHG-2"}
            ).status_code
            == 200
        )
    assert lowered(served) == 2
