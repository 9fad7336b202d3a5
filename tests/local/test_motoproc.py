"""The embedded AWS's moto process remembers which moto backend answers a kind of request
(:class:`ringfence.local.motoproc.MemoizedDispatch`): the remembered app must be the one moto's own
dispatcher picks, for every kind of request the project sends, and kinds moto tells apart must
not share an entry."""

from __future__ import annotations

from typing import Any

import pytest
from moto.moto_server.werkzeug_app import DomainDispatcherApplication, create_backend_app
from werkzeug.test import EnvironBuilder

from ringfence.local.motoproc import MemoizedDispatch, _dispatch_key


def _environ(service: str, path: str = "/", target: str | None = None, host: str = "127.0.0.1:5000",
             body: str = "", region: str = "us-east-1") -> dict[str, Any]:  # fmt: skip
    headers = {
        "Authorization": f"AWS4-HMAC-SHA256 Credential=AKIDEXAMPLE/20261202/{region}/{service}/aws4_request, "
        "SignedHeaders=host;x-amz-date, Signature=00",
        "Host": host,
    }
    if target:
        headers["X-Amz-Target"] = target
    return EnvironBuilder(path=path, method="POST", headers=headers, data=body).get_environ()


KINDS = {
    "ec2": _environ("ec2", body="Action=DescribeInstances"),
    "ec2-eu": _environ("ec2", body="Action=DescribeInstances", region="eu-west-1"),
    "autoscaling": _environ("autoscaling", body="Action=DescribeAutoScalingGroups"),
    "iam": _environ("iam", body="Action=ListRoles"),
    "sts": _environ("sts", body="Action=GetCallerIdentity"),
    "sqs": _environ("sqs", target="AmazonSQS.ReceiveMessage"),
    "events": _environ("events", target="AWSEvents.PutEvents"),
    "dynamodb": _environ("dynamodb", target="DynamoDB_20120810.GetItem"),
    "dynamodbstreams": _environ("dynamodb", target="DynamoDBStreams_20120810.ListStreams"),
    "s3": _environ("s3", path="/bucket/key"),
    "s3control": _environ("s3", path="/v20180820/configuration/publicAccessBlock"),
    "kms": _environ("kms", target="TrentService.Sign"),
    "logs": _environ("logs", target="Logs_20140328.PutLogEvents"),
    "execute-api": _environ("execute-api", path="/restapis"),
    "apigw-management": _environ("execute-api", path="/@connections/abc"),
    "scheduler": _environ("scheduler", path="/schedules"),
}


@pytest.mark.parametrize("kind", sorted(KINDS))
def test_remembered_backend_is_the_one_moto_picks(kind: str) -> None:
    moto_picks = DomainDispatcherApplication(create_backend_app)
    memo = MemoizedDispatch(moto_picks)
    env = KINDS[kind]
    assert _dispatch_key(env) is not None
    first = memo.application(dict(env))
    assert memo.application(dict(env)) is first  # from memory now
    assert first is moto_picks.get_application(dict(env))


def test_kinds_moto_tells_apart_get_their_own_entries() -> None:
    memo = MemoizedDispatch(DomainDispatcherApplication(create_backend_app))
    apps = {kind: memo.application(dict(env)) for kind, env in KINDS.items()}
    for a, b in [("dynamodb", "dynamodbstreams"), ("s3", "s3control"), ("execute-api", "apigw-management"),
                 ("ec2", "autoscaling"), ("sqs", "events")]:  # fmt: skip
        assert apps[a] is not apps[b], (a, b)
    # each memory entry was filled by moto's own choice, once
    assert len(memo._chosen) == len(KINDS)


def test_requests_it_cannot_key_go_to_moto_every_time() -> None:
    unsigned = EnvironBuilder(path="/moto-api/reset", method="POST").get_environ()
    other = _environ("bedrock", path="/foundation-models")
    assert _dispatch_key(unsigned) is None and _dispatch_key(other) is None
    memo = MemoizedDispatch(DomainDispatcherApplication(create_backend_app))
    memo.application(dict(unsigned))
    memo.application(dict(other))
    assert memo._chosen == {}
