"""What the agent and admin routes share: a validating resolver whose validation failures answer
in the API's error body (422, naming each bad field), and service answers as HTTP responses."""

import json
import re
import sqlite3
from collections.abc import Callable, Mapping
from typing import Any, TypeVar, cast

from aws_lambda_powertools.event_handler import APIGatewayRestResolver
from aws_lambda_powertools.event_handler import Response as HttpResponse
from aws_lambda_powertools.event_handler.api_gateway import _DYNAMIC_ROUTE_PATTERN, _NAMED_GROUP_BOUNDARY_PATTERN
from aws_lambda_powertools.event_handler.openapi.exceptions import RequestValidationError
from aws_lambda_powertools.event_handler.openapi.models import SecurityScheme
from aws_lambda_powertools.utilities.data_classes import APIGatewayProxyEvent

from ringfence import agentapi
from ringfence.control.api import Response, error
from ringfence.store.failure import Kind, ObjectsUnwritable, StoreHealth

STORE_RETRY_AFTER = 5  # seconds: the Retry-After of a 503 for a store unavailable for now
# what any admin route may answer under `ringfence serve` (store_failure, told=True)
ADMIN_STORE_FAILED = (
    "(ringfence serve) the control plane's store or its published files failed, the reason in `error` "
    "(`state.db: <SQLite's reason>`, `objects/: <the system's reason>`): unavailable for now (full, locked, "
    f"an I/O error, not writable), with Retry-After ({STORE_RETRY_AFTER}): the request may be partly done (an "
    "audit record written), send it again; or damaged (no Retry-After): no request is answered from the store "
    "until the operator restores it from a backup"
)
# what any agent API or event route may answer under `ringfence serve` (store_failure, told=False)
STORE_FAILED = (
    "(ringfence serve) the control plane's store or its published files failed (full, locked, not "
    'writable, damaged): {"error": "the control plane is unavailable"}; send the request again after '
    f"Retry-After seconds ({STORE_RETRY_AFTER})"
)


def http(r: Response) -> HttpResponse[str]:
    return HttpResponse(
        status_code=r.status,
        content_type="application/json",
        # bytes: a stored document served as it is (signed bundles and deltas), never re-encoded
        body=r.body.decode() if isinstance(r.body, bytes) else json.dumps(r.body) if r.body is not None else "",
        headers=r.headers,
    )


def too_large(body: str | None, limit: int | None) -> HttpResponse[str] | None:
    size = len((body or "").encode())
    if limit is not None and size > limit:
        return http(error(413, "request too large", f"{size} bytes > {limit}"))
    return None


def validation_detail(exc: RequestValidationError) -> str:
    """``body.flows.0.end: Field required; query.since: …``: where and what, never the input."""
    parts = []
    for e in exc.errors():
        where = ".".join(str(p) for p in e.get("loc", ())) or "<request>"
        parts.append(f"{where}: {e.get('msg') or e.get('type', 'invalid')}")
    return "; ".join(parts)


def answers(
    model: Any = None,
    status: int = 200,
    description: str = "",
    errors: tuple[int, ...] = (),
    meaning: dict[int, str] | None = None,
) -> Any:
    """The OpenAPI ``responses`` of a route: its answer's model and the errors it may give
    (``meaning``: what a status means on this API, where not what it means on the agent API).
    The 422 is left out of the document of a route that validates nothing (:meth:`Resolver.get_openapi_schema`)."""
    meanings = {
        400: "the request is well-formed but refused (detail says why)",
        401: "no, an unknown or an expired bearer token",
        403: "the token is another workload's",
        404: "no such workload, or nothing published for it yet",
        409: "deltas cannot bridge from that version: fetch the bundle",
        413: "the body is over the size limit",
        422: "a field of the request is missing or invalid (detail names each, dotted: body.flows.0.end), or "
        "a JSON object of the body gives a key twice (body: duplicate key 'mode')",
        503: STORE_FAILED,
        **(meaning or {}),
    }
    err = {"application/json": {"model": agentapi.ErrorBody}}
    out: dict[int, Any] = {s: {"description": meanings[s], "content": err} for s in (422, *errors)}
    ok: dict[str, Any] = {"description": description or "OK"}
    if model is not None:
        ok["content"] = {"application/json": {"model": model}}
    out[status] = ok
    return out


class Resolver(APIGatewayRestResolver):
    """A resolver whose current event is its own. Powertools keeps the event being resolved in a
    class attribute shared by every resolver of the process (``BaseRouter.current_event``): fine
    in Lambda, one event at a time, but ``ringfence serve`` resolves many at once in threads (one
    resolver instance per thread), and a route must never read another request's event (its
    bearer token, its path). Here each instance keeps its own."""

    _event: APIGatewayProxyEvent | None = None
    _lambda_context: Any = None
    before_invalid: Callable[[], HttpResponse[str] | None] | None = None
    """Asked before a request that does not validate is answered 422: its answer instead, if any
    (the admin API's: a caller without the route's role gets the audited 403 first)."""

    @staticmethod
    def _compile_regex(rule: str, base_regex: str = r"^{}/*\Z") -> re.Pattern[str]:
        """A route's pattern, anchored at the path's very end: Powertools ends it with `$`, which
        also matches before a trailing newline, so ``DELETE /admin/workloads/dc1-db-1\n`` was
        routed as ``dc1-db-1``'s (another workload's) deregistration. Such a path is no route's
        (404)."""
        return re.compile(base_regex.format(re.sub(_DYNAMIC_ROUTE_PATTERN, _NAMED_GROUP_BOUNDARY_PATTERN, rule)))

    @property  # type: ignore[override]
    def current_event(self) -> APIGatewayProxyEvent:
        assert self._event is not None, "no event is being resolved"
        return self._event

    @current_event.setter
    def current_event(self, value: APIGatewayProxyEvent) -> None:
        self._event = value

    @property
    def lambda_context(self) -> Any:
        return self._lambda_context

    @lambda_context.setter
    def lambda_context(self, value: Any) -> None:
        self._lambda_context = value

    def get_openapi_schema(self, **kwargs: Any) -> Any:
        """Powertools' document, without the validation 422 on routes that take no field it
        validates (no body, no query field, only text path parameters): they never answer it."""
        schema = super().get_openapi_schema(**kwargs)
        for route in [*self._dynamic_routes, *self._static_routes]:
            if validates(route):
                continue
            item = (schema.paths or {}).get(route.openapi_path)
            op = getattr(item, route.method.lower(), None) if item is not None else None
            if op is not None and op.responses:
                op.responses.pop(422, None)
                op.responses.pop("422", None)
        return schema

    def resolve(self, event: Mapping[str, Any], context: Any) -> dict[str, Any]:
        self._event = cast(APIGatewayProxyEvent, self._to_proxy_event(dict(event)))
        self._lambda_context = context
        try:
            return super().resolve(event, context)
        finally:
            self._event = None


def validates(route: Any) -> bool:
    """Whether the resolver validates anything of a request to ``route`` (and so may answer 422)."""
    d = route.dependant
    if d.body_params or d.query_params or d.header_params or d.cookie_params:
        return True
    return any(p.field_info.annotation is not str for p in d.path_params)


KEY_SHOWN = 64  # the most of a duplicate key a 422 names


def _unique_keys(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    """A JSON object's members, refused when a key is given twice: ``json.loads`` keeps the last,
    so ``{"mode": "enforce", …, "mode": "idle"}`` was read as ``idle`` while whatever read the
    first (a reviewer, a log, a proxy's check) saw ``enforce``."""
    out: dict[str, Any] = {}
    for key, value in pairs:
        if key in out:
            shown = key if len(key) <= KEY_SHOWN else key[:KEY_SHOWN] + "…"
            raise RequestValidationError(
                [{"type": "json_invalid", "loc": ("body",), "msg": f"duplicate key {shown!r}", "input": {}}]
            )
        out[key] = value
    return out


def json_body(text: str) -> Any:
    """A request body's JSON, every object's keys unique at any depth (else the validation 422,
    ``body: duplicate key 'mode'``, after the route's role check as any invalid body)."""
    return json.loads(text, object_pairs_hook=_unique_keys)


def resolver(
    title: str, description: str, security_schemes: dict[str, SecurityScheme], max_body: int | None = None
) -> Resolver:
    """A validating resolver. A body over ``max_body`` bytes is a 413 even when it does not
    validate (the size is what is wrong with it). A JSON body with a key given twice in one
    object is a 422 (:func:`json_body`)."""
    app = Resolver(enable_validation=True, json_body_deserializer=json_body)

    def invalid(exc: RequestValidationError) -> HttpResponse[str]:
        first = app.before_invalid() if app.before_invalid is not None else None
        return (
            first
            or too_large(app.current_event.body, max_body)
            or http(error(422, "invalid request", validation_detail(exc)))
        )

    app.exception_handler(RequestValidationError)(invalid)

    def unencodable(exc: UnicodeEncodeError) -> HttpResponse[str]:
        # JSON may carry "\ud800", a lone UTF-16 surrogate no UTF-8 can hold: the request's
        # fault (a 400), not the server's, wherever a field of it was encoded (a hash, the store)
        return http(error(400, "invalid request", "a string holds an unpaired UTF-16 surrogate"))

    app.exception_handler(UnicodeEncodeError)(unencodable)

    def undecodable(exc: UnicodeDecodeError) -> HttpResponse[str]:
        # a body that is not UTF-8 (ringfence serve hands it on base64-encoded, as API Gateway does)
        first = app.before_invalid() if app.before_invalid is not None else None
        return first or http(error(400, "invalid request", "the body is not UTF-8 JSON"))

    app.exception_handler(UnicodeDecodeError)(undecodable)

    def too_deep(exc: RecursionError) -> HttpResponse[str]:
        # JSON nested deeper than the parser recurses ([[[[…]]]]): no body of this API nests so
        first = app.before_invalid() if app.before_invalid is not None else None
        return first or http(error(400, "invalid request", "the body's JSON is nested too deeply"))

    app.exception_handler(RecursionError)(too_deep)

    app.configure_openapi(title=title, version="1", description=description, security_schemes=security_schemes)
    return app


def store_failure(kind: Kind, said: str, told: bool = True) -> Response:
    """503 for a request the store failed (``said``: ``state.db: <SQLite's reason>``, the file's
    name and no more). Unavailable (full, locked, an I/O error): the request may be partly done
    (an audit record written before the failure) and is sent again after ``Retry-After``; damaged:
    no request is answered from the store until it is restored. ``told`` False (a caller the
    store could not authenticate: the agent API, event deliveries): the same 503 for both, naming
    neither the file nor the reason."""
    if not told:
        out = error(503, "the control plane is unavailable", "send the request again after Retry-After seconds")
        out.headers["Retry-After"] = str(STORE_RETRY_AFTER)
        return out
    if kind == "damaged":
        return error(
            503,
            said,
            "the control plane's store is damaged: no request is answered from it; the operator restores it "
            "from a backup and restarts ringfence serve",
        )
    out = error(
        503,
        said,
        "the control plane's store could not complete this request (it may be partly done): "
        "send it again after Retry-After seconds",
    )
    out.headers["Retry-After"] = str(STORE_RETRY_AFTER)
    return out


_App = TypeVar("_App", bound=APIGatewayRestResolver)


def answer_store_failures(app: _App, health: StoreHealth, told: bool = True) -> _App:
    """``app`` answering a store failure met by any route 503 (:func:`store_failure`), counted and
    logged by ``health``, instead of a bare 500 or a dropped connection: the store's, or a write of
    the published files that failed (an agent's report archived under ``objects/``, a policy's
    files); any other sqlite3 error (a constraint, a misuse: a bug) is raised as before. ``told``
    False: the answer names no reason (the agent API: its caller is authenticated by what the store
    holds)."""

    def failed(exc: sqlite3.DatabaseError | ObjectsUnwritable) -> HttpResponse[str]:
        event = app.current_event
        found = health.failed(exc, f"{event.http_method} {event.path}, answered 503")
        if found is None:
            raise exc
        return http(store_failure(*found, told=told))

    app.exception_handler([sqlite3.DatabaseError, ObjectsUnwritable])(failed)
    return app
