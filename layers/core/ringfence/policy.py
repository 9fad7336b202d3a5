"""Policy: load YAML files, validate them, resolve every reference into a compiled :class:`Policy`.

Loading collects *every* problem (file:line:column, message, hint) before failing, so one
``ringfence policy validate`` run shows everything to fix. Nothing downstream ever sees a
half-valid policy.
"""

from __future__ import annotations

import json
import re
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from pydantic import ValidationError

from ringfence import addresses, selectors, yamlpos
from ringfence.addresses import Address, Prefix
from ringfence.failsafewire import failsafe_total_problem, failsafe_width_problem
from ringfence.labels import LabelMapper
from ringfence.model import (
    Action,
    Defaults,
    IpListPeer,
    LabelsConfig,
    Mode,
    PeerSpec,
    PolicyFile,
    PolicyTest,
)
from ringfence.services import PortRange, PortSpecError, looks_like_spec, parse_flow_port, parse_port_spec

ANY_IP_LIST = "any"


@dataclass(frozen=True, slots=True)
class Location:
    file: str
    line: int
    column: int = 1

    def __str__(self) -> str:
        return f"{self.file}:{self.line}:{self.column}"


@dataclass(frozen=True, slots=True)
class PolicyProblem:
    location: Location
    message: str
    hint: str = ""

    def __str__(self) -> str:
        return f"{self.location}: {self.message}" + (f" (hint: {self.hint})" if self.hint else "")


class PolicyError(ValueError):
    """Invalid policy: every problem found, each with its location."""

    def __init__(self, problems: list[PolicyProblem]) -> None:
        self.problems = sorted(problems, key=lambda p: (p.location.file, p.location.line, p.location.column))
        super().__init__("\n".join(str(p) for p in self.problems))


# --- compiled form -----------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class Peer:
    """One side of a rule: workloads matching a selector, or addresses of an IP list."""

    selector: selectors.Node | None = None
    ip_list: str | None = None
    prefixes: tuple[Prefix, ...] = ()
    # the content-defining text (names address sets); computed once, it is on the hot path.
    # The policy builder passes it in when it knows it (the selector's canonical text).
    text: str = field(default="", compare=False)

    def __post_init__(self) -> None:
        if self.text:
            return
        if self.selector is not None:
            text = self.selector.canonical()
        else:
            text = "ips:" + ",".join(addresses.format_prefix(p) for p in self.prefixes)
        object.__setattr__(self, "text", text)

    @property
    def is_workloads(self) -> bool:
        return self.selector is not None

    def canonical(self) -> str:
        return self.text

    def describe(self) -> str:
        return self.selector.canonical() if self.selector is not None else f"ip_list {self.ip_list}"


@dataclass(frozen=True, slots=True)
class CompiledRule:
    """One (consumer, provider) pair of a rule, with the scope already folded into the selectors."""

    id: str
    ruleset: str
    action: Action
    staged: bool
    consumer: Peer
    provider: Peer
    same: tuple[str, ...]
    services: tuple[PortRange, ...]
    service_names: tuple[str, ...]
    location: Location

    def matches_service(self, proto: str, port: int | None) -> bool:
        return any(s.matches(proto, port) for s in self.services)


ACTION_RANK = {Action.OVERRIDE_DENY: 0, Action.ALLOW: 1, Action.DENY: 2}


@dataclass(frozen=True, slots=True)
class ModeSelector:
    selector: selectors.Node
    mode: Mode
    match: selectors.Matcher


@dataclass(frozen=True, slots=True)
class CompiledTest:
    name: str
    spec: PolicyTest
    proto: str
    port: int | None
    location: Location


@dataclass(frozen=True, slots=True)
class ParsedFailsafes:
    admin_cidrs: tuple[Prefix, ...] = ()
    admin_ports: tuple[PortRange, ...] = (PortRange("tcp", 22, 22), PortRange("tcp", 3389, 3389))
    dns_resolvers: tuple[Address, ...] = ()
    control_plane: tuple[Prefix, ...] = ()


@dataclass(slots=True)
class Policy:
    labels: LabelMapper
    label_groups: dict[str, tuple[str, frozenset[str]]]  # name → (dimension, values)
    services: dict[str, tuple[PortRange, ...]]
    ip_lists: dict[str, tuple[Prefix, ...]]
    rules: list[CompiledRule]
    modes: list[ModeSelector]
    defaults: Defaults
    tests: list[CompiledTest]
    failsafes: ParsedFailsafes = field(default_factory=ParsedFailsafes)
    sources: dict[str, str] = field(default_factory=dict)  # file name → text

    def mode_for(self, labels: Mapping[str, str], unlabeled: bool) -> Mode:
        if unlabeled:
            return self.defaults.unlabeled_mode
        for m in self.modes:
            if m.match(labels):
                return m.mode
        return self.defaults.mode


# --- loading -----------------------------------------------------------------------------------


def policy_files(path: Path) -> list[Path]:
    if path.is_dir():
        return sorted(p for p in path.rglob("*") if p.suffix in (".yaml", ".yml") and p.is_file())
    return [path]


FILE_NAME = re.compile(r"[A-Za-z0-9_-][A-Za-z0-9_.-]*(/[A-Za-z0-9_-][A-Za-z0-9_.-]*)*\.ya?ml")
"""A policy file's name as the admin API takes it: a relative path of plain segments (letters,
digits, ``_ . -``, none starting with a dot), ending ``.yaml`` or ``.yml``. Each version's files
are published under ``policies/v<N>/<name>``: a name that is not its own normal form (``/a.yaml``,
``x//a.yaml``, ``../a.yaml``) would alias another file or leave the version's directory."""
MAX_FILE_NAME = 255


def file_name_problems(names: Iterable[str]) -> list[str]:
    """Why each of ``names`` cannot name a policy file of a version (:data:`FILE_NAME`), and
    names two of which would be one file on a case-insensitive disk, or a file and a directory
    (``a.yaml``, ``a.yaml/b.yaml``); [] when all can."""
    problems: list[str] = []
    seen: dict[str, str] = {}
    names = list(names)
    dirs = {"/".join(n.casefold().split("/")[:i]): n for n in names for i in range(1, n.count("/") + 1)}
    for name in names:
        if not name:
            problems.append("policy file name '' is empty")
        elif len(name) > MAX_FILE_NAME:
            problems.append(f"policy file name {name[:40]!r}… is longer than {MAX_FILE_NAME} characters")
        elif not FILE_NAME.fullmatch(name):
            problems.append(
                f"policy file name {name!r}: use a relative path of segments of letters, digits, _ . - "
                "(none starting with a dot; no leading /, no \\, no . or .. segment) ending .yaml or .yml"
            )
        elif (other := seen.setdefault(name.casefold(), name)) != name:
            problems.append(f"policy file name {name!r} differs from {other!r} only in case: they would be one file")
        elif (parent := dirs.get(name.casefold())) is not None:
            problems.append(f"policy file name {name!r} is a directory of {parent!r}: they cannot both be files")
    return problems


def load_policy(paths: Iterable[Path] | Path) -> Policy:
    """Load every YAML file under ``paths``; raise :class:`PolicyError` listing all problems."""
    if isinstance(paths, Path):
        paths = [paths]
    sources: dict[str, str] = {}
    for p in paths:
        for f in policy_files(p):
            try:
                sources[str(f)] = f.read_text(encoding="utf-8")
            except UnicodeDecodeError as exc:
                raise PolicyError([PolicyProblem(Location(str(f), 1), f"not UTF-8 text ({exc.reason})")]) from None
    if not sources:
        raise PolicyError([PolicyProblem(Location(str(next(iter([*paths]), "")), 1), "no policy files found")])
    return load_policy_texts(sources)


def load_policy_texts(sources: Mapping[str, str]) -> Policy:
    return _Builder(dict(sources)).build()


class _Builder:
    def __init__(self, sources: dict[str, str], memo: bool = True) -> None:
        self.sources = sources
        self.problems: list[PolicyProblem] = []
        self.docs: list[tuple[str, yamlpos.Located, PolicyFile]] = []
        # Estates repeat a few selector texts thousands of times (role == 'web' in every app's
        # rulesets). Within one build the label mapper and groups are fixed, so a valid
        # selector text always resolves to the same node: parse it once, and build each
        # Peer / scoped Peer once. Invalid texts are never memoised, so every occurrence still
        # reports its own problems. ``memo=False`` is the straightforward path the tests compare.
        self.memo = memo
        self._selectors: dict[str, selectors.Node] = {}
        self._peers_of: dict[int, tuple[selectors.Node, Peer]] = {}  # id(node) → Peer
        self._scoped: dict[tuple[int, int], tuple[selectors.Node, selectors.Node, Peer]] = {}
        self._wrapped: dict[int, tuple[selectors.Node, str]] = {}  # id(part) → (part, wrapped canonical text)
        self._ip_peers: dict[str, Peer] = {}  # ip list name → Peer (the lists are fixed once rules compile)

    # -- helpers --
    def problem(
        self,
        file: str,
        located: yamlpos.Located | None,
        path: tuple[Any, ...],
        msg: str,
        hint: str = "",
        column_offset: int = 0,
    ) -> None:
        if located is None:
            self.problems.append(PolicyProblem(Location(file, 1, 1), msg, hint))
            return
        pos = located.position(path)
        col = pos.column + column_offset + (1 if pos.quoted and column_offset else 0)
        self.problems.append(PolicyProblem(Location(file, pos.line, col), msg, hint))

    def peer(self, node: selectors.Node) -> Peer:
        if not self.memo:
            return Peer(selector=node)
        hit = self._peers_of.get(id(node))
        if hit is None:  # the node is kept in the value, so its id stays unique
            hit = self._peers_of[id(node)] = (node, Peer(selector=node))
        return hit[1]

    def scoped(self, scope: selectors.Node, node: selectors.Node) -> Peer:
        """``Peer(scope && node)``; scope and node are memoised selector nodes, so ids name them."""
        if not self.memo:
            return Peer(selector=selectors.conjunction(scope, node))
        key = (id(scope), id(node))
        hit = self._scoped.get(key)
        if hit is None:
            joined = selectors.conjunction(scope, node)
            if isinstance(joined, selectors.And):  # And.canonical(), from each part's text computed once
                text = " && ".join(sorted([self._wrap(p) for p in joined.parts]))
            else:
                text = joined.canonical()
            hit = self._scoped[key] = (scope, node, Peer(selector=joined, text=text))
        return hit[2]

    def _wrap(self, part: selectors.Node) -> str:
        """``selectors._wrap(part)``, once per part of a memoised node (the value keeps it alive)."""
        hit = self._wrapped.get(id(part))
        if hit is None:
            hit = self._wrapped[id(part)] = (part, selectors._wrap(part))
        return hit[1]

    def loc(self, file: str, located: yamlpos.Located, path: tuple[Any, ...]) -> Location:
        pos = located.position(path)
        return Location(file, pos.line, pos.column)

    def build(self) -> Policy:
        for file, text in self.sources.items():
            try:
                located = yamlpos.load(text)
            except yamlpos.YamlError as exc:
                self.problems.append(PolicyProblem(Location(file, exc.line, exc.column), exc.message))
                continue
            if not isinstance(located.data, dict):
                self.problem(
                    file,
                    located,
                    (),
                    "a policy file must be a mapping of sections",
                    "top-level keys: labels, label_groups, services, ip_lists, rulesets, modes, defaults, tests",
                )
                continue
            try:
                doc = PolicyFile.model_validate(located.data)
            except ValidationError as exc:
                for err in exc.errors():
                    self._pydantic_problem(file, located, err)
                continue
            self.docs.append((file, located, doc))
        if self.problems:
            raise PolicyError(self.problems)
        return self._resolve()

    def _pydantic_problem(self, file: str, located: yamlpos.Located, err: Mapping[str, Any]) -> None:
        path = tuple(err["loc"])
        # unions report one error per branch (str | {ip_list}); keep the path up to the union
        path = tuple(p for p in path if not (isinstance(p, str) and ("[" in p or p in ("str", "IpListPeer"))))
        where = ".".join(str(p) for p in path)
        msg = err["msg"]
        hint = ""
        if err["type"] == "extra_forbidden":
            msg = f"unknown field {path[-1]!r}"
            hint = "check the spelling; `ringfence policy schema` lists every field"
            pos = located.key_positions.get(path)
            if pos is not None:
                self.problems.append(PolicyProblem(Location(file, pos.line, pos.column), msg, hint))
                return
        elif err["type"] == "missing":
            msg = f"missing required field {path[-1]!r}"
            path = path[:-1]
        self.problem(
            file,
            located,
            path,
            f"{where}: {msg}" if where and err["type"] != "extra_forbidden" else msg,
            hint,
        )

    def _resolve(self) -> Policy:
        labels_cfg: LabelsConfig | None = None
        defaults: Defaults | None = None
        seen: dict[tuple[str, str], Location] = {}

        def unique(kind: str, name: str, file: str, located: yamlpos.Located, path: tuple[Any, ...]) -> bool:
            where = self.loc(file, located, path)
            if (kind, name) in seen:
                self.problems.append(
                    PolicyProblem(where, f"duplicate {kind} {name!r}", f"first defined at {seen[(kind, name)]}")
                )
                return False
            seen[(kind, name)] = where
            return True

        builtin = Location("<built-in>", 0, 0)
        seen[("service", "all")] = builtin
        seen[("ip list", ANY_IP_LIST)] = builtin

        for file, located, doc in self.docs:
            if doc.labels is not None:
                if labels_cfg is not None:
                    self.problem(file, located, ("labels",), "labels configured in more than one file")
                labels_cfg = doc.labels
            if doc.defaults is not None:
                if defaults is not None:
                    self.problem(file, located, ("defaults",), "defaults configured in more than one file")
                defaults = doc.defaults
        mapper = LabelMapper(labels_cfg)
        dims = mapper.dimensions
        for file, located, doc in self.docs:
            if doc.labels is None:
                continue
            self._label_keys(file, located, doc.labels, mapper)
            for dim, dim_spec in doc.labels.dimensions.items():
                allowed = mapper.allowed_values(dim)
                for alias, target in dim_spec.aliases.items():
                    if allowed is not None and mapper.canonical_value(dim, target) not in allowed:
                        self.problem(
                            file,
                            located,
                            ("labels", "dimensions", dim, "aliases", alias),
                            f"alias {alias!r} → {target!r}: {target!r} is not an allowed value of {dim!r}",
                            f"allowed: {', '.join(sorted(allowed))}",
                        )

        # label groups (nestable, one dimension each)
        raw_groups: dict[str, tuple[str, list[str], str, yamlpos.Located, tuple[Any, ...]]] = {}
        for file, located, doc in self.docs:
            for i, g in enumerate(doc.label_groups):
                path: tuple[Any, ...] = ("label_groups", i)
                if not unique("label group", g.name, file, located, (*path, "name")):
                    continue
                if g.dimension not in dims:
                    self.problem(
                        file,
                        located,
                        (*path, "dimension"),
                        f"unknown label dimension {g.dimension!r}",
                        _dims_hint(dims),
                    )
                    continue
                raw_groups[g.name] = (g.dimension, g.values, file, located, path)
        groups: dict[str, tuple[str, frozenset[str]]] = {}

        def expand(name: str, stack: tuple[str, ...]) -> frozenset[str] | None:
            if name in groups:
                return groups[name][1]
            if name not in raw_groups:
                return None
            dim, values, file, located, path = raw_groups[name]
            if name in stack:
                self.problem(file, located, path, f"label group {name!r} contains itself", " → ".join((*stack, name)))
                return frozenset()
            out: set[str] = set()
            for j, v in enumerate(values):
                if v.startswith("@"):
                    inner = expand(v[1:], (*stack, name))
                    if inner is None or (v[1:] in raw_groups and raw_groups[v[1:]][0] != dim):
                        self.problem(
                            file,
                            located,
                            (*path, "values", j),
                            f"{v!r} is not a label group of dimension {dim!r}",
                        )
                        continue
                    out |= inner
                else:
                    value = mapper.canonical_value(dim, v)
                    self._check_value(dim, value, mapper, file, located, (*path, "values", j))
                    out.add(value)
            groups[name] = (dim, frozenset(out))
            return groups[name][1]

        for name in raw_groups:
            expand(name, ())

        def group_resolver(name: str, dim: str) -> frozenset[str] | None:
            g = groups.get(name)
            return g[1] if g is not None and g[0] == dim else None

        # services
        services: dict[str, tuple[PortRange, ...]] = {"all": (PortRange("any"),)}
        for file, located, doc in self.docs:
            for i, s in enumerate(doc.services):
                if not unique("service", s.name, file, located, ("services", i, "name")):
                    continue
                specs = []
                for j, spec in enumerate(s.ports):
                    try:
                        specs.append(parse_port_spec(spec))
                    except PortSpecError as exc:
                        self.problem(file, located, ("services", i, "ports", j), str(exc))
                services[s.name] = tuple(specs)

        # ip lists
        ip_lists: dict[str, tuple[Prefix, ...]] = {
            ANY_IP_LIST: (addresses.parse_prefix("0.0.0.0/0"), addresses.parse_prefix("::/0"))
        }
        for file, located, doc in self.docs:
            for i, ipl in enumerate(doc.ip_lists):
                if not unique("ip list", ipl.name, file, located, ("ip_lists", i, "name")):
                    continue
                inc = self._prefixes(ipl.cidrs, file, located, ("ip_lists", i, "cidrs"))
                exc_ = self._prefixes(ipl.exclude, file, located, ("ip_lists", i, "exclude"))
                ip_lists[ipl.name] = tuple(addresses.exclude(inc, exc_))

        # rulesets
        rules: list[CompiledRule] = []
        for file, located, doc in self.docs:
            for i, rs in enumerate(doc.rulesets):
                rpath: tuple[Any, ...] = ("rulesets", i)
                if not unique("ruleset", rs.name, file, located, (*rpath, "name")):
                    continue
                scope = self._selector(rs.scope, mapper, group_resolver, file, located, (*rpath, "scope"))
                for d in rs.same:
                    self._check_dim(d, dims, file, located, (*rpath, "same"))
                rule_names: set[str] = set()
                for k, rule in enumerate(rs.rules):
                    path = (*rpath, "rules", k)
                    base = rule.name or str(k + 1)
                    if base in rule_names:
                        self.problem(
                            file,
                            located,
                            (*path, "name"),
                            f"duplicate rule name {base!r} in ruleset {rs.name!r}",
                        )
                        continue
                    rule_names.add(base)
                    same = rule.same if rule.same is not None else ([] if rule.extra_scope else rs.same)
                    for d in rule.same or ():
                        self._check_dim(d, dims, file, located, (*path, "same"))
                    port_ranges: list[PortRange] = []
                    for j, sname in enumerate(rule.services):
                        if looks_like_spec(sname):
                            try:
                                port_ranges.append(parse_port_spec(sname))
                            except PortSpecError as exc:
                                self.problem(file, located, (*path, "services", j), str(exc))
                        elif sname in services:
                            port_ranges.extend(services[sname])
                        else:
                            self.problem(
                                file,
                                located,
                                (*path, "services", j),
                                f"undefined service {sname!r}",
                                _closest(sname, services),
                            )
                    consumers = self._peers(rule.from_, "from", mapper, group_resolver, ip_lists, file, located, path)
                    providers = self._peers(rule.to, "to", mapper, group_resolver, ip_lists, file, located, path)
                    if scope is None or consumers is None or providers is None:
                        continue
                    pairs = [(c, p) for c in consumers for p in providers]
                    for n, (c, p) in enumerate(pairs):
                        if not c.is_workloads and not p.is_workloads:
                            self.problem(
                                file,
                                located,
                                path,
                                "a rule needs workloads on at least one side",
                                "both from and to are IP lists",
                            )
                            continue
                        if p.is_workloads:
                            assert p.selector is not None
                            p = self.scoped(scope, p.selector)
                            if c.is_workloads and not rule.extra_scope:
                                assert c.selector is not None
                                c = self.scoped(scope, c.selector)
                        else:  # outbound to addresses: the scope governs the consumers
                            assert c.selector is not None
                            c = self.scoped(scope, c.selector)
                        rule_same = tuple(sorted(same)) if c.is_workloads and p.is_workloads else ()
                        rid = f"{rs.name}/{base}" + (f"#{n + 1}" if len(pairs) > 1 else "")
                        rules.append(
                            CompiledRule(
                                id=rid,
                                ruleset=rs.name,
                                action=rule.action,
                                staged=rs.staged,
                                consumer=c,
                                provider=p,
                                same=rule_same,
                                services=tuple(port_ranges),
                                service_names=tuple(rule.services),
                                location=self.loc(file, located, path),
                            )
                        )

        modes: list[ModeSelector] = []
        for file, located, doc in self.docs:
            for i, m in enumerate(doc.modes):
                node = self._selector(m.selector, mapper, group_resolver, file, located, ("modes", i, "selector"))
                if node is not None:
                    modes.append(ModeSelector(node, m.mode, selectors.matcher(node)))

        tests: list[CompiledTest] = []
        for file, located, doc in self.docs:
            for i, t in enumerate(doc.tests):
                path = ("tests", i)
                ok = True
                for side, ep in (("from", t.from_), ("to", t.to)):
                    given = [k for k in ("workload", "labels", "ip") if getattr(ep, k) is not None]
                    if len(given) != 1:
                        self.problem(
                            file,
                            located,
                            (*path, side),
                            f"test endpoint {side!r} needs exactly one of workload, labels, ip",
                        )
                        ok = False
                    if ep.labels:
                        for dim, value in ep.labels.items():
                            if dim not in dims:
                                self.problem(
                                    file,
                                    located,
                                    (*path, side, "labels", dim),
                                    f"unknown label dimension {dim!r}",
                                    _dims_hint(dims),
                                )
                                ok = False
                            else:
                                ok &= self._check_value(
                                    dim,
                                    mapper.canonical_value(dim, value),
                                    mapper,
                                    file,
                                    located,
                                    (*path, side, "labels", dim),
                                )
                    if ep.ip is not None:
                        try:
                            addresses.parse_address(ep.ip)
                        except ValueError:
                            self.problem(file, located, (*path, side, "ip"), f"not an IP address: {ep.ip!r}")
                            ok = False
                try:
                    proto, port = parse_flow_port(t.port)
                except PortSpecError as exc:
                    self.problem(file, located, (*path, "port"), str(exc))
                    continue
                if ok:
                    name = t.name or f"{_ep_text(t.from_)} → {_ep_text(t.to)} {t.port}"
                    tests.append(CompiledTest(name, t, proto, port, self.loc(file, located, path)))

        failsafes = self._failsafes(defaults or Defaults())

        if self.problems:
            raise PolicyError(self.problems)
        return Policy(
            labels=mapper,
            label_groups=groups,
            services=services,
            ip_lists=ip_lists,
            rules=rules,
            modes=modes,
            defaults=defaults or Defaults(),
            tests=tests,
            failsafes=failsafes,
            sources=self.sources,
        )

    def _label_keys(self, file: str, located: yamlpos.Located, cfg: LabelsConfig, mapper: LabelMapper) -> None:
        """Label keys are a reserved set, and a privileged dimension has exactly one key: an IAM guard
        on the label keys must cover every key that can change a label."""
        prefix = cfg.key_prefix
        for dim, spec in cfg.dimensions.items():
            path: tuple[Any, ...] = ("labels", "dimensions", dim)
            for j, key in enumerate(spec.keys):
                if not key.startswith(prefix) or key == prefix:
                    self.problem(
                        file,
                        located,
                        (*path, "keys", j),
                        f"tag key {key!r} of {dim!r} is outside the reserved label keys ({prefix!r}…)",
                        f"only keys under key_prefix carry labels, so one IAM guard covers them: use {prefix + dim!r}",
                    )
            if spec.privileged and len(spec.keys) > 1:
                self.problem(
                    file,
                    located,
                    (*path, "keys"),
                    f"dimension {dim!r} has privileged values, so it takes exactly one tag key (got {len(spec.keys)})",
                    "an IAM guard on one key would be bypassed through another",
                )
            allowed = mapper.allowed_values(dim)
            for j, value in enumerate(spec.privileged):
                if allowed is not None and mapper.canonical_value(dim, value) not in allowed:
                    self.problem(
                        file,
                        located,
                        (*path, "privileged", j),
                        f"privileged value {value!r} is not an allowed value of {dim!r}",
                        _closest(value, allowed) or f"allowed: {', '.join(sorted(allowed))}",
                    )

    def _failsafes(self, defaults: Defaults) -> ParsedFailsafes:
        """Parse the fail-safes now: a bad one must fail validation, never reach a bundle."""
        where = next(((f, located) for f, located, doc in self.docs if doc.defaults is not None), None)
        file, located = where if where is not None else ("<defaults>", None)
        fs = defaults.failsafes
        path = ("defaults", "failsafes")
        if located is None:
            return ParsedFailsafes()
        admin = tuple(self._failsafe_prefixes(fs.admin_cidrs, file, located, (*path, "admin_cidrs")))
        control = tuple(self._failsafe_prefixes(fs.control_plane, file, located, (*path, "control_plane")))
        ports: list[PortRange] = []
        for j, spec in enumerate(fs.admin_ports):
            try:
                ports.append(parse_port_spec(spec))
            except PortSpecError as exc:
                self.problem(file, located, (*path, "admin_ports", j), str(exc), "e.g. tcp/22")
        resolvers: list[Address] = []
        for j, r in enumerate(fs.dns_resolvers):
            try:
                resolvers.append(addresses.parse_address(r))
            except ValueError:
                self.problem(file, located, (*path, "dns_resolvers", j), f"not an IP address: {r!r}")
        return ParsedFailsafes(admin, tuple(ports), tuple(resolvers), control)

    def _failsafe_prefixes(
        self, cidrs: list[str], file: str, located: yamlpos.Located, path: tuple[Any, ...]
    ) -> list[Prefix]:
        """Fail-safe prefixes, each no wider than :data:`~ringfence.failsafewire.FAILSAFE_WIDEST` and
        together no more than :data:`~ringfence.failsafewire.FAILSAFE_MOST`."""
        out = self._prefixes(cidrs, file, located, path)
        hint = "list the management networks themselves, e.g. 10.20.0.0/16"
        too_wide = False
        for j, prefix in enumerate(out):
            why = failsafe_width_problem(prefix[0], prefix[2])
            if why is not None:
                too_wide = True
                self.problem(
                    file,
                    located,
                    (*path, j),
                    f"{addresses.format_prefix(prefix)}: {why}",
                    hint,
                )
        for family in (4, 6) if not too_wide else ():  # else that entry is the one to fix first
            why = failsafe_total_problem(family, [(p[1], p[2]) for p in out if p[0] == family])
            if why is not None:
                self.problem(file, located, path, why, hint)
        return out

    def _prefixes(self, cidrs: list[str], file: str, located: yamlpos.Located, path: tuple[Any, ...]) -> list[Prefix]:
        out = []
        for j, c in enumerate(cidrs):
            try:
                out.append(addresses.parse_prefix(c))
            except ValueError:
                self.problem(
                    file,
                    located,
                    (*path, j),
                    f"not a CIDR or address: {c!r}",
                    "e.g. 10.0.0.0/8, 2001:db8::/32 or 192.0.2.7",
                )
        return out

    def _check_dim(
        self, dim: str, dims: Mapping[str, Any], file: str, located: yamlpos.Located, path: tuple[Any, ...]
    ) -> bool:
        if dim not in dims:
            self.problem(file, located, path, f"unknown label dimension {dim!r}", _dims_hint(dims))
            return False
        return True

    def _check_value(
        self,
        dim: str,
        value: str,
        mapper: LabelMapper,
        file: str,
        located: yamlpos.Located,
        path: tuple[Any, ...],
        column_offset: int = 0,
    ) -> bool:
        allowed = mapper.allowed_values(dim)
        if allowed is not None and value not in allowed:
            self.problem(
                file,
                located,
                path,
                f"{value!r} is not an allowed value of {dim!r}",
                _closest(value, allowed) or f"allowed: {', '.join(sorted(allowed))}",
                column_offset,
            )
            return False
        return True

    def _selector(
        self,
        text: str,
        mapper: LabelMapper,
        groups: selectors.GroupResolver,
        file: str,
        located: yamlpos.Located,
        path: tuple[Any, ...],
    ) -> selectors.Node | None:
        if self.memo and text in self._selectors:
            return self._selectors[text]
        try:
            node = selectors.parse(text, groups)
        except selectors.SelectorSyntaxError as exc:
            self.problem(file, located, path, f"selector {text!r}: {exc.message}", exc.hint, exc.column - 1)
            return None
        ok = True
        for leaf in _leaves(node):
            if leaf.dim not in mapper.dimensions:
                self.problem(
                    file,
                    located,
                    path,
                    f"unknown label dimension {leaf.dim!r} in selector {text!r}",
                    _dims_hint(mapper.dimensions),
                    max(text.find(leaf.dim), 0),
                )
                ok = False
                continue
            if isinstance(leaf, selectors.In):
                allowed = mapper.allowed_values(leaf.dim)
                if allowed is None:  # any value goes; _check_value would pass each one
                    continue
                for v in leaf.values:
                    canon = mapper.canonical_value(leaf.dim, v)
                    if canon not in allowed:  # only a failing value needs _check_value (and the column search)
                        ok &= self._check_value(leaf.dim, canon, mapper, file, located, path, max(text.find(v), 0))
        if not ok:
            return None
        node = _canonical_values(node, mapper)
        if self.memo:
            self._selectors[text] = node
        return node

    def _peers(
        self,
        spec: PeerSpec | list[PeerSpec],
        side: str,
        mapper: LabelMapper,
        groups: selectors.GroupResolver,
        ip_lists: Mapping[str, tuple[Prefix, ...]],
        file: str,
        located: yamlpos.Located,
        path: tuple[Any, ...],
    ) -> list[Peer] | None:
        items = spec if isinstance(spec, list) else [spec]
        out: list[Peer] = []
        ok = True
        for j, item in enumerate(items):
            ipath = (*path, side, j) if isinstance(spec, list) else (*path, side)
            if isinstance(item, IpListPeer):
                if item.ip_list not in ip_lists:
                    self.problem(
                        file,
                        located,
                        (*ipath, "ip_list"),
                        f"undefined ip list {item.ip_list!r}",
                        _closest(item.ip_list, ip_lists),
                    )
                    ok = False
                    continue
                ip_peer = self._ip_peers.get(item.ip_list) if self.memo else None
                if ip_peer is None:
                    ip_peer = Peer(ip_list=item.ip_list, prefixes=ip_lists[item.ip_list])
                    if self.memo:
                        self._ip_peers[item.ip_list] = ip_peer
                out.append(ip_peer)
            else:
                node = self._selector(item, mapper, groups, file, located, ipath)
                if node is None:
                    ok = False
                    continue
                out.append(self.peer(node))
        return out if ok else None


def _leaves(node: selectors.Node) -> list[selectors.Has | selectors.In]:
    if isinstance(node, selectors.Has | selectors.In):
        return [node]
    if isinstance(node, selectors.Not):
        return _leaves(node.inner)
    if isinstance(node, selectors.And | selectors.Or):
        return [leaf for p in node.parts for leaf in _leaves(p)]
    return []


def _canonical_values(node: selectors.Node, mapper: LabelMapper) -> selectors.Node:
    """Normalise selector values like tag values (case, aliases) so ``env == 'Prod'`` matches.

    A node whose values are already canonical comes back as itself (an equal node): most are,
    and frozen dataclasses are slow to build.
    """
    if isinstance(node, selectors.In):
        values = frozenset(mapper.canonical_value(node.dim, v) for v in node.values)
        return node if values == node.values else selectors.In(node.dim, values, node.negate)
    if isinstance(node, selectors.Not):
        inner = _canonical_values(node.inner, mapper)
        return node if inner is node.inner else selectors.Not(inner)
    if isinstance(node, selectors.And | selectors.Or):
        parts = tuple(_canonical_values(p, mapper) for p in node.parts)
        if all(new is old for new, old in zip(parts, node.parts, strict=True)):
            return node
        return selectors.And(parts) if isinstance(node, selectors.And) else selectors.Or(parts)
    return node


def _closest(name: str, options: Iterable[str]) -> str:
    import difflib

    close = difflib.get_close_matches(name, sorted(options), n=1, cutoff=0.5)
    return f"did you mean {close[0]!r}?" if close else ""


def _dims_hint(dims: Iterable[str]) -> str:
    return "known dimensions: " + ", ".join(sorted(dims)) + " (declare more under labels.dimensions)"


def _ep_text(ep: Any) -> str:
    if ep.workload:
        return str(ep.workload)
    if ep.ip:
        return str(ep.ip)
    return ",".join(f"{k}={v}" for k, v in sorted((ep.labels or {}).items()))


def json_schema() -> dict[str, Any]:
    """The JSON Schema of a policy file (``ringfence policy schema``)."""
    schema = PolicyFile.model_json_schema(by_alias=True)
    schema["$schema"] = "https://json-schema.org/draft/2020-12/schema"
    schema["title"] = "Ringfence policy file"
    return schema


def schema_text() -> str:
    return json.dumps(json_schema(), indent=2, sort_keys=True) + "\n"
