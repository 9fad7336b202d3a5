"""The OpenAPI documents of the agent and admin APIs, from the routes themselves:
``python -m ringfence.routes.openapi [DIR]`` writes ``DIR/agent-api.json``, ``DIR/admin-api.json``
(the admin API, on-premise workload routes included, as the AWS admin function and ``ringfence
serve`` both route it), ``DIR/azure-events-api.json`` and ``DIR/gcp-events-api.json`` (the other clouds'
event deliveries, served by ``ringfence serve`` and by the ``azureevents`` / ``gcpevents``
functions) (default ``docs/openapi``); a test checks that the committed ones are current."""

from __future__ import annotations

import json
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any, NoReturn

from aws_lambda_powertools.event_handler import APIGatewayRestResolver

from .admin import admin_routes, token_roles
from .agent import agent_routes
from .azure import azure_event_routes
from .gcp import gcp_event_routes


def _no_service() -> NoReturn:
    raise RuntimeError("the OpenAPI document is built without calling any route")


def apps(service: Callable[[], Any] = _no_service) -> dict[str, APIGatewayRestResolver]:
    """Each document's routes, over ``service`` (by default one never called)."""
    return {
        "agent-api.json": agent_routes(service),
        "admin-api.json": admin_routes(service, onprem=service, roles_of=token_roles),
        "azure-events-api.json": azure_event_routes(service),
        "gcp-events-api.json": gcp_event_routes(service),
    }


def documents() -> dict[str, str]:
    return {
        name: json.dumps(json.loads(app.get_openapi_json_schema()), indent=2, sort_keys=True) + "\n"
        for name, app in apps().items()
    }


def main(argv: list[str] | None = None) -> int:
    args = sys.argv[1:] if argv is None else argv
    target = Path(args[0] if args else "docs/openapi")
    target.mkdir(parents=True, exist_ok=True)
    for name, text in documents().items():
        (target / name).write_text(text)
        print(f"wrote {target / name}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
