"""Attacks on the flows function (``functions/flows``) through the objects it reads, performed
against the real handler over moto in server mode: VPC Flow Log objects crafted by whoever can
write to the flow-log bucket (or a compromised log source)."""

from __future__ import annotations

import gzip
import json
import time
import tracemalloc
from typing import Any

from ringfence.flows import ingest, vpclogs
from ringfence.flows.aggregate import merge
from ringfence.local.lambdas import load_functions
from tests.aws.conftest import ROOT, Env, LambdaContext, ip_of
from tests.aws.test_pipeline import boot

FIELDS = "version srcaddr dstaddr srcport dstport protocol start end packets bytes action flow-direction log-status"
LOGS = "flow-logs-test"
KEY = "AWSLogs/123456789012/vpcflowlogs/ca-central-1/2026/12/02/x.log.gz"


def _event(bucket: str, key: str) -> dict[str, object]:
    return {"source": "aws.s3", "detail-type": "Object Created",
            "detail": {"bucket": {"name": bucket}, "object": {"key": key}}}  # fmt: skip


def test_attack_one_crafted_line_does_not_lose_the_flow_log_object(env: Env) -> None:
    """A far-future start (time.gmtime overflowed), an "address" 1.2.3 and one of colons
    (passed the parser, raised in the classifier) each aborted the whole object: retried, then
    dead-lettered, none of its flows stored. Now each is a malformed line, the rest is read."""
    est = boot(env)
    web, proc = est["ids"]["web"][0], est["ids"]["proc"][0]
    w, p = ip_of(env, web), ip_of(env, proc)
    now = int(time.time())
    env.s3.create_bucket(Bucket=LOGS, CreateBucketConfiguration={"LocationConstraint": "ca-central-1"})
    good = [f"5 {w} {p} {40000 + i} 8443 6 {now} {now + 60} 2 100 ACCEPT egress OK" for i in range(10)]
    poison = [
        f"5 {w} {p} 40000 8443 6 99999999999999999999 99999999999999999999 1 1 ACCEPT egress OK",
        f"5 1.2.3 {p} 40000 8443 6 {now} {now} 1 1 ACCEPT egress OK",
        f"5 {w} ::::::: 40000 8443 6 {now} {now} 1 1 ACCEPT egress OK",
        f"5 {w} {p} 40000 8443 6 {now} {now - 10} 1 1 ACCEPT egress OK",  # ends before it starts
    ]
    env.s3.put_object(Bucket=LOGS, Key=KEY, Body=gzip.compress("\n".join([FIELDS, *good, *poison]).encode()))
    fn = load_functions(["flows"], ROOT / "functions")["flows"]
    out = fn.handler(_event(LOGS, KEY), LambdaContext("flows"))
    assert out["flows"] == 10 and out["malformed"] == 4, out
    assert sum(r.flows for r in merge(env.store.flow_rows())) == 10


def test_attack_objects_of_the_flow_log_bucket_are_read_by_bucket_and_key(env: Env) -> None:
    """Whoever may write some prefix of the flow-log bucket put ``reports/<db>/….json`` there:
    it was read as that workload's agent batch (drops counted 50 times, origin agent), and any
    other key (an upload) as a VPC Flow Log. Now only the bundle bucket holds agents' batches and
    only ``AWSLogs/<account>/vpcflowlogs/`` of the flow-log bucket holds flow logs; the rest is
    skipped and named."""
    est = boot(env)
    web, db = est["ids"]["web"][0], est["ids"]["db"][0]
    w, d = ip_of(env, web), ip_of(env, db)
    now = int(time.time())
    env.s3.create_bucket(Bucket=LOGS, CreateBucketConfiguration={"LocationConstraint": "ca-central-1"})
    batch = {"drops": [{"time": now, "direction": "inbound", "src": w, "dst": d, "proto": "tcp", "dport": 5432,
                        "action": "would-drop", "rule_id": "x", "count": 50}]}  # fmt: skip
    forged = f"reports/{db}/2026/12/06/forged.json"
    upload = "app-uploads/tmp/readme.txt"
    line = f"2 1 eni-1 {w} {d} 1 5432 6 1 1 {now} {now} ACCEPT OK\n"
    env.s3.put_object(Bucket=LOGS, Key=forged, Body=json.dumps(batch).encode())
    env.s3.put_object(Bucket=LOGS, Key=upload, Body=line.encode())
    env.s3.put_object(Bucket=LOGS, Key=f"team/{KEY}", Body=gzip.compress(line.encode()))  # a delivery prefix
    fn = load_functions(["flows"], ROOT / "functions")["flows"]
    for key in (forged, upload):
        out = fn.handler(_event(LOGS, key), LambdaContext("flows"))
        assert out["objects"] == 0 and out["flows"] == 0 and out["skipped"] == [f"s3://{LOGS}/{key}"], out
    assert not env.store.flow_rows()
    out = fn.handler(_event(LOGS, f"team/{KEY}"), LambdaContext("flows"))
    assert out["objects"] == 1 and out["flows"] == 1, out
    (row,) = merge(env.store.flow_rows())
    assert row.origins == ["vpc"] and row.flows == 1


def test_attack_a_small_flow_log_object_cannot_take_the_functions_memory(env: Env, monkeypatch: Any) -> None:
    """~100 KiB of gzip held one 96 MiB line: it was decompressed and decoded whole (~500 MiB
    for 100 MiB of text, a 1024 MB function gone), every flow of an object was a list, and the
    per-address memos and rows grew with each distinct pair. Now an object is decompressed a line
    at a time (a longer line is malformed, and so is what lies past the decompressed limit), its
    flows are folded a chunk at a time, and the rows of one object are bounded, what is dropped
    counted."""
    est = boot(env)
    web, proc = est["ids"]["web"][0], est["ids"]["proc"][0]
    w, p = ip_of(env, web), ip_of(env, proc)
    now = int(time.time())
    env.s3.create_bucket(Bucket=LOGS, CreateBucketConfiguration={"LocationConstraint": "ca-central-1"})
    good = [f"5 {w} {p} {40000 + i} 8443 6 {now} {now + 60} 2 100 ACCEPT egress OK" for i in range(5)]
    bomb = gzip.compress(("\n".join([FIELDS, *good, "x" * (96 << 20), *good]) + "\n").encode(), 9)
    assert len(bomb) < 200 << 10
    env.s3.put_object(Bucket=LOGS, Key=KEY, Body=bomb)
    fn = load_functions(["flows"], ROOT / "functions")["flows"]
    tracemalloc.start()
    try:
        out = fn.handler(_event(LOGS, KEY), LambdaContext("flows"))
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert peak < 32 << 20, f"{peak >> 20} MiB at the peak"
    assert out["flows"] == 10 and out["malformed"] == 1, out
    assert "longer than 8192 bytes" in out["malformed_lines"][0]

    # distinct rows and the decompressed bytes of one object are bounded (limits made small here)
    monkeypatch.setattr(ingest, "MAX_ROWS", 3)
    monkeypatch.setattr(vpclogs, "MAX_OBJECT_BYTES", 16 << 10)
    many = [f"5 10.{i >> 8}.{i & 255}.9 {p} 40000 {1000 + i} 6 {now} {now} 1 1 ACCEPT egress OK" for i in range(3000)]
    key = KEY.replace("x.log.gz", "y.log.gz")
    env.s3.put_object(Bucket=LOGS, Key=key, Body=gzip.compress("\n".join([FIELDS, *many]).encode()))
    out = fn.handler(_event(LOGS, key), LambdaContext("flows"))
    assert out["rows"] == 3 and out["malformed"] == 1 and out["flows_over_row_limit"] > 0, out
    assert out["malformed_lines"][0].endswith(f"more than {16 << 10} bytes decompressed: the rest is not read")
    assert 3 <= out["flows"] + out["flows_over_row_limit"] < 3000, out


def test_a_flow_log_object_whose_gzip_breaks_keeps_what_was_read_before(env: Env) -> None:
    """Where an object's gzip stream broke (a member cut short, bytes after the last member that
    are not gzip), GzipFile raised out of the read of the chunk it was decompressing: the lines
    of that chunk (up to 1 MiB, all of a small object) were lost though decompressed. Now every
    line before the break is stored and the break is one malformed line (docs/visibility.md:
    an object is counted for what was read of it)."""
    est = boot(env)
    web, proc = est["ids"]["web"][0], est["ids"]["proc"][0]
    w, p = ip_of(env, web), ip_of(env, proc)
    now = int(time.time())
    env.s3.create_bucket(Bucket=LOGS, CreateBucketConfiguration={"LocationConstraint": "ca-central-1"})
    text = "\n".join(
        [FIELDS, *(f"5 {w} {p} {40000 + i} 8443 6 {now} {now + 60} 2 100 ACCEPT egress OK" for i in range(10))]
    )
    member = gzip.compress((text + "\n").encode())
    fn = load_functions(["flows"], ROOT / "functions")["flows"]
    for key, body in ((KEY, member + b"garbage!"), (KEY.replace("x.log", "y.log"), member[:-8])):
        env.s3.put_object(Bucket=LOGS, Key=key, Body=body)
        out = fn.handler(_event(LOGS, key), LambdaContext("flows"))
        assert out["flows"] == 10 and out["malformed"] == 1, (key, out)
    assert sum(r.flows for r in merge(env.store.flow_rows())) == 20


def test_attack_another_accounts_flow_logs_in_the_bucket_are_not_read(env: Env, monkeypatch: Any) -> None:
    """Any ``AWSLogs/<account>/vpcflowlogs/`` key was read: where the flow-log bucket's policy
    lets another account's log delivery write (or a writer of the bucket copies its logs there),
    that account's flows (its own addresses overlapping ours, or forged) were stored and
    suggested as ours. Now only the accounts allowed are read: FLOW_LOG_ACCOUNTS, by default the
    function's own account (its ARN's); the rest is skipped and named."""
    est = boot(env)
    web, db = est["ids"]["web"][0], est["ids"]["db"][0]
    w, d = ip_of(env, web), ip_of(env, db)
    now = int(time.time())
    env.s3.create_bucket(Bucket=LOGS, CreateBucketConfiguration={"LocationConstraint": "ca-central-1"})
    line = f"2 999999999999 eni-1 {w} {d} 1 5432 6 1 1 {now} {now} ACCEPT OK\n"
    other = KEY.replace("123456789012", "999999999999")
    for key in (other, KEY):
        env.s3.put_object(Bucket=LOGS, Key=key, Body=gzip.compress(line.encode()))
    fn = load_functions(["flows"], ROOT / "functions")["flows"]
    ctx = LambdaContext("flows")
    assert ":123456789012:" in ctx.invoked_function_arn
    out = fn.handler(_event(LOGS, other), ctx)
    assert out["objects"] == 0 and out["skipped"] == [f"s3://{LOGS}/{other}"], out
    assert not env.store.flow_rows()
    out = fn.handler(_event(LOGS, KEY), ctx)  # its own account's
    assert out["objects"] == 1 and out["flows"] == 1, out
    monkeypatch.setenv("FLOW_LOG_ACCOUNTS", "999999999999, 111111111111")  # allowed by the operator
    out = fn.handler(_event(LOGS, other), ctx)
    assert out["objects"] == 1 and out["flows"] == 1, out
    out = fn.handler(_event(LOGS, KEY), ctx)  # no longer listed
    assert out["objects"] == 0 and out["skipped"] == [f"s3://{LOGS}/{KEY}"], out
    assert sum(r.flows for r in merge(env.store.flow_rows())) == 2
