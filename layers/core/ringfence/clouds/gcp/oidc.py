"""Verifying Google-signed OIDC tokens (RS256 JWTs): the instance identity token an agent enrolls
with, and the token Pub/Sub push and Eventarc put in ``Authorization: Bearer``.

Checked, every time: the signature against the configured JWKS (Google's
``https://www.googleapis.com/oauth2/v3/certs`` in production; a test key served on loopback in
tests), ``RS256`` only (never ``none`` or an HMAC keyed with the public key), ``iss`` Google's,
``aud`` exactly ours, ``exp`` and ``iat`` present and ``exp`` in the future (a minute of clock
skew). The JWKS is fetched with pyjwt's client and cached (keys rotate: an unknown ``kid``
refetches).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import jwt

GOOGLE_JWKS = "https://www.googleapis.com/oauth2/v3/certs"
GOOGLE_ISSUERS = ("https://accounts.google.com", "accounts.google.com")
LEEWAY = 60  # seconds of clock skew tolerated on exp/iat
MAX_TOKEN = 8192  # bytes: Google's tokens are ~1 KiB; anything far larger is not one


class TokenError(ValueError):
    """The token is not a valid Google-signed token for us (maps to 401)."""


class KeysUnavailable(TokenError):
    """The signing keys could not be fetched: nothing is known about the token (maps to 503)."""


class OidcVerifier:
    def __init__(self, audience: str, jwks_url: str = GOOGLE_JWKS, issuers: Sequence[str] = GOOGLE_ISSUERS) -> None:
        if not audience:
            raise ValueError("an OIDC verifier needs the audience it accepts (our URL or service name)")
        self.audience = audience
        self.issuers = tuple(issuers)
        self._jwks = jwt.PyJWKClient(jwks_url, cache_keys=True, lifespan=3600, timeout=5)

    def verify(self, token: str, what: str = "token") -> dict[str, Any]:
        """The token's claims, once every check passed; :class:`TokenError` naming the first that failed."""
        if not token or len(token) > MAX_TOKEN:
            raise TokenError(f"{what} is missing or too large")
        try:
            key = self._jwks.get_signing_key_from_jwt(token)
        except jwt.PyJWKClientConnectionError as exc:
            raise KeysUnavailable(f"{what}: the signing keys could not be fetched ({exc})") from None
        except jwt.PyJWKClientError:
            raise TokenError(f"{what} is not signed by a key of the configured issuer") from None
        except jwt.InvalidTokenError as exc:
            raise TokenError(f"{what} is not a JWT ({exc})") from None
        try:
            claims: dict[str, Any] = jwt.decode(
                token,
                key.key,
                algorithms=["RS256"],
                audience=self.audience,
                issuer=self.issuers,
                leeway=LEEWAY,
                options={"require": ["exp", "iat", "iss", "aud"]},
            )
        except jwt.InvalidAudienceError:
            raise TokenError(f"{what} is for another audience (expected {self.audience!r})") from None
        except jwt.ExpiredSignatureError:
            raise TokenError(f"{what} has expired") from None
        except jwt.InvalidTokenError as exc:
            raise TokenError(f"{what} is invalid: {exc}") from None
        return claims
