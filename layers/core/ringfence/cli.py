"""``ringfence``: the operator command line. Each command is a few lines over the library."""

from __future__ import annotations

import argparse
import errno
import json
import os
import stat
import sys
import time
from collections.abc import Callable, Iterable, Iterator, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

from ringfence.textsafe import line as _line

# Each command imports what it needs when it runs: the CLI's fixed cost is Python's start and this
# module, not the whole library (pydantic models, the compiler, cryptography). `python -X importtime
# -m ringfence.cli connectivity …` shows what a command pulls in.
if TYPE_CHECKING:
    from ringfence import bundle as bundle_mod
    from ringfence import staticlayout
    from ringfence.engine import Engine
    from ringfence.model import Workload
    from ringfence.policy import Policy
    from ringfence.versions import FileVersionStore, VersionScan


class CliError(Exception):
    """A user-facing failure: printed without a traceback, exit status 1."""


def _store(args: argparse.Namespace) -> tuple[FileVersionStore, VersionScan]:
    """The CLI's version store and its version files, read once (the command passes the read on
    rather than reading them again); a version file that does not read as a version is named on
    stderr (it is skipped, never the active version, and its number is not given out again)."""
    from ringfence.versions import FileVersionStore

    store = FileVersionStore(Path(args.store or os.environ.get("RINGFENCE_STORE", ".ringfence")))
    scan = store.scan()
    for problem in scan.unreadable:
        print(f"warning: {problem}: skipped (set it aside once looked at)", file=sys.stderr)
    return store, scan


def _record_version(
    store: FileVersionStore,
    scan: VersionScan,
    files: dict[str, str],
    author: str,
    message: str,
    action: str,
    detail: dict[str, Any],
) -> Any:
    """``record_version`` (its audit record first, then the version), its failures as errors
    naming the store and saying truthfully what was written."""
    from ringfence.versions import AuditNotWritten, VersionConflict, VersionNotWritten, record_version

    def warn(text: str) -> None:
        print(f"warning: {store.root}: {text}", file=sys.stderr)

    if scan.unreadable:  # the audit record says which files the number went past
        detail = {**detail, "skipped_unreadable_versions": scan.unreadable}
    try:
        return record_version(store, files, author, message, action, detail, warn=warn, scan=scan)
    except AuditNotWritten as exc:
        why = exc.cause.strerror or str(exc.cause)
        raise CliError(
            f"{store.root}: the audit record of policy version {exc.version.number} could not be written ({why}): "
            "nothing provisioned (no version written)"
        ) from None
    except VersionNotWritten as exc:
        n, cause = exc.version.number, exc.cause
        why = (cause.strerror if isinstance(cause, OSError) else None) or str(cause)
        said = (
            f"recorded as {action}.{exc.outcome}"
            if exc.followed
            else f"the {action}.{exc.outcome} record could not be written either: audit record {exc.audit_id} "
            "names a version that is not there"
        )
        if isinstance(cause, VersionConflict):
            raise CliError(
                f"{store.dir}: {cause} (provisioned by someone else meanwhile): nothing written of this one, "
                f"{said}; run again"
            ) from None
        if exc.outcome == "unconfirmed":
            raise CliError(
                f"{store.root}: writing policy version {n} failed ({why}) and whether it is there cannot be told; "
                f"{said}: look at {store.dir}"
            ) from None
        raise CliError(
            f"{store.root}: policy version {n} could not be written ({why}): nothing provisioned; {said}"
        ) from None


def _inventory(args: argparse.Namespace) -> list[Workload]:
    from ringfence.inventory import load_inventory

    return load_inventory(Path(args.inventory)) if getattr(args, "inventory", None) else []


def _engine(args: argparse.Namespace, revision: int = 0, inventory: list[Workload] | None = None) -> tuple[Any, Engine]:
    from ringfence.engine import Engine
    from ringfence.policy import load_policy

    policy = load_policy(Path(args.policy))
    engine = Engine(policy, policy_version=getattr(args, "policy_version", 0) or 0, revision=revision)
    engine.load(_inventory(args) if inventory is None else inventory)
    return policy, engine


def write_layout_file(out: Path, relative: str, text: str) -> None:
    """One file of the static layout under ``out``, replaced atomically: agents may be reading the
    directory (or a web server serving it) while a compile writes. Ids never escape ``out``."""
    rel = Path(relative)
    if rel.is_absolute() or any(part in (".", "..") for part in rel.parts):
        raise CliError(f"{relative!r} cannot be used as a file name")
    from ringfence import durable

    # ``out`` may belong to another account (the web server's): it could plant a link at a
    # temporary name, or swap ``bundles/`` for a link to a root-only directory. The file is written
    # through directory descriptors opened without following links, at a name no one can guess.
    out.mkdir(parents=True, exist_ok=True)  # ``out`` itself, as given, is the caller's choice
    try:
        durable.replace_beneath(out, rel, text.encode(), 0o644)
    except NotADirectoryError as exc:
        raise CliError(
            f"{exc.filename}: a symbolic link or not a directory: nothing written through it "
            f"(no link under --out {out} is followed)"
        ) from None


def _write_out(text: str, out: str) -> None:
    """``text`` as the ``--out`` file. Replaced (a temporary file beside it renamed over it), never
    written through: a link at ``out`` is replaced by the file, its target left as it was. Refused
    where a directory on the path (``out``'s own and every one above, along the path as given and
    as it resolves) is another user's or writable by one (sticky ones, as /tmp, aside): they could
    swap a directory for a link and have this command replace a file elsewhere. An existing
    regular file of the caller's (not a hard link) keeps its mode; otherwise the new file is made
    under the umask."""
    from ringfence import durable
    from ringfence.local.signer_process import path_problem

    path = Path(out)
    why = path_problem(
        path,
        tuple(sorted({0, os.geteuid()})),
        label="--out",
        what="the directory this file is written to with a link",
        follow_last=False,
        sticky_parent_ok=True,
    )
    if why is not None:
        raise CliError(f"--out {out}: refused: {why}; nothing written")
    umask = os.umask(0o077)
    os.umask(umask)
    try:
        st: os.stat_result | None = path.lstat()
    except OSError:
        st = None
    mode = 0o666 & ~umask
    if st is not None and stat.S_ISREG(st.st_mode) and st.st_uid == os.geteuid() and st.st_nlink == 1:
        # only the caller's own file keeps its mode (a 600 one stays private): another user's (made
        # first in a sticky directory, mode 666) or a hard link to some other file says nothing of
        # what this output should be; no set-id bits either way
        mode = stat.S_IMODE(st.st_mode) & 0o777
    try:
        durable.replace(path, text.encode(), mode)
    except OSError as exc:
        raise CliError(f"{out}: {exc.strerror or exc}") from None


def _emit(text: str, out: str | None) -> None:
    """Write ``text`` to the ``--out`` file (:func:`_write_out`), or to stdout."""
    if out:
        _write_out(text, out)
        print(f"wrote {out}")
    else:
        sys.stdout.write(text)


def _print_json(obj: object) -> None:
    print(json.dumps(obj, indent=1, sort_keys=True, default=str))


# --- policy ------------------------------------------------------------------------------------


def _print_warnings(policy: Policy, workloads: list[Workload] | None) -> list[str]:
    """Warnings (never errors) on stderr, each with file:line:column; returned as text."""
    from ringfence.policywarnings import warnings

    found = [str(w) for w in warnings(policy, workloads)]
    for w in found:
        print(w, file=sys.stderr)
    return found


def cmd_policy_validate(args: argparse.Namespace) -> int:
    from ringfence.policy import load_policy

    policy = load_policy(Path(args.path))
    found = _print_warnings(policy, _inventory(args) if args.inventory else None)
    if found:
        print(f"{len(found)} warning(s)", file=sys.stderr)
    print(
        f"ok: {len(policy.sources)} files, {len(policy.rules)} rules, {len(policy.services) - 1} services, "
        f"{len(policy.ip_lists) - 1} ip lists, {len(policy.label_groups)} label groups, {len(policy.tests)} tests"
    )
    return 0


def cmd_policy_test(args: argparse.Namespace) -> int:
    from ringfence.engine import Engine
    from ringfence.policy import load_policy
    from ringfence.policytests import run_tests

    policy = load_policy(Path(args.path))
    engine = Engine(policy)
    engine.load(_inventory(args))
    results = run_tests(policy, engine.workloads)
    for r in results:
        print(r.report())
    failed = sum(not r.passed for r in results)
    print(f"{len(results) - failed} passed, {failed} failed")
    return 1 if failed else 0


def cmd_policy_schema(args: argparse.Namespace) -> int:
    from ringfence.policy import schema_text

    text = schema_text()
    _emit(text, args.out)
    return 0


def cmd_policy_diff(args: argparse.Namespace) -> int:
    from ringfence.policy import load_policy, load_policy_texts
    from ringfence.policydiff import diff

    _, scan = _store(args)
    draft = load_policy(Path(args.path))
    latest = scan.latest
    active = load_policy_texts(latest.files) if latest else None
    result = diff(active, draft, _inventory(args))
    print(f"draft vs active version {latest.number}" if latest else "draft vs nothing provisioned yet")
    print(result.format())
    return 0


def cmd_policy_provision(args: argparse.Namespace) -> int:
    from ringfence.policy import load_policy
    from ringfence.versions import default_actor, digest_of, relative_files

    if not args.message.strip():
        raise CliError("--message must say why (it is kept with the version)")
    path = Path(args.path)
    draft = load_policy(path)
    workloads = _inventory(args)
    failures = _failing_tests(draft, workloads)
    if failures:
        raise CliError(f"{failures} policy test(s) fail: nothing provisioned")
    found = _print_warnings(draft, workloads if args.inventory else None)
    store, scan = _store(args)
    base = path if path.is_dir() else path.parent
    files = relative_files(draft.sources, base)
    latest = scan.latest
    if latest is not None and latest.digest == digest_of(files):
        print(f"draft is identical to active version {latest.number}: nothing to provision")
        return 0
    detail: dict[str, Any] = {"rules": len(draft.rules)}
    if found:
        detail["warnings"] = found
    version = _record_version(
        store, scan, files, args.author or default_actor(), args.message, "policy.provision", detail
    )
    print(f"provisioned policy version {version.number} by {_line(version.author)}: {_line(version.message)}")
    return 0


def _failing_tests(policy: Policy, workloads: list[Workload]) -> int:
    """Runs the policy's tests: blocks against ``workloads``; reports each failure on stderr."""
    from ringfence.engine import Engine
    from ringfence.policytests import run_tests

    engine = Engine(policy)
    engine.load(workloads)
    failures = [r for r in run_tests(policy, engine.workloads) if not r.passed]
    for r in failures:
        print(r.report(), file=sys.stderr)
    return len(failures)


def cmd_policy_revert(args: argparse.Namespace) -> int:
    """Versions are immutable: reverting provisions an old version's files as a new version.

    The old version's tests passed against the estate of its day; the estate has moved since, so
    they run again, and a failure stops the revert unless ``--force`` (an emergency) says to go on."""
    from ringfence.policy import load_policy_texts
    from ringfence.versions import VersionUnreadable, default_actor

    if not args.message.strip():
        raise CliError("--message must say why")
    store, scan = _store(args)
    try:
        old = store.get(args.number)
    except VersionUnreadable as exc:
        raise CliError(f"{exc}: cannot revert to it") from None
    policy = load_policy_texts(old.files)
    latest = scan.latest
    if latest is not None and latest.digest == old.digest:
        print(f"active version {latest.number} already has the content of version {old.number}")
        return 0
    failures = _failing_tests(policy, _inventory(args))
    if failures and not args.force:
        raise CliError(
            f"{failures} policy test(s) of version {old.number} fail now: nothing reverted (--force to revert anyway)"
        )
    detail: dict[str, Any] = {"reverted_to": old.number, "rules": len(policy.rules)}
    if failures:
        detail["forced_past_failing_tests"] = failures
        print(f"warning: reverting although {failures} policy test(s) fail (--force)", file=sys.stderr)
    version = _record_version(
        store, scan, old.files, args.author or default_actor(), args.message, "policy.revert", detail
    )
    print(
        f"provisioned policy version {version.number} with the content of version {old.number}: "
        f"{_line(version.message)}"
    )
    return 0


def cmd_policy_versions(args: argparse.Namespace) -> int:
    for v in _store(args)[1].versions:
        # author and message are free text a caller gave (stored): one line each, nothing that acts
        print(f"{v.number:>4}  {_line(v.created_at)}  {_line(v.author):<16} {_line(v.message)}")
    return 0


# --- labels, compile, explain, connectivity ----------------------------------------------------


def cmd_labels_check(args: argparse.Namespace) -> int:
    from ringfence.engine import Engine
    from ringfence.policy import load_policy
    from ringfence.policywarnings import estate_warnings

    policy = load_policy(Path(args.policy))
    store = None
    if args.flows:
        store = _opened_store(args.flows)
    if args.inventory:
        workloads = _inventory(args)
    elif store is not None:  # the estate as reconcile and ingest keep it
        workloads = [r.effective() for r in store.all_records() if r.active]
    else:
        raise CliError("--inventory FILE, or --flows naming a store that holds the inventory")
    engine = Engine(policy)
    engine.load(workloads)
    flagged = [ws for ws in engine.workloads.values() if ws.problems]
    # the policy over this estate: selectors it leaves matching nothing, rules pairing nobody
    findings: list[dict[str, Any]] = [
        {**w.doc(), "kind": f"policy/{w.kind}"} for w in estate_warnings(policy, workloads)
    ]
    if store is not None:  # what the wire showed: addresses nobody holds, traffic a role should not have
        from ringfence.flows.hygiene import flow_findings
        from ringfence.flows.suggest import agent_groups

        # one end's word about a peer that runs an agent accuses no one (flows/unconfirmed)
        agents = agent_groups(policy, store.all_records())
        findings += flow_findings(policy, workloads, store.flow_rows(), args.fanout, agents)
    if args.json:
        _print_json(
            {
                "workloads": [
                    {
                        "workload": ws.id,
                        "unlabeled": ws.unlabeled,
                        "labels": ws.labels,
                        "problems": [
                            {"kind": p.kind, "dimension": p.dimension, "message": p.message, "suggestion": p.suggestion}
                            for p in ws.problems
                        ],
                    }
                    for ws in flagged
                ],
                "findings": findings,
            }
        )
    else:
        for ws in flagged:
            status = f"UNLABELED (gets mode {ws.mode.value})" if ws.unlabeled else "warning"
            print(f"{_line(ws.id)}: {status}")
            for p in ws.problems:  # they quote tag values
                print(f"  {p.kind:8} {_line(p.message)}")
        for f in findings:
            where = f" ({_line(f['location'])})" if f.get("location") else ""
            print(f"finding {f['kind']}{where}: {_line(f['message'])}")
        print(
            f"{len(engine.workloads)} workloads, {sum(ws.unlabeled for ws in flagged)} unlabeled, "
            f"{sum(not ws.unlabeled for ws in flagged)} with warnings, {len(findings)} findings"
        )
    if args.siem:
        _label_findings_to_siem(args.siem, flagged, findings)
    return 1 if any(ws.unlabeled for ws in flagged) and args.strict else 0


def _finding_subject(f: dict[str, Any]) -> str:
    """What a policy or flow finding is about, for its stable uid and its resource: the rule and
    file:line of a policy warning, the address or app group of a flow finding (and the port)."""
    if f["kind"].startswith("policy/"):
        return f"{f.get('rule') or '-'}@{f.get('location') or '-'}"
    subject = str(f.get("address") or f.get("group") or "-")
    return f"{subject}:{f['port']}:{f.get('peer', '-')}" if f.get("port") else subject


def _label_findings_to_siem(spec: str, flagged: list[Any], findings: list[dict[str, Any]]) -> None:
    """Each label problem, each policy warning over the estate and each finding from flows as an
    OCSF Detection Finding (uid stable across runs: a SIEM can dedupe)."""
    from ringfence.siem import Siem, SiemSpecError, ocsf

    try:
        siem = Siem.from_spec(spec)
    except SiemSpecError as exc:
        raise CliError(str(exc)) from None
    now = time.time()
    siem.emit(
        ocsf.detection_finding(
            f"label-hygiene:{ws.id}:{p.kind}:{p.dimension or '-'}",
            title=f"Label {p.kind}: {ws.id}",
            time=now,
            severity_id=ocsf.MEDIUM if ws.unlabeled else ocsf.LOW,
            resource=ws.id,
            analytic=f"label-hygiene/{p.kind}",
            message=f"{ws.id}: {p.message}",
            detail={"dimension": p.dimension, "suggestion": p.suggestion, "unlabeled": ws.unlabeled},
        )
        for ws in flagged
        for p in ws.problems
    )
    siem.emit(
        ocsf.detection_finding(
            f"{f['kind']}:{_finding_subject(f)}",
            title=f"{f['kind']}: {_finding_subject(f)}",
            time=now,
            # traffic no rule explains, or an address nobody holds, is worth a look; a policy warning less so
            severity_id=ocsf.MEDIUM if f["kind"].startswith("flows/") else ocsf.LOW,
            resource=_finding_subject(f),
            analytic=f["kind"],
            message=f["message"],
            detail={k: v for k, v in f.items() if k not in ("kind", "message")},
        )
        for f in findings
    )
    siem.close()
    if siem.failed:
        raise CliError(f"{siem.failed} finding(s) not delivered to {spec} (see the log)")


def cmd_compile(args: argparse.Namespace) -> int:
    from ringfence import bundle as bundle_mod
    from ringfence import staticlayout
    from ringfence.publish import static_release

    out = Path(args.out)
    inventory = _inventory(args)
    # only this inventory's workloads: their agents are the ones a previous compile's versions matter to
    previous, heads = _previous_compile(out, (w.id for w in inventory))
    floor = max((b.version for b in previous.values()), default=0)
    # Offline compiles have no durable revision counter: start from the clock (ms), so bundle
    # versions from a later run are always higher and an agent never takes an older one.
    start = args.revision if args.revision is not None else max(time.time_ns() // 1_000_000, floor)
    if start < floor:
        raise CliError(f"--revision {start} is below the previous compile in {out} (version {floor})")
    _, engine = _engine(args, revision=start, inventory=inventory)
    fresh = {wid: bundle_mod.Bundle.model_validate(engine.render(wid)) for wid in sorted(engine.workloads)}
    # compiling again into the same directory continues from what is there: unchanged sets and
    # bundles keep their versions, changed sets get deltas (docs/agent.md, static source)
    release = static_release(fresh, previous, heads, engine.revision)
    signer = bundle_mod.SigningKey.from_file(Path(args.key)) if args.key else None

    expires_at = int(time.time()) + args.expires_in

    def signed(doc: bundle_mod.D) -> bundle_mod.D:
        return bundle_mod.sign(doc, signer, expires_at=expires_at) if signer is not None else doc

    for d in release.deltas:  # deltas, bundles, heads: a head never announces what is not there yet
        write_layout_file(out, staticlayout.delta_path(d.set, d.from_version), bundle_mod.dumps(signed(d)))
    changed = 0
    key_id = signer.key_id if signer is not None else None
    for wid, doc in release.bundles.items():
        prev = previous.get(wid)
        fresh_enough = (prev.expires_at or 0) > time.time() + args.expires_in / 2 if prev is not None else False
        if (
            prev is not None
            and prev.version == doc.version
            and (prev.signature and prev.signature.key_id) == key_id
            and (signer is None or fresh_enough)
        ):
            continue  # the same version is the same content: the file there is already this bundle
        changed += 1
        write_layout_file(out, staticlayout.bundle_path(wid), bundle_mod.dumps(signed(doc)))
    for wid, head in release.heads.items():
        if heads.get(wid) != head:
            write_layout_file(out, staticlayout.head_path(wid), head.dumps())
    print(
        f"{len(release.bundles)} bundles in {out / 'bundles'} ({len(engine.sets)} distinct sets): "
        f"wrote {changed} new or changed and {len(release.deltas)} set deltas"
        + ("" if signer else "; UNSIGNED: pass --key to sign")
    )
    return 0


# The largest previous-layout file read back: the agent's own bundle limit (max_bundle_bytes in
# agent/ringfence_agent/config.py); a bigger one is not read, and the fresh compile writes it whole.
PREVIOUS_LAYOUT_MAX_BYTES = 16 * 1024 * 1024


def _previous_layout_files(out: Path, sub: str, names: Iterable[str]) -> Iterator[tuple[str, Path, bytes]]:
    """``out/sub/<name>`` for each of ``names`` (never a listing of the directory: ``out`` may be
    the web server account's, who could fill it with any number of files), those that are regular
    files of at most :data:`PREVIOUS_LAYOUT_MAX_BYTES`, each opened relative to ``sub``'s
    descriptor without following a link and without blocking (a FIFO there would hang the
    compile, a link to /dev/zero exhaust its memory). A missing one is skipped quietly, anything
    else not read with a message naming it."""
    nofollow = os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC
    try:
        dir_fd = os.open(out / sub, nofollow | os.O_DIRECTORY)
    except FileNotFoundError:
        return
    except OSError as exc:
        print(f"ignoring {out / sub}: {exc.strerror} (not followed if a link)", file=sys.stderr)
        return
    try:
        for name in names:
            path = out / sub / name
            try:
                fd = os.open(name, nofollow | os.O_NONBLOCK, dir_fd=dir_fd)
            except FileNotFoundError:
                continue
            except OSError as exc:
                why = "a symbolic link" if exc.errno == errno.ELOOP else exc.strerror
                print(f"ignoring {path}: {why}", file=sys.stderr)
                continue
            with os.fdopen(fd, "rb") as f:
                st = os.fstat(f.fileno())
                if not stat.S_ISREG(st.st_mode):
                    print(f"ignoring {path}: not a regular file", file=sys.stderr)
                    continue
                if st.st_size > PREVIOUS_LAYOUT_MAX_BYTES:
                    print(f"ignoring {path}: {st.st_size} bytes, over {PREVIOUS_LAYOUT_MAX_BYTES}", file=sys.stderr)
                    continue
                try:
                    data = f.read(PREVIOUS_LAYOUT_MAX_BYTES + 1)
                except OSError as exc:
                    print(f"ignoring {path}: {exc.strerror}", file=sys.stderr)
                    continue
            if len(data) > PREVIOUS_LAYOUT_MAX_BYTES:  # grew after the check
                print(f"ignoring {path}: over {PREVIOUS_LAYOUT_MAX_BYTES} bytes", file=sys.stderr)
                continue
            yield name, path, data
    finally:
        os.close(dir_fd)


def _previous_compile(
    out: Path, workload_ids: Iterable[str]
) -> tuple[dict[str, bundle_mod.Bundle], dict[str, staticlayout.Head]]:
    """The bundles and heads a previous compile left in ``out`` for ``workload_ids`` (this
    compile's, from the caller's inventory): read by their names, so what is kept is bounded by
    the inventory, never by what else is there. Unreadable files are skipped, as is anything not a
    regular file (:func:`_previous_layout_files`) or a document for another workload."""
    from ringfence import bundle as bundle_mod
    from ringfence import staticlayout

    by_name = {staticlayout.file_name(wid): wid for wid in sorted(set(workload_ids))}
    bundles: dict[str, bundle_mod.Bundle] = {}
    heads: dict[str, staticlayout.Head] = {}
    for name, path, data in _previous_layout_files(out, "bundles", by_name):
        try:
            doc = bundle_mod.load_bundle(data)
        except bundle_mod.BundleError as exc:
            print(f"ignoring {path}: {exc}", file=sys.stderr)
            continue
        if doc.workload_id != by_name[name]:
            print(f"ignoring {path}: a bundle of {doc.workload_id!r}, not of {by_name[name]!r}", file=sys.stderr)
            continue
        bundles[doc.workload_id] = doc
    for name, path, data in _previous_layout_files(out, "heads", by_name):
        try:
            head = staticlayout.load_head(data)
        except staticlayout.HeadError as exc:
            print(f"ignoring {path}: {exc}", file=sys.stderr)
            continue
        if head.workload_id != by_name[name]:
            print(f"ignoring {path}: the head of {head.workload_id!r}, not of {by_name[name]!r}", file=sys.stderr)
            continue
        heads[head.workload_id] = head
    return bundles, heads


def cmd_explain(args: argparse.Namespace) -> int:
    from ringfence.addresses import format_address
    from ringfence.engine.explain import EndpointError, decide, format_decision, parse_endpoint, per_pair, why_denied
    from ringfence.services import PortSpecError, parse_flow_port

    policy, engine = _engine(args)
    try:
        proto, port = parse_flow_port(args.port)
        src = parse_endpoint(args.src, policy, engine.workloads)
        dst = parse_endpoint(args.dst, policy, engine.workloads)
    except (EndpointError, PortSpecError) as exc:
        raise CliError(str(exc)) from None
    d = decide(policy, src, dst, proto, port)
    if args.json:
        _print_json(
            {
                "from": src.name,
                "to": dst.name,
                "proto": proto,
                "port": port,
                "verdict": d.verdict,
                "policy_verdict": d.policy_verdict,
                "staged_verdict": d.staged_verdict,
                "by_address": [
                    {
                        "from": format_address(sa) if sa is not None else None,
                        "to": format_address(da) if da is not None else None,
                        "verdict": p.verdict,
                        "policy_verdict": p.policy_verdict,
                        "staged_verdict": p.staged_verdict,
                        "denied_by": why_denied(p),
                    }
                    for sa, da, p in per_pair(d)
                ],
                # several addresses: the (source, destination) address pair the sides are for
                "sides_for": None
                if d.shown is None
                else {
                    "from": format_address(d.shown[0]) if d.shown[0] is not None else None,
                    "to": format_address(d.shown[1]) if d.shown[1] is not None else None,
                },
                "sides": [
                    {
                        "direction": s.direction,
                        "workload": s.endpoint.name,
                        "mode": s.endpoint.mode.value if s.endpoint.mode else None,
                        "quarantined": s.endpoint.quarantined,
                        "decision": s.effective,
                        "deciding_rule": s.deciding.id if s.deciding else None,
                        "failsafe": s.failsafe,
                        "rules": [
                            {"id": r.id, "action": r.action.value, "staged": r.staged, "location": str(r.location)}
                            for r in s.matched
                        ],
                    }
                    for s in d.sides
                ],
            }
        )
    else:
        print(format_decision(d))
    return 0


def cmd_connectivity(args: argparse.Namespace) -> int:
    from ringfence.engine.connectivity import compute_inventory, write_json, write_text
    from ringfence.policy import load_policy

    # the matrix needs labels (and, for IP-list rules, addresses) only: no engine, no bundles
    policy = load_policy(Path(args.policy))
    m = compute_inventory(policy, _inventory(args), include_staged=args.staged)
    out = sys.stdout
    if args.json:
        write_json(m, policy, out.write, workloads=args.workloads)
    else:
        write_text(m, out.write, workloads=args.workloads)
    out.flush()
    return 0


def cmd_map(args: argparse.Namespace) -> int:
    from ringfence.policy import load_policy
    from ringfence.viz.depmap import MapFilter, build_map
    from ringfence.viz.render import render

    rows = _opened_store(args.flows).flow_rows() if args.flows else []
    draft = load_policy(Path(args.draft)) if args.draft else None
    f = MapFilter(app=args.app, env=args.env, decision=args.decision, min_flows=args.min_flows)
    m = build_map(load_policy(Path(args.policy)), _inventory(args), rows, f, draft)
    try:
        text = render(m, args.format)
    except ValueError as exc:
        raise CliError(str(exc)) from None
    if args.out:
        _write_out(text, args.out)
        print(f"{args.out}: {len(m.nodes)} nodes, {len(m.edges)} edges (from {m.source})", file=sys.stderr)
    else:
        sys.stdout.write(text)
    return 0


def cmd_suggest(args: argparse.Namespace) -> int:
    from ringfence.engine import Engine
    from ringfence.flows.suggest import SuggestError, agent_groups, merged_policy, suggest
    from ringfence.policy import load_policy
    from ringfence.policytests import run_tests

    policy = load_policy(Path(args.policy))
    store = _opened_store(args.flows)
    rows = store.flow_rows()
    # the store's inventory says which workloads run an agent: one end's word about these is not taken
    agents = agent_groups(policy, store.all_records())
    try:
        sug = suggest(policy, rows, args.app, args.env, args.min_flows, args.include_allowed, agents)
    except SuggestError as exc:
        raise CliError(f"{exc}; narrow it with --min-flows or --env") from None
    if args.json:
        _emit(json.dumps(sug.doc(), indent=1, sort_keys=True) + "\n", args.out)
    else:
        _emit(sug.yaml, args.out)
    print(sug.summary(), file=sys.stderr)
    if args.inventory:  # the tests provisioning would run: the policy's own and the suggestion's
        engine = Engine(merged := merged_policy(policy, sug))
        engine.load(_inventory(args))
        results = run_tests(merged, engine.workloads)
        failed = [r for r in results if not r.passed]
        for r in failed:
            print(r.report(), file=sys.stderr)
        print(
            f"with the suggestion: {len(results) - len(failed)} policy tests pass, {len(failed)} fail", file=sys.stderr
        )
        return 1 if failed else 0
    return 0


def cmd_findings(args: argparse.Namespace) -> int:
    from ringfence.control.findings import findings

    if args.bound <= 0:
        raise CliError(f"--bound {args.bound}: must be a positive number of seconds")
    res = findings(_opened_store(args.store), bound=args.bound, agents_listed=args.agents)
    if args.json:
        print(res.model_dump_json(indent=1))
        return 1 if res.findings else 0
    for f in res.findings:
        print(f"{f.kind:<16} {_line(f.workload_id):<24} {_line(f.detail)}")
    print(
        f"{len(res.findings)} findings over {res.checked} enrolled workloads (bound {res.bound:.0f} s)", file=sys.stderr
    )
    if args.agents:
        now = time.time()
        print(f"{'workload':<24} {'agent version':<28} {'enforces':<9} {'latest':<9} last heartbeat")
        for a in res.agents:
            seen = "never" if a.last_heartbeat is None else f"{max(0.0, now - a.last_heartbeat):.0f} s ago"
            print(
                f"{_line(a.workload_id):<24} {_line(a.agent_version or '-'):<28} "
                f"{'-' if a.enforced_version is None else a.enforced_version!s:<9} "
                f"{'-' if a.latest_version is None else a.latest_version!s:<9} {seen}"
            )
    return 1 if res.findings else 0


def cmd_flows_ingest(args: argparse.Namespace) -> int:
    from ringfence.flows.ingest import FlowIngest, reporter_of
    from ringfence.flows.resolve import sync_addresses
    from ringfence.policy import load_policy

    store = _opened_store(args.store, write=True, create=args.create)
    ingest = FlowIngest(store, load_policy(Path(args.policy)), args.retention_days)
    if args.inventory:  # an estate from a file: its owners noted as of now
        sync_addresses(store, _inventory(args), [], time.time())
    else:
        ingest.sync()
    bad = 0
    for name in args.files:
        data = Path(name).read_bytes()
        if name.endswith(".json"):  # an agent's report batch, as the agent API stores it
            r = ingest.agent_batch(reporter_of(str(Path(name).resolve())), json.loads(data))
        else:
            r = ingest.vpc_object(name, data)
            for e in r.files[0].errors:
                print(f"malformed: {e}", file=sys.stderr)
        bad += r.malformed
        print(f"{name}: {r.flows} flows → {r.rows} rows" + (f", {r.malformed} malformed lines" if r.malformed else ""))
    return 1 if bad and args.strict else 0


def cmd_inventory_show(args: argparse.Namespace) -> int:
    from ringfence.addresses import format_address

    _, engine = _engine(args)
    for ws in sorted(engine.workloads.values(), key=lambda w: w.id):
        # ids and label values come from tags: a value of a dimension with no `allowed:` list is any text
        labels = _line(",".join(f"{k}={v}" for k, v in sorted(ws.labels.items())))
        ips = " ".join(format_address(a) for a in ws.addrs)
        state = "quarantined" if ws.quarantined else ws.mode.value
        print(f"{_line(ws.id):<20} {state:<11} {ips:<28} {labels}")
    return 0


# --- bench and export ---------------------------------------------------------------------------


def cmd_bench(args: argparse.Namespace) -> int:
    from ringfence.bench import format_text, run_bench

    result = run_bench(args.workloads, seed=args.seed, changes=args.changes, necessary_every=args.necessary_every)
    if args.json:
        print(json.dumps(result, sort_keys=True))
    else:
        print(format_text(result))
    return 0


def cmd_export_calico(args: argparse.Namespace) -> int:
    from ringfence.export.calico import export_calico
    from ringfence.policy import load_policy

    policy = load_policy(Path(args.policy))
    text = export_calico(policy, _inventory(args), modes=not args.no_modes, failsafes=not args.no_failsafes)
    _emit(text, args.out)
    return 0


# --- keys and bundles --------------------------------------------------------------------------


AUDIT_STORE_HELP = (
    "where the audit chain is: sqlite:PATH (ringfence serve's state), dynamodb:INVENTORY,STATE,AUDIT "
    "(table names; region and credentials as boto3 finds them), file:DIR or DIR (the CLI's version "
    "store; default $RINGFENCE_STORE or .ringfence)"
)


def _opened_store(spec: str, what: str = "store", *, write: bool = False, create: bool = False) -> Any:
    """A store a command reads (opened read-only) or, with ``write``, writes. A SQLite file must
    exist unless ``create`` says to start one: opening would create an empty one, whose nothing
    reads as "0 findings" or an empty chain that verifies."""
    from ringfence.store import open_store

    if spec.startswith("sqlite:") and not create and not Path(spec.removeprefix("sqlite:")).is_file():
        raise CliError(f"{what} {spec!r}: no such database file" + (" (--create to start one)" if write else ""))
    if spec.startswith("sqlite:") and write:
        from ringfence.local.statedir import StateRefused, check_state

        # as serve refuses them: an empty file or one without ringfence's schema is no store, and
        # a missing one where serve ran is a lost store; --create (often left in a script) starts
        # a new store only where there is no file and no earlier run
        try:
            check_state(Path(spec.removeprefix("sqlite:")), fresh="`ringfence serve --new-store`")
        except StateRefused as exc:
            raise CliError(str(exc)) from None
    try:
        return open_store(spec, read_only=not write)
    except ValueError as exc:
        raise CliError(str(exc)) from None


def _audit_store(spec: str | None) -> Any:
    spec = spec or os.environ.get("RINGFENCE_STORE", ".ringfence")
    if spec.startswith(("sqlite:", "dynamodb:")):
        return _opened_store(spec, "audit store")
    from ringfence.versions import FileVersionStore

    root = Path(spec.removeprefix("file:"))
    if not root.is_dir():
        raise CliError(f"audit store {spec!r}: no such directory (expected sqlite:PATH, dynamodb:..., or file:DIR)")
    return FileVersionStore(root)


def _anchors(paths: list[str]) -> list[tuple[Any, str]]:
    """Heads saved by ``audit head`` (one JSON object a line; several files), or every head the
    anchor function wrote under ``s3://BUCKET/PREFIX``; each with where it was read. A source with
    none is an error: a wrong path must not verify as "no anchor broken"."""
    from pydantic import ValidationError

    from ringfence.audit import AuditHead

    out = []
    for path in paths:
        if path.startswith("s3://"):
            out += _s3_anchors(path)
            continue
        try:
            lines = Path(path).read_text().splitlines()
        except OSError as exc:
            raise CliError(f"{path}: the saved heads could not be read ({exc.strerror})") from None
        found = 0
        for n, line in enumerate(lines, 1):
            if line.strip():
                try:
                    out.append((AuditHead.model_validate_json(line), f"{path}:{n}"))
                except ValidationError as exc:
                    raise CliError(f"{path}:{n}: not a saved audit head ({exc.errors()[0]['msg']})") from None
                found += 1
        if not found:
            raise CliError(f"{path}: no saved audit head in it")
    return out


def _s3_anchors(url: str) -> list[tuple[Any, str]]:
    from botocore.exceptions import BotoCoreError, ClientError

    from ringfence.clouds.aws import clients
    from ringfence.clouds.aws.anchor import AnchorError, parse_s3_url, read_anchors

    try:
        bucket, prefix = parse_s3_url(url)
        return read_anchors(clients.client("s3"), bucket, prefix)
    except AnchorError as exc:
        raise CliError(str(exc)) from None
    except (BotoCoreError, ClientError) as exc:
        raise CliError(f"{url}: the anchors could not be read ({exc})") from None


def cmd_audit_head(args: argparse.Namespace) -> int:
    head = _audit_store(args.store).audit_head()
    if head is None:
        raise CliError("the audit chain is empty: no head yet")
    print(head.model_dump_json())
    return 0


def cmd_audit_verify(args: argparse.Namespace) -> int:
    from ringfence.audit import verify

    store = _audit_store(args.store)
    # the anchors first: one written while the chain is read is then never beyond the chain read;
    # the head before and after the log, as the store may be appended to while it is read
    anchors = _anchors(args.anchor)
    heads = [a for a, _ in anchors]
    head_before, log, head = _read_chain(args.store, store)
    verdict = verify(log, head, heads, head_before=head_before, allow_unchained=args.allow_unchained)
    newest = max((a.seq for a in heads), default=None)
    # which anchors a BROKEN verdict rests on: a rewritten chain, or an anchor to look into
    by = [where for a, where in anchors if not verdict.ok and a.seq == verdict.first_bad_seq]
    if args.json:
        _print_json(
            {
                "ok": verdict.ok,
                "records": verdict.records,
                "unchained": verdict.unchained,
                "first_bad_seq": verdict.first_bad_seq,
                "problem": verdict.problem,
                "anchors": len(heads),
                "newest_anchored_seq": newest,
                "anchored_by": by,
            }
        )
    elif verdict.ok:
        held = f"; {len(heads)} anchored head(s) held, the newest at seq {newest}" if heads else ""
        print(verdict.report() + held)
    else:
        print(verdict.report() + (f" (anchored by {', '.join(by)})" if by else ""), file=sys.stderr)
    return 0 if verdict.ok else 1


def _read_chain(spec: str | None, store: Any) -> tuple[Any, list[Any], Any]:
    """The head, the log, the head again; a store that cannot be read, or holds an item that is
    no audit record, is an error naming it."""
    try:
        return store.audit_head(), store.audit_log(), store.audit_head()
    except ValueError as exc:  # a stored item that is not a record (pydantic's error is one too)
        raise CliError(f"audit store {spec!r}: {exc}") from None
    except Exception as exc:
        if type(exc).__module__.startswith("botocore"):  # a wrong table, no credentials: named
            raise CliError(f"audit store {spec!r}: could not be read ({exc})") from None
        raise


def cmd_audit_list(args: argparse.Namespace) -> int:
    store = _audit_store(args.store)
    recs = [r for r in store.audit_log() if not args.action or r.action.startswith(args.action)]
    if args.limit:
        recs = recs[-args.limit :]
    for r in recs:
        if args.json:
            print(r.model_dump_json())
        else:
            when = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(r.time))
            change = f" {r.before[:15] or '-'} -> {r.after[:15]}" if r.after else ""
            why = f" ({r.reason})" if r.reason else ""
            seq = r.seq if r.hash else "-"  # unchained: its own seq, if it claims one, means nothing
            # every part may be a caller's text (a reason, a URL's id, a principal): one record, one line
            print(_line(f"{seq:>6} {when} {r.principal} {r.action} {r.target}{change}{why}"))
    return 0


def cmd_serve(args: argparse.Namespace) -> int:
    from ringfence import serve

    try:
        return serve.run(
            args.host,
            args.port,
            args.store,
            Path(args.admin_tokens) if args.admin_tokens else None,
            args.tls_cert,
            args.tls_key,
            args.insecure,
            args.threads,
            announce=lambda line: print(line, flush=True),
            signing_key=Path(args.signing_key) if args.signing_key else None,
            siem=args.siem,
            user=args.user,
            new_store=args.new_store,
        )
    except serve.ServeError as exc:
        raise CliError(str(exc)) from None


# the checkout this CLI runs from (editable install): the artifact's build script and installer
CHECKOUT = Path(__file__).resolve().parents[3]


def _open_state_dir(state: Path) -> tuple[int, os.stat_result]:
    """The state directory, open without following a link, and its status (whose rights
    publish-agent writes with); every write walks from this descriptor, never from the path again.
    A link there is refused: its owner (serve --user's user, who may own the directory above) could
    point root's writes at any root-only directory. Root's own state directory, and one root would
    make, must be in directories only root may change: else it could be swapped for such a link
    (or, once made, renamed away) while it is written. Whether that is checked and whose rights
    are written with both come from the one status of the opened descriptor (a path looked at
    twice could name two directories)."""
    from ringfence.local.signer_process import path_problem

    root = os.geteuid() == 0
    flags = os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC

    def refuse(why: str, made: str = "") -> CliError:
        return CliError(f"--store {state}: refused: {why}{made}; nothing published")

    def opened() -> int:
        try:
            return os.open(state, flags)
        except OSError as exc:
            if exc.errno in (errno.ELOOP, errno.ENOTDIR):
                raise CliError(
                    f"--store: {state} is a symbolic link or not a directory: refused, nothing published "
                    "(give the state directory itself)"
                ) from None
            if exc.errno == errno.ENOENT:
                raise
            raise CliError(f"--store: {state}: {exc.strerror}") from None

    what = "the state directory with a link"
    try:
        fd = opened()
    except FileNotFoundError:
        if root:  # the directories root would make it in
            why = path_problem(state, (0,), label="state", what=what, follow_last=False)
            if why is not None:
                raise refuse(
                    why, " (missing: make it first, e.g. install -d -o USER -m 750, for serve --user)"
                ) from None
        from ringfence.local.statedir import make_dirs

        try:  # root: beneath root-only directories (checked above), so no one else can swap it meanwhile
            make_dirs(state, 0o700)
        except OSError as exc:
            raise CliError(f"--store: {exc.filename or state}: {exc.strerror}") from None
        try:
            fd = opened()
        except FileNotFoundError:
            raise CliError(f"--store: {state}: no such directory") from None
    try:
        st = os.fstat(fd)
        if root and st.st_uid == 0:
            why = path_problem(state / "objects", (0,), label="state", what=what)
            if why is not None:
                raise refuse(why)
            # its directories now found root's alone: the path names, and keeps naming, this directory
            try:
                now = os.lstat(state)
            except OSError:
                now = None
            if now is None or (now.st_dev, now.st_ino) != (st.st_dev, st.st_ino):
                raise refuse(f"{state} was replaced while it was checked")
    except BaseException:
        os.close(fd)
        raise
    return fd, st


def cmd_publish_agent(args: argparse.Namespace) -> int:
    """Build (unless --dir holds one) and publish the agent artifact; print what hosts install with."""
    held_fds: list[int] = []  # the state directory's, written through until the command ends
    try:
        return _publish_agent(args, held_fds)
    finally:
        for fd in held_fds:
            os.close(fd)


def _publish_agent(args: argparse.Namespace, held_fds: list[int]) -> int:
    from ringfence.control import artifact

    out = Path(args.dir)
    installer = Path(args.installer) if args.installer else CHECKOUT / "agent/packaging/install.sh"
    if not list(out.glob("ringfence_agent-*.whl")):
        build = CHECKOUT / "agent/packaging/build_artifact.py"
        if not build.exists():
            raise CliError(f"no agent wheel in {out} and no {build} to build one: run make agent-artifact")
        import subprocess

        subprocess.run([sys.executable, str(build), str(out)], check=True, stdout=subprocess.DEVNULL)
    if args.store == "aws":
        from ringfence.clouds.aws import clients
        from ringfence.clouds.aws.publish import S3Publisher
        from ringfence.control.wiring import Config

        cfg = Config.from_env()
        publisher: Any = S3Publisher(clients.client("s3"), cfg.bucket, cfg.kms_key_id)
    elif args.store.startswith("sqlite:") and args.store.removeprefix("sqlite:"):
        from ringfence.local.publish import FilePublisher, OwnersFilePublisher

        # LocalWiring's objects directory, beside the database (ringfence serve may be running)
        state = Path(args.store.removeprefix("sqlite:")).parent
        state_fd, st = _open_state_dir(state)
        held_fds.append(state_fd)
        try:
            if os.geteuid() == 0 and st.st_uid != 0:
                # serve --user's state directory: written as its owner, who must read it (docs/serve.md)
                publisher = OwnersFilePublisher(state / "objects", st.st_uid, st.st_gid, parent_fd=state_fd)
            else:
                publisher = FilePublisher(state / "objects", parent_fd=state_fd)
        except OSError as exc:
            owner = f" (written as its owner, uid {st.st_uid})" if st.st_uid != os.geteuid() else ""
            # made relative to the state directory's descriptor: the name in the error is "objects" alone
            raise CliError(f"{state / 'objects'}: {exc.strerror}{owner}: not published") from None
    else:
        raise CliError(f"--store {args.store!r}: expected sqlite:PATH or aws")
    from ringfence.control.publish import Conflict
    from ringfence.store.failure import ObjectsUnwritable

    try:
        done = artifact.publish(publisher, artifact.find_wheel(out), installer)
    except artifact.ArtifactError as exc:
        raise CliError(str(exc)) from None
    except ObjectsUnwritable as exc:
        where = getattr(exc.__cause__, "filename", None) or getattr(publisher, "root", "the store")
        raise CliError(
            f"{where}: {exc.strerror}: not published (no link under the objects directory is followed)"
        ) from None
    except Conflict as exc:
        # not "rebuild": the same source and build tooling give the same name and, reproducibly,
        # the same bytes, so other bytes here mean an altered wheel or an unpinned build input
        raise CliError(
            f"{exc}; this wheel was not published. Builds are reproducible (the name covers the source and "
            "the setuptools/wheel versions), so rebuilding this source gives this name again: publish "
            "the wheel published before under it, or check whether this one was altered"
        ) from None
    print(f"published {', '.join(done.keys)}")
    print(f"url path /v1/agent/{done.wheel}")
    print(f"sha256 {done.sha256}")
    print(f"installer /v1/agent/{done.installer}")
    print(f"installer sha256 {done.installer_sha256}")
    # what a host runs as root: the installer only once its digest is checked (fail closed), then
    # the wheel by its own; both digests reach hosts out of band, never only from the server
    print(
        "bootstrap (user data; replace <agent-api> and add --api-url, --public-key-file/-url, --admin-cidr):\n"
        f"  curl --proto '=https' --tlsv1.2 -fsSL https://<agent-api>/v1/agent/{done.installer} -o /root/rf-install.sh"
        f" && echo '{done.installer_sha256}  /root/rf-install.sh' | sha256sum -c --quiet"
        f" && sh /root/rf-install.sh --artifact-url https://<agent-api>/v1/agent/{done.wheel}"
        f" --artifact-sha256 {done.sha256}"
    )
    return 0


def cmd_serve_token(args: argparse.Namespace) -> int:
    from ringfence import serve

    try:
        token, line = serve.new_admin_token(args.principal, args.role)
    except serve.ServeError as exc:
        raise CliError(str(exc)) from None
    path = Path(args.file)
    me = os.geteuid()
    why = serve.tokens_path_problem(path, frozenset({0, me}), missing_ok=True)
    if why is not None:
        raise CliError(f"{path}: refused: {why}")
    try:  # never through a link; an existing file only if no one else may write it (checked on the descriptor)
        fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_APPEND | os.O_NOFOLLOW | os.O_CLOEXEC, 0o600)
    except OSError as exc:
        raise CliError(
            f"{path}: {exc.strerror}" + (" (give the file itself, not a link)" if exc.errno == errno.ELOOP else "")
        ) from None
    with os.fdopen(fd, "r+b") as f:
        why = serve.file_problem(path, os.fstat(fd), frozenset({me}))
        if why is not None:
            raise CliError(f"{path}: refused: {why}; nothing added")
        size = os.fstat(fd).st_size
        # a hand-written last line without its newline would run into this one
        lead = b"\n" if size and os.pread(fd, 1, size - 1) != b"\n" else b""
        f.write(lead + line.encode() + b"\n")
    print(f"added {args.principal} to {path}; the token (shown once, only its hash is kept):")
    print(token)
    return 0


def open_key_dir(out: Path) -> int:
    """``keygen --out``'s directory, open (``O_NOFOLLOW``; a link at ``out`` is refused), once no
    user but root and the caller could swap what it holds: ``out`` the caller's and writable by
    its owner only (others' read bits taken off, on the descriptor), every directory above it
    root's or the caller's and writable by its owner only (or sticky) along the path as given and
    as it resolves (:func:`ringfence.local.signer_process.path_problem`, the walk serve's key
    check makes). Missing directories are made mode 700 beneath such a directory. The keys are
    written through the descriptor returned, so the directory checked is the one written."""
    from ringfence.local.signer_process import path_problem

    uid = os.geteuid()
    owners = tuple(sorted({0, uid}))
    existing = next((d for d in [out, *out.parents] if os.path.lexists(d)), Path("."))
    if existing != out:  # what is made goes beneath ``existing``: it must be safe already
        # (sticky is fine there: a directory made in /tmp cannot be renamed by another user, and
        # one they made first, or a link, is refused below)
        why = path_problem(existing / "-", owners, label="--out", what="the signing key", sticky_parent_ok=True)
        if why is not None:
            raise CliError(f"--out {out}: refused: {why}; nothing made")
        from ringfence import durable

        # each missing level made (mode 700 whatever the umask) and opened relative to the one
        # above, from ``existing``'s descriptor, never by path: a link raced in at a level's name
        # (or anything but a directory) is refused, not followed
        try:
            with durable._beneath(existing, out.relative_to(existing) / "-", 0o700):
                pass
        except NotADirectoryError as exc:
            raise CliError(f"--out {out}: {exc.filename} is a symbolic link or not a directory: refused") from None
        except OSError as exc:
            raise CliError(f"--out {out}: {exc.filename or out}: {exc.strerror}") from None
    try:
        fd = os.open(out, os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC)
    except OSError as exc:
        if exc.errno in (errno.ELOOP, errno.ENOTDIR) and os.path.islink(out):  # O_DIRECTORY: ENOTDIR
            raise CliError(
                f"--out {out}: a symbolic link: refused (its owner may point it elsewhere; a directory another "
                "user chose would be changed and written): give the directory itself"
            ) from None
        raise CliError(f"--out {out}: {exc.strerror}") from None
    try:
        st = os.fstat(fd)
        mode = stat.S_IMODE(st.st_mode)
        if st.st_uid != uid:
            raise CliError(
                f"--out {out}: owned by uid {st.st_uid}, not by uid {uid} running keygen: its owner could read or "
                "swap the signing key; give a directory of your own (or a missing one: it is made mode 700)"
            )
        if mode & 0o022:
            raise CliError(
                f"--out {out}: writable by group or others (mode {mode:o}): another user could swap the signing key "
                f"or have planted a link at its name. Check that nothing in it is another user's or a link, then "
                f"`chmod 700 {out}`"
            )
        why = path_problem(out / "bundle-signing.pem", owners, label="--out", what="the signing key")
        if why is not None:
            raise CliError(f"--out {out}: refused: {why}; nothing written")
        now = os.lstat(out)
        if (now.st_dev, now.st_ino) != (st.st_dev, st.st_ino):
            raise CliError(f"--out {out}: replaced while it was checked: nothing written")
        if mode & 0o007:
            os.fchmod(fd, mode & 0o770)  # the descriptor checked, never a path
            print(f"--out {out}: others could read it (mode {mode:o}): now mode {mode & 0o770:o}", file=sys.stderr)
    except BaseException:
        os.close(fd)
        raise
    return fd


def cmd_keygen(args: argparse.Namespace) -> int:
    from ringfence import bundle as bundle_mod

    out = Path(args.out)
    fd = open_key_dir(out)
    try:
        private, public = out / "bundle-signing.pem", out / "bundle-signing.pub.pem"
        try:
            os.stat(private.name, dir_fd=fd, follow_symlinks=False)
            present = True
        except FileNotFoundError:
            present = False
        if present and not args.force:
            raise CliError(f"{private} exists; pass --force to replace it (agents pin the old public key)")
        key = bundle_mod.SigningKey.generate()
        key.write_at(fd, private.name, public.name)
    finally:
        os.close(fd)
    print(f"wrote {private} (keep secret, mode 0600) and {public} (pin on agents); key id {key.key_id}")
    return 0


def cmd_bundle_schema(args: argparse.Namespace) -> int:
    from ringfence import bundle as bundle_mod

    _print_json(bundle_mod.bundle_schema() if args.kind == "bundle" else bundle_mod.delta_schema())
    return 0


def cmd_bundle_verify(args: argparse.Namespace) -> int:
    from ringfence import bundle as bundle_mod

    verifier = bundle_mod.Verifier.from_file(Path(args.public_key))
    doc = bundle_mod.load_bundle(Path(args.file).read_bytes())
    verifier.verify(doc)
    print(f"ok: bundle for {doc.workload_id} version {doc.version}, signed by {verifier.key_id}")
    return 0


# --- wiring ------------------------------------------------------------------------------------


POLICY_PATH_HELP = "policy file or directory of YAML files"
INVENTORY_HELP = "workloads: JSON, YAML or CSV"
STORE_HELP = "version store directory (default .ringfence or $RINGFENCE_STORE)"


def _policy_args(p: argparse.ArgumentParser, inventory_required: bool = False) -> None:
    p.add_argument("--policy", required=True, help=POLICY_PATH_HELP)
    p.add_argument("--inventory", required=inventory_required, help=INVENTORY_HELP)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="ringfence", description=(__doc__ or "").replace("``", ""))
    sub = parser.add_subparsers(dest="command", required=True, metavar="command", help="one of:")

    def add(
        name: str, func: Callable[[argparse.Namespace], int], parent: Any = sub, **kw: Any
    ) -> argparse.ArgumentParser:
        p: argparse.ArgumentParser = parent.add_parser(name, **kw)
        p.set_defaults(func=func)
        return p

    pol = sub.add_parser("policy", help="validate, test, diff and provision policy").add_subparsers(
        dest="sub", required=True, metavar="command", help="one of:"
    )
    p = add("validate", cmd_policy_validate, pol, help="check policy files; every problem with file:line:column")
    p.add_argument("path", help=POLICY_PATH_HELP)
    p.add_argument(
        "--inventory", help=INVENTORY_HELP + " (also warn of selectors matching no workload of it; never an error)"
    )
    p = add("test", cmd_policy_test, pol, help="run the tests: blocks of the policy")
    p.add_argument("path", help=POLICY_PATH_HELP)
    p.add_argument("--inventory", help=INVENTORY_HELP + " the tests run against (default: none)")
    p = add("schema", cmd_policy_schema, pol, help="write the JSON Schema of policy files")
    p.add_argument("--out", help="file to write (default: stdout)")
    for name, func, helptext in (
        ("diff", cmd_policy_diff, "draft vs active: rules and workload access gained or lost"),
        ("provision", cmd_policy_provision, "make the draft the next numbered, immutable active version"),
    ):
        p = add(name, func, pol, help=helptext)
        p.add_argument("path", help="the draft: " + POLICY_PATH_HELP)
        p.add_argument("--inventory", help=INVENTORY_HELP + " (the estate the diff and the tests are about)")
        p.add_argument("--store", help=STORE_HELP)
        if name == "provision":
            p.add_argument("--message", "-m", required=True, help="why (kept with the version and in the audit log)")
            p.add_argument("--author", help="default: $RINGFENCE_ACTOR or $USER")
    p = add("revert", cmd_policy_revert, pol, help="provision an earlier version's content as a new version")
    p.add_argument("number", type=int, help="the version whose content to provision again (see policy versions)")
    p.add_argument("--message", "-m", required=True, help="why (kept with the new version and in the audit log)")
    p.add_argument("--author", help="default: $RINGFENCE_ACTOR or $USER")
    p.add_argument("--store", help=STORE_HELP)
    p.add_argument("--inventory", help="the estate the version's tests run against (as for provision)")
    p.add_argument("--force", action="store_true", help="revert even if the version's tests fail now (audited)")
    p = add("versions", cmd_policy_versions, pol, help="list provisioned versions")
    p.add_argument("--store", help=STORE_HELP)

    lab = sub.add_parser("labels", help="label hygiene").add_subparsers(
        dest="sub", required=True, metavar="command", help="one of:"
    )
    p = add("check", cmd_labels_check, lab, help="report missing, unknown and conflicting labels")
    p.add_argument("--policy", required=True, help=POLICY_PATH_HELP)
    p.add_argument("--inventory", help=INVENTORY_HELP + " (default: the inventory of the --flows store)")
    p.add_argument(
        "--json", action="store_true", help="the flagged workloads and their problems, and the findings, as JSON"
    )
    p.add_argument("--strict", action="store_true", help="exit 1 when any workload is unlabeled")
    p.add_argument(
        "--flows",
        help="the store holding flows (sqlite:PATH or dynamodb:INVENTORY,STATE,AUDIT): also report unknown "
        "addresses and traffic contradicting a role",
    )
    p.add_argument(
        "--fanout",
        type=int,
        default=3,
        help="a role connecting out to at least this many peers policy does not allow is a finding (default 3)",
    )
    p.add_argument(
        "--siem",
        metavar="SPEC",
        help="also send each problem as an OCSF Detection Finding (as for serve --siem: file:PATH, "
        "syslog://HOST:PORT, eventbridge:BUS, cloudwatch:LOG-GROUP, cef+…)",
    )

    p = add("inventory", cmd_inventory_show, help="show workloads with their resolved labels and modes")
    _policy_args(p, inventory_required=True)

    p = add(
        "compile",
        cmd_compile,
        help="write one (signed) bundle per workload, with heads and set deltas against a previous compile in --out",
    )
    _policy_args(p, inventory_required=True)
    p.add_argument("--out", required=True, help="output directory (bundles/, heads/, deltas/); compiled into again")
    p.add_argument("--key", help="Ed25519 private key (PEM) to sign with")
    p.add_argument(
        "--expires-in",
        type=int,
        default=7 * 24 * 3600,  # bundle.DEFAULT_TTL (tests/test_cli.py holds them equal)
        help="seconds until signed bundles expire (default 7 days); compile again before then: bundles "
        "past half their lifetime are re-signed (docs/bundle.md, Expiry)",
    )
    p.add_argument(
        "--policy-version", type=int, default=0, help="policy version number recorded in each bundle (default 0)"
    )
    p.add_argument(
        "--revision",
        type=int,
        help="revision to start from, not below the previous compile's (default: the clock in ms)",
    )

    p = add("explain", cmd_explain, help="the decision for one flow and every rule that contributed")
    _policy_args(p)
    p.add_argument("--from", dest="src", required=True, help="workload id, label set (role=web,app=x) or IP")
    p.add_argument("--to", dest="dst", required=True, help="workload id, label set or IP, as for --from")
    p.add_argument("--port", required=True, help="e.g. tcp/5432, udp/53, icmp/8")
    p.add_argument("--json", action="store_true", help="the decision, per side and per address, as JSON")

    p = add("connectivity", cmd_connectivity, help="the allowed matrix at label-group (or workload) level")
    _policy_args(p, inventory_required=True)
    p.add_argument("--workloads", action="store_true", help="list workload pairs instead of groups")
    p.add_argument("--staged", action="store_true", help="include staged rulesets")
    p.add_argument("--json", action="store_true", help="the rows as JSON")

    p = add(
        "findings",
        cmd_findings,
        help="effective policy, checked: agents silent, not enforcing the newest bundle, whose kernel holds "
        "something else, or that repaired a tamper within a day (exit 1 when any)",
    )
    p.add_argument("--store", required=True, help="sqlite:PATH or dynamodb:INVENTORY,STATE,AUDIT")
    p.add_argument(
        "--bound",
        type=float,
        default=120.0,
        help="seconds allowed after a publish and between heartbeats (default 120)",
    )
    p.add_argument(
        "--agents",
        action="store_true",
        help="also list every enrolled workload's agent: its version, last heartbeat, the revision it enforces",
    )
    p.add_argument("--json", action="store_true", help="the findings (with --agents, every agent as agents) as JSON")

    p = add("map", cmd_map, help="the application dependency map (from flows, else from policy) as HTML, SVG or DOT")
    _policy_args(p)
    p.add_argument(
        "--format",
        choices=["html", "svg", "dot"],
        default="html",
        help="default: html (svg: static, laid out server-side)",
    )
    p.add_argument("--flows", help="the store holding flows: sqlite:PATH or dynamodb:INVENTORY,STATE,AUDIT")
    p.add_argument("--draft", help="a draft policy: edges it would open or cut are marked")
    p.add_argument("--app", help="only edges with this app at either end")
    p.add_argument("--env", help="only edges with this env at either end")
    p.add_argument(
        "--decision",
        choices=["allowed", "potentially-blocked", "blocked", "unknown"],
        help="only edges with this decision",
    )
    p.add_argument("--min-flows", type=int, default=0, help="only edges with at least this many flows")
    p.add_argument("--out", help="file to write (default: stdout)")

    p = add(
        "suggest",
        cmd_suggest,
        help="label-level rules (and the tests pinning them) allowing what an app's blocked flows show; "
        "lateral movement flagged, not proposed",
    )
    _policy_args(p)
    p.add_argument("--app", required=True, help="the app whose flows (either end) to suggest rules for")
    p.add_argument("--env", help="only flows with this env at the app's end")
    p.add_argument(
        "--flows", required=True, help="the store holding flows: sqlite:PATH or dynamodb:INVENTORY,STATE,AUDIT"
    )
    p.add_argument("--min-flows", type=int, default=0, help="only flow rows with at least this many flows")
    p.add_argument(
        "--include-allowed", action="store_true", help="pin flows already allowed with tests too (no rules for them)"
    )
    p.add_argument("--json", action="store_true", help="the suggestion as JSON (rules, flagged, skipped, the YAML)")
    p.add_argument("--out", help="file to write (default: stdout)")

    flo = sub.add_parser("flows", help="flows in").add_subparsers(
        dest="sub", required=True, metavar="command", help="one of:"
    )
    p = add("ingest", cmd_flows_ingest, flo, help="VPC Flow Log files (gzip/text) and agent report batches (.json)")
    p.add_argument("files", nargs="+", help="flow log files (gzip or text) and agent report batches (.json)")
    p.add_argument("--store", required=True, help="sqlite:PATH or dynamodb:INVENTORY,STATE,AUDIT")
    p.add_argument("--policy", required=True, help="the active policy: " + POLICY_PATH_HELP)
    p.add_argument("--inventory", help="resolve addresses with this estate (default: the store's inventory)")
    p.add_argument("--retention-days", type=int, default=30, help="rows expire this long after their last flow")
    p.add_argument("--strict", action="store_true", help="exit 1 when any line was malformed")
    p.add_argument(
        "--create",
        action="store_true",
        help="start a new sqlite:PATH store where there is no file (never in an empty file, nor where "
        "ringfence serve ran: refused as serve refuses them)",
    )

    p = add("bench", cmd_bench, help="compile a synthetic estate: full vs incremental, compiled vs naive rules")
    p.add_argument("--workloads", type=int, default=10_000, help="size of the synthetic estate (default 10000)")
    p.add_argument("--seed", type=int, default=1, help="random seed of the estate and the changes (default 1)")
    p.add_argument("--changes", type=int, default=200, help="random single-workload changes to time")
    p.add_argument(
        "--necessary-every",
        type=int,
        default=1,
        help="compute the necessary fan-out (a slow reference) on every Nth change; 0: never (default 1)",
    )
    p.add_argument("--json", action="store_true", help="the figures as JSON (keys in docs/benchmarks.md)")

    exp = sub.add_parser("export", help="the same policy for other enforcement points").add_subparsers(
        dest="sub", required=True, metavar="command", help="one of:"
    )
    p = add("calico", cmd_export_calico, exp, help="Calico HostEndpoint + GlobalNetworkPolicy YAML")
    _policy_args(p, inventory_required=True)
    p.add_argument("--out", help="file to write (default: stdout)")
    p.add_argument("--no-modes", action="store_true", help="treat every workload as enforced")
    p.add_argument("--no-failsafes", action="store_true", help="leave out the fail-safe policies")

    p = add("keygen", cmd_keygen, help="create a bundle-signing key pair")
    p.add_argument("--out", required=True, help="directory for bundle-signing.pem and bundle-signing.pub.pem")
    p.add_argument("--force", action="store_true", help="replace an existing key (agents pin the old public key)")

    bun = sub.add_parser("bundle", help="bundle format tools").add_subparsers(
        dest="sub", required=True, metavar="command", help="one of:"
    )
    p = add("schema", cmd_bundle_schema, bun, help="print the JSON Schema of bundles or deltas")
    p.add_argument("kind", choices=["bundle", "delta"], nargs="?", default="bundle", help="default: bundle")
    p = add("verify", cmd_bundle_verify, bun, help="verify a bundle's signature against a public key")
    p.add_argument("file", help="the bundle (JSON) to verify")
    p.add_argument("--public-key", required=True, help="the Ed25519 public key (PEM) agents pin")

    aud = sub.add_parser("audit", help="the hash-chained audit trail").add_subparsers(
        dest="sub", required=True, metavar="command", help="one of:"
    )
    p = add(
        "verify",
        cmd_audit_verify,
        aud,
        help="recompute the chain and compare it with its head: exit 1 naming the first bad seq if a "
        "record was edited, deleted, reordered or inserted",
    )
    p.add_argument("--store", help=AUDIT_STORE_HELP)
    p.add_argument(
        "--anchor",
        action="append",
        default=[],
        metavar="FILE|s3://BUCKET/PREFIX",
        help="heads saved earlier by `audit head` (JSON lines), kept where the store's writers cannot "
        "write, or every head the AWS anchor function wrote under an S3 prefix (each version of "
        "each object): the chain must still hold each (repeatable)",
    )
    p.add_argument(
        "--allow-unchained",
        type=int,
        default=0,
        metavar="N",
        help="records from before chaining existed (no hash) that you have checked: exactly N pass; "
        "nothing covers them, so any other number is BROKEN (default 0)",
    )
    p.add_argument("--json", action="store_true", help="the verdict as JSON")
    p = add(
        "head",
        cmd_audit_head,
        aud,
        help="print the chain's head (seq and hash) as one JSON line, to keep outside the store as an anchor",
    )
    p.add_argument("--store", help=AUDIT_STORE_HELP)
    p = add("list", cmd_audit_list, aud, help="the audit records in chain order")
    p.add_argument("--store", help=AUDIT_STORE_HELP)
    p.add_argument("--action", help="only actions starting with this (e.g. policy., workload.quarantine)")
    p.add_argument("--limit", type=int, default=0, help="only the last N records")
    p.add_argument("--json", action="store_true", help="one JSON record a line (with seq, prev, hash)")

    p = add(
        "serve",
        cmd_serve,
        help="the agent API (/v1/...) and admin API (/admin/...) over HTTP(S), for on-premise estates",
    )
    p.add_argument("--host", default="127.0.0.1", help="address to bind (default 127.0.0.1)")
    p.add_argument("--port", type=int, default=8443, help="port to bind; 0 picks a free one (default 8443)")
    p.add_argument(
        "--store",
        default="sqlite:ringfence-state/state.db",
        help="sqlite:PATH: the SQLite file PATH, published objects and the signing key beside it "
        "(default sqlite:ringfence-state/state.db); aws: DynamoDB/S3/SQS named by the RINGFENCE_* "
        "environment (AWS_ENDPOINT_URL for another endpoint)",
    )
    p.add_argument(
        "--signing-key",
        metavar="PEM",
        help="with sqlite: the bundle signing key (default: generated beside the database on first start)",
    )
    p.add_argument(
        "--new-store",
        action="store_true",
        help="with sqlite: start a new, empty store where PATH is missing or an empty file although its directory "
        "was used before (otherwise refused: restore the backup); never over a file that holds data",
    )
    p.add_argument(
        "--user",
        metavar="NAME",
        help="with sqlite: (started as root) keep the signing key in a signer process of its own and answer "
        "requests as the user NAME, who cannot read the key; needs --signing-key, a root-owned file of mode 600",
    )
    p.add_argument(
        "--admin-tokens",
        metavar="FILE",
        help="enables the admin API: lines of principal:sha256(token):roles (see `ringfence serve-token`)",
    )
    p.add_argument(
        "--siem",
        metavar="SPEC",
        help="also send audit records, agents' drops and findings (OCSF 1.7.0 JSON, or CEF) to: file:PATH, "
        "syslog://HOST:PORT (UDP), syslog+tcp://HOST:PORT, eventbridge:BUS, cloudwatch:LOG-GROUP; cef+ before "
        "any for CEF; several with commas (default: $RINGFENCE_SIEM)",
    )
    p.add_argument("--tls-cert", metavar="PEM", help="TLS certificate chain (with --tls-key)")
    p.add_argument("--tls-key", metavar="PEM", help="TLS private key")
    p.add_argument("--insecure", action="store_true", help="allow plain HTTP on a non-loopback address")
    p.add_argument(
        "--threads",
        type=int,
        default=512,
        help="requests handled at once; each waiting agent (long-poll) holds one (default 512)",
    )
    p = add(
        "publish-agent",
        cmd_publish_agent,
        help="put the agent wheel, its .sha256 and the installer where the agent API serves them (/v1/agent/<name>);"
        " prints both digests hosts pin",
    )
    p.add_argument("--dir", default="build/agent", help="where the wheel is, or is built (default build/agent)")
    p.add_argument(
        "--store",
        default="aws",
        help="aws: the stack's bucket named by the RINGFENCE_* environment (default); "
        "sqlite:PATH: the objects of `ringfence serve --store sqlite:PATH`",
    )
    p.add_argument("--installer", metavar="FILE", help="install.sh to publish (default: the checkout's)")
    p = add("serve-token", cmd_serve_token, help="mint an admin token for `ringfence serve --admin-tokens`")
    p.add_argument("principal", help="who holds it: recorded in the audit log with each admin action")
    p.add_argument(
        "--role",
        action="append",
        required=True,
        choices=["policy-author", "incident-responder", "onboarding", "reader"],
        help="an admin role the token holds (repeat for several): policy-author (provision, modes, label bindings and their revocation), "
        "incident-responder (quarantine, release), onboarding (register, import, pairing keys), reader",
    )
    p.add_argument("--file", required=True, help="the admin tokens file to append principal:sha256 to (mode 0600)")

    from ringfence import demo

    p = add("demo", demo.run, help="the whole loop on this machine, no cloud account")
    demo.add_arguments(p)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return int(args.func(args))
    except BrokenPipeError:
        # the reader stopped early (`| head`): output is streamed, so that is not an error of ours;
        # point stdout at /dev/null so the interpreter's final flush does not raise again
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return 141
    except UnicodeDecodeError as exc:
        print(f"error: a file is not UTF-8 text ({exc.reason} at byte {exc.start})", file=sys.stderr)
        return 1
    except Exception as exc:
        # the library's errors, of the modules the command imported (no other can have raised one)
        if _is_error(exc, ("ringfence.policy", "PolicyError"), ("ringfence.inventory", "InventoryError")):
            print(f"error:\n{exc}", file=sys.stderr)
            return 1
        if isinstance(exc, CliError | FileNotFoundError | KeyError) or _is_error(
            exc, ("ringfence.bundle", "BundleError")
        ):
            print(f"error: {exc}", file=sys.stderr)
            return 1
        if _is_error(exc, ("sqlite3", "Error")):  # a store that cannot be read: locked, unreadable, damaged
            spec = getattr(args, "store", None) or getattr(args, "flows", None) or "the store"
            print(f"error: {str(spec).removeprefix('sqlite:')}: {exc}", file=sys.stderr)
            return 1
        if _is_error(exc, ("ringfence.store.sqlite", "StoreOpenError")):
            print(f"error: {exc}", file=sys.stderr)
            return 1
        raise


def _is_error(exc: Exception, *classes: tuple[str, str]) -> bool:
    for module, name in classes:
        loaded = sys.modules.get(module)
        if loaded is not None and isinstance(exc, getattr(loaded, name)):
            return True
    return False


if __name__ == "__main__":
    sys.exit(main())
