"""A token made old enough to renew by token. The control plane refuses a renewal by token of a
token less than half its lifetime old (``429``, ringfence.control.agents.RENEW_AFTER_SHARE); the
real agent renews at four fifths of it. Tests that renew right after enrolling move the token's
expiry back through the store's own ``put_token`` (the same token, the same workload and agent
key), as if it had been issued that long ago: the check stays on."""

from __future__ import annotations

from ringfence.control import credentials
from ringfence.control.api import secret_hash
from ringfence.store.base import Store

TOKEN_TTL = 3600  # RINGFENCE_TOKEN_TTL's default, what the tests' control planes run with
DUE = TOKEN_TTL // 5  # left of its lifetime when the agent renews (at four fifths)


def age(store: Store, workload_id: str, token: str, left: int = DUE) -> None:
    """``token`` (the workload's current one) with ``left`` seconds of its lifetime to go."""
    pem = store.agent_key(workload_id)
    fingerprint = credentials.agent_key_fingerprint(pem) if pem else ""
    store.put_token(secret_hash(token), workload_id, left, agent_key=fingerprint)
