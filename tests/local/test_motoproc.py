"""The embedded AWS's moto process remembers which moto backend answers a kind of request
(:class:`ringfence.local.motoproc.MemoizedDispatch`): the remembered app must be the one moto's own
dispatcher picks, for every kind of request the project sends, and kinds moto tells apart must
not share an entry."""

from __future__ import annotations

import threading
import time
from typing import Any

import pytest
from hypothesis import example, given, settings
from hypothesis import strategies as st
from moto.moto_server.werkzeug_app import DomainDispatcherApplication, create_backend_app
from werkzeug.test import EnvironBuilder

from ringfence.local.motoproc import MemoizedDispatch, _dispatch_key
from tests.describes import HeldDescribes


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


def test_the_change_count_moves_for_what_the_watchers_compare_and_wakes_a_waiter(embedded: Any) -> None:
    """``changes_after`` (moto_changes): reads and interface changes leave the count alone; tag,
    launch and Auto Scaling changes move it; a watcher blocked on it wakes when it moves, not at
    the end of its wait."""
    import threading
    import time

    ec2 = embedded.client("ec2")
    vpc = ec2.create_vpc(CidrBlock="10.99.0.0/16")["Vpc"]["VpcId"]
    subnet = ec2.create_subnet(VpcId=vpc, CidrBlock="10.99.1.0/24")["Subnet"]["SubnetId"]
    before = embedded.changes_after(-1)
    ec2.describe_instances()
    ec2.describe_security_groups()
    assert embedded.changes_after(before, 0.2) == before, "reads are no news"
    (inst,) = ec2.run_instances(ImageId="ami-12c6146b", MinCount=1, MaxCount=1, SubnetId=subnet)["Instances"]
    launched = embedded.changes_after(before, 0.2)
    assert launched > before
    eni = inst["NetworkInterfaces"][0]["NetworkInterfaceId"]
    sg = ec2.create_security_group(GroupName="rf-changes-test", Description="t", VpcId=vpc)["GroupId"]
    ec2.modify_network_interface_attribute(NetworkInterfaceId=eni, Groups=[sg])
    assert embedded.changes_after(launched, 0.2) == launched, "interface groups are not what the watchers compare"
    got: list[tuple[int, float]] = []

    def wait() -> None:
        t = time.monotonic()
        got.append((embedded.changes_after(launched, 5.0), time.monotonic() - t))

    waiter = threading.Thread(target=wait)
    waiter.start()
    time.sleep(0.3)
    ec2.create_tags(Resources=[inst["InstanceId"]], Tags=[{"Key": "env", "Value": "prod"}])
    waiter.join(10)
    ((seq, waited),) = got
    assert seq > launched and waited < 4.0, "woken by the tag change, not by the end of its wait"
    ec2.terminate_instances(InstanceIds=[inst["InstanceId"]])
    assert embedded.changes_after(seq, 0.2) > seq


def test_transactions_are_all_or_nothing_without_copying_tables(embedded: Any) -> None:
    """``serialise_transactions``: a transaction whose conditions all hold is applied whole; one
    with a failing condition changes nothing and names the failing operation, as DynamoDB does."""
    import botocore.exceptions

    ddb = embedded.client("dynamodb")
    name = "rf-motoproc-tx"
    ddb.create_table(
        TableName=name,
        KeySchema=[{"AttributeName": "pk", "KeyType": "HASH"}],
        AttributeDefinitions=[{"AttributeName": "pk", "AttributeType": "S"}],
        BillingMode="PAY_PER_REQUEST",
    )
    new = {"ConditionExpression": "attribute_not_exists(pk)"}

    def put(pk: str, v: str) -> dict[str, Any]:
        return {"Put": {"TableName": name, "Item": {"pk": {"S": pk}, "v": {"S": v}}, **new}}

    ddb.transact_write_items(TransactItems=[put("a", "1"), put("b", "1")])
    with pytest.raises(botocore.exceptions.ClientError) as err:
        ddb.transact_write_items(TransactItems=[put("c", "2"), put("a", "2")])
    reasons = [r.get("Code") for r in err.value.response["CancellationReasons"]]
    assert reasons == ["None", "ConditionalCheckFailed"]
    items = {i["pk"]["S"]: i["v"]["S"] for i in ddb.scan(TableName=name)["Items"]}
    assert items == {"a": "1", "b": "1"}, "the failed transaction wrote nothing (not c, not a)"
    ddb.transact_write_items(
        TransactItems=[
            {
                "Update": {
                    "TableName": name,
                    "Key": {"pk": {"S": "b"}},
                    "UpdateExpression": "SET v = :v",
                    "ConditionExpression": "v = :old",
                    "ExpressionAttributeValues": {":v": {"S": "3"}, ":old": {"S": "1"}},
                }
            },
            {"Delete": {"TableName": name, "Key": {"pk": {"S": "a"}}}},
        ]
    )
    items = {i["pk"]["S"]: i["v"]["S"] for i in ddb.scan(TableName=name)["Items"]}
    assert items == {"b": "3"}
    ddb.delete_table(TableName=name)


def test_a_client_connection_stays_open_across_calls(embedded: Any) -> None:
    """moto's werkzeug server closed every connection after its answer: each AWS call of the lab
    was a new TCP connection and a new thread of moto's. Three signed calls on one connection."""
    import http.client
    import json
    from urllib.parse import urlsplit

    url = urlsplit(embedded.url)
    conn = http.client.HTTPConnection(url.hostname, url.port, timeout=30)
    sockets = set()
    for _ in range(3):
        headers = {
            "X-Amz-Target": "DynamoDB_20120810.ListTables",
            "Content-Type": "application/x-amz-json-1.0",
            "Authorization": "AWS4-HMAC-SHA256 Credential=a/20260101/ca-central-1/dynamodb/aws4_request, "
            "SignedHeaders=host, Signature=x",
        }
        conn.request("POST", "/", body=b"{}", headers=headers)
        answer = conn.getresponse()
        assert answer.status == 200 and "TableNames" in json.loads(answer.read())
        assert answer.getheader("Connection", "").lower() != "close"
        sockets.add(id(conn.sock))
    conn.close()
    assert len(sockets) == 1, "one connection for the three calls"


def test_calls_are_counted_by_service_and_action(embedded: Any) -> None:
    """``calls()`` (``/_ringfence/calls``): what a benchmark reads to say where a run's time went
    — each call moto answered, by service and action, with the time moto spent on it."""
    before = embedded.calls()
    ec2 = embedded.client("ec2")
    for _ in range(3):
        ec2.describe_instances()
    embedded.client("sqs").list_queues()
    after = embedded.calls()
    n0, t0 = before.get("ec2.DescribeInstances", (0, 0.0))
    n1, t1 = after["ec2.DescribeInstances"]
    assert n1 - n0 == 3 and t1 > t0
    assert after["sqs.ListQueues"][0] - before.get("sqs.ListQueues", (0, 0.0))[0] == 1


def test_the_estate_read_from_moto_is_what_describe_calls_answer(embedded: Any) -> None:
    """``instances()`` (``/_ringfence/instances``), which the router and the lab's hypervisor read
    instead of DescribeInstances: the same ids, states, addresses and tags as DescribeInstances,
    and the same members and lifecycle states as DescribeAutoScalingGroups."""
    ec2, asg = embedded.client("ec2"), embedded.client("autoscaling")
    vpc = ec2.create_vpc(CidrBlock="10.98.0.0/16")["Vpc"]["VpcId"]
    subnet = ec2.create_subnet(VpcId=vpc, CidrBlock="10.98.1.0/24")["Subnet"]["SubnetId"]
    (a, b) = ec2.run_instances(ImageId="ami-12c6146b", MinCount=2, MaxCount=2, SubnetId=subnet)["Instances"]
    ec2.create_tags(
        Resources=[a["InstanceId"]], Tags=[{"Key": "Name", "Value": "estate-a"}, {"Key": "env", "Value": "x"}]
    )
    ec2.terminate_instances(InstanceIds=[b["InstanceId"]])
    asg.create_launch_configuration(
        LaunchConfigurationName="estate-lc", ImageId="ami-12c6146b", InstanceType="t3.micro"
    )
    asg.create_auto_scaling_group(
        AutoScalingGroupName="estate-asg", LaunchConfigurationName="estate-lc", MinSize=1, MaxSize=2,
        DesiredCapacity=1, VPCZoneIdentifier=subnet,
    )  # fmt: skip
    got = embedded.instances()
    described = {
        i["InstanceId"]: i for page in ec2.get_paginator("describe_instances").paginate()
        for r in page["Reservations"] for i in r["Instances"]
    }  # fmt: skip
    assert set(got.instances) == set(described) and {a["InstanceId"], b["InstanceId"]} <= set(got.instances)
    for iid, inst in got.instances.items():
        d = described[iid]
        assert inst.state == d["State"]["Name"]
        assert inst.private_ip == d.get("PrivateIpAddress")
        assert inst.tags == {t["Key"]: t["Value"] for t in d.get("Tags", [])}
    assert got.instances[b["InstanceId"]].state == "terminated"
    assert got.instances[a["InstanceId"]].tags == {"Name": "estate-a", "env": "x"}
    groups = {g["AutoScalingGroupName"]: g for g in asg.describe_auto_scaling_groups()["AutoScalingGroups"]}
    assert set(got.groups) == set(groups)
    for name, g in got.groups.items():
        assert g.arn == groups[name]["AutoScalingGroupARN"]
        assert g.members == {i["InstanceId"]: i["LifecycleState"] for i in groups[name]["Instances"]}
    assert len(got.groups["estate-asg"].members) == 1


def test_identity_documents_asked_while_one_is_described_share_the_next_describe(embedded: Any) -> None:
    """The lab's IMDS documents (``EmbeddedAws.identity_document``): instances whose agents ask
    while a describe is in flight are described together in the next call, by id (never every
    live instance: moto renders each one it answers with); each document names its own instance
    as DescribeInstances does; a stopped instance has one too, an unknown one none."""
    import json
    import threading

    embedded.reset()
    ec2 = embedded.client("ec2")
    vpc = ec2.create_vpc(CidrBlock="10.97.0.0/16")["Vpc"]["VpcId"]
    subnet = ec2.create_subnet(VpcId=vpc, CidrBlock="10.97.1.0/24")["Subnet"]["SubnetId"]
    launched = ec2.run_instances(ImageId="ami-12c6146b", MinCount=6, MaxCount=6, SubnetId=subnet)["Instances"]
    bystanders = ec2.run_instances(ImageId="ami-12c6146b", MinCount=3, MaxCount=3, SubnetId=subnet)["Instances"]
    ids = [i["InstanceId"] for i in launched]
    ec2.stop_instances(InstanceIds=[ids[-1]])
    docs: dict[str, str] = {}
    threads = [threading.Thread(target=lambda i=i: docs.update({i: embedded.identity_document(i)})) for i in ids]
    with HeldDescribes(ec2) as held:
        threads[0].start()
        assert held.first_in.wait(10)
        for t in threads[1:]:
            t.start()
        while embedded.documents_queued < len(ids) - 1:
            threading.Event().wait(0.01)
        held.release()
        for t in threads:
            t.join(30)
    assert held.asked == [[ids[0]], sorted(ids[1:])], (
        "the first alone, the five that asked meanwhile in one call, by id"
    )
    assert not {b["InstanceId"] for b in bystanders} & {i for call in held.asked for i in call}
    for inst in launched:
        doc = json.loads(docs[inst["InstanceId"]])
        assert doc["instanceId"] == inst["InstanceId"] and doc["privateIp"] == inst["PrivateIpAddress"]
        assert doc["availabilityZone"] == inst["Placement"]["AvailabilityZone"]
    before = embedded.calls()["ec2.DescribeInstances"][0]
    assert embedded.identity_document(ids[0]) == docs[ids[0]]
    assert embedded.calls()["ec2.DescribeInstances"][0] == before, "described once"
    with pytest.raises(LookupError, match="i-0123456789abcdef0"):
        embedded.identity_document("i-0123456789abcdef0")


def test_event_paths_are_parsed_once_and_find_what_a_fresh_parse_finds() -> None:
    """``cache_event_paths``: moto's EventBridge gets one parse per JSONPath (it built a yacc parser
    for every event and target), and a kept parse finds in each event what a fresh one does."""
    import jsonpath_ng.ext as ext

    from ringfence.local.motoproc import cache_event_paths

    fresh = ext.parse
    cache_event_paths()
    cache_event_paths()  # a second install keeps the first
    try:
        assert ext.parse("$.detail") is ext.parse("$.detail")
        for event in ({"detail": {"state": "running"}}, {"detail": {"state": "terminated"}}):
            kept = [m.value for m in ext.parse("$.detail").find(event)]
            assert kept == [m.value for m in fresh("$.detail").find(event)] == [event["detail"]]
    finally:
        ext.parse = fresh


def test_cheap_bookkeeping_answers_what_moto_answers() -> None:
    """``cheap_bookkeeping``: SQS's retention check reads the one attribute (moto computed every
    attribute of the queue per message handed out) and says what moto's own check says; a
    response class's method names are looked up once and are moto's list."""
    import moto.core.responses as responses
    from moto.core.utils import method_names_from_class
    from moto.sqs.models import Message, Queue, SQSBackend

    from ringfence.local.motoproc import cheap_bookkeeping

    original_check, original_names = SQSBackend.is_message_valid_based_on_retention_period, method_names_from_class
    original_attributes = Queue.__dict__["attributes"]
    backend = SQSBackend("us-east-1", "123456789012")
    backend.create_queue("kept-a-minute", MessageRetentionPeriod="60")
    now_ms = time.time() * 1000
    messages = [Message("m1", "fresh"), Message("m2", "old")]
    messages[0].sent_timestamp, messages[1].sent_timestamp = int(now_ms - 1000), int(now_ms - 120_000)
    expected = [original_check(backend, "kept-a-minute", m) for m in messages]
    assert expected == [True, False]
    try:
        cheap_bookkeeping()
        assert [backend.is_message_valid_based_on_retention_period("kept-a-minute", m) for m in messages] == expected
        names = responses.method_names_from_class(responses.BaseResponse)
        assert names == original_names(responses.BaseResponse) and "call_action" in names
        assert responses.method_names_from_class(responses.BaseResponse) is names, "looked up once"
    finally:
        SQSBackend.is_message_valid_based_on_retention_period = original_check  # type: ignore[method-assign]
        responses.method_names_from_class = original_names  # type: ignore[attr-defined]
        Queue.attributes = original_attributes  # type: ignore[method-assign]


def test_queue_attributes_read_one_by_one_are_what_moto_builds_whole() -> None:
    """``cheap_bookkeeping``: a queue's attributes are computed as they are read (SendMessage read
    one from a dict of all of them, counting the queue's messages each time), the same keys and
    values as moto's dict, for plain, FIFO, dead-letter, encrypted and policied queues."""
    from moto.sqs.models import Queue, sqs_backends

    from ringfence.local.motoproc import cheap_bookkeeping

    original = Queue.__dict__["attributes"]
    backend = sqs_backends["210987654321"]["us-east-1"]  # registered: the dead-letter queue is looked up there
    dlq = backend.create_queue("dead")
    queues = [
        backend.create_queue("plain"),
        backend.create_queue("ordered.fifo", FifoQueue="true", ContentBasedDeduplication="true"),
        backend.create_queue("plain-fifo.fifo", FifoQueue="true"),
        backend.create_queue(
            "guarded",
            RedrivePolicy=f'{{"deadLetterTargetArn": "{dlq.queue_arn}", "maxReceiveCount": 3}}',
            KmsMasterKeyId="alias/rf",
            Policy='{"Version": "2012-10-17", "Statement": []}',
        ),
    ]
    for q in queues:
        fifo = {"group_id": "g", "deduplication_id": "d"} if q.fifo_queue else {}
        backend.send_message(q.name, "now", **fifo)
        if not q.fifo_queue:
            backend.send_message(q.name, "later", delay_seconds=30)
    backend.receive_message("plain", 1, 0, 30)  # one in flight
    try:
        expected = {q.name: dict(original.fget(q)) for q in [dlq, *queues]}
        asked = {
            q.name: backend.get_queue_attributes(q.name, ["QueueArn", "ContentBasedDeduplication"]) for q in queues
        }
        cheap_bookkeeping()
        assert {q.name: dict(q.attributes) for q in [dlq, *queues]} == expected
        assert {q.name: list(q.attributes) for q in queues} == {q.name: list(expected[q.name]) for q in queues}
        assert expected["plain"]["ApproximateNumberOfMessagesNotVisible"] == 1
        assert expected["plain"]["ApproximateNumberOfMessagesDelayed"] == 1
        assert [q.attributes.get("ContentBasedDeduplication") for q in queues] == [None, "true", "false", None]
        assert "RedrivePolicy" in queues[3].attributes and "KmsMasterKeyId" not in queues[0].attributes
        assert {
            q.name: backend.get_queue_attributes(q.name, ["QueueArn", "ContentBasedDeduplication"]) for q in queues
        } == asked
        assert dict(backend.get_queue_attributes("guarded", ["All"])) == expected["guarded"]
    finally:
        Queue.attributes = original  # type: ignore[method-assign]
        backend.reset()


_SCALARS = st.one_of(
    st.builds(lambda s: {"S": s}, st.text(max_size=8)),
    st.builds(lambda n: {"N": str(n)}, st.integers(-(10**6), 10**6)),
    st.builds(lambda b: {"BOOL": b}, st.booleans()),
    st.just({"NULL": True}),
    st.builds(lambda ss: {"SS": sorted(ss)}, st.sets(st.text(min_size=1, max_size=4), min_size=1, max_size=3)),
    st.builds(lambda ns: {"NS": [str(n) for n in sorted(ns)]}, st.sets(st.integers(0, 99), min_size=1, max_size=3)),
    st.builds(lambda b: {"B": b}, st.binary(max_size=6)),
    st.builds(lambda bs: {"BS": sorted(bs)}, st.sets(st.binary(min_size=1, max_size=4), min_size=1, max_size=2)),
)
_ATTRIBUTE_VALUES = st.recursive(
    _SCALARS,
    lambda inner: st.one_of(
        st.builds(lambda m: {"M": m}, st.dictionaries(st.text(min_size=1, max_size=5), inner, max_size=4)),
        st.builds(lambda items: {"L": items}, st.lists(inner, max_size=4)),
    ),
    max_leaves=12,
)
_ITEMS = st.dictionaries(st.text(min_size=1, max_size=6), _ATTRIBUTE_VALUES, min_size=1, max_size=5)
# every shape, drawable by the strategy above: each of the ten kinds as an item's attribute, in a
# map and in a list; maps and lists in wire form and holding binary (walked), empty ones in each
# place; an empty string and binary; five deep; an item mixing wire-form and walked attributes.
# Drawn at random, a kind as an item's own attribute is the rarest shape (75 draws missed one in 2
# seeds of 5; 150 in none): with this example every run has every shape, and 75 draws mix them
_EVERY_SHAPE = [
    {"s": {"S": ""}, "n": {"N": "-5"}, "t": {"BOOL": False}, "z": {"NULL": True}, "ss": {"SS": ["a", "é"]}},
    {"ns": {"NS": ["1", "2"]}, "b": {"B": b""}, "bs": {"BS": [b"\x00", b"\xff"]}, "em": {"M": {}}, "el": {"L": []}},
    {
        "wm": {"M": {"s": {"S": "x"}, "n": {"N": "1"}, "t": {"BOOL": True}, "z": {"NULL": True}}},
        "wm2": {"M": {"ss": {"SS": ["a"]}, "ns": {"NS": ["3"]}, "m": {"M": {}}, "l": {"L": []}}},
        "bm": {
            "M": {
                "b": {"B": b"\x01"},
                "bs": {"BS": [b"\x02"]},
                "m": {"M": {"b": {"B": b"3"}}},
                "l": {"L": [{"B": b"4"}]},
            }
        },
        "wl": {
            "L": [
                {"S": "y"},
                {"N": "2"},
                {"BOOL": False},
                {"L": [{"NULL": True}, {"SS": ["q"]}, {"NS": ["4"]}, {"M": {}}]},
            ]
        },
        "bl": {
            "L": [
                {"B": b""},
                {"BS": [b"\x05"]},
                {"M": {"d": {"L": [{"M": {"e": {"B": b"6"}}}]}}},
                {"L": [{"L": []}, {"B": b"7"}]},
            ]
        },
    },
]


@settings(max_examples=75, deadline=None)
@example(items=_EVERY_SHAPE)
@given(items=st.lists(_ITEMS, min_size=1, max_size=3))
@pytest.mark.slow
def test_attribute_values_in_wire_form_serialise_as_moto_walks_them(items: list[dict[str, Any]]) -> None:
    """``plain_attribute_values``: DynamoDB answers holding items of every attribute type (binary
    ones, which still take moto's walk, among them) serialise to the JSON moto's own serialiser
    writes, for the operations that answer with items."""
    from moto.core.serialize import JSONSerializer, XFormedAttributePicker
    from moto.core.utils import get_service_model

    from ringfence.local.motoproc import plain_attribute_values

    model = get_service_model("dynamodb")  # moto's own, as its responses use it
    answers = {
        "GetItem": {"Item": items[0]},
        "UpdateItem": {"Attributes": items[0]},
        "BatchGetItem": {"Responses": {"t": items}, "UnprocessedKeys": {}},
        "Query": {"Items": items, "Count": len(items), "ScannedCount": len(items)},
    }

    def serialise() -> dict[str, str]:
        return {
            op: JSONSerializer(
                operation_model=model.operation_model(op), value_picker=XFormedAttributePicker()
            ).serialize(answer)["body"]
            for op, answer in answers.items()
        }

    original = JSONSerializer._serialize_type_structure
    expected = serialise()
    try:
        plain_attribute_values()
        plain_attribute_values()  # a second install keeps the first
        assert serialise() == expected
    finally:
        JSONSerializer._serialize_type_structure = original  # type: ignore[method-assign]


def test_items_of_every_attribute_type_come_back_from_the_lab_as_written(embedded: Any) -> None:
    """The lab's moto (with ``plain_attribute_values``) answers GetItem, UpdateItem and Query
    with the items written, every attribute type included."""
    ddb = embedded.client("dynamodb")
    ddb.create_table(
        TableName="rf-wire-form",
        KeySchema=[{"AttributeName": "pk", "KeyType": "HASH"}],
        AttributeDefinitions=[{"AttributeName": "pk", "AttributeType": "S"}],
        BillingMode="PAY_PER_REQUEST",
    )
    item = {
        "pk": {"S": "w-1"},
        "empty": {"S": ""},
        "n": {"N": "42"},
        "flag": {"BOOL": False},
        "none": {"NULL": True},
        "ss": {"SS": ["a", "b"]},
        "ns": {"NS": ["1", "2"]},
        "b": {"B": b"\x00\xff"},
        "nested": {"M": {"l": {"L": [{"S": "x"}, {"M": {"bs": {"BS": [b"\x01"]}}}, {"N": "7"}]}}},
    }
    ddb.put_item(TableName="rf-wire-form", Item=item)
    assert ddb.get_item(TableName="rf-wire-form", Key={"pk": {"S": "w-1"}})["Item"] == item
    updated = ddb.update_item(
        TableName="rf-wire-form",
        Key={"pk": {"S": "w-1"}},
        UpdateExpression="SET n = :n",
        ExpressionAttributeValues={":n": {"N": "43"}},
        ReturnValues="ALL_NEW",
    )["Attributes"]
    assert updated == {**item, "n": {"N": "43"}}
    queried = ddb.query(
        TableName="rf-wire-form",
        KeyConditionExpression="pk = :k",
        ExpressionAttributeValues={":k": {"S": "w-1"}},
    )["Items"]
    assert queried == [updated]


@pytest.mark.parametrize("one_at_a_time", [True, False])
def test_two_actions_recorded_at_once_in_a_fresh_hold_are_both_kept(
    monkeypatch: pytest.MonkeyPatch, one_at_a_time: bool
) -> None:
    """``one_dynamodb_request_at_a_time``: compute records an instance's two launch actions (one
    per hook) in its fresh hold on threads of their own (``LaunchGate.complete_once``). moto's
    UpdateItem found the hold missing for both, and the later creation replaced the item the
    other action had been written into meanwhile: that action's claim failed and it was left to
    time out (CI, once: ``test_two_launch_hooks_at_once_are_both_completed``). DynamoDB applies
    each write to an item whole. Forced here: the first creation waits (2 s at most) until the
    other action is stored, which it never is while requests are atomic. The unpatched case
    checks that the interleaving is still forced (moto as it is loses an action)."""
    import boto3
    import requests
    from moto.dynamodb.models.table import Table
    from moto.dynamodb.responses import DynamoHandler
    from moto.server import ThreadedMotoServer

    from ringfence.local.motoproc import one_dynamodb_request_at_a_time
    from ringfence.store.dynamodb import DynamoStore

    monkeypatch.setattr(DynamoHandler, "call_action", DynamoHandler.call_action)  # put back afterwards
    if one_at_a_time:
        one_dynamodb_request_at_a_time()
    created, iid = Table.put_item, "i-race"
    paused = threading.Event()

    def put_item(self: Any, item_attrs: dict[str, Any], *args: Any, **kw: Any) -> Any:
        if item_attrs.get("pk") == {"S": f"launch#{iid}"} and not paused.is_set():
            paused.set()  # the first creation of the hold: let the other action through first
            deadline = time.monotonic() + 2
            while time.monotonic() < deadline:
                stored = _stored(self, iid)
                if stored is not None and len(stored.get("actions", {}).get("M", {})) > 0:
                    break
                time.sleep(0.01)
        return created(self, item_attrs, *args, **kw)

    monkeypatch.setattr(Table, "put_item", put_item)
    server = ThreadedMotoServer(ip_address="127.0.0.1", port=0, verbose=False)
    server.start()
    try:
        host, port = server.get_host_and_port()
        url = f"http://{host}:{port}"
        requests.post(f"{url}/moto-api/reset", timeout=10)
        ddb = boto3.resource(
            "dynamodb",
            endpoint_url=url,
            region_name="ca-central-1",
            aws_access_key_id="testing",
            aws_secret_access_key="testing",
        )
        for name, keys in {"rf-inventory": ["id"], "rf-state": ["pk", "sk"], "rf-audit": ["pk", "sk"]}.items():
            ddb.create_table(
                TableName=name,
                KeySchema=[{"AttributeName": k, "KeyType": t} for k, t in zip(keys, ("HASH", "RANGE"), strict=False)],
                AttributeDefinitions=[{"AttributeName": k, "AttributeType": "S"} for k in keys],
                BillingMode="PAY_PER_REQUEST",
            )
        store = DynamoStore("rf-inventory", "rf-state", "rf-audit", resource=ddb)

        def record(hook: str, token: str) -> None:
            store.hold_launch_action(iid, {"hook_name": hook, "token": token})

        first = threading.Thread(target=record, args=("rf-hook", "t1"))
        first.start()
        assert paused.wait(10), "the first action's creation of the hold was reached"
        second = threading.Thread(target=record, args=("rf-hook-warm", "t2"))
        second.start()
        first.join(30)
        second.join(30)
        hold = store.launch_hold(iid)
        kept = sorted(hold.actions) if hold is not None else []
        claims = [store.claim_launch_release(iid, t) for t in ("t1", "t2")]
    finally:
        server.stop()
    if one_at_a_time:
        assert kept == ["t1", "t2"], "both actions recorded"
        assert claims == [True, True], "each claimed (then completed) on its own"
    else:
        assert kept != ["t1", "t2"], "moto as it is loses one under this interleaving"


def _stored(table: Any, iid: str) -> dict[str, Any] | None:
    """The hold item of ``iid`` as moto's table holds it now (wire form), or None."""
    from moto.dynamodb.models.dynamo_type import DynamoType

    item = table.get_item(DynamoType({"S": f"launch#{iid}"}), DynamoType({"S": "hold"}))
    return None if item is None else item.to_json()["Attributes"]
