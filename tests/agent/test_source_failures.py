"""What the network can do to the agent, and what the agent does about it: a transient apply
failure is retried, torn or garbage answers back off instead of killing the daemon, and bodies and
delta chains are bounded. A real http.server in a thread serves each case."""

from __future__ import annotations

import hashlib
import http.server
import threading
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from ringfence import bundlewire as wire
from ringfence.staticlayout import Head
from ringfence_agent.backends import ApplyError
from ringfence_agent.config import AgentConfig, Enrollment
from ringfence_agent.daemon import Daemon
from ringfence_agent.plan import Plan
from tests.agent.bundles import PUBLIC_KEY
from tests.agent.test_agent_state import SET, bundle

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
