"""Attacks on the flows function (``functions/flows``) through the objects it reads, performed
against the real handler over moto in server mode: VPC Flow Log objects crafted by whoever can
write to the flow-log bucket (or a compromised log source)."""

from __future__ import annotations

import gzip
import time

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
