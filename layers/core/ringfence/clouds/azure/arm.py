"""The Azure Resource Manager clients (azure-mgmt-compute, azure-mgmt-network) per subscription.

Every ARM call goes through here, so tests run the same code against
:class:`ringfence.local.azure_arm.ArmServer`: ``base_url`` names it, and a plain ``http://`` loopback
URL gets a bearer policy that allows http (azure-core refuses bearer tokens over http, rightly,
everywhere else). Results leave this module in ARM's wire format (``as_dict()``: camelCase, as
ARM's REST API returns them), so one parser (:mod:`.model`) reads lists and single reads alike.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Any

from azure.core.credentials import AccessToken, TokenCredential
from azure.core.exceptions import ResourceNotFoundError
from azure.core.paging import ItemPaged
from azure.core.pipeline import PipelineRequest
from azure.core.pipeline.policies import SansIOHTTPPolicy
from azure.mgmt.compute import ComputeManagementClient
from azure.mgmt.network import NetworkManagementClient

ARM_SCOPE = "https://management.azure.com/.default"


class StaticTokenCredential:
    """A fixed bearer token (tests, the lab): what ``get_token`` of any TokenCredential returns."""

    def __init__(self, token: str, lifetime: int = 3600) -> None:
        self.token = token
        self.lifetime = lifetime

    def get_token(self, *scopes: str, **kwargs: Any) -> AccessToken:
        return AccessToken(self.token, int(time.time()) + self.lifetime)


class _LoopbackBearer(SansIOHTTPPolicy[Any, Any]):
    """Bearer authentication to a local ARM over http (loopback only; see :func:`_is_loopback`)."""

    def __init__(self, credential: TokenCredential) -> None:
        self.credential = credential

    def on_request(self, request: PipelineRequest[Any]) -> None:
        token = self.credential.get_token(ARM_SCOPE).token
        request.http_request.headers["Authorization"] = f"Bearer {token}"


def _is_loopback(url: str) -> bool:
    return url.startswith(("http://127.0.0.1:", "http://localhost:", "http://[::1]:"))


LOCAL_ARM_TOKEN = "local-arm"  # noqa: S105 (what a local ARM gets: not a secret, and no real token)


def default_credential(base_url: str | None = None) -> TokenCredential:
    """In Azure: the managed identity (or whatever azure-identity's chain finds). For a local ARM
    on loopback over http (``RINGFENCE_AZURE_ARM_URL`` of the lab, ``ringfence serve`` in the demo):
    a fixed token — a real one must never go out over plain http."""
    if base_url is not None and _is_loopback(base_url):
        return StaticTokenCredential(LOCAL_ARM_TOKEN)
    from azure.identity import DefaultAzureCredential

    return DefaultAzureCredential()


@dataclass
class Arm:
    """The ARM clients of one subscription."""

    credential: TokenCredential
    subscription: str
    base_url: str | None = None
    _compute: ComputeManagementClient | None = field(default=None, repr=False)
    _network: NetworkManagementClient | None = field(default=None, repr=False)

    def _kwargs(self) -> dict[str, Any]:
        kw: dict[str, Any] = {}
        if self.base_url:
            kw["base_url"] = self.base_url
            if _is_loopback(self.base_url):
                kw["authentication_policy"] = _LoopbackBearer(self.credential)
                kw["polling_interval"] = 0
        return kw

    @property
    def compute(self) -> ComputeManagementClient:
        if self._compute is None:
            self._compute = ComputeManagementClient(self.credential, self.subscription, **self._kwargs())
        return self._compute

    @property
    def network(self) -> NetworkManagementClient:
        if self._network is None:
            self._network = NetworkManagementClient(self.credential, self.subscription, **self._kwargs())
        return self._network

    # --- reads, in wire format

    def vms(self) -> list[Page]:
        return pages(self.compute.virtual_machines.list_all())

    def nics(self) -> list[dict[str, Any]]:
        return [wire(n) for n in self.network.network_interfaces.list_all()]

    def scale_sets(self) -> list[dict[str, Any]]:
        return [wire(s) for s in self.compute.virtual_machine_scale_sets.list_all()]

    def scale_set_vms(self, group: str, scale_set: str) -> list[Page]:
        return pages(self.compute.virtual_machine_scale_set_vms.list(group, scale_set))

    def scale_set_nics(self, group: str, scale_set: str) -> list[dict[str, Any]]:
        ops = self.network.network_interfaces
        return [wire(n) for n in ops.list_virtual_machine_scale_set_network_interfaces(group, scale_set)]

    def vm(self, group: str, name: str) -> dict[str, Any] | None:
        try:
            return wire(self.compute.virtual_machines.get(group, name))
        except ResourceNotFoundError:
            return None

    def scale_set_vm(self, group: str, scale_set: str, instance: str) -> dict[str, Any] | None:
        try:
            return wire(self.compute.virtual_machine_scale_set_vms.get(group, scale_set, instance))
        except ResourceNotFoundError:
            return None

    def nic(self, group: str, name: str) -> dict[str, Any] | None:
        try:
            return wire(self.network.network_interfaces.get(group, name))
        except ResourceNotFoundError:
            return None

    def scale_set_vm_nics(self, group: str, scale_set: str, instance: str) -> list[dict[str, Any]]:
        ops = self.network.network_interfaces
        return [wire(n) for n in ops.list_virtual_machine_scale_set_vm_network_interfaces(group, scale_set, instance)]


@dataclass(frozen=True)
class Page:
    """One page of a listing and when it had returned: what it shows was so by then, and no call
    made after then can have made it (the evidence time of each VM it holds)."""

    read_at: float
    items: list[dict[str, Any]]


def pages(listing: ItemPaged[Any]) -> list[Page]:
    """Every page of ``listing``, each dated when it returned (``by_page`` fetches a page as it is
    reached)."""
    out = []
    for page in listing.by_page():
        items = [wire(v) for v in page]
        out.append(Page(time.time(), items))
    return out


def wire(model: Any) -> dict[str, Any]:
    """An SDK model as ARM sent it (camelCase keys)."""
    out = model.as_dict()
    assert isinstance(out, dict)
    return out
