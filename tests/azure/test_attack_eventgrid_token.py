"""Event Grid deliveries authenticated by an Entra ID token (secure webhook): the signature by the
tenant's published key, audience, issuer, expiry, Event Grid's app role and the application that
obtained the token (appid / azp: Event Grid's own) — each attack refused with nothing stored. The
tenant's keys are served on loopback as login.microsoftonline.com serves them."""

from __future__ import annotations

import json
import threading
import time
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

import jwt
import pytest
from cryptography.hazmat.primitives.asymmetric import rsa

from ringfence.clouds.azure.entra import EVENT_GRID_APP_ID, EVENT_GRID_ROLE
from ringfence.clouds.azure.ingest import AzureEvents
from ringfence.clouds.azure.wiring import Azure, AzureConfig
from ringfence.local.azure_arm import ArmServer
from ringfence.local.azure_estate import SUB, seed_vm, vm_id
from ringfence.local.wiring import LocalWiring

from .conftest import PROD_WEB

TENANT = "72f988bf-0000-4000-8000-000000000001"
AUDIENCE = "api://ringfence-events"
VM = "9d000000-0000-4000-8000-00000000e001"
KEY = rsa.generate_private_key(public_exponent=65537, key_size=2048)
OTHER_KEY = rsa.generate_private_key(public_exponent=65537, key_size=2048)
# another application of the tenant: given the Event Grid role (as Microsoft's setup gives it to
# subscription writers), it obtains tokens for our audience signed by the tenant's key
OTHER_APP = "0f1e2d3c-0000-4000-8000-00000000a11e"
V2_ISSUER = f"https://login.microsoftonline.com/{TENANT}/v2.0"


@pytest.fixture(scope="module")
def jwks_url() -> Iterator[str]:
    jwk = json.loads(jwt.algorithms.RSAAlgorithm.to_jwk(KEY.public_key()))
    body = json.dumps({"keys": [{**jwk, "kid": "k1", "use": "sig", "alg": "RS256"}]}).encode()

    class Handler(BaseHTTPRequestHandler):
        def log_message(self, *a: Any) -> None:
            return None

        def do_GET(self) -> None:
            self.send_response(200)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

    server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    yield f"http://127.0.0.1:{server.server_address[1]}/{TENANT}/discovery/v2.0/keys"
    server.shutdown()
    server.server_close()


def token(key: rsa.RSAPrivateKey = KEY, kid: str = "k1", **over: Any) -> str:
    now = int(time.time())
    claims = {
        "aud": AUDIENCE,
        "iss": f"https://sts.windows.net/{TENANT}/",
        "iat": now,
        "nbf": now,
        "exp": now + 600,
        "roles": [EVENT_GRID_ROLE],
        "appid": EVENT_GRID_APP_ID,
        **over,
    }
    return jwt.encode(claims, key, algorithm="RS256", headers={"kid": kid})


def events_with(arm: ArmServer, azure: Azure, wiring: LocalWiring, env: dict[str, str]) -> AzureEvents:
    """The service configured as ``ringfence serve`` and the azureevents function are: from the environment."""
    seed_vm(arm, "web-1", VM, "10.20.1.4", PROD_WEB)
    cfg = AzureConfig.from_env(
        {"RINGFENCE_AZURE_SUBSCRIPTIONS": SUB, "RINGFENCE_AZURE_ARM_URL": arm.url}
        | {"RINGFENCE_EVENTGRID_TENANT": TENANT, "RINGFENCE_EVENTGRID_AUDIENCE": AUDIENCE}
        | env
    )
    return AzureEvents(wiring, Azure(cfg, azure.credential))


@pytest.fixture
def events(arm: ArmServer, azure: Azure, wiring: LocalWiring, jwks_url: str) -> AzureEvents:
    return events_with(arm, azure, wiring, {"RINGFENCE_EVENTGRID_JWKS_URL": jwks_url})


def deliver(events: AzureEvents, bearer: str | None) -> Any:
    ev = {
        "id": "w1",
        "subject": vm_id("web-1"),
        "eventType": "Microsoft.Resources.ResourceWriteSuccess",
        "eventTime": "2026-12-02T14:00:00Z",
        "data": {"operationName": "Microsoft.Compute/virtualMachines/write", "resourceUri": vm_id("web-1")},
    }
    headers = {"aeg-event-type": "Notification"} | ({"Authorization": f"Bearer {bearer}"} if bearer else {})
    return events.handle(headers, json.dumps([ev]).encode())


def test_a_delivery_with_event_grids_token_is_taken(events: AzureEvents, wiring: LocalWiring) -> None:
    r = deliver(events, token())
    assert r.status == 200 and r.body["changed"] == [VM]


@pytest.mark.parametrize(
    ("bearer", "why"),
    [
        (None, "no bearer token"),
        (lambda: token(OTHER_KEY), "Signature verification failed"),
        (lambda: token(aud="api://something-else"), "Audience"),
        (lambda: token(iss="https://sts.windows.net/another-tenant/"), "issuer"),
        (lambda: token(exp=int(time.time()) - 60), "expired"),
        (lambda: token(roles=[]), EVENT_GRID_ROLE),
        (lambda: jwt.encode({"aud": AUDIENCE}, None, algorithm="none"), "refused"),
    ],
    ids=["missing", "foreign-key", "audience", "issuer", "expired", "no-role", "alg-none"],
)
def test_attack_event_grid_token_refused(events: AzureEvents, wiring: LocalWiring, bearer: Any, why: str) -> None:
    r = deliver(events, bearer() if callable(bearer) else bearer)
    assert r.status == 401 and why.lower() in str(r.body["detail"]).lower()
    assert wiring.store.get(VM) is None


@pytest.mark.parametrize(
    "claims",
    [
        {"appid": OTHER_APP},  # v1 token of another application
        {"ver": "1.0", "appid": OTHER_APP, "azp": EVENT_GRID_APP_ID},  # v1: azp is not a v1 claim
        {"ver": "2.0", "iss": V2_ISSUER, "azp": OTHER_APP, "appid": None},  # v2 token of another application
        {"ver": "2.0", "iss": V2_ISSUER, "azp": OTHER_APP, "appid": EVENT_GRID_APP_ID},  # v2: appid is not a v2 claim
        {"appid": None},  # no client application named
    ],
    ids=["v1-other-app", "v1-azp-ignored", "v2-other-app", "v2-appid-ignored", "no-app"],
)
def test_attack_token_of_another_application_in_the_tenant_is_refused(
    events: AzureEvents, wiring: LocalWiring, claims: dict[str, Any]
) -> None:
    """A token signed by the tenant's key, for our audience and issuer, unexpired and with Event
    Grid's app role, but obtained by another application of the tenant: refused, nothing stored.
    The same token from Event Grid's application (v1 appid, v2 azp) is taken."""
    r = deliver(events, token(**claims))
    assert r.status == 401, r.body
    assert "not event grid's" in str(r.body["detail"]).lower()
    assert wiring.store.get(VM) is None
    v2 = claims.get("ver") == "2.0"
    ok = {**claims, **({"azp": EVENT_GRID_APP_ID} if v2 else {"appid": EVENT_GRID_APP_ID})}
    r = deliver(events, token(**ok))
    assert r.status == 200 and r.body["changed"] == [VM], r.body


def test_event_grids_application_id_is_configured_by_environment(
    arm: ArmServer, azure: Azure, wiring: LocalWiring, jwks_url: str
) -> None:
    """RINGFENCE_EVENTGRID_APP_ID (a sovereign cloud's Event Grid): that application is pinned and
    the public cloud's one is refused; unset or empty, the documented public one."""
    assert AzureConfig.from_env({}).eventgrid_app_id == EVENT_GRID_APP_ID
    assert AzureConfig.from_env({"RINGFENCE_EVENTGRID_APP_ID": ""}).eventgrid_app_id == EVENT_GRID_APP_ID
    sovereign = "5bd8b6a2-0000-4000-8000-0000000000c1"
    events = events_with(
        arm, azure, wiring, {"RINGFENCE_EVENTGRID_JWKS_URL": jwks_url, "RINGFENCE_EVENTGRID_APP_ID": sovereign}
    )
    assert deliver(events, token()).status == 401
    assert wiring.store.get(VM) is None
    assert deliver(events, token(appid=sovereign.upper())).status == 200


def test_entra_keys_unreachable_answers_503_so_event_grid_retries(
    arm: ArmServer, azure: Azure, wiring: LocalWiring, jwks_url: str
) -> None:
    """The tenant's signing keys cannot be fetched (Entra ID unreachable): Event Grid's genuine
    token is neither taken nor refused. The delivery is answered 503 with Retry-After (Event Grid
    retries it; a 401 it would drop), nothing is stored, and once the keys are reachable the same
    delivery is taken."""
    import socket

    s = socket.socket()
    s.bind(("127.0.0.1", 0))
    down = f"http://127.0.0.1:{s.getsockname()[1]}/{TENANT}/discovery/v2.0/keys"
    s.close()
    r = deliver(events_with(arm, azure, wiring, {"RINGFENCE_EVENTGRID_JWKS_URL": down}), token())
    assert r.status == 503 and r.headers["Retry-After"] == "30", r.body
    assert "keys unavailable" in str(r.body["detail"]).lower()
    assert wiring.store.get(VM) is None
    # a forged token still gets its 401 from the keys once they are reachable, and the genuine one is taken
    up = events_with(arm, azure, wiring, {"RINGFENCE_EVENTGRID_JWKS_URL": jwks_url})
    assert deliver(up, token(OTHER_KEY)).status == 401
    assert deliver(up, token()).status == 200
