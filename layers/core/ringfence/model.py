"""Boundary types (pydantic): policy files, label configuration, inventory records.

These validate what comes in from files, events and APIs, and publish the JSON Schema that
editors use. Hot loops use the plain dataclasses of :mod:`ringfence.engine` instead.
"""

from __future__ import annotations

from typing import Annotated, Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator

from ringfence.enums import Action, Mode

__all__ = ["Action", "Mode"]  # re-exported: they belong to the policy model too

BUILTIN_DIMENSIONS = ("role", "app", "env", "loc")
DEFAULT_KEY_PREFIX = "ringfence:"
MAX_DIMENSIONS = 20
NAME_PATTERN = r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,62}$"


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", populate_by_name=True, defer_build=True)


Name = Annotated[str, Field(pattern=NAME_PATTERN)]

# --- labels ------------------------------------------------------------------------------------


class Derive(_Strict):
    """Derive a label from workload metadata when no tag provides it (e.g. ``loc`` from region)."""

    source: Literal["region", "zone", "site", "account", "vpc", "cloud"]
    map: dict[str, str] = Field(default_factory=dict, description="source value → label value")
    only_mapped: bool = Field(False, description="leave the label unset when the value is not in map")


class Dimension(_Strict):
    keys: list[str] = Field(
        default_factory=list,
        description="tag keys feeding this dimension, first present wins (default: key_prefix + the dimension "
        "name); every key starts with the labels' key_prefix, and a dimension with privileged values has one key",
    )
    normalize: Literal["lower", "none", "slug"] = Field(
        "lower", description="lower: trim + lowercase; none: trim; slug: lowercase, non [a-z0-9_-] → '-'"
    )
    allowed: list[str] | None = Field(None, description="allowed values; others are a hygiene failure")
    aliases: dict[str, str] = Field(default_factory=dict, description="spelling → canonical value")
    required: bool = False
    derive: Derive | None = None
    privileged: list[str] = Field(
        default_factory=list,
        description="values a workload may move into only by an allowed tagging principal's tag change or an "
        "audited admin binding (e.g. role: [jumpbox])",
    )


class LabelsConfig(_Strict):
    """Which tag keys feed which label dimension, and what values are valid."""

    dimensions: dict[str, Dimension] = Field(default_factory=dict)
    key_prefix: str = Field(
        DEFAULT_KEY_PREFIX,
        pattern=r"^[A-Za-z0-9][A-Za-z0-9_.:/=+@-]{0,63}$",
        description="the reserved tag-key prefix: only keys starting with it carry labels, so one IAM guard "
        "(ringfence:*) covers every label key (GCP keys cannot hold ':': use e.g. ringfence_)",
    )
    case_insensitive_keys: bool = Field(
        False,
        description="refused when true: tag keys match exactly, as IAM conditions on tag keys do "
        "(an IAM guard on ringfence:role does not cover RingFence:Role)",
    )
    taggers: list[str] = Field(
        default_factory=list,
        description="principals allowed to move a workload into a privileged value by tagging it: IAM ARNs "
        "(role ARN of an assumed role), '*' matches any run of characters",
    )
    on_privileged_change: Literal["hold", "quarantine"] = Field(
        "hold",
        description="an unapproved move into a privileged value: hold (keep the previous labels) or also "
        "quarantine the workload",
    )

    @field_validator("dimensions")
    @classmethod
    def _limit(cls, dims: dict[str, Dimension]) -> dict[str, Dimension]:
        names = set(dims) | set(BUILTIN_DIMENSIONS)
        if len(names) > MAX_DIMENSIONS:
            raise ValueError(f"at most {MAX_DIMENSIONS} label dimensions (got {len(names)})")
        for name in dims:
            if not _is_dimension_name(name):
                raise ValueError(f"dimension name {name!r} must match [a-z][a-z0-9_]*")
        return dims

    @field_validator("case_insensitive_keys")
    @classmethod
    def _exact_keys(cls, value: bool) -> bool:
        if value:
            raise ValueError(
                "tag keys match exactly: an IAM guard on 'ringfence:role' does not cover 'RingFence:Role', "
                "so case-insensitive keys would let anyone who may tag bypass it (remove the setting)"
            )
        return value

    def all_dimensions(self) -> dict[str, Dimension]:
        out = {name: Dimension() for name in BUILTIN_DIMENSIONS}
        out.update(self.dimensions)
        return out


def _is_dimension_name(name: str) -> bool:
    return bool(name) and name[0].isalpha() and name.islower() and name.replace("_", "").isalnum()


# --- policy ------------------------------------------------------------------------------------


class LabelGroup(_Strict):
    name: Name
    dimension: str
    values: list[str] = Field(description="label values, or @other-group of the same dimension")
    description: str = ""


class Service(_Strict):
    name: Name
    ports: list[str] = Field(description="proto/port specs: tcp/443, udp/53, tcp/8000-8080, icmp, icmp/8, icmpv6, any")
    process: str | None = Field(None, description="process name (reported; enforced where supported)")
    description: str = ""


class IpList(_Strict):
    name: Name
    cidrs: list[str] = Field(min_length=1)
    exclude: list[str] = Field(default_factory=list)
    description: str = ""


class IpListPeer(_Strict):
    ip_list: str


PeerSpec = str | IpListPeer
"""A label selector string, or ``{ip_list: NAME}``."""


class Rule(_Strict):
    name: Name | None = None
    from_: PeerSpec | list[PeerSpec] = Field(alias="from", description="consumers (sources)")
    to: PeerSpec | list[PeerSpec] = Field(description="providers (destinations)")
    services: list[str] = Field(description="service names or inline proto/port specs")
    action: Action = Action.ALLOW
    same: list[str] | None = Field(
        None, description="dimensions consumer and provider must share (default: the ruleset's)"
    )
    extra_scope: bool = Field(False, description="consumers are not restricted to the scope")
    description: str = ""


class Ruleset(_Strict):
    name: Name
    scope: str = Field("all()", description="selector over the providers this ruleset governs")
    same: list[str] = Field(
        default_factory=lambda: ["app", "env", "loc"],
        description="default for rules: dimensions consumer and provider must share (the app group)",
    )
    staged: bool = Field(False, description="evaluated and reported, not enforced")
    rules: list[Rule]
    description: str = ""


class ModeRule(_Strict):
    selector: str
    mode: Mode


class Failsafes(_Strict):
    """Traffic no policy can block (the agent adds its own local configuration to these)."""

    admin_cidrs: list[str] = Field(default_factory=list)
    admin_ports: list[str] = Field(default_factory=lambda: ["tcp/22", "tcp/3389"])
    dns_resolvers: list[str] = Field(default_factory=list)
    control_plane: list[str] = Field(default_factory=list)


class Defaults(_Strict):
    mode: Mode = Mode.ENFORCE
    unlabeled_mode: Mode = Field(
        Mode.ENFORCE, description="mode of workloads that fail label hygiene (their bad labels are dropped)"
    )
    failsafes: Failsafes = Field(default_factory=Failsafes)


class TestEndpoint(_Strict):
    workload: str | None = None
    labels: dict[str, str] | None = None
    ip: str | None = None


class PolicyTest(_Strict):
    name: str | None = None
    from_: TestEndpoint = Field(alias="from")
    to: TestEndpoint
    port: str = Field(description="proto/port, e.g. tcp/5432")
    expect: Literal["allow", "deny"]


class PolicyFile(_Strict):
    """One YAML policy file. A policy is every such file of a directory, merged."""

    schema_: str | None = Field(None, alias="$schema")
    labels: LabelsConfig | None = None
    label_groups: list[LabelGroup] = Field(default_factory=list)
    services: list[Service] = Field(default_factory=list)
    ip_lists: list[IpList] = Field(default_factory=list)
    rulesets: list[Ruleset] = Field(default_factory=list)
    modes: list[ModeRule] = Field(default_factory=list, description="first matching selector wins")
    defaults: Defaults | None = None
    tests: list[PolicyTest] = Field(default_factory=list)


# --- inventory ---------------------------------------------------------------------------------


class Workload(_Strict):
    """One inventory record: what the cloud (or a CMDB) says about a workload."""

    id: str = Field(min_length=1)
    name: str | None = None
    ips: list[str] = Field(default_factory=list)
    tags: dict[str, str] = Field(default_factory=dict)
    labels: dict[str, str] = Field(default_factory=dict, description="labels given directly (CMDB)")
    cloud: Literal["aws", "azure", "gcp", "onprem"] = "onprem"
    account: str | None = None
    region: str | None = None
    zone: str | None = None
    vpc: str | None = None
    subnet: str | None = None
    site: str | None = None
    resource: str | None = Field(
        None,
        description="the cloud's id of the resource where the workload's id is another, lower case (Azure: the "
        "VM's ARM id; a delete event names it)",
    )
    held_labels: dict[str, str] | None = Field(
        None,
        description="labels in force while a move into a privileged value waits for approval "
        "(None: the tags decide; {}: none, the workload gets the unlabeled mode)",
    )
    label_grants: dict[str, str] = Field(
        default_factory=dict, description="privileged values granted by an audited admin binding (dimension → value)"
    )
    mode: Mode | None = Field(None, description="operator override of the policy's mode")
    quarantined: bool = False
    observed_at: float = Field(0.0, description="source timestamp; older observations never win")

    @field_validator("ips")
    @classmethod
    def _ips(cls, ips: list[str]) -> list[str]:
        import ipaddress

        out = []
        for ip in ips:
            try:
                addr = ipaddress.ip_address(ip.strip())
            except ValueError:
                raise ValueError(f"not an IP address: {ip!r}") from None
            # without its zone index (%…), as the firewall and every comparison see it; input
            # boundaries (cmdb.parse_ips) refuse one, a record stored before still loads
            out.append(str(addr).split("%", 1)[0])
        return out


class Inventory(_Strict):
    workloads: list[Workload] = Field(default_factory=list)
