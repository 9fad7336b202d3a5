"""Who may do what through the admin API: four admin roles, each admin action open to some.

- ``policy-author``: provision policy versions, set workload modes (``idle`` among them), bind
  privileged label values to a workload (an admin binding) and take such grants back;
- ``incident-responder``: quarantine and release workloads;
- ``onboarding``: register, import and deregister on-premise workloads, mint pairing keys, reset
  a workload's agent key (an agent that lost its state directory enrolls again);
- ``reader``: none of the above: the read routes only (the dependency map), which every role may read.

A caller holds roles by binding: on AWS the IAM caller's ARN (API Gateway's IAM auth puts it in
``requestContext.identity.userArn``) is looked up in ``RINGFENCE_ADMIN_ROLES`` (JSON
``{"arn:aws:iam::111122223333:role/SecOps": ["incident-responder"], …}``; an assumed-role session
matches its role); under ``ringfence serve`` each admin token carries its roles. Nobody bound,
nothing allowed: a missing or empty binding refuses every action.
"""

from __future__ import annotations

import enum
import json
import os
import re
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field


class AdminRole(enum.StrEnum):
    POLICY_AUTHOR = "policy-author"
    INCIDENT_RESPONDER = "incident-responder"
    ONBOARDING = "onboarding"
    READER = "reader"


# admin action (as audited) → the roles that may take it
ACTIONS: dict[str, frozenset[AdminRole]] = {
    "policy.provision": frozenset({AdminRole.POLICY_AUTHOR}),
    "workload.mode": frozenset({AdminRole.POLICY_AUTHOR}),
    # an admin binding grants one workload a privileged label value (the example's role=jumpbox
    # makes it an SSH peer of every production host): it widens who reaches what, as a policy
    # version does, and the policy author already decides which values are privileged and who
    # may tag them (`taggers`). Incident responders contain (quarantine) rather than widen access.
    "label.bind": frozenset({AdminRole.POLICY_AUTHOR}),
    # taking a grant back narrows who reaches what: the same decision as the grant, the same role
    "label.unbind": frozenset({AdminRole.POLICY_AUTHOR}),
    "workload.quarantine": frozenset({AdminRole.INCIDENT_RESPONDER}),
    "workload.release": frozenset({AdminRole.INCIDENT_RESPONDER}),
    "pairing.create": frozenset({AdminRole.ONBOARDING}),
    "pairing.revoke": frozenset({AdminRole.ONBOARDING}),
    "agent-key.reset": frozenset({AdminRole.ONBOARDING}),
    "workload.register": frozenset({AdminRole.ONBOARDING}),
    "workload.import": frozenset({AdminRole.ONBOARDING}),
    "workload.deregister": frozenset({AdminRole.ONBOARDING}),
}
# the read routes: every role (reader is for these); nothing here changes anything
READS: dict[str, frozenset[AdminRole]] = {
    "map.read": frozenset(AdminRole),
    "suggest.read": frozenset(AdminRole),
    "findings.read": frozenset(AdminRole),
}

ENV = "RINGFENCE_ADMIN_ROLES"


class AdminRolesError(ValueError):
    """A role binding that cannot be read: names what and where."""


def parse_roles(names: Iterable[str], where: str) -> frozenset[AdminRole]:
    out = set()
    for name in names:
        try:
            out.add(AdminRole(name.strip()))
        except ValueError:
            known = ", ".join(r.value for r in AdminRole)
            raise AdminRolesError(f"{where}: unknown admin role {name.strip()!r} (known: {known})") from None
    return frozenset(out)


def may(roles: Iterable[AdminRole], action: str) -> bool:
    return bool((ACTIONS.get(action) or READS[action]) & set(roles))


_ASSUMED = re.compile(r"^arn:(?P<p>[a-z-]+):sts::(?P<a>\d{12}):assumed-role/(?P<r>[^/]+)/[^/]+$")
_ROLE = re.compile(r"^arn:(?P<p>[a-z-]+):iam::(?P<a>\d{12}):role/(?:.*/)?(?P<r>[^/]+)$")


def principal_key(arn: str) -> str:
    """What a binding matches on: an assumed-role session (``arn:aws:sts::A:assumed-role/R/s``)
    and its role (``arn:aws:iam::A:role/path/R``) both become ``arn:aws:iam::A:role/R`` (a session
    ARN carries no path); any other ARN (an IAM user) stays as it is."""
    m = _ASSUMED.match(arn) or _ROLE.match(arn)
    return f"arn:{m['p']}:iam::{m['a']}:role/{m['r']}" if m else arn


@dataclass(frozen=True)
class RoleBindings:
    """IAM principal → admin roles (the AWS admin API's authorization)."""

    by_principal: Mapping[str, frozenset[AdminRole]] = field(default_factory=dict)

    @classmethod
    def from_json(cls, text: str, where: str = ENV) -> RoleBindings:
        try:
            raw = json.loads(text or "{}")
        except ValueError as exc:
            raise AdminRolesError(f"{where}: not JSON ({exc})") from None
        if not isinstance(raw, dict) or not all(isinstance(v, list) for v in raw.values()):
            raise AdminRolesError(f'{where}: expected {{"principal ARN": ["role", …]}}')
        return cls({principal_key(k): parse_roles(v, f"{where}[{k}]") for k, v in raw.items()})

    @classmethod
    def from_env(cls, env: Mapping[str, str] | None = None) -> RoleBindings:
        e = os.environ if env is None else env
        return cls.from_json(e.get(ENV, ""))

    def roles(self, caller_arn: str | None) -> frozenset[AdminRole]:
        return self.by_principal.get(principal_key(caller_arn), frozenset()) if caller_arn else frozenset()
