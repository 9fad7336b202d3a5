"""Compute Engine instances → inventory records, with the label source of every reserved key.

GCP instance labels and network tags are writable by anyone holding ``compute.instances.setLabels``
/ ``setTags`` on the VM, with no control per key. Secure tags (Resource Manager tags bound to the VM)
are governed by IAM per tag value (``roles/resourcemanager.tagUser``). So the label source is a
choice (:class:`LabelSource`): ``secure-tags`` (the default: reserved keys come only from tag
bindings, reserved instance labels are ignored), ``labels``, or ``both`` (a secure tag wins over a
label of the same key).

GCP keys cannot hold ``:``: the reserved prefix ``ringfence:`` is written ``ringfence-`` on GCP
(label ``ringfence-role=web``, secure tag key ``ringfence-role``) and mapped back here, so the
policy's mapping and governance are the same as on AWS. Where each reserved key came from is kept
in the record's tags as ``gcp:source:<key>`` (``label``, or ``secure-tag <namespaced value>``):
GCP keys cannot contain ``:``, so nothing on the VM can set or spoof those.
"""

from __future__ import annotations

import enum
import re
import time
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from google.api_core.exceptions import NotFound

from ringfence.labels import LabelMapper
from ringfence.model import Workload
from ringfence.store.base import InventoryRecord

from .clients import RETRY, Endpoints

DEFAULT_PREFIX = "ringfence:"
SOURCE_TAG = "gcp:source:"
MIG_TAG = "gcp:instance-group-manager"
# GCE instance status → the inventory's states (ACTIVE_STATES are pending and running)
STATES = {
    "PROVISIONING": "pending",
    "STAGING": "pending",
    "RUNNING": "running",
    "STOPPING": "stopping",
    "SUSPENDING": "stopping",
    "SUSPENDED": "stopped",
    "TERMINATED": "stopped",  # GCE's TERMINATED is a stopped VM; a deleted one is not found
    "REPAIRING": "pending",
}
_MIG = re.compile(r"instanceGroupManagers/([^/@]+)")


class LabelSource(enum.StrEnum):
    SECURE_TAGS = "secure-tags"
    LABELS = "labels"
    BOTH = "both"


@dataclass(frozen=True)
class SecureTag:
    key: str  # short name of the tag key (ringfence-role)
    value: str  # short name of the tag value (web)
    namespaced: str  # ORG_OR_PROJECT/key/value
    parent: str  # the tag key's parent (organizations/123, projects/p)
    value_id: str = ""  # tagValues/N: how an audit entry may name the value


def gcp_prefix(prefix: str) -> str:
    return re.sub(r"[^a-z0-9_-]", "-", prefix.lower())


def canonical_tags(
    labels: Mapping[str, str],
    secure: Sequence[SecureTag],
    source: LabelSource,
    prefix: str = DEFAULT_PREFIX,
) -> dict[str, str]:
    """The workload's tags as the label mapper reads them: reserved keys in their policy form
    (``ringfence:role``) from the configured source, other labels as they are, and the source of
    each reserved key under ``gcp:source:<key>``."""
    gp = gcp_prefix(prefix)
    out: dict[str, str] = {}
    sources: dict[str, str] = {}
    for k, v in sorted(labels.items()):
        if k.startswith(gp):
            if source is LabelSource.SECURE_TAGS:
                continue  # reserved, and labels carry none: not even visible as a tag
            key = prefix + k[len(gp) :]
            out[key], sources[key] = v, "label"
        else:
            out[k] = v
    if source is not LabelSource.LABELS:
        for t in sorted(secure, key=lambda t: t.namespaced):
            if t.key.startswith(gp):
                key = prefix + t.key[len(gp) :]
                out[key], sources[key] = t.value, f"secure-tag {t.namespaced}"
    out.update({SOURCE_TAG + k: v for k, v in sources.items()})
    return out


def secure_tags(effective: Sequence[Any], parents: Sequence[str]) -> list[SecureTag]:
    """Effective tags (``EffectiveTag`` messages or dicts) → :class:`SecureTag`, only those whose
    tag key is defined under one of ``parents`` (``tagKeyParentName``: ``organizations/N`` or
    ``projects/NUMBER``); none without parents. A project owner can create a key of the same short
    name in their own project: only the configured parents' keys are trusted."""
    out = []
    for e in effective:
        get = e.get if isinstance(e, Mapping) else lambda k, _e=e: getattr(_e, _snake(k))
        nk, nv, parent = str(get("namespacedTagKey")), str(get("namespacedTagValue")), str(get("tagKeyParentName"))
        if parent not in parents:
            continue
        key = nk.rsplit("/", 1)[-1]
        value = nv.rsplit("/", 1)[-1]
        out.append(SecureTag(key, value, nv, parent, str(get("tagValue") or "")))
    return out


def _snake(name: str) -> str:
    return re.sub(r"([A-Z])", lambda m: "_" + m[1].lower(), name)


def short(url: str | None) -> str | None:
    return url.rsplit("/", 1)[-1] if url else None


def instance_ips(inst: Mapping[str, Any]) -> list[str]:
    """Internal IPv4 and IPv6 of every interface, nic0 first; external IPs are not identity."""
    ips: list[str] = []
    for nic in inst.get("networkInterfaces", []):
        for k in ("networkIP", "ipv6Address"):
            if nic.get(k):
                ips.append(nic[k])
    return list(dict.fromkeys(ips))


def instance_group(inst: Mapping[str, Any]) -> str | None:
    """The managed instance group that created the VM (its ``created-by`` metadata), or None."""
    for item in inst.get("metadata", {}).get("items", []):
        if item.get("key") == "created-by" and (m := _MIG.search(str(item.get("value", "")))):
            return m[1]
    return None


def zone_of(inst: Mapping[str, Any]) -> str:
    return str(short(inst.get("zone")) or "")


def to_record(
    inst: Mapping[str, Any],
    project: str,
    observed_at: float,
    *,
    secure: Sequence[SecureTag] = (),
    source: LabelSource = LabelSource.SECURE_TAGS,
    mapper: LabelMapper | None = None,
) -> InventoryRecord:
    """An instance (compute v1 JSON) → an inventory record; ``id`` is the numeric instance id."""
    zone = zone_of(inst)
    state = STATES.get(str(inst.get("status", "RUNNING")), "running")
    prefix = mapper.key_prefix if mapper is not None else DEFAULT_PREFIX
    tags = canonical_tags(inst.get("labels", {}) or {}, secure, source, prefix)
    if mig := instance_group(inst):
        tags[MIG_TAG] = mig
    nics = inst.get("networkInterfaces", [])
    w = Workload(
        id=str(inst["id"]),
        name=inst.get("name"),
        ips=instance_ips(inst) if state != "terminated" else [],
        tags=tags,
        cloud="gcp",
        account=project,
        region=zone.rsplit("-", 1)[0] if zone else None,
        zone=zone or None,
        vpc=short(nics[0].get("network")) if nics else None,
        subnet=short(nics[0].get("subnetwork")) if nics else None,
        observed_at=observed_at,
    )
    labels: dict[str, str] = {}
    problems: list[str] = []
    if mapper is not None:
        res = mapper.resolve(w)
        labels, problems = res.labels, [p.message for p in res.problems]
    return InventoryRecord(id=w.id, workload=w, state=state, observed_at=observed_at, labels=labels, problems=problems)


def tombstone(instance_id: str, project: str, zone: str | None, observed_at: float) -> InventoryRecord:
    region = zone.rsplit("-", 1)[0] if zone else None
    w = Workload(id=instance_id, cloud="gcp", account=project, region=region, zone=zone, observed_at=observed_at)
    return InventoryRecord(id=instance_id, workload=w, state="terminated", observed_at=observed_at)


def as_dict(message: Any) -> dict[str, Any]:
    """A compute v1 proto-plus message → its REST JSON (the wire names: ``networkIP``, ``labels``)."""
    if isinstance(message, dict):
        return message
    cls = type(message)
    out: dict[str, Any] = cls.to_dict(message, use_integers_for_enums=False, preserving_proto_field_name=False)
    return out


class Instances:
    """Reads instances and their secure tags through the real SDK clients (secure tags only of tag
    keys under ``tag_parents``: none without)."""

    def __init__(self, endpoints: Endpoints, tag_parents: Sequence[str] = ()) -> None:
        self.endpoints = endpoints
        self.tag_parents = tuple(tag_parents)
        self._instances: Any = None
        self._tags: dict[str | None, Any] = {}

    @property
    def client(self) -> Any:
        if self._instances is None:
            self._instances = self.endpoints.instances()
        return self._instances

    def get(self, project: str, zone: str, instance: str) -> dict[str, Any] | None:
        """The instance by name, or None when no VM of that name is in the zone (a name is not a
        VM: one renamed or deleted, a VM created since under it; :meth:`by_id` names one VM)."""
        try:
            return as_dict(self.client.get(project=project, zone=zone, instance=instance, retry=RETRY))
        except NotFound:
            return None

    def by_id(self, project: str, zone: str, instance_id: str) -> dict[str, Any] | None:
        """The instance of numeric id ``instance_id`` in ``zone``, or None when the zone has none
        (the VM was deleted: an id is never reused, nor does a VM change zone). ``instances.get``
        documents a name, so the zone is listed with the AIP-160 filter ``id = N``
        (https://cloud.google.com/compute/docs/reference/rest/v1/instances/list, ``filter``). A
        zone that does not exist answers 404, raised: it says nothing about the VM."""
        if not instance_id.isdigit():
            raise ValueError(f"not a numeric instance id: {instance_id!r}")
        query = {"project": project, "zone": zone, "filter": f"id = {instance_id}"}
        for inst in self.client.list(request=query, retry=RETRY):
            found = as_dict(inst)
            if str(found.get("id")) == instance_id:
                return found
        return None

    def all(self, project: str) -> Iterator[dict[str, Any]]:
        """Every instance of the project (aggregated list over all zones, every page)."""
        yield from (inst for _, inst in self.listing(project)[0])

    def listing(self, project: str) -> tuple[list[tuple[float, dict[str, Any]]], set[str] | None]:
        """Every instance the project's aggregated list answers (every page), each with when the
        page holding it returned (what it shows was so by then; no later call made it), and the zones it
        could not reach (``unreachables``, or a scope's ``UNREACHABLE`` warning): their VMs are not
        in the list and say nothing about being deleted. Only those: the other warnings a scope
        answers (``NO_RESULTS_ON_PAGE``, ``DEPRECATED_RESOURCE_USED``…) come with the scope's VMs,
        or say it has none, so a VM missing from such a scope is deleted. None instead of zones
        where an unreachable scope names no zone (a region, global…): which VMs were left out is
        then unknown."""
        pager = self.client.aggregated_list(project=project, retry=RETRY)
        found: list[tuple[float, dict[str, Any]]] = []
        unreachable: set[str] | None = set()
        for page in pager.pages:  # each fetched as it is reached
            read_at = now()
            scopes = [str(s) for s in page.unreachables]
            for scope, scoped in page.items.items():
                found += [(read_at, as_dict(inst)) for inst in scoped.instances]
                warning = scoped.warning if "warning" in scoped else None
                if warning is not None and warning.code == "UNREACHABLE":
                    scopes.append(str(scope))
            for scope in scopes:
                zone = re.fullmatch(r"(?:.*/)?zones/([^/]+)", scope)
                if zone is None:
                    unreachable = None
                elif unreachable is not None:
                    unreachable.add(zone[1])
        return found, unreachable

    def secure_tags(self, project_number: int, inst: Mapping[str, Any]) -> list[SecureTag]:
        """The VM's effective secure tags (bound to it or inherited), from its zone's endpoint."""
        zone = zone_of(inst)
        if self.endpoints.resource_manager is not None:
            zone_key: str | None = None  # one endpoint for every location (tests, the lab)
        else:
            zone_key = zone
        client = self._tags.get(zone_key)
        if client is None:
            client = self._tags[zone_key] = self.endpoints.tag_bindings(zone_key)
        parent = f"//compute.googleapis.com/projects/{project_number}/zones/{zone}/instances/{inst['id']}"
        return secure_tags(list(client.list_effective_tags(parent=parent, retry=RETRY)), self.tag_parents)


def now() -> float:
    return time.time()
