"""Admin API (API Gateway REST, IAM auth): provision policy, set modes, quarantine/release,
issue pairing keys. Every action is audited with the caller's IAM principal."""

from __future__ import annotations

import json
from typing import Any

from aws_lambda_powertools import Logger, Tracer
from aws_lambda_powertools.event_handler import APIGatewayRestResolver
from aws_lambda_powertools.event_handler import Response as HttpResponse

from ringfence.clouds.aws.admin import Admin
from ringfence.clouds.aws.api import Response
from ringfence.clouds.aws.wiring import Config, Wiring

logger = Logger()
tracer = Tracer()
app = APIGatewayRestResolver()
_svc: dict[str, Admin] = {}


def admin() -> Admin:
    if "admin" not in _svc:
        _svc["admin"] = Admin(Wiring(Config.from_env()))
    return _svc["admin"]


def _http(r: Response) -> HttpResponse[str]:
    return HttpResponse(status_code=r.status, content_type="application/json", body=json.dumps(r.body))


def _principal() -> str:
    ident = app.current_event.request_context.identity
    return ident.user_arn or ident.caller or "unknown"


def _body() -> dict[str, Any]:
    body = app.current_event.json_body if app.current_event.body else {}
    return body if isinstance(body, dict) else {}


@app.post("/admin/policies")
def provision() -> HttpResponse[str]:
    b = _body()
    files = b.get("files")
    if not isinstance(files, dict):
        return _http(Response(400, {"error": "body needs files: {name: yaml text}", "detail": ""}))
    return _http(admin().provision(_principal(), {str(k): str(v) for k, v in files.items()}, str(b.get("reason", ""))))


@app.put("/admin/workloads/<wid>/mode")
def set_mode(wid: str) -> HttpResponse[str]:
    b = _body()
    return _http(admin().set_mode(_principal(), wid, b.get("mode"), str(b.get("reason", ""))))


@app.post("/admin/workloads/<wid>/quarantine")
def quarantine(wid: str) -> HttpResponse[str]:
    return _http(admin().quarantine(_principal(), wid, True, str(_body().get("reason", ""))))


@app.delete("/admin/workloads/<wid>/quarantine")
def release(wid: str) -> HttpResponse[str]:
    return _http(admin().quarantine(_principal(), wid, False, str(_body().get("reason", ""))))


@app.post("/admin/pairing-keys")
def pairing_key() -> HttpResponse[str]:
    b = _body()
    return _http(
        admin().pairing_key(
            _principal(), b.get("workload_id"), int(b.get("uses", 1)), int(b.get("ttl", 3600)), str(b.get("reason", ""))
        )
    )


@logger.inject_lambda_context
@tracer.capture_lambda_handler
def handler(event: dict[str, Any], context: Any) -> dict[str, Any]:
    return app.resolve(event, context)
