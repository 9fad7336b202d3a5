"""Admin API (API Gateway REST, IAM auth): the library's routes over this container's service.
Every action is audited with the caller's IAM principal."""

from __future__ import annotations

from typing import Any

from aws_lambda_powertools import Logger, Metrics, Tracer
from aws_lambda_powertools.metrics import MetricUnit

from ringfence.clouds.aws.admin import Admin
from ringfence.clouds.aws.wiring import Config, Wiring
from ringfence.routes.admin import admin_routes, outcome

logger = Logger()
tracer = Tracer()
metrics = Metrics()
_svc: dict[str, Admin] = {}


def admin() -> Admin:
    if "admin" not in _svc:
        _svc["admin"] = Admin(Wiring(Config.from_env()))
    return _svc["admin"]


app = admin_routes(admin)


@logger.inject_lambda_context
@tracer.capture_lambda_handler
@metrics.log_metrics
def handler(event: dict[str, Any], context: Any) -> dict[str, Any]:
    out = app.resolve(event, context)
    metrics.add_metric(name=outcome(int(out["statusCode"])), unit=MetricUnit.Count, value=1)
    return out
