"""The Azure events route: ``POST /azure/events`` takes Event Grid deliveries (the subscription
validation handshake, ResourceWriteSuccess / ResourceDeleteSuccess, Resource Notifications), each
checked by its delivery secret header and/or its Entra ID token, for every host of the control
plane (``ringfence serve``, the ``azureevents`` function behind API Gateway).

Answers (:meth:`ringfence.clouds.azure.ingest.AzureEvents.handle`): 200 with what changed or the
validation response; 401 for a delivery that is not authenticated; 400 for a body that is no Event
Grid delivery; 403 for an event of a subscription this control plane does not govern (nothing
stored; Event Grid does not retry a 403); 503 with Retry-After when ARM could not be read even after
the SDK's retries, or under ``ringfence serve`` its store failed (Event Grid redelivers).
"""

# no `from __future__ import annotations`: the event handler reads the route signatures' types
import base64
from collections.abc import Callable

from aws_lambda_powertools.event_handler import APIGatewayRestResolver
from aws_lambda_powertools.event_handler import Response as HttpResponse

from ringfence.clouds.azure.ingest import AzureEvents

from .common import STORE_FAILED, answers, http, resolver, too_large

EVENTS_PATH = "/azure/events"
MAX_EVENT_BODY = 1024 * 1024  # Event Grid batches at most 1 MB per delivery


def azure_event_routes(service: Callable[[], AzureEvents]) -> APIGatewayRestResolver:
    app = resolver(
        "Ringfence Azure events",
        "Event Grid deliveries about VMs, NICs and tags (docs/deploy-azure.md).",
        {},
        max_body=MAX_EVENT_BODY,
    )

    @app.post(
        EVENTS_PATH,
        summary="one Event Grid delivery (an array of events in the Event Grid schema)",
        responses=answers(
            description="what changed, or the subscription validation response",
            errors=(400, 401, 403, 413, 503),
            meaning={
                400: "no Event Grid delivery",
                401: "a delivery that is not authenticated (its delivery secret header, its Entra ID token)",
                403: "an event of a subscription this control plane does not govern: nothing stored (Event Grid "
                "does not retry a 403)",
                503: "ARM could not be read even after the SDK's retries (with Retry-After): Event Grid delivers "
                "it again; also " + STORE_FAILED,
            },
        ),
    )
    def events() -> HttpResponse[str]:
        ev = app.current_event
        big = too_large(ev.body, MAX_EVENT_BODY)
        if big is not None:
            return big
        # API Gateway passes a non-text body base64-encoded; Event Grid sends JSON
        body = base64.b64decode(ev.body or "") if ev.is_base64_encoded else (ev.body or "").encode()
        return http(service().handle(dict(ev.headers or {}), body))

    return app
