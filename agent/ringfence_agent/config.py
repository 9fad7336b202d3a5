"""The agent's configuration file (YAML or JSON), validated without pydantic (the daemon keeps
its imports small; see docs/benchmarks.md, "Idle daemon")."""

from __future__ import annotations

import contextlib
import dataclasses
import ipaddress
import json
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal
from urllib.parse import urlparse

from ringfence_agent.plan import LocalFailsafes, bounded_cidrs, parse_port_spec, split_cidrs
from ringfence_agent.resolvers import system_resolvers


class ConfigError(ValueError):
    pass


class _Invalid(ValueError):
    def __init__(self, loc: str, msg: str) -> None:
        super().__init__(f"{loc}: {msg}")
        self.loc, self.msg = loc, msg


def _check(loc: str, value: Any, kind: str, allowed: tuple[str, ...] = ()) -> Any:
    """One setting's type (YAML/JSON scalars); str → Path for paths; int → float for seconds."""
    if kind == "str" and type(value) is str:
        return value
    if kind == "path" and isinstance(value, str | Path):
        return Path(value)
    if kind == "bool" and type(value) is bool:
        return value
    if kind == "int" and type(value) is int:
        return value
    if kind == "float" and type(value) in (int, float):
        return float(value)
    if kind == "literal" and value in allowed:
        return value
    if kind == "str-list" and type(value) is list and all(type(x) is str for x in value):
        return list(value)
    expected = {
        "str": "a string",
        "path": "a path",
        "bool": "true or false",
        "int": "an integer",
        "float": "a number",
        "literal": " or ".join(repr(a) for a in allowed),
        "str-list": "a list of strings",
    }[kind]
    raise _Invalid(loc, f"Input should be {expected}")


def _range(loc: str, value: float, ge: float | None = None, le: float | None = None) -> None:
    if ge is not None and value < ge:
        raise _Invalid(loc, f"Input should be greater than or equal to {ge:g}")
    if le is not None and value > le:
        raise _Invalid(loc, f"Input should be less than or equal to {le:g}")


def _optional(kind: str, *allowed: str) -> tuple[str, tuple[str, ...], bool]:
    return kind, allowed, True


def _required(kind: str, *allowed: str) -> tuple[str, tuple[str, ...], bool]:
    return kind, allowed, False


_ENROLLMENT_TYPES: dict[str, tuple[str, tuple[str, ...], bool]] = {
    "method": _required("literal", "pairing", "aws-iid", "azure-attested", "gcp-jwt"),
    "gcp_audience": _optional("str"),
    "metadata_url": _required("str"),
    "pairing_key": _optional("str"),
    "pairing_key_file": _optional("path"),
    "imds_url": _required("str"),
    "iid_signature": _required("literal", "rsa2048", "pkcs7", "signature"),
}


_CONFIG_TYPES: dict[str, tuple[str, tuple[str, ...], bool]] = {
    "workload_id": _required("str"),
    "public_key": _required("path"),
    "revoked_keys": _required("str-list"),
    "state_dir": _required("path"),
    "backend": _required("literal", "nftables", "iptables", "windows-plan", "dry-run"),
    "api_url": _optional("str"),
    "source": _optional("str"),
    "admin_cidrs": _required("str-list"),
    "admin_ports": _required("str-list"),
    "dns_resolvers": _required("str-list"),
    "system_resolvers": _required("bool"),
    "control_plane": _required("str-list"),
    "metadata_endpoint": _required("bool"),
    "dhcp": _required("bool"),
    "cut_revoked_connections": _required("bool"),
    "boot_posture": _required("literal", "failsafe", "open"),
    "poll_interval": _required("float"),
    "wait_timeout": _required("float"),
    "heartbeat_interval": _required("float"),
    "report_interval": _required("float"),
    "observe_interval": _required("float"),
    "drift_interval": _required("float"),
    "backoff_max": _required("float"),
    "request_timeout": _required("float"),
    "max_buffered_records": _required("int"),
    "max_spool_bytes": _required("int"),
    "max_bundle_bytes": _required("int"),
    "max_answer_bytes": _required("int"),
    "insecure_http_lab_only": _required("bool"),
    "tls_ca_file": _optional("path"),
}

_RANGES: dict[str, tuple[float, float | None]] = {
    "poll_interval": (1, None),
    "wait_timeout": (1, 300),
    "heartbeat_interval": (1, None),
    "report_interval": (1, None),
    "observe_interval": (0.2, None),
    "drift_interval": (0, None),
    "backoff_max": (1, None),
    "request_timeout": (0.5, None),
    "max_buffered_records": (10, 1_000_000),
    "max_spool_bytes": (4096, None),
    "max_bundle_bytes": (65536, None),
    "max_answer_bytes": (4096, None),
}


@dataclass(frozen=True, slots=True, kw_only=True)
class Enrollment:
    method: Literal["pairing", "aws-iid", "azure-attested", "gcp-jwt"] = "pairing"
    pairing_key: str | None = None  # operator-issued key (or pairing_key_file)
    pairing_key_file: Path | None = None
    imds_url: str = "http://169.254.169.254"  # aws-iid, azure-attested: the instance metadata endpoint
    # aws-iid: which IMDS signature to send; the AWS control plane verifies ``signature`` (base64 RSA-SHA256)
    iid_signature: Literal["rsa2048", "pkcs7", "signature"] = "signature"
    # gcp-jwt: the audience the control plane verifies, and the GCE metadata server
    gcp_audience: str | None = None
    metadata_url: str = "http://metadata.google.internal"

    def __post_init__(self) -> None:
        _validate_types(self, _ENROLLMENT_TYPES, "enroll.")
        if self.method == "pairing" and self.pairing_key is None and self.pairing_key_file is None:
            raise _Invalid("enroll", "pairing enrollment needs pairing_key or pairing_key_file")
        if self.method == "gcp-jwt" and not self.gcp_audience:
            raise _Invalid("enroll.gcp_audience", "gcp-jwt enrollment needs the control plane's audience")

    def key(self) -> str:
        if self.pairing_key is not None:
            return self.pairing_key
        assert self.pairing_key_file is not None
        return self.pairing_key_file.read_text().strip()


@dataclass(frozen=True, slots=True, kw_only=True)
class AgentConfig:
    """See docs/agent.md (configuration reference)."""

    workload_id: str
    # the pinned key set: one or more Ed25519 public keys (PEM blocks in one file); a bundle or
    # delta must be signed by one of them, named by its key id (docs/bundle.md, Keys and rotation)
    public_key: Path
    revoked_keys: list[str] = field(default_factory=list)  # key ids refused even if still in the file
    state_dir: Path = Path("/var/lib/ringfence-agent")
    backend: Literal["nftables", "iptables", "windows-plan", "dry-run"] = "nftables"
    api_url: str | None = None  # control-plane agent API base URL (https; http only to loopback)
    source: str | None = None  # static source: a directory or an http(s) base URL
    enroll: Enrollment | None = None
    # local fail-safes: merged with the bundle's, never removable by a bundle
    admin_cidrs: list[str] = field(default_factory=list)
    # added to the bundle's admin ports (none by default: the policy's are the host's); with no
    # bundle yet (boot posture) and none here, tcp/22 and tcp/3389 (the policy language's default)
    admin_ports: list[str] = field(default_factory=list)
    dns_resolvers: list[str] = field(default_factory=list)
    # also admit the name servers of /etc/resolv.conf (read at start; udp/tcp 53, outbound) when
    # the control plane is named by a host name: the agent re-resolves it under any bundle
    system_resolvers: bool = True
    control_plane: list[str] = field(default_factory=list)  # addresses/CIDRs of the control plane
    metadata_endpoint: bool = True  # allow 169.254.169.254 and fd00:ec2::254 (tcp/80, udp/tcp 53, udp/123)
    dhcp: bool = True
    # after a change that revokes access, delete the conntrack entries the new rules do not admit
    cut_revoked_connections: bool = True
    # with no valid bundle at start (none yet, or the last known good set aside): "failsafe"
    # enforces the fail-safes and drops the rest until a verified bundle applies; "open" touches nothing
    boot_posture: Literal["failsafe", "open"] = "failsafe"
    # timing (seconds)
    poll_interval: float = 300.0  # slow poll when no nudge arrives
    wait_timeout: float = 25.0  # long-poll duration
    heartbeat_interval: float = 60.0
    report_interval: float = 30.0
    observe_interval: float = 10.0  # how often counters/conntrack are polled
    drift_interval: float = 90.0  # how often the kernel's rules are compared with what was applied (0: never)
    backoff_max: float = 300.0
    request_timeout: float = 10.0
    max_buffered_records: int = 10_000
    max_spool_bytes: int = 4 * 1024 * 1024
    # largest bundle body accepted (and agent-API deltas answer; a static delta: a quarter). Parsing
    # costs ~6x the body in memory: 16 MiB ≈ 800,000 addresses (docs/agent.md, "Failure handling")
    max_bundle_bytes: int = 16 * 1024 * 1024
    max_answer_bytes: int = 256 * 1024  # the agent API's small answers: nonce, enroll, wait, heartbeat
    # api_url over plain http to a non-loopback address: only in a lab (the bearer token and
    # enrollment proofs travel in the clear); the daemon says so loudly at start
    insecure_http_lab_only: bool = False
    # the CA certificates (PEM) that the control plane's certificate must chain to, instead of the
    # system's: a private CA (on premise, a lab). None: the system's trust store
    tls_ca_file: Path | None = None

    def __post_init__(self) -> None:
        _validate_types(self, _CONFIG_TYPES, "")
        if not 1 <= len(self.workload_id) <= 256:
            raise _Invalid("workload_id", "should have 1 to 256 characters")
        for name, (ge, le) in _RANGES.items():
            _range(name, getattr(self, name), ge, le)
        if self.enroll is not None and not isinstance(self.enroll, Enrollment):
            raise _Invalid("enroll", "Input should be a mapping")
        for name in ("admin_cidrs", "dns_resolvers", "control_plane"):
            for x in getattr(self, name):
                try:
                    split_cidrs([x], name)  # what compile_plan accepts (no IPv6 scope ids, ASCII only)
                except ValueError as exc:
                    raise _Invalid(name, f"{x!r} is not an address or CIDR: {exc}") from None
                try:
                    bounded_cidrs([x], name)  # a local fail-safe is bounded as the policy's are
                except ValueError as exc:
                    raise _Invalid(name, str(exc)) from None
            try:
                bounded_cidrs(list(getattr(self, name)), name)  # and the list as a whole
            except ValueError as exc:
                raise _Invalid(name, str(exc)) from None
        for x in self.admin_ports:
            try:
                parse_port_spec(x)
            except ValueError as exc:
                raise _Invalid("admin_ports", str(exc)) from None
        if self.api_url is not None:
            url = urlparse(self.api_url)
            if url.scheme not in ("http", "https"):
                raise _Invalid("api_url", "api_url must be an https:// URL (http:// only to loopback)")
            if url.scheme == "http" and not is_loopback_host(url.hostname) and not self.insecure_http_lab_only:
                raise _Invalid(
                    "api_url",
                    f"{self.api_url!r} is plain http to a non-loopback host: the bearer token and enrollment "
                    "proofs would cross the network in the clear. Use https:// (http:// only to 127.0.0.0/8, "
                    "::1 or localhost; a lab may set insecure_http_lab_only: true)",
                )
            object.__setattr__(self, "api_url", self.api_url.rstrip("/"))
        if (self.api_url is None) == (self.source is None):
            raise _Invalid("(top level)", "set exactly one of api_url (control plane) or source (static directory/URL)")
        if self.api_url is not None and self.enroll is None:
            raise _Invalid(
                "(top level)",
                "api_url needs an enroll section (method: pairing with pairing_key, aws-iid or azure-attested)",
            )

    @classmethod
    def from_mapping(cls, data: dict[str, Any]) -> AgentConfig:
        """From a parsed file: unknown keys are errors, ``enroll`` is a mapping."""
        _no_unknown_keys(cls, data, "")
        values = dict(data)
        raw = values.get("enroll")
        if raw is not None:
            if not isinstance(raw, dict):
                raise _Invalid("enroll", "Input should be a mapping")
            _no_unknown_keys(Enrollment, raw, "enroll.")
            values["enroll"] = Enrollment(**raw)
        for name in ("workload_id", "public_key"):
            if name not in values:
                raise _Invalid(name, "Field required")
        return cls(**values)

    def source_hosts(self) -> list[str]:
        """Host names (not addresses) in ``api_url`` / ``source``: resolved for the boot posture."""
        out = []
        for url in (self.api_url, self.source):
            host = urlparse(url).hostname if url and "://" in url else None
            if host:
                try:
                    ipaddress.ip_address(host)
                except ValueError:
                    out.append(host)
        return out

    def control_ports(self) -> tuple[str, ...]:
        """The control plane's port(s): those of ``api_url`` / an http(s) ``source`` (443 for
        https, 80 for http when the URL names none); none for a directory source (then tcp/443)."""
        out = []
        for url in (self.api_url, self.source):
            if url and url.startswith(("http://", "https://")):
                parsed = urlparse(url)
                try:
                    port = parsed.port
                except ValueError:
                    port = None
                out.append(f"tcp/{port or (443 if parsed.scheme == 'https' else 80)}")
        return tuple(dict.fromkeys(out))

    def resolvers(self) -> tuple[str, ...]:
        """The DNS fail-safe's servers: those configured, and with ``system_resolvers`` and a
        control plane named by a host name, those this host resolves through (read now)."""
        found = system_resolvers() if self.system_resolvers and self.source_hosts() else ()
        return tuple(dict.fromkeys((*self.dns_resolvers, *found)))

    def local_failsafes(self) -> LocalFailsafes:
        cp = list(self.control_plane)
        for url in (self.api_url, self.source):
            host = urlparse(url).hostname if url and "://" in url else None
            if host and "%" not in host:  # an IPv6 scope id is no firewall address
                # a name: list its addresses in control_plane (resolved addresses drift)
                with contextlib.suppress(ValueError):
                    cp.append(str(ipaddress.ip_address(host)))
        return LocalFailsafes(
            admin_cidrs=tuple(self.admin_cidrs),
            admin_ports=tuple(self.admin_ports),
            dns_resolvers=self.resolvers(),
            control_plane=tuple(dict.fromkeys(cp)),
            control_ports=self.control_ports(),
            metadata=self.metadata_endpoint,
            dhcp=self.dhcp,
        )


def is_loopback_host(host: str | None) -> bool:
    """``localhost`` or a loopback address (127.0.0.0/8, ::1): traffic that never leaves the host."""
    if host is None:
        return False
    if host.lower().rstrip(".") == "localhost":
        return True
    try:
        return ipaddress.ip_address(host.split("%")[0]).is_loopback
    except ValueError:
        return False


def _validate_types(obj: object, types: dict[str, tuple[str, tuple[str, ...], bool]], prefix: str) -> None:
    for name, (kind, allowed, nullable) in types.items():
        value = getattr(obj, name)
        if value is None and nullable:
            continue
        object.__setattr__(obj, name, _check(prefix + name, value, kind, allowed))


def _no_unknown_keys(cls: Any, data: dict[str, Any], prefix: str) -> None:
    known = {f.name for f in dataclasses.fields(cls)}
    for key in data:
        if key not in known:
            raise _Invalid(f"{prefix}{key}", "Extra inputs are not permitted")


def load_config(path: Path, origin: Path | None = None, raw: bytes | None = None) -> AgentConfig:
    """The configuration in ``path``. ``origin``: the file it is, where ``path`` is that file
    passed open (``/dev/fd/N``, root's ``run`` executed again as the state directory's owner,
    :mod:`ringfence_agent.asowner`): its name, suffix and directory are the file's. ``raw``: its
    bytes, already read (root's ``run`` reads the file once: a pipe cannot be read twice)."""
    from ringfence_agent.asowner import read_input

    try:
        text = (read_input(path) if raw is None else raw).decode()
    except OSError as exc:
        raise ConfigError(f"cannot read config {origin or path}: {exc.strerror}") from None
    except UnicodeDecodeError as exc:
        raise ConfigError(f"{origin or path}: not UTF-8 text: {exc}") from None
    path = origin or path
    if path.suffix == ".json":
        try:
            data = json.loads(text)
        except json.JSONDecodeError as exc:
            raise ConfigError(f"{path}: not valid JSON: {exc}") from None
    else:
        import yaml  # only here: a JSON config keeps the daemon's resident set ~2 MB smaller

        try:
            data = yaml.safe_load(text)
        except yaml.YAMLError as exc:
            raise ConfigError(f"{path}: not valid YAML: {exc}") from None
    if not isinstance(data, dict):
        raise ConfigError(f"{path}: expected a mapping of settings at the top level")
    try:
        cfg = AgentConfig.from_mapping(data)
    except _Invalid as exc:
        raise ConfigError(f"{path}: invalid configuration\n  {exc.loc}: {exc.msg}") from None
    base = path.parent
    updates: dict[str, Any] = {}
    for name in ("public_key", "state_dir", "tls_ca_file"):
        p = getattr(cfg, name)
        if p is not None and not p.is_absolute():
            updates[name] = (base / p).resolve()
    # relative to the file too: under systemd the working directory is /
    key_file = cfg.enroll.pairing_key_file if cfg.enroll is not None else None
    if cfg.enroll is not None and key_file is not None and not key_file.is_absolute():
        updates["enroll"] = dataclasses.replace(cfg.enroll, pairing_key_file=(base / key_file).resolve())
    return dataclasses.replace(cfg, **updates) if updates else cfg


# The last configuration that loaded, kept in its state directory: what the daemon runs on when
# the file cannot be loaded at a later start (docs/agent.md, "A config file that does not load")
LAST_GOOD_CONFIG = "config.last-good.json"


def save_last_good(cfg: AgentConfig, path: Path) -> None:
    """Keep ``cfg`` (loaded from ``path``; its paths made absolute) in its state directory, mode
    0600 (it may hold an inline pairing key, as the state directory holds the token). Raises
    OSError."""
    from ringfence_agent.state import SMALL_DOC_BYTES, atomic_write, read_regular

    doc = {"from": str(path), "config": dataclasses.asdict(cfg)}
    text = json.dumps(doc, indent=1, sort_keys=True, default=str) + "\n"
    target = cfg.state_dir / LAST_GOOD_CONFIG
    with contextlib.suppress(OSError, ValueError):
        if read_regular(target, SMALL_DOC_BYTES) == text.encode():
            return
    atomic_write(target, text)


def load_last_good(state_dir: Path) -> tuple[AgentConfig, str]:
    """The configuration :func:`save_last_good` kept in ``state_dir``, validated as a file's
    is, and the file it came from; ConfigError when there is none or it does not load."""
    from ringfence_agent.state import SMALL_DOC_BYTES, read_regular

    where = state_dir / LAST_GOOD_CONFIG
    try:
        # root runs only on a file of root's: another user's could name any file as the pairing
        # key and any URL to send it to (a root-owned state directory holding a planted file)
        doc = json.loads(read_regular(where, SMALL_DOC_BYTES, owner=0 if os.geteuid() == 0 else None))
        cfg = AgentConfig.from_mapping(doc["config"])
    except OSError as exc:
        raise ConfigError(f"no last good configuration in {state_dir}: {exc.strerror}") from None
    except (ValueError, KeyError, TypeError, AttributeError) as exc:  # _Invalid is a ValueError
        raise ConfigError(f"{where} does not load: {exc}") from None
    return cfg, str(doc.get("from", "?"))
