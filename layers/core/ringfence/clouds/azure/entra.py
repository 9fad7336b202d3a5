"""An Entra ID access token on Event Grid deliveries (Event Grid's "secure webhook"): Event Grid
obtains a token for the control plane's app registration and sends it as ``Authorization: Bearer``.
Checked: the signature (the tenant's published keys), the audience (the app's id or URI), the
issuer (the tenant, v1 or v2 form), expiry, and the app role ``AzureEventGridSecureWebhookSubscriber``
that only Event Grid's service principal (and whoever creates subscriptions) is given."""

from __future__ import annotations

from typing import Any

import jwt

EVENT_GRID_ROLE = "AzureEventGridSecureWebhookSubscriber"


class TokenRefused(ValueError):
    """The delivery's bearer token does not hold (401)."""


class EntraVerifier:
    def __init__(self, tenant: str, audience: str, jwks_url: str | None = None) -> None:
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
        except jwt.PyJWTError as exc:
            raise TokenRefused(f"bearer token refused: {exc}") from None
        if EVENT_GRID_ROLE not in (claims.get("roles") or []):
            raise TokenRefused(f"bearer token lacks the app role {EVENT_GRID_ROLE}")
        return claims
