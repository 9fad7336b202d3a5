"""ringfence-agent command line: apply, apply-delta, run, status, flush."""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import json
import os
import re
import stat
import sys
import time
from pathlib import Path

from ringfence import enforced
from ringfence.bundlewire import BundleError, Verifier, load_bundle, load_delta
from ringfence_agent import asowner
from ringfence_agent.asowner import read_input
from ringfence_agent.backends import ABSENT, BACKENDS, ApplyError, make_backend
from ringfence_agent.core import Agent, Rejected
from ringfence_agent.plan import LocalFailsafes, PlanError
from ringfence_agent.sessions import session_cutter
from ringfence_agent.state import StateDir, StateLocked

DEFAULT_STATE = Path("/var/lib/ringfence-agent")


def _err(msg: str) -> int:
    print(f"ringfence-agent: {msg}", file=sys.stderr)
    return 1


def _local(args: argparse.Namespace) -> LocalFailsafes:
    local = LocalFailsafes(
        admin_cidrs=tuple(args.admin_cidr or ()),
        dns_resolvers=tuple(args.dns or ()),
        control_plane=tuple(args.control_plane or ()),
    )
    if args.admin_port:
        local = dataclasses.replace(local, admin_ports=tuple(args.admin_port))
    return local


def _agent(args: argparse.Namespace) -> Agent:
    verifier = Verifier.from_pem(read_input(Path(args.public_key)), args.revoked_key or ())
    state = StateDir(Path(args.state_dir))
    cutter = session_cutter(args.backend, not args.keep_open_connections)
    backend = make_backend(args.backend, state.path)
    return Agent(args.workload_id, verifier, backend, state, _local(args), sessions=cutter)


def cmd_apply(args: argparse.Namespace) -> int:
    try:
        agent = _agent(args)
        doc = load_bundle(read_input(Path(args.bundle)))
        result = agent.apply_bundle(doc)
    except (Rejected, BundleError, PlanError, ApplyError, StateLocked, OSError) as exc:
        return _err(str(exc))
    print("\n".join(result.lines))
    return 0


def cmd_apply_delta(args: argparse.Namespace) -> int:
    try:
        agent = _agent(args)
        if agent.bundle is None:
            return _err(f"no bundle applied in {args.state_dir}: apply a bundle first")
        if agent.plan is None and args.backend in ("nftables", "iptables"):
            pass  # deltas go straight to the live sets
        for path in args.delta:
            result = agent.apply_delta(load_delta(read_input(Path(path))))
            print("\n".join(result.lines))
    except (Rejected, BundleError, PlanError, ApplyError, StateLocked, OSError) as exc:
        return _err(str(exc))
    return 0


def _kernel_programmed(backend: str, state_dir: Path) -> tuple[bool | None, str | None]:
    """Whether the kernel holds Ringfence's rules as the agent applied them (None: this backend
    cannot tell, or asking failed), and when not, what the backend found wrong: no table, or rules
    changed since the agent applied them (``kernel_problem``)."""
    try:
        b = make_backend(backend, state_dir)  # nftables: its seal is checked with the state directory's key
        problem = getattr(b, "kernel_problem", None)
        if problem is not None:
            why = problem()
            return why is None, (str(why) if why is not None else None)
        probe = getattr(b, "programmed", None)
        return (bool(probe()), None) if probe is not None else (None, None)
    except (ApplyError, OSError):
        return None, None


def _kernel_digest(backend: str, state_dir: Path, set_names: list[str]) -> tuple[str | None, str | None]:
    """(the enforced-policy digest of what the kernel holds, what the heartbeat sends; None: this
    backend cannot tell, or asking failed), and why reading it failed (None when it did not)."""
    try:
        probe = getattr(make_backend(backend, state_dir), "enforced", None)
        # the bundle's set names: iptables finds the ipsets named by a hash by them
        return (str(probe(set_names)) if probe is not None else None), None
    except (ApplyError, OSError, ValueError) as exc:
        return None, str(exc)


def _agent_version() -> str | None:
    from ringfence_agent import installed_version

    return installed_version()


def _agent_key(state_dir: Path) -> tuple[str | None, str | None]:
    """(its id, its fingerprint) of the agent's own key; None before it has one."""
    from ringfence_agent.agentkey import AgentKey

    try:
        key = AgentKey.load(state_dir)
    except (ValueError, OSError) as exc:
        return f"unreadable: {exc}", None
    return (key.key_id, key.fingerprint) if key is not None else (None, None)


def cmd_status(args: argparse.Namespace) -> int:
    state = StateDir(Path(args.state_dir))
    try:
        state.not_as_root_in_anothers()
    except OSError as exc:
        return _err(str(exc))
    status = state.read_json("status.json")
    unreadable = None
    # files the agent may not read (their owner or mode): it refuses to start, nothing set aside
    access = state.unreadable()
    try:
        bundle = state.load_bundle()
        deltas = state.load_deltas(bundle)
    except PermissionError as exc:
        bundle, deltas = None, []
        access = access or f"the last known good cannot be read: {exc}"
    except (BundleError, ValueError, OSError) as exc:
        bundle, deltas, unreadable = None, [], str(exc)
    # the kernel, not the state directory, says what is enforced
    kernel, problem = _kernel_programmed(args.backend, state.path)
    key_id, key_fingerprint = _agent_key(Path(args.state_dir))
    kernel_digest, read_error = _kernel_digest(args.backend, state.path, list(bundle.sets) if bundle else [])
    state_mode = bundle.mode.value if bundle else None
    posture = status.get("posture")
    expect = state_mode not in (None, "idle") or (bundle is None and posture is not None)
    lost = kernel is False and expect
    # the rules in the kernel are whole, but not the last known good's: the daemon holds the
    # posture (an unusable pinned key), or another bundle was applied from elsewhere
    other = (
        bundle is not None
        and not lost
        and kernel_digest is not None
        and kernel_digest != enforced.expected(bundle, deltas)
    )
    out = {
        "workload_id": state.identity(),
        "agent_version": _agent_version(),
        # the control plane refused agent_version in a heartbeat (older than this agent): its detail
        "agent_version_refused": status.get("agent_version_refused"),
        "agent_key": key_id,  # its id, as audit records name it
        "agent_key_fingerprint": key_fingerprint,  # what an operator's reset names as the next key
        "bundle_version": bundle.version if bundle else None,
        "applied_revision": max([bundle.version, *(d.to_version for d in deltas)]) if bundle else None,
        "policy_version": bundle.policy_version if bundle else None,
        "mode": None if lost or other else state_mode,
        "state_mode": state_mode,
        "posture": None if lost or (bundle is not None and not other) else posture,
        "kernel_programmed": kernel,
        "kernel_digest": kernel_digest,
        # why the kernel's rules could not be read back (nftables: the listing process died, e.g.
        # libnftables aborting on a name that is not UTF-8, or timed out): null when they were
        "kernel_read_error": read_error,
        "quarantined": bundle.quarantined if bundle else None,
        "expires_at": bundle.expires_at if bundle else None,
        # the enforced bundle expired without a refresh: still enforced (never fails open)
        "stale": bundle is not None and (bundle.expires_at is None or bundle.expires_at <= time.time()),
        "deltas_applied": len(deltas),
        "last_contact": status.get("last_contact"),
        "last_error": status.get("last_error"),
        "last_rejected": status.get("last_rejected"),
        "last_cut": status.get("last_cut"),
        "last_tamper": status.get("last_tamper"),  # the drift check's last re-apply: what it found
        # iptables with no namespace of its own on this host: the last apply was sealed as read back
        "seal_unchecked": status.get("seal_unchecked"),
        "last_sync": status.get("last_sync"),  # the last change applied: where its time went
        "counters": status.get("counters", {}),
        "daemon": status.get("daemon"),
        "state_unreadable": access,
    }
    if lost:
        what = f"mode {state_mode}" if state_mode else f"the {posture} posture"
        if problem is None or problem == ABSENT:
            out["warning"] = (
                f"the kernel holds no Ringfence rules although the state directory says {what}: "
                "nothing is enforced; run apply (or restart the daemon)"
            )
        else:  # the rules are there, but not as the agent applied them: what is enforced is unknown
            out["warning"] = (
                f"the kernel does not hold the rules of {what} as the agent applied them ({problem}): "
                "what is enforced is not the policy; run apply (or restart the daemon)"
            )
    if other and bundle is not None:
        holds = f"the {posture} posture" if posture else "other rules"
        out["warning"] = (
            f"the kernel does not enforce the last known good in the state directory (version {bundle.version}, "
            f"mode {state_mode}): it holds {holds}; see last_error"
        )
    if read_error is not None and expect and "warning" not in out:
        out["warning"] = (
            f"the kernel's rules could not be read back ({read_error}): what is enforced is unknown; "
            "run apply (or restart the daemon)"
        )
    if unreadable:
        out["warning"] = f"the last known good is unreadable ({unreadable}); the agent sets it aside at start"
    if access:
        out["warning"] = f"{access}; until then the agent refuses to start"
    if args.json:
        print(json.dumps(out, indent=1, sort_keys=True))
        return 0
    for key, value in out.items():
        if key in ("last_contact",) and isinstance(value, (int, float)):
            value = f"{time.strftime('%Y-%m-%dT%H:%M:%SZ', time.gmtime(value))} ({time.time() - value:.0f}s ago)"
        # status.json is the agent user's to write: nothing in it may drive the reader's terminal
        print(f"{key}: {json.dumps(value) if isinstance(value, (dict, list)) else terminal_line(value)}")
    return 0


# C0, DEL, C1; the Unicode line and paragraph separators; the bidi embeddings, overrides and
# isolates (as ringfence.textsafe, which the agent does not import)
_UNSAFE = re.compile("[\x00-\x1f\x7f-\x9f\u2028\u2029\u202a-\u202e\u2066-\u2069]")
_NAMED = {"\n": "\\n", "\r": "\\r", "\t": "\\t"}


def _shown(m: re.Match[str]) -> str:
    c = m.group()
    return _NAMED.get(c) or (f"\\x{ord(c):02x}" if ord(c) < 0x100 else f"\\u{ord(c):04x}")


def terminal_line(text: object) -> str:
    """``text`` with every character that could break or drive a terminal line shown escaped."""
    return _UNSAFE.sub(_shown, str(text))


def cmd_drops(args: argparse.Namespace) -> int:
    """Drop / would-drop events the kernel recorded for the applied bundle (counters + tuple tables)."""
    from ringfence_agent.plan import compile_plan
    from ringfence_agent.reports import DropCollector

    state = StateDir(Path(args.state_dir))
    try:
        state.not_as_root_in_anothers()
    except OSError as exc:
        return _err(str(exc))
    bundle = state.load_bundle()
    if bundle is None:
        return _err(f"no bundle applied in {args.state_dir}")
    from ringfence_agent.core import effective_bundle

    plan = compile_plan(effective_bundle(bundle, state.load_deltas(bundle)), LocalFailsafes())
    try:
        obs = make_backend(args.backend).observe(plan, {})
    except (OSError, ApplyError) as exc:  # a listing that died or timed out, iptables-save missing
        return _err(f"the kernel's counters could not be read: {exc}")
    if not obs.counters and args.backend in ("nftables", "iptables"):
        # every applied bundle has at least its two default counters: none means no rules
        return _err(
            f"the kernel holds no counters of Ringfence's rules ({args.backend}): nothing is applied here, "
            "or the rules were removed; see `ringfence-agent status`"
        )
    events = DropCollector().events(plan, obs)
    if args.json:
        print(json.dumps({"counters": obs.counters, "events": [dataclasses.asdict(e) for e in events]}, indent=1))
        return 0
    for name, packets in sorted(obs.counters.items()):
        print(f"counter {name}: {packets} packets")
    for e in events:
        sport = f":{e.sport}" if e.sport is not None else ""
        port = f":{e.dport}" if e.dport is not None else ""
        print(
            f"{e.action} {e.direction} {e.proto} {e.src}{sport} -> {e.dst}{port} x{e.count} rule={e.rule_id or 'default'}"
        )
    return 0


def cmd_flush(args: argparse.Namespace) -> int:
    try:
        removed = make_backend(args.backend).flush()
    except ApplyError as exc:
        return _err(str(exc))
    print("removed Ringfence's firewall state" if removed else "nothing to remove")
    return 0


def cmd_run(args: argparse.Namespace) -> int:
    """A config file that does not load never leaves the host open (it used to exit before
    programming anything): the daemon runs on the last configuration that loaded (kept in the
    state directory, ``--state-dir``), which re-applies its last known good, or without one
    holds the fail-safe posture; it says why in its log and status, loads the file again every
    few seconds, and once it loads starts over with it (the same process: exec). Not an exit for
    systemd to restart: the unit's Restart=always with RestartSec=2 would hit systemd's start rate
    limit within seconds and then stop restarting it for good, and outside systemd nothing would.
    With ``--once`` (a script, a test) the file's error is the exit status, as before."""
    from ringfence_agent.config import ConfigError, load_config, save_last_good
    from ringfence_agent.daemon import Daemon

    path = Path(args.config)
    origin = Path(args.config_path) if args.config_path else None
    try:
        if getattr(args, "config_unreadable", None):
            raise ConfigError(f"cannot read config {origin or path}: {args.config_unreadable}")
        cfg = load_config(path, origin, raw=getattr(args, "config_bytes", None))
    except ConfigError as exc:
        if args.once:  # one round for a script or a test: its exit status says the file is wrong
            return _err(str(exc))
        return _run_without_config(args, path, " ".join(str(exc).split()), origin)
    try:
        save_last_good(cfg, origin or path)
    except OSError as exc:  # best effort: the firewall does not depend on it
        print(f"ringfence-agent: last good configuration not kept in {cfg.state_dir}: {exc}", file=sys.stderr)
    try:
        return Daemon(cfg).run(once=args.once)
    except (BundleError, StateLocked, OSError) as exc:
        return _err(str(exc))


def _run_without_config(args: argparse.Namespace, source: Path, problem: str, origin: Path | None) -> int:
    from ringfence_agent.config import AgentConfig, ConfigError, load_last_good
    from ringfence_agent.daemon import Daemon

    state_dir = Path(args.state_dir)
    path = origin or source
    posture_only = False
    try:
        cfg, came_from = load_last_good(state_dir)
        print(
            f"ringfence-agent: ERROR: config {path} not loaded: {problem}; running on the last configuration "
            f"that loaded (from {came_from}, kept in {state_dir}) until it loads",
            file=sys.stderr,
        )
    except ConfigError as why:
        posture_only = True
        cfg = AgentConfig(
            workload_id=StateDir(state_dir).identity() or "unconfigured",
            public_key=state_dir / "no-configuration",
            state_dir=state_dir,
            backend=args.backend,
            source=str(state_dir / "no-configuration"),
            observe_interval=5.0,
        )
        print(
            f"ringfence-agent: ERROR: config {path} not loaded: {problem}; {why}: holding the fail-safe "
            "posture (no admin range is known: only DHCP and the metadata endpoint pass) until it loads",
            file=sys.stderr,
        )
    try:
        daemon = Daemon(cfg, config_error=problem, config_path=source, posture_only=posture_only, config_origin=origin)
        rc = daemon.run(once=args.once)
    except (BundleError, StateLocked, OSError) as exc:
        return _err(str(exc))
    if daemon.reload:
        sys.stderr.flush()
        sys.stdout.flush()
        os.execv(sys.executable, sys.orig_argv)  # noqa: S606 - this very command again, the file loaded this time
    return rc


def _common(p: argparse.ArgumentParser, key: bool = True) -> None:
    p.add_argument("--backend", choices=BACKENDS, default="nftables")
    p.add_argument("--state-dir", default=str(DEFAULT_STATE))
    if key:
        p.add_argument(
            "--public-key", required=True, help="the pinned key set: one or more Ed25519 public keys (PEM, one file)"
        )
        p.add_argument("--revoked-key", action="append", help="a key id refused even if pinned (repeatable)")
        p.add_argument(
            "--workload-id", help="this agent's workload id (default: pinned in the state dir by the first apply)"
        )
        p.add_argument("--admin-cidr", action="append", help="local fail-safe: admin range (repeatable)")
        p.add_argument("--admin-port", action="append", help="local fail-safe: admin port, e.g. tcp/22 (repeatable)")
        p.add_argument("--dns", action="append", help="local fail-safe: DNS resolver (repeatable)")
        p.add_argument("--control-plane", action="append", help="local fail-safe: control-plane address (repeatable)")
        p.add_argument(
            "--keep-open-connections",
            action="store_true",
            help="do not cut the open connections the new rules no longer admit (default: cut them)",
        )


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="ringfence-agent", description="Ringfence in-VM agent")
    sub = parser.add_subparsers(dest="command", required=True)
    p = sub.add_parser("apply", help="verify and apply one signed bundle")
    p.add_argument("--bundle", required=True)
    _common(p)
    p.set_defaults(func=cmd_apply)
    p = sub.add_parser("apply-delta", help="apply signed set deltas to the applied bundle")
    p.add_argument("--delta", required=True, action="append")
    _common(p)
    p.set_defaults(func=cmd_apply_delta)
    p = sub.add_parser("run", help="daemon: last known good, then follow the control plane or a static source")
    p.add_argument("--config", required=True)
    p.add_argument("--once", action="store_true", help="one sync round, then exit (for tests and cron)")
    p.add_argument(
        "--state-dir",
        default=str(DEFAULT_STATE),
        help="only when --config does not load: where the last configuration that loaded is kept",
    )
    p.add_argument(
        "--backend",
        choices=BACKENDS,
        default="nftables",
        help="only when --config does not load and no configuration ever did: the fail-safe posture's backend",
    )
    # the file --config is, where root passed it open (/dev/fd/N) to the state directory's owner
    p.add_argument("--config-path", help=argparse.SUPPRESS)
    p.set_defaults(func=cmd_run)
    p = sub.add_parser("status", help="applied versions, mode, last contact, counters, what the kernel holds")
    p.add_argument("--state-dir", default=str(DEFAULT_STATE))
    p.add_argument("--backend", choices=BACKENDS, default="nftables", help="the backend whose kernel state to check")
    p.add_argument("--json", action="store_true")
    p.set_defaults(func=cmd_status)
    p = sub.add_parser("drops", help="drop / would-drop events recorded by the kernel for the applied bundle")
    p.add_argument("--backend", choices=BACKENDS, default="nftables")
    p.add_argument("--state-dir", default=str(DEFAULT_STATE))
    p.add_argument("--json", action="store_true")
    p.set_defaults(func=cmd_drops)
    p = sub.add_parser("flush", help="remove Ringfence's table only")
    p.add_argument("--backend", choices=BACKENDS, default="nftables")
    p.set_defaults(func=cmd_flush)
    return parser


# the commands that work on a state directory (flush does not take one)
_ON_STATE = ("apply", "apply-delta", "run", "status", "drops")


def _as_owner(parser: argparse.ArgumentParser, args: argparse.Namespace, argv: list[str] | None) -> int | None:
    """Root on a state directory another user owns (the unit's): this command run as that user,
    as the unit starts the agent (:mod:`ringfence_agent.asowner`), its exit status; None when it
    runs here. Input files are passed open: root may read them, the owner perhaps not. Paths are
    made absolute first: the owner's process runs in /, and may not enter root's cwd (r15 F5)."""
    if args.command not in _ON_STATE:
        return None
    args.state_dir = os.path.abspath(args.state_dir)
    for name in ("bundle", "public_key", "config", "config_path"):
        if getattr(args, name, None):
            setattr(args, name, os.path.abspath(getattr(args, name)))
    if getattr(args, "delta", None):
        args.delta = [os.path.abspath(d) for d in args.delta]
    state_dir = Path(args.state_dir)
    if args.command == "run":  # the config names it; --state-dir only serves one that does not load
        from ringfence_agent.config import ConfigError, load_config

        # read once (r15 F4): a pipe read again is empty, and the decision and the run must be
        # about the same bytes; cmd_run uses these
        try:
            args.config_bytes = read_input(Path(args.config))
        except OSError as exc:  # cmd_run says so, and does not read it again
            args.config_bytes, args.config_unreadable = None, exc.strerror
        origin = Path(args.config_path) if args.config_path else None
        with contextlib.suppress(ConfigError):
            state_dir = load_config(Path(args.config), origin, raw=args.config_bytes or b"").state_dir
    user = asowner.owner_to_become(state_dir)
    if user is None:
        return None
    passed: list[int] = []
    if args.command in ("apply", "apply-delta"):
        args.public_key = asowner.pass_open(args.public_key, passed)
    if args.command == "apply":
        args.bundle = asowner.pass_open(args.bundle, passed)
    elif args.command == "apply-delta":
        args.delta = [asowner.pass_open(d, passed) for d in args.delta]
    elif args.command == "run" and not (_regular(args.config) and asowner.can_read(Path(args.config), user)):
        # by name where the owner may read it (the unit's own config): a daemon retrying a
        # config that did not load then sees it replaced, not only rewritten in place; else
        # the bytes root read, in a memory file
        args.config_path = args.config_path or args.config
        args.config = asowner.pass_bytes(args.config_bytes or b"", passed)
    return asowner.become(state_dir, user, _command_line(parser, args), argv, passed)


def _regular(path: str) -> bool:
    try:
        return stat.S_ISREG(os.stat(path).st_mode)
    except OSError:
        return False


def _command_line(parser: argparse.ArgumentParser, args: argparse.Namespace) -> list[str]:
    """The arguments that parse to ``args`` (each option by its full name)."""
    sub = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction)).choices[args.command]
    out = [args.command]
    for action in sub._actions:
        value = getattr(args, action.dest, None) if action.option_strings else None
        if value is None or value is False or action.dest == "help":
            continue
        opt = max(action.option_strings, key=len)
        if action.nargs == 0:
            out.append(opt)
        else:
            for v in value if isinstance(value, list) else [value]:
                out += [opt, str(v)]
    return out


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        done = _as_owner(parser, args, argv)
    except (asowner.Refused, OSError) as exc:
        return _err(str(exc))
    if done is not None:
        return done
    rc: int = args.func(args)
    return rc


if __name__ == "__main__":
    sys.exit(main())
