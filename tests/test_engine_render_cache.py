"""Rendered set contents are cached per set version: callers may mutate bundles, changes still show."""

from __future__ import annotations

from ringfence.engine import Engine
from ringfence.model import Workload
from ringfence.policy import load_policy_texts

POLICY = """
rulesets:
  - name: app
    scope: all()
    same: []
    rules:
      - {name: web-db, from: role == web, to: role == db, services: [tcp/5432]}
"""


def _engine() -> Engine:
    engine = Engine(load_policy_texts({"p.yaml": POLICY}))
    engine.load(
        [
            Workload(id="web1", ips=["10.0.0.1"], tags={"ringfence:role": "web"}),
            Workload(id="db1", ips=["10.0.1.1"], tags={"ringfence:role": "db"}),
        ]
    )
    return engine


def _only_set(doc: dict[str, object]) -> dict[str, object]:
    sets = doc["sets"]
    assert isinstance(sets, dict) and len(sets) == 1
    return next(iter(sets.values()))  # type: ignore[no-any-return]


def test_mutating_a_rendered_bundle_does_not_leak_into_the_next_render() -> None:
    engine = _engine()
    first = _only_set(engine.render("db1"))
    first["v4"].append("192.0.2.1/32")  # type: ignore[attr-defined]
    first.pop("version")
    again = _only_set(engine.render("db1"))
    assert again["v4"] == ["10.0.0.1/32"]
    assert "version" in again


def test_set_change_is_rendered_after_cache_fill() -> None:
    engine = _engine()
    before = _only_set(engine.render("db1"))
    upd = engine.upsert(Workload(id="web2", ips=["10.0.0.0"], tags={"ringfence:role": "web"}))
    assert upd.set_deltas
    after = _only_set(engine.render("db1"))
    assert after["v4"] == ["10.0.0.0/31"]
    assert after["version"] != before["version"]
    # a set that dies and is re-created later does not resurrect stale content
    engine.remove("db1")
    engine.upsert(Workload(id="db1", ips=["10.0.1.1"], tags={"ringfence:role": "db"}))
    assert _only_set(engine.render("db1"))["v4"] == ["10.0.0.0/31"]
