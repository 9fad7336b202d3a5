"""Lab agents forked from a template (``ringfence.local.agentfork``) against the exec'd
``ringfence-agent``: the same output and exit codes for the same command lines, and, in a lab
namespace, the same place to live (its namespace, its own session, its nft children inside it)."""

from __future__ import annotations

import contextlib
import json
import os
import signal
import subprocess
import time
from pathlib import Path
from typing import Any

import pytest

from ringfence.local.agentfork import LOST, AgentForks, Forked
from ringfence.local.lab import AGENT, NETNS_DIR, Lab, prerequisites, sh
from tests.agent.bundles import PUBLIC_KEY


def _start(*cmd: str, **kw: Any) -> subprocess.Popen[Any]:
    return subprocess.Popen(list(cmd), start_new_session=True, **kw)


@pytest.fixture
def forks() -> Any:
    f = AgentForks(_start)
    yield f
    f.template.proc.kill()
    f.template.proc.wait()


COMMAND_LINES = [
    [],  # a usage error: argparse's message and exit code 2
    ["apply"],  # a required option missing
    ["status", "--state-dir", "{tmp}/state", "--backend", "dry-run", "--json"],
    ["status", "--state-dir", "{tmp}/state", "--backend", "dry-run"],
    # a config error, said by the daemon's entry; --once: a daemon without one holds the fail-safe
    # posture (here, the test machine's own namespace) and runs on until the file loads
    ["run", "--config", "{tmp}/missing.json", "--once"],
    ["apply", "--bundle", "{tmp}/missing.json", "--public-key", str(PUBLIC_KEY), "--state-dir", "{tmp}/s2"],
]


@pytest.mark.parametrize("line", COMMAND_LINES, ids=lambda a: " ".join(a[:2]) or "(none)")
def test_a_forked_agent_says_and_returns_what_the_execd_one_does(
    forks: AgentForks, tmp_path: Path, line: list[str]
) -> None:
    args = [a.replace("{tmp}", str(tmp_path)) for a in line]
    execd = subprocess.run([str(AGENT), *args], capture_output=True, text=True, timeout=60, check=False)
    log = tmp_path / "forked.log"
    forked = forks.spawn(args, None, log)
    code = forked.wait(timeout=60)
    assert code == execd.returncode
    assert forked.poll() == code
    said = log.read_text()
    assert said == execd.stdout + execd.stderr, "the same words, in the same log"


def test_a_spawn_answers_each_caller_with_its_own_child(forks: AgentForks, tmp_path: Path) -> None:
    """Requests from the fleet's boot threads are answered in order: each caller gets the pid of
    the child writing its own log (the child's stdout is that file), and that child's exit."""
    from concurrent.futures import ThreadPoolExecutor

    def one(k: int) -> Forked:
        cfg = _run_config(tmp_path / f"a{k}", "dry-run", "http://127.0.0.1:9")  # runs until stopped
        return forks.spawn(["run", "--config", str(cfg)], None, tmp_path / f"{k}.log")

    with ThreadPoolExecutor(max_workers=8) as pool:
        agents = list(pool.map(one, range(16)))
    try:
        assert len({p.pid for p in agents}) == 16
        for k, p in enumerate(agents):
            # the fork has answered; the child points its output at its log right after
            deadline, out = time.monotonic() + 20, ""
            while out != str(tmp_path / f"{k}.log") and time.monotonic() < deadline:
                out = os.readlink(f"/proc/{p.pid}/fd/1")
                time.sleep(0.02)
            assert out == str(tmp_path / f"{k}.log")
            assert p.poll() is None
    finally:
        for p in agents:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(p.pid, signal.SIGKILL)
    assert [p.wait(timeout=30) for p in agents] == [-signal.SIGKILL] * 16


def _run_config(d: Path, backend: str, api_url: str) -> Path:
    """An agent that keeps trying a control plane that never answers."""
    d.mkdir(parents=True, exist_ok=True)
    cfg = {
        "workload_id": f"i-{d.name}",
        "public_key": str(PUBLIC_KEY),
        "state_dir": str(d / "state"),
        "backend": backend,
        "api_url": api_url,
        "insecure_http_lab_only": True,
        "enroll": {"method": "pairing", "pairing_key": "rfpk_none"},
        "backoff_max": 1,
        "request_timeout": 1,
        "dhcp": False,
    }
    (d / "agent.json").write_text(json.dumps(cfg))
    return d / "agent.json"


def test_an_agent_outliving_its_template_is_still_waited_for_and_a_new_template_takes_over(
    forks: AgentForks, tmp_path: Path
) -> None:
    """The template dies while an agent runs: the agent keeps running, a wait for it ends when it
    does (its code unknown, :data:`LOST`) instead of hanging the scale-in that waits for it, and
    the next agent is forked by a new template."""
    cfg = _run_config(tmp_path / "a", "dry-run", "http://127.0.0.1:9")
    agent = forks.spawn(["run", "--config", str(cfg)], None, tmp_path / "a.log")
    old = forks.template
    old.proc.kill()
    old.proc.wait()
    with pytest.raises(subprocess.TimeoutExpired):
        agent.wait(timeout=0.5)
    assert agent.poll() is None, "the agent outlives the template"
    os.killpg(agent.pid, signal.SIGKILL)
    assert agent.wait(timeout=30) == LOST
    after = forks.spawn(
        ["status", "--state-dir", str(tmp_path / "s"), "--backend", "dry-run"], None, tmp_path / "b.log"
    )
    assert forks.template is not old
    assert after.wait(timeout=60) == 0 and "workload_id: None" in (tmp_path / "b.log").read_text()


@pytest.mark.dataplane
def test_a_forked_agent_lives_in_its_namespace_and_session_as_the_execd_one_does(tmp_path: Path) -> None:
    """Two agents with the same config (a control plane that never answers), one forked, one
    exec'd through ``ip netns exec``, each in a lab namespace: each sits in its namespace and its
    own session, programs its boot posture into its namespace's kernel (the fork's nft children
    inherit the namespace), and a SIGTERM to its process group ends both with the same code."""
    why = prerequisites()
    if why is not None:
        pytest.skip(why)
    lab = Lab()
    try:
        agents = {}
        forks = AgentForks(lab.start)
        for way in ("fork", "exec"):
            d = tmp_path / way
            cfg = _run_config(d, "nftables", "http://10.9.0.250:9")  # on the bridge, nobody there
            lab.add(way, ["10.9.0.1/24" if way == "fork" else "10.9.0.2/24"])
            args = ["run", "--config", str(cfg)]
            if way == "fork":
                agents[way] = forks.spawn(args, lab.ns(way), d / "agent.log")
            else:
                with (d / "agent.log").open("w") as log:
                    agents[way] = lab.spawn(way, str(AGENT), *args, stdout=log, stderr=subprocess.STDOUT)

        def posture(way: str) -> bool:
            return "table inet ringfence" in sh("ip", "netns", "exec", lab.ns(way), "nft", "list", "tables").stdout

        deadline = time.monotonic() + 30
        while not all(posture(w) or p.poll() is not None for w, p in agents.items()) and time.monotonic() < deadline:
            time.sleep(0.1)
        for way, p in agents.items():
            assert posture(way), (
                f"{way}: the boot posture is in its namespace ({(tmp_path / way / 'agent.log').read_text()})"
            )
            assert p.poll() is None, f"{way}: still trying to reach its control plane"
            assert os.stat(f"/proc/{p.pid}/ns/net").st_ino == os.stat(NETNS_DIR / lab.ns(way)).st_ino
            assert os.getsid(p.pid) == p.pid, f"{way}: its own session, signalled as one group"
        for p in agents.values():
            os.killpg(p.pid, signal.SIGTERM)
        codes = {way: p.wait(timeout=30) for way, p in agents.items()}
        assert codes["fork"] == codes["exec"]
        assert agents["fork"].poll() == codes["fork"]
    finally:
        lab.close()
