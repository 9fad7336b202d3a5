"""Event Grid deliveries of Azure Resource Manager events as Ringfence receives them (tests and the
demo): the documented system-topic event shape (event-schema-subscriptions) and the headers of a
delivery to a webhook with Ringfence's delivery secret."""

from __future__ import annotations

import time
import uuid
from typing import Any

from ringfence.clouds.azure.events import SECRET_HEADER

OID = "11111111-2222-3333-4444-555555555555"  # the caller's Entra object id in the events' claims
TENANT = "tenant-1"


def arm_event(
    event_type: str,
    resource: str,
    operation: str,
    subject: str | None = None,
    *,
    event_id: str | None = None,
    oid: str = OID,
) -> dict[str, Any]:
    """An ARM event (``Microsoft.Resources.ResourceWriteSuccess``…) for ``resource`` by the
    operation ``operation`` (``Microsoft.Compute/virtualMachines/write``…); ``subject``: the
    resource the event names, when not ``resource`` (a tag write names the tags resource)."""
    sub = resource.split("/")[2]
    return {
        "subject": subject or resource,
        "eventType": event_type,
        "eventTime": time.strftime("%Y-%m-%dT%H:%M:%S.0000000Z", time.gmtime()),
        "id": event_id or f"ev-{uuid.uuid4().hex}",
        "data": {
            "authorization": {"scope": resource, "action": operation, "evidence": {"role": "Contributor"}},
            "claims": {
                "http://schemas.microsoft.com/identity/claims/objectidentifier": oid,
                "http://schemas.microsoft.com/identity/claims/tenantid": TENANT,
            },
            "correlationId": "c1",
            "resourceProvider": operation.split("/")[0],
            "resourceUri": subject or resource,
            "operationName": operation,
            "status": "Succeeded",
            "subscriptionId": sub,
            "tenantId": TENANT,
        },
        "dataVersion": "2",
        "metadataVersion": "1",
        "topic": f"/subscriptions/{sub}",
    }


def delivery_headers(secret: str) -> dict[str, str]:
    """The headers of an Event Grid notification delivery carrying the delivery secret (a
    delivery property of the subscription, docs/deploy-azure.md)."""
    return {SECRET_HEADER: secret, "aeg-event-type": "Notification", "content-type": "application/json"}
