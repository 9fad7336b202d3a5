"""What the agent sends validates against the server-side schema (``ringfence.agentapi``), and
what the server answers reads back in the agent (``ringfence.agentwire``, no pydantic)."""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path
from typing import Any

import pytest

from ringfence import agentapi, agentwire
from ringfence.bundlewire import load_delta, to_json
from ringfence_agent import enroll
from ringfence_agent.backends import DropTuple, Observation
from ringfence_agent.config import AgentConfig
from ringfence_agent.daemon import Daemon
from ringfence_agent.plan import compile_plan
from ringfence_agent.reports import DropCollector, Spool, make_batches, parse_conntrack, summarize_flows
from tests.agent.bundles import GOLDEN, PUBLIC_KEY
from tests.agent.test_agent_unit import LOCAL, PROC, golden

PAIRS = [
    (agentwire.EnrollRequest, agentapi.EnrollRequest),
    (agentwire.TokenRequest, agentapi.TokenRequest),
    (agentwire.Heartbeat, agentapi.Heartbeat),
    (agentwire.FlowRecord, agentapi.FlowRecord),
    (agentwire.DropEvent, agentapi.DropEvent),
    (agentwire.ReportBatch, agentapi.ReportBatch),
]


@pytest.mark.parametrize(("lean", "model"), PAIRS, ids=[p[0].__name__ for p in PAIRS])
def test_same_fields_and_defaults_as_the_server_schema(lean: Any, model: Any) -> None:
    ours = {f.name: f for f in dataclasses.fields(lean)}
    assert sorted(ours) == sorted(model.model_fields)
    for name, info in model.model_fields.items():
        f = ours[name]
        has_default = f.default is not dataclasses.MISSING or f.default_factory is not dataclasses.MISSING
        assert has_default == (not info.is_required()), name
        if has_default:
            mine = f.default_factory() if f.default_factory is not dataclasses.MISSING else f.default
            assert mine == info.get_default(call_default_factory=True), name


def _server_reads(model: Any, body: dict[str, Any]) -> dict[str, Any]:
    """What a control plane does with the body: validate the JSON text, then its JSON form."""
    parsed = model.model_validate_json(json.dumps(body))
    dumped: dict[str, Any] = parsed.model_dump(mode="json")
    return dumped


def test_enroll_requests_validate() -> None:
    req = enroll.pairing("ord-prod-proc-1", "pair-123")("nonce-1")
    assert _server_reads(agentapi.EnrollRequest, req.to_json())["pairing_key"] == "pair-123"
    iid = agentwire.EnrollRequest(method="aws-iid", nonce="n", document="{}", document_signature="MIAG")
    assert _server_reads(agentapi.EnrollRequest, iid.to_json()) == {
        **{name: None for name in agentapi.EnrollRequest.model_fields},
        **iid.to_json(),
    }


def test_token_requests_validate() -> None:
    req = agentwire.TokenRequest(nonce="n", signature="c2ln")
    assert _server_reads(agentapi.TokenRequest, req.to_json()) == {"nonce": "n", "signature": "c2ln", "time": None}
    # the renewal without a nonce (its token as the bearer)
    req = agentwire.TokenRequest(time=1_800_000_000, signature="c2ln")
    read = _server_reads(agentapi.TokenRequest, req.to_json())
    assert read == {"nonce": None, "signature": "c2ln", "time": 1_800_000_000}


def test_heartbeats_validate(tmp_path: Path) -> None:
    src = tmp_path / "src"
    (src / "bundles").mkdir(parents=True)
    (src / "bundles" / "ord-prod-proc-1.json").write_bytes(PROC.read_bytes())
    cfg = AgentConfig(
        workload_id="ord-prod-proc-1",
        public_key=PUBLIC_KEY,
        state_dir=tmp_path / "st",
        backend="dry-run",
        source=str(src),
    )
    daemon = Daemon(cfg)
    sent: list[agentwire.Heartbeat] = []

    class Recorder:
        kind = "api"

        def heartbeat(self, hb: agentwire.Heartbeat) -> int | None:
            sent.append(hb)
            return None

    static = daemon.source
    daemon.source = Recorder()  # type: ignore[assignment]
    daemon.heartbeat()  # nothing applied yet
    daemon.source = static
    daemon.sync(None)
    daemon.last_message = "x" * 5000  # the daemon truncates its message to the server's limit
    daemon.source = Recorder()  # type: ignore[assignment]
    daemon.heartbeat()
    first, second = (_server_reads(agentapi.Heartbeat, hb.to_json()) for hb in sent)
    assert first["applied_version"] is None and first["mode"] is None
    assert second["applied_version"] == 1 and second["mode"] == "enforce" and not second["healthy"]
    # a backend that cannot read its kernel back (dry-run) sends no digest: the field is left out
    assert "kernel_digest" not in sent[1].to_json()
    # run from a checkout: no version known, none sent
    assert sent[1].agent_version is None and "agent_version" not in sent[1].to_json()
    assert second == {"kernel_digest": None, "agent_version": None, **sent[1].to_json()}
    assert second["counters"]["applied"] == 1
    with_digest = dataclasses.replace(sent[1], kernel_digest="ab" * 32)
    assert _server_reads(agentapi.Heartbeat, with_digest.to_json())["kernel_digest"] == "ab" * 32
    versioned = dataclasses.replace(sent[1], agent_version="0.1.0+3f2a9c1b0d4e")
    assert _server_reads(agentapi.Heartbeat, versioned.to_json())["agent_version"] == "0.1.0+3f2a9c1b0d4e"
    # the body for a control plane older than the field: without it
    assert "agent_version" not in versioned.to_json(with_agent_version=False)


def test_report_batches_validate_and_spool_round_trips(tmp_path: Path) -> None:
    plan = compile_plan(golden(PROC), LOCAL)
    obs = Observation(
        {"r_in_0": 3, "d_out": 1},
        [
            DropTuple("r_in_0", "10.2.1.10", "10.1.2.10", "tcp", 8443, 3),
            DropTuple("d_out", "10.1.2.10", "fd00::9", "sctp", None, 1),
        ],
    )
    drops = DropCollector().events(plan, obs, now=5.5)
    lines = [
        "ipv4 2 tcp 6 431999 ESTABLISHED src=10.77.0.1 dst=10.77.0.2 sport=40000 dport=8080 packets=5 bytes=300 "
        "src=10.77.0.2 dst=10.77.0.1 sport=8080 dport=40000 packets=4 bytes=250 [ASSURED] mark=0 use=2",
        "ipv4 2 icmp 1 29 src=10.77.0.2 dst=10.77.0.9 type=8 code=0 id=7 src=10.77.0.9 dst=10.77.0.2 type=0 code=0 id=7",
    ]
    flows = summarize_flows(parse_conntrack(lines, {"10.77.0.2"}, now=7.25))
    (batch,) = make_batches(drops * 3, flows, 4)
    body = batch.to_json()
    assert _server_reads(agentapi.ReportBatch, body) == body  # every field survives the server's reading
    assert {d["proto"] for d in body["drops"]} == {"tcp", "other"} and len(body["flows"]) == 2
    spool = Spool(tmp_path / "spool.jsonl", 1 << 20)
    spool.append(batch)
    assert spool.pop_all() == [batch]


def test_agent_reads_the_server_answers() -> None:
    def answer(model: Any) -> bytes:
        return json.dumps(model.model_dump(mode="json")).encode()

    nonce = agentwire.read_response(answer(agentapi.NonceResponse(nonce="n-1", expires_in=60)), "nonce", nonce=str)
    assert nonce["nonce"] == "n-1"
    for latest in (None, 7):
        body = answer(agentapi.HeartbeatResponse(latest_version=latest))
        assert agentwire.read_response(body, "hb", latest_version=(int, None))["latest_version"] == latest
    delta = json.loads((GOLDEN / "delta-ord-prod-proc-1-scale-out.json").read_text())
    body = answer(agentapi.DeltasResponse(bundle_version=2, deltas=[delta]))
    (got,) = agentwire.read_response(body, "deltas", deltas=list)["deltas"]
    assert to_json(load_delta(json.dumps(got))) == delta
    with pytest.raises(agentwire.ResponseError, match="latest_version should be an integer or null"):
        agentwire.read_response(b'{"latest_version": "7"}', "hb", latest_version=(int, None))
    with pytest.raises(agentwire.ResponseError, match="token is missing"):
        agentwire.read_response(b'{"workload_id": "w"}', "enroll", workload_id=str, token=str)
