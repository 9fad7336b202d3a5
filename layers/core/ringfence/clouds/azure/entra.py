"""An Entra ID access token on Event Grid deliveries (Event Grid's "secure webhook"): Event Grid
obtains a token for the control plane's app registration and sends it as ``Authorization: Bearer``.
Checked: the signature (the tenant's published keys), the audience (the app's id or URI), the
issuer (the tenant, v1 or v2 form), expiry, the app role ``AzureEventGridSecureWebhookSubscriber``,
and which application obtained the token: ``appid`` (v1 tokens) or ``azp`` (v2 tokens) must be
Event Grid's own. The role alone is not enough: Microsoft's setup assigns it to the users or
applications that create event subscriptions too, and any application it is assigned to can obtain
a token for our audience that carries it; only Event Grid's service principal obtains tokens as
Event Grid's application."""

from __future__ import annotations

from typing import Any

import jwt

EVENT_GRID_ROLE = "AzureEventGridSecureWebhookSubscriber"
# the application id of the "Microsoft.EventGrid" service principal, which requests the tokens of
# secure webhook deliveries: Microsoft's Event Grid docs give it ("the 'Azure Event Grid' Azure
# Active Directory AppId", secure-webhook-delivery); check it in the tenant (Enterprise
# applications → Microsoft.EventGrid → Application ID) and override with RINGFENCE_EVENTGRID_APP_ID
EVENT_GRID_APP_ID = "4962773b-9cdb-44cf-a8bf-237846a00ab7"


class TokenRefused(ValueError):
    """The delivery's bearer token does not hold (401)."""


class KeysUnavailable(RuntimeError):
    """The tenant's signing keys could not be fetched (Entra ID unreachable or throttled): the
    token is neither accepted nor refused; the delivery is answered 503 so Event Grid retries it
    (a 401 is not retried: the delivery would be lost)."""


class EntraVerifier:
    def __init__(
        self, tenant: str, audience: str, jwks_url: str | None = None, app_id: str = EVENT_GRID_APP_ID
    ) -> None:
        self.app_id = app_id.strip().lower()
        if not self.app_id:  # an empty pin would match a token that names no application
            raise ValueError("Event Grid's application id must be set (RINGFENCE_EVENTGRID_APP_ID)")
        self.tenant = tenant
        self.audience = audience
        self.jwks = jwt.PyJWKClient(
            jwks_url or f"https://login.microsoftonline.com/{tenant}/discovery/v2.0/keys", cache_keys=True
        )
        self.issuers = [f"https://login.microsoftonline.com/{tenant}/v2.0", f"https://sts.windows.net/{tenant}/"]

    def verify(self, authorization: str | None) -> dict[str, Any]:
        if not authorization or not authorization.startswith("Bearer "):
            raise TokenRefused("no bearer token (Event Grid's Entra ID authentication)")
        token = authorization.removeprefix("Bearer ").strip()
        try:
            key = self.jwks.get_signing_key_from_jwt(token).key
            claims: dict[str, Any] = jwt.decode(
                token,
                key,
                algorithms=["RS256"],
                audience=self.audience,
                issuer=self.issuers,
                options={"require": ["exp", "iat", "aud", "iss"]},
            )
        except jwt.PyJWKClientConnectionError as exc:
            raise KeysUnavailable(f"signing keys unavailable: {exc}") from None
        except jwt.PyJWTError as exc:
            raise TokenRefused(f"bearer token refused: {exc}") from None
        if EVENT_GRID_ROLE not in (claims.get("roles") or []):
            raise TokenRefused(f"bearer token lacks the app role {EVENT_GRID_ROLE}")
        # the client application: appid in v1 tokens, azp in v2 tokens (Entra sets ver; it is signed)
        claim = "azp" if str(claims.get("ver", "")) == "2.0" else "appid"
        client = str(claims.get(claim) or "").strip().lower()
        if client != self.app_id:
            raise TokenRefused(
                f"bearer token was obtained by application {client or '(none)'} ({claim}), not Event Grid's"
            )
        return claims
