from __future__ import annotations

from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

ROOT = Path(__file__).resolve().parents[1]
EXAMPLE = ROOT / "examples" / "ordering"
GOLDEN = ROOT / "tests" / "golden"


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    """Tests marked ``slow`` (the longest in CI, 10-60 s each) run first, in their collection
    order: xdist hands tests out in this order, one at a time as workers free up, so a long test
    handed out last keeps one worker busy while the others have finished (the suite's wall time
    is the last worker's)."""
    items.sort(key=lambda item: item.get_closest_marker("slow") is None)


@pytest.fixture(scope="session")
def example_policy():  # type: ignore[no-untyped-def]
    from ringfence.policy import load_policy

    return load_policy(EXAMPLE / "policy")


@pytest.fixture(scope="session")
def example_inventory():  # type: ignore[no-untyped-def]
    from ringfence.inventory import load_inventory

    return load_inventory(EXAMPLE / "inventory.yaml")


@pytest.fixture(scope="session")
def artifact(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, str]:
    """The agent's wheel and its SHA-256, built once by the real build
    (``agent/packaging/build_artifact.py``, reproducible: every build is these bytes) for
    tests/agent and tests/aws, which only read it. Once per run, not once per xdist worker: the
    workers share the run's temp dir, and the first to need it builds it under a lock."""
    import fcntl
    import os
    import shutil
    import subprocess
    import sys

    def build(out: Path) -> None:
        subprocess.run([sys.executable, str(ROOT / "agent/packaging/build_artifact.py"), str(out)], check=True)

    if os.environ.get("PYTEST_XDIST_WORKER"):
        shared = tmp_path_factory.getbasetemp().parent  # the run's, above each worker's own
        out = shared / "agent-artifact"
        with (shared / "agent-artifact.lock").open("w") as lock:
            fcntl.flock(lock, fcntl.LOCK_EX)
            if not (shared / "agent-artifact.built").exists():
                shutil.rmtree(out, ignore_errors=True)  # a build that failed part way
                build(out)
                (shared / "agent-artifact.built").touch()
    else:
        out = tmp_path_factory.mktemp("artifact")
        build(out)
    (wheel,) = out.glob("ringfence_agent-*.whl")
    digest, name = (out / f"{wheel.name}.sha256").read_text().split()
    assert name == wheel.name
    return wheel, digest


@pytest.fixture(scope="session")
def embedded() -> Iterator[Any]:
    """One embedded AWS (moto server on loopback, ``ringfence.local.aws``) per session, shared by
    tests/aws and tests/local; each test resets it (moto's state is process-global anyway)."""
    from ringfence.control.wiring import DEFAULT_LIFECYCLE_HOOK_NAMES
    from ringfence.local.aws import EmbeddedAws

    # Ringfence's lifecycle hooks (LifecycleHookNames): the default names (the demo estate's) and
    # the tests' own; any other hook is another team's
    hooks = (*DEFAULT_LIFECYCLE_HOOK_NAMES, "rf-hook", "rf-hook-warm", "rf-leave")
    aws = EmbeddedAws(region="ca-central-1", account="123456789012", lifecycle_hook_names=hooks)
    aws.start(build=False)
    yield aws
    aws.stop()


@pytest.fixture
def aws_wiring() -> Iterator[Callable[[], Any]]:
    """Builds ``serve.build_wiring("aws")`` (over the AWS the environment names, as read at the
    call); each one built is closed when the test ends, so its change watch does not outlive the
    test and poll a reset or stopped moto."""
    from ringfence import serve

    built: list[Any] = []

    def build() -> Any:
        built.append(serve.build_wiring("aws"))
        return built[-1]

    yield build
    for w in built:
        w.close()


def rule_parts(rules: list[Any]) -> list[Any]:
    """A bundle direction's rules with grouped rules replaced by their members (which carry
    ``id``, ``set`` and ``services`` but no ``action``: members are always allows)."""
    out: list[Any] = []
    for r in rules:
        out.extend({**m, "action": "allow"} for m in r["members"]) if r.get("members") else out.append(r)
    return out


@pytest.fixture
def agent_process() -> Iterator[Any]:
    """Start real ``ringfence-agent`` processes (:func:`tests.agentproc.start_agent`'s arguments);
    every one started is stopped when the test ends, passed or failed."""
    from tests.agentproc import start_agent

    started: list[Any] = []

    def start(workdir: Path, **kw: Any) -> Any:
        agent = start_agent(workdir, **kw)
        started.append(agent)
        return agent

    yield start
    for agent in started:
        agent.stop()
