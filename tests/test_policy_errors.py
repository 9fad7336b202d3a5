"""Invalid policy: one error per problem, each with file:line:column and a hint; nothing loads."""

from __future__ import annotations

import pytest

from ringfence.policy import PolicyError, load_policy_texts

GOOD = """\
services:
  - {name: web, ports: [tcp/443]}
ip_lists:
  - {name: vpn, cidrs: [10.8.0.0/16]}
rulesets:
  - name: shop
    scope: app == shop
    rules:
      - {name: a, from: role == lb, to: role == web, services: [web]}
"""


def problems(text: str, extra: dict[str, str] | None = None) -> list[str]:
    with pytest.raises(PolicyError) as exc:
        load_policy_texts({"p.yaml": text, **(extra or {})})
    return [str(p) for p in exc.value.problems]


def test_good_policy_loads() -> None:
    policy = load_policy_texts({"p.yaml": GOOD})
    assert [r.id for r in policy.rules] == ["shop/a"]


def test_unknown_dimension_in_selector_points_at_it() -> None:
    text = GOOD.replace("to: role == web", "to: tier == web")
    [msg] = problems(text)
    assert msg.startswith("p.yaml:9:")
    assert "unknown label dimension 'tier'" in msg and "known dimensions: app, env, loc, role" in msg


def test_bad_selector_syntax_has_column_and_hint() -> None:
    text = GOOD.replace("scope: app == shop", "scope: app = shop")
    [msg] = problems(text)
    # "app = shop" starts at column 12; the stray '=' is 4 characters in
    assert msg.startswith("p.yaml:7:16:"), msg
    assert "expected ==, !=, in or not in" in msg


def test_undefined_service_and_ip_list_each_reported() -> None:
    text = GOOD + "      - {name: b, from: {ip_list: vnp}, to: role == web, services: [wbe]}\n"
    msgs = problems(text)
    assert len(msgs) == 2
    assert any("undefined service 'wbe'" in m and "did you mean 'web'?" in m for m in msgs)
    assert any("undefined ip list 'vnp'" in m and "did you mean 'vpn'?" in m for m in msgs)
    assert all(m.startswith("p.yaml:10:") for m in msgs)


def test_bad_cidr_names_the_item() -> None:
    text = GOOD.replace("cidrs: [10.8.0.0/16]", "cidrs: [10.8.0.0/33]")
    [msg] = problems(text)
    assert msg.startswith("p.yaml:4:") and "not a CIDR or address: '10.8.0.0/33'" in msg


def test_duplicate_names_across_files() -> None:
    other = "services:\n  - {name: web, ports: [tcp/80]}\n"
    [msg] = problems(GOOD, {"q.yaml": other})
    assert msg.startswith("q.yaml:2:") and "duplicate service 'web'" in msg and "first defined at p.yaml:2" in msg


def test_same_naming_unknown_dimension() -> None:
    text = GOOD.replace("services: [web]}", "services: [web], same: [team]}")
    [msg] = problems(text)
    assert "unknown label dimension 'team'" in msg


def test_unknown_field_is_reported_at_its_key() -> None:
    text = GOOD.replace("    scope: app == shop", "    scope: app == shop\n    scoep: x")
    [msg] = problems(text)
    assert msg.startswith("p.yaml:8:5:") and "unknown field 'scoep'" in msg


def test_bad_port() -> None:
    [msg] = problems(GOOD.replace("ports: [tcp/443]", "ports: [tcp/70000]"))
    assert msg.startswith("p.yaml:2:") and "port range 70000-70000 out of 1-65535" in msg


def test_structural_errors_all_reported_together() -> None:
    text = GOOD + "  - name: empty\n  - {name: x, rules: [], colour: red}\n"
    msgs = problems(text)
    assert any(m.startswith("p.yaml:10:") and "missing required field 'rules'" in m for m in msgs)
    assert any(m.startswith("p.yaml:11:") and "unknown field 'colour'" in m for m in msgs)


def test_value_outside_allowed_set_is_an_error_with_suggestion() -> None:
    labels = "labels:\n  dimensions:\n    env: {allowed: [dev, prod]}\n"
    text = GOOD.replace("scope: app == shop", "scope: app == shop && env == prdo")
    [msg] = problems(text, {"labels.yaml": labels})
    assert "'prdo' is not an allowed value of 'env'" in msg and "did you mean 'prod'?" in msg


def test_label_group_cycle_and_wrong_dimension() -> None:
    groups = (
        "label_groups:\n"
        "  - {name: a, dimension: env, values: ['@b']}\n"
        "  - {name: b, dimension: env, values: ['@a']}\n"
        "  - {name: r, dimension: role, values: [web]}\n"
    )
    text = GOOD.replace("to: role == web", "to: 'env in {@r}'")
    msgs = problems(text, {"g.yaml": groups})
    assert any("contains itself" in m for m in msgs)
    assert any("unknown label group 'r' for dimension 'env'" in m for m in msgs)


def test_yaml_syntax_error_has_position() -> None:
    [msg] = problems("rulesets:\n  - name: x\n    rules: [\n")
    assert msg.startswith("p.yaml:4:") and "YAML syntax" in msg


def test_both_sides_ip_lists_rejected() -> None:
    text = GOOD + "      - {name: b, from: {ip_list: vpn}, to: {ip_list: any}, services: [web]}\n"
    [msg] = problems(text)
    assert "needs workloads on at least one side" in msg


def test_too_many_dimensions() -> None:
    dims = "\n".join(f"    d{i}: {{}}" for i in range(17))
    [msg] = problems(GOOD, {"labels.yaml": f"labels:\n  dimensions:\n{dims}\n"})
    assert "at most 20 label dimensions" in msg


def test_test_block_problems() -> None:
    text = GOOD + (
        "tests:\n"
        "  - {from: {labels: {role: lb}, ip: 10.0.0.1}, to: {labels: {colour: red}}, port: tcp/80-90, expect: allow}\n"
    )
    msgs = problems(text)
    assert any("needs exactly one of workload, labels, ip" in m for m in msgs)
    assert any("unknown label dimension 'colour'" in m for m in msgs)
    assert any("a flow needs one port, not a range" in m for m in msgs)


def test_yaml_alias_cycle_and_bomb_are_clear_errors() -> None:
    [msg] = problems("rulesets: &a [*a]\n")
    assert "cycle" in msg
    bomb = "a: &a [x, x, x, x, x, x, x, x, x, x]\n" + "".join(
        f"{c}: &{c} [{', '.join(['*' + p] * 10)}]\n" for p, c in zip("abcde", "bcdef", strict=True)
    )
    [msg] = problems(bomb)
    assert "expands to more than" in msg


def test_boolean_keys_are_refused() -> None:
    [msg] = problems("labels:\n  dimensions:\n    on: {}\n")
    assert msg.startswith("p.yaml:3:5:") and "not a string" in msg


def test_builtin_names_cannot_be_redefined() -> None:
    [msg] = problems(GOOD.replace("{name: vpn, cidrs: [10.8.0.0/16]}", "{name: any, cidrs: [10.0.0.0/8]}"))
    assert "duplicate ip list 'any'" in msg and "<built-in>" in msg
    msgs = problems(GOOD.replace("{name: web, ports: [tcp/443]}", "{name: all, ports: [tcp/443]}"))
    assert any("duplicate service 'all'" in m for m in msgs)


def test_failsafes_are_validated() -> None:
    defaults = (
        "defaults:\n  failsafes:\n    admin_cidrs: [10.99.0.0/33]\n    admin_ports: [ssh]\n    dns_resolvers: [dns1]\n"
    )
    msgs = problems(GOOD, {"d.yaml": defaults})
    assert any(m.startswith("d.yaml:3:") and "10.99.0.0/33" in m for m in msgs)
    assert any(m.startswith("d.yaml:4:") and "unknown protocol 'ssh'" in m for m in msgs)
    assert any(m.startswith("d.yaml:5:") and "not an IP address: 'dns1'" in m for m in msgs)


def test_selector_values_are_normalised_before_the_allowed_check() -> None:
    labels = "labels:\n  dimensions:\n    env: {allowed: [dev, prod], aliases: {production: prod}}\n"
    policy = load_policy_texts(
        {"p.yaml": GOOD.replace("scope: app == shop", "scope: env in {Prod, production}"), "l.yaml": labels}
    )
    assert policy.rules[0].provider.canonical() == "env == 'prod' && role == 'web'"


def test_alias_to_a_value_outside_allowed() -> None:
    labels = "labels:\n  dimensions:\n    env: {allowed: [dev, prod], aliases: {production: prd}}\n"
    [msg] = problems(GOOD, {"l.yaml": labels})
    assert "alias 'production' → 'prd'" in msg and msg.startswith("l.yaml:3:")


def test_empty_ip_list_is_refused() -> None:
    [msg] = problems(GOOD.replace("cidrs: [10.8.0.0/16]", "cidrs: []"))
    assert "cidrs" in msg and "at least 1" in msg


def test_unknown_same_dimension_reported_once() -> None:
    text = GOOD.replace("    scope: app == shop", "    scope: app == shop\n    same: [team]")
    assert len(problems(text)) == 1
