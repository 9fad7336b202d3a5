"""The agent's configuration file (YAML or JSON), validated with pydantic."""

from __future__ import annotations

import contextlib
import ipaddress
import json
from pathlib import Path
from typing import Literal
from urllib.parse import urlparse

from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from ringfence_agent.plan import LocalFailsafes, parse_port_spec


class ConfigError(ValueError):
    pass


class Enrollment(BaseModel):
    model_config = ConfigDict(extra="forbid")
    method: Literal["pairing", "aws-iid"] = "pairing"
    pairing_key: str | None = Field(None, description="operator-issued key (or pairing_key_file)")
    pairing_key_file: Path | None = None
    imds_url: str = Field("http://169.254.169.254", description="aws-iid: the instance metadata endpoint")
    iid_signature: Literal["rsa2048", "pkcs7", "signature"] = Field(
        "rsa2048", description="aws-iid: which IMDS signature of the identity document to send"
    )

    @model_validator(mode="after")
    def _key(self) -> Enrollment:
        if self.method == "pairing" and self.pairing_key is None and self.pairing_key_file is None:
            raise ValueError("pairing enrollment needs pairing_key or pairing_key_file")
        return self

    def key(self) -> str:
        if self.pairing_key is not None:
            return self.pairing_key
        assert self.pairing_key_file is not None
        return self.pairing_key_file.read_text().strip()


class AgentConfig(BaseModel):
    """See docs/agent.md (configuration reference)."""

    model_config = ConfigDict(extra="forbid")

    workload_id: str = Field(min_length=1, max_length=256)
    public_key: Path = Field(description="pinned Ed25519 public key (PEM) bundles must verify against")
    state_dir: Path = Path("/var/lib/ringfence-agent")
    backend: Literal["nftables", "iptables", "windows-plan", "dry-run"] = "nftables"
    api_url: str | None = Field(None, description="control-plane agent API base URL (http/https)")
    source: str | None = Field(None, description="static source: a directory or an http(s) base URL")
    enroll: Enrollment | None = None
    # local fail-safes: merged with the bundle's, never removable by a bundle
    admin_cidrs: list[str] = Field(default_factory=list)
    admin_ports: list[str] = Field(default_factory=lambda: ["tcp/22", "tcp/3389"])
    dns_resolvers: list[str] = Field(default_factory=list)
    control_plane: list[str] = Field(default_factory=list, description="addresses/CIDRs of the control plane")
    metadata_endpoint: bool = Field(
        True, description="allow 169.254.169.254 and fd00:ec2::254 (tcp/80, udp/tcp 53, udp/123)"
    )
    dhcp: bool = True
    # timing
    poll_interval: float = Field(300.0, ge=1, description="slow poll when no nudge arrives (seconds)")
    wait_timeout: float = Field(25.0, ge=1, le=300, description="long-poll duration (seconds)")
    heartbeat_interval: float = Field(60.0, ge=1)
    report_interval: float = Field(30.0, ge=1)
    observe_interval: float = Field(10.0, ge=0.2, description="how often counters/conntrack are polled")
    backoff_max: float = Field(300.0, ge=1)
    request_timeout: float = Field(10.0, ge=0.5)
    max_buffered_records: int = Field(10_000, ge=10, le=1_000_000)
    max_spool_bytes: int = Field(4 * 1024 * 1024, ge=4096)

    @field_validator("admin_cidrs", "dns_resolvers", "control_plane")
    @classmethod
    def _cidrs(cls, items: list[str]) -> list[str]:
        for x in items:
            try:
                ipaddress.ip_network(x.strip(), strict=True)
            except ValueError as exc:
                raise ValueError(f"{x!r} is not an address or CIDR: {exc}") from None
        return items

    @field_validator("admin_ports")
    @classmethod
    def _ports(cls, items: list[str]) -> list[str]:
        for x in items:
            parse_port_spec(x)
        return items

    @field_validator("api_url")
    @classmethod
    def _url(cls, v: str | None) -> str | None:
        if v is not None and urlparse(v).scheme not in ("http", "https"):
            raise ValueError("api_url must be an http:// or https:// URL")
        return v.rstrip("/") if v else v

    @model_validator(mode="after")
    def _one_source(self) -> AgentConfig:
        if (self.api_url is None) == (self.source is None):
            raise ValueError("set exactly one of api_url (control plane) or source (static directory/URL)")
        if self.api_url is not None and self.enroll is None:
            raise ValueError("api_url needs an enroll section (method: pairing with pairing_key, or method: aws-iid)")
        return self

    def local_failsafes(self) -> LocalFailsafes:
        cp = list(self.control_plane)
        for url in (self.api_url, self.source):
            host = urlparse(url).hostname if url and "://" in url else None
            if host:
                # a name: list its addresses in control_plane (resolved addresses drift)
                with contextlib.suppress(ValueError):
                    cp.append(str(ipaddress.ip_address(host)))
        return LocalFailsafes(
            admin_cidrs=tuple(self.admin_cidrs),
            admin_ports=tuple(self.admin_ports),
            dns_resolvers=tuple(self.dns_resolvers),
            control_plane=tuple(dict.fromkeys(cp)),
            metadata=self.metadata_endpoint,
            dhcp=self.dhcp,
        )


def load_config(path: Path) -> AgentConfig:
    try:
        text = path.read_text()
    except OSError as exc:
        raise ConfigError(f"cannot read config {path}: {exc.strerror}") from None
    import yaml  # only here: keeps the daemon's resident set smaller when the config is JSON

    try:
        data = json.loads(text) if path.suffix == ".json" else yaml.safe_load(text)
    except (json.JSONDecodeError, yaml.YAMLError) as exc:
        raise ConfigError(f"{path}: not valid {'JSON' if path.suffix == '.json' else 'YAML'}: {exc}") from None
    if not isinstance(data, dict):
        raise ConfigError(f"{path}: expected a mapping of settings at the top level")
    try:
        cfg = AgentConfig.model_validate(data)
    except ValidationError as exc:
        problems = [f"  {'.'.join(str(p) for p in e['loc']) or '(top level)'}: {e['msg']}" for e in exc.errors()]
        raise ConfigError(f"{path}: invalid configuration\n" + "\n".join(problems)) from None
    base = path.parent
    updates = {}
    for name in ("public_key", "state_dir"):
        p = getattr(cfg, name)
        if not p.is_absolute():
            updates[name] = (base / p).resolve()
    return cfg.model_copy(update=updates) if updates else cfg
