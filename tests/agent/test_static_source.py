"""The static source without a control plane: ``ringfence compile`` into one directory, again and
again, and the agent following it from that directory or over plain HTTP — set deltas when they
bridge, the whole bundle when they cannot. Real compiles, a real http.server, the dry-run backend
(the netns lab covers the kernel side)."""

from __future__ import annotations

import dataclasses
import hashlib
import http.server
import shutil
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from ringfence.bundle import dumps, load_bundle, load_delta
from ringfence.cli import main as ringfence
from ringfence.local.lab import wait_until
from ringfence.staticlayout import Head, HeadError, delta_path, head_path, load_head
from ringfence_agent.config import AgentConfig
from ringfence_agent.core import same_firewall
from ringfence_agent.daemon import Daemon
from ringfence_agent.state import StateDir
from tests.agent.bundles import GOLDEN, PUBLIC_KEY
from tests.conftest import EXAMPLE

POLICY = EXAMPLE / "policy"
INVENTORY = EXAMPLE / "inventory.yaml"
PROC = "ord-prod-proc-1"
WEB_3 = "  - {id: ord-prod-web-3, ips: [10.1.1.12], cloud: aws, region: ca-central-1, tags: {ringfence:role: web, ringfence:app: ordering, ringfence:env: prod}}\n"
WEB_4 = "  - {id: ord-prod-web-4, ips: [10.1.1.13], cloud: aws, region: ca-central-1, tags: {ringfence:role: web, ringfence:app: ordering, ringfence:env: prod}}\n"
# a second monitoring server: the processing tier admits monitoring (core services)
MON_2 = "  - {id: core-mon-2, ips: [10.0.0.16], cloud: aws, region: ca-central-1, tags: {ringfence:role: monitoring, ringfence:app: core, ringfence:env: shared}}\n"
DEV_WEB_2 = "  - {id: ord-dev-web-2, ips: [10.2.1.11], cloud: aws, region: ca-central-1, tags: {ringfence:role: web, ringfence:app: ordering, ringfence:env: dev}}\n"


def compile_into(out: Path, inventory: Path, revision: int, policy: Path = POLICY) -> None:
    args = ["--policy", str(policy), "--inventory", str(inventory), "--out", str(out)]
    key = ["--key", str(GOLDEN / "test-key.pem"), "--revision", str(revision)]
    assert ringfence(["compile", *args, *key]) == 0


def inventory(tmp_path: Path, *extra: str) -> Path:
    path = tmp_path / f"inventory-{len(extra)}-{time.monotonic_ns()}.yaml"
    path.write_text(INVENTORY.read_text() + "".join(extra))
    return path


def head(out: Path, wid: str = PROC) -> Head:
    return load_head((out / head_path(wid)).read_bytes())


def config(tmp_path: Path, source: str) -> AgentConfig:
    return AgentConfig(
        workload_id=PROC,
        public_key=PUBLIC_KEY,
        state_dir=tmp_path / "state",
        backend="dry-run",
        source=source,
        poll_interval=1,
        observe_interval=5,
    )


def run_once(cfg: AgentConfig) -> Daemon:
    daemon = Daemon(cfg)
    assert daemon.run(once=True) == 0
    return daemon


# --- the publisher ---------------------------------------------------------------------------------


def test_compiling_again_into_the_same_directory_writes_heads_and_set_deltas(tmp_path: Path) -> None:
    out = tmp_path / "out"
    compile_into(out, INVENTORY, revision=1000)
    first = {p.name: p.read_bytes() for p in (out / "bundles").iterdir()}
    h1 = head(out)
    assert h1.version == h1.rules_version == 1001 and set(h1.sets.values()) == {1001}
    # nothing changed: every bundle keeps its version and its bytes, and no delta is written
    compile_into(out, INVENTORY, revision=2000)
    assert {p.name: p.read_bytes() for p in (out / "bundles").iterdir()} == first
    assert not (out / "deltas").exists() and head(out) == h1
    # a web server joins: the sets holding it move on by a delta, the rest keep their versions
    compile_into(out, inventory(tmp_path, WEB_3), revision=3000)
    h3 = head(out)
    moved = [name for name, v in h3.sets.items() if v != h1.sets[name]]
    assert len(moved) == 1 and h3.sets[moved[0]] == 3001
    assert (h3.version, h3.rules_version) == (3001, 1001)  # its own rules did not change
    delta = load_delta((out / delta_path(moved[0], 1001)).read_bytes())
    assert (delta.from_version, delta.to_version, delta.add, delta.remove) == (1001, 3001, ["10.1.1.12/32"], [])
    doc = load_bundle((out / "bundles" / f"{PROC}.json").read_bytes())
    assert doc.version == 3001 and doc.sets[moved[0]].version == 3001 and doc.signature is not None
    # bundles holding no set with web servers in it keep version and bytes
    kept = [name for name, raw in first.items() if load_bundle(raw).version == 1001 == _version(out, name)]
    assert kept and all((out / "bundles" / name).read_bytes() == first[name] for name in kept)
    # a revision below what is there is refused: agents would never take it
    args = ["--policy", str(POLICY), "--inventory", str(INVENTORY), "--out", str(out), "--revision", "5"]
    assert ringfence(["compile", *args]) == 1


def _version(out: Path, name: str) -> int:
    return load_bundle((out / "bundles" / name).read_bytes()).version


def test_heads_are_checked() -> None:
    good = Head("w", 5, 3, {"rf_a": 4})
    assert load_head(good.dumps()) == good
    for bad in ("[]", '{"format": "x"}', good.dumps().replace('"rf_a": 4', '"rf_a": 9'), "{"):
        with pytest.raises(HeadError):
            load_head(bad)


# --- the agent, from a directory ---------------------------------------------------------------------


def test_directory_source_applies_set_deltas_and_falls_back_to_the_whole_bundle(tmp_path: Path) -> None:
    src = tmp_path / "src"
    cfg = config(tmp_path, str(src))
    state = StateDir(cfg.state_dir)
    compile_into(src, INVENTORY, revision=1000)
    run_once(cfg)
    assert state.load_bundle().version == 1001 and state.load_deltas() == []  # type: ignore[union-attr]

    # deltas bridge: the bundle file stays untouched by the agent, the set moves by a delta
    compile_into(src, inventory(tmp_path, WEB_3), revision=2000)
    daemon = run_once(cfg)
    assert state.load_bundle().version == 1001  # type: ignore[union-attr]
    assert [d.to_version for d in state.load_deltas()] == [2001] and daemon.agent.revision == 2001
    current = load_bundle((src / "bundles" / f"{PROC}.json").read_bytes())
    assert same_firewall(daemon.agent.effective(), current)  # type: ignore[arg-type]

    # a missing link: the whole bundle
    compile_into(src, inventory(tmp_path, WEB_3, WEB_4), revision=3000)
    h = head(src)
    for name, v in h.sets.items():
        (src / delta_path(name, 2001)).unlink(missing_ok=True)
        assert v != 2001
    run_once(cfg)
    assert state.load_bundle().version == 3001 and state.load_deltas() == []  # type: ignore[union-attr]

    # its own rules change (the database port): the whole bundle, whatever deltas exist
    policy = tmp_path / "policy"
    shutil.copytree(POLICY, policy)
    text = (policy / "ordering.yaml").read_text()
    (policy / "ordering.yaml").write_text(text.replace("services: [postgres]", "services: [ssh]"))
    compile_into(src, inventory(tmp_path, WEB_3, WEB_4, DEV_WEB_2), revision=4000, policy=policy)
    assert head(src).rules_version == 4001
    run_once(cfg)
    assert state.load_bundle().version == 4001 and state.load_deltas() == []  # type: ignore[union-attr]
    assert state.read_json("status.json")["counters"].get("rejected", 0) == 0


def test_a_refused_delta_undoes_its_batch_and_the_whole_bundle_bridges(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    src = tmp_path / "src"
    cfg = config(tmp_path, str(src))
    compile_into(src, INVENTORY, revision=1000)
    run_once(cfg)
    compile_into(src, inventory(tmp_path, WEB_3, MON_2), revision=2000)
    h = head(src)
    moved = sorted(name for name, v in h.sets.items() if v == 2001)
    assert len(moved) == 2  # the web set and the monitoring set, both at revision 2001
    # the second of the batch is tampered with: the first is applied before it is refused
    path = src / delta_path(moved[1], 1001)
    tampered = load_delta(path.read_bytes())
    path.write_text(dumps(tampered.model_copy(update={"add": ["10.9.9.9/32"]})))
    daemon = run_once(cfg)
    err = capsys.readouterr().err
    assert f"rejected delta for set {moved[1]} 1001→2001" in err and "signature does not verify" in err
    assert "undid 1 delta(s) of a batch that failed half-way: back to revision 1001" in err
    # without the undo, the bundle at 2001 would meet an applied revision 2001 with other content
    assert "replay refused" not in err
    state = StateDir(cfg.state_dir)
    assert state.load_bundle().version == 2001 and state.load_deltas() == []  # type: ignore[union-attr]
    assert daemon.agent.revision == 2001 and state.read_json("status.json")["counters"]["rejected"] == 1


# --- the agent, over plain HTTP ----------------------------------------------------------------------


class StaticFiles(http.server.SimpleHTTPRequestHandler):
    """Files with a strong ETag, as web servers and object stores serve them; logs every request."""

    log: list[tuple[str, int]]

    def do_GET(self) -> None:
        path = Path(self.translate_path(self.path))
        if not path.is_file():
            return self._send(404, b"")
        body = path.read_bytes()
        etag = f'"{hashlib.sha256(body).hexdigest()[:16]}"'
        if self.headers.get("If-None-Match") == etag:
            return self._send(304, b"", etag)
        return self._send(200, body, etag)

    def _send(self, status: int, body: bytes, etag: str = "") -> None:
        self.log.append((self.path, status))
        self.send_response(status)
        if etag:
            self.send_header("ETag", etag)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        if status == 200:
            self.wfile.write(body)

    def log_message(self, format: str, *args: object) -> None:
        pass


@pytest.fixture
def www(tmp_path: Path) -> Iterator[tuple[Path, str, list[tuple[str, int]]]]:
    root = tmp_path / "www"
    root.mkdir()
    log: list[tuple[str, int]] = []
    handler = type("Handler", (StaticFiles,), {"log": log})
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), lambda *a: handler(*a, directory=str(root)))
    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        yield root, f"http://127.0.0.1:{server.server_address[1]}", log
    finally:
        server.shutdown()
        server.server_close()


def test_daemon_follows_compiles_over_plain_http_by_set_deltas(
    tmp_path: Path, www: tuple[Path, str, list[tuple[str, int]]]
) -> None:
    root, base, log = www
    compile_into(root, INVENTORY, revision=1000)
    daemon = Daemon(config(tmp_path, base))
    thread = threading.Thread(target=daemon.run)
    thread.start()
    try:
        assert wait_until(lambda: daemon.agent.revision == 1001, 10)
        bundle_gets = [s for p, s in log if p == f"/bundles/{PROC}.json"]
        assert bundle_gets == [200]

        compile_into(root, inventory(tmp_path, WEB_3), revision=2000)
        moved = next(name for name, v in head(root).sets.items() if v == 2001)
        assert wait_until(lambda: daemon.agent.revision == 2001, 10), log
        assert (f"/{delta_path(moved, 1001)}", 200) in log
        assert [s for p, s in log if p == f"/bundles/{PROC}.json"] == [200], log  # no second whole bundle
        current = load_bundle((root / "bundles" / f"{PROC}.json").read_bytes())
        assert same_firewall(daemon.agent.effective(), current)  # type: ignore[arg-type]

        # nothing new: each poll is one conditional GET of the head, answered 304
        seen = len(log)
        time.sleep(2.5)
        later = log[seen:]
        assert later and all(entry == (f"/heads/{PROC}.json", 304) for entry in later), later
    finally:
        daemon.stop.set()
        thread.join(timeout=10)
    assert not thread.is_alive()


@pytest.mark.slow
def test_daemon_takes_a_refreshed_bundle_before_expiry_and_reports_stale_after(tmp_path: Path) -> None:
    """Expiry end to end with the static source: a compile again re-signs a bundle past half its
    lifetime (same version, later expiry) and the agent, its bundle near expiry, fetches and keeps
    it; a bundle that expires without a refresh stays enforced and the agent reports stale."""
    out, inv = tmp_path / "out", inventory(tmp_path)
    args = ["--policy", str(POLICY), "--inventory", str(inv), "--out", str(out), "--key", str(GOLDEN / "test-key.pem")]
    assert ringfence(["compile", *args, "--revision", "5", "--expires-in", "3600"]) == 0
    cfg = config(tmp_path, str(out))
    first = run_once(cfg).agent.bundle
    assert first is not None and first.expires_at is not None
    assert ringfence(["compile", *args, "--revision", "10", "--expires-in", "86400"]) == 0  # re-signed: past half
    daemon = run_once(cfg)  # its bundle expires within REFRESH_BEFORE: fetched although no new version
    refreshed = daemon.agent.bundle
    assert refreshed is not None and refreshed.version == first.version
    assert (refreshed.expires_at or 0) > first.expires_at and StateDir(cfg.state_dir).load_bundle() == refreshed
    assert not daemon.agent.stale()
    # a bundle that expires while enforced, and no compile after it
    out2 = tmp_path / "out2"
    args2 = [*args[:5], str(out2), *args[6:]]
    # long enough to apply on a loaded machine (a 2 s bundle expired before its first apply in CI)
    assert ringfence(["compile", *args2, "--revision", "30", "--expires-in", "8"]) == 0
    cfg2 = dataclasses.replace(cfg, source=str(out2), state_dir=tmp_path / "state2")
    applied = run_once(cfg2).agent.bundle
    assert applied is not None and applied.expires_at is not None
    time.sleep(max(0.0, applied.expires_at - time.time()) + 0.5)
    daemon = run_once(cfg2)  # fetches it again (expiry near): refused as expired, still enforced
    assert daemon.agent.bundle == applied and daemon.agent.stale()
    status = StateDir(cfg2.state_dir).read_json("status.json")
    assert "expired" in status["last_rejected"]["reason"] and status["stale"] is True
