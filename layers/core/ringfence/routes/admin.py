"""The admin API's routes: provision policy, set modes, quarantine/release, bind privileged label
values, mint pairing keys, reset an agent key —
over an :class:`Admin` service; with an ``onprem`` service also register, import (CMDB CSV) and
deregister on-premise workloads (both hosts pass one: ``ringfence serve`` and the AWS admin
function, so on-premise hosts join either control plane). Each action is audited with the caller's
principal, read from ``requestContext.identity.userArn``: API Gateway puts the IAM caller there
(the admin API uses IAM auth); ``ringfence serve`` puts the principal of the admin token there.

Each route is open to some admin roles only (:mod:`ringfence.adminroles`); the host says which
roles the caller holds (``roles_of``): on AWS from the IAM caller's binding, under ``ringfence
serve`` from the admin token. A refusal is a 403, audited as ``admin.denied``."""

# no `from __future__ import annotations`: the event handler reads the route signatures' types
from collections.abc import Callable
from typing import Annotated, Literal

from aws_lambda_powertools.event_handler import APIGatewayRestResolver
from aws_lambda_powertools.event_handler import Response as HttpResponse
from aws_lambda_powertools.event_handler.openapi.models import APIKey, APIKeyIn
from aws_lambda_powertools.event_handler.openapi.params import Body, Query
from aws_lambda_powertools.utilities.data_classes import APIGatewayProxyEvent

from ringfence import adminapi
from ringfence.adminroles import AdminRole, RoleBindings, may, parse_roles
from ringfence.clouds.onprem import OnPremAdmin
from ringfence.control.admin import Admin
from ringfence.control.api import Response, error
from ringfence.control.findings import DEFAULT_BOUND, FindingsResponse
from ringfence.control.governance import bind_labels, unbind_labels
from ringfence.control.wiring import NotQueued
from ringfence.governance import NotGranted
from ringfence.store.base import ConflictError, InventoryRecord, WorkloadChanged

from .common import ADMIN_STORE_FAILED, answers, http, resolver

_NO_BODY = adminapi.Reason()
# what a status means on the admin API where the agent API's wording does not fit
ADMIN_ERRORS = {
    409: "nothing was done: what the request depends on changed meanwhile, or does not allow it "
    "(no active policy, a workload of another source, a CMDB file with errors); detail says which",
}

# a change refused because the workload is not the one the request read (deregistered, registered
# again, or governed anew meanwhile): the operator's change must not land on another host
CHANGED = "workload changed meanwhile: nothing set"
CHANGED_MEANING = (
    "nothing was done: the on-premise workload was deregistered, registered again (another host under "
    "its id) or governed anew since the request read it (detail names it; the refused attempt is audited, then "
    "`<action>.failed`): read it again and send the request again if it still applies"
)

NOT_QUEUED = (
    "compute could not be queued: the change is stored and audited (detail names its record; or, a "
    "revocation naming no grant, nothing was changed by this request) but bundles and peers' sets do not "
    "follow it yet; send the same request again (it stores the same and queues compute)"
)


def unavailable(not_queued: str | None = None) -> str:
    """A route's 503: the store failed (every route, under ``ringfence serve``) and, for a route
    that stores a change and then queues compute, ``not_queued`` (:func:`not_queued`'s answer)."""
    if not_queued is None:
        return ADMIN_STORE_FAILED
    return f"either {not_queued} (`error` ends `compute not queued: send the request again`); or {ADMIN_STORE_FAILED}"


def grants_answer(wid: str, rec: InventoryRecord, audit_id: str, **extra: object) -> Response:
    """A binding's or revocation's 200: the workload's grants and labels after it (``extra``: what
    the route adds, in front of them)."""
    body = {
        "workload_id": wid,
        **extra,
        "label_grants": dict(rec.workload.label_grants),
        "labels": rec.labels,
        "held": rec.workload.held_labels is not None,
        "audit_id": audit_id,
    }
    return Response(200, body)


def not_queued(exc: NotQueued) -> Response:
    """503 for a change stored whose compute message failed (``exc.done``: "bound", "quarantined",
    "registered", ...; with no ``exc.audit_id``, a request that changed nothing, e.g. a revocation
    naming no grant, perhaps stored by its earlier try): the caller learns what is stored but not
    enforced and sends the request again, which queues compute, instead of taking a bare 500 for
    "nothing done". Every route that stores and then queues answers it (one exception handler)."""
    if exc.audit_id is None:
        title = "compute not queued: send the request again"
        stored = f"{exc.target}: {exc.done}, and compute could not be queued"
    else:
        title = f"{exc.done}; compute not queued: send the request again"
        stored = f"{exc.target}: {exc.done} and audited (audit record {exc.audit_id}), but compute could not be queued"
    return error(
        503,
        title,
        f"{stored} ({exc.cause}): bundles and peers' sets may not follow what is stored until compute runs; "
        f"{exc.again}",
    )


def outcome(status: int) -> str:
    """The metric an admin answer counts toward (the Lambda function publishes it)."""
    return "AdminActions" if status < 400 else "AdminRequestsRefused"


# each route's action and the target its refusal is audited against ("<wid>": the path's):
# checked before a body or query that does not validate is answered, so a caller without the
# role gets the audited 403, never a 422 describing what the route would take
ROUTE_ACTIONS: dict[tuple[str, str], tuple[str, str]] = {
    ("GET", "/admin/map"): ("map.read", "map"),
    ("GET", "/admin/suggest"): ("suggest.read", "suggest"),
    ("GET", "/admin/findings"): ("findings.read", "findings"),
    ("POST", "/admin/policies"): ("policy.provision", "policy"),
    ("PUT", "/admin/workloads/<wid>/mode"): ("workload.mode", "<wid>"),
    ("PUT", "/admin/workloads/<wid>/labels"): ("label.bind", "<wid>"),
    ("DELETE", "/admin/workloads/<wid>/labels"): ("label.unbind", "<wid>"),
    ("POST", "/admin/workloads/<wid>/quarantine"): ("workload.quarantine", "<wid>"),
    ("DELETE", "/admin/workloads/<wid>/quarantine"): ("workload.release", "<wid>"),
    ("POST", "/admin/pairing-keys"): ("pairing.create", ""),
    ("DELETE", "/admin/workloads/<wid>/pairing-keys"): ("pairing.revoke", "<wid>"),
    ("DELETE", "/admin/workloads/<wid>/agent-key"): ("agent-key.reset", "<wid>"),
    ("POST", "/admin/workloads"): ("workload.register", ""),
    ("POST", "/admin/workloads/import"): ("workload.import", "cmdb"),
    ("DELETE", "/admin/workloads/<wid>"): ("workload.deregister", "<wid>"),
}


RolesOf = Callable[[APIGatewayProxyEvent], frozenset[AdminRole]]
# where ``ringfence serve`` puts the roles of the admin token (as a Lambda authorizer's context
# would be): never from anything the client sent
TOKEN_ROLES_KEY = "ringfence_roles"  # noqa: S105 (a key name, no secret)


def iam_roles(bindings: RoleBindings) -> RolesOf:
    """AWS: the IAM caller's roles, by its binding (``RINGFENCE_ADMIN_ROLES``)."""
    return lambda event: bindings.roles(event.request_context.identity.user_arn)


def token_roles(event: APIGatewayProxyEvent) -> frozenset[AdminRole]:
    """``ringfence serve``: the roles the admin token carries."""
    ctx = (event.raw_event.get("requestContext") or {}).get("authorizer") or {}
    return parse_roles([r for r in str(ctx.get(TOKEN_ROLES_KEY, "")).split(",") if r], "admin token")


def admin_routes(
    service: Callable[[], Admin], onprem: Callable[[], OnPremAdmin] | None = None, *, roles_of: RolesOf
) -> APIGatewayRestResolver:
    """The admin API over ``service()`` (called per request: hosts build the service lazily).
    With ``onprem``, the on-premise workload routes too (every host passes it: ``ringfence serve``
    and the AWS admin function).
    ``roles_of`` says which admin roles the caller of the current request holds."""
    app = resolver(
        "Ringfence admin API",
        "Operator actions, each audited with the caller's principal. On AWS: IAM (SigV4) "
        "authentication; under `ringfence serve`: a bearer admin token.",
        {"sigv4": APIKey(name="Authorization", in_=APIKeyIn.header, description="SigV4 (AWS) or Bearer (serve)")},
    )

    def principal() -> str:
        ident = app.current_event.request_context.identity
        return ident.user_arn or ident.caller or "unknown"

    def refused(action: str, target: str) -> HttpResponse[str] | None:
        """None when the caller's roles allow ``action``; else the audited 403."""
        held = roles_of(app.current_event)
        if may(held, action):
            return None
        return http(service().denied(principal(), action, target, sorted(r.value for r in held)))

    def refused_before_validation() -> HttpResponse[str] | None:
        route = app.context.get("_route")
        gate = ROUTE_ACTIONS.get((route.method, route.path)) if route is not None else None
        if gate is None:
            return None
        action, target = gate
        if target == "<wid>":
            target = str(app.context.get("_route_args", {}).get("wid", ""))
        return refused(action, target)

    app.before_invalid = refused_before_validation

    def stored_not_queued(exc: NotQueued) -> HttpResponse[str]:
        return http(not_queued(exc))

    # any route's change stored whose compute message failed: one answer for all of them
    app.exception_handler(NotQueued)(stored_not_queued)

    def may_bind() -> bool:
        """The caller may bind privileged label values (a policy author): a registration's tags
        that set one grant it; anyone else's are held until a policy author binds them."""
        return may(roles_of(app.current_event), "label.bind")

    @app.get(
        "/admin/map",
        summary="the application dependency map (as `ringfence map`): HTML (one self-contained file), SVG or DOT — any role",
        responses={
            **answers(errors=(400, 409, 503), meaning={**ADMIN_ERRORS, 503: unavailable()}),
            200: {"description": "the map", "content": {"text/html": {}, "image/svg+xml": {}, "text/vnd.graphviz": {}}},
        },
        security=[{"sigv4": []}],
    )
    def dependency_map(
        format: Annotated[
            Literal["html", "svg", "dot"],
            Query(description="html: interactive; svg: static, laid out server-side; dot: graphviz text"),
        ] = "html",
        app_: Annotated[str | None, Query(alias="app", description="only edges with this app at either end")] = None,
        env: Annotated[str | None, Query(description="only edges with this env at either end")] = None,
        decision: Annotated[
            Literal["allowed", "potentially-blocked", "blocked", "unknown"] | None, Query(description="only these")
        ] = None,
        min_flows: Annotated[int, Query(ge=0, description="only edges with at least this many flows")] = 0,
    ) -> HttpResponse[str]:
        denied = refused("map.read", "map")
        if denied:
            return denied
        out = service().dependency_map(format, app_, env, decision, min_flows)
        if not isinstance(out, tuple):
            return http(out)
        return HttpResponse(status_code=200, content_type=out[0], body=out[1])

    @app.get(
        "/admin/suggest",
        summary="rule suggestions from observed flows (as `ringfence suggest`): label-level rules, the tests "
        "pinning them, lateral movement flagged — any role",
        responses=answers(
            adminapi.SuggestResponse,
            errors=(400, 409, 503),
            meaning={
                **ADMIN_ERRORS,
                503: unavailable(),
                422: "a query field is invalid, or the suggestion does not load with the policy (a row naming a "
                "label value the policy no longer allows): detail says why",
            },
        ),
        security=[{"sigv4": []}],
    )
    def suggest(
        app_: Annotated[str, Query(alias="app", min_length=1, description="the app whose flows (either end) to read")],
        env: Annotated[str | None, Query(description="only flows with this env at the app's end")] = None,
        min_flows: Annotated[int, Query(ge=0, description="only flow rows with at least this many flows")] = 0,
        include_allowed: Annotated[bool, Query(description="pin flows already allowed with tests too")] = False,
    ) -> HttpResponse[str]:
        return refused("suggest.read", app_) or http(service().suggest(app_, env, min_flows, include_allowed))

    @app.get(
        "/admin/findings",
        summary="effective policy, checked (as `ringfence findings`): agents silent, not enforcing the newest "
        "bundle within the bound, whose kernel holds something else, or that repaired a tamper within a day; and every "
        "enrolled workload's agent with agents=true (its version, last heartbeat, the revision it enforces) — any role",
        responses=answers(FindingsResponse, errors=(503,), meaning={503: unavailable()}),
        security=[{"sigv4": []}],
    )
    def findings(
        bound: Annotated[
            float, Query(gt=0, le=86400, description="seconds allowed after a publish and between heartbeats")
        ] = DEFAULT_BOUND,
        agents: Annotated[
            bool,
            Query(
                description="also list every enrolled workload's agent (its version, last heartbeat, the revision it "
                "enforces); one entry per workload"
            ),
        ] = False,
    ) -> HttpResponse[str]:
        return refused("findings.read", "findings") or http(service().findings(bound, agents))

    @app.post(
        "/admin/policies",
        summary="provision a policy version (its tests must pass against the live inventory) — policy-author",
        responses=answers(
            adminapi.ProvisionResponse,
            201,
            errors=(400, 409, 503),
            meaning={
                **ADMIN_ERRORS,
                422: "a field of the request is missing or invalid (detail names each, dotted), a key given twice "
                "(body: duplicate key 'files'), or the policy's "
                "tests fail against the live inventory (`policy tests fail`, detail lists them): nothing stored",
                503: unavailable(
                    NOT_QUEUED + "; the same files again, while that version is still the active one, create no "
                    "new version and queue the rebuild (answered 200 naming it; a later provisioning queues it itself)"
                ),
            },
        ),
        security=[{"sigv4": []}],
    )
    def provision(req: adminapi.ProvisionRequest) -> HttpResponse[str]:
        return refused("policy.provision", "policy") or http(service().provision(principal(), req.files, req.reason))

    @app.put(
        "/admin/workloads/<wid>/mode",
        summary="set a workload's mode (idle, observe, enforce) or clear it — policy-author",
        responses=answers(
            adminapi.ModeResponse,
            errors=(404, 409, 503),
            meaning={409: CHANGED_MEANING, 503: unavailable(NOT_QUEUED)},
        ),
        security=[{"sigv4": []}],
    )
    def set_mode(wid: str, req: adminapi.ModeRequest) -> HttpResponse[str]:
        return refused("workload.mode", wid) or http(service().set_mode(principal(), wid, req.mode, req.reason))

    @app.put(
        "/admin/workloads/<wid>/labels",
        summary="bind privileged label values to a workload (an audited admin binding: the values need no "
        "tagger, a hold they clear is lifted, compute is queued); reason required — policy-author",
        responses=answers(
            adminapi.BindLabelsResponse,
            errors=(400, 404, 409, 503),
            meaning={**ADMIN_ERRORS, 503: unavailable(NOT_QUEUED)},
        ),
        security=[{"sigv4": []}],
    )
    def bind_workload_labels(wid: str, req: adminapi.BindLabelsRequest) -> HttpResponse[str]:
        denied = refused("label.bind", wid)
        if denied:
            return denied
        try:  # every refusal below is raised before anything is written
            rec, audit_id = bind_labels(service().w, wid, req.labels, principal(), req.reason)
        except KeyError:
            return http(error(404, "unknown workload", wid))
        except ValueError as exc:
            return http(error(400, "binding refused", str(exc)))
        except WorkloadChanged as exc:
            return http(error(409, CHANGED, str(exc)))
        except ConflictError as exc:
            return http(error(409, "workload changed meanwhile", str(exc)))
        return http(grants_answer(wid, rec, audit_id))

    @app.delete(
        "/admin/workloads/<wid>/labels",
        summary="take back a workload's grants of privileged label values (named by dimension, all or none; "
        "audited): a value its tags still ask for is held again, compute is queued; reason required — policy-author",
        responses=answers(
            adminapi.UnbindLabelsResponse,
            errors=(400, 404, 409, 503),
            meaning={
                409: "nothing was done: a dimension named holds no grant (detail names the grants the workload "
                "holds; compute is queued all the same, so a revocation stored by an earlier try is enforced), "
                "or the workload changed meanwhile (try again)",
                503: unavailable(NOT_QUEUED),
            },
        ),
        security=[{"sigv4": []}],
    )
    def unbind_workload_labels(wid: str, req: adminapi.UnbindLabelsRequest) -> HttpResponse[str]:
        denied = refused("label.unbind", wid)
        if denied:
            return denied
        try:  # every refusal below is raised before anything is written
            rec, audit_id, revoked = unbind_labels(service().w, wid, req.dimensions, principal(), req.reason)
        except KeyError:
            return http(error(404, "unknown workload", wid))
        except NotGranted as exc:
            # compute was queued all the same: a retry of a revocation stored by the first try
            return http(error(409, "no such grant", f"{exc}; compute is queued, so what is stored is enforced"))
        except ValueError as exc:
            return http(error(400, "revocation refused", str(exc)))
        except WorkloadChanged as exc:
            return http(error(409, CHANGED, str(exc)))
        except ConflictError as exc:
            return http(error(409, "workload changed meanwhile", str(exc)))
        return http(grants_answer(wid, rec, audit_id, revoked=revoked))

    @app.post(
        "/admin/workloads/<wid>/quarantine",
        summary="quarantine a workload: it and its peers cut it off — incident-responder",
        responses=answers(
            adminapi.QuarantineResponse,
            errors=(404, 409, 503),
            meaning={409: CHANGED_MEANING, 503: unavailable(NOT_QUEUED)},
        ),
        security=[{"sigv4": []}],
    )
    def quarantine(wid: str, req: Annotated[adminapi.Reason | None, Body()] = None) -> HttpResponse[str]:
        return refused("workload.quarantine", wid) or http(
            service().quarantine(principal(), wid, True, (req or _NO_BODY).reason)
        )

    @app.delete(
        "/admin/workloads/<wid>/quarantine",
        summary="release a workload from quarantine — incident-responder",
        responses=answers(
            adminapi.QuarantineResponse,
            errors=(404, 409, 503),
            meaning={409: CHANGED_MEANING, 503: unavailable(NOT_QUEUED)},
        ),
        security=[{"sigv4": []}],
    )
    def release(wid: str, req: Annotated[adminapi.Reason | None, Body()] = None) -> HttpResponse[str]:
        return refused("workload.release", wid) or http(
            service().quarantine(principal(), wid, False, (req or _NO_BODY).reason)
        )

    @app.post(
        "/admin/pairing-keys",
        summary="mint a pairing key (use-limited, expiring) for on-premise enrollment — onboarding",
        responses=answers(
            adminapi.PairingKeyResponse,
            201,
            errors=(400, 409, 503),
            meaning={409: "`not an on-premise workload`, or " + CHANGED_MEANING, 503: unavailable()},
        ),
        security=[{"sigv4": []}],
    )
    def pairing_key(req: adminapi.PairingKeyRequest) -> HttpResponse[str]:
        return refused("pairing.create", req.workload_id or "") or http(
            service().pairing_key(principal(), req.workload_id, req.uses, req.ttl, req.reason)
        )

    @app.delete(
        "/admin/workloads/<wid>/pairing-keys",
        summary="revoke every pairing key issued for a workload, used up or not — onboarding",
        responses=answers(
            adminapi.PairingKeysRevokedResponse,
            errors=(404, 409, 503),
            meaning={409: CHANGED_MEANING, 503: unavailable()},
        ),
        security=[{"sigv4": []}],
    )
    def revoke_pairing_keys(wid: str, req: Annotated[adminapi.Reason | None, Body()] = None) -> HttpResponse[str]:
        return refused("pairing.revoke", wid) or http(
            service().revoke_pairing_keys(principal(), wid, (req or _NO_BODY).reason)
        )

    @app.delete(
        "/admin/workloads/<wid>/agent-key",
        summary="reset a workload's agent key and revoke its token: an agent that lost its key enrolls again — onboarding",
        responses=answers(
            adminapi.AgentKeyResetResponse, errors=(404, 409, 503), meaning={409: CHANGED_MEANING, 503: unavailable()}
        ),
        security=[{"sigv4": []}],
    )
    def reset_agent_key(
        wid: str, req: Annotated[adminapi.AgentKeyResetRequest | None, Body()] = None
    ) -> HttpResponse[str]:
        body = req or adminapi.AgentKeyResetRequest()
        return refused("agent-key.reset", wid) or http(
            service().reset_agent_key(principal(), wid, body.reason, body.next_agent_key)
        )

    if onprem is None:
        return app

    @app.post(
        "/admin/workloads",
        summary="register (or update) an on-premise workload — onboarding; a privileged "
        "label value its tags set is held (answered under `held`) unless the caller may bind it (policy-author)",
        responses=answers(
            adminapi.RegisterWorkloadResponse,
            201,
            errors=(400, 409, 503),
            meaning={
                409: ADMIN_ERRORS[409] + "; `workload changed meanwhile: nothing registered`: the id was "
                "registered (or governed) anew since the request read it, nothing written (`workload.register` "
                "audited, then `workload.register.failed`): send it again",
                503: unavailable(NOT_QUEUED + "; a registration again is answered 200, created false"),
            },
        ),
        security=[{"sigv4": []}],
    )
    def register_workload(req: adminapi.RegisterWorkloadRequest) -> HttpResponse[str]:
        return refused("workload.register", req.id) or http(
            onprem().register_workload(principal(), req, req.reason, may_bind=may_bind(), strict=req.strict)
        )

    @app.post(
        "/admin/workloads/import",
        summary="register every workload of a CMDB CSV export, or none (errors as file:line:column) — onboarding",
        responses=answers(
            adminapi.CmdbImportResponse,
            errors=(400, 409, 503),
            meaning={
                409: ADMIN_ERRORS[409] + "; `CMDB file rejected: nothing imported` (a row names a cloud instance), "
                "`address in use: nothing imported`, `a workload changed meanwhile: import the file again` (a row's "
                "id was registered or governed anew since the request read it: nothing written, `workload.import` "
                "audited, then `workload.import.failed`); but `CMDB file partly imported: import it again` (DynamoDB "
                "only): the rows it names were written and handed to compute, the rest not (`workload.import.partial`)",
                503: unavailable(NOT_QUEUED),
            },
        ),
        security=[{"sigv4": []}],
    )
    def import_cmdb(req: adminapi.CmdbImportRequest) -> HttpResponse[str]:
        return refused("workload.import", req.source or "cmdb") or http(
            onprem().import_cmdb(principal(), req.csv, req.source, req.reason, may_bind=may_bind(), strict=req.strict)
        )

    @app.delete(
        "/admin/workloads/<wid>",
        summary="deregister an on-premise workload: it leaves every peer's sets — onboarding",
        responses=answers(
            adminapi.DeregisterResponse,
            errors=(404, 409, 503),
            meaning={
                409: "`not an on-premise workload` (a cloud instance's id: nothing done), or `"
                + CHANGED
                + "` (`workload.deregister` audited, then `workload.deregister.failed`): "
                + CHANGED_MEANING,
                503: unavailable(NOT_QUEUED),
            },
        ),
        security=[{"sigv4": []}],
    )
    def deregister_workload(wid: str, req: Annotated[adminapi.Reason | None, Body()] = None) -> HttpResponse[str]:
        return refused("workload.deregister", wid) or http(
            onprem().deregister_workload(principal(), wid, (req or _NO_BODY).reason)
        )

    return app
