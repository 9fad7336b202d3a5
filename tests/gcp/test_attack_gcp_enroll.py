"""Enrollment with the GCP instance identity token (gcp-jwt): verified (Google's JWKS — here the
local stand-in's key —, iss, aud, exp, format=full claims), each token accepted once, bound to the
agent's key as aws-iid is; the VM read live through the real compute client."""

from __future__ import annotations

from typing import Any

import pytest

from ringfence.agentapi import EnrollRequest
from ringfence.clouds.gcp.enroll import METHOD, GcpEnroller
from ringfence.control.agents import AgentApi
from ringfence.local.gcp_api import GcpApi, SigningKey, identity_claims
from ringfence.local.gcp_project import IDENTITY_AUDIENCE, NUMBER, PROJECT, ZONE, gcp_config
from ringfence.local.wiring import LocalWiring
from tests.aws.test_pipeline import AgentKey
from tests.gcp.conftest import web_vm


@pytest.fixture
def api(gcp: GcpApi, wiring: LocalWiring) -> AgentApi:
    return AgentApi(wiring, {METHOD: GcpEnroller(wiring, gcp_config(gcp))})


def vm(gcp: GcpApi) -> dict[str, Any]:
    return web_vm(gcp, "10.30.0.5")


def token(gcp: GcpApi, inst: dict[str, Any], signer: SigningKey | None = None, **override: Any) -> str:
    claims = {**identity_claims(inst, PROJECT, NUMBER, IDENTITY_AUDIENCE), **override}
    return (signer or gcp.key).sign(claims)


def enroll(api: AgentApi, wid: str, document: str, key: AgentKey, claimed: str | None = None) -> tuple[int, Any]:
    nonce = api.nonce().body["nonce"]  # type: ignore[index]
    req = EnrollRequest(
        method="gcp-jwt",
        nonce=nonce,
        workload_id=claimed,
        document=document,
        agent_key=key.pem,
        agent_signature=key.prove("enroll", wid, nonce),
    )
    r = api.enroll(req)
    return r.status, r.body


def test_an_identity_token_enrolls_its_vm_and_binds_the_agent_key(
    gcp: GcpApi, wiring: LocalWiring, api: AgentApi
) -> None:
    inst = vm(gcp)
    status, body = enroll(api, inst["id"], token(gcp, inst), AgentKey())
    assert status == 200, body
    assert body["workload_id"] == inst["id"] and body["token"]
    rec = wiring.store.get(inst["id"])
    assert rec is not None and rec.enrolled and rec.labels["role"] == "web"
    assert wiring.store.agent_key(inst["id"]) is not None


def test_attack_gcp_replayed_identity_token_is_refused(gcp: GcpApi, api: AgentApi) -> None:
    inst = vm(gcp)
    key = AgentKey()
    jwt = token(gcp, inst)
    assert enroll(api, inst["id"], jwt, key)[0] == 200
    status, body = enroll(api, inst["id"], jwt, key)  # the same token again, even with the bound key
    assert status == 401 and "already used" in body["detail"]


def test_attack_gcp_captured_token_with_another_agent_key_is_refused(gcp: GcpApi, api: AgentApi) -> None:
    inst = vm(gcp)
    assert enroll(api, inst["id"], token(gcp, inst), AgentKey())[0] == 200
    status, body = enroll(
        api, inst["id"], token(gcp, inst, iat=identity_claims(inst, PROJECT, NUMBER, "x")["iat"] + 1), AgentKey()
    )
    assert status == 401 and "another agent key" in body["detail"]


def test_attack_gcp_identity_token_for_another_audience_is_refused(gcp: GcpApi, api: AgentApi) -> None:
    inst = vm(gcp)
    status, body = enroll(api, inst["id"], token(gcp, inst, aud="https://other-service.example"), AgentKey())
    assert status == 401 and "another audience" in body["detail"]


def test_attack_gcp_identity_token_by_a_foreign_signer_is_refused(gcp: GcpApi, api: AgentApi) -> None:
    inst = vm(gcp)
    for signer in (SigningKey(), SigningKey(kid=gcp.key.kid)):  # unknown key id; known id, other key
        status, body = enroll(api, inst["id"], token(gcp, inst, signer=signer), AgentKey())
        assert status == 401, body
        assert "signed by a key" in body["detail"] or "invalid" in body["detail"].lower()


def test_attack_gcp_token_for_another_instance_is_refused(gcp: GcpApi, wiring: LocalWiring, api: AgentApi) -> None:
    mine, other = vm(gcp), vm(gcp)
    key = AgentKey()
    # the agent on `mine` claims `other`'s identity with its own token
    status, body = enroll(api, mine["id"], token(gcp, mine), key, claimed=other["id"])
    assert status == 401 and f"is for instance {mine['id']}" in body["detail"]
    # a token whose claims name an instance id that is not the VM of that name
    forged = identity_claims(other, PROJECT, NUMBER, IDENTITY_AUDIENCE)
    forged["google"]["compute_engine"]["instance_name"] = mine["name"]
    status, body = enroll(api, other["id"], gcp.key.sign(forged), key)
    assert status == 401 and "is not running" in body["detail"]
    assert wiring.store.agent_key(other["id"]) is None


@pytest.mark.parametrize(
    ("override", "detail"),
    [
        ({"exp": 1000, "iat": 0}, "expired"),
        ({"iss": "https://evil.example"}, "invalid"),
        ({"google": None}, "format=full"),
    ],
)
def test_attack_gcp_expired_foreign_issuer_or_thin_tokens_are_refused(
    gcp: GcpApi, api: AgentApi, override: dict[str, Any], detail: str
) -> None:
    inst = vm(gcp)
    status, body = enroll(api, inst["id"], token(gcp, inst, **override), AgentKey())
    assert status == 401 and detail in body["detail"].lower(), body


def test_attack_gcp_token_of_an_unserved_project_or_a_deleted_vm_is_refused(gcp: GcpApi, api: AgentApi) -> None:
    inst = vm(gcp)
    status, body = enroll(
        api,
        inst["id"],
        token(
            gcp,
            inst,
            google={
                "compute_engine": {
                    **identity_claims(inst, PROJECT, NUMBER, "x")["google"]["compute_engine"],
                    "project_id": "elsewhere",
                }
            },
        ),
        AgentKey(),
    )
    assert status == 401 and "elsewhere" in body["detail"]
    gone = vm(gcp)
    jwt = token(gcp, gone)
    gcp.delete_instance(PROJECT, ZONE, gone["name"])
    status, body = enroll(api, gone["id"], jwt, AgentKey())
    assert status == 401 and "not running" in body["detail"]


def test_gcp_jwt_is_refused_where_it_is_not_enabled(gcp: GcpApi, wiring: LocalWiring) -> None:
    inst = vm(gcp)
    wiring.cfg.enroll_methods.remove("gcp-jwt")
    try:
        api = AgentApi(wiring, {METHOD: GcpEnroller(wiring, gcp_config(gcp))})
        status, body = enroll(api, inst["id"], token(gcp, inst), AgentKey())
    finally:
        wiring.cfg.enroll_methods.append("gcp-jwt")
    assert status == 400 and "not enabled" in body["detail"]


def test_the_agents_gcp_jwt_prover_enrolls_through_the_metadata_server(gcp: GcpApi, api: AgentApi) -> None:
    from ringfence_agent import enroll as agent_enroll

    inst = vm(gcp)
    gcp.serve_metadata_as(PROJECT, inst)
    try:
        nonce = api.nonce().body["nonce"]  # type: ignore[index]
        wire = agent_enroll.gcp_jwt(IDENTITY_AUDIENCE, gcp.url)(nonce)
    finally:
        gcp.serve_metadata_as(PROJECT, None)
    key = AgentKey()
    body = {**wire.to_json(), "agent_key": key.pem, "agent_signature": key.prove("enroll", inst["id"], nonce)}
    r = api.enroll(EnrollRequest.model_validate(body))
    assert r.status == 200, r.body
    assert r.body["workload_id"] == inst["id"]  # type: ignore[index]
