"""The agent's kept-alive connections to its API (``ringfence_agent.sources.Connections``),
against a real HTTP/1.1 server on loopback: one connection for many requests, a connection the
server closed while idle retried once on a new one, answers and errors as :func:`_http` gives
them, and the environment's proxy still honoured."""

from __future__ import annotations

import threading
import time
import urllib.request
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any, ClassVar

import pytest

from ringfence_agent.sources import Connections, Unreachable, _http


class _Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    timeout = 0.5  # an idle connection is closed after this, as uvicorn's keep-alive does after 5 s
    connections: ClassVar[list[int]] = []
    reached: ClassVar[list[str | None]] = []  # /target's requests: their Authorization headers

    def setup(self) -> None:
        super().setup()
        self.connections.append(1)

    def do_GET(self) -> None:
        if self.path == "/moved":
            self.send_response(302)
            self.send_header("Location", "/target")
            self.send_header("Content-Length", "0")
            self.end_headers()
            return
        if self.path == "/target":
            self.reached.append(self.headers.get("Authorization"))
        status = {"/gone": 404, "/broken": 503}.get(self.path, 200)
        body = b'{"ok": true}' if status == 200 else b'{"error": "x"}'
        self.send_response(status)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def do_POST(self) -> None:
        n = int(self.headers.get("Content-Length", "0"))
        body = self.rfile.read(n)
        self.send_response(200)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, *args: Any) -> None:
        return None


@pytest.fixture
def server() -> Iterator[str]:
    _Handler.connections = []
    _Handler.reached = []
    srv = ThreadingHTTPServer(("127.0.0.1", 0), _Handler)
    t = threading.Thread(target=srv.serve_forever, daemon=True)
    t.start()
    try:
        yield f"http://127.0.0.1:{srv.server_address[1]}"
    finally:
        srv.shutdown()
        srv.server_close()


def test_requests_share_one_connection_and_answers_are_as_before(server: str, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("http_proxy", raising=False)
    monkeypatch.delenv("HTTP_PROXY", raising=False)
    c = Connections()
    assert c.request(f"{server}/a", 5)[::2] == (200, b'{"ok": true}')
    assert c.request(f"{server}/b", 5, "POST", {"x": 1})[2] == b'{"x": 1}'
    assert c.request(f"{server}/gone", 5)[0] == 404, "a 4xx is an answer, with its body"
    assert c.request(f"{server}/c", 5)[0] == 200
    assert c.opened == 1 and len(_Handler.connections) == 1
    with pytest.raises(Unreachable, match="HTTP 503"):
        c.request(f"{server}/broken", 5)


def test_a_connection_the_server_closed_while_idle_is_retried_on_a_new_one(
    server: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.delenv("http_proxy", raising=False)
    monkeypatch.delenv("HTTP_PROXY", raising=False)
    c = Connections()
    assert c.request(f"{server}/a", 5)[0] == 200
    time.sleep(1.0)  # the server closes the idle connection; the agent still holds it
    assert c.request(f"{server}/b", 5)[0] == 200
    assert c.opened == 2 and len(_Handler.connections) == 2
    c.IDLE_REUSE = 0.0  # idle longer than this: not even tried
    assert c.request(f"{server}/c", 5)[0] == 200 and c.opened == 3


def test_through_the_environments_proxy_requests_go_as_before(server: str, monkeypatch: pytest.MonkeyPatch) -> None:
    # urlopen builds its process-wide opener, with the proxies of that moment, on first use: the
    # one built here (with the dead proxy) must not outlive the test
    monkeypatch.setattr(urllib.request, "_opener", None)
    monkeypatch.setenv("http_proxy", "http://127.0.0.1:9")  # nothing listens there
    monkeypatch.delenv("no_proxy", raising=False)
    monkeypatch.delenv("NO_PROXY", raising=False)
    c = Connections()
    with pytest.raises(Unreachable):
        c.request(f"{server}/a", 2)
    assert c.opened == 0 and _Handler.connections == [], "no direct connection around the proxy"


def test_a_request_with_a_token_does_not_follow_a_redirect(server: str, monkeypatch: pytest.MonkeyPatch) -> None:
    """urllib follows a 3xx with the request's headers, the bearer token included, to wherever
    the Location names (the agent API's requests take that path through the environment's proxy)."""
    monkeypatch.delenv("http_proxy", raising=False)
    monkeypatch.delenv("HTTP_PROXY", raising=False)
    status, _, _ = _http(f"{server}/moved", 5, headers={"Authorization": "Bearer SECRET"})
    assert status == 302 and _Handler.reached == [], "the redirect was not followed: no token sent on"
    assert _http(f"{server}/moved", 5)[0] == 200 and _Handler.reached == [None], "without one it is followed"
