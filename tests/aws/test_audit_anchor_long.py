"""The anchor function over a long chain: the first anchor of a deployment that has audited for
months reads the whole chain from genesis. It must do so in memory that does not grow with the
chain (the function has 256 MB; ~2 KB a record held whole ran out near 130,000 records, a day and
a bit of 5,000 agents' token refreshes), and within its time: what one run cannot verify, the next
continues, from an anchor of the last record verified.

Against the real anchor function over the moto server, and the real ``ringfence audit verify``."""

from __future__ import annotations

import tracemalloc
from typing import Any

import boto3
import pytest

from ringfence.audit import AuditHead, AuditRecord, head_of, seal
from ringfence.clouds.aws.anchor import AnchorRefused, anchor_key
from ringfence.local.lambdas import load_functions
from ringfence.store.dynamodb import DynamoStore
from tests.aws.conftest import REGION, Env, LambdaContext
from tests.aws.test_audit_anchor import BUCKET, ROOT, SPEC, _put_head, anchored, append, versions  # noqa: F401
from tests.aws.test_audit_chain import cli
from tests.aws.test_pipeline import _scheduled


def bulk_chain(n: int, head: AuditHead | None = None) -> AuditHead:
    """``n`` token-refresh-sized records sealed after ``head`` (genesis), written straight to the
    chain partition (the store's own append would take minutes for 20,000), and the head naming
    the last."""
    head = head or AuditHead()
    with boto3.resource("dynamodb").Table("rf-audit").batch_writer() as batch:
        for _ in range(n):
            i = head.seq
            rec = seal(
                AuditRecord(
                    principal=f"agent:i-{i:017x}",
                    action="token.refresh",
                    target=f"i-{i:017x}",
                    detail={"expires_in": 3600, "agent_key": "0123456789abcdef"},
                ),
                head,
            )
            batch.put_item(Item={"pk": "chain", "sk": f"{rec.seq:012d}", "doc": rec.model_dump_json()})
            head = head_of(rec)
    _put_head(head)
    return head


def lock_bucket(env: Env, name: str) -> None:
    """An anchor bucket as template.yaml's: Object Lock, a COMPLIANCE default retention."""
    env.s3.create_bucket(
        Bucket=name, ObjectLockEnabledForBucket=True, CreateBucketConfiguration={"LocationConstraint": REGION}
    )
    env.s3.put_object_lock_configuration(
        Bucket=name,
        ObjectLockConfiguration={
            "ObjectLockEnabled": "Enabled",
            "Rule": {"DefaultRetention": {"Mode": "COMPLIANCE", "Days": 1}},
        },
    )


def first_anchor(
    env: Env, monkeypatch: pytest.MonkeyPatch, bucket: str, measure: bool = True
) -> tuple[dict[str, Any], int]:
    """A cold anchor function writing to ``bucket`` (empty: its first anchor, from genesis): its
    answer, and the most memory it held at once (tracemalloc; 0 unless ``measure``: tracing
    every allocation doubles a run's time, wasted on a run whose peak no one reads)."""
    lock_bucket(env, bucket)
    monkeypatch.setenv("RINGFENCE_ANCHOR_BUCKET", bucket)
    env.fn.update(load_functions(["anchor"], ROOT / "functions", keep_clients=True))
    if not measure:
        return env.fn["anchor"].handler(_scheduled(), LambdaContext(timeout_s=600)), 0
    tracemalloc.start()
    try:
        out: dict[str, Any] = env.fn["anchor"].handler(_scheduled(), LambdaContext(timeout_s=600))
        return out, tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()


@pytest.mark.slow
def test_attack_a_first_anchor_over_a_long_chain_holds_one_page_not_the_chain(
    env: Env, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The first anchor read the segment 1..head as one list: every record of the chain in the
    function's memory at once (and the chain only grows: an upgraded deployment never anchored).
    Now it is checked page by page as the Query streams, keeping only the last seq and hash: the
    peak of a first anchor over 3,000 records is that over 1,500. Pages of 250 records (a 1 MB
    page holds ~5,000 of these) show the same bound over a chain a fifth as long: one page is
    ~0.5 MiB held, the 1,500 more records held whole ~3 MiB.
    A forged record and head far ahead are still refused once the whole chain is read."""
    monkeypatch.setattr(DynamoStore, "AUDIT_PAGE_ITEMS", 250)
    small = bulk_chain(1_500)
    first_anchor(env, monkeypatch, "rf-anchors-warm", measure=False)  # the clients' models loaded once
    out, peak_small = first_anchor(env, monkeypatch, "rf-anchors-small")
    assert out == {"seq": 1_500, "key": anchor_key(small)}
    large = bulk_chain(1_500, small)
    out, peak_large = first_anchor(env, monkeypatch, "rf-anchors-large")
    assert out == {"seq": 3_000, "key": anchor_key(large)}
    # held whole, the 1,500 more records add ~3 MiB to the peak (~2 KiB a record, measured)
    ratio = f"{peak_small / 2**20:.1f} MiB for 1,500 records, {peak_large / 2**20:.1f} MiB for 3,000"
    assert peak_large < peak_small + 2**20, ratio
    # the forger's record sealed over a made-up head far ahead, and a head naming it: refused
    forged = seal(
        AuditRecord(principal="mallory", action="workload.mode", target="x"), AuditHead(seq=999_999, hash="a" * 64)
    )
    boto3.resource("dynamodb").Table("rf-audit").put_item(
        Item={"pk": "chain", "sk": f"{forged.seq:012d}", "doc": forged.model_dump_json()}
    )
    _put_head(head_of(forged))
    with pytest.raises(AnchorRefused, match="seq 1000000 where seq 3001 was expected"):
        first_anchor(env, monkeypatch, "rf-anchors-forged", measure=False)
    assert not env.s3.list_object_versions(Bucket="rf-anchors-forged").get("Versions"), "nothing anchored"


def test_a_chain_too_long_for_one_run_is_anchored_as_far_as_verified_and_the_next_run_continues(
    anchored: Env,  # noqa: F811
) -> None:
    """A run whose time ends before the head anchors the last record it verified (a head the
    chain holds, linked from genesis) and says how far behind it is; the next run continues from
    that anchor. A forged head far ahead is never anchored on the way, and `audit verify --anchor`
    holds every anchor written."""
    env = anchored
    recs = append(env, 30)
    forged = seal(
        AuditRecord(principal="mallory", action="workload.mode", target="x"), AuditHead(seq=999_999, hash="a" * 64)
    )
    table = boto3.resource("dynamodb").Table("rf-audit")
    table.put_item(Item={"pk": "chain", "sk": f"{forged.seq:012d}", "doc": forged.model_dump_json()})
    _put_head(head_of(forged))
    # no time left past what the function keeps back: one record verified, and anchored as progress
    short = LambdaContext(timeout_s=env.fn["anchor"].RESERVE_S)
    out = env.fn["anchor"].handler(_scheduled(), short)
    assert out == {"seq": 1, "key": anchor_key(head_of(recs[0])), "behind": 999_999}
    with pytest.raises(AnchorRefused, match="seq 1000000 where seq 31 was expected"):
        env.fn["anchor"].handler(_scheduled(), LambdaContext(timeout_s=600))
    assert len(versions(env)) == 1, "the forged head is never anchored"
    # the forger puts the real head back: the next run continues from seq 1 to the head
    table.delete_item(Key={"pk": "chain", "sk": f"{forged.seq:012d}"})
    _put_head(head_of(recs[-1]))
    out = env.fn["anchor"].handler(_scheduled(), LambdaContext(timeout_s=600))
    assert out == {"seq": 30, "key": anchor_key(head_of(recs[-1]))}
    got = cli("audit", "verify", "--store", SPEC, "--anchor", f"s3://{BUCKET}/anchors/")
    assert got.returncode == 0 and "2 anchored head(s) held, the newest at seq 30" in got.stdout, got.stderr
