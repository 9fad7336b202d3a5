"""The Google Cloud SDK clients Ringfence uses, built in one place: production takes Application
Default Credentials and Google's endpoints; tests and the lab pass a loopback endpoint
(:mod:`ringfence.local.gcp_api`) and anonymous credentials. Only the REST transport is used (the
only one google-cloud-compute has; Resource Manager's gRPC is not needed for two list calls).
Cloud Logging has no client library here: its one call (``entries:list``) goes through
google-auth's ``AuthorizedSession`` with the same credentials."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from google.api_core import retry as retries
from google.api_core.exceptions import ServiceUnavailable, TooManyRequests

SCOPES = ["https://www.googleapis.com/auth/cloud-platform"]
LOGGING = "https://logging.googleapis.com"


@dataclass(frozen=True)
class Endpoints:
    """Where the APIs are: ``None`` means Google's. ``compute``, ``resource_manager`` and
    ``logging`` are base URLs (``http://127.0.0.1:PORT`` in tests); ``anonymous`` sends no
    credentials (tests only). Without ``resource_manager``, tag reads go to the instance zone's
    endpoint (``https://ZONE-cloudresourcemanager.googleapis.com``), as Google asks for zonal
    resources."""

    compute: str | None = None
    resource_manager: str | None = None
    anonymous: bool = False
    # a credential configuration (JSON), e.g. workload identity federation from AWS (it holds no
    # secret: the function's AWS role is exchanged for a Google token); None: Application Default
    credentials_config: str | None = None
    logging: str | None = None  # Cloud Logging (entries:list); None: https://logging.googleapis.com

    def _credentials(self) -> Any | None:
        """The configured credentials; None: Application Default (the SDK clients find them)."""
        if self.anonymous:
            from google.auth.credentials import AnonymousCredentials

            return AnonymousCredentials()  # type: ignore[no-untyped-call]
        if self.credentials_config:
            import json

            import google.auth

            creds, _ = google.auth.load_credentials_from_dict(  # type: ignore[no-untyped-call]
                json.loads(self.credentials_config), scopes=SCOPES
            )
            return creds
        return None

    def _options(self, endpoint: str | None) -> dict[str, Any]:
        opts: dict[str, Any] = {}
        if endpoint:
            opts["client_options"] = {"api_endpoint": endpoint}
        creds = self._credentials()
        if creds is not None:
            opts["credentials"] = creds
        return opts

    def instances(self) -> Any:
        from google.cloud import compute_v1

        return compute_v1.InstancesClient(transport="rest", **self._options(self.compute))

    def firewall_policies(self) -> Any:
        from google.cloud import compute_v1

        return compute_v1.NetworkFirewallPoliciesClient(transport="rest", **self._options(self.compute))

    def tag_bindings(self, zone: str | None = None) -> Any:
        from google.cloud import resourcemanager_v3

        endpoint = self.resource_manager
        if endpoint is None and zone:
            endpoint = f"https://{zone}-cloudresourcemanager.googleapis.com"
        return resourcemanager_v3.TagBindingsClient(transport="rest", **self._options(endpoint))

    @property
    def logging_url(self) -> str:
        return (self.logging or LOGGING).rstrip("/")

    def logging_session(self) -> Any:
        """An HTTP session that authenticates to Cloud Logging (a ``requests`` session)."""
        from google.auth.transport.requests import AuthorizedSession

        creds = self._credentials()
        if creds is None:
            import google.auth

            creds, _ = google.auth.default(scopes=SCOPES)
        return AuthorizedSession(creds)  # type: ignore[no-untyped-call]


# Throttling (429, honouring no Retry-After: api_core's exponential backoff) and 503 are retried;
# anything else is an answer. Bounded: an event handler must finish inside its delivery deadline.
RETRY = retries.Retry(
    predicate=retries.if_exception_type(TooManyRequests, ServiceUnavailable),
    initial=0.2,
    maximum=5.0,
    multiplier=2.0,
    timeout=30.0,
)
