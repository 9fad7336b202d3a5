"""``ringfence-agent`` run as root (the documented ``apply``, a ``run --once`` from root's cron) on
the state directory of the agent the unit runs as its own user (a uid no account has stands in:
tests/systemdunit.py). Root's command executes itself again as the directory's owner, so what it
writes there is the owner's and the agent reads its last known good at its next start; and a state file it may not read (root's 0600, left by an
older agent) is not corruption: the agent refuses to start saying which file and how to fix it,
sets nothing aside and leaves the kernel's rules as they are. Real CLI and daemon, in a network
namespace of their own (tests/agent/dataplane.py)."""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
from collections.abc import Iterator
from pathlib import Path

import pytest

from ringfence.local.lab import Lab as NetLab
from tests.agent import dataplane
from tests.agent.bundles import GOLDEN, PUBLIC_KEY, static_agent_config
from tests.agentproc import BIN
from tests.systemdunit import STAND_IN_GID, STAND_IN_UID, as_the_unit, reachable_dir

dataplane.require()

ROOT = Path(__file__).resolve().parents[2]
UNIT = ROOT / "agent" / "packaging" / "ringfence-agent.service"
OLDER = GOLDEN / "bundle-ord-prod-proc-1.json"  # version 1
NEWER = GOLDEN / "bundle-ord-prod-proc-1-after-scale-out.json"  # version 2
USER = (STAND_IN_UID, STAND_IN_GID)
AGENT = str(BIN / "ringfence-agent")

net = dataplane.lab_fixture({"h2": 2}, {})
clean = dataplane.reset_fixture()


@pytest.fixture
def scratch() -> Iterator[Path]:
    """Outside pytest's root-only temp tree: the unit's user must reach the config and its state."""
    if shutil.which("setpriv") is None:
        pytest.skip("setpriv is not installed here")
    with reachable_dir("rf-rootcli-") as made:
        yield made


def _state(where: Path) -> Path:
    """As systemd makes StateDirectory= for User=: the user's, 0700."""
    state = where / "state"
    state.mkdir(mode=0o700)
    os.chown(state, *USER)
    return state


def _config(where: Path, state: Path) -> Path:
    return static_agent_config(where / "agent.json", str(state), backend="nftables")


def _not_the_units(state: Path) -> list[str]:
    out = []
    for path in [state, *state.rglob("*")]:
        st = path.lstat()
        if (st.st_uid, st.st_gid) != USER:
            out.append(f"{path} {st.st_uid}:{st.st_gid}")
    return out


def _as_unit(net: NetLab, *args: str) -> subprocess.CompletedProcess[str]:
    return net.exec("h2", *as_the_unit(UNIT), AGENT, *args)


def _status(net: NetLab, state: Path, *, root: bool = False) -> dict[str, object]:
    args = ["status", "--state-dir", str(state), "--json"]
    out = net.exec("h2", AGENT, *args) if root else _as_unit(net, *args)
    assert out.returncode == 0, out.stderr
    got: dict[str, object] = json.loads(out.stdout)
    return got


# the elements traffic adds to the rules' dynamic tuple sets (``t_*``, with timeouts): the lab's own
# IPv6 link-local chatter (MLD reports to ff02::16) fills them between two listings
_TRAFFIC = re.compile(r"(\tset t_\w+ \{[^}]*?)\n\t\telements = \{[^}]*\}")


def _ruleset(net: NetLab) -> str:
    """The kernel's rules and sets as nft lists them, less what traffic adds to dynamic sets."""
    return _TRAFFIC.sub(r"\1", net.exec("h2", "nft", "-s", "list", "ruleset", check=True).stdout)


def test_attack_a_root_cli_apply_leaves_the_units_last_known_good_readable_and_in_force(
    net: NetLab, scratch: Path
) -> None:
    """Review unit3 R1: root's apply made bundle.json, deltas.jsonl, seal.last and status.json
    root's 0600; the unit's daemon then took its last known good for corrupt, moved it to
    rejected/, held the fail-safe posture and lost the rollback floor (version 1 taken again)."""
    state = _state(scratch)
    key = ["--public-key", str(PUBLIC_KEY), "--state-dir", str(state), "--backend", "nftables"]
    out = _as_unit(net, "apply", "--bundle", str(OLDER), *key)
    assert out.returncode == 0, out.stderr
    out = net.exec("h2", AGENT, "apply", "--bundle", str(NEWER), *key)  # the operator, as root
    assert out.returncode == 0, out.stderr
    assert _not_the_units(state) == []

    out = _as_unit(net, "run", "--config", str(_config(scratch, state)), "--once")
    assert out.returncode == 0, out.stderr
    assert "re-applied last known good: ord-prod-proc-1 revision 2" in out.stderr, out.stderr
    assert not (state / "rejected").exists() and (state / "bundle.json").exists()
    got = _status(net, state)
    assert got["bundle_version"] == 2 and got["kernel_programmed"] is True, got
    assert got["state_unreadable"] is None and "warning" not in got, got
    assert f"skuid {STAND_IN_UID}" in _ruleset(net)  # the daemon's own control-plane fail-safe

    out = _as_unit(net, "apply", "--bundle", str(OLDER), *key)  # the rollback floor is still there
    assert out.returncode != 0 and "version" in out.stderr, out.stdout + out.stderr
    assert _not_the_units(state) == []


def test_attack_root_writes_everything_in_the_units_state_directory_as_the_units(scratch: Path) -> None:
    """Root's commands on the unit's state directory (apply over a torn last known good, which it
    sets aside in rejected/ with the reason; apply-delta; run --once, which keeps the last good
    configuration; status; drops) leave only the owner's files, and the owner reads them: they
    are written as the owner (root's command executes itself again as the directory's owner,
    agent/ringfence_agent/asowner.py), nothing is chowned. The daemon's control-plane fail-safe
    admits the owner's uid: it ran as the owner. Dry-run backend (the nftables writers, seal.key
    and seal.last, are the first test's)."""
    if os.geteuid() != 0:
        pytest.skip("needs root")
    state = _state(scratch)
    (state / "bundle.json").write_text("torn")
    os.chown(state / "bundle.json", *USER)
    args = ["--backend", "dry-run", "--state-dir", str(state)]
    key = ["--public-key", str(PUBLIC_KEY)]
    for cmd in (
        ["apply", *args, *key, "--bundle", str(OLDER)],
        ["apply-delta", *args, *key, "--delta", str(GOLDEN / "delta-ord-prod-proc-1-scale-out.json")],
        ["status", *args],
        ["drops", *args],
    ):
        out = subprocess.run([AGENT, *cmd], capture_output=True, text=True, timeout=60)
        assert out.returncode == 0, out.stderr
    config = _config(scratch, state)
    config.write_text(config.read_text().replace('"nftables"', '"dry-run"'))
    out = subprocess.run([AGENT, "run", "--once", "--config", str(config)], capture_output=True, text=True, timeout=60)
    assert f"skuid {STAND_IN_UID}" in out.stdout, out.stdout + out.stderr
    made = {p.name for p in state.iterdir()}
    want = {"bundle.json", "deltas.jsonl", "status.json", "identity.json", "rejected", "config.last-good.json"}
    assert want <= made, made
    assert len(list((state / "rejected").iterdir())) == 2  # the bundle and the reason
    assert _not_the_units(state) == []
    files = [str(p) for p in state.iterdir() if p.is_file()]
    as_owner = ["setpriv", f"--reuid={USER[0]}", f"--regid={USER[1]}", "--clear-groups"]
    read = subprocess.run([*as_owner, "cat", *files], capture_output=True, text=True)
    assert read.returncode == 0, read.stderr


@pytest.mark.parametrize("name", ["bundle.json", "deltas.jsonl", "seal.key"])
def test_attack_a_state_file_the_agent_cannot_read_stops_it_and_leaves_the_kernel_alone(
    net: NetLab, scratch: Path, name: str
) -> None:
    """A state file root's 0600 (left by a root CLI before this fix): not corruption. The daemon
    refuses to start naming the file, its owner and mode, and the chown that fixes it; nothing is
    set aside, the kernel keeps the rules it holds, and status says so (as the unit and as root)."""
    state = _state(scratch)
    key = ["--public-key", str(PUBLIC_KEY), "--state-dir", str(state), "--backend", "nftables"]
    out = _as_unit(net, "apply", "--bundle", str(NEWER), *key)
    assert out.returncode == 0, out.stderr
    before = _ruleset(net)
    path = state / name
    os.chown(path, 0, 0)
    path.chmod(0o600)

    out = _as_unit(net, "run", "--config", str(_config(scratch, state)), "--once")
    assert out.returncode != 0, out.stderr
    assert f"{path} (owner root:root, mode -rw-------)" in out.stderr, out.stderr
    assert f"Fix: chown -R {USER[0]}:{USER[1]} {state}" in out.stderr and "Traceback" not in out.stderr, out.stderr
    assert _ruleset(net) == before  # neither the posture nor anything else applied over it
    assert path.exists() and not (state / "rejected").exists()
    assert (state / "bundle.json").exists()

    for root in (False, True):
        got = _status(net, state, root=root)
        assert f"{path} (owner root:root" in str(got["state_unreadable"]), got
        assert "refuses to start" in str(got["warning"]) and "sets it aside" not in str(got["warning"]), got

    os.chown(path, *USER)  # the fix the message names: the daemon starts on its last known good
    out = _as_unit(net, "run", "--config", str(_config(scratch, state)), "--once")
    assert out.returncode == 0 and "revision 2" in out.stderr, out.stderr


def test_attack_a_state_file_the_agent_cannot_read_after_a_reboot_holds_the_posture_not_an_open_host(
    net: NetLab, scratch: Path
) -> None:
    """The same refusal where the kernel holds none of Ringfence's rules (a reboot): refusing
    to start there would leave the host open, so the fail-safe posture is held first; the last
    known good is still not set aside and is re-applied once the owner is fixed."""
    state = _state(scratch)
    key = ["--public-key", str(PUBLIC_KEY), "--state-dir", str(state), "--backend", "nftables"]
    out = _as_unit(net, "apply", "--bundle", str(NEWER), *key)
    assert out.returncode == 0, out.stderr
    path = state / "bundle.json"
    os.chown(path, 0, 0)
    net.exec("h2", AGENT, "flush", "--backend", "nftables", check=True)  # what a reboot leaves: nothing

    out = _as_unit(net, "run", "--config", str(_config(scratch, state)), "--once")
    assert out.returncode != 0 and f"{path} (owner root:root" in out.stderr, out.stderr
    assert "the fail-safe posture (fail-safes, then drop) holds" in out.stderr, out.stderr
    assert "table inet ringfence" in _ruleset(net) and "drop" in _ruleset(net)
    assert path.exists() and not (state / "rejected").exists()

    os.chown(path, *USER)
    out = _as_unit(net, "run", "--config", str(_config(scratch, state)), "--once")
    assert out.returncode == 0 and "re-applied last known good: ord-prod-proc-1 revision 2" in out.stderr, out.stderr
