"""``ringfence serve`` in a lab's control-plane namespace and a real agent paired with it from
the lab's host ``h``: the set-up the on-premise end-to-end tests share."""

from __future__ import annotations

import json
import os
import subprocess
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import httpx

from ringfence import serve
from ringfence.local.lab import Lab as NetLab
from ringfence.local.lab import in_netns
from tests.agentproc import BIN

CP = "10.77.0.1"  # the control plane's address on the lab's bridge
PORT = 8443


class LabServe:
    """``ringfence serve`` on a SQLite store under ``tmp``, listening on the lab's bridge; the
    test's admin calls are made from the control plane's namespace with ``token`` (all roles)."""

    def __init__(
        self,
        net: NetLab,
        tmp: Path,
        token: str,
        args: Sequence[str] = (),
        env: Mapping[str, str] | None = None,
    ) -> None:
        self.net, self.db, self.token = net, tmp / "state" / "state.db", token
        tokens = tmp / "admin-tokens"
        tokens.write_text(f"carol:{serve.token_hash(token)}:policy-author,incident-responder,onboarding\n")
        self.url = f"http://{CP}:{PORT}"
        cmd = [str(BIN / "ringfence"), "serve", "--host", CP, "--port", str(PORT), "--insecure"]
        self.log = tmp / "serve.log"
        self.proc = net.spawn(
            "cp", *cmd, "--store", f"sqlite:{self.db}", "--admin-tokens", str(tokens), *args,
            env={**os.environ, **(env or {})}, stdout=subprocess.PIPE, stderr=self.log.open("w"),
        )  # fmt: skip
        assert self.proc.stdout is not None
        line = self.proc.stdout.readline()
        assert "listening on" in line, self.log.read_text()

    def admin(self, method: str, path: str, body: Any = None) -> httpx.Response:
        with in_netns(self.net.ns("cp")):
            return httpx.request(
                method, self.url + path, json=body, headers={"Authorization": f"Bearer {self.token}"}, timeout=60
            )


def start_paired_agent(
    net: NetLab, srv: LabServe, tmp_path: Path, wid: str, **config: Any
) -> tuple[subprocess.Popen[Any], Path]:
    """A real ``ringfence-agent run`` in the lab's ``h`` (nftables), enrolling as ``wid`` with a
    pairing key the admin route makes; ``config`` adds to or overrides its agent.json. The agent
    and its log."""
    key = srv.admin("POST", "/admin/pairing-keys", {"workload_id": wid, "uses": 1, "ttl": 600}).json()
    (tmp_path / "pairing-key").write_text(key["pairing_key"])
    work = tmp_path / "agent"
    work.mkdir(exist_ok=True)
    cfg = {
        "workload_id": wid,
        "public_key": str(srv.db.parent / "signing-key.pub.pem"),
        "state_dir": str(work / "state"),
        "backend": "nftables",
        "api_url": srv.url,
        "control_plane": [CP],
        "insecure_http_lab_only": True,  # plain http inside the lab's own bridge
        "enroll": {"method": "pairing", "pairing_key_file": str(tmp_path / "pairing-key")},
        "heartbeat_interval": 1,
        "wait_timeout": 5,
        "request_timeout": 10,
        **config,
    }
    (work / "agent.json").write_text(json.dumps(cfg))
    log = work / "agent.log"
    agent = net.spawn(
        "h", str(BIN / "ringfence-agent"), "run", "--config", str(work / "agent.json"), stderr=log.open("w")
    )
    return agent, log
