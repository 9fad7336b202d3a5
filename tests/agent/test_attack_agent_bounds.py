"""Issue 10 against the real agent (its CLI in a fresh interpreter, a real HTTP server on
loopback): an unsigned body is bounded before parsing, fail-safes cannot be widened to
everything through a bundle or the local configuration, and ``api_url: http://`` is refused
except to loopback (or in a lab that says so)."""

from __future__ import annotations

import http.server
import json
import subprocess
import sys
import threading
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from ringfence.agentwire import API_PREFIX
from ringfence_agent.backends import ApplyError
from ringfence_agent.config import ConfigError, load_config
from ringfence_agent.sources import MAX_ANSWER_BYTES, MAX_BUNDLE_BYTES
from tests.agent.bundles import GOLDEN, PUBLIC_KEY, apply_flags, policy_head, resign, write
from tests.agent.test_agent_state import bundle

# the real CLI in a fresh interpreter; on exit it writes its peak resident set (VmHWM, KiB: not
# ru_maxrss, which Linux carries over from the forking parent across exec)
RSS_PROBE = """
import atexit, sys
from ringfence_agent.cli import main

def peak():
    hwm = next(line for line in open("/proc/self/status") if line.startswith("VmHWM:"))
    open(sys.argv[1], "w").write(hwm.split()[1])

atexit.register(peak)
sys.exit(main(sys.argv[2:]))
"""

BIG = 50 * 2**20  # the review's attack was 49 MiB


def big_answer(with_length: bool, only: str = "") -> Callable[[http.server.BaseHTTPRequestHandler], None]:
    """Requests (those whose path holds ``only``; others 404) answered 200 with 50 MiB (announced
    or not), streamed."""

    def route(h: http.server.BaseHTTPRequestHandler) -> None:
        if only not in h.path:
            return not_found(h)
        h.send_response(200)
        h.send_header("Content-Type", "application/json")
        if with_length:
            h.send_header("Content-Length", str(BIG))
        h.end_headers()
        chunk = b"[" * 65536  # deep nesting: the costliest JSON to parse, were it parsed
        try:
            for _ in range(BIG // len(chunk)):
                h.wfile.write(chunk)
        except OSError:
            pass  # the agent hung up: it read what its limit allows and no more
        h.close_connection = True

    return route


def not_found(h: http.server.BaseHTTPRequestHandler) -> None:
    h.send_response(404)
    h.send_header("Content-Length", "0")
    h.end_headers()


@pytest.fixture
def serve() -> Iterator[Callable[[Callable[[http.server.BaseHTTPRequestHandler], None]], str]]:
    servers: list[http.server.ThreadingHTTPServer] = []

    def start(route: Callable[[http.server.BaseHTTPRequestHandler], None]) -> str:
        class Handler(http.server.BaseHTTPRequestHandler):
            def do_GET(self) -> None:
                route(self)

            do_POST = do_GET

            def log_message(self, *args: object) -> None:
                pass

        server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        server.daemon_threads = True
        threading.Thread(target=server.serve_forever, daemon=True).start()
        servers.append(server)
        return f"http://127.0.0.1:{server.server_address[1]}"

    yield start
    for s in servers:
        s.shutdown()
        s.server_close()


def run_agent(tmp_path: Path, name: str, cfg: dict[str, object]) -> tuple[int, str]:
    """``ringfence-agent run --once`` with ``cfg``: (peak RSS in KiB, its log)."""
    base = {"workload_id": "w", "public_key": str(PUBLIC_KEY), "state_dir": str(tmp_path / name), "backend": "dry-run"}
    path = tmp_path / f"{name}.json"
    path.write_text(json.dumps({**base, **cfg}))
    out = tmp_path / f"{name}.rss"
    proc = subprocess.run(
        [sys.executable, "-c", RSS_PROBE, str(out), "run", "--once", "--config", str(path)],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert proc.returncode == 0, proc.stderr
    return int(out.read_text()), proc.stderr


@pytest.mark.parametrize("with_length", [True, False], ids=["announced", "unannounced"])
def test_attack_a_50_mib_bundle_is_refused_with_bounded_memory(
    tmp_path: Path, serve: Callable[..., str], with_length: bool
) -> None:
    """A bundle answer of 50 MiB (the review grew the agent by 281 MiB with 49 MiB against a
    128 MiB service limit) is refused before parsing: announced, at the header; unannounced,
    after at most the limit read. The peak RSS grows by less than the limit plus headroom,
    compared with the same agent whose fetch found nothing."""
    baseline, _ = run_agent(tmp_path, "baseline", {"source": serve(not_found)})
    peak, log = run_agent(tmp_path, "attacked", {"source": serve(big_answer(with_length, "/bundles/"))})
    growth_mib = (peak - baseline) / 1024
    expected = f"answer of {BIG} bytes is over the limit" if with_length else "answer over the limit"
    assert f"{expected} of {MAX_BUNDLE_BYTES} bytes; still enforcing revision None" in log
    bound = 8 if with_length else MAX_BUNDLE_BYTES / 2**20 + 8
    assert growth_mib < bound, f"peak RSS grew by {growth_mib:.1f} MiB (bound {bound} MiB)"


def test_attack_a_50_mib_agent_api_answer_is_refused_at_the_small_answer_limit(
    tmp_path: Path, serve: Callable[..., str]
) -> None:
    """The agent API's small answers (nonce, enroll, wait, heartbeat) have a limit of their own:
    the first request the agent makes, the nonce, answered with 50 MiB unannounced."""
    url = serve(big_answer(False))
    baseline, _ = run_agent(tmp_path, "baseline", {"source": serve(not_found)})
    peak, log = run_agent(tmp_path, "attacked", {"api_url": url, "enroll": {"pairing_key": "k"}})
    assert f"POST {url}{API_PREFIX}/nonce: answer over the limit of {MAX_ANSWER_BYTES} bytes" in log or (
        f"{url}{API_PREFIX}/nonce: answer over the limit of {MAX_ANSWER_BYTES} bytes" in log
    ), log
    assert (peak - baseline) / 1024 < 8


def test_attack_a_bundle_widening_failsafes_to_everything_is_refused_by_the_agent(tmp_path: Path) -> None:
    """A validly signed bundle (the policy refuses this; a bundle signed elsewhere must not
    sneak it in) with admin_cidrs 0.0.0.0/0, or control_plane in halves: rejected, nothing applied."""
    good = json.loads((GOLDEN / "bundle-ord-prod-proc-1.json").read_text())
    assert good["failsafes"]  # the golden bundle carries fail-safes to widen
    from ringfence import bundle as lib

    doc = lib.load_bundle((GOLDEN / "bundle-ord-prod-proc-1.json").read_bytes())
    halves = [f"{i}.0.0.0/8" for i in range(0, 256, 2)]  # each /8 passes alone: half of everything
    for i, (change, why) in enumerate(
        [
            ({"admin_cidrs": ["0.0.0.0/0"]}, "a fail-safe may not open"),
            ({"control_plane": ["0.0.0.0/1", "128.0.0.0/1"]}, "a fail-safe may not open"),
            ({"admin_cidrs": ["::/0"]}, "a fail-safe may not open"),
            ({"admin_cidrs": halves}, "open more than 4 /8s' worth"),
        ]
    ):
        wide = resign(doc, failsafes=doc.failsafes.model_copy(update=change))
        path = write(wide, tmp_path / f"wide-{i}.json")
        proc = subprocess.run(
            [
                str(Path(sys.executable).parent / "ringfence-agent"),
                *("apply", "--bundle", str(path), *apply_flags("dry-run", tmp_path / f"st-{i}")),
            ],
            capture_output=True,
            text=True,
            timeout=60,
        )
        assert proc.returncode != 0 and why in proc.stderr, proc.stderr
        assert not (tmp_path / f"st-{i}" / "bundle.json").exists()


def config_text(tmp_path: Path, **extra: object) -> Path:
    base = {"workload_id": "w", "public_key": str(PUBLIC_KEY), "state_dir": str(tmp_path / "s")}
    path = tmp_path / "agent.json"
    path.write_text(json.dumps({**base, **extra}))
    return path


def test_attack_local_failsafes_cannot_be_everything_either(tmp_path: Path) -> None:
    for name, value in (("admin_cidrs", ["0.0.0.0/0"]), ("control_plane", ["::/0"]), ("admin_cidrs", ["0.0.0.0/1"])):
        with pytest.raises(ConfigError, match=f"{name}: .*a fail-safe may not open"):
            load_config(config_text(tmp_path, source="/x", **{name: value}))
    every_8 = [f"{i}.0.0.0/8" for i in range(256)]
    with pytest.raises(ConfigError, match=r"admin_cidrs: .*open more than 4 /8s' worth"):
        load_config(config_text(tmp_path, source="/x", admin_cidrs=every_8))
    assert load_config(config_text(tmp_path, source="/x", admin_cidrs=["10.0.0.0/8"])).admin_cidrs == ["10.0.0.0/8"]


def test_attack_plain_http_api_url_to_a_non_loopback_host_is_refused(tmp_path: Path) -> None:
    """The bearer token and the enrollment proofs would cross the network in the clear: the real
    CLI refuses to start; loopback, https and a lab that says so loudly are accepted."""
    enroll = {"pairing_key": "k"}
    for url in ("http://10.0.0.9:8080", "http://rf.example.com", "http://[2001:db8::1]/", "http://127.0.0.1.nip.io"):
        cfg = config_text(tmp_path, api_url=url, enroll=enroll)
        proc = subprocess.run(
            [str(Path(sys.executable).parent / "ringfence-agent"), "run", "--once", "--config", str(cfg)],
            capture_output=True,
            text=True,
            timeout=60,
        )
        assert proc.returncode != 0, url
        assert "is plain http to a non-loopback host" in proc.stderr, proc.stderr
    for url in (
        "http://127.0.0.1:8080",
        "http://127.9.9.9",
        "http://localhost:1",
        "http://[::1]:8",
        "https://rf.example",
    ):
        assert load_config(config_text(tmp_path, api_url=url, enroll=enroll)).api_url == url
    lab = load_config(config_text(tmp_path, api_url="http://10.0.0.9:8080", enroll=enroll, insecure_http_lab_only=True))
    assert lab.api_url == "http://10.0.0.9:8080"


def test_the_bundle_limit_holds_a_large_estates_bundle() -> None:
    """100,000 host addresses in one set are ~2 MB of bundle: the default limit is 16 MiB (the
    largest bundle of a 10,000-workload synthetic estate is 55 KB; docs/agent.md)."""
    from ringfence import bundlewire as wire

    large = wire.dumps(bundle(1, [f"10.{i >> 16}.{i >> 8 & 255}.{i & 255}/32" for i in range(100_000)])).encode()
    assert len(large) * 6 < MAX_BUNDLE_BYTES


QUARANTINE_POLICY = (
    policy_head(
        "role",
        "app",
        failsafes={
            "admin_cidrs": ["10.99.0.0/24"],
            "admin_ports": ["tcp/22"],
            "dns_resolvers": ["10.0.0.2"],
            "control_plane": ["198.51.100.10/32"],
        },
    )
    + """
services:
  - {name: web, ports: [tcp/8080]}
rulesets:
  - name: shop
    scope: app == shop
    rules:
      - {name: lb-to-web, from: role == lb, to: role == web, services: [web]}
      - {name: web-out, from: role == web, to: role == lb, services: [web]}
"""
)


def test_attack_a_quarantined_host_keeps_only_what_management_needs(tmp_path: Path) -> None:
    """What the plan of a quarantined bundle admits (the verdicts every backend renders; the
    dataplane tests check them against nftables and iptables): management from the admin range
    on the admin port, the control plane on its port outbound, DNS to the resolver, the
    metadata endpoint's service ports; nothing else, in either direction."""
    from ringfence import bundlewire as wire
    from ringfence.model import Workload
    from ringfence_agent.plan import Admitter, Flow, LocalFailsafes, compile_plan
    from tests.agent.bundles import Lab

    ws = [
        Workload(id="web", ips=["10.0.1.5"], tags={"ringfence:role": "web", "ringfence:app": "shop"}, quarantined=True),
        Workload(id="lb", ips=["10.0.1.9"], tags={"ringfence:role": "lb", "ringfence:app": "shop"}),
    ]
    doc = wire.load_bundle(lib_dumps(Lab(QUARANTINE_POLICY, ws).bundle("web")))
    assert doc.quarantined and doc.inbound == [] and doc.outbound == []
    admit = Admitter(compile_plan(doc, LocalFailsafes())).admits
    kept = {
        "ssh from the admin range": Flow("inbound", "10.99.0.7", "tcp", 40000, 22),
        "the control plane on 443": Flow("outbound", "198.51.100.10", "tcp", 40000, 443),
        "dns to the resolver": Flow("outbound", "10.0.0.2", "udp", 40000, 53),
        "the metadata service": Flow("outbound", "169.254.169.254", "tcp", 40000, 80),
    }
    cut = {
        "rdp from the admin range": Flow("inbound", "10.99.0.7", "tcp", 40000, 3389),
        "the lb, allowed before quarantine": Flow("inbound", "10.0.1.9", "tcp", 40000, 8080),
        "the control plane on another port": Flow("outbound", "198.51.100.10", "tcp", 40000, 22),
        "the control plane, inbound": Flow("inbound", "198.51.100.10", "tcp", 443, 8080),
        "the resolver on another port": Flow("outbound", "10.0.0.2", "tcp", 40000, 443),
        "the metadata address on another port": Flow("outbound", "169.254.169.254", "tcp", 40000, 8080),
        "the admin range, outbound": Flow("outbound", "10.99.0.7", "tcp", 40000, 22),
    }
    assert {k: admit(f).admitted for k, f in kept.items()} == dict.fromkeys(kept, True)
    assert {k: admit(f).admitted for k, f in cut.items()} == dict.fromkeys(cut, False)


def lib_dumps(doc: object) -> bytes:
    from ringfence import bundle as lib

    return lib.dumps(doc).encode()  # type: ignore[arg-type]


def test_the_control_plane_failsafe_follows_resolved_addresses_and_retries_after_a_failed_apply(
    tmp_path: Path,
) -> None:
    """``Agent.follow_control_plane``: the configured addresses plus the resolved ones, applied
    once per change; a failed apply leaves the old set, so the next call applies again."""
    from ringfence import bundle as lib
    from ringfence_agent.core import Agent
    from ringfence_agent.state import StateDir
    from tests.agent.test_agent_unit import LOCAL, FakeBackend, Verifier

    backend = FakeBackend()
    agent = Agent("ord-prod-proc-1", Verifier.from_file(PUBLIC_KEY), backend, StateDir(tmp_path), LOCAL)
    doc = lib.load_bundle((GOLDEN / "bundle-ord-prod-proc-1.json").read_bytes())
    agent.apply_bundle(wire_of(doc))
    assert len(backend.applied) == 1
    assert agent.follow_control_plane(("203.0.113.5",)).changed
    plan = backend.applied[-1]
    assert plan.failsafes.control_v4 == ("198.51.100.7/32", "203.0.113.5/32")  # type: ignore[attr-defined]
    assert not agent.follow_control_plane(("203.0.113.5",)).changed and len(backend.applied) == 2
    backend.fail = True
    with pytest.raises(ApplyError):
        agent.follow_control_plane(("203.0.113.9",))
    backend.fail = False
    assert agent.follow_control_plane(("203.0.113.9",)).changed  # tried again, not "no change"
    assert backend.applied[-1].failsafes.control_v4 == ("198.51.100.7/32", "203.0.113.9/32")  # type: ignore[attr-defined]


def wire_of(doc: object) -> object:
    from ringfence import bundlewire as wire

    return wire.load_bundle(lib_dumps(doc))


def test_the_agent_verifies_a_private_ca_control_plane_with_tls_ca_file(tmp_path: Path) -> None:
    """A lab or on-premise control plane with a private CA (``ringfence.local.tls``): the agent
    fetches over https when ``tls_ca_file`` names the CA, and refuses the certificate without it."""
    import functools
    import ssl

    from ringfence.local.tls import lab_tls

    tls = lab_tls(tmp_path / "tls", "127.0.0.1")
    www = tmp_path / "www"
    write(bundle(1, ["10.0.0.1/32"]), www / "bundles" / "w.json")
    handler = functools.partial(http.server.SimpleHTTPRequestHandler, directory=str(www))
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    ctx = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    ctx.load_cert_chain(tls.cert, tls.key)
    server.socket = ctx.wrap_socket(server.socket, server_side=True)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    url = f"https://127.0.0.1:{server.server_address[1]}"
    try:
        _, log = run_agent(tmp_path, "untrusted", {"source": url})
        assert "CERTIFICATE_VERIFY_FAILED" in log and "revision None" in log
        _, log = run_agent(tmp_path, "trusted", {"source": url, "tls_ca_file": str(tls.ca)})
        assert "keeps enforcing revision 1" in log and "CERTIFICATE_VERIFY_FAILED" not in log, log
    finally:
        server.shutdown()
        server.server_close()
