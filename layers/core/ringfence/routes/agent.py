"""The agent API's routes (docs/agent-api.md): nonce, enroll, token refresh, own bundle, deltas, wait (long-poll),
heartbeat, reports — over an :class:`AgentApi` service, for every host of the control plane.

Bodies and query parameters are validated by the event handler against :mod:`ringfence.agentapi`
(a bad field is a 422 naming it); the resolver's OpenAPI document is ``docs/openapi/agent-api.json``.
"""

# no `from __future__ import annotations`: the event handler reads the route signatures' types
import re
from collections.abc import Callable
from typing import Annotated, Any

from aws_lambda_powertools.event_handler import APIGatewayRestResolver
from aws_lambda_powertools.event_handler import Response as HttpResponse
from aws_lambda_powertools.event_handler.openapi.models import HTTPBearer
from aws_lambda_powertools.event_handler.openapi.params import Query

from ringfence import agentapi
from ringfence.agentwire import API_PREFIX, ROUTES
from ringfence.bundle import Bundle
from ringfence.control.agents import AgentApi

from .common import answers, http, resolver, too_large

_TOKEN: list[dict[str, list[str]]] = [{"agentToken": []}]
# the routes that need the workload's bearer token (token refresh is signed by the agent key instead)
_BEARER_ROUTE = re.compile(
    "^" + API_PREFIX.replace("/", "/+") + r"/+agents/+([^/]+)/+(?:bundle|deltas|wait|heartbeat|reports)/*\Z"
)
_AUTH = (401, 403)


def needs_bearer(path: str) -> bool:
    """Whether ``path`` is one of the routes a request reaches only with a bearer token."""
    return _BEARER_ROUTE.match(path) is not None


def route_path(route: str) -> str:
    """The event handler's form of one of the agent's routes (``<wid>`` for ``{id}``)."""
    return API_PREFIX + ROUTES[route][1].replace("{id}", "<wid>").replace("{name}", "<name>")


def outcome(path: str, status: int) -> str | None:
    """The metric an answer counts toward (the Lambda function publishes it): enrollments granted
    and refused, and requests refused for their token (alarm on either refusal rising)."""
    if path == route_path("enroll"):
        return "Enrollments" if status == 200 else "EnrollmentsRefused"
    if status in (401, 403):
        return "AgentRequestsRefused"
    if status == 422:
        return "AgentRequestsInvalid"
    return None


def agent_routes(service: Callable[[], AgentApi]) -> APIGatewayRestResolver:
    """The agent API over ``service()`` (called per request: hosts build the service lazily)."""
    app = resolver(
        "Ringfence agent API",
        "What agents call (docs/agent-api.md). The endpoints under /v1/agents/{id} need the workload's "
        "bearer token from POST /v1/enroll and serve that workload only.",
        {"agentToken": HTTPBearer(description="the token from POST /v1/enroll")},
        max_body=agentapi.MAX_REPORT_BYTES,
    )

    def authorized(wid: str, heartbeat: bool = False) -> HttpResponse[str] | None:
        denied = service().authorize(app.current_event.headers.get("Authorization"), wid, heartbeat)
        return http(denied) if denied else None

    def token_first() -> HttpResponse[str] | None:
        """A request to a bearer route whose body or query does not validate: its token is
        checked first (401/403), so nothing about the body is answered to a caller without one."""
        m = _BEARER_ROUTE.match(app.current_event.path or "")
        return authorized(m.group(1)) if m else None

    app.before_invalid = token_first

    @app.get(
        route_path("nonce"),
        summary="a single-use enrollment nonce",
        responses=answers(agentapi.NonceResponse, errors=(503,)),
    )
    def nonce() -> HttpResponse[str]:
        return http(service().nonce())

    @app.post(
        route_path("enroll"),
        summary="prove the workload's identity (cloud document or pairing key) for a bearer token",
        responses=answers(agentapi.EnrollResponse, errors=(400, 401, 503)),
    )
    def enroll(req: agentapi.EnrollRequest) -> HttpResponse[str]:
        return http(service().enroll(req))

    @app.post(
        route_path("token"),
        summary="a fresh access token: a signature by the workload's bound agent key over a nonce, or over "
        "the current token (the bearer, still valid) and the time (revokes the previous token)",
        responses=answers(
            agentapi.TokenResponse,
            errors=(401, 429, 503),
            meaning={
                429: "a renewal by token of a token less than half its lifetime old: retry after Retry-After "
                "seconds, calling with the token held meanwhile"
            },
        ),
    )
    def token(wid: str, req: agentapi.TokenRequest) -> HttpResponse[str]:
        return http(service().refresh(wid, req, app.current_event.headers.get("Authorization")))

    @app.get(
        route_path("bundle"),
        summary="the workload's last full bundle, byte for byte as compute signed it (later set changes: "
        "deltas); 304 when If-None-Match is its ETag",
        responses=answers(Bundle, description="the signed bundle (docs/bundle.md)", errors=(*_AUTH, 404, 503)),
        security=_TOKEN,
    )
    def bundle(wid: str) -> HttpResponse[str]:
        return authorized(wid) or http(service().bundle(wid, app.current_event.headers.get("If-None-Match")))

    @app.get(
        route_path("deltas"),
        summary="the signed set deltas from a bundle version to the newest, each as compute stored it",
        responses=answers(agentapi.DeltasResponse, errors=(*_AUTH, 404, 409, 503)),
        security=_TOKEN,
    )
    def deltas(
        wid: str, since: Annotated[int, Query(ge=0, description="the applied bundle version")] = 0
    ) -> HttpResponse[str]:
        return authorized(wid) or http(service().deltas(wid, since))

    @app.get(
        route_path("wait"),
        summary="long-poll: answers when a version newer than `version` exists, or at the timeout",
        responses=answers(agentapi.WaitResponse, errors=(*_AUTH, 503)),
        security=_TOKEN,
    )
    def wait(
        wid: str,
        version: Annotated[int, Query(ge=-1, description="the applied version; -1 for none")] = -1,
        timeout: Annotated[int, Query(ge=0, description="seconds to wait at most; capped by the server")] = 20,
        deltas: Annotated[
            bool, Query(description="answer with the signed deltas since `version` too, when they bridge")
        ] = False,
        bundle: Annotated[
            bool, Query(description="else answer with the stored bundle when it is newer than `version`")
        ] = False,
    ) -> HttpResponse[str]:
        header = app.current_event.headers.get("Authorization")
        return authorized(wid) or http(service().wait(wid, version, timeout, deltas, bundle, authorization=header))

    @app.post(
        route_path("heartbeat"),
        summary="liveness and the applied version; answers the newest version",
        responses=answers(agentapi.HeartbeatResponse, errors=(*_AUTH, 404, 503)),
        security=_TOKEN,
    )
    def heartbeat(wid: str, hb: agentapi.Heartbeat) -> HttpResponse[str]:
        return authorized(wid, heartbeat=True) or http(service().heartbeat(wid, hb))

    @app.post(
        route_path("reports"),
        summary="flow and drop records",
        responses=answers(agentapi.ReportsResponse, 202, errors=(*_AUTH, 413, 503)),
        security=_TOKEN,
    )
    def reports(wid: str, batch: agentapi.ReportBatch) -> HttpResponse[str]:
        big = too_large(app.current_event.body, agentapi.MAX_REPORT_BYTES)
        return authorized(wid) or big or http(service().reports(wid, batch))

    def artifact(name: str) -> HttpResponse[Any]:
        r = service().artifact(name)
        if r.status != 200:
            return http(r)
        kind = r.headers["Content-Type"]
        # bytes: the event handler answers them base64-encoded (isBase64Encoded), decoded by API
        # Gateway for Accept: application/octet-stream and by ringfence serve
        body: bytes = r.body
        if kind.startswith("text/"):
            return HttpResponse(status_code=200, content_type=kind, body=body.decode())
        return HttpResponse(status_code=200, content_type=kind, body=body)

    # no return annotation for the event handler: it would serialize the wheel's bytes as JSON;
    # the answer is bytes or text, never validated against a model
    del artifact.__annotations__["return"]
    app.get(
        route_path("artifact"),
        summary="the agent artifact `ringfence publish-agent` stored: ringfence_agent-<version>-py3-none-any.whl "
        "(bytes), its .sha256 or install-<16 hex>.sh; no token. Check the installer and the wheel against the "
        "digests the operator was given, never only against the .sha256 served beside it",
        responses={
            **answers(errors=(404, 503)),
            200: {"description": "the file", "content": {"application/octet-stream": {}, "text/plain": {}}},
        },
    )(artifact)

    return app
