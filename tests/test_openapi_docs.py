"""The committed OpenAPI documents are what the routes give (regenerate: make openapi)."""

from __future__ import annotations

from pathlib import Path

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
