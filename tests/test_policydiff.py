from __future__ import annotations

from ringfence.model import Workload
from ringfence.policy import load_policy_texts
from ringfence.policydiff import AccessChange, diff

BASE = """
rulesets:
  - name: shop
    scope: app == shop
    same: [app]  # the workloads have no env or loc: a missing value is shared with nobody
    rules:
      - {from: role == lb, to: role == web, services: [tcp/80]}
      - {from: role == web, to: role == db, services: [tcp/5432]}
"""

INVENTORY = [
    Workload(id="lb", ips=["10.0.0.1"], tags={"ringfence:app": "shop", "ringfence:role": "lb"}),
    Workload(id="web", ips=["10.0.0.2"], tags={"ringfence:app": "shop", "ringfence:role": "web"}),
    Workload(id="db", ips=["10.0.0.3"], tags={"ringfence:app": "shop", "ringfence:role": "db"}),
]


def test_inserting_an_unnamed_rule_is_one_addition_not_a_cascade() -> None:
    draft = BASE.replace("    rules:\n", "    rules:\n      - {from: role == lb, to: role == db, services: [tcp/22]}\n")
    d = diff(load_policy_texts({"p.yaml": BASE}), load_policy_texts({"p.yaml": draft}), INVENTORY)
    assert [r.id for r in d.added] == ["shop/1"] and not d.removed and not d.changed
    assert [(c.source, c.destination, [str(s) for s in c.services]) for c in d.gained] == [("lb", "db", ["tcp/22"])]
    assert not d.lost


def test_changed_ports_show_as_changed_rule_and_access_delta() -> None:
    draft = BASE.replace("tcp/5432", "tcp/5432-5433")
    d = diff(load_policy_texts({"p.yaml": BASE}), load_policy_texts({"p.yaml": draft}), INVENTORY)
    assert [new.id for _, new in d.changed] == ["shop/2"] and not d.added and not d.removed
    assert [(c.source, c.destination, [str(s) for s in c.services]) for c in d.gained] == [("web", "db", ["tcp/5433"])]
    assert "~ shop/2" in d.format()


EGRESS = """
ip_lists:
  - {name: db-range, cidrs: [10.0.0.3/32, "fd00::3/128"]}
  - {name: corp, cidrs: [10.0.0.0/16], exclude: [10.0.0.2/32]}
rulesets:
  - name: shop
    scope: app == shop
    same: [app]
    rules:
      - {from: role == lb, to: role == web, services: [tcp/80]}
      - {from: role == web, to: role == db, services: [tcp/5432]}
  - name: egress
    scope: all()
    same: []
    rules:
      - {name: out, from: all(), to: {ip_list: any}, services: [tcp/5432]}
"""


def _access(changes: list[AccessChange]) -> list[tuple[str, str, list[str]]]:
    return [(c.source, c.destination, [str(s) for s in c.services]) for c in changes]


def test_a_rule_from_any_ip_shows_the_workload_access_it_grants() -> None:
    """``from: any`` holds every workload's address: with the sources' egress, lb reaches db now."""
    draft = EGRESS + "      - {name: in, from: {ip_list: any}, to: role == db, services: [tcp/5432]}\n"
    d = diff(load_policy_texts({"p.yaml": EGRESS}), load_policy_texts({"p.yaml": draft}), INVENTORY)
    assert [r.id for r in d.added] == ["egress/in"]
    assert _access(d.gained) == [("lb", "db", ["tcp/5432"])] and not d.lost  # web → db was open already


def test_an_ip_list_override_deny_closes_what_it_covers_but_not_the_excluded_address() -> None:
    rule = "      - {name: no-corp, from: {ip_list: corp}, to: all(), services: [all], action: override-deny}\n"
    draft = EGRESS + "      - {name: in, from: {ip_list: any}, to: role == db, services: [tcp/5432]}\n" + rule
    d = diff(load_policy_texts({"p.yaml": EGRESS}), load_policy_texts({"p.yaml": draft}), INVENTORY)
    # lb (10.0.0.1, in corp) loses web; web (10.0.0.2, excluded from corp) keeps db
    assert _access(d.lost) == [("lb", "web", ["tcp/80"])] and not d.gained


def test_a_workload_with_two_addresses_is_open_when_one_address_pair_is() -> None:
    """db has a v4 address in db-range and a v6 one outside it: an override-deny on db-range closes
    the v4 packets only, so the pair stays open (explain lists the pairs by address)."""
    inventory = [*INVENTORY[:2], INVENTORY[2].model_copy(update={"ips": ["10.0.0.3", "fd00::7"]})]
    inventory[1] = inventory[1].model_copy(update={"ips": ["10.0.0.2", "fd00::2"]})
    rule = "      - {name: no-db, from: role == web, to: {ip_list: db-range}, services: [all], action: override-deny}\n"
    active = load_policy_texts({"p.yaml": EGRESS})
    d = diff(active, load_policy_texts({"p.yaml": EGRESS + rule}), inventory)
    assert not d.lost and not d.gained
    # with the v6 address inside db-range too, web → db closes
    inventory[2] = inventory[2].model_copy(update={"ips": ["10.0.0.3", "fd00::3"]})
    d = diff(active, load_policy_texts({"p.yaml": EGRESS + rule}), inventory)
    assert _access(d.lost) == [("web", "db", ["tcp/5432"])]
