"""The committed OpenAPI documents are what the routes give (regenerate: make openapi)."""

from __future__ import annotations

from pathlib import Path

import pytest

from ringfence.routes.openapi import documents

DOCS = Path(__file__).resolve().parents[1] / "docs" / "openapi"


def test_openapi_documents_are_current() -> None:
    for name, text in documents().items():
        committed = (DOCS / name).read_text() if (DOCS / name).exists() else ""
        assert committed == text, f"docs/openapi/{name} is stale: run `make openapi`"


def test_agent_document_has_every_route_the_agent_calls() -> None:
    import json

    from ringfence.agentwire import API_PREFIX, ROUTES

    doc = json.loads(documents()["agent-api.json"])
    routed = {(m.upper(), p.replace("{wid}", "{id}")) for p, ops in doc["paths"].items() for m in ops}
    assert {(m, API_PREFIX + p) for m, p in ROUTES.values()} <= routed
    # bodies are the agent API's models: the event handler validates them
    enroll = doc["paths"]["/v1/enroll"]["post"]["requestBody"]["content"]["application/json"]["schema"]
    assert enroll["$ref"].endswith("/EnrollRequest")


def test_admin_conflicts_are_described_as_the_admin_api_means_them() -> None:
    """A 409 on the admin API is a conflict with state (review: every 409 read "deltas cannot
    bridge", the agent API's meaning)."""
    import json

    doc = json.loads(documents()["admin-api.json"])
    conflicts = [
        ops["responses"]["409"]["description"]
        for ops_by in doc["paths"].values()
        for ops in ops_by.values()
        if "409" in ops.get("responses", {})
    ]
    assert conflicts and all("nothing was done" in c and "bridge" not in c for c in conflicts), conflicts


def test_every_agent_and_event_route_declares_the_store_503() -> None:
    """Under `ringfence serve` any of these routes answers a failed store (or objects/ not
    writable) 503 `the control plane is unavailable` with Retry-After (review r8: no document
    said so)."""
    import json

    for name in ("agent-api.json", "gcp-events-api.json", "azure-events-api.json"):
        doc = json.loads(documents()[name])
        for path, ops in doc["paths"].items():
            for method, op in ops.items():
                said = op["responses"].get("503", {}).get("description", "")
                assert "the control plane is unavailable" in said and "Retry-After" in said, (name, method, path)


class _Reached(Exception):
    """The route's service was asked for: the request got past validation."""


class _Invalid(Exception):
    """The resolver found the request invalid: it answers 422 (after the host's checks)."""


def _reached() -> None:
    raise _Reached


def _invalid() -> None:
    raise _Invalid


def test_a_route_lists_the_validation_422_exactly_when_it_answers_it() -> None:
    """The documents listed a 422 ("a field of the request is missing or invalid") on every route,
    the GCP and Azure event routes among them, which validate nothing of the request (their bodies
    are read by the handlers: 400). Each route is called here with a request that fails any
    validation it has (each query field a value no field takes, a body that is no JSON): its
    document lists 422 exactly when the resolver refuses it as invalid rather than reaching the
    route's own code."""
    import json

    from ringfence.routes.openapi import apps
    from ringfence.serve import proxy_event

    seen = {True: 0, False: 0}
    for name, app in apps(_reached).items():
        doc = json.loads(documents()[name])
        app.before_invalid = _invalid  # type: ignore[attr-defined]  # what runs before a 422 is answered
        for route in [*app._dynamic_routes, *app._static_routes]:
            listed = "422" in doc["paths"][route.openapi_path][route.method.lower()]["responses"]
            path = route.path.replace("<wid>", "dc1-web-1").replace("<name>", "x.whl")
            query = [(p.alias, "\x00not-a-value") for p in route.dependant.query_params]
            headers = [("Content-Type", "application/json")]
            event = proxy_event(route.method, path, headers, query, b'{"unterminated": ', "192.0.2.1", "carol")
            with pytest.raises((_Reached, _Invalid)) as raised:
                app.resolve(event, None)
            invalid = raised.type is _Invalid
            assert listed == invalid, f"{name} {route.method} {route.path}: 422 listed {listed}, answered {invalid}"
            seen[invalid] += 1
    assert seen[True] >= 15 and seen[False] >= 5, seen


def test_every_admin_503_says_what_it_is_sent_for() -> None:
    """The admin API's 503s said only "compute could not be queued", but under `ringfence serve`
    every admin route also answers 503 when the store or its published files fail (the reason
    named, Retry-After when it is for now, none when the store is damaged). Every route says so;
    a route that stores and then queues compute says both."""
    import json

    from ringfence.routes.admin import ROUTE_ACTIONS

    queues = {
        "policy.provision", "workload.mode", "label.bind", "label.unbind", "workload.quarantine",
        "workload.release", "workload.register", "workload.import", "workload.deregister",
    }  # fmt: skip
    doc = json.loads(documents()["admin-api.json"])
    for (method, path), (action, _) in ROUTE_ACTIONS.items():
        said = doc["paths"][path.replace("<wid>", "{wid}")][method.lower()]["responses"]["503"]["description"]
        assert "state.db:" in said and "damaged" in said and "Retry-After" in said, (method, path, said)
        assert ("compute could not be queued" in said) == (action in queues), (method, path, said)
