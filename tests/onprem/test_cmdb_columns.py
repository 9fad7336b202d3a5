"""A CMDB file's columns: two that give the same tag (``ringfence:role`` and
``tag:ringfence:role``) are refused, as a column given twice is. Before, both passed the duplicate
check (it compared the raw names) and the later column's value silently won."""

from __future__ import annotations

import pytest

from ringfence.clouds.onprem import OnPremAdmin
from ringfence.cmdb import CmdbError, parse_cmdb_rows
from ringfence.local.wiring import LocalWiring

CSV = (
    "id,ips,ringfence:role,ringfence:app,ringfence:env,ringfence:loc,tag:ringfence:role\n"
    "new-1,192.168.10.131,web,ordering,prod,ca,database\n"
)


def test_cmdb_tag_column_twice_is_refused() -> None:
    with pytest.raises(CmdbError) as refused:
        parse_cmdb_rows(CSV, "c.csv")
    assert "c.csv:1:" in str(refused.value)
    assert "column 'tag:ringfence:role' gives the tag of column 'ringfence:role' again" in str(refused.value)


def test_cmdb_tag_column_twice_imports_nothing(wiring: LocalWiring) -> None:
    r = OnPremAdmin(wiring).import_cmdb("otto", CSV, "c.csv", "sync")
    assert r.status == 400 and r.body["error"] == "CMDB file rejected: nothing imported", r.body
    assert wiring.store.get("new-1") is None


def test_cmdb_distinct_tag_columns_still_import() -> None:
    rows = parse_cmdb_rows("id,ips,tag:owner,ringfence:role\nnew-1,192.168.10.131,ops,web\n", "c.csv")
    assert rows[0].workload.tags == {"owner": "ops", "ringfence:role": "web"}
