"""EC2 instances → inventory records; the Auto Scaling lifecycle call."""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable, Iterator
from typing import Any

from botocore.exceptions import ClientError

from ringfence.groupcommit import GroupCommit
from ringfence.labels import LabelMapper
from ringfence.model import Workload
from ringfence.store.base import InventoryRecord

log = logging.getLogger(__name__)


def instance_tags(inst: dict[str, Any]) -> dict[str, str]:
    return {t["Key"]: t.get("Value", "") for t in inst.get("Tags", []) if not t["Key"].startswith("aws:")}


def instance_ips(inst: dict[str, Any]) -> list[str]:
    """Private IPv4 and IPv6 of every interface (primary first); public IPs are not identity."""
    ips: list[str] = []
    for eni in sorted(inst.get("NetworkInterfaces", []), key=lambda e: e.get("Attachment", {}).get("DeviceIndex", 0)):
        for a in eni.get("PrivateIpAddresses", []):
            if a.get("PrivateIpAddress"):
                ips.append(a["PrivateIpAddress"])
        for a in eni.get("Ipv6Addresses", []):
            if a.get("Ipv6Address"):
                ips.append(a["Ipv6Address"])
    if not ips and inst.get("PrivateIpAddress"):
        ips.append(inst["PrivateIpAddress"])
    return list(dict.fromkeys(ips))


def to_record(
    inst: dict[str, Any], account: str, region: str, observed_at: float, mapper: LabelMapper | None = None
) -> InventoryRecord:
    state = inst.get("State", {}).get("Name", "running")
    tags = instance_tags(inst)
    w = Workload(
        id=inst["InstanceId"],
        name=tags.get("Name"),
        ips=instance_ips(inst) if state not in ("terminated",) else [],
        tags=tags,
        cloud="aws",
        account=account,
        region=region,
        zone=inst.get("Placement", {}).get("AvailabilityZone"),
        vpc=inst.get("VpcId"),
        subnet=inst.get("SubnetId"),
        observed_at=observed_at,
    )
    return InventoryRecord.observed(w, state, observed_at, mapper)


def tombstone(instance_id: str, account: str, region: str, observed_at: float) -> InventoryRecord:
    w = Workload(id=instance_id, cloud="aws", account=account, region=region, observed_at=observed_at)
    return InventoryRecord(id=instance_id, workload=w, state="terminated", observed_at=observed_at)


def describe(
    ec2: Any, instance_ids: list[str], before_call: Callable[[], None] | None = None
) -> dict[str, dict[str, Any]]:
    """Live instances by id (missing ids are gone). Throttling is retried by the client config.
    ``before_call`` runs before each call and may raise to stop (a batch's deadline: one unknown
    id among many is a call per id)."""
    out: dict[str, dict[str, Any]] = {}
    for i in range(0, len(instance_ids), 200):
        chunk = instance_ids[i : i + 200]
        if before_call is not None and i:
            before_call()
        try:
            pages = ec2.get_paginator("describe_instances").paginate(InstanceIds=chunk)
            for page in pages:
                for res in page.get("Reservations", []):
                    for inst in res.get("Instances", []):
                        out[inst["InstanceId"]] = inst
        except ClientError as exc:
            if exc.response.get("Error", {}).get("Code") != "InvalidInstanceID.NotFound":
                raise
            for iid in chunk:  # one unknown id fails the whole call: fall back to one by one
                if before_call is not None:
                    before_call()
                try:
                    for page in ec2.get_paginator("describe_instances").paginate(InstanceIds=[iid]):
                        for res in page.get("Reservations", []):
                            for inst in res.get("Instances", []):
                                out[inst["InstanceId"]] = inst
                except ClientError as exc2:
                    if exc2.response.get("Error", {}).get("Code") != "InvalidInstanceID.NotFound":
                        raise
    return out


class LiveInstances:
    """One live instance at a time (``one``), as of a DescribeInstances call made after the
    question was asked; the questions that come while a call is in flight share the next call
    (a :class:`~ringfence.groupcommit.GroupCommit` per account and Region).

    Why: every enrollment checks with EC2 that its instance runs with the document's address, and
    a scale-out's agents enroll together. One call each was 50 DescribeInstances calls in a
    50-instance scale-out, and EC2 rate-limits the API per account: a storm's enrollments would
    throttle each other and the functions' own describes. No answer is older than its question:
    a call that began before a thread asked never answers it."""

    def __init__(self, client_for: Callable[[str, str], Any]) -> None:
        self.client_for = client_for
        self._groups: dict[tuple[str, str], GroupCommit[str, dict[str, Any] | None]] = {}
        self._lock = threading.Lock()

    def one(self, account: str, region: str, instance_id: str) -> dict[str, Any] | None:
        """The DescribeInstances item of ``instance_id`` (None: EC2 does not know it any more)."""
        key = (account, region)
        with self._lock:
            group = self._groups.get(key)
            if group is None:
                group = self._groups[key] = GroupCommit(lambda ids: self._describe(key, ids))
        return group.commit(instance_id)

    @property
    def calls(self) -> int:
        """Describe calls made (questions asked minus this is what sharing saved)."""
        with self._lock:
            return sum(g.writes for g in self._groups.values())

    @property
    def queued(self) -> int:
        """Questions waiting for the call in flight to end."""
        with self._lock:
            return sum(g.queued for g in self._groups.values())

    def _describe(self, key: tuple[str, str], ids: list[str]) -> list[dict[str, Any] | None]:
        live = describe(self.client_for(*key), sorted(set(ids)))
        return [live.get(i) for i in ids]


def all_instances(ec2: Any) -> Iterator[dict[str, Any]]:
    for page in ec2.get_paginator("describe_instances").paginate():
        for res in page.get("Reservations", []):
            yield from res.get("Instances", [])


def now() -> float:
    return time.time()


def complete_lifecycle(asg: Any, hook: str, group: str, token: str, instance_id: str, result: str = "CONTINUE") -> None:
    asg.complete_lifecycle_action(
        LifecycleHookName=hook,
        AutoScalingGroupName=group,
        LifecycleActionToken=token,
        LifecycleActionResult=result,
        InstanceId=instance_id,
    )


# Auto Scaling's lifecycle states of an instance on its way out (Terminating:Wait while a terminate
# hook holds it, still running in EC2)
LEAVING_STATES = frozenset({"Terminating", "Terminating:Wait", "Terminating:Proceed", "Terminated"})


def leaving_groups(asg: Any, instance_ids: list[str]) -> dict[str, str]:
    """Instance id → its Auto Scaling group, for the instances Auto Scaling is terminating now.
    An id it does not know, or knows in any other lifecycle state, is absent."""
    out: dict[str, str] = {}
    for i in range(0, len(instance_ids), 50):  # DescribeAutoScalingInstances takes at most 50 ids
        pages = asg.get_paginator("describe_auto_scaling_instances").paginate(InstanceIds=instance_ids[i : i + 50])
        for page in pages:
            for inst in page.get("AutoScalingInstances", []):
                if inst.get("LifecycleState") in LEAVING_STATES:
                    out[inst["InstanceId"]] = inst["AutoScalingGroupName"]
    return out
