"""An instance metadata service (IMDSv2) stand-in: the identity document of the instance that
asks, signed with the tests' IID key (moto has no signed identity documents). What the agent's
``aws-iid`` enrollment reads: ``PUT /latest/api/token``, then with that token
``/latest/dynamic/instance-identity/document`` and ``…/rsa2048`` (base64 RSA-SHA256)."""

from __future__ import annotations

import secrets
import socket
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager

import uvicorn
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import PlainTextResponse
from starlette.routing import Route

from tests.aws.conftest import Env
from tests.aws.test_pipeline import iid_document


def imds_app(env: Env, instance_at: Callable[[str], str | None]) -> Starlette:
    """``instance_at(caller address)``: the instance whose metadata that caller reads."""
    tokens: dict[str, str] = {}

    async def token(request: Request) -> PlainTextResponse:
        ttl = request.headers.get("x-aws-ec2-metadata-token-ttl-seconds", "")
        iid = instance_at(request.client.host if request.client else "")
        if not ttl.isdigit() or iid is None:
            return PlainTextResponse("", 400)
        t = secrets.token_urlsafe(16)
        tokens[t] = iid
        return PlainTextResponse(t)

    async def identity(request: Request) -> PlainTextResponse:
        iid = tokens.get(request.headers.get("x-aws-ec2-metadata-token", ""))
        if iid is None or iid != instance_at(request.client.host if request.client else ""):
            return PlainTextResponse("", 401)
        doc = iid_document(env, iid)
        what = request.path_params["what"]
        if what == "document":
            return PlainTextResponse(doc)
        if what in ("rsa2048", "signature"):
            return PlainTextResponse(env.iid.sign(doc))
        return PlainTextResponse("", 404)

    return Starlette(
        routes=[
            Route("/latest/api/token", token, methods=["PUT"]),
            Route("/latest/dynamic/instance-identity/{what}", identity, methods=["GET"]),
        ]
    )


@contextmanager
def running_imds(app: Starlette, sock: socket.socket | None = None) -> Iterator[str]:
    """The IMDS served in a thread (on ``sock``, or a free loopback port): its base URL."""
    if sock is None:
        sock = socket.socket()
        sock.bind(("127.0.0.1", 0))
        sock.listen(64)
    server = uvicorn.Server(uvicorn.Config(app, log_level="warning", access_log=False, lifespan="off"))
    thread = threading.Thread(target=server.run, kwargs={"sockets": [sock]}, daemon=True)
    thread.start()
    deadline = time.monotonic() + 10
    while not server.started and time.monotonic() < deadline:
        time.sleep(0.01)
    host, port = sock.getsockname()[:2]
    try:
        yield f"http://{host}:{port}"
    finally:
        server.should_exit = True
        thread.join(10)
        sock.close()
