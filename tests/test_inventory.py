from __future__ import annotations

import pytest

from ringfence.inventory import InventoryError, parse_csv, parse_document

CSV = """id,name,ips,cloud,site,tags,label:app,quarantined
srv-1,db one,10.0.0.1;fd00::1,onprem,dc1,role=db;env=prod,billing,no
srv-2,,10.0.0.2 10.0.0.3,onprem,dc1,role=web,billing,yes
"""


def test_csv_with_tags_and_label_columns() -> None:
    [a, b] = parse_csv(CSV, "cmdb.csv")
    assert (
        a.ips == ["10.0.0.1", "fd00::1"] and a.tags == {"role": "db", "env": "prod"} and a.labels == {"app": "billing"}
    )
    assert b.quarantined and b.ips == ["10.0.0.2", "10.0.0.3"]


def test_csv_errors_name_row_and_column() -> None:
    bad = CSV + "srv-3,x,10.0.0.999,onprem,dc1,role,billing,no\nsrv-1,dup,10.0.0.9,onprem,dc1,,x,no\n"
    with pytest.raises(InventoryError) as exc:
        parse_csv(bad, "cmdb.csv")
    text = str(exc.value)
    assert "cmdb.csv:4:6 (tags): expected key=value, got 'role'" in text
    assert "cmdb.csv:5:id: duplicate workload id 'srv-1' (first at line 2)" in text


def test_csv_bad_ip_names_the_column() -> None:
    with pytest.raises(InventoryError, match=r"cmdb.csv:2:3 \(ips\).*not an IP address: '10.0.0.999'"):
        parse_csv("id,name,ips\nsrv-1,x,10.0.0.999\n", "cmdb.csv")


def test_yaml_errors_name_the_line() -> None:
    text = "workloads:\n  - id: a\n    ips: [10.0.0.1]\n  - id: b\n    ips: [nope]\n    colour: red\n"
    with pytest.raises(InventoryError) as exc:
        parse_document(text, "inv.yaml")
    msgs = [str(p) for p in exc.value.problems]
    assert any(m.startswith("inv.yaml:5:") and "not an IP address: 'nope'" in m for m in msgs)
    assert any(m.startswith("inv.yaml:6:") and "colour" in m for m in msgs)


def test_json_list_form() -> None:
    [w] = parse_document('[{"id": "i-1", "ips": ["10.0.0.1"], "tags": {"role": "web"}}]', "inv.json")
    assert w.id == "i-1"


def test_csv_with_bom_and_strict_booleans(tmp_path) -> None:  # type: ignore[no-untyped-def]
    from ringfence.inventory import load_inventory

    f = tmp_path / "cmdb.csv"
    f.write_bytes("\ufeffid,ips,quarantined\nsrv-1,10.0.0.1,no\n".encode())
    assert load_inventory(f)[0].id == "srv-1"
    f.write_text("id,ips,quarantined\nsrv-1,10.0.0.1,ja\n")
    with pytest.raises(InventoryError, match=r"cmdb.csv:2:3 \(quarantined\): expected true/false"):
        load_inventory(f)
    f.write_bytes(b"id,ips\nsrv-\xff,10.0.0.1\n")
    with pytest.raises(InventoryError, match="not UTF-8 text"):
        load_inventory(f)
