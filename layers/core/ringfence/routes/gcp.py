"""The GCP events route: ``POST /gcp/events`` takes Pub/Sub push deliveries (a log sink's audit
entries) and Eventarc ``google.cloud.audit.log.v1.written`` events, each with the pusher's OIDC
token in ``Authorization: Bearer``, for every host of the control plane (``ringfence serve``, the
``gcpevents`` function behind API Gateway).

Answers: 200 with what changed (or why nothing did); 401 for a token that does not verify or a
sender that is not configured (nothing is read); 400 for a body that is no audit event or an event
of a project this control plane does not serve (nothing changed; Pub/Sub redelivers a non-2xx, and
its dead-letter topic keeps what never succeeds); 503 when Google's signing keys or the Google
APIs could not be read, even after retrying throttled calls, or under ``ringfence serve`` its
store failed (the reason-less 503 with ``Retry-After``: redelivered later).
"""

# no `from __future__ import annotations`: the event handler reads the route signatures' types
import logging
from collections.abc import Callable

from aws_lambda_powertools.event_handler import APIGatewayRestResolver
from aws_lambda_powertools.event_handler import Response as HttpResponse
from google.api_core.exceptions import GoogleAPICallError, RetryError

from ringfence.clouds.gcp.ingest import GcpIngest
from ringfence.clouds.gcp.oidc import KeysUnavailable, TokenError
from ringfence.control.api import Response, error
from ringfence.events import MalformedEvent

from .common import STORE_FAILED, answers, http, resolver, too_large

EVENTS_PATH = "/gcp/events"
MAX_EVENT_BODY = 256 * 1024  # a Pub/Sub message is at most 10 MB, an audit entry a few KiB
log = logging.getLogger("ringfence.gcp")


def gcp_event_routes(service: Callable[[], GcpIngest]) -> APIGatewayRestResolver:
    app = resolver(
        "Ringfence GCP events",
        "Audit-log events from Pub/Sub push or Eventarc (docs/deploy-gcp.md).",
        {},
        max_body=MAX_EVENT_BODY,
    )

    @app.post(
        EVENTS_PATH,
        summary="one audit-log event about a VM (Pub/Sub push envelope or Eventarc LogEntry)",
        responses=answers(
            description="what changed, or why nothing did",
            errors=(400, 401, 413, 503),
            meaning={
                400: "no audit event, or an event of a project this control plane does not serve: nothing "
                "changed (Pub/Sub redelivers a non-2xx; its dead-letter topic keeps what never succeeds)",
                401: "a token that does not verify or a sender that is not configured: nothing is read",
                503: "Google's signing keys or the Google APIs could not be read, even after retrying throttled "
                "calls (`signing keys unavailable`, `Google APIs unavailable`): Pub/Sub delivers it again; also "
                + STORE_FAILED,
            },
        ),
    )
    def events() -> HttpResponse[str]:
        ev = app.current_event
        big = too_large(ev.body, MAX_EVENT_BODY)
        if big is not None:
            return big
        ingest = service()
        try:
            sender = ingest.authenticate(ev.headers.get("Authorization") or ev.headers.get("authorization"))
        except KeysUnavailable as exc:
            log.warning("GCP event not verified: %s", exc)
            return http(error(503, "signing keys unavailable", str(exc)))
        except TokenError as exc:
            log.warning("GCP event refused: %s", exc)
            return http(error(401, "event sender not verified", str(exc)))
        try:
            res = ingest.handle(ev.body or "")
        except MalformedEvent as exc:
            log.warning("GCP event from %s refused: %s", sender, exc)
            return http(error(400, "invalid event", str(exc)))
        except (GoogleAPICallError, RetryError) as exc:
            log.warning("GCP event from %s: the Google APIs could not be read: %s", sender, exc)
            return http(error(503, "Google APIs unavailable", str(exc)))
        body = {"event_id": res.event_id, "kind": res.kind, "changed": res.changed}
        return http(Response(200, body))

    return app
