"""Azure configuration (environment) → ARM clients per subscription; attaching Azure to a wiring."""

from __future__ import annotations

import os
from collections.abc import Mapping
from dataclasses import dataclass, field

from azure.core.credentials import TokenCredential

from ringfence.control.wiring import BaseWiring

from .arm import Arm, default_credential
from .entra import EVENT_GRID_APP_ID


@dataclass
class AzureConfig:
    # the subscriptions this control plane governs: events and enrollments of others are refused
    subscriptions: list[str] = field(default_factory=list)
    # ARM's endpoint: unset in Azure; the local ARM server in tests and the lab
    arm_url: str | None = None
    # the secret Event Grid sends with each delivery (a delivery property header, docs/deploy-azure.md)
    eventgrid_secret: str = ""
    # PEM roots the IMDS attested document's signer must chain to (azure-attested enrollment)
    attested_roots_pem: str = ""
    # Entra ID tokens on deliveries (Event Grid's secure webhook): the tenant and the app's id or URI
    eventgrid_tenant: str = ""
    eventgrid_audience: str = ""
    eventgrid_jwks_url: str | None = None
    # the application that must have obtained the token (appid / azp): Event Grid's service principal
    eventgrid_app_id: str = EVENT_GRID_APP_ID

    @classmethod
    def from_env(cls, env: Mapping[str, str] | None = None) -> AzureConfig:
        e = os.environ if env is None else env
        return cls(
            subscriptions=[
                s.strip().lower() for s in e.get("RINGFENCE_AZURE_SUBSCRIPTIONS", "").split(",") if s.strip()
            ],
            arm_url=e.get("RINGFENCE_AZURE_ARM_URL") or None,
            eventgrid_secret=e.get("RINGFENCE_EVENTGRID_SECRET", ""),
            attested_roots_pem=e.get("RINGFENCE_AZURE_ATTESTED_ROOTS", ""),
            eventgrid_tenant=e.get("RINGFENCE_EVENTGRID_TENANT", ""),
            eventgrid_audience=e.get("RINGFENCE_EVENTGRID_AUDIENCE", ""),
            eventgrid_jwks_url=e.get("RINGFENCE_EVENTGRID_JWKS_URL") or None,
            eventgrid_app_id=e.get("RINGFENCE_EVENTGRID_APP_ID") or EVENT_GRID_APP_ID,
        )

    def governs(self, subscription: str) -> bool:
        return subscription.lower() in self.subscriptions


class Azure:
    """The Azure side of a control plane: configuration and the ARM clients of each subscription."""

    def __init__(self, cfg: AzureConfig, credential: TokenCredential | None = None) -> None:
        self.cfg = cfg
        self.credential = credential
        self._arms: dict[str, Arm] = {}

    def arm(self, subscription: str) -> Arm:
        key = subscription.lower()
        if key not in self._arms:
            if self.credential is None:
                self.credential = default_credential(self.cfg.arm_url)
            self._arms[key] = Arm(self.credential, subscription, self.cfg.arm_url)
        return self._arms[key]


def attach(w: BaseWiring, azure: Azure, read_unseen: bool = True) -> None:
    """Offer the ``azure-attested`` enrollment on ``w`` (enabled where ``enroll_methods`` names it);
    ``read_unseen``: a VM not in the inventory yet is read from ARM (else refused until its event)."""
    from .enroll import AzureAttested

    w.enrollers["azure-attested"] = AzureAttested(azure, read_unseen=read_unseen)
