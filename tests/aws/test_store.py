"""DynamoDB store semantics the control plane relies on (moto server)."""

from __future__ import annotations

import pytest
from botocore.exceptions import ClientError

from ringfence.model import Workload
from ringfence.store.base import AuditRecord, BundlePointer, ConflictError, EngineHead, InventoryRecord
from tests.aws.conftest import Env


def rec(t: float, env_tag: str, state: str = "running") -> InventoryRecord:
    w = Workload(id="i-0123456789abcdef0", ips=["10.0.0.1"], tags={"env": env_tag}, cloud="aws")
    return InventoryRecord(id=w.id, workload=w, state=state, observed_at=t)


def test_older_observation_never_wins(env: Env) -> None:
    st = env.store
    assert st.observe(rec(10, "prod")) is True
    assert st.observe(rec(5, "dev")) is False
    assert st.get("i-0123456789abcdef0").workload.tags == {"env": "prod"}
    assert st.observe(rec(11, "prod")) is False, "same cloud view: no change to compute"
    assert st.observe(rec(12, "dev")) is True


def test_terminating_is_sticky_while_the_instance_still_runs(env: Env) -> None:
    st = env.store
    st.observe(rec(10, "prod"))
    st.observe(rec(11, "prod", state="terminating"))
    st.observe(rec(12, "prod", state="running"))
    assert st.get("i-0123456789abcdef0").state == "terminating"
    st.observe(rec(13, "prod", state="terminated"))
    assert st.get("i-0123456789abcdef0").state == "terminated"


def test_engine_head_and_bundle_pointer_compare_and_swap(env: Env) -> None:
    st = env.store
    st.put_head(EngineHead(revision=3, policy_version=1, clean=False), 0)
    with pytest.raises(ConflictError):
        st.put_head(EngineHead(revision=4, policy_version=1), 2)
    ptr = BundlePointer(workload_id="w", version=5, key="k5", etag='"5"', rules_revision=5)
    assert st.put_bundle_pointer(ptr)
    assert not st.put_bundle_pointer(ptr.model_copy(update={"version": 4}))  # never backwards
    assert not st.put_bundle_pointer(ptr.model_copy(update={"version": 9}), expected_version=4)
    assert st.put_bundle_pointer(ptr.model_copy(update={"version": 9}), expected_version=5)
    assert st.bundle_pointer("w").version == 9


def test_nonce_and_pairing_are_single_use_and_audit_is_append_only(env: Env) -> None:
    st = env.store
    st.put_nonce("n1", 60)
    assert st.burn_nonce("n1") and not st.burn_nonce("n1") and not st.burn_nonce("never-issued")
    st.put_pairing("h", "w", uses=2, ttl=60)
    assert [st.use_pairing("h") for _ in range(3)] == [True, True, False]
    r = AuditRecord(principal="arn:aws:iam::1:user/a", action="x", target="t")
    st.audit(r)
    with pytest.raises(ClientError):
        st.audit(r)  # the same record can never be rewritten
    assert [a.id for a in st.audit_log()] == [r.id]


def test_expired_nonce_and_pairing_key_are_refused(env: Env) -> None:
    st = env.store
    st.put_nonce("old", -1)
    assert not st.burn_nonce("old")
    st.put_pairing("h2", None, uses=5, ttl=-1)
    assert not st.use_pairing("h2")
