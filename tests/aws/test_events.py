"""Event normalization on the documented sample events (copied into tests/aws/fixtures)."""

from __future__ import annotations

import copy

import pytest

from ringfence.events import Kind, MalformedEvent, normalize
from tests.aws.conftest import fixture


def test_state_change() -> None:
    ev = normalize(fixture("ec2-state-change.json"))
    assert ev is not None and ev.kind is Kind.STATE and ev.instance_ids == ("i-1234567890abcdef0",)
    assert ev.state == "pending" and ev.account == "123456789012" and ev.region == "us-east-1"


def test_state_change_without_version_field() -> None:
    raw = fixture("ec2-state-change.json")
    raw.pop("version")
    assert normalize(raw) is not None


def test_tag_change_keeps_version_and_full_tags() -> None:
    ev = normalize(fixture("tag-change.json"))
    assert ev is not None and ev.kind is Kind.TAGS and ev.tag_version == 3
    assert ev.instance_ids == ("i-0000000aaaaaaaaaa",) and "a-deleted-key" not in (ev.tags or {})


def test_asg_and_lifecycle() -> None:
    launch = normalize(fixture("asg-launch-successful.json"))
    term = normalize(fixture("asg-terminate-successful.json"))
    assert launch is not None and launch.kind is Kind.LAUNCH
    assert term is not None and term.kind is Kind.TERMINATE
    lc = normalize(fixture("asg-launch-lifecycle.json"))
    assert lc is not None and lc.kind is Kind.LIFECYCLE_LAUNCH and lc.lifecycle is not None
    assert (
        lc.lifecycle.token == "87654321-4321-4321-4321-210987654321" and lc.lifecycle.hook_name == "my-lifecycle-hook"
    )
    lt = normalize(fixture("asg-terminate-lifecycle.json"))
    assert lt is not None and lt.kind is Kind.LIFECYCLE_TERMINATE


def test_cloudtrail_filters_by_id_prefix_and_skips_errors() -> None:
    assert normalize(fixture("cloudtrail-create-tags.json")) is None  # only a security group
    raw = fixture("cloudtrail-create-tags.json")
    raw["detail"]["requestParameters"]["resourcesSet"]["items"] += [{"resourceId": "i-0abc12345678def01"}]
    ev = normalize(raw)
    assert ev is not None and ev.kind is Kind.TAGS and ev.instance_ids == ("i-0abc12345678def01",)
    raw["detail"]["errorCode"] = "Client.UnauthorizedOperation"
    assert normalize(raw) is None
    run = normalize(fixture("cloudtrail-run-instances.json"))
    assert run is not None and run.kind is Kind.LAUNCH and run.instance_ids == ("i-1234567890abcdef0",)


def test_tag_change_on_other_resource_types_is_ignored() -> None:
    raw = copy.deepcopy(fixture("tag-change.json"))
    raw["detail"]["resource-type"] = "security-group"
    assert normalize(raw) is None


@pytest.mark.parametrize(
    "mutate, message",
    [
        (lambda r: r.pop("detail"), "detail"),
        (lambda r: r.update({"detail-type": "Something Else"}), "unsupported detail-type"),
        (lambda r: r["detail"].pop("instance-id"), "instance-id"),
        (lambda r: r["detail"].update({"instance-id": "vol-123"}), "not an instance id"),
        (lambda r: r.update({"time": "yesterday"}), "time"),
    ],
)
def test_malformed(mutate, message) -> None:  # type: ignore[no-untyped-def]
    raw = fixture("ec2-state-change.json")
    mutate(raw)
    with pytest.raises(MalformedEvent, match=message):
        normalize(raw)


def test_cloudtrail_keeps_who_tagged_and_what() -> None:
    raw = fixture("cloudtrail-create-tags.json")
    raw["detail"]["requestParameters"]["resourcesSet"]["items"] = [{"resourceId": "i-0abc12345678def01"}]
    raw["detail"]["requestParameters"]["tagSet"]["items"] = [
        {"key": "ringfence:role", "value": "jumpbox"},
        {"key": "ringfence:note"},
    ]
    ev = normalize(raw)
    assert ev is not None and ev.principal == "arn:aws:iam::222233334444:user/dev"
    assert ev.tag_request == {"ringfence:role": "jumpbox", "ringfence:note": ""}
    # an assumed role is named by its role (the session name is the caller's choice)
    raw["detail"]["userIdentity"] = {
        "type": "AssumedRole",
        "arn": "arn:aws:sts::222233334444:assumed-role/ringfence-tagging/pipeline-42",
        "sessionContext": {
            "sessionIssuer": {"type": "Role", "arn": "arn:aws:iam::222233334444:role/ringfence-tagging"}
        },
    }
    ev = normalize(raw)
    assert ev is not None and ev.principal == "arn:aws:iam::222233334444:role/ringfence-tagging"
    del raw["detail"]["userIdentity"]["sessionContext"]  # the role, from the session's ARN
    ev = normalize(raw)
    assert ev is not None and ev.principal == "arn:aws:iam::222233334444:role/ringfence-tagging"


def test_run_instances_tag_specifications_and_the_service_that_launched() -> None:
    raw = fixture("cloudtrail-run-instances.json")
    raw["detail"]["requestParameters"]["tagSpecificationSet"] = {
        "items": [
            {"resourceType": "volume", "tags": [{"key": "ringfence:role", "value": "web"}]},
            {"resourceType": "instance", "tags": [{"key": "ringfence:role", "value": "jumpbox"}]},
        ]
    }
    ev = normalize(raw)
    assert ev is not None and ev.principal == "autoscaling.amazonaws.com"
    assert ev.tag_request == {"ringfence:role": "jumpbox"}


def test_tag_change_on_resource_names_no_principal() -> None:
    ev = normalize(fixture("tag-change.json"))
    assert ev is not None and ev.principal is None and ev.tag_request is None


def test_an_arn_of_another_account_than_the_events_is_skipped(caplog: pytest.LogCaptureFixture) -> None:
    """Its instance is described in the event's account: another account's would be taken for gone."""
    raw = copy.deepcopy(fixture("tag-change.json"))
    raw["resources"] = ["arn:aws:ec2:us-east-1:210987654321:instance/i-0000000aaaaaaaaaa"]
    assert normalize(raw) is None
    assert "event bddcf1d6-0251-35a1-aab0-adc1fb47c11c of account 123456789012 names" in caplog.text
    assert "of account 210987654321: skipped" in caplog.text
    state = fixture("ec2-state-change.json")
    state["resources"] = ["arn:aws:ec2:us-east-1:210987654321:instance/i-1234567890abcdef0"]
    assert normalize(state) is None
    # judged by what is there: an ARN without an account field, a resource that is no ARN
    raw["resources"] = ["arn:aws:ec2:us-east-1::instance/i-0000000aaaaaaaaaa"]
    assert normalize(raw) is not None
    asg = normalize(fixture("asg-launch-successful.json"))  # "auto-scaling-group-arn", "instance-arn"
    assert asg is not None and asg.kind is Kind.LAUNCH
