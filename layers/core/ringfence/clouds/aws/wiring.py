"""The AWS wiring: DynamoDB store, S3 publisher, SQS queues, the signing key, EC2 and Auto Scaling clients."""

from __future__ import annotations

import json
import uuid
from collections.abc import Iterable
from functools import partial
from typing import Any

from ringfence.control.changes import MovedSince, StoreChanges
from ringfence.control.groupsend import GroupSend, merge_compute
from ringfence.control.publish import Notifier
from ringfence.control.wiring import BaseWiring, Config, NoSigningKey
from ringfence.events import UnservedAccount
from ringfence.perimeter import PerimeterRoleMissing

from . import clients, ec2
from .enroll import RoleTrust, enroll_iid, enroll_sts
from .publish import S3Publisher, WebSocketNotifier
from .reportquota import TableReportQuota

# a compute message's ids: at most this many, and its body at most this many bytes (JSON, ASCII
# escaped), well under SQS's 256 KiB: ids are counted by their encoded size too, not only their
# number (an id of control characters is escaped six bytes to one)
COMPUTE_IDS_PER_MESSAGE = 500
COMPUTE_MESSAGE_BYTES = 192 * 1024


def compute_id_chunks(message: dict[str, Any]) -> list[list[str]]:
    """``message``'s ids cut into the ids of the messages that carry them (each with the rest of
    ``message``): at most :data:`COMPUTE_IDS_PER_MESSAGE` each and a body within
    :data:`COMPUTE_MESSAGE_BYTES` (at least one id each); one empty chunk for a message of none."""
    ids: list[str] = message["ids"]
    budget = COMPUTE_MESSAGE_BYTES - len(json.dumps({**message, "ids": []}))
    chunks: list[list[str]] = [[]]
    size = 0
    for i in ids:
        cost = len(json.dumps(i)) + 2  # the id and its ", "
        if chunks[-1] and (len(chunks[-1]) >= COMPUTE_IDS_PER_MESSAGE or size + cost > budget):
            chunks.append([])
            size = 0
        chunks[-1].append(i)
        size += cost
    return chunks


class LifecycleRoleMissing(Exception):
    """A member account's lifecycle action with no lifecycle role configured to complete it."""


class Wiring(BaseWiring):
    """Shared clients and adapters, built once per container."""

    enroll_records_instance = False  # the agent-API role may not (tests/aws/test_function_iam.py)

    def __init__(self, cfg: Config) -> None:
        from ringfence.store.dynamodb import DynamoStore

        self._ddb = clients.resource("dynamodb")
        store = DynamoStore(
            cfg.inventory_table, cfg.state_table, cfg.audit_table, resource=self._ddb, owed_writer=cfg.owed_writer
        )
        super().__init__(cfg, store, S3Publisher(clients.client("s3"), cfg.bucket, cfg.kms_key_id))
        # what one workload's token may report (the agent API's reports route; serve's is in memory)
        self.report_quota = TableReportQuota.from_env(store.state)
        self.sqs = clients.client("sqs")
        self._signer: Any = None
        self._home_account: str | None = None
        self.changes = StoreChanges(
            self.store.head, cfg.wait_poll_interval, MovedSince(self.store.moved_after, self.store.published_after)
        )
        # what enrollments ask EC2, shared by the concurrent ones (serve's threads, a fleet booting)
        self.live = ec2.LiveInstances(self.ec2_for)
        # aws-sts: each role's trust-policy verdict, kept a minute (enroll.ROLE_TRUST_TTL_S)
        self.role_trust = RoleTrust()
        self.enrollers.update(
            {
                "aws-iid": partial(enroll_iid, live=self.live),
                "aws-sts": partial(enroll_sts, live=self.live, trust=self.role_trust),
            }
        )
        # concurrent requests of one process (serve's threads) share their compute messages
        self._compute_sends = GroupSend(self._deliver_compute, merge_compute)
        # the priority lane's own: an urgent message never waits for (nor merges with) ordinary ones
        self._urgent_sends = GroupSend(self._deliver_urgent, merge_compute)

    @property
    def signer(self) -> Any:
        """The bundle signing key: only the compute function is configured with one (the agent
        API and every other function have no ``RINGFENCE_SIGNING_KEY`` and no IAM to read it)."""
        if self._signer is None:
            if not self.cfg.signing_key_ref:
                raise NoSigningKey("this function has no signing key (RINGFENCE_SIGNING_KEY): only compute signs")
            from .signer import from_reference

            self._signer = from_reference(self.cfg.signing_key_ref, lambda n: clients.client(n))
        return self._signer

    def member_role(self, account: str) -> str | None:
        """The read-only role to assume in ``account`` (``account_roles``), or None for this
        control plane's own account. Any other account raises :class:`UnservedAccount`: its own
        credentials would read this account in its place."""
        role = self.cfg.account_roles.get(account)
        if not role and account != self.home_account:
            raise UnservedAccount(account)
        return role

    def ec2_for(self, account: str, region: str, *, batch: bool = False) -> Any:
        """EC2 in ``account``; ``batch``: a batch's reads, retried only within the read's window
        (:func:`clients.retry_window`), in this account too: whoever throttles EC2 here (its
        operators' load, reconcile, a developer's reads where workloads share the account) would
        otherwise hold up other accounts' events of the batch with the standard retries."""
        role = self.member_role(account)
        return clients.assumed_client("ec2", region, role, batch=batch)

    def perimeter_ec2_for(self, account: str, region: str) -> Any:
        """EC2 in ``account`` with the perimeter's own role there (``perimeter_account_roles``): the
        read-only member role (``account_roles``) never carries security-group writes. A member
        account without a perimeter role is refused, never served with this account's own
        credentials: those would describe the wrong account, take its instances for gone and hand
        their launches on without groups."""
        role = self.cfg.perimeter_account_roles.get(account)
        if not role and account != self.home_account:
            raise PerimeterRoleMissing(
                [
                    f"account {account}: no perimeter role in PerimeterAccountRoles (perimeter_account_roles), so "
                    "its security groups are not managed; add the account's ringfence-member-perimeter role"
                ]
            )
        return clients.assumed_client("ec2", region, role, "ringfence-perimeter")

    @property
    def home_account(self) -> str:
        """The account these functions run in (asked of STS once per process)."""
        if self._home_account is None:
            self._home_account = str(clients.client("sts").get_caller_identity()["Account"])
        return self._home_account

    def autoscaling_for(self, account: str, region: str, *, batch: bool = False) -> Any:
        role = self.member_role(account)  # ``batch`` as in ec2_for
        return clients.assumed_client("autoscaling", region, role, batch=batch)

    def lifecycle_role(self, account: str) -> str | None:
        """The role compute completes ``account``'s lifecycle actions with: None for this
        account; in a member account the lifecycle role of that account (``RINGFENCE_MEMBER_LIFECYCLE_ROLE``,
        which holds CompleteLifecycleAction only and trusts compute only), never the read-only
        member role, never this account's own credentials (they would complete nothing there)."""
        if account == self.home_account:
            return None
        read_only = self.cfg.account_roles.get(account)
        if not read_only:
            raise UnservedAccount(account)
        if not self.cfg.member_lifecycle_role_name:
            raise LifecycleRoleMissing(
                f"account {account}: no member lifecycle role is configured (MemberLifecycleRoleName): its "
                "lifecycle actions are not completed"
            )
        partition = read_only.split(":")[1]
        return f"arn:{partition}:iam::{account}:role/{self.cfg.member_lifecycle_role_name}"

    def complete_lifecycle(self, lc: dict[str, Any], instance_id: str) -> None:
        """CONTINUE the action in the instance's own account and Region (the lifecycle event's)."""
        region = lc.get("region") or None
        role = self.lifecycle_role(str(lc.get("account") or self.home_account))
        ec2.complete_lifecycle(
            clients.assumed_client("autoscaling", region or clients.session().region_name, role, "ringfence-lifecycle")
            if role
            else clients.client("autoscaling", region=region),
            lc["hook_name"],
            lc["group_name"],
            lc["token"],
            instance_id,
            "CONTINUE",
        )

    def default_notifier(self) -> Notifier:
        """The WebSocket API, when one is configured."""
        ws = None
        if self.cfg.websocket_endpoint:
            ws = clients.session().client(
                "apigatewaymanagementapi", endpoint_url=self.cfg.websocket_endpoint, config=clients.RETRIES
            )
        return WebSocketNotifier(ws, self.store)

    def change_mark(self) -> int | None:
        return self.changes.mark()

    def wait_for_change(self, seconds: float, workload_id: str | None = None) -> None:
        """Block until the store may hold something new (for ``workload_id``, when given), at
        most ``seconds``. Nothing in AWS tells a running function of a change: the engine head,
        which every publication moves, is read every poll interval for all waiters of this
        process at once, and the moved records say whom a change concerns."""
        self.changes.wait(seconds, workload_id)

    def close(self) -> None:
        """Done with this wiring (serve shutting down, a test's AWS going away): its change watch
        stops instead of polling a store that may no longer exist, and the store's own client
        closes its pooled connections."""
        self.changes.close()
        self._ddb.meta.client.close()

    def send_compute(self, message: dict[str, Any], *, urgent: bool = False) -> None:
        # urgent: the priority queue (read by the same compute function, which Lambda hands a batch
        # of either queue as it comes), so it never waits behind a storm's backlog on the
        # compute queue; a deployment without one (configured before it existed) has one lane
        if urgent and self.cfg.compute_priority_queue_url:
            self._urgent_sends.send(message)
        else:
            self._compute_sends.send(message)

    def _deliver_urgent(self, messages: list[dict[str, Any]]) -> None:
        self._deliver_compute(messages, self.cfg.compute_priority_queue_url)

    def _deliver_compute(self, messages: list[dict[str, Any]], queue_url: str = "") -> None:
        for message in messages:
            for ids in compute_id_chunks(message):
                self.sqs.send_message(
                    QueueUrl=queue_url or self.cfg.compute_queue_url,
                    MessageBody=json.dumps({**message, "ids": ids}),
                    MessageGroupId="compute",  # one group: compute is serialized
                    MessageDeduplicationId=uuid.uuid4().hex,
                )

    def send_publish(self, message: dict[str, Any]) -> None:
        # a standard queue: jobs are independent (pointers never move backwards), any number of
        # workers take them in parallel
        self.sqs.send_message(QueueUrl=self.cfg.publish_queue_url, MessageBody=json.dumps(message))

    @property
    def has_perimeter(self) -> bool:
        """A perimeter queue is configured (else launch actions go straight to compute)."""
        return bool(self.cfg.perimeter_queue_url)

    def enqueue_perimeter(
        self,
        ids: Iterable[str],
        *,
        lifecycle: dict[str, str] | None = None,
        lifecycles: list[dict[str, Any]] | None = None,
    ) -> bool:
        """Ask the perimeter function to give these workloads' interfaces their groups (and then
        hand ``lifecycle`` / ``lifecycles`` on to compute). False, and nothing sent, if no perimeter
        queue is configured: callers then go straight to compute. Each action travels in the
        message that names its instance, so it is handed on only after that instance's groups."""
        ids = list(dict.fromkeys(ids))
        actions = [*([lifecycle] if lifecycle is not None else []), *(lifecycles or [])]
        if not self.has_perimeter or (not ids and not actions):
            return False
        chunk_of = {iid: n // 500 for n, iid in enumerate(ids)}  # keeps each message well under 256 KiB
        for c in range(max(len(ids) - 1, 0) // 500 + 1):
            mine = [lc for lc in actions if chunk_of.get(lc.get("instance_id", ""), 0) == c]
            body: dict[str, Any] = {"ids": ids[c * 500 : (c + 1) * 500], "lifecycles": mine}
            self.sqs.send_message(QueueUrl=self.cfg.perimeter_queue_url, MessageBody=json.dumps(body))
        return True
