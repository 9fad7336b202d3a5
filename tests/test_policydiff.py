from __future__ import annotations

from ringfence.model import Workload
from ringfence.policy import load_policy_texts
from ringfence.policydiff import diff

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
