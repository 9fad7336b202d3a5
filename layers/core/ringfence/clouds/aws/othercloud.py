"""Azure and GCP served from AWS Lambda: their configuration from the function's environment with
the secrets read by reference (Secrets Manager ARNs, never the values in the environment), and the
agent API's ``azure-attested`` / ``gcp-jwt`` enrollers when the stack configures them.

The Azure and Google SDKs are imported only when their cloud is configured: the functions carry
their dependency layers only then (template.yaml ``EnableAzureLayer`` / ``EnableGcpLayer``).
"""

from __future__ import annotations

import json
import os
from collections.abc import Mapping
from typing import TYPE_CHECKING, Any

from ringfence.control.wiring import BaseWiring

from . import clients

if TYPE_CHECKING:
    from ringfence.clouds.azure.wiring import Azure

# the environment names a secret by ARN; the function reads its value at cold start
EVENTGRID_SECRET_ARN = "RINGFENCE_EVENTGRID_SECRET_ARN"  # noqa: S105 (a variable name)
AZURE_CREDENTIALS_ARN = "RINGFENCE_AZURE_CREDENTIALS_SECRET_ARN"


class SecretConfigError(ValueError):
    """A referenced secret is missing or not of the documented shape (named, never its value)."""


def secret_value(arn: str) -> str:
    out = clients.client("secretsmanager").get_secret_value(SecretId=arn)
    value = out.get("SecretString")
    if not value:
        raise SecretConfigError(f"secret {arn} has no SecretString")
    return str(value)


def azure_from_env(env: Mapping[str, str] | None = None) -> Azure:
    """The Azure side from ``RINGFENCE_AZURE_*`` with the Event Grid delivery secret and the
    service principal's credentials read from Secrets Manager (``RINGFENCE_EVENTGRID_SECRET_ARN``;
    ``RINGFENCE_AZURE_CREDENTIALS_SECRET_ARN``: JSON ``{"tenant_id", "client_id", "client_secret"}``,
    docs/deploy-azure.md). Without a credentials secret, azure-identity's own chain is used."""
    from ringfence.clouds.azure.wiring import Azure, AzureConfig

    e = dict(os.environ if env is None else env)
    if e.get(EVENTGRID_SECRET_ARN):
        e["RINGFENCE_EVENTGRID_SECRET"] = secret_value(e[EVENTGRID_SECRET_ARN])
    credential: Any = None
    if e.get(AZURE_CREDENTIALS_ARN):
        arn = e[AZURE_CREDENTIALS_ARN]
        try:
            sp = json.loads(secret_value(arn))
            tenant, client, secret = sp["tenant_id"], sp["client_id"], sp["client_secret"]
        except (ValueError, KeyError, TypeError) as exc:
            raise SecretConfigError(
                f"secret {arn}: expected JSON with tenant_id, client_id, client_secret ({type(exc).__name__})"
            ) from None
        from azure.identity import ClientSecretCredential

        credential = ClientSecretCredential(tenant, client, secret)
    return Azure(AzureConfig.from_env(e), credential)


def cloud_enrollers(w: BaseWiring, env: Mapping[str, str] | None = None) -> dict[str, Any]:
    """Offer the other clouds' enrollments on the AWS agent API where the stack configures them:
    ``azure-attested`` (on ``w``; VMs already in the inventory only) when
    ``RINGFENCE_AZURE_SUBSCRIPTIONS`` is set and the method is enabled; ``gcp-jwt`` (returned, for :class:`~ringfence.control.agents.AgentApi`) when
    ``RINGFENCE_GCP_PROJECTS`` and the identity token audience are set and the method is enabled."""
    e = os.environ if env is None else env
    methods = set(w.cfg.enroll_methods)
    given: dict[str, Any] = {}
    if e.get("RINGFENCE_AZURE_SUBSCRIPTIONS") and "azure-attested" in methods:
        from ringfence.clouds.azure.wiring import Azure, AzureConfig, attach

        # the attested document is checked offline; the VM must be in the inventory already (its
        # Event Grid event came through azureevents): the internet-facing agent API holds no Azure
        # credentials and may read no secret (it shares the signing-key boundary: test_attack_signing)
        attach(w, Azure(AzureConfig.from_env(e)), read_unseen=False)
    if e.get("RINGFENCE_GCP_PROJECTS") and "gcp-jwt" in methods:
        from ringfence.clouds.gcp.config import GcpConfig
        from ringfence.clouds.gcp.enroll import METHOD, GcpEnroller

        cfg = GcpConfig.from_env(e)
        if cfg.identity_audience:
            given[METHOD] = GcpEnroller(w, cfg)
    return given
