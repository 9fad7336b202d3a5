"""What the network can do to the agent, and what the agent does about it: a transient apply
failure is retried, torn or garbage answers back off instead of killing the daemon, and bodies and
delta chains are bounded. A real http.server in a thread serves each case."""

from __future__ import annotations

import hashlib
import http.server
import json
import re
import threading
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import TypeVar

import pytest

from ringfence import bundlewire as wire
from ringfence.local.lab import wait_until
from ringfence.staticlayout import Head
from ringfence_agent.backends import ApplyError
from ringfence_agent.config import AgentConfig, ConfigError, Enrollment, load_config
from ringfence_agent.daemon import Daemon
from ringfence_agent.plan import Plan
from ringfence_agent.sources import MAX_BUNDLE_BYTES, MAX_CHAIN_LINKS, SourceError, StaticSource
from tests.agent.bundles import PUBLIC_KEY
from tests.agent.test_agent_state import SET, bundle, delta

T = TypeVar("T")
Handler = Callable[[http.server.BaseHTTPRequestHandler], None]


class _Routes(http.server.BaseHTTPRequestHandler):
    """GET handled by ``route(handler)``; every request path is logged."""

    protocol_version = "HTTP/1.1"
    route: Handler
    log: list[str]

    def do_GET(self) -> None:
        self.log.append(self.path)
        type(self).route(self)

    def do_POST(self) -> None:
        self.do_GET()

    def log_message(self, format: str, *args: object) -> None:
        pass


def send(
    h: http.server.BaseHTTPRequestHandler, status: int, body: bytes = b"", length: int | None = None, **headers: str
) -> None:
    """An answer; ``length`` announces another Content-Length than the body has (a torn answer)."""
    h.send_response(status)
    for k, v in headers.items():
        h.send_header(k.replace("_", "-"), v)
    h.send_header("Content-Length", str(len(body) if length is None else length))
    h.end_headers()
    h.wfile.write(body)
    if length is not None:
        h.close_connection = True


@pytest.fixture
def serve() -> Iterator[Callable[[Handler], tuple[str, list[str]]]]:
    servers: list[http.server.ThreadingHTTPServer] = []

    def start(route: Handler) -> tuple[str, list[str]]:
        log: list[str] = []
        handler = type("H", (_Routes,), {"route": staticmethod(route), "log": log})
        server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
        servers.append(server)
        threading.Thread(target=server.serve_forever, daemon=True).start()
        return f"http://127.0.0.1:{server.server_address[1]}", log

    yield start
    for s in servers:
        s.shutdown()
        s.server_close()


def static_config(tmp_path: Path, base: str, **kw: object) -> AgentConfig:
    return AgentConfig(
        workload_id="w",
        public_key=PUBLIC_KEY,
        state_dir=tmp_path / "state",
        backend="dry-run",
        source=base,
        poll_interval=1,
        **kw,  # type: ignore[arg-type]
    )


class FailOnce:
    """Wraps a backend: its next whole-bundle apply fails like a transient kernel error."""

    def __init__(self, inner: object) -> None:
        self.inner = inner
        self.fail = 1

    def apply(self, plan: Plan) -> None:
        if self.fail:
            self.fail -= 1
            raise ApplyError("transient: xtables lock held")
        self.inner.apply(plan)  # type: ignore[attr-defined]

    def __getattr__(self, name: str) -> object:
        return getattr(self.inner, name)


# --- M1: a bundle whose apply failed is fetched again, not answered 304 -----------------------------


def test_a_transient_apply_failure_is_retried_with_an_http_static_source(
    tmp_path: Path, serve: Callable[[Handler], tuple[str, list[str]]]
) -> None:
    files = {
        "/bundles/w.json": wire.dumps(bundle(2, ["10.0.0.1/32"])).encode(),
        "/heads/w.json": Head("w", 2, 2, {SET: 2}).dumps().encode(),  # rules moved: the whole bundle
    }

    def route(h: http.server.BaseHTTPRequestHandler) -> None:
        if h.path not in files:
            return send(h, 404)
        etag = f'"{hashlib.sha256(files[h.path]).hexdigest()[:16]}"'
        if h.headers.get("If-None-Match") == etag:
            return send(h, 304)
        return send(h, 200, files[h.path], ETag=etag)

    base, log = serve(route)
    daemon = Daemon(static_config(tmp_path, base))
    daemon.agent.apply_bundle(bundle(1, ["10.0.0.1/32"]))
    daemon.agent.backend = FailOnce(daemon.agent.backend)  # type: ignore[assignment]
    daemon.sync(None)
    assert daemon.agent.revision == 1 and "transient" in daemon.last_message
    daemon.sync(None)  # the next poll: the bundle again (no If-None-Match), applied this time
    assert daemon.agent.revision == 2 and daemon.last_message == ""
    daemon.sync(None)  # the head's 304: up to date, the bundle is not fetched
    assert daemon.agent.revision == 2
    assert log.count("/heads/w.json") == 3  # the head's 304 still announced 2 while 1 was applied
    assert log.count("/bundles/w.json") == 2
    daemon.agent.backend = FailOnce(daemon.agent.backend)  # type: ignore[assignment]
    files["/heads/w.json"] = Head("w", 3, 3, {SET: 3}).dumps().encode()  # announces 3, bundle still 2
    daemon.sync(None)  # the settled bundle's ETag: 304, nothing applied, nothing failed
    assert daemon.agent.revision == 2 and daemon.last_message == ""
    assert log.count("/bundles/w.json") == 3


def api_route(
    bundle_body: Callable[[], bytes],
    etag: str = '"v2"',
    **answers: Callable[[http.server.BaseHTTPRequestHandler], None],
) -> Handler:
    """A minimal agent API: enrollment always succeeds; ``answers`` override endpoints by name."""

    def route(h: http.server.BaseHTTPRequestHandler) -> None:
        length = int(h.headers.get("Content-Length") or 0)
        if length:
            h.rfile.read(length)
        name = h.path.split("?")[0].rsplit("/", 1)[-1]
        if name in answers:
            return answers[name](h)
        if name == "nonce":
            return send(h, 200, b'{"nonce": "n"}')
        if name == "enroll":
            return send(h, 200, b'{"workload_id": "w", "token": "t"}')
        if name == "bundle":
            if h.headers.get("If-None-Match") == etag:
                return send(h, 304)
            return send(h, 200, bundle_body(), ETag=etag)
        if name == "deltas":
            return send(h, 409, b"{}")
        if name == "wait":
            return send(h, 200, b'{"latest_version": null}')
        if name == "heartbeat":
            return send(h, 200, b'{"latest_version": null}')
        if name == "reports":
            return send(h, 202, b"{}")
        return send(h, 404)

    return route


def api_daemon(tmp_path: Path, base: str) -> Daemon:
    cfg = AgentConfig(
        workload_id="w",
        public_key=PUBLIC_KEY,
        state_dir=tmp_path / "state",
        backend="dry-run",
        api_url=base,
        enroll=Enrollment(method="pairing", pairing_key="k"),
        poll_interval=1,
        wait_timeout=1,
    )
    return Daemon(cfg)


def test_a_transient_apply_failure_is_retried_with_the_agent_api(
    tmp_path: Path, serve: Callable[[Handler], tuple[str, list[str]]]
) -> None:
    body = wire.dumps(bundle(2, ["10.0.0.1/32"])).encode()
    base, log = serve(api_route(lambda: body))
    daemon = api_daemon(tmp_path, base)
    daemon.agent.apply_bundle(bundle(1, ["10.0.0.1/32"]))
    daemon.agent.backend = FailOnce(daemon.agent.backend)  # type: ignore[assignment]
    daemon.sync(2)
    assert daemon.agent.revision == 1 and "transient" in daemon.last_message
    daemon.sync(2)
    assert daemon.agent.revision == 2 and daemon.last_message == ""
    daemon.sync(3)  # announced but unchanged: a 304
    assert daemon.agent.revision == 2
    assert sum(p.endswith("/bundle") for p in log) == 3


# --- M2: bad answers are failed contacts or refused documents, never the end of the daemon ----------


def torn(h: http.server.BaseHTTPRequestHandler) -> None:
    send(h, 200, b'{"workload_id":', length=1000)  # then the connection closes: 15 of 1000 bytes


def not_http(h: http.server.BaseHTTPRequestHandler) -> None:
    h.wfile.write(b"NOT-HTTP garbage\r\n\r\n")
    h.close_connection = True


def hang_up(h: http.server.BaseHTTPRequestHandler) -> None:
    h.close_connection = True


def html(h: http.server.BaseHTTPRequestHandler) -> None:
    send(h, 200, b"<html><body>Please log in to the hotel wifi</body></html>", Content_Type="text/html")


@pytest.mark.parametrize(
    ("bad", "message"),
    [
        (torn, "answer cut short after 15 of 1000 bytes"),
        (not_http, "not an HTTP answer: " + repr("NOT-HTTP garbage\r\n") + " (BadStatusLine)"),
        (hang_up, "connection closed without an answer (RemoteDisconnected)"),
    ],
)
def test_a_static_source_with_broken_answers_is_retried_until_it_recovers(
    tmp_path: Path,
    serve: Callable[[Handler], tuple[str, list[str]]],
    capsys: pytest.CaptureFixture[str],
    bad: Handler,
    message: str,
) -> None:
    body = wire.dumps(bundle(1, ["10.0.0.1/32"])).encode()
    broken = [True]

    def route(h: http.server.BaseHTTPRequestHandler) -> None:
        if h.path != "/bundles/w.json":
            return send(h, 404)
        return bad(h) if broken[0] else send(h, 200, body)

    base, log = serve(route)
    daemon = Daemon(static_config(tmp_path, base, backoff_max=1))
    thread = threading.Thread(target=daemon.run)
    thread.start()
    try:
        assert wait_until(lambda: log.count("/bundles/w.json") >= 3, 10), log  # backs off, retries
        assert thread.is_alive() and daemon.agent.revision is None
        assert daemon.state.read_json("status.json")["counters"]["contact_failures"] >= 2
        broken[0] = False
        assert wait_until(lambda: daemon.agent.revision == 1, 10)
    finally:
        daemon.stop.set()
        thread.join(timeout=10)
    err = capsys.readouterr().err
    assert f"GET {base}/bundles/w.json: {message}; still enforcing revision None" in err, err
    assert "Traceback" not in err


def test_an_agent_api_answering_html_is_a_failed_contact(
    tmp_path: Path, serve: Callable[[Handler], tuple[str, list[str]]], capsys: pytest.CaptureFixture[str]
) -> None:
    base, _ = serve(lambda h: html(h))
    daemon = api_daemon(tmp_path, base)
    daemon.agent.apply_bundle(bundle(1, ["10.0.0.1/32"]))
    assert daemon.run(once=True) == 0
    err = capsys.readouterr().err
    assert "nonce: not JSON" in err and "<html><body>Please log in" in err and "still enforcing revision 1" in err
    # enrolled, then every answer is a portal page: each endpoint fails the same way
    body = wire.dumps(bundle(1, ["10.0.0.1/32"])).encode()
    for name in ("wait", "heartbeat", "deltas"):
        base, _ = serve(api_route(lambda: body, **{name: html}))
        daemon.source = api_daemon(tmp_path / name, base).source
        daemon.source.announced()
        if name == "wait":
            with pytest.raises(SourceError, match="wait: not JSON"):
                daemon.source.wait(1, 1, daemon.stop)
        elif name == "heartbeat":
            with pytest.raises(SourceError, match="heartbeat: not JSON"):
                daemon.heartbeat()
        else:
            with pytest.raises(SourceError, match="deltas: not JSON"):
                daemon.sync(2)


def test_a_malformed_delta_from_the_agent_api_is_refused_and_the_bundle_decides(
    tmp_path: Path, serve: Callable[[Handler], tuple[str, list[str]]], capsys: pytest.CaptureFixture[str]
) -> None:
    body = wire.dumps(bundle(2, ["10.0.0.2/32"])).encode()
    bogus = b'{"deltas": [{"format": "ringfence.delta/v2", "set": 5}]}'
    base, _ = serve(api_route(lambda: body, deltas=lambda h: send(h, 200, bogus)))
    daemon = api_daemon(tmp_path, base)
    daemon.agent.apply_bundle(bundle(1, ["10.0.0.1/32"]))
    daemon.sync(2)
    assert daemon.agent.revision == 2
    assert "malformed delta from source" in capsys.readouterr().err


def test_a_signed_document_that_raises_unexpectedly_is_refused_and_the_daemon_goes_on(
    tmp_path: Path,
    serve: Callable[[Handler], tuple[str, list[str]]],
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
) -> None:
    import ringfence_agent.core

    body = wire.dumps(bundle(2, ["10.0.0.2/32"])).encode()
    base, _ = serve(api_route(lambda: body))
    daemon = api_daemon(tmp_path, base)
    daemon.agent.apply_bundle(bundle(1, ["10.0.0.1/32"]))

    def odd(*args: object) -> None:
        raise ValueError("an odd document")

    monkeypatch.setattr(ringfence_agent.core, "compile_plan", odd)
    daemon.sync(2)
    err = capsys.readouterr().err
    assert "rejected bundle for 'w' version 2: unexpected ValueError: an odd document (raised in" in err, err
    status = daemon.state.read_json("status.json")
    assert status["counters"]["rejected"] == 1 and "ValueError" in status["last_rejected"]["reason"]
    assert daemon.agent.revision == 1 and "ValueError" in daemon.last_message
    daemon.sync(2)  # the same document again: refused once, not on every poll
    assert daemon.state.read_json("status.json")["counters"]["rejected"] == 1

    # a delta: refused, its batch undone
    monkeypatch.setattr(ringfence_agent.core, "split_cidrs", odd)
    assert daemon._apply_deltas([delta(1, add=["10.0.0.9/32"])]) is False
    assert "rejected delta for set" in capsys.readouterr().err and daemon.agent.revision == 1

    # on start (a last known good that no longer compiles), and in the loop itself: logged with
    # its type, retried, the daemon stays up
    def broken(latest: int | None) -> None:
        raise KeyError("bug")

    monkeypatch.setattr(daemon, "sync", broken)
    assert daemon.run(once=True) == 0
    err = capsys.readouterr().err
    assert "last known good not re-applied: unexpected ValueError: an odd document (raised in" in err
    assert "unexpected KeyError: 'bug' (raised in test_source_failures.py" in err
    assert daemon.state.read_json("status.json")["counters"]["unexpected_errors"] == 1


# --- M3: the unsigned head bounds nothing; bodies are read within a limit ---------------------------


def evil_chain(signed: bool) -> Handler:
    """A head far ahead of the bundle, and a link for every version it asks for."""

    def route(h: http.server.BaseHTTPRequestHandler) -> None:
        if h.path == "/heads/w.json":
            return send(h, 200, Head("w", 10**15, 1, {SET: 10**15}).dumps().encode())
        if h.path.startswith(f"/deltas/{SET}/"):
            v = int(h.path.rsplit("/", 1)[1].removesuffix(".json"))
            if signed:
                return send(h, 200, wire.dumps(delta(v, add=[f"10.1.{v >> 8 & 255}.{v & 255}/32"])).encode())
            unsigned = {"format": "ringfence.delta/v2", "set": SET, "from_version": v, "to_version": v + 1}
            return send(h, 200, json.dumps(unsigned).encode())
        return send(h, 404)

    return route


def within(seconds: float, fn: Callable[[], T]) -> T:
    """``fn()``, failing the test (not hanging it) when it takes longer than ``seconds``."""
    out: list[T] = []
    thread = threading.Thread(target=lambda: out.append(fn()), daemon=True)
    thread.start()
    thread.join(seconds)
    assert out, f"still running after {seconds}s"
    return out[0]


def test_a_head_far_ahead_walks_at_most_one_unsigned_link(
    tmp_path: Path, serve: Callable[[Handler], tuple[str, list[str]]]
) -> None:
    base, log = serve(evil_chain(signed=False))
    daemon = Daemon(static_config(tmp_path, base))
    daemon.agent.apply_bundle(bundle(1, ["10.0.0.1/32"]))
    assert daemon.source.announced() == 10**15
    got = within(10, lambda: daemon.source.deltas(1, daemon.agent.set_versions(), 1))
    assert got is not None and [d.to_version for d in got] == [2]  # handed on to be refused
    assert sum(p.startswith("/deltas/") for p in log) == 1
    # without a verifier (a source used on its own): the chain is cut at MAX_CHAIN_LINKS
    plain = StaticSource(base, "w", 1, 5)
    plain.announced()
    assert within(10, lambda: plain.deltas(1, daemon.agent.set_versions(), 1)) is None
    assert sum(p.startswith("/deltas/") for p in log) == 1 + MAX_CHAIN_LINKS


def test_a_long_signed_chain_stops_at_the_link_cap_and_the_bundle_decides(
    tmp_path: Path, serve: Callable[[Handler], tuple[str, list[str]]], capsys: pytest.CaptureFixture[str]
) -> None:
    base, log = serve(evil_chain(signed=True))
    daemon = Daemon(static_config(tmp_path, base))
    daemon.agent.apply_bundle(bundle(1, ["10.0.0.1/32"]))
    within(10, lambda: daemon.sync(None))  # the deltas do not bridge; no bundle published: nothing applied
    assert sum(p.startswith("/deltas/") for p in log) == MAX_CHAIN_LINKS
    assert "/bundles/w.json" in log and daemon.agent.revision == 1
    assert "rejected" not in capsys.readouterr().err


def big(length: int | None, size: int) -> Handler:
    def route(h: http.server.BaseHTTPRequestHandler) -> None:
        if h.path != "/bundles/w.json":
            return send(h, 404)
        h.send_response(200)
        if length is not None:
            h.send_header("Content-Length", str(length))
        h.end_headers()
        chunk = b" " * 65536
        try:
            for _ in range(size // len(chunk)):
                h.wfile.write(chunk)
        except OSError:
            pass  # the agent hung up: it read what the limit allows and no more
        h.close_connection = True

    return route


@pytest.mark.parametrize(
    ("length", "message"),
    [
        (300 * 2**20, "answer of 314572800 bytes is over the limit of 1048576 bytes"),
        (None, "answer over the limit of 1048576 bytes"),  # no Content-Length: counted while read
    ],
)
def test_a_bundle_over_the_size_limit_is_a_source_error(
    tmp_path: Path,
    serve: Callable[[Handler], tuple[str, list[str]]],
    capsys: pytest.CaptureFixture[str],
    length: int | None,
    message: str,
) -> None:
    base, _ = serve(big(length, 8 * 2**20))
    daemon = Daemon(static_config(tmp_path, base, max_bundle_bytes=2**20))
    with pytest.raises(SourceError, match=re.escape(f"GET {base}/bundles/w.json: {message}")):
        daemon.source.bundle()
    assert daemon.run(once=True) == 0
    assert f"{message}; still enforcing revision None" in capsys.readouterr().err


def test_the_default_limit_holds_a_large_bundle_and_a_directory_source_is_capped_too(tmp_path: Path) -> None:
    large = wire.dumps(bundle(1, [f"10.{i >> 16}.{i >> 8 & 255}.{i & 255}/32" for i in range(100_000)])).encode()
    assert 2 * 2**20 < len(large) < MAX_BUNDLE_BYTES // 4  # 100,000 addresses: ~2 MB
    src = tmp_path / "src"
    (src / "bundles").mkdir(parents=True)
    (src / "bundles" / "w.json").write_bytes(large)
    assert StaticSource(str(src), "w", 1, 5).bundle() is not None
    with pytest.raises(SourceError, match=re.escape("bundles/w.json: over the limit of 1048576 bytes")):
        StaticSource(str(src), "w", 1, 5, max_bundle_bytes=2**20).bundle()
    with pytest.raises(ConfigError, match="max_bundle_bytes"):
        load_config_text(tmp_path, '{"max_bundle_bytes": 100}')


def load_config_text(tmp_path: Path, extra: str) -> AgentConfig:
    base = {"workload_id": "w", "public_key": str(PUBLIC_KEY), "state_dir": str(tmp_path / "s"), "source": "x"}
    path = tmp_path / "agent.json"
    path.write_text(json.dumps({**base, **json.loads(extra)}))
    return load_config(path)
