"""AWS: a change stored by an event whose later step then fails reaches the perimeter too, not
only compute. The event's redelivery stores nothing and hands nothing on, so the instance's
security groups would keep its old env's until the perimeter's scheduled run. Against the moto
server, through the real ingest, perimeter and compute handlers, the perimeter configured."""

from __future__ import annotations

from typing import Any

from tests.aws.conftest import Env
from tests.aws.test_governance import ESCALATION, TAGGER_ROLE, create_tags_event, governed_estate
from tests.aws.test_ingest_hand_off import ingest_once, refuse_once
from tests.aws.test_lifecycle_gate import rf_groups_on_enis
from tests.aws.test_perimeter import configured  # noqa: F401 (fixture)


def audit_write(params: dict[str, Any]) -> bool:
    return any(next(iter(i.values()))["TableName"] == "rf-audit" for i in params.get("TransactItems", []))


def test_a_taggers_approval_stored_before_its_audit_write_fails_reaches_the_perimeter(
    configured: Env,  # noqa: F811
) -> None:
    """The tagging role moves the dev box to env shared: its approval is stored, then its audit
    record's write is throttled and the event fails; the redelivery stores nothing. The box's
    interfaces must still leave the dev groups (rf-dev-published.web lets the internet in) for
    the shared ones."""
    env = configured
    est = governed_estate(env)
    dev = est["dev"]
    assert {"rf-dev-published.web", "rf-dev-boundary"} <= set().union(*rf_groups_on_enis(env, dev).values())
    env.ec2.create_tags(Resources=[dev], Tags=[{"Key": k, "Value": v} for k, v in ESCALATION.items()])
    live = env.ec2.describe_instances(InstanceIds=[dev])["Reservations"][0]["Instances"][0]["Tags"]
    env.put(env.tag_event(dev, {t["Key"]: t["Value"] for t in live}, version=2))
    env.pump()  # held: the tag event names no one
    refused = refuse_once(env, "before-parameter-build.dynamodb.TransactWriteItems", audit_write)
    env.put(create_tags_event(dev, ESCALATION, TAGGER_ROLE))
    assert ingest_once(env).failed and refused, "the throttled audit write fails the event"
    assert not ingest_once(env).failed  # the redelivery
    env.pump()
    assert env.store.get(dev).labels["env"] == "shared"
    groups = set().union(*rf_groups_on_enis(env, dev).values())
    assert "rf-dev-published.web" not in groups, "the approved move never reached the perimeter"
    assert groups == {"rf-shared-boundary", "rf-shared-mgmt"}
