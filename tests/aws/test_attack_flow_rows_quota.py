"""One workload's report batches, read by the flows function from S3 (moto server) into the
DynamoDB state table: the rows they may add are bounded per reporter and day, and flows dated
before the retention are not taken. The function's every DynamoDB call is judged against its
role in template.yaml and infra/."""

from __future__ import annotations

import json
import time

import pytest

from ringfence.flows.aggregate import merge
from ringfence.local.lambdas import load_functions
from tests.aws.conftest import ROOT, Env, LambdaContext, ip_of
from tests.aws.test_flows_function import s3_record
from tests.aws.test_function_iam import Recorder, refusals
from tests.aws.test_pipeline import boot


@pytest.mark.slow
def test_attack_one_workloads_reports_cannot_add_unbounded_flow_rows_over_dynamodb(
    env: Env, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A compromised web host's agent writes batches of flows to distinct UDP ports: each made
    one row (1-3 UpdateItems each, kept 30 days). Now its flows make at most
    RINGFENCE_FLOW_ROWS_PER_REPORTER_DAY rows a day (30 here), counted per reporter in one item
    of the state table under the function's own ``flows#*`` keys; the rest are counted
    (``capped``, FlowRowsCapped). Flows dated 1970 are not taken at all."""
    monkeypatch.setenv("RINGFENCE_FLOW_ROWS_PER_REPORTER_DAY", "30")
    est = boot(env)
    web, proc = est["ids"]["web"][0], est["ids"]["proc"][0]
    web_ip, proc_ip = ip_of(env, web), ip_of(env, proc)
    now = int(time.time())

    def batch(ports: range, start: float = now) -> bytes:
        flows = [{"start": start, "end": start + 1, "src": web_ip, "dst": proc_ip, "proto": "udp", "dport": p,
                  "packets": 1, "bytes": 60, "direction": "outbound"} for p in ports]  # fmt: skip
        return json.dumps({"flows": flows}).encode()

    keys = [f"reports/{web}/2026/12/06/{n}.json" for n in "abc"]
    env.s3.put_object(Bucket=env.bucket, Key=keys[0], Body=batch(range(1000, 1100)))
    env.s3.put_object(Bucket=env.bucket, Key=keys[1], Body=batch(range(2000, 2100)))
    env.s3.put_object(Bucket=env.bucket, Key=keys[2], Body=batch(range(3000, 3100), start=0.0))
    env.fn["flows"] = load_functions(["flows"], ROOT / "functions")["flows"]
    recorded = Recorder(env)
    fn = env.fn["flows"]
    first = fn.handler({"Records": [s3_record(env.bucket, keys[0])]}, LambdaContext("flows"))
    assert first["rows"] == 30 and first["capped"] == 70, first
    second = fn.handler({"Records": [s3_record(env.bucket, keys[1])]}, LambdaContext("flows"))
    assert second["rows"] == 0 and second["capped"] == 100, second
    third = fn.handler({"Records": [s3_record(env.bucket, keys[2])]}, LambdaContext("flows"))
    assert third["rows"] == 0 and third["capped"] == 0, third  # dated 1970: refused before any row
    rows = [r for r in merge(env.store.flow_rows()) if r.sample_src == web_ip]
    assert len(rows) == 30 and all(1000 <= (r.port or 0) < 1100 for r in rows)
    assert recorded.calls["flows"] and not refusals(recorded, ["flows"])
