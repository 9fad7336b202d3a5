"""The agent ↔ control-plane contract: every route the agent calls (``agentwire.ROUTES``, the table
its requests are built from) is routed by API Gateway in template.yaml, in infra/ (Terraform),
and by ``ringfence serve``; and the three agree with the library's routes, agent and admin API
alike, so that no route exists in one host and 403s in another."""

from __future__ import annotations

import json
from typing import Any

import httpx

from ringfence import serve
from ringfence.agentwire import API_PREFIX, ROUTES
from ringfence.control.wiring import Config
from ringfence.routes.openapi import documents
from tests.aws.test_static import ROOT, hcl, template

Route = tuple[str, str]  # (METHOD, /path/{id}/...)


def agent_calls() -> set[Route]:
    return {(method, API_PREFIX + path) for method, path in ROUTES.values()}


def library_routes(doc: str) -> set[Route]:
    paths = json.loads(documents()[doc])["paths"]
    return {(m.upper(), p.replace("{wid}", "{id}")) for p, ops in paths.items() for m in ops}


def sam_routes(function: str) -> set[Route]:
    events = template()["Resources"][function]["Properties"]["Events"]
    return {(e["Properties"]["Method"].upper(), e["Properties"]["Path"]) for e in events.values() if e["Type"] == "Api"}


def terraform_locals(name: str) -> dict[str, Any]:
    doc = hcl(ROOT / "infra" / "modules" / "ringfence" / name)
    out: dict[str, Any] = {}
    for block in doc["locals"]:
        out.update(block)
    return out


def terraform_routes(name: str) -> set[Route]:
    return {(m.upper(), path) for path, methods in terraform_locals("api.tf")[name].items() for m in methods}


def test_every_route_the_agent_calls_is_routed_on_aws_sam_terraform_and_by_the_library() -> None:
    calls = agent_calls()
    assert ("GET", "/v1/agents/{id}/wait") in calls and len(calls) == len(ROUTES)
    assert calls <= sam_routes("AgentApiFunction"), calls - sam_routes("AgentApiFunction")
    assert calls <= terraform_routes("agent_routes"), calls - terraform_routes("agent_routes")
    assert calls <= library_routes("agent-api.json")


def test_hosts_route_exactly_the_library_routes() -> None:
    assert sam_routes("AgentApiFunction") == library_routes("agent-api.json") == terraform_routes("agent_routes")
    assert sam_routes("AdminFunction") == library_routes("admin-api.json") == terraform_routes("admin_routes")


def test_the_long_poll_fits_the_function_and_gateway_timeouts() -> None:
    cap = Config().max_wait
    assert cap <= 25 == Config.from_env({"RINGFENCE_MAX_WAIT": "300"}).max_wait
    sam = template()["Resources"]["AgentApiFunction"]["Properties"]["Timeout"]
    functions = terraform_locals("lambda.tf")["functions"]
    assert sam >= cap + 5 and functions["agentapi"]["timeout"] >= cap + 5


class _Store:
    def put_nonce(self, nonce: str, ttl: int) -> None:
        return None


class _Wiring:
    """Just enough for GET /v1/nonce: the other requests are answered before the service reads
    anything (no token: 401; an invalid body: 422)."""

    cfg = Config()
    store = _Store()


def test_serve_routes_every_route_the_agent_calls() -> None:
    # the rest: 401 (no token, checked before the body); artifact: 404, "{name}" is no name of the
    # artifact (and it needs no token)
    expected = {"nonce": 200, "enroll": 422, "token": 422, "artifact": 404}
    with serve.serving(serve.ServeApp.over(_Wiring(), None)) as running:
        client = httpx.Client(base_url=running.url)
        for name, (method, path) in ROUTES.items():
            r = client.request(method, API_PREFIX + path.replace("{id}", "i-0123"), content=b"{}")
            # routed: the route's own answer, not the event handler's "Not found" for an unknown route
            assert r.status_code == expected.get(name, 401), (name, r.status_code, r.text)
            assert name == "nonce" or r.json().get("error"), (name, r.text)
        r = client.get(f"{API_PREFIX}/agents/i-0123/nothing")
        assert r.status_code == 404 and "error" not in r.json()  # what an unrouted path looks like


def test_the_other_clouds_event_routes_are_routed_alike_everywhere() -> None:
    """POST /azure/events and POST /gcp/events: what the library routes (and documents in
    docs/openapi), what SAM and Terraform route to the azureevents / gcpevents functions, and what
    ``ringfence serve`` answers (unconfigured: its own "events are off", not an unknown path)."""
    for cloud, function in (("azure", "AzureEventsFunction"), ("gcp", "GcpEventsFunction")):
        routes = library_routes(f"{cloud}-events-api.json")
        assert routes == {("POST", f"/{cloud}/events")}
        assert sam_routes(function) == routes == terraform_routes(f"{cloud}_routes")
    with serve.serving(serve.ServeApp.over(_Wiring(), None)) as running:
        client = httpx.Client(base_url=running.url)
        for cloud, name in (("azure", "Azure"), ("gcp", "GCP")):
            r = client.post(f"/{cloud}/events", content=b"[]")
            assert r.status_code == 404 and r.json()["error"] == f"{name} events are off", r.text
