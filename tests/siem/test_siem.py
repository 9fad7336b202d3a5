"""SIEM output: the OCSF events validated against the published schema's required attributes, types
and enums (the vendored subset, see derive_ocsf_schema.py), CEF, and each sink against a real
receiver: a UDP and a TCP syslog server on loopback, EventBridge and CloudWatch Logs on moto server,
a file; and the control plane wired to it (``ringfence serve``'s LocalWiring)."""

from __future__ import annotations

import json
import re
import socket
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import boto3
import jsonschema
import pytest
import requests

from ringfence.agentapi import DropEvent
from ringfence.audit import AuditHead, AuditRecord, seal
from ringfence.siem import Siem, SiemSpecError, drop_activity, fold_drops, ocsf, to_cef
from ringfence.siem.sinks import parse

SCHEMA = json.loads((Path(__file__).parent / "ocsf-1.7.0-subset.schema.json").read_text())
CLASS_DEF = {4001: "network_activity", 6003: "api_activity", 2004: "detection_finding"}


def validate(event: dict[str, Any]) -> None:
    """Against the published schema's class; and what JSON Schema cannot say: the type_uid rule."""
    schema = {**SCHEMA, "$ref": f"#/$defs/{CLASS_DEF[event['class_uid']]}"}
    jsonschema.Draft202012Validator(schema).validate(event)
    assert event["type_uid"] == event["class_uid"] * 100 + event["activity_id"]
    assert event["metadata"]["version"] == SCHEMA["ocsf_version"] == ocsf.OCSF_VERSION


def sealed(action: str = "workload.quarantine", **kw: Any) -> AuditRecord:
    rec = AuditRecord(principal="alice", action=action, target="dc1-web-1", **{"reason": "IR-7", **kw})
    return seal(rec, AuditHead(seq=41, hash="ab" * 32))


def drop(action: str = "drop", **kw: Any) -> DropEvent:
    base = {"time": 1764750000.25, "direction": "inbound", "src": "10.0.0.9", "dst": "10.0.1.5", "proto": "tcp"}
    return DropEvent.model_validate(
        {**base, "sport": 40000, "dport": 5432, "rule_id": "deny-db", "action": action, **kw}
    )


def network(d: DropEvent) -> dict[str, Any]:
    return drop_activity("i-0abc", d)


FINDING = ocsf.detection_finding(
    "privileged-label-change:i-0abc:ev-1",
    title="Unapproved move into a privileged label value",
    time=1764750000.0,
    severity_id=ocsf.HIGH,
    resource="i-0abc",
    analytic="privileged-label-change",
    message="i-0abc: bob moved it into role=jumpbox (quarantined)",
    detail={"principal": "bob"},
)


# --- OCSF ----------------------------------------------------------------------------------------


def test_a_label_grant_is_a_create_and_its_revocation_a_delete() -> None:
    assert ocsf.api_activity(sealed("label.bind"))["activity_id"] == 1
    assert ocsf.api_activity(sealed("label.unbind"))["activity_id"] == 4


@pytest.mark.parametrize(
    "event",
    [
        ocsf.api_activity(sealed()),
        ocsf.api_activity(sealed("policy.provision", before="", after="d" * 64)),
        ocsf.api_activity(sealed("admin.denied")),
        ocsf.api_activity(sealed("token.revoke")),
        network(drop()),
        network(drop("would-drop", direction="outbound", sport=None, dport=None, proto="icmp", rule_id=None)),
        FINDING,
        drop_activity("i-0abc", fold_drops([drop(), drop(time=1764750009.5, sport=40001, count=4)])[0]),
        ocsf.drops_suppressed(
            "i-0abc",
            action="drop",
            events=7,
            count=90,
            first=1764750000.0,
            last=1764750030.0,
            window_start=1764750000.0,
            window=60.0,
            budget=100,
            seq=1,
        ),
        ocsf.drops_suppressed(
            "i-0abc",
            action="would-drop",
            events=1,
            count=1,
            first=1764750000.0,
            last=1764750000.0,
            window_start=1764750000.0,
            window=60.0,
            budget=1,
            seq=2,
        ),
    ],
    ids=[
        "quarantine",
        "provision",
        "denied",
        "revoke",
        "drop",
        "would-drop",
        "finding",
        "folded",
        "suppressed",
        "suppressed-would-drop",
    ],
)
def test_events_are_valid_ocsf_of_their_class(event: dict[str, Any]) -> None:
    validate(event)


def test_the_schema_catches_what_it_should() -> None:
    """The validation can fail: a missing required attribute, an enum value the class does not
    have, a wrong type, an attribute the class does not define."""
    good = network(drop())
    for broken in (
        {k: v for k, v in good.items() if k != "severity_id"},
        {**good, "activity_id": 42, "type_uid": 400142},
        {**good, "disposition_id": 77},
        {**good, "time": "yesterday"},
        {**good, "metadata": {"version": "1.7.0"}},  # no product
        {**good, "src_endpoint": {"port": 1}},  # an endpoint needs an ip, a name, …
        {**good, "rf_workload": "i-0abc"},
    ):
        with pytest.raises(jsonschema.ValidationError):
            validate(broken)
    api = ocsf.api_activity(sealed())
    with pytest.raises(jsonschema.ValidationError):
        validate({k: v for k, v in api.items() if k != "actor"})


def test_what_the_events_say() -> None:
    rec = sealed("workload.mode", before="sha256:1", after="sha256:2")
    api = ocsf.api_activity(rec)
    assert api["time"] == int(rec.time * 1000) and api["api"]["request"]["uid"] == rec.id
    assert (api["activity_id"], api["actor"]["user"]["name"], api["api"]["operation"]) == (3, "alice", "workload.mode")
    audit = api["unmapped"]["audit"]
    assert (audit["seq"], audit["before"], audit["after"]) == (42, "sha256:1", "sha256:2") and len(audit["hash"]) == 64
    assert api["metadata"]["sequence"] == 42 and api["metadata"]["uid"] == rec.id
    d = network(drop())
    assert (d["action_id"], d["disposition_id"], d["activity_id"]) == (2, 6, 5)
    assert d["dst_endpoint"] == {"ip": "10.0.1.5", "port": 5432, "instance_uid": "i-0abc"}
    assert d["connection_info"] == {"direction_id": 1, "protocol_name": "tcp", "protocol_num": 6}
    w = network(drop("would-drop"))
    assert (w["action_id"], w["disposition_id"], w["severity_id"]) == (1, 15, 1)


def test_cef_lines() -> None:
    line = to_cef(ocsf.api_activity(sealed(reason="a|b=c\nd")))
    head = line.split("|")
    assert head[:7] == [
        "CEF:0",
        "Ringfence",
        "Ringfence",
        ocsf.PRODUCT["version"],
        "600303",
        "API Activity: Update",
        "5",
    ]
    assert "suser=alice" in line and "cs1=workload.quarantine" in line and "cn1=42" in line
    assert "\n" not in line and "a|b\\=c\\nd" in line, "extension values escape = and line breaks"
    drop_line = to_cef(network(drop()))
    assert "src=10.0.0.9 spt=40000 dst=10.0.1.5 dpt=5432" in drop_line and "act=Denied" in drop_line
    assert "cs4=deny-db" in drop_line


# --- sinks ---------------------------------------------------------------------------------------

RFC5424 = re.compile(
    rb"^<(?P<pri>\d{1,3})>1 (?P<ts>\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d\.\d{3}Z) (?P<host>\S+) ringfence (?P<pid>\d+) "
    rb"(?P<msgid>\d+) - (?P<msg>.*)$",
    re.S,
)


def test_syslog_over_udp_to_a_real_server() -> None:
    server = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    server.bind(("127.0.0.1", 0))
    server.settimeout(10)
    port = server.getsockname()[1]
    siem = Siem.from_spec(f"syslog://127.0.0.1:{port}")
    siem.audit(sealed())
    siem.drops("i-0abc", [drop(), drop("would-drop")])
    got = [server.recvfrom(65535)[0] for _ in range(3)]
    server.close()
    siem.close()
    parsed = [RFC5424.match(g) for g in got]
    assert all(parsed), got
    events = [json.loads(m.group("msg")) for m in parsed if m]
    for e in events:
        validate(e)
    assert [e["class_uid"] for e in events] == [6003, 4001, 4001]
    # facility 13 (log audit); severity from the event: Medium → 4 warning, Low → 5, Informational → 6
    assert [int(m.group("pri")) for m in parsed if m] == [13 * 8 + 4, 13 * 8 + 5, 13 * 8 + 6]
    assert siem.sent == 3 and siem.failed == 0


def test_one_event_that_cannot_be_written_costs_itself_not_the_batch() -> None:
    """A drop dated 1e20 (a time no syslog timestamp can say) made the syslog sink raise for
    the whole batch, and one event CEF could not format lost every other: now the first is sent
    with a NILVALUE timestamp, the second alone is counted as failed, the rest is delivered."""
    server = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    server.bind(("127.0.0.1", 0))
    server.settimeout(10)
    port = server.getsockname()[1]
    siem = Siem.from_spec(f"cef+syslog://127.0.0.1:{port}")
    far = drop_activity("i-0abc", drop().model_copy(update={"time": 1e20}))
    broken = {"class_uid": 4001}  # no type_uid, no time: to_cef cannot write it
    siem.emit([network(drop()), far, broken, network(drop("would-drop"))])
    got = [server.recvfrom(65535)[0] for _ in range(3)]
    server.close()
    siem.close()
    assert all(g.startswith(b"<") and b"CEF:0|Ringfence|" in g for g in got), got
    assert b">1 - " in got[1]  # the NILVALUE timestamp
    assert siem.sent == 3 and siem.failed == 1


def test_cef_over_syslog_tcp_with_octet_counting() -> None:
    server = socket.create_server(("127.0.0.1", 0))
    port = server.getsockname()[1]
    received = bytearray()

    def accept() -> None:
        conn, _ = server.accept()
        conn.settimeout(10)
        with conn:
            while chunk := conn.recv(65536):
                received.extend(chunk)

    t = threading.Thread(target=accept)
    t.start()
    siem = Siem.from_spec(f"cef+syslog+tcp://127.0.0.1:{port}")
    siem.audit(sealed())
    siem.finding(FINDING)
    siem.close()
    t.join(10)
    server.close()
    frames, rest = [], bytes(received)
    while rest:
        length, _, rest = rest.partition(b" ")
        frames.append(rest[: int(length)])
        rest = rest[int(length) :]
    msgs = [RFC5424.match(f) for f in frames]
    assert len(frames) == 2 and all(msgs)
    assert [m.group("msg").split(b"|")[4] for m in msgs if m] == [b"600303", b"200401"]


def test_file_sink_writes_json_lines(tmp_path: Path) -> None:
    siem = Siem.from_spec(f"file:{tmp_path / 'out' / 'siem.jsonl'},cef+file:{tmp_path / 'siem.cef'}")
    siem.audit(sealed())
    siem.finding(FINDING)
    lines = (tmp_path / "out" / "siem.jsonl").read_text().splitlines()
    for line in lines:
        validate(json.loads(line))
    assert len(lines) == 2 and (tmp_path / "siem.cef").read_text().count("CEF:0|") == 2


def test_drop_events_past_a_workloads_budget_are_summarized(tmp_path: Path) -> None:
    """Each workload has its own budget per window; past it the first overflow is summarized at
    once, later ones when the window ends (at the next report of any workload) or at close, one
    summary per action; the counts of what is sent add up to every drop; 0 is no budget."""
    now = [1764750000.0]
    spec = f"file:{tmp_path / 'siem.jsonl'},cef+file:{tmp_path / 'siem.cef'}"
    siem = Siem(parse(spec), spec, drop_budget=2, drop_window=60, clock=lambda: now[0])

    def sent() -> list[dict[str, Any]]:
        return [json.loads(line) for line in (tmp_path / "siem.jsonl").read_text().splitlines()]

    def summaries() -> list[dict[str, Any]]:
        return [e["unmapped"]["ringfence"] for e in sent() if "suppressed" in e["unmapped"]["ringfence"]]

    siem.drops("i-0abc", [drop(dport=p, count=2) for p in range(5)])  # 2 sent, 3 (6 drops) summarized
    siem.drops("i-0def", [drop(dport=p) for p in range(2)])  # its own budget
    assert [(s["workload_id"], s["suppressed"]["events"], s["suppressed"]["drops"]) for s in summaries()] == [
        ("i-0abc", 3, 6)
    ]
    assert len(sent()) == 5
    now[0] += 30
    siem.drops("i-0abc", [drop(dport=9, count=7), drop("would-drop", dport=9)])  # same window: held
    assert len(sent()) == 5
    now[0] += 31  # i-0abc's window ended: another workload's report says what was held
    siem.drops("i-0def", [drop(dport=1)])
    assert [(s["observed"], s["suppressed"]["events"], s["suppressed"]["drops"]) for s in summaries()[1:]] == [
        ("drop", 1, 7),
        ("would-drop", 1, 1),
    ]
    siem.drops("i-0abc", [drop(dport=p) for p in range(4)])  # a new window: 2 sent, 2 summarized at once
    siem.drops("i-0abc", [drop(dport=7)])  # held until close
    siem.close()
    events = sent()
    for e in events:
        validate(e)
    assert sum(e["count"] for e in events if e["unmapped"]["ringfence"]["workload_id"] == "i-0abc") == 10 + 8 + 5
    assert [s["suppressed"]["events"] for s in summaries() if s["workload_id"] == "i-0abc"] == [3, 1, 1, 2, 1]
    assert siem.suppressed == 8 and siem.failed == 0
    cef = (tmp_path / "siem.cef").read_text().splitlines()
    assert len(cef) == len(events) and sum(1 for line in cef if "cs6Label=workload cs6=i-0abc" in line) == 5
    unbounded = Siem(parse(f"file:{tmp_path / 'all.jsonl'}"), drop_budget=0)
    unbounded.drops("i-0abc", [drop(dport=p) for p in range(300)])
    assert len((tmp_path / "all.jsonl").read_text().splitlines()) == 300


def test_a_bad_spec_is_named() -> None:
    for bad in ("", "syslog://host", "syslog://:514", "http://x", "file:", "cef+nothing:x"):
        with pytest.raises(SiemSpecError, match="SIEM spec"):
            Siem.from_spec(bad)


def test_a_sink_that_fails_costs_a_count_not_the_action() -> None:
    probe = socket.create_server(("127.0.0.1", 0))
    port = probe.getsockname()[1]
    probe.close()  # nothing listens there any more
    siem = Siem.from_spec(f"syslog+tcp://127.0.0.1:{port}")
    siem.audit(sealed())  # does not raise
    assert (siem.sent, siem.failed) == (0, 1)


@pytest.fixture
def aws(moto_url: str) -> Iterator[str]:
    requests.post(f"{moto_url}/moto-api/reset", timeout=10)
    yield moto_url


def test_eventbridge_put_events_reach_a_rule_target(aws: str) -> None:
    events, sqs = boto3.client("events"), boto3.client("sqs")
    events.create_event_bus(Name="rf-siem")
    q = sqs.create_queue(QueueName="siem-target")["QueueUrl"]
    arn = sqs.get_queue_attributes(QueueUrl=q, AttributeNames=["QueueArn"])["Attributes"]["QueueArn"]
    events.put_rule(Name="ocsf", EventBusName="rf-siem", EventPattern=json.dumps({"source": ["ringfence"]}))
    events.put_targets(Rule="ocsf", EventBusName="rf-siem", Targets=[{"Id": "q", "Arn": arn}])
    siem = Siem.from_spec("eventbridge:rf-siem")
    siem.audit(sealed())
    siem.drops("i-0abc", [drop(dport=i) for i in range(11)])  # two PutEvents calls (ten entries each at most)
    got: list[dict[str, Any]] = []
    deadline = time.time() + 20
    while len(got) < 12 and time.time() < deadline:
        msgs = sqs.receive_message(QueueUrl=q, MaxNumberOfMessages=10, WaitTimeSeconds=1).get("Messages", [])
        got += [json.loads(m["Body"]) for m in msgs]
    assert len(got) == 12 and siem.failed == 0
    assert sorted({g["detail-type"] for g in got}) == ["OCSF API Activity", "OCSF Network Activity"]
    for g in got:
        assert g["source"] == "ringfence"
        validate(g["detail"])


def test_cloudwatch_logs_put_log_events(aws: str) -> None:
    logs = boto3.client("logs")
    logs.create_log_group(logGroupName="/ringfence/siem")
    siem = Siem.from_spec("cloudwatch:/ringfence/siem")
    now = time.time()
    siem.drops("i-0abc", [drop(time=now - 3 + i, dport=i) for i in range(3)])  # three events: not folded
    siem.audit(sealed())
    (stream,) = logs.describe_log_streams(logGroupName="/ringfence/siem")["logStreams"]
    got = logs.get_log_events(logGroupName="/ringfence/siem", logStreamName=stream["logStreamName"])["events"]
    assert len(got) == 4 and siem.failed == 0
    for e in got:
        validate(json.loads(e["message"]))
    siem.drops("i-0abc", [drop(time=now - 30 * 86400)])  # CloudWatch refuses it: counted, not lost quietly
    assert siem.failed == 1
    missing = Siem.from_spec("cloudwatch:/no/such/group")
    missing.audit(sealed())
    assert missing.failed == 1


# --- wired: the control plane's audit records and agents' drops ------------------------------------


def test_serve_sends_audit_records_and_drops(tmp_path: Path) -> None:
    from ringfence.agentapi import ReportBatch
    from ringfence.control.agents import AgentApi
    from ringfence.local.wiring import LocalWiring, local_config
    from tests.onprem.conftest import boot, signing_key_file

    out = tmp_path / "siem.jsonl"
    cfg = local_config()
    cfg.siem = f"file:{out}"
    with LocalWiring(tmp_path / "state" / "state.db", signing_key=signing_key_file(tmp_path), cfg=cfg) as w:
        admin = boot(w)
        assert admin.quarantine("carol", "dc1-web-1", True, "IR-9").status == 200
        # a recent drop: the route refuses records older than the flows' retention (backdated)
        recent = time.time() - 60
        batch = ReportBatch(drops=[drop(time=recent, direction="outbound", src="192.168.10.11", dst="192.168.10.31")])
        assert AgentApi(w).reports("dc1-web-1", batch).status == 202
        chain = w.store.audit_log()
    events = [json.loads(line) for line in out.read_text().splitlines()]
    for e in events:
        validate(e)
    api = [e for e in events if e["class_uid"] == 6003]
    assert [e["unmapped"]["audit"]["hash"] for e in api] == [r.hash for r in chain], "every audit record, in order"
    quarantine = api[-1]
    assert quarantine["api"]["operation"] == "workload.quarantine" and quarantine["actor"]["user"]["name"] == "carol"
    assert quarantine["unmapped"]["audit"]["before"] != quarantine["unmapped"]["audit"]["after"]
    (net,) = [e for e in events if e["class_uid"] == 4001]
    assert net["src_endpoint"]["instance_uid"] == "dc1-web-1" and net["dst_endpoint"]["port"] == 5432


def test_serve_refuses_a_bad_siem_spec(tmp_path: Path) -> None:
    from ringfence import serve

    with pytest.raises(serve.ServeError, match="SIEM spec"):
        serve.build_wiring(f"sqlite:{tmp_path / 'state.db'}", siem="syslog://nowhere")


def test_labels_check_sends_label_hygiene_findings(tmp_path: Path) -> None:
    import subprocess
    import sys

    from tests.conftest import EXAMPLE

    out = tmp_path / "findings.jsonl"
    run = subprocess.run(
        [sys.executable, "-m", "ringfence.cli", "labels", "check", "--policy", str(EXAMPLE / "policy"),
         "--inventory", str(EXAMPLE / "inventory.yaml"), "--siem", f"file:{out}"],
        capture_output=True, text=True, timeout=120,
    )  # fmt: skip
    assert run.returncode == 0, run.stderr
    (finding,) = [json.loads(line) for line in out.read_text().splitlines()]
    validate(finding)
    assert finding["finding_info"]["uid"] == "label-hygiene:ord-prod-web-9:unknown:env"
    assert finding["finding_info"]["analytic"]["name"] == "label-hygiene/unknown" and "prdo" in finding["message"]
    assert finding["severity_id"] == ocsf.MEDIUM, "the workload is unlabeled"
