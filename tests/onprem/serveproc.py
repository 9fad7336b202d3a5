"""``ringfence serve --store sqlite:PATH`` as a process on loopback, for the on-premise tests that
meet the real command (its restarts, its kill -9, a real agent paired with it). The ``server``
and ``paired_agent`` fixtures (tests/onprem/conftest.py) start it; ``labserve.py`` is the same in
a lab's network namespace."""

from __future__ import annotations

import signal
import ssl
import subprocess
from pathlib import Path
from typing import Any

import httpx

from ringfence import serve
from ringfence.local.tls import LabTls
from tests.agentproc import BIN
from tests.aws.test_pipeline import AgentKey

TOKEN = "onprem-admin-token-0123456789abcdef"


class Server:
    """``ringfence serve`` on a fixed loopback port (the agent's api_url survives a restart)."""

    def __init__(
        self, tmp_path: Path, tls: LabTls | None = None, db: Path | None = None, extra: list[str] | None = None
    ) -> None:
        self.tls = tls  # HTTPS with a certificate of a private CA (tls.ca), as agents meet it
        self.db = db or tmp_path / "state" / "state.db"
        self.extra = extra or []  # more `ringfence serve` arguments
        self.launcher: list[str] = []  # what starts the command (e.g. in a namespace of its own)
        self.tokens = tmp_path / "admin-tokens"
        self.tokens.write_text(f"carol:{serve.token_hash(TOKEN)}:policy-author,incident-responder,onboarding\n")
        sock = serve.listen("127.0.0.1", 0)
        self.port = sock.getsockname()[1]
        sock.close()
        self.url = f"{'https' if tls else 'http'}://127.0.0.1:{self.port}"
        self.log = tmp_path / "serve.log"
        self.proc: subprocess.Popen[str] | None = None

    def start(self) -> None:
        cmd = [str(BIN / "ringfence"), "serve", "--port", str(self.port), "--store", f"sqlite:{self.db}"]
        if self.tls is not None:
            cmd += ["--tls-cert", str(self.tls.cert), "--tls-key", str(self.tls.key)]
        cmd += self.extra
        self.proc = subprocess.Popen(
            [*self.launcher, *cmd, "--admin-tokens", str(self.tokens)],
            stdout=subprocess.PIPE,
            stderr=self.log.open("a"),
            text=True,
        )
        assert self.proc.stdout is not None
        line = self.proc.stdout.readline()
        assert f"listening on {self.url}" in line, self.log.read_text()

    def stop(self) -> None:
        """SIGTERM, if it still runs, and wait for it to exit; SIGKILL after 15 s (a serve whose
        requests wait on a lock a failed test still holds)."""
        if self.proc is None or self.proc.poll() is not None:
            return
        self.proc.terminate()
        try:
            self.proc.wait(15)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait(10)
            raise

    def kill9(self) -> None:
        assert self.proc is not None
        self.proc.send_signal(signal.SIGKILL)
        self.proc.wait(10)

    def admin(self, method: str, path: str, body: Any = None) -> httpx.Response:
        headers = {"Authorization": f"Bearer {TOKEN}"}
        return httpx.request(method, f"{self.url}{path}", json=body, headers=headers, timeout=60, verify=self.verify)

    @property
    def verify(self) -> Any:
        return ssl.create_default_context(cafile=str(self.tls.ca)) if self.tls is not None else True

    def enroll(self, wid: str, key: str) -> httpx.Response:
        nonce = httpx.get(f"{self.url}/v1/nonce").json()["nonce"]
        req = {"method": "pairing", "nonce": nonce, "workload_id": wid, "pairing_key": key}
        req.update(AgentKey().enroll_fields(wid, nonce))
        return httpx.post(f"{self.url}/v1/enroll", json=req)
