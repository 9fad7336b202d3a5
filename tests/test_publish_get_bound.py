"""``Publisher.get(key, max_bytes=N)`` and ``put_once``'s comparison read no more than the body
could match, in both publishers (files on premise, S3 in AWS)."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import boto3
import pytest
from moto import mock_aws

from ringfence.clouds.aws.publish import S3Publisher
from ringfence.control.publish import Conflict, Publisher, TooLarge
from ringfence.local.publish import FilePublisher


@pytest.fixture(params=["file", "s3"])
def publisher(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[Publisher]:
    if request.param == "file":
        yield FilePublisher(tmp_path / "objects")
        return
    with mock_aws():
        s3 = boto3.client("s3", region_name="us-east-1")
        s3.create_bucket(Bucket="bucket-x")
        yield S3Publisher(s3, "bucket-x")


def test_get_refuses_a_document_over_max_bytes_and_returns_one_within(publisher: Publisher) -> None:
    publisher.put_once("agent/install-x.sh", b"abc")
    with pytest.raises(TooLarge):
        publisher.get("agent/install-x.sh", max_bytes=2)
    assert publisher.get("agent/install-x.sh", max_bytes=3) == b"abc"
    assert publisher.get("agent/install-x.sh") == b"abc"


@pytest.mark.parametrize("other", [b"abcd", b"ab", b"abx"])
def test_put_once_other_bytes_of_any_size_conflict_and_the_same_do_not(publisher: Publisher, other: bytes) -> None:
    publisher.put_once("agent/install-x.sh", b"abc")
    publisher.put_once("agent/install-x.sh", b"abc")
    with pytest.raises(Conflict):
        publisher.put_once("agent/install-x.sh", other)
    assert publisher.get("agent/install-x.sh") == b"abc"
