"""functions/flows against moto server: S3 object-created records for an agent's report batch
(reports/ in the bundle bucket, as the agent API writes it) and a VPC Flow Log object (gzip, v5
custom format with its header, one malformed line) → classified flow rows in DynamoDB."""

from __future__ import annotations

import gzip
import json
import time
import xml.etree.ElementTree as ET
from typing import Any

from ringfence.flows.aggregate import merge
from ringfence.local.lambdas import load_functions
from tests.aws.conftest import ROOT, Env, LambdaContext, ip_of
from tests.aws.test_function_iam import Recorder, refusals
from tests.aws.test_pipeline import boot

FIELDS = "version srcaddr dstaddr srcport dstport protocol start end packets bytes action flow-direction log-status"


def s3_record(bucket: str, key: str) -> dict[str, Any]:
    return {
        "eventSource": "aws:s3",
        "eventName": "ObjectCreated:Put",
        "s3": {"bucket": {"name": bucket}, "object": {"key": key}},
    }


def test_report_batches_and_flow_logs_in_s3_become_classified_rows(env: Env) -> None:
    est = boot(env)
    web, proc = est["ids"]["web"][0], est["ids"]["proc"][0]
    web_ip, proc_ip = ip_of(env, web), ip_of(env, proc)
    dev_web = est["run"]("web", est["subnets"]["web"], 1, env="dev")[0]
    env.put(env.state_event(dev_web, "running"))
    env.pump()
    now = int(time.time())
    batch = {"flows": [{"start": now, "end": now + 5, "src": web_ip, "dst": proc_ip, "proto": "tcp", "dport": 8443,
                        "packets": 4, "bytes": 400, "direction": "outbound"}]}  # fmt: skip
    env.s3.put_object(Bucket=env.bucket, Key=f"reports/{web}/2026/12/02/a.json", Body=json.dumps(batch).encode())
    logs = "flow-logs-test"
    env.s3.create_bucket(Bucket=logs, CreateBucketConfiguration={"LocationConstraint": "ca-central-1"})
    lines = [
        FIELDS,
        f"5 {ip_of(env, dev_web)} {proc_ip} 40000 8443 6 {now} {now + 60} 3 180 REJECT ingress OK",
        "5 garbage",
        f"5 {web_ip} {proc_ip} 40001 8443 6 {now} {now + 60} 2 100 ACCEPT egress OK",
    ]
    key = "AWSLogs/123456789012/vpcflowlogs/ca-central-1/2026/12/02/x.log.gz"
    env.s3.put_object(Bucket=logs, Key=key, Body=gzip.compress("\n".join(lines).encode()))

    env.fn["flows"] = load_functions(["flows"], ROOT / "functions")["flows"]
    recorded = Recorder(env, flow_logs=[logs])  # every AWS call it makes, judged against its role below
    fn = env.fn["flows"]
    # S3 → EventBridge "Object Created" (how the stacks wire it) and a plain S3 notification
    first = fn.handler(
        {"source": "aws.s3", "detail-type": "Object Created",
         "detail": {"bucket": {"name": env.bucket}, "object": {"key": f"reports/{web}/2026/12/02/a.json"}}},
        LambdaContext("flows"),
    )  # fmt: skip
    assert first["objects"] == 1 and first["flows"] == 1
    out = fn.handler({"Records": [s3_record(logs, key)]}, LambdaContext("flows"))
    assert out["objects"] == 1 and out["flows"] == 2 and out["malformed"] == 1
    assert out["malformed_lines"] == [f"s3://{logs}/{key}:3: 2 fields, the format has 13"]

    rows = {(r.src.split("role=")[-1], r.src.split("env=")[1][:4], r.decision): r for r in merge(env.store.flow_rows())}
    ok = rows[("web", "prod", "allowed")]
    assert ok.flows == 2 and ok.origins == ["agent", "vpc"] and "web-to-processing" in ok.rule
    assert ok.reported_by == ["src", "vpc"] and ok.reporters == [web], ok  # its agent (the source) and the flow log
    assert rows[("web", "dev,", "blocked")].flows == 1
    assert recorded.calls["flows"] and not refusals(recorded, ["flows"])

    # the admin API draws the same map (ringfence map's code), to any bound role, a reader too
    reader = "arn:aws:iam::123456789012:role/Readers"
    env.bind(reader, ["reader"])
    status, headers, body = env.rest("admin", "GET", "/admin/map", query={"format": "dot"}, principal=reader)
    assert status == 200 and headers["content-type"].startswith("text/vnd.graphviz"), body
    assert body.startswith("digraph ringfence") and 'color="#c62828"' in body  # the blocked dev → prod edge
    status, headers, body = env.rest("admin", "GET", "/admin/map", query={"decision": "blocked"}, principal=reader)
    assert status == 200 and headers["content-type"].startswith("text/html") and "cytoscape" in body
    assert '"decision": "allowed"' not in body
    status, headers, body = env.rest("admin", "GET", "/admin/map", query={"format": "svg"}, principal=reader)
    assert status == 200 and headers["content-type"].startswith("image/svg+xml"), body
    svg = ET.fromstring(body.encode())  # well-formed XML
    assert any(g.get("data-decision") == "blocked" for g in svg.iter("{http://www.w3.org/2000/svg}g"))
    # and the agents' effective policy, checked: nothing enrolled here, nothing found
    status, _, body = env.rest("admin", "GET", "/admin/findings", principal=reader)
    assert status == 200 and body["findings"] == [] and body["bound"] == 120, body
    status, _, _ = env.rest("admin", "GET", "/admin/map", principal="arn:aws:iam::123456789012:user/mallory")
    assert status == 403

    # rule suggestions from the same rows: dev web → prod processing is an env crossing, flagged
    status, headers, body = env.rest("admin", "GET", "/admin/suggest", query={"app": "ordering"}, principal=reader)
    assert status == 200, body
    sug = body
    assert sug["rules"] == [] and [f["kind"] for f in sug["flagged"]] == ["env-crossing"]
    assert sug["flagged"][0]["port"] == "tcp/8443" and "rulesets: []" in sug["yaml"]
    status, _, _ = env.rest(
        "admin", "GET", "/admin/suggest", query={"app": "ordering"}, principal="arn:aws:iam::123456789012:user/mallory"
    )
    assert status == 403
