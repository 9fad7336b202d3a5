"""Effective policy, checked (docs/visibility.md): a real agent programs nftables in its own network
namespace, reports what it reads back out of the kernel with each heartbeat to ``ringfence serve``,
and the control plane compares it with the bundle it published.

- the digest the agent reads back equals the one the control plane computes from the bundle, for
  enforce, observe, quarantine, grouped rules (concatenated and expanded) and after a set delta;
- happy path: no finding; an element deleted from a set inside the namespace (which the agent's
  own tamper check does not see) and a flushed chain are ``kernel-mismatch`` findings, in
  ``ringfence findings`` and ``GET /admin/findings``; the agent stopped: ``silent``;
- ``not-enforced`` and ``silent`` from stored reports (SQLite)."""

from __future__ import annotations

import json
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from ringfence import bundlewire as wire
from ringfence import enforced
from ringfence.local.lab import Lab as NetLab
from ringfence.local.lab import prerequisites
from ringfence.store.base import BundlePointer, EnforcementReport, InventoryRecord
from ringfence.store.sqlite import SqliteStore
from tests.agent.bundles import GOLDEN, GROUP_POLICY, PUBLIC_KEY, write
from tests.agent.bundles import Lab as BundleLab
from tests.agent.bundles import workloads as lab_workloads
from tests.agentproc import BIN, wait_until
from tests.onprem.conftest import ESTATE, policy_files
from tests.onprem.labserve import LabServe, start_paired_agent

TOKEN = "drift-admin-token-0123456789abcdef0"

needs_lab = pytest.mark.skipif(prerequisites() is not None, reason=str(prerequisites()))


@pytest.fixture(scope="module")
def net() -> Iterator[NetLab]:
    lab = NetLab({"cp": 1, "h": 2})
    try:
        yield lab
    finally:
        lab.close()


def _digest_in_kernel(net: NetLab, state: Path, backend: str = "nftables") -> str:
    out = net.agent("h", "status", "--state-dir", str(state), "--backend", backend, "--json", check=True)
    digest: str = json.loads(out.stdout)["kernel_digest"]
    return digest


def _apply(net: NetLab, doc: wire.Bundle | Any, state: Path, tmp: Path, backend: str = "nftables") -> None:
    path = write(doc, tmp / f"bundle-{time.monotonic_ns()}.json")
    args = ["apply", "--bundle", str(path), "--public-key", str(PUBLIC_KEY), "--state-dir", str(state)]
    r = net.agent("h", *args, "--backend", backend)
    assert r.returncode == 0, r.stderr


@needs_lab
@pytest.mark.parametrize(
    ("backend", "bound"),
    [("nftables", None), ("nftables", "0"), ("iptables", None)],
    ids=["nft-concatenated-groups", "nft-expanded-groups", "iptables"],
)
def test_the_kernel_read_back_matches_the_published_digest(
    net: NetLab, tmp_path: Path, backend: str, bound: str | None, monkeypatch: pytest.MonkeyPatch
) -> None:
    if bound is not None:
        monkeypatch.setenv("RINGFENCE_NFT_GROUP_BOUND", bound)
    net.reset("h")
    state = tmp_path / "state"
    for name in (
        "bundle-ord-prod-proc-1.json",  # enforce, override-deny and denies
        "bundle-pay-dev-web-1-observe.json",  # observe: denies accept (counted)
        "bundle-ord-prod-web-1-quarantined.json",
    ):
        doc = wire.load_bundle((GOLDEN / name).read_bytes())
        _apply(net, doc, tmp_path / name, tmp_path, backend)  # a state dir per workload
        assert _digest_in_kernel(net, tmp_path / name, backend) == enforced.expected(doc), name
    # grouped rules, then a set delta moving an address in and one out
    hosts = {
        "h1": ("10.77.0.11", "fd77::11", "client"),
        "h2": ("10.77.0.12", "fd77::12", "web"),
        "h3": ("10.77.0.13", "fd77::13", "db"),
        "h4": ("10.77.0.14", "fd77::14", "other"),
    }
    lab = BundleLab(GROUP_POLICY, lab_workloads(hosts))
    doc = lab.bundle("h2")
    _apply(net, doc, state, tmp_path, backend)
    wdoc = wire.load_bundle(write(doc, tmp_path / "g.json").read_bytes())
    assert any(r.members for r in wdoc.inbound)
    assert _digest_in_kernel(net, state, backend) == enforced.expected(wdoc)
    ws = lab_workloads({**hosts, "h5": ("10.77.0.15", "fd77::15", "client")})
    deltas = lab.upsert(ws[-1])
    assert deltas
    paths = [write(d, tmp_path / f"delta-{i}.json") for i, d in enumerate(deltas)]
    args = ["apply-delta", *[x for p in paths for x in ("--delta", str(p))]]
    r = net.agent("h", *args, "--public-key", str(PUBLIC_KEY), "--state-dir", str(state), "--backend", backend)
    assert r.returncode == 0, r.stderr
    wdeltas = [wire.load_delta(p.read_bytes()) for p in paths]
    after = _digest_in_kernel(net, state, backend)
    assert after == enforced.expected(wdoc, wdeltas) != enforced.expected(wdoc)
    # an address taken out of the kernel behind the agent's back: another digest
    moved = next(d for d in wdeltas if any(x.startswith("10.77.0.15") for x in d.add))
    if backend == "nftables":
        net.exec(
            "h", "nft", "delete", "element", "inet", "ringfence", f"s_{moved.set}_4h", "{ 10.77.0.15 }", check=True
        )
    else:
        gone = [net.exec("h", "ipset", "del", f"rf-s-{moved.set}-4{g}", "10.77.0.15").returncode for g in "ab"]
        assert 0 in gone
    assert _digest_in_kernel(net, state, backend) != after
    net.reset("h")
    assert _digest_in_kernel(net, state, backend) == enforced.digest({}, {}) != after  # nothing held


class Serve(LabServe):
    """``ringfence serve`` in the lab's control-plane namespace, the test's admin calls made from
    there, its findings pass sending to a SIEM file every half second."""

    def __init__(self, net: NetLab, tmp: Path) -> None:
        self.siem = tmp / "siem.jsonl"  # where serve's findings pass sends what it finds
        super().__init__(net, tmp, TOKEN, ["--siem", f"file:{self.siem}"], env={"RINGFENCE_FINDINGS_INTERVAL": "0.5"})

    def siem_findings(self) -> list[dict[str, Any]]:
        """The effective-policy findings serve's findings pass sent to its SIEM file so far (the
        policy's warnings over this small estate go there too)."""
        if not self.siem.exists():
            return []
        events = [json.loads(line) for line in self.siem.read_text().splitlines() if line.strip()]
        return [
            e
            for e in events
            if e.get("class_uid") == 2004 and e["finding_info"]["analytic"]["name"].startswith("effective-policy/")
        ]

    def findings(self, bound: float = 120) -> dict[str, Any]:
        """``ringfence findings`` on the server's store (exit 1 when any); the admin route agrees."""
        r = subprocess.run(
            [str(BIN / "ringfence"), "findings", "--store", f"sqlite:{self.db}", "--json", "--bound", str(bound)],
            capture_output=True,
            text=True,
            timeout=60,
        )
        doc: dict[str, Any] = json.loads(r.stdout)
        assert r.returncode == (1 if doc["findings"] else 0), r.stderr
        api = self.admin("GET", f"/admin/findings?bound={bound}")
        assert api.status_code == 200, api.text
        assert [(f["kind"], f["workload_id"]) for f in api.json()["findings"]] == [
            (f["kind"], f["workload_id"]) for f in doc["findings"]
        ]
        return doc


def _kinds(doc: dict[str, Any]) -> list[tuple[str, str]]:
    return [(f["kind"], f["workload_id"]) for f in doc["findings"]]


def _elements(elem: list[Any]) -> list[str]:
    """The elements of an ``nft -j`` set, as nft takes them back."""
    return [f"{e['prefix']['addr']}/{e['prefix']['len']}" if isinstance(e, dict) else str(e) for e in elem]


@needs_lab
@pytest.mark.slow
def test_a_tampered_kernel_is_a_finding_and_a_silent_agent_too(net: NetLab, tmp_path: Path) -> None:
    net.reset("h")
    srv = Serve(net, tmp_path)
    for spec in ESTATE:
        assert srv.admin("POST", "/admin/workloads", {**spec, "reason": "rack 1"}).status_code == 201
    r = srv.admin("POST", "/admin/policies", {"files": policy_files(), "reason": "initial"})
    assert r.status_code == 201, r.text
    wid = "dc1-proc-1"
    # the agent's own tamper repair off: the control plane must see it. Heartbeats go out between
    # long-polls: one of 1 s (not labserve's 5) lets each come at heartbeat_interval, which the
    # waits for "a heartbeat after" below would otherwise sit out
    agent, log = start_paired_agent(net, srv, tmp_path, wid, drift_interval=0, wait_timeout=1)
    store = SqliteStore(srv.db)

    def report() -> EnforcementReport | None:
        rep = store.enforcement(wid)
        return rep if rep is not None and rep.expected_digest is not None else None

    def fresh(after: float) -> EnforcementReport | None:
        rep = report()
        return rep if rep is not None and rep.time > after else None

    rep = wait_until(report, 60, "a heartbeat with the kernel's digest at the newest version", log)
    assert rep.kernel_digest == rep.expected_digest and rep.version == rep.latest_version
    assert srv.findings()["findings"] == [] and srv.findings()["checked"] == 1

    # an address deleted from a bundle set inside the namespace: the agent's tamper check (chains
    # and rules) would not see it; the digest does
    sets = json.loads(net.exec("h", "nft", "-j", "list", "sets", "inet", check=True).stdout)["nftables"]
    victim = next(s["set"] for s in sets if "set" in s and s["set"]["name"].startswith("s_") and s["set"].get("elem"))
    elem = victim["elem"][0]
    text = f"{elem['prefix']['addr']}/{elem['prefix']['len']}" if isinstance(elem, dict) else str(elem)
    net.exec("h", "nft", "delete", "element", "inet", "ringfence", victim["name"], f"{{ {text} }}", check=True)
    t = time.time()
    rep = wait_until(lambda: fresh(t), 30, "a heartbeat after the tamper", log)
    assert rep.kernel_digest != rep.expected_digest
    assert _kinds(srv.findings()) == [("kernel-mismatch", wid)]
    # and serve told its SIEM, once, as an OCSF Detection Finding
    sent = wait_until(srv.siem_findings, 15, "the kernel-mismatch finding in the SIEM file", srv.log)
    assert [(e["finding_info"]["analytic"]["name"], e["resources"][0]["uid"]) for e in sent] == [
        ("effective-policy/kernel-mismatch", wid)
    ], sent
    time.sleep(1.5)  # three more passes
    assert len(srv.siem_findings()) == 1, "announced once while the condition lasts"

    # put back: no finding; then the input chain flushed: a finding again
    net.exec("h", "nft", "add", "element", "inet", "ringfence", victim["name"], f"{{ {text} }}", check=True)
    t = time.time()
    wait_until(lambda: fresh(t), 30, "a heartbeat after the repair", log)
    assert srv.findings()["findings"] == []
    net.exec("h", "nft", "flush", "chain", "inet", "ringfence", "input", check=True)
    t = time.time()
    wait_until(lambda: fresh(t), 30, "a heartbeat after the flush", log)
    doc = srv.findings()
    assert _kinds(doc) == [("kernel-mismatch", wid)] and "other rules" in doc["findings"][0]["detail"]

    # the agent stopped: silent past the bound, within the 2.5 s after the kill the test used to
    # sleep (its last heartbeat came up to a second before): the store polled in-process until
    # then, then asked as an operator would
    net.kill(agent)
    from ringfence.control.findings import findings

    def silent() -> bool:
        return [(f.kind, f.workload_id) for f in findings(store, bound=2).findings] == [("silent", wid)]

    wait_until(silent, 2.5, "silent past the bound", log)
    assert _kinds(srv.findings(bound=2)) == [("silent", wid)]
    net.kill(srv.proc)
    net.reset("h")


@needs_lab
def test_attack_an_address_added_to_a_bundle_set_and_repaired_by_the_agent_is_a_tampered_finding(
    net: NetLab, tmp_path: Path
) -> None:
    """Root on one workload adds an address to a bundle set (``nft add element ... s_...``): the
    real daemon (drift_interval > 0) repairs it at its next heartbeat and reports the repaired
    kernel digest, so no ``kernel-mismatch``; its ``tamper_reapplied`` counter rose, and the
    control plane makes that a ``tampered`` finding (``ringfence findings``, GET /admin/findings)
    and sends it to the SIEM once. The allowed flow keeps working, the attacker's address is gone."""
    net.reset("h")
    srv = Serve(net, tmp_path)
    wid = "dc1-proc-1"
    lab_ips = {"dc1-web-1": [net.v4("cp")], wid: [net.v4("h")]}  # web (cp) may reach processing (h) on 8443
    for spec in ESTATE:
        body = {**spec, "ips": lab_ips.get(spec["id"], spec["ips"]), "reason": "rack 1"}
        assert srv.admin("POST", "/admin/workloads", body).status_code == 201
    r = srv.admin("POST", "/admin/policies", {"files": policy_files(), "reason": "initial"})
    assert r.status_code == 201, r.text
    # long-polls of 1 s: heartbeats (and with them the repair) at heartbeat_interval, as above
    agent, log = start_paired_agent(net, srv, tmp_path, wid, drift_interval=1, wait_timeout=1)
    store = SqliteStore(srv.db)

    def fresh(after: float) -> EnforcementReport | None:
        rep = store.enforcement(wid)
        return rep if rep is not None and rep.expected_digest is not None and rep.time > after else None

    rep = wait_until(lambda: fresh(0), 60, "a heartbeat with the kernel's digest at the newest version", log)
    assert rep.kernel_digest == rep.expected_digest and not rep.tamper_reapplied and rep.tampered_at is None
    probe = net.serve("h", tcp=[8443])  # processing-api (serve itself listens in cp)
    try:
        assert net.tcp("cp", "h", 8443), "web → processing on 8443 before the tamper"
        assert srv.findings()["findings"] == []

        # the attacker adds an address of its own to the set that lets web in
        sets = json.loads(net.exec("h", "nft", "-j", "list", "sets", "inet", check=True).stdout)["nftables"]
        victim = next(
            s["set"]
            for s in sets
            if "set" in s and s["set"]["name"].startswith("s_") and net.v4("cp") in str(s["set"].get("elem"))
        )
        intruder = "10.77.0.99"
        net.exec("h", "nft", "add", "element", "inet", "ringfence", victim["name"], f"{{ {intruder} }}", check=True)
        t = time.time()

        def tampered() -> dict[str, Any] | None:
            got = fresh(t)
            return srv.findings() if got is not None and got.tampered_at is not None else None

        doc = wait_until(tampered, 30, "a heartbeat reporting the repair", log)
        assert _kinds(doc) == [("tampered", wid)], doc  # repaired: no kernel-mismatch
        (f,) = doc["findings"]
        assert f["repairs"] == 1 and f["since"] >= t and "re-applied them 1 time" in f["detail"], f
        rep = store.enforcement(wid)
        assert rep is not None and rep.kernel_digest == rep.expected_digest and rep.tamper_reapplied == 1
        listed = json.loads(
            net.exec("h", "nft", "-j", "list", "set", "inet", "ringfence", victim["name"], check=True).stdout
        )
        elems = next(x["set"] for x in listed["nftables"] if "set" in x).get("elem", [])
        assert intruder not in _elements(elems) and f"{net.v4('cp')}" in str(elems)

        # the SIEM hears of it once, as an OCSF Detection Finding, while it lasts
        sent = wait_until(srv.siem_findings, 15, "the tampered finding in the SIEM file", srv.log)
        assert [(e["finding_info"]["analytic"]["name"], e["resources"][0]["uid"]) for e in sent] == [
            ("effective-policy/tampered", wid)
        ], sent
        time.sleep(2)  # more heartbeats (the counter unchanged) and findings passes
        assert len(srv.siem_findings()) == 1, "announced once per rise"
        assert _kinds(srv.findings()) == [("tampered", wid)], "lasts after the repair (a day)"
        assert net.tcp("cp", "h", 8443), "the allowed flow keeps working after the repair"
    finally:
        net.kill(probe)
        net.kill(agent)
        net.kill(srv.proc)
        net.reset("h")


def test_not_enforced_and_silent_from_stored_reports(tmp_path: Path) -> None:
    from ringfence.control.findings import findings
    from ringfence.model import Workload

    store = SqliteStore(tmp_path / "s.db")
    now = 10_000.0
    for wid in ("a", "b", "c", "d"):
        rec = InventoryRecord(
            id=wid, workload=Workload(id=wid, ips=["10.0.0.1"], tags={}), state="running", observed_at=1
        )
        store.observe(rec)
        store.set_liveness(wid, enrolled=True, heartbeat=now - 5)
        store.put_bundle_pointer(
            BundlePointer(
                workload_id=wid, version=7, key=f"k{wid}", etag='"7"', rules_revision=7, published_at=now - 300
            )
        )
    store.put_enforcement(EnforcementReport(workload_id="a", time=now - 5, version=7, latest_version=7))
    store.put_enforcement(EnforcementReport(workload_id="b", time=now - 5, version=6, latest_version=7))
    store.put_enforcement(EnforcementReport(workload_id="c", time=now - 500, version=7, latest_version=7))
    store.set_liveness("c", heartbeat=now - 500)
    # d: a heartbeat, but published only 30 s ago and not applied yet: within the bound
    store.put_bundle_pointer(
        BundlePointer(workload_id="d", version=8, key="kd8", etag='"8"', rules_revision=8, published_at=now - 30)
    )
    store.put_enforcement(EnforcementReport(workload_id="d", time=now - 5, version=7, latest_version=8))
    # e: moved on by a set delta after its last heartbeat (no publish time): the next heartbeat decides
    rec = InventoryRecord(id="e", workload=Workload(id="e", ips=["10.0.0.2"], tags={}), state="running", observed_at=1)
    store.observe(rec)
    store.set_liveness("e", enrolled=True, heartbeat=now - 5)
    store.put_bundle_pointer(
        BundlePointer(workload_id="e", version=7, key="ke", etag='"7"', rules_revision=7, sets={"s": 7})
    )
    store.put_set_head("s", 9)
    store.put_enforcement(EnforcementReport(workload_id="e", time=now - 100, version=7, latest_version=7))
    res = findings(store, bound=120, now=now)
    assert [(f.kind, f.workload_id) for f in res.findings] == [("not-enforced", "b"), ("silent", "c")]
    assert res.checked == 5
    assert [(f.kind, f.workload_id) for f in findings(store, bound=20, now=now).findings] == [
        ("not-enforced", "b"),
        ("silent", "c"),
        ("not-enforced", "d"),
    ]


def _enrolled_at_version_7(store: Any, wids: tuple[str, ...], heartbeat: float) -> None:
    """Running, enrolled workloads whose newest bundle is version 7, last heard at ``heartbeat``."""
    from ringfence.model import Workload

    for wid in wids:
        store.observe(
            InventoryRecord(
                id=wid, workload=Workload(id=wid, ips=["10.0.0.1"], tags={}), state="running", observed_at=1
            )
        )
        store.set_liveness(wid, enrolled=True, heartbeat=heartbeat)
        store.put_bundle_pointer(
            BundlePointer(workload_id=wid, version=7, key=f"k{wid}", etag='"7"', rules_revision=7, published_at=1)
        )


def test_findings_reach_the_siem_once_each_as_valid_ocsf(tmp_path: Path) -> None:
    """``announce`` (serve's findings pass, the AWS reconcile function): each finding goes to the
    SIEM once while its condition lasts, as a Detection Finding valid against the OCSF schema; a
    new condition for the same workload (a newer version not enforced) is a new finding."""
    from ringfence.control.findings import announce
    from ringfence.serve import build_wiring
    from tests.siem.test_siem import validate

    siem = tmp_path / "siem.jsonl"
    w = build_wiring(f"sqlite:{tmp_path / 'state' / 's.db'}", siem=f"file:{siem}")
    try:
        now = 10_000.0
        _enrolled_at_version_7(w.store, ("a", "b"), heartbeat=now - 5)
        w.store.put_enforcement(EnforcementReport(workload_id="a", time=now - 5, version=7, latest_version=7))
        w.store.put_enforcement(EnforcementReport(workload_id="b", time=now - 5, version=6, latest_version=7))

        def sent() -> list[dict[str, Any]]:
            w.siem.close()  # flushed to the file
            return [json.loads(line) for line in siem.read_text().splitlines()] if siem.exists() else []

        assert [(f.kind, f.workload_id) for f in announce(w, bound=120, now=now)] == [("not-enforced", "b")]
        assert announce(w, bound=120, now=now + 30) == [], "the same condition: not announced again"
        (event,) = sent()
        validate(event)
        assert event["class_uid"] == 2004 and event["resources"][0]["uid"] == "b"
        assert event["finding_info"]["analytic"]["name"] == "effective-policy/not-enforced"
        assert event["finding_info"]["uid"] == "drift:not-enforced:b:v7"
        w.store.put_bundle_pointer(
            BundlePointer(workload_id="b", version=8, key="kb8", etag='"8"', rules_revision=8, published_at=2)
        )
        got = announce(w, bound=120, now=now + 60)
        assert [(f.workload_id, f.latest_version) for f in got] == [("b", 8)], got
        assert [e["finding_info"]["uid"] for e in sent()] == ["drift:not-enforced:b:v7", "drift:not-enforced:b:v8"]
    finally:
        w.close()


def test_policy_warnings_over_the_estate_reach_the_siem_as_it_changes(tmp_path: Path) -> None:
    """The findings pass also sends the active policy's warnings over the estate (a selector that
    matches no workload, a rule that pairs none), once each per policy version: those provisioning
    warned of, then those a change of the estate makes (the only database decommissioned)."""
    from ringfence.control.findings import announce_policy
    from ringfence.local.wiring import LocalWiring
    from ringfence.siem import Siem
    from tests.onprem.conftest import boot, signing_key_file
    from tests.siem.test_siem import validate

    w = LocalWiring(tmp_path / "state" / "s.db", signing_key=signing_key_file(tmp_path))
    out = tmp_path / "siem.jsonl"
    w.siem = Siem.from_spec(f"file:{out}")
    try:
        admin = boot(w)
        first = announce_policy(w)
        assert ("core-services/dns", "no-workload") in {(d["rule"], d["kind"]) for d in first}
        assert announce_policy(w) == [], "announced once per policy version"
        assert admin.deregister_workload("alice", "dc1-db-1", "decommissioned").status == 200
        later = announce_policy(w)
        assert later and all("database" in d["message"] for d in later), later
        w.siem.close()
        events = [e for e in map(json.loads, out.read_text().splitlines()) if e["class_uid"] == 2004]
        assert len(events) == len(first) + len(later)  # (the admin's audit records went there too)
        for e in events:
            validate(e)
            assert e["finding_info"]["analytic"]["name"].startswith("policy/")
    finally:
        w.close()


def test_the_tamper_counter_rises_falls_and_is_missing_from_old_agents() -> None:
    """The agent API's bookkeeping of ``tamper_reapplied`` (``tamper_progress``): a rise between
    two heartbeats is a repaired tamper; a fall is the agent's state dir reset (a new baseline,
    not a tamper, and a tamper already seen stays); no counter (an old agent, or one that never
    repaired) is 0; the first report, or one an older control plane wrote, is only a baseline."""
    from ringfence.control.findings import TAMPER_WINDOW, tamper_progress

    def rep(**kw: Any) -> EnforcementReport:
        return EnforcementReport(workload_id="w", time=1, version=1, **kw)

    def step(before: EnforcementReport | None, counter: int | None, now: float) -> EnforcementReport:
        counters = {} if counter is None else {"tamper_reapplied": counter, "applied": 3}
        return rep(**tamper_progress(before, counters, now))

    first = step(None, 4, 100)  # history this control plane did not see
    assert (first.tamper_reapplied, first.tampered_at, first.tamper_repairs) == (4, None, 0)
    older = step(rep(), 9, 150)  # a report written before the control plane kept the counter
    assert (older.tamper_reapplied, older.tampered_at) == (9, None)
    rose = step(first, 6, 200)
    assert (rose.tamper_reapplied, rose.tampered_at, rose.tamper_repairs) == (6, 200, 2)
    same = step(rose, 6, 260)
    assert (same.tampered_at, same.tamper_repairs) == (200, 2)
    fell = step(same, 0, 300)  # the daemon's state dir reset: status.json's counters start again
    assert (fell.tamper_reapplied, fell.tampered_at, fell.tamper_repairs) == (0, 200, 2)
    again = step(fell, 1, 400)
    assert (again.tampered_at, again.tamper_repairs) == (400, 3)
    later = step(again, 2, 400 + TAMPER_WINDOW + 1)  # the last one out of the window: a new episode
    assert (later.tampered_at, later.tamper_repairs) == (400 + TAMPER_WINDOW + 1, 1)
    old_agent = step(step(None, None, 100), None, 200)
    assert (old_agent.tamper_reapplied, old_agent.tampered_at) == (0, None)
    assert step(old_agent, 1, 300).tampered_at == 300, "an absent counter is 0: its first repair rises"
    assert step(step(None, 3, 100), -5, 200).tamper_reapplied == 0


def test_a_repaired_tamper_is_a_finding_for_a_day_and_reaches_the_siem_once_per_rise(tmp_path: Path) -> None:
    """``tampered`` from stored reports: alongside another finding of the workload, gone once
    the window has passed since the last rise; announced once per rise, valid OCSF."""
    from ringfence.control.findings import TAMPER_WINDOW, announce, findings
    from ringfence.serve import build_wiring
    from tests.siem.test_siem import validate

    siem = tmp_path / "siem.jsonl"
    w = build_wiring(f"sqlite:{tmp_path / 'state' / 's.db'}", siem=f"file:{siem}")
    try:
        now = 100_000.0
        _enrolled_at_version_7(w.store, ("a", "b"), heartbeat=now - 5)
        w.store.put_enforcement(
            EnforcementReport(
                workload_id="a", time=now - 5, version=7, latest_version=7, tamper_reapplied=2,
                tampered_at=now - 3600, tamper_repairs=2,
            )
        )  # fmt: skip
        w.store.put_enforcement(
            EnforcementReport(
                workload_id="b", time=now - 5, version=7, latest_version=7, kernel_digest="0" * 64,
                expected_digest="1" * 64, tamper_reapplied=1, tampered_at=now - 60, tamper_repairs=1,
            )
        )  # fmt: skip
        res = findings(w.store, bound=120, now=now)
        assert [(f.kind, f.workload_id) for f in res.findings] == [
            ("tampered", "a"),
            ("tampered", "b"),
            ("kernel-mismatch", "b"),
        ]
        assert res.findings[0].repairs == 2 and "re-applied them 2 times" in res.findings[0].detail
        assert res.findings[0].since == now - 3600 and res.tamper_window == TAMPER_WINDOW

        def tampered_at(t: float) -> list[str]:  # (both silent by then too)
            return [f.workload_id for f in findings(w.store, 120, t).findings if f.kind == "tampered"]

        assert tampered_at(now + TAMPER_WINDOW - 3600) == ["a", "b"]
        assert tampered_at(now + TAMPER_WINDOW - 3599) == ["b"], "a day after the last rise: no longer"
        assert tampered_at(now + TAMPER_WINDOW) == []

        def sent() -> list[dict[str, Any]]:
            w.siem.close()  # flushed to the file
            return [json.loads(line) for line in siem.read_text().splitlines()] if siem.exists() else []

        def tampered() -> list[dict[str, Any]]:
            return [e for e in sent() if e["finding_info"]["analytic"]["name"] == "effective-policy/tampered"]

        assert len(announce(w, bound=120, now=now)) == 3
        assert announce(w, bound=120, now=now + 30) == [], "the same rise: not announced again"
        assert [e["resources"][0]["uid"] for e in tampered()] == ["a", "b"]
        for e in tampered():
            validate(e)
            assert e["severity_id"] == 4 and e["finding_info"]["uid"].startswith(
                f"drift:tampered:{e['resources'][0]['uid']}:"
            )
        rep = w.store.enforcement("a")
        assert rep is not None
        w.store.put_enforcement(
            rep.model_copy(update={"tamper_reapplied": 3, "tampered_at": now + 40, "tamper_repairs": 3})
        )
        assert [(f.kind, f.workload_id) for f in announce(w, bound=120, now=now + 60)] == [("tampered", "a")]
        assert [e["resources"][0]["uid"] for e in tampered()] == ["a", "b", "a"], "a new rise: a new finding"
    finally:
        w.close()
