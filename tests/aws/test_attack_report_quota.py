"""What one workload may report on AWS, through the real agent-API handler over moto server with
an enrolled instance's token: its report bytes are counted per window in the state table
(``rquota#<workload>``), past the quota the route answers 429 with Retry-After (as ``ringfence
serve``'s bucket does) and counts ReportsOverQuota; every DynamoDB call it makes is judged against
the agent-API role in template.yaml and infra/."""

from __future__ import annotations

import time
from typing import Any

import pytest

from tests.aws.conftest import Env, ip_of
from tests.aws.test_function_iam import Recorder, refusals
from tests.aws.test_handler_metrics import emitted
from tests.aws.test_pipeline import boot, enroll_instance

BURST = 40_000  # report bytes per window here
RATE = 10  # bytes a second: a window of 4,000 s, which this test never sees end


def _batch(ip: str, n: int) -> dict[str, Any]:
    now = time.time()
    drops = [{"time": now - 5, "direction": "outbound", "src": ip, "dst": "203.0.113.9", "proto": "tcp",
              "dport": 1000 + i, "action": "drop", "rule_id": "r"} for i in range(n)]  # fmt: skip
    return {"flows": [], "drops": drops}


def _archived(env: Env, wid: str) -> int:
    return int(env.s3.list_objects_v2(Bucket=env.bucket, Prefix=f"reports/{wid}/")["KeyCount"])


def test_attack_one_workload_cannot_report_past_its_quota_on_aws(
    env: Env, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    """A compromised web host's agent token posts full report batches as fast as it can: only API
    Gateway's stage throttle bounded what it archived to S3 and sent to the SIEM. Now it gets
    BURST bytes a window; the batch that would go past it is answered 429 with Retry-After (the
    seconds left in the window), nothing of it archived, counted as ReportsOverQuota; another
    workload's reports are still taken."""
    monkeypatch.setenv("RINGFENCE_REPORT_BURST_BYTES", str(BURST))
    monkeypatch.setenv("RINGFENCE_REPORT_BYTES_PER_SECOND", str(RATE))
    env.load_functions()
    rec = Recorder(env)  # before the functions' clients are made: they take the session's hooks then
    est = boot(env)
    web, proc = est["ids"]["web"][0], est["ids"]["proc"][0]
    web_tok, proc_tok = enroll_instance(env, web), enroll_instance(env, proc)
    capsys.readouterr()

    batch = _batch(ip_of(env, web), 40)  # ~8 KB as JSON
    accepted = 0
    answer: tuple[int, dict[str, str], Any] = (0, {}, None)
    for _ in range(30):
        answer = env.rest("agentapi", "POST", f"/v1/agents/{web}/reports", batch, headers=_auth(web_tok))
        if answer[0] != 202:
            break
        accepted += 1
    status, headers, body = answer
    assert status == 429, (accepted, answer)
    assert 1 <= accepted < 6, accepted  # 40,000 bytes: four or five batches of ~8 KB
    assert body["error"] == "report quota exceeded", body
    retry = int(headers["retry-after"])
    assert 1 <= retry <= BURST // RATE, headers
    assert _archived(env, web) == accepted, "nothing of a refused batch is archived"
    # asked again at once: still refused, still nothing archived
    again = env.rest("agentapi", "POST", f"/v1/agents/{web}/reports", batch, headers=_auth(web_tok))
    assert again[0] == 429 and _archived(env, web) == accepted
    assert emitted(capsys.readouterr().out).get("ReportsOverQuota") == 2

    # one workload's quota is its own
    other = env.rest(
        "agentapi", "POST", f"/v1/agents/{proc}/reports", _batch(ip_of(env, proc), 40), headers=_auth(proc_tok)
    )
    assert other[0] == 202, other
    # the count is one item per workload and window, expiring by the table's TTL
    item = env.ddb.Table("rf-state").query(
        KeyConditionExpression="pk = :p", ExpressionAttributeValues={":p": f"rquota#{web}"}
    )["Items"]
    assert len(item) == 1 and int(item[0]["bytes"]) <= BURST and int(item[0]["ttl"]) > time.time(), item
    # granted in both deployments: the agent API writes these items, and only their count and TTL
    assert any(
        c[:2] == ("UpdateItem", "state") and c[2]["dynamodb:LeadingKeys"] == [f"rquota#{web}"] for c in rec.writes
    )
    assert not refusals(rec, ["agentapi"])


def _auth(token: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {token}"}


def test_both_deployments_hold_a_window_to_at_least_one_whole_batch() -> None:
    """A window takes its first batch whatever its size, so a burst below one batch (up to 256
    KiB, the route's limit) would let a workload send a whole batch every window, 16 times the
    bytes intended at 64 KiB: SAM and Terraform refuse such a burst."""
    from ringfence.agentwire import MAX_REPORT_BYTES
    from tests.aws.test_static import ROOT, hcl, template

    assert template()["Parameters"]["ReportBurstBytes"]["MinValue"] == MAX_REPORT_BYTES
    variables = hcl(ROOT / "infra/modules/ringfence/variables.tf")["variable"]
    (burst,) = [b["report_burst_bytes"] for b in variables if "report_burst_bytes" in b]
    (validation,) = burst["validation"]
    assert validation["condition"] == f"${{var.report_burst_bytes >= {MAX_REPORT_BYTES}}}", validation


def test_a_batch_refused_after_counting_is_given_back_on_aws(env: Env) -> None:
    """The route counts a batch before archiving it; a batch then refused with nothing archived
    (S3 failing: 5xx, the agent sends it again) is taken back off the window's count on the
    state table (moto server), never below zero; another workload's count is untouched."""
    from ringfence.clouds.aws.reportquota import TableReportQuota

    now = [1_000_000.0]
    quota = TableReportQuota(env.ddb.Table("rf-state"), rate=RATE, burst=BURST, clock=lambda: now[0])
    assert quota.take("i-a", 30_000) is None and quota.take("i-b", 5_000) is None
    assert quota.take("i-a", 20_000) is not None  # past the window's 40,000
    quota.give_back("i-a", 30_000)  # that batch was refused: its bytes come back
    assert quota.take("i-a", 20_000) is None and quota.take("i-a", 20_000) is None
    assert quota.take("i-a", 1) is not None
    quota.give_back("i-a", 50_000)  # more than the window holds: nothing given
    assert quota.take("i-a", 1) is not None

    def counted(wid: str) -> int:
        items = env.ddb.Table("rf-state").query(
            KeyConditionExpression="pk = :p", ExpressionAttributeValues={":p": f"rquota#{wid}"}
        )["Items"]
        return sum(int(i["bytes"]) for i in items)

    assert (counted("i-a"), counted("i-b")) == (40_000, 5_000)
