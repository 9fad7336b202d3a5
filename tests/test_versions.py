"""The one policy-version model: inline files (CLI) or published keys (control-plane stores)."""

from __future__ import annotations

import pytest
from pydantic import ValidationError

from ringfence.versions import PolicyVersion, digest_of


def test_inline_and_published_versions_give_the_same_texts() -> None:
    files = {"policy.yaml": "rules: []\n"}
    inline = PolicyVersion(number=1, author="alice", message="m", digest=digest_of(files), files=files)
    published = PolicyVersion(
        number=1, author="alice", digest=digest_of(files), keys={"policy.yaml": "policies/v000001/policy.yaml"}
    )
    objects = {"policies/v000001/policy.yaml": files["policy.yaml"].encode()}
    assert inline.texts() == published.texts(objects.__getitem__) == files
    with pytest.raises(ValueError, match="need a reader"):
        published.texts()


def test_a_version_is_inline_or_published_not_both() -> None:
    with pytest.raises(ValidationError, match="not both"):
        PolicyVersion(number=1, author="a", digest="d", files={"a": "x"}, keys={"a": "k"})


def test_documents_the_aws_store_wrote_before_the_models_merged_still_read() -> None:
    old = '{"version": 7, "keys": {"p.yaml": "policies/v000007/p.yaml"}, "digest": "ab", "created_by": "arn:x", "comment": "why"}'
    pv = PolicyVersion.model_validate_json(old)
    assert (pv.number, pv.author, pv.message, pv.keys) == (7, "arn:x", "why", {"p.yaml": "policies/v000007/p.yaml"})
