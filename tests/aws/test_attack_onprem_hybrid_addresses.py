"""On-premise registration on AWS, second round: a stopped EC2 instance's address is held; a
second active owner of an address is logged and counted; a CMDB import too large for DynamoDB's
transactions is refused whole before anything is written, and one that loses a race part-way
says what it wrote and hands that to compute. All through the real admin, ingest and compute
functions over the moto server."""

from __future__ import annotations

import logging
import time
from typing import Any

import pytest

from ringfence.model import Workload
from ringfence.store.base import InventoryRecord
from tests.aws.conftest import Env, ip_of
from tests.aws.test_attack_enroll import audits
from tests.aws.test_handler_metrics import emitted
from tests.aws.test_onprem_hybrid import DB, OTTO, hybrid, register  # noqa: F401
from tests.aws.test_pipeline import in_set

WEB_TAGS = {"ringfence:role": "web", "ringfence:app": "ordering", "ringfence:env": "prod", "ringfence:loc": "ca"}


def _import(env: Env, csv: str, source: str = "dc4.csv") -> tuple[int, Any]:
    status, _, answer = env.rest(
        "admin", "POST", "/admin/workloads/import", {"csv": csv, "source": source, "reason": "CHG"}, principal=OTTO
    )
    return status, answer


def _owners(env: Env, ip: str) -> list[str]:
    return sorted(r.id for r in env.store.all_records() if r.active and ip in r.workload.ips)


# --- F2: a stopped instance keeps its address ---------------------------------------------------


def test_attack_onboarding_cannot_take_a_stopped_instances_address(
    hybrid: tuple[Env, dict[str, Any]],  # noqa: F811
) -> None:
    """A stopped EC2 instance keeps its private address but its record is not active: an
    ``onboarding`` caller registered that address for a "web" host (201), and when the instance
    started again two active workloads held it, the database's address in its peers' web sets.
    Refused now while the instance is stopped, as while it runs: by registration
    (409) and by CMDB import (400, file:line:column); after the start it has one owner."""
    env, est = hybrid
    db = est["ids"]["db"][0]
    db_ip = ip_of(env, db)
    proc = est["ids"]["proc"][0]
    env.ec2.stop_instances(InstanceIds=[db])
    env.put(env.state_event(db, "stopped"))
    env.pump()
    rec = env.store.get(db)
    assert rec is not None and rec.state == "stopped" and rec.workload.ips == [db_ip]
    status, answer = register(env, {"id": "dc9-web-1", "ips": [db_ip], "site": "dc9", "tags": WEB_TAGS})
    assert status == 409 and f"{db_ip} is held by workload {db}" in answer["detail"], answer
    csv = "id,ips,ringfence:role\ndc9-web-2,192.168.90.2,web\ndc9-web-3," + db_ip + ",web\n"
    status, answer = _import(env, csv, "dc9.csv")
    assert status == 400 and "dc9.csv:3:" in answer["detail"] and db_ip in answer["detail"], answer
    assert env.store.get("dc9-web-1") is None and env.store.get("dc9-web-2") is None
    env.ec2.start_instances(InstanceIds=[db])
    env.put(env.state_event(db, "running"))
    env.pump()
    assert _owners(env, db_ip) == [db]
    web_sets = {n for n, s in env.bundle(proc).sets.items() if any(c.startswith(db_ip + "/") for c in s.v4)}
    assert len(web_sets) == 1, f"the database's address is in one set of its peer (its own role's): {web_sets}"


def test_an_instance_started_with_a_hosts_address_is_logged_and_counted(
    hybrid: tuple[Env, dict[str, Any]],  # noqa: F811
    capsys: pytest.CaptureFixture[str],
    caplog: pytest.LogCaptureFixture,
) -> None:
    """A cloud instance is observed, not registered: one launched with an address an on-premise
    host holds shares it (nothing can refuse the cloud). Compute logs each such address with its
    holders and counts ``AddressesShared``."""
    env, est = hybrid
    shared = "10.1.3.200"  # in the database subnet, free
    assert register(env, {**DB, "ips": [shared]})[0] == 201
    env.pump()
    capsys.readouterr()
    (iid,) = [
        i["InstanceId"]
        for i in env.ec2.run_instances(
            ImageId=env.ami,
            MinCount=1,
            MaxCount=1,
            InstanceType="t3.micro",
            SubnetId=est["subnets"]["db"],
            PrivateIpAddress=shared,
            TagSpecifications=[
                {"ResourceType": "instance", "Tags": [{"Key": "ringfence:role", "Value": "web"}]},
            ],
        )["Instances"]
    ]
    assert ip_of(env, iid) == shared
    with caplog.at_level(logging.WARNING):
        env.put(env.state_event(iid, "running"))
        env.pump()
    assert _owners(env, shared) == sorted(["dc1-db-1", iid])
    assert emitted(capsys.readouterr().out).get("AddressesShared", 0) >= 1
    assert any(
        "held by more than one active workload" in r.getMessage() and shared in r.getMessage() for r in caplog.records
    ), [r.getMessage() for r in caplog.records]


# --- F3: an import is every row or none --------------------------------------------------------


@pytest.mark.parametrize("case", ["many-addresses", "renumbering"])
def test_attack_an_import_too_large_for_one_transaction_is_refused_before_anything_is_written(
    hybrid: tuple[Env, dict[str, Any]],  # noqa: F811
    case: str,
) -> None:
    """A CMDB import is "every row or none", but DynamoDB wrote it group by group, and a group of
    more than 100 transaction items raised after the groups before it were written (500, part of
    the file registered, nothing handed to compute). (a) a host with 100 addresses after an
    ordinary row; (b) 60 registered hosts each taking its neighbour's address (one group: 120
    items). Every group is sized first: the file is refused whole (400, file:line, the limit)."""
    env, _ = hybrid
    first = "id,ips\n" + "".join(f"dc4-{i:03d},10.44.0.{i + 1}\n" for i in range(60))
    if case == "renumbering":
        status, answer = _import(env, first, "base.csv")
        assert status == 200, answer
        rows = "".join(f"dc4-{i:03d},10.44.0.{(i + 1) % 60 + 1}\n" for i in range(60))
        line = 3  # the first row of the group
    else:
        rows = "dc4-vip," + ";".join(f"10.45.0.{i + 1}" for i in range(100)) + "\n"
        line = 3
    status, answer = _import(env, "id,ips\ndc4-new,10.46.0.1\n" + rows)
    assert status == 400, answer
    assert f"dc4.csv:{line}:1:" in answer["detail"] and "(100)" in answer["detail"], answer
    assert answer["error"] == "CMDB file rejected: nothing imported"
    assert env.store.get("dc4-new") is None, "nothing written"
    if case == "renumbering":
        assert all(
            (r := env.store.get(f"dc4-{i:03d}")) is not None and r.workload.ips == [f"10.44.0.{i + 1}"]
            for i in range(60)
        )
    else:
        assert env.store.get("dc4-vip") is None
    (failed,) = audits(env, "workload.import.failed", "dc4.csv")
    assert "(100)" in failed.detail["why"]
    # a host given 100 addresses by a registration is refused the same way (400, not 500)
    status, answer = register(env, {"id": "dc4-one", "ips": [f"10.47.0.{i + 1}" for i in range(100)]})
    assert status == 400 and "(100)" in answer["detail"], answer
    assert env.store.get("dc4-one") is None
    # 99 addresses are one transaction (100 items): registered
    status, answer = register(env, {"id": "dc4-one", "ips": [f"10.47.0.{i + 1}" for i in range(99)]})
    assert status == 201, answer


def test_attack_an_import_that_loses_a_race_part_way_says_what_it_wrote_and_computes_it(
    hybrid: tuple[Env, dict[str, Any]],  # noqa: F811
) -> None:
    """Past the checks, another writer (a second admin container) takes the address of the
    file's second row just before its transaction: the first row stands (one transaction per
    row over DynamoDB). The answer (409) and the audit record (``workload.import.partial``) say
    which were written, and those are handed to compute: the peers' sets name them."""
    env, est = hybrid
    racer = "192.168.77.2"
    fired: list[str] = []

    def race(params: dict[str, Any], **_: Any) -> None:
        if fired or f"addrowner#{racer}" not in str(params.get("TransactItems")):
            return
        fired.append("raced")
        rec = InventoryRecord(
            id="dc7-racer",
            workload=Workload(id="dc7-racer", ips=[racer], cloud="onprem"),
            state="running",
            observed_at=time.time(),
        )
        env.store.observe_addressed([rec])  # the other container's registration lands first

    env.load_functions()  # cold containers, whose clients carry the hook
    env.hook("before-parameter-build.dynamodb.TransactWriteItems", race)
    header = "id,ips,site,ringfence:role,ringfence:app,ringfence:env,ringfence:loc\n"
    csv = header + (
        "dc7-db-1,192.168.77.1,dc7,database,ordering,prod,ca\ndc7-db-2," + racer + ",dc7,database,ordering,prod,ca\n"
    )
    status, answer = _import(env, csv, "dc7.csv")
    assert fired == ["raced"]
    assert status == 409 and answer["error"] == "CMDB file partly imported: import it again", answer
    assert "1 of 2 workloads were written" in answer["detail"] and "dc7-db-1" in answer["detail"], answer
    assert racer in answer["detail"] and "dc7-racer" in answer["detail"], answer
    assert (rec := env.store.get("dc7-db-1")) is not None and rec.active
    assert env.store.get("dc7-db-2") is None
    (partial,) = audits(env, "workload.import.partial", "dc7.csv")
    assert "dc7-db-1" in partial.detail["why"]
    env.pump()  # what was written went to compute: its peers' sets name it
    assert in_set(env.bundle(est["ids"]["proc"][0]), "192.168.77.1")
