"""Admin API (API Gateway REST, IAM auth): the library's routes over this container's service,
the on-premise workload routes (register, CMDB import, deregister) among them, as ``ringfence
serve`` serves them: on-premise hosts join this control plane with pairing keys. Every action is
audited with the caller's IAM principal and allowed only to the admin roles its binding in
``RINGFENCE_ADMIN_ROLES`` gives it (none bound: every action refused)."""

from __future__ import annotations

from typing import Any

from aws_lambda_powertools import Logger, Metrics, Tracer
from aws_lambda_powertools.metrics import MetricUnit

from ringfence.adminroles import AdminRole, RoleBindings
from ringfence.clouds.aws.wiring import Wiring
from ringfence.clouds.onprem import OnPremAdmin
from ringfence.control.wiring import Config
from ringfence.routes.admin import admin_routes, outcome
from ringfence.textsafe import json_line

logger = Logger(json_serializer=json_line)  # escaped: ringfence.textsafe
tracer = Tracer()
metrics = Metrics()
_svc: dict[str, Any] = {}
# a CMDB import writes one DynamoDB transaction per workload; API Gateway ends a request after 29 s
# (the function's timeout too), and an import ended part-way would leave part of the file
# registered: larger files are refused whole, to be imported in parts
IMPORT_ROWS = 500


def _count(name: str, value: float) -> None:
    metrics.add_metric(name=name, unit=MetricUnit.Count, value=value)


def admin() -> OnPremAdmin:
    if "admin" not in _svc:
        w = Wiring(Config.from_env())
        w.metric = _count  # what the wiring counts: a change stored whose compute message failed (ComputeNotQueued)
        _svc["admin"] = OnPremAdmin(w, _count, max_import_rows=IMPORT_ROWS)
    return _svc["admin"]  # type: ignore[no-any-return]


def roles_of(event: Any) -> frozenset[AdminRole]:
    # read per request (a few bindings: cheap), so a changed binding holds at once
    return RoleBindings.from_env().roles(event.request_context.identity.user_arn)


app = admin_routes(admin, onprem=admin, roles_of=roles_of)


@logger.inject_lambda_context
@tracer.capture_lambda_handler(capture_response=False, capture_error=False)  # answers hold tokens
@metrics.log_metrics
def handler(event: dict[str, Any], context: Any) -> dict[str, Any]:
    out = app.resolve(event, context)
    metrics.add_metric(name=outcome(int(out["statusCode"])), unit=MetricUnit.Count, value=1)
    return out
