"""An agent whose clock runs fast, through the real agent (its daemon's report sending and its
API client) against ``ringfence serve`` over LocalWiring: the batch is refused naming the skew,
the agent logs it and discards that batch only, and sends the rest."""

from __future__ import annotations

import time
from pathlib import Path

import pytest

from ringfence import serve
from ringfence.agentwire import FlowRecord, ReportBatch
from ringfence.flows.aggregate import merge
from ringfence.local.wiring import LocalWiring
from tests.agent.bundles import PUBLIC_KEY
from tests.onprem.test_attack_pairing_keys import WID, Plane

ME, PEER = "192.168.30.41", "192.168.10.21"


def _flow(start: float, dport: int) -> FlowRecord:
    return FlowRecord(start=start, end=start, src=ME, dst=PEER, proto="tcp", dport=dport, packets=1, bytes=60,
                      direction="outbound")  # fmt: skip


def test_a_fast_agent_clock_is_refused_naming_the_skew_and_the_agent_sends_the_rest(
    wiring: LocalWiring, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """A flow dated more than 5 min ahead of the control plane's clock was answered 202
    {'accepted': 1} and never stored: an agent whose clock ran fast lost every flow silently.
    Now the report route answers 422 naming the skew; the agent logs it, discards that batch
    (counted, not retried), and its other batches are sent and stored."""
    from ringfence_agent import enroll
    from ringfence_agent.config import AgentConfig
    from ringfence_agent.daemon import Daemon
    from ringfence_agent.sources import ApiSource
    from ringfence_agent.state import StateDir

    plane = Plane(wiring)
    plane.register()
    assert wiring.settle(60)
    key = plane.mint(uses=1)
    tokens = tmp_path / "admin-tokens"
    tokens.write_text(serve.new_admin_token("a", ["reader"])[1] + "\n")
    with serve.serving(serve.ServeApp.over(wiring, serve.AdminTokens.load(tokens))) as running:
        cfg = AgentConfig(workload_id=WID, public_key=PUBLIC_KEY, state_dir=tmp_path / "st",
                          backend="dry-run", source=str(tmp_path))  # fmt: skip
        daemon = Daemon(cfg)
        src = ApiSource(running.url, WID, enroll.pairing(WID, key), StateDir(tmp_path / "api"), 10, 10)
        daemon.source = src  # type: ignore[assignment]
        now = time.time()
        daemon.spool.append(ReportBatch(flows=[_flow(now + 600, 8441)]))  # seen while the clock ran 10 min fast
        daemon.spool.append(ReportBatch(flows=[_flow(now, 8442)]))
        capsys.readouterr()
        daemon.send_reports()
        err = capsys.readouterr().err
        assert "HTTP 422" in err and "600 s ahead of the control plane" in err, err
        assert daemon.flows.discarded == 1  # counted, not spooled again
        assert not (tmp_path / "st" / "spool.jsonl").exists()
        ports = {r.port for r in merge(wiring.store.flow_rows())}
        assert 8442 in ports and 8441 not in ports, ports
        daemon.send_reports()  # nothing retried: the next batch carries the count only
    assert "422" not in capsys.readouterr().err
