"""Governed labels without a cloud: the label-key rules a policy must follow, the move decision,
and missing values that match nothing (engine, explain, connectivity and the CLI agree)."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from ringfence.engine import Engine
from ringfence.engine.connectivity import compute, compute_inventory
from ringfence.engine.explain import decide, parse_endpoint
from ringfence.governance import NOT_A_TAGGER, NOT_SET_BY_CALL, UNATTRIBUTED, TagChange, bind, govern, is_tagger
from ringfence.labels import LabelMapper
from ringfence.model import LabelsConfig, Workload
from ringfence.policy import PolicyError, load_policy_texts

ROOT = Path(__file__).resolve().parents[1]
EXAMPLE = ROOT / "examples" / "ordering"
TAGGER = "arn:aws:iam::123456789012:role/ringfence-tagging"
DEV = "arn:aws:iam::123456789012:user/dev"


def problems(text: str) -> list[str]:
    with pytest.raises(PolicyError) as exc:
        load_policy_texts({"labels.yaml": text})
    return [str(p) for p in exc.value.problems]


# --- the label keys are a reserved set ------------------------------------------------------------


def test_a_key_outside_the_reserved_prefix_is_refused_where_it_is_written() -> None:
    out = problems("labels:\n  dimensions:\n    role:\n      keys: [ringfence:role, Role]\n")
    assert out == [
        "labels.yaml:4:30: tag key 'Role' of 'role' is outside the reserved label keys ('ringfence:'…) "
        "(hint: only keys under key_prefix carry labels, so one IAM guard covers them: use 'ringfence:role')"
    ]


def test_a_privileged_dimension_takes_exactly_one_key() -> None:
    out = problems(
        "labels:\n  dimensions:\n    role:\n      keys: [ringfence:role, ringfence:tier]\n      privileged: [jumpbox]\n"
    )
    assert len(out) == 1 and "labels.yaml:4:" in out[0] and "exactly one tag key (got 2)" in out[0]
    assert "bypassed through another" in out[0]


def test_privileged_values_must_be_allowed_values() -> None:
    out = problems("labels:\n  dimensions:\n    role:\n      allowed: [web, jumpbox]\n      privileged: [jumpbx]\n")
    assert len(out) == 1 and "labels.yaml:5:20: privileged value 'jumpbx'" in out[0] and "'jumpbox'" in out[0]


def test_case_insensitive_keys_are_refused_in_a_policy_file() -> None:
    [msg] = problems("labels:\n  case_insensitive_keys: true\n")
    assert "labels.yaml:2:" in msg and "tag keys match exactly" in msg


def test_the_prefix_is_configurable_for_clouds_whose_keys_cannot_hold_a_colon() -> None:
    policy = load_policy_texts({"l.yaml": "labels:\n  key_prefix: rf_\n  dimensions:\n    team: {keys: [rf_team]}\n"})
    res = policy.labels.resolve(Workload(id="g", cloud="gcp", tags={"rf_role": "web", "rf_team": "a", "role": "db"}))
    assert res.labels == {"role": "web", "team": "a"}


# --- the move decision ---------------------------------------------------------------------------

MAPPER = LabelMapper(
    LabelsConfig.model_validate(
        {
            "taggers": ["arn:aws:iam::*:role/ringfence-tagging"],
            "dimensions": {
                "role": {"allowed": ["web", "jumpbox"], "privileged": ["jumpbox"]},
                "app": {"allowed": ["shop", "admin"], "privileged": ["admin"]},
                "env": {"keys": ["ringfence:env", "ringfence:environment"]},
            },
        }
    )
)
DEV_BOX = Workload(id="i-1", tags={"ringfence:role": "web", "ringfence:app": "shop", "ringfence:env": "dev"})
JUMP_TAGS = {"ringfence:role": "jumpbox", "ringfence:app": "admin", "ringfence:env": "shared"}
JUMP = DEV_BOX.model_copy(update={"tags": JUMP_TAGS})


def test_taggers_match_exactly_or_by_pattern() -> None:
    assert is_tagger(["arn:aws:iam::*:role/ringfence-tagging"], TAGGER)
    assert not is_tagger(["arn:aws:iam::*:role/ringfence-tagging"], TAGGER + "-not")
    assert not is_tagger(["arn:aws:iam::*:role/ringfence-tagging"], None)


def test_a_developer_moving_into_privileged_values_is_held_with_a_finding() -> None:
    v = govern(MAPPER, DEV_BOX, JUMP, TagChange(DEV, JUMP_TAGS))
    assert v.held and v.finding and v.reason == NOT_A_TAGGER
    assert v.labels == {"role": "web", "app": "shop", "env": "dev"}
    assert {(m.dimension, m.old, m.new) for m in v.moves} == {("role", "web", "jumpbox"), ("app", "shop", "admin")}


def test_a_developer_whose_call_set_none_of_the_held_moves_is_not_named() -> None:
    """Another's move is held on the workload; this developer's call set only an unrelated tag:
    held still, and no finding names them. An event that does not say what it set (a DeleteTags)
    still names its caller."""
    v = govern(
        MAPPER, DEV_BOX, JUMP.model_copy(update={"tags": {**JUMP_TAGS, "team": "x"}}), TagChange(DEV, {"team": "x"})
    )
    assert v.held and not v.finding and v.reason == NOT_SET_BY_CALL
    v = govern(MAPPER, DEV_BOX, JUMP, TagChange(DEV, None))
    assert v.held and v.finding and v.reason == NOT_A_TAGGER


def test_the_tagger_setting_those_values_is_approved() -> None:
    v = govern(MAPPER, DEV_BOX, JUMP, TagChange(TAGGER, JUMP_TAGS))
    assert not v.held and len(v.approved) == 2
    assert v.labels == {"role": "jumpbox", "app": "admin", "env": "shared"}


def test_an_event_without_principal_holds_without_a_finding() -> None:
    v = govern(MAPPER, DEV_BOX, JUMP, None)
    assert v.held and not v.finding and v.reason == UNATTRIBUTED


def test_the_tagger_approves_only_what_its_call_set() -> None:
    v = govern(MAPPER, DEV_BOX, JUMP, TagChange(TAGGER, {"ringfence:role": "jumpbox"}))
    assert v.held and not v.finding and v.reason == NOT_SET_BY_CALL and v.labels["app"] == "shop"


def test_a_new_workload_with_nothing_to_keep_is_unlabeled() -> None:
    v = govern(MAPPER, None, JUMP, TagChange(DEV, JUMP_TAGS))
    assert v.held and v.workload.held_labels == {} and v.labels == {}
    assert MAPPER.resolve(v.workload).unlabeled


def test_non_privileged_moves_and_holding_what_it_has_need_nothing() -> None:
    v = govern(MAPPER, DEV_BOX, DEV_BOX.model_copy(update={"tags": {**DEV_BOX.tags, "ringfence:env": "prod"}}))
    assert not v.held and v.labels["env"] == "prod"
    approved = govern(MAPPER, DEV_BOX, JUMP, TagChange(TAGGER, JUMP_TAGS)).workload
    again = govern(MAPPER, approved, approved.model_copy(update={"tags": {**JUMP_TAGS, "ringfence:env": "prod"}}))
    assert not again.held and again.labels["role"] == "jumpbox"


def test_a_held_move_stays_held_and_undoing_it_releases() -> None:
    held = govern(MAPPER, DEV_BOX, JUMP, TagChange(DEV, JUMP_TAGS)).workload
    still = govern(MAPPER, held, JUMP, None)
    assert still.held and still.labels["role"] == "web"
    undone = govern(MAPPER, held, DEV_BOX, TagChange(DEV, DEV_BOX.tags))
    assert not undone.held and undone.labels == {"role": "web", "app": "shop", "env": "dev"}


def test_an_admin_binding_grants_and_stands() -> None:
    held = govern(MAPPER, DEV_BOX, JUMP, TagChange(DEV, JUMP_TAGS)).workload
    granted = govern(MAPPER, held, bind(MAPPER, held, {"role": "Jumpbox", "app": "admin"}))
    assert not granted.held and granted.workload.label_grants == {"role": "jumpbox", "app": "admin"}
    # a later observation (which carries no grants) keeps them
    later = govern(MAPPER, granted.workload, JUMP, None)
    assert not later.held and later.labels["app"] == "admin"
    with pytest.raises(ValueError, match="not a privileged value"):
        bind(MAPPER, held, {"role": "web"})
    with pytest.raises(ValueError, match="unknown label dimension"):
        bind(MAPPER, held, {"tier": "gold"})


# --- missing values match nothing ------------------------------------------------------------------

WRITTEN_ONCE = """
labels:
  dimensions:
    env: {allowed: [dev, prod]}
rulesets:
  - name: shop
    scope: app == shop
    rules:
      - {name: web-app, from: role == web, to: role == app, services: [tcp/8443]}
"""


def shop(wid: str, ip: str, role: str, env: str) -> Workload:
    tags = {"ringfence:role": role, "ringfence:app": "shop", "ringfence:env": env, "ringfence:loc": "ca"}
    return Workload(id=wid, ips=[ip], tags=tags)


TYPOS = [
    shop("web-prdo", "10.0.0.1", "web", "prdo"),
    shop("app-dve", "10.0.0.2", "app", "dve"),
    shop("web-dev", "10.0.0.3", "web", "dev"),
    shop("app-dev", "10.0.0.4", "app", "dev"),
]


def test_two_workloads_lacking_env_share_nothing_in_engine_explain_and_matrix() -> None:
    policy = load_policy_texts({"p.yaml": WRITTEN_ONCE})
    engine = Engine(policy)
    engine.load(TYPOS)
    assert "env" not in engine.workloads["web-prdo"].labels and "env" not in engine.workloads["app-dve"].labels
    # the bundle: app-dve's inbound set for web-app holds nobody; app-dev's holds web-dev
    for wid, expected in (("app-dve", []), ("app-dev", ["10.0.0.3/32"])):
        doc = engine.render(wid)
        [rule] = doc["inbound"]  # type: ignore[misc]
        assert doc["sets"][rule["set"]]["v4"] == expected  # type: ignore[index]
    # explain
    d = decide(policy, *(parse_endpoint(w, policy, engine.workloads) for w in ("web-prdo", "app-dve")), "tcp", 8443)
    assert d.verdict == "deny"
    ok = decide(policy, *(parse_endpoint(w, policy, engine.workloads) for w in ("web-dev", "app-dev")), "tcp", 8443)
    assert ok.verdict == "allow"
    # the connectivity matrix, from compiled states and from inventory records
    for matrix in (compute(policy, engine.workloads.values()), compute_inventory(policy, TYPOS)):
        assert sorted((a, b) for a, b, _ in matrix.workload_pairs()) == [("web-dev", "app-dev")]
    # incremental: a typo'd workload arriving later joins no pinned set either
    engine.upsert(shop("web-prdo-2", "10.0.0.5", "web", "prdo"))
    assert all("10.0.0.5/32" not in s.cover_text()[0] for s in engine.sets.values())


def rf(*args: str, ok: bool = True) -> subprocess.CompletedProcess[str]:
    proc = subprocess.run([sys.executable, "-m", "ringfence.cli", *args], capture_output=True, text=True, timeout=120)
    if ok:
        assert proc.returncode == 0, proc.stderr
    return proc


def test_cli_typo_pair_is_denied_by_the_boundary_and_absent_from_the_matrix(tmp_path: Path) -> None:
    """The shipped example: a web tagged env=prdo and a processing node tagged env=dve share no app
    group, and the dev ↛ prod override-deny sees both (a missing env counts as dev and as prod)."""
    inv = tmp_path / "inv.yaml"
    inv.write_text(
        (EXAMPLE / "inventory.yaml").read_text()
        + "  - {id: ord-dev-proc-9, ips: [10.2.2.19], cloud: aws, region: ca-central-1,"
        " tags: {ringfence:role: processing, ringfence:app: ordering, ringfence:env: dve}}\n"
    )
    policy = str(EXAMPLE / "policy")
    base = ["--policy", policy, "--inventory", str(inv)]
    pair = ["--from", "ord-prod-web-9", "--to", "ord-dev-proc-9", "--port", "tcp/8443"]
    out = rf("explain", *base, *pair, "--json", ok=False)
    doc = json.loads(out.stdout)
    assert doc["verdict"] == "deny"
    assert "boundaries/dev-never-reaches-prod" in out.stdout
    edges = json.loads(rf("connectivity", *base, "--workloads", "--json").stdout)["pairs"]
    typo = {"ord-prod-web-9", "ord-dev-proc-9"}
    assert any(e["from"] in typo for e in edges), "both still reach core services"
    assert not [e for e in edges if {e["from"], e["to"]} == typo], "but never each other"
    # without the boundary, a missing value alone keeps them apart (same: pins nothing on it)
    shutil.copytree(EXAMPLE / "policy", tmp_path / "policy")
    (tmp_path / "policy" / "boundaries.yaml").unlink()
    out = rf("explain", "--policy", str(tmp_path / "policy"), "--inventory", str(inv), *pair, "--json", ok=False)
    assert json.loads(out.stdout)["verdict"] == "deny"
