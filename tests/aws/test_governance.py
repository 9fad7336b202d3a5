"""Governed labels, attacked through the real pipeline: moto EventBridge → SQS → ingest → compute → S3.

A developer who may tag their own instance tries to become a jumpbox (in every production host's
SSH peer set); the same change by the allowed tagging role goes through. Alias keys, unattributed
tag events and launches with privileged tags are tried too.
"""

from __future__ import annotations

import copy
import datetime as dt
import ipaddress
import json
import logging
from typing import Any

import pytest

from tests.aws.conftest import ACCOUNT, REGION, Env, fixture, ip_of
from tests.aws.test_pipeline import _ctx, _scheduled, boot

DEVELOPER = f"arn:aws:iam::{ACCOUNT}:user/dev"
TAGGER_ROLE = f"arn:aws:iam::{ACCOUNT}:role/ringfence-tagging"
ESCALATION = {"ringfence:app": "admin", "ringfence:role": "jumpbox", "ringfence:env": "shared"}


def identity(principal: str) -> dict[str, Any]:
    if ":role/" in principal:
        name = principal.rsplit("/", 1)[-1]
        return {
            "type": "AssumedRole",
            "arn": f"arn:aws:sts::{ACCOUNT}:assumed-role/{name}/session-1",
            "sessionContext": {"sessionIssuer": {"type": "Role", "arn": principal}},
        }
    return {"type": "IAMUser", "arn": principal, "userName": principal.rsplit("/", 1)[-1]}


def create_tags_event(iid: str, tags: dict[str, str], principal: str, at: dt.datetime | None = None) -> dict[str, Any]:
    """CloudTrail's CreateTags call, at ``at`` (default now) to its whole second, as CloudTrail says it."""
    ev = copy.deepcopy(fixture("cloudtrail-create-tags.json"))
    ev["region"], ev["account"] = REGION, ACCOUNT
    ev["time"] = (at or dt.datetime.now(dt.UTC)).strftime("%Y-%m-%dT%H:%M:%SZ")
    ev["detail"]["userIdentity"] = identity(principal)
    ev["detail"]["requestParameters"] = {
        "resourcesSet": {"items": [{"resourceId": iid}]},
        "tagSet": {"items": [{"key": k, "value": v} for k, v in tags.items()]},
    }
    return ev


def run_instances_event(iid: str, tags: dict[str, str], principal: str) -> dict[str, Any]:
    ev = copy.deepcopy(fixture("cloudtrail-run-instances.json"))
    ev["region"], ev["account"] = REGION, ACCOUNT
    ev["time"] = dt.datetime.now(dt.UTC).strftime("%Y-%m-%dT%H:%M:%SZ")
    ev["detail"]["userIdentity"] = identity(principal)
    ev["detail"]["requestParameters"]["tagSpecificationSet"] = {
        "items": [{"resourceType": "instance", "tags": [{"key": k, "value": v} for k, v in tags.items()]}]
    }
    ev["detail"]["responseElements"]["instancesSet"]["items"] = [{"instanceId": iid}]
    return ev


def retag(
    env: Env,
    iid: str,
    tags: dict[str, str],
    principal: str | None,
    version: int = 2,
    at: dt.datetime | None = None,
) -> None:
    """Tag the live instance and deliver what AWS emits for it: the aws.tag event (no principal)
    and, when a principal is given, the CloudTrail CreateTags call (at ``at``, default now)."""
    env.ec2.create_tags(Resources=[iid], Tags=[{"Key": k, "Value": v} for k, v in tags.items()])
    live = env.ec2.describe_instances(InstanceIds=[iid])["Reservations"][0]["Instances"][0]["Tags"]
    env.put(env.tag_event(iid, {t["Key"]: t["Value"] for t in live}, version=version))
    if principal is not None:
        env.put(create_tags_event(iid, tags, principal, at))
    env.pump()


def ssh_peers(env: Env, est: dict[str, Any]) -> dict[str, bool]:
    """For ``est["dev"]``: is it in each production host's inbound SSH (tcp/22) peer set?"""
    ip = ipaddress.ip_address(ip_of(env, est["dev"]))
    out = {}
    for iid in (*est["ids"]["web"], *est["ids"]["proc"], *est["ids"]["db"]):
        doc = env.bundle(iid)
        peers = False
        for rule in doc.inbound:
            if rule.action != "allow":
                continue
            entries = [(m.set, m.services) for m in rule.members] if rule.members else [(rule.set, rule.services)]
            for name, services in entries:
                ssh = any(
                    s.proto in ("tcp", "any") and (s.ports is None or s.ports[0] <= 22 <= s.ports[1]) for s in services
                )
                if ssh and name is not None and any(ip in ipaddress.ip_network(c) for c in doc.sets[name].v4):
                    peers = True
        out[iid] = peers
    return out


def governed_estate(env: Env) -> dict[str, Any]:
    est = boot(env)
    [dev] = est["run"]("web", est["subnets"]["web"], 1, env="dev")
    env.put(env.state_event(dev, "running"))
    env.pump()
    est["dev"] = dev
    assert env.store.get(dev).labels == {"role": "web", "app": "ordering", "env": "dev", "loc": "ca"}
    assert not any(ssh_peers(env, est).values()), "before: the dev box is no production host's SSH peer"
    return est


def test_developer_retagging_own_box_as_jumpbox_is_held_and_raises_a_finding(env: Env, caplog: Any) -> None:
    est = governed_estate(env)
    dev = est["dev"]
    caplog.set_level(logging.INFO)
    retag(env, dev, ESCALATION, DEVELOPER)
    rec = env.store.get(dev)
    assert rec.workload.tags["ringfence:role"] == "jumpbox", "the tags did change"
    assert rec.labels == {"role": "web", "app": "ordering", "env": "dev", "loc": "ca"}, "previous labels kept"
    assert not any(ssh_peers(env, est).values()), "the developer is in no production host's SSH peer set"
    # the finding: an audit record naming the developer, and one SIEM-ready JSON line
    [held] = [a for a in env.store.audit_log() if a.action == "label.held"]
    assert held.principal == DEVELOPER and held.target == dev
    assert held.detail["requested"] == {"app": "admin", "role": "jumpbox"}
    lines = [json.loads(r.getMessage()) for r in caplog.records if r.name == "ringfence.findings"]
    assert len(lines) == 1
    assert lines[0]["schema"] == "ringfence.finding/v1" and lines[0]["severity"] == "high"
    assert lines[0]["principal"] == DEVELOPER and lines[0]["workload_id"] == dev and lines[0]["action"] == "held"
    # the hold survives a reconcile (which names no principal)
    env.fn["reconcile"].handler(_scheduled(), _ctx())
    env.pump()
    assert env.store.get(dev).labels["role"] == "web"
    assert not any(ssh_peers(env, est).values())
    # undoing the change lifts the hold
    retag(env, dev, {"ringfence:app": "ordering", "ringfence:role": "web", "ringfence:env": "dev"}, DEVELOPER, 3)
    rec = env.store.get(dev)
    assert rec.workload.held_labels is None and rec.labels["env"] == "dev"


def test_a_colleagues_unrelated_tag_names_nobody_for_a_move_held_on_the_instance(env: Env) -> None:
    """The developer's escalation is seen (the aws.tag event) before its CloudTrail call: held,
    nobody named yet. A colleague (not a tagger either) then tags the same instance ``team``: the
    call set nothing that is held, so it names nobody (before, the colleague was named, and under
    ``on_privileged_change: quarantine`` the instance quarantined in their name). The developer's
    own call, when it arrives, names the developer."""
    est = governed_estate(env)
    dev = est["dev"]
    retag(env, dev, ESCALATION, None)
    assert env.store.get(dev).workload.held_labels is not None
    colleague = f"arn:aws:iam::{ACCOUNT}:user/colleague"
    retag(env, dev, {"team": "payments"}, colleague, version=3)
    assert not [a for a in env.store.audit_log() if a.action == "label.held"], "the colleague set nothing held"
    env.put(create_tags_event(dev, ESCALATION, DEVELOPER))
    env.pump()
    assert [a.principal for a in env.store.audit_log() if a.action == "label.held"] == [DEVELOPER]
    assert env.store.get(dev).labels["role"] == "web"


def test_the_same_change_by_the_tagging_role_is_approved(env: Env) -> None:
    est = governed_estate(env)
    dev = est["dev"]
    retag(env, dev, ESCALATION, TAGGER_ROLE)
    rec = env.store.get(dev)
    assert rec.labels == {"role": "jumpbox", "app": "admin", "env": "shared", "loc": "ca"}
    peers = ssh_peers(env, est)
    assert peers and all(peers.values()), "the approved jumpbox is in every production host's SSH peer set"
    [approved] = [a for a in env.store.audit_log() if a.action == "label.approve"]
    assert approved.principal == TAGGER_ROLE and approved.detail["labels"] == {"app": "admin", "role": "jumpbox"}


def test_unattributed_tag_event_alone_never_approves(env: Env) -> None:
    """The aws.tag event carries no principal: the move waits for the call's CloudTrail event."""
    est = governed_estate(env)
    dev = est["dev"]
    retag(env, dev, ESCALATION, None)
    assert env.store.get(dev).labels["role"] == "web"
    assert not any(ssh_peers(env, est).values())
    assert not [a for a in env.store.audit_log() if a.action == "label.held"], "no one to blame yet"
    # the tagger's CloudTrail event arrives late: it approves what that call set
    env.put(create_tags_event(dev, ESCALATION, TAGGER_ROLE))
    env.pump()
    assert env.store.get(dev).labels["role"] == "jumpbox"
    assert all(ssh_peers(env, est).values())


def test_tagger_event_does_not_approve_a_value_it_did_not_set(env: Env) -> None:
    """The tagger renamed the box; the developer had set the role: the tagger's event is no approval."""
    est = governed_estate(env)
    dev = est["dev"]
    retag(env, dev, ESCALATION, None)
    env.ec2.create_tags(Resources=[dev], Tags=[{"Key": "Name", "Value": "renamed"}])
    env.put(create_tags_event(dev, {"Name": "renamed"}, TAGGER_ROLE))
    env.pump()
    assert env.store.get(dev).labels["role"] == "web"
    assert not any(ssh_peers(env, est).values())


@pytest.mark.parametrize("key", ["role", "Role", "ringfence_role", "RingFence:Role", "ringfence:Role"])
def test_alias_keys_carry_no_label(env: Env, key: str) -> None:
    """An IAM guard on ringfence:* is not bypassed through another spelling: no other key is a label."""
    est = governed_estate(env)
    dev = est["dev"]
    retag(env, dev, {key: "jumpbox"}, DEVELOPER)
    assert env.store.get(dev).labels["role"] == "web"
    assert not any(ssh_peers(env, est).values())


def test_launch_with_privileged_tags_by_a_developer_is_unlabeled(env: Env) -> None:
    est = governed_estate(env)
    [box] = est["run"]("jumpbox", est["subnets"]["web"], 1, env="shared", app="admin")
    env.put(env.state_event(box, "running"))
    env.put(run_instances_event(box, ESCALATION, DEVELOPER))
    env.pump()
    rec = env.store.get(box)
    assert rec.labels == {} and rec.workload.held_labels == {}, "nothing to keep: unlabeled until approved"
    est["dev"] = box
    assert not any(ssh_peers(env, est).values())
    assert [a.principal for a in env.store.audit_log() if a.action == "label.held"] == [DEVELOPER]


def test_attack_launch_from_a_launch_template_with_privileged_tags_names_the_developer(env: Env) -> None:
    """The privileged tags come from a launch template the developer launches: the request shows no
    tags, which must not read as "the call set nothing" (no finding, nobody named)."""
    est = governed_estate(env)
    [box] = est["run"]("jumpbox", est["subnets"]["web"], 1, env="shared", app="admin")
    env.put(env.state_event(box, "running"))
    ev = run_instances_event(box, {}, DEVELOPER)
    ev["detail"]["requestParameters"] = {
        "launchTemplate": {"launchTemplateId": "lt-0abc1234def567890", "version": "$Latest"},
        "instancesSet": {"items": [{"minCount": 1, "maxCount": 1}]},
    }
    env.put(ev)
    env.pump()
    rec = env.store.get(box)
    assert rec.labels == {} and rec.workload.held_labels == {}
    assert [a.principal for a in env.store.audit_log() if a.action == "label.held"] == [DEVELOPER]
    # the tagging role's own launch from a template: the request does not show the template's
    # tags either, so it approves nothing (an admin binding or a CreateTags of its own does)
    [other] = est["run"]("jumpbox", est["subnets"]["web"], 1, env="shared", app="admin")
    env.put(env.state_event(other, "running"))
    ev = run_instances_event(other, {}, TAGGER_ROLE)
    ev["detail"]["requestParameters"] = {"launchTemplate": {"launchTemplateName": "jump"}}
    env.put(ev)
    env.pump()
    assert env.store.get(other).labels == {}


def test_launch_by_the_tagging_role_is_labeled(env: Env) -> None:
    est = governed_estate(env)
    [box] = est["run"]("jumpbox", est["subnets"]["web"], 1, env="shared", app="admin")
    env.put(env.state_event(box, "running"))
    env.put(run_instances_event(box, ESCALATION, TAGGER_ROLE))
    env.pump()
    assert env.store.get(box).labels["role"] == "jumpbox"
    est["dev"] = box
    assert all(ssh_peers(env, est).values())


def test_admin_binding_grants_a_held_move_and_is_audited(env: Env) -> None:
    from ringfence.control.governance import bind_labels

    est = governed_estate(env)
    dev = est["dev"]
    retag(env, dev, ESCALATION, DEVELOPER)
    assert not any(ssh_peers(env, est).values())
    from ringfence.clouds.aws.wiring import Wiring
    from ringfence.control.wiring import Config

    wiring = Wiring(Config.from_env())
    with pytest.raises(ValueError, match="needs a reason"):
        bind_labels(wiring, dev, {"role": "jumpbox", "app": "admin"}, "arn:aws:iam::123456789012:user/alice", " ")
    bind_labels(wiring, dev, {"role": "jumpbox", "app": "admin"}, "arn:aws:iam::123456789012:user/alice", "INC-42")
    env.pump()
    assert env.store.get(dev).labels["role"] == "jumpbox"
    assert all(ssh_peers(env, est).values())
    [bound] = [a for a in env.store.audit_log() if a.action == "label.bind"]
    assert bound.principal.endswith("user/alice") and bound.reason == "INC-42"


def quarantine_mode_with_a_dev_web(env: Env, bystanders: bool = True) -> str:
    """The example policy provisioned under ``on_privileged_change: quarantine`` (the real admin
    route), the estate running, and one more web instance in env dev: its id. ``bystanders``
    False: the dev box alone, for a test about it only (five workloads fewer to ingest, place in
    perimeter groups and publish a bundle for)."""
    from tests.aws.conftest import LABEL_TESTS, POLICY_DIR

    files = {p.name: p.read_text() for p in sorted(POLICY_DIR.glob("*.yaml")) if p.name != "tests.yaml"}
    files["labels.yaml"] = files["labels.yaml"].replace(
        "on_privileged_change: hold", "on_privileged_change: quarantine"
    )
    files["tests.yaml"] = LABEL_TESTS
    status, _, body = env.rest("admin", "POST", "/admin/policies", {"files": files, "reason": "quarantine mode"})
    assert status == 201, body
    if bystanders:
        est = env.estate()
        for ids in est["ids"].values():
            for iid in ids:
                env.put(env.state_event(iid, "running"))
        [dev] = est["run"]("web", est["subnets"]["web"], 1, env="dev")
    else:
        dev = a_dev_web_alone(env)
    env.put(env.state_event(dev, "running"))
    env.pump()
    return str(dev)


def a_dev_web_alone(env: Env) -> str:
    """One web instance in env dev (tagged as ``Env.estate`` tags its instances), in a VPC of its own."""
    from ringfence.local.estate import lab_image

    vpc = env.ec2.create_vpc(CidrBlock="10.1.0.0/16")["Vpc"]["VpcId"]
    subnet = env.ec2.create_subnet(VpcId=vpc, CidrBlock="10.1.1.0/24", AvailabilityZone=f"{REGION}a")["Subnet"]
    tags = {"ringfence:role": "web", "ringfence:app": "ordering", "ringfence:env": "dev"}
    [inst] = env.ec2.run_instances(
        ImageId=lab_image(env.ec2),
        MinCount=1,
        MaxCount=1,
        InstanceType="t3.micro",
        SubnetId=subnet["SubnetId"],
        TagSpecifications=[{"ResourceType": "instance", "Tags": [{"Key": k, "Value": v} for k, v in tags.items()]}],
    )["Instances"]
    return str(inst["InstanceId"])


def test_quarantine_on_finding_when_configured(env: Env) -> None:
    dev = quarantine_mode_with_a_dev_web(env)
    retag(env, dev, ESCALATION, DEVELOPER)
    rec = env.store.get(dev)
    assert rec.op_quarantined
    assert env.bundle(dev).quarantined
    assert "workload.quarantine" in [a.action for a in env.store.audit_log()]


def test_attack_privileged_retag_right_after_the_first_provision_is_held(env: Env) -> None:
    """The estate is ingested before any policy exists (warm handlers have seen "no policy"); a
    developer's retag right after the first provision is still governed by the new policy."""
    est = env.estate()
    [dev] = est["run"]("web", est["subnets"]["web"], 1, env="dev")
    for iid in (*[i for ids in est["ids"].values() for i in ids], dev):
        env.put(env.state_event(iid, "running"))
    env.pump()
    env.provision_example_policy()
    env.pump()
    est["dev"] = dev
    retag(env, dev, ESCALATION, DEVELOPER)
    rec = env.store.get(dev)
    assert rec.workload.held_labels is not None and rec.labels["role"] == "web"
    assert [a.principal for a in env.store.audit_log() if a.action == "label.held"] == [DEVELOPER]
    assert not any(ssh_peers(env, est).values())
