"""``GET /metrics`` of ``ringfence serve`` as a process: what the services count (the names the
Lambda functions publish to CloudWatch, the compute worker's among them) in Prometheus' text
format, for an admin token only.
Before, every count under ``serve`` went nowhere, `SafeguardsLowered` included, which the docs
say an alarm watches."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest
from prometheus_client.parser import text_string_to_metric_families

from ringfence import serve
from tests.agentproc import wait_until
from tests.onprem.conftest import ESTATE, provision_estate
from tests.onprem.serveproc import Server

READER = "metrics-reader-token-0123456789abcdef"


@pytest.fixture
def server(tmp_path: Path) -> Iterator[Server]:
    s = Server(tmp_path)
    with s.tokens.open("a") as f:  # a scraper's token: the reader role, which may change nothing
        f.write(f"prometheus:{serve.token_hash(READER)}:reader\n")
    s.start()
    yield s
    s.stop()


def scrape(server: Server, token: str | None = READER) -> httpx.Response:
    headers = {"Authorization": f"Bearer {token}"} if token else {}
    return httpx.get(f"{server.url}/metrics", headers=headers, timeout=30)


def counts(text: str) -> dict[str, float]:
    """Counter samples by name (``…_total``), parsed as Prometheus parses them."""
    out: dict[str, float] = {}
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            if family.type == "counter" and sample.name.endswith("_total"):
                out[sample.name] = sample.value
    return out


def test_the_alerted_counters_are_exposed_at_zero_before_anything_happens(server: Server) -> None:
    """The docs alert on ``increase(ringfence_safeguards_lowered_total[5m]) > 0``: a series that
    first appears at 1 (made at its first increment) is one ``increase()`` cannot count, so the
    first idle or release after each start raised no alert. The counters the docs name for
    alerts are there, at zero, from the first scrape."""
    c = counts(scrape(server).text)
    for name in (
        "safeguards_lowered",
        "admin_actions",
        "admin_requests_refused",
        "enrollments",
        "enrollments_refused",
        "agent_requests_refused",
        "agent_requests_invalid",
        "compute_not_queued",
        "compute_owed_not_marked",
        "owed_marks_malformed",
    ):
        assert c.get(f"ringfence_{name}_total") == 0, name


def test_serve_counts_what_admins_and_agents_do_for_an_admin_token_only(server: Server) -> None:
    assert scrape(server, None).status_code == 401
    assert scrape(server, "not-a-token").status_code == 401
    provision_estate(server)
    wid = ESTATE[0]["id"]
    assert server.admin("POST", f"/admin/workloads/{wid}/quarantine", {"reason": "IR-1"}).status_code == 200
    assert server.admin("DELETE", f"/admin/workloads/{wid}/quarantine", {"reason": "IR-1 closed"}).status_code == 200
    # refused: a reader may not quarantine; an enrollment with a key nobody issued
    r = httpx.post(
        f"{server.url}/admin/workloads/{wid}/quarantine",
        json={"reason": "x"},
        headers={"Authorization": f"Bearer {READER}"},
        timeout=30,
    )
    assert r.status_code == 403
    assert server.enroll(wid, "a-key-nobody-issued").status_code == 401

    got = scrape(server)
    assert got.status_code == 200 and got.headers["content-type"].startswith("text/plain")
    c = counts(got.text)
    assert c["ringfence_safeguards_lowered_total"] == 1  # the release
    assert c["ringfence_admin_actions_total"] == len(ESTATE) + 3
    assert c["ringfence_admin_requests_refused_total"] == 1
    assert c["ringfence_enrollments_refused_total"] == 1
    assert c["ringfence_enrollments_total"] == 0, "nothing was enrolled"
    # the compute worker's counts too: every registered workload's bundle published
    wait_until(
        lambda: counts(scrape(server).text).get("ringfence_bundles_published_total", 0) >= len(ESTATE),
        30,
        "compute's publications counted",
        server.log,
    )
