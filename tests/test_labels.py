from __future__ import annotations

import pytest
from pydantic import ValidationError

from ringfence.labels import LabelMapper
from ringfence.model import LabelsConfig, Workload

DIMENSIONS = {
    "role": {"keys": ["ringfence:role", "ringfence:tier"], "required": True},
    "env": {"allowed": ["dev", "prod"], "aliases": {"production": "prod"}, "required": True},
    "loc": {"derive": {"source": "region", "map": {"ca-central-1": "ca"}}, "allowed": ["ca", "us"]},
    "site": {"normalize": "slug"},
}
CONFIG = LabelsConfig.model_validate({"dimensions": DIMENSIONS})


def resolve(**kw: object):  # type: ignore[no-untyped-def]
    return LabelMapper(CONFIG).resolve(Workload(id="w", **kw))  # type: ignore[arg-type]


def test_first_present_key_wins_and_conflict_is_reported() -> None:
    r = resolve(tags={"ringfence:role": "Web ", "ringfence:tier": "db", "ringfence:env": "prod"})
    assert r.labels["role"] == "web"
    assert [p.kind for p in r.problems] == ["conflict"]
    assert not r.unlabeled


def test_only_reserved_keys_carry_labels_and_they_match_exactly() -> None:
    # an IAM guard on ringfence:* sees neither `role` nor `RingFence:Role`: neither may set a label
    r = resolve(tags={"role": "web", "Role": "web", "RingFence:Role": "web", "ringfence:env": "dev"})
    assert "role" not in r.labels and r.unlabeled
    assert [(p.kind, p.dimension) for p in r.problems] == [("missing", "role")]
    assert "(tag 'RingFence:Role' carries no label: use 'ringfence:role')" in r.problems[0].message


def test_case_insensitive_keys_are_refused() -> None:
    with pytest.raises(ValidationError, match="tag keys match exactly"):
        LabelsConfig.model_validate({"case_insensitive_keys": True})


def test_gcp_style_prefix_maps_the_same() -> None:
    gcp_config = LabelsConfig.model_validate({"key_prefix": "ringfence_", "dimensions": DIMENSIONS | {"role": {}}})
    aws = resolve(tags={"ringfence:role": "Web", "ringfence:env": "Production"}, region="ca-central-1")
    gcp = LabelMapper(gcp_config).resolve(
        Workload(id="w", tags={"ringfence_role": "web", "ringfence_env": "production"}, region="ca-central-1")
    )
    assert aws.labels == gcp.labels == {"role": "web", "env": "prod", "loc": "ca"}


def test_unknown_value_is_not_a_new_label() -> None:
    r = resolve(tags={"ringfence:role": "web", "ringfence:env": "prdo"})
    assert "env" not in r.labels
    assert r.unlabeled
    [p] = r.problems
    assert p.kind == "unknown" and p.suggestion == "prod" and "did you mean 'prod'?" in p.message


def test_missing_required_dimension() -> None:
    r = resolve(tags={"ringfence:env": "dev"})
    assert r.unlabeled and r.problems[0].kind == "missing" and r.problems[0].dimension == "role"


def test_derived_label_only_when_no_tag_and_tag_wins() -> None:
    base = {"ringfence:role": "x", "ringfence:env": "dev"}
    assert resolve(tags=base, region="ca-central-1").labels["loc"] == "ca"
    assert resolve(tags=base | {"ringfence:loc": "us"}, region="ca-central-1").labels["loc"] == "us"


def test_direct_labels_from_cmdb_are_validated_too() -> None:
    r = resolve(labels={"role": "db", "env": "staging"})
    assert r.unlabeled and r.problems[0].value == "staging"


def test_slug_normalisation() -> None:
    r = resolve(tags={"ringfence:role": "x", "ringfence:env": "dev", "ringfence:site": " New York DC#2 "})
    assert r.labels["site"] == "new-york-dc-2"


def test_held_labels_are_in_force_until_released() -> None:
    tags = {"ringfence:role": "jumpbox", "ringfence:env": "prod"}
    held = resolve(tags=tags, held_labels={"role": "web", "env": "dev"})
    assert held.labels == {"role": "web", "env": "dev"} and not held.unlabeled
    assert [p.kind for p in held.problems] == ["held"]
    # nothing to keep (a new instance): unlabeled until approved
    new = resolve(tags=tags, held_labels={})
    assert new.labels == {} and new.unlabeled and [p.kind for p in new.problems] == ["ungranted"]
    assert resolve(tags=tags).labels == {"role": "jumpbox", "env": "prod"}
