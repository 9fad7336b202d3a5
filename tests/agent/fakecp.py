"""A minimal agent-API server for tests (docs/agent-api.md), serving a directory:

    <root>/bundles/<id>.json      signed bundles           <root>/deltas/*.json   signed deltas
    <root>/pairing-key            the accepted pairing key <root>/reports.jsonl   received reports
    <root>/heartbeats.jsonl       received heartbeats      <root>/requests.log    one line per request

Run: python fakecp.py ROOT HOST PORT
"""

from __future__ import annotations

import json
import secrets
import sys
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from urllib.parse import parse_qs, urlparse

ROOT = Path(sys.argv[1]) if len(sys.argv) > 1 else Path(".")
TOKENS: dict[str, str] = {}
NONCES: set[str] = set()


def _bundle(wid: str) -> dict[str, object] | None:
    p = ROOT / "bundles" / f"{wid}.json"
    return json.loads(p.read_text()) if p.exists() else None


def _deltas() -> list[dict[str, object]]:
    return [json.loads(p.read_text()) for p in sorted((ROOT / "deltas").glob("*.json"))]


def _latest(wid: str) -> int:
    b = _bundle(wid)
    versions = [int(b["version"])] if b else [0]  # type: ignore[call-overload]
    if b:
        sets = b.get("sets", {})
        versions += [int(d["to_version"]) for d in _deltas() if d["set"] in sets]  # type: ignore[call-overload,operator]
    return max(versions)


class Handler(BaseHTTPRequestHandler):
    def log_message(self, format: str, *args: object) -> None:
        with (ROOT / "requests.log").open("a") as f:
            f.write(f"{time.time():.3f} {self.command} {self.path}\n")

    def _send(self, status: int, body: object = None, headers: dict[str, str] | None = None) -> None:
        raw = b"" if body is None else json.dumps(body).encode()
        self.send_response(status)
        for k, v in (headers or {}).items():
            self.send_header(k, v)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(raw)))
        self.end_headers()
        self.wfile.write(raw)

    def _body(self) -> dict[str, object]:
        n = int(self.headers.get("Content-Length", 0))
        return json.loads(self.rfile.read(n) or b"{}")  # type: ignore[no-any-return]

    def _auth(self, wid: str) -> bool:
        token = (self.headers.get("Authorization") or "").removeprefix("Bearer ")
        if token not in TOKENS:
            self._send(401, {"error": "unauthorized"})
            return False
        if TOKENS[token] != wid:
            self._send(403, {"error": "forbidden"})
            return False
        return True

    def do_GET(self) -> None:
        url = urlparse(self.path)
        q = parse_qs(url.query)
        parts = url.path.strip("/").split("/")
        if url.path == "/v1/nonce":
            nonce = secrets.token_hex(8)
            NONCES.add(nonce)
            return self._send(200, {"nonce": nonce, "expires_in": 60})
        if len(parts) == 4 and parts[:2] == ["v1", "agents"]:
            wid, what = parts[2], parts[3]
            if not self._auth(wid):
                return None
            if what == "bundle":
                b = _bundle(wid)
                if b is None:
                    return self._send(404, {"error": "no bundle"})
                etag = f'"{b["version"]}"'
                if self.headers.get("If-None-Match") == etag:
                    return self._send(304)
                return self._send(200, b, {"ETag": etag})
            if what == "deltas":
                since = int(q.get("since", ["0"])[0])
                b = _bundle(wid) or {}
                sets = b.get("sets", {})
                ds = [d for d in _deltas() if d["set"] in sets and int(d["to_version"]) > since]  # type: ignore[call-overload,operator]
                return self._send(200, {"bundle_version": int(b.get("version", 0)), "deltas": ds})  # type: ignore[call-overload]
            if what == "wait":
                version = int(q.get("version", ["-1"])[0])
                end = time.monotonic() + float(q.get("timeout", ["10"])[0])
                while time.monotonic() < end and _latest(wid) <= version:
                    time.sleep(0.05)
                return self._send(200, {"latest_version": _latest(wid)})
        return self._send(404, {"error": "not found"})

    def do_POST(self) -> None:
        parts = urlparse(self.path).path.strip("/").split("/")
        body = self._body()
        if parts == ["v1", "enroll"]:
            key = (ROOT / "pairing-key").read_text().strip()
            if body.get("pairing_key") != key or body.get("nonce") not in NONCES:
                return self._send(401, {"error": "bad pairing key or nonce"})
            NONCES.discard(str(body["nonce"]))
            token = secrets.token_hex(16)
            TOKENS[token] = str(body["workload_id"])
            return self._send(
                200, {"workload_id": body["workload_id"], "token": token, "expires_in": 3600, "public_key_pem": ""}
            )
        if len(parts) == 4 and parts[:2] == ["v1", "agents"]:
            wid, what = parts[2], parts[3]
            if not self._auth(wid):
                return None
            if what == "heartbeat":
                with (ROOT / "heartbeats.jsonl").open("a") as f:
                    f.write(json.dumps(body) + "\n")
                return self._send(200, {"latest_version": _latest(wid)})
            if what == "reports":
                with (ROOT / "reports.jsonl").open("a") as f:
                    f.write(json.dumps(body) + "\n")
                return self._send(202, {})
        return self._send(404, {"error": "not found"})


if __name__ == "__main__":
    server = ThreadingHTTPServer((sys.argv[2], int(sys.argv[3])), Handler)
    print("ready", flush=True)
    server.serve_forever()
