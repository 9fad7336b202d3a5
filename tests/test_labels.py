from __future__ import annotations

from ringfence.labels import LabelMapper
from ringfence.model import LabelsConfig, Workload

CONFIG = LabelsConfig.model_validate(
    {
        "dimensions": {
            "role": {"keys": ["ringfence:role", "ringfence_role", "role"], "required": True},
            "env": {"allowed": ["dev", "prod"], "aliases": {"production": "prod"}, "required": True},
            "loc": {"derive": {"source": "region", "map": {"ca-central-1": "ca"}}, "allowed": ["ca", "us"]},
            "site": {"normalize": "slug"},
        }
    }
)


def resolve(**kw: object):  # type: ignore[no-untyped-def]
    return LabelMapper(CONFIG).resolve(Workload(id="w", **kw))  # type: ignore[arg-type]


def test_first_present_key_wins_and_conflict_is_reported() -> None:
    r = resolve(tags={"ringfence:role": "Web ", "role": "db", "env": "prod"})
    assert r.labels["role"] == "web"
    assert [p.kind for p in r.problems] == ["conflict"]
    assert not r.unlabeled


def test_gcp_style_lowercase_keys_and_values_map_the_same() -> None:
    aws = resolve(tags={"Ringfence:Role": "Web", "Env": "Production"}, region="ca-central-1")
    gcp = resolve(tags={"ringfence_role": "web", "env": "production"}, region="ca-central-1", cloud="gcp")
    assert aws.labels == gcp.labels == {"role": "web", "env": "prod", "loc": "ca"}


def test_unknown_value_is_not_a_new_label() -> None:
    r = resolve(tags={"role": "web", "env": "prdo"})
    assert "env" not in r.labels
    assert r.unlabeled
    [p] = r.problems
    assert p.kind == "unknown" and p.suggestion == "prod" and "did you mean 'prod'?" in p.message


def test_missing_required_dimension() -> None:
    r = resolve(tags={"env": "dev"})
    assert r.unlabeled and r.problems[0].kind == "missing" and r.problems[0].dimension == "role"


def test_derived_label_only_when_no_tag_and_tag_wins() -> None:
    assert resolve(tags={"role": "x", "env": "dev"}, region="ca-central-1").labels["loc"] == "ca"
    assert resolve(tags={"role": "x", "env": "dev", "loc": "us"}, region="ca-central-1").labels["loc"] == "us"


def test_direct_labels_from_cmdb_are_validated_too() -> None:
    r = resolve(labels={"role": "db", "env": "staging"})
    assert r.unlabeled and r.problems[0].value == "staging"


def test_slug_normalisation() -> None:
    r = resolve(tags={"role": "x", "env": "dev", "site": " New York DC#2 "})
    assert r.labels["site"] == "new-york-dc-2"
