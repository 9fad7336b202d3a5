"""Build signed lab bundles and deltas with the real policy engine (test-only key)."""

from __future__ import annotations

import dataclasses
import json
import subprocess
from pathlib import Path
from typing import Any, TypeVar

from ringfence import bundle
from ringfence import bundlewire as wire
from ringfence.addresses import format_prefix
from ringfence.engine import Engine
from ringfence.model import Workload
from ringfence.policy import load_policy_texts

GOLDEN = Path(__file__).resolve().parents[1] / "golden"
PUBLIC_KEY = GOLDEN / "test-key.pub.pem"


def static_agent_config(
    path: Path, state_dir: str, *, backend: str = "dry-run", source: Path | None = None, mode: int = 0o644
) -> Path:
    """An agent config at ``path`` pinned to the lab key, whose static source is not there yet
    (a daemon waits for it): what the root-CLI tests hand ``run``."""
    doc = {
        "workload_id": "ord-prod-proc-1",
        "public_key": str(PUBLIC_KEY),
        "state_dir": state_dir,
        "backend": backend,
        "source": str(source if source is not None else path.parent / "no-source-yet"),
        "admin_cidrs": [],
        "control_plane": ["10.9.9.9"],
    }
    path.write_text(json.dumps(doc))
    path.chmod(mode)
    return path


def key() -> bundle.SigningKey:
    return bundle.SigningKey.from_file(GOLDEN / "test-key.pem")


# the lab's failsafes: ssh from its admin host adm, which no bundle may lock out
LAB_FAILSAFES: dict[str, list[str]] = {"admin_cidrs": ["10.77.0.250/32"], "admin_ports": ["tcp/22"]}


def policy_head(*dimensions: str, failsafes: dict[str, list[str]] = LAB_FAILSAFES) -> str:
    """The start of a test policy: label ``dimensions`` each read from the tag key
    ``ringfence:<name>``, then ``defaults``: enforce mode and ``failsafes`` (YAML flow lists)."""
    dims = "".join(f'    {d}: {{keys: ["ringfence:{d}"]}}\n' for d in dimensions)
    safe = "".join(f"    {k}: {json.dumps(v)}\n" for k, v in failsafes.items())
    return f"labels:\n  dimensions:\n{dims}defaults:\n  mode: enforce\n  failsafes:\n{safe}"


LAB_POLICY = (
    policy_head("role", "app", "env")
    + """
services:
  - {name: web, ports: [tcp/8080, udp/5353]}
  - {name: db, ports: [tcp/5432]}
  - {name: ssh, ports: [tcp/22]}
rulesets:
  - name: lab
    scope: app == lab
    same: []
    rules:
      - {name: client-to-web, from: role == client, to: role == web, services: [web]}
      - {name: web-to-db, from: role == web, to: role == db, services: [db]}
"""
)

DENY_ALL_POLICY = (
    policy_head("role", "app")
    + """
services:
  - {name: all-traffic, ports: [any]}
rulesets:
  - name: lockdown
    scope: all()
    same: []
    rules:
      - {name: everyone-denied, from: all(), to: all(), services: [all-traffic], action: override-deny}
      # an allow under it keeps the override-deny in the bundles: the engine leaves out a deny
      # no allow overlaps (it decides nothing), and these tests need one over the admin range
      - {name: ssh-overridden, from: all(), to: all(), services: [all-traffic]}
"""
)

OBSERVE_POLICY = LAB_POLICY.replace("mode: enforce", "mode: observe")

# precedence: an override-deny beats a later allow; a plain deny only catches what no allow took
PRECEDENCE_POLICY = (
    LAB_POLICY
    + """
  - name: guard
    scope: app == lab
    same: []
    rules:
      - {name: admins-never-web, from: role == admin, to: role == web, services: [web], action: override-deny}
      - {name: admins-allowed, from: role == admin, to: role == web, services: [web]}
      - {name: strangers-out, from: all(), to: role == web, services: [web], action: deny}
"""
)


def workloads(hosts: dict[str, tuple[str, str, str]]) -> list[Workload]:
    """name → (ipv4, ipv6, role)."""
    return [
        Workload(id=name, ips=[v4, v6], tags={"ringfence:role": role, "ringfence:app": "lab", "ringfence:env": "test"})
        for name, (v4, v6, role) in hosts.items()
    ]


class Lab:
    """An engine over the lab policy; renders signed bundles and deltas on demand."""

    def __init__(self, policy_text: str, ws: list[Workload], policy_version: int = 1) -> None:
        self.engine = Engine(load_policy_texts({"lab.yaml": policy_text}), policy_version=policy_version)
        self.engine.load(ws)
        self.signer = key()

    def bundle(self, wid: str) -> bundle.Bundle:
        doc = bundle.Bundle.model_validate(self.engine.render(wid))
        return bundle.sign(doc, self.signer)

    def upsert(self, w: Workload) -> list[bundle.SetDelta]:
        return self._deltas(self.engine.upsert(w))

    def remove(self, wid: str) -> list[bundle.SetDelta]:
        return self._deltas(self.engine.remove(wid))

    def _deltas(self, upd: object) -> list[bundle.SetDelta]:
        out = []
        for name, (from_v, added, removed) in sorted(upd.set_deltas.items()):  # type: ignore[attr-defined]
            d = bundle.SetDelta(
                set=name,
                from_version=from_v,
                to_version=upd.revision,  # type: ignore[attr-defined]
                add=[format_prefix(p) for p in added],
                remove=[format_prefix(p) for p in removed],
            )
            out.append(bundle.sign(d, self.signer))
        return out


def apply_flags(backend: str, state: Path, key: Path = PUBLIC_KEY) -> list[str]:
    """What a test's ``ringfence-agent apply`` / ``apply-delta`` is told besides its documents:
    the key to verify them with, the backend and the state directory."""
    return ["--public-key", str(key), "--backend", backend, "--state-dir", str(state)]


def write(doc: bundle.Document | wire.Document, path: Path) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(wire.dumps(doc) if isinstance(doc, wire.Bundle | wire.SetDelta) else bundle.dumps(doc))
    return path


B = TypeVar("B", bundle.Bundle, wire.Bundle)


def resign(doc: B, **changes: object) -> B:
    """Changed content, signed again with the test key (the engine's pydantic or the agent's documents)."""
    if isinstance(doc, wire.Bundle):
        return wire.sign(dataclasses.replace(doc, **changes), key())  # type: ignore[arg-type]
    return bundle.sign(doc.model_copy(update=changes), key())


def forge(doc: B, **changes: object) -> B:
    """Change content but keep the old signature (tampering)."""
    if isinstance(doc, wire.Bundle):
        return dataclasses.replace(doc, **changes)  # type: ignore[arg-type]
    return doc.model_copy(update=changes)


# grouped rules: every allow into web shares one owner side (role == web), so the engine renders
# them as one rule with members; client and gold share tcp/8080, db and stranger have their own ports
GROUP_POLICY = (
    policy_head("role", "app", "tier")
    + """
rulesets:
  - name: grp
    scope: app == lab
    same: []
    rules:
      - {name: client-web, from: role == client, to: role == web, services: [tcp/8080, udp/5353]}
      - {name: gold-web, from: tier == gold, to: role == web, services: [tcp/8080]}
      - {name: db-web, from: role == db, to: role == web, services: [tcp/5432, icmp/8]}
      - {name: ops-any, from: role == ops, to: role == web, services: [any]}
      - {name: audit-any, from: role == audit, to: role == web, services: [any]}
      - {name: scan-all, from: role == scanner, to: role == web, services: [tcp, icmpv6]}
      - {name: wide, from: role == wide, to: role == web, services: [tcp/5000-9000]}
      - {name: web-db, from: role == web, to: role == db, services: [tcp/5432]}
      - {name: web-other, from: role == web, to: role == other, services: [tcp/8080]}
"""
)


def spawn_following_agent(
    net: Any, tmp_path: Path, backend: str, source: str, **config: Any
) -> tuple[subprocess.Popen[str], Path, Path]:
    """The real agent daemon in lab host h2, following ``source`` (a static layout over HTTP(S)),
    quick to poll and back off, with ``config`` on top: (process, state directory, log file)."""
    from ringfence.local.lab import AGENT

    state = tmp_path / "state"
    cfg = {
        "workload_id": "h2",
        "public_key": str(PUBLIC_KEY),
        "state_dir": str(state),
        "backend": backend,
        "source": source,
        "poll_interval": 1,
        "observe_interval": 5,
        "heartbeat_interval": 60,
        "report_interval": 60,
        "backoff_max": 1,
        "request_timeout": 2,
        "dhcp": False,
        **config,
    }
    (tmp_path / "agent.json").write_text(json.dumps(cfg))
    log = tmp_path / "agent.log"
    daemon = net.spawn("h2", str(AGENT), "run", "--config", str(tmp_path / "agent.json"), stderr=log.open("w"))
    return daemon, state, log
