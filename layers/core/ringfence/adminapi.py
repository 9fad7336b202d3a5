"""The admin API's request bodies (server side, pydantic): what an operator sends to provision
policy, set modes, quarantine and release, bind privileged label values, mint pairing keys, and
register on-premise workloads (one at a time or from a CMDB export). Every action is audited."""

from __future__ import annotations

from typing import Annotated

from pydantic import AfterValidator, BaseModel, ConfigDict, Field, field_validator

from ringfence.cmdb import parse_ips, valid_workload_id
from ringfence.enums import Mode
from ringfence.model import Workload
from ringfence.policy import file_name_problems
from ringfence.textsafe import unsafe_char

MAX_CMDB_BYTES = 8 * 1024 * 1024


class _Body(BaseModel):
    model_config = ConfigDict(extra="forbid")


def _one_line(v: str) -> str:
    # kept in the audit log and shown by `ringfence audit list`: a newline would forge a record there
    bad = unsafe_char(v)
    if bad is not None:
        raise ValueError(f"holds the control character {bad}: one line of plain text")
    return v


Text = Annotated[str, AfterValidator(_one_line)]
"""Free text an operator gives (a reason, a name, a tag): no control characters, no line breaks."""


class Reason(_Body):
    reason: Text = Field(
        "", max_length=2048, description="why: kept in the audit log (one line: no control characters)"
    )


class AgentKeyResetRequest(Reason):
    next_agent_key: str | None = Field(
        None,
        pattern=r"^[0-9a-f]{64}$",
        description=(
            "the fingerprint (SHA-256, 64 hex digits) of the reinstalled agent's new key, read on the host "
            "(`ringfence-agent status`, `agent_key_fingerprint`): only that key may bind next. Without it, "
            "the first enrollment that proves the workload's identity binds its key"
        ),
    )


class ProvisionRequest(Reason):
    files: dict[str, str] = Field(
        description="policy files: name → YAML text. A name is a relative path of segments of letters, digits, "
        "_ . - (none starting with a dot) ending .yaml or .yml, e.g. `boundaries.yaml`, `apps/ordering.yaml`; "
        "no two may differ only in case",
        min_length=1,
    )

    @field_validator("files")
    @classmethod
    def _names(cls, files: dict[str, str]) -> dict[str, str]:
        problems = file_name_problems(files)
        if problems:
            raise ValueError("; ".join(problems))
        return files


class ModeRequest(Reason):
    mode: Mode | None = Field(description="the operator's mode for the workload; null: the policy's")


class BindLabelsRequest(_Body):
    labels: dict[Text, Text] = Field(
        min_length=1,
        max_length=64,
        description="the privileged values to grant, dimension → value (each one the policy lists under "
        "`privileged:`); merged into the workload's grants, a dimension's earlier grant replaced",
    )
    reason: Text = Field(
        max_length=2048,
        description="why (required, not blank): kept in the audit log (one line: no control characters)",
    )


class UnbindLabelsRequest(_Body):
    dimensions: list[str] = Field(
        min_length=1,
        max_length=64,
        description="the dimensions whose grants to take back (each one the workload holds a grant of; all or none)",
    )
    reason: Text = Field(
        max_length=2048,
        description="why (required, not blank): kept in the audit log (one line: no control characters)",
    )


class PairingKeyRequest(Reason):
    workload_id: str = Field(description="the registered on-premise workload the key enrolls (and no other)")
    uses: int = Field(1, ge=1, le=10_000, description="enrollments the key allows")
    ttl: int = Field(3600, ge=60, le=30 * 86400, description="seconds until the key expires")


class ProvisionResponse(_Body):
    version: int
    digest: str
    audit_id: str | None = Field(
        description="the version's record; null when the files are the active version's (answered 200): "
        "no new version, its rebuild queued"
    )
    warnings: list[str] = Field(
        default_factory=list,
        description="file:line:column: warning: … — selectors matching no workload, rules that can never match "
        "(never a refusal; audited with the version)",
    )


class SuggestedFlow(_Body):
    src: str = Field(description="the source end: its label set, internet or unknown")
    dst: str
    port: str = Field(description="proto/port")
    decision: str = Field(description="as classified when ingested: blocked, potentially-blocked, allowed")
    rule: str = Field(description="the rule that decided (file:line), or why it is blocked")
    flows: int
    first_seen: float
    last_seen: float
    reported_by: list[str] = Field(
        description="who saw the flows: src (the source's agent), dst (the destination's), vpc (flow logs); "
        "empty: not recorded (a row stored before it was)"
    )
    reporters: list[str] = Field(description="the reporting agents' workloads (at most 8 named)")


class SuggestedRule(_Body):
    name: str
    from_: str = Field(alias="from")
    to: str
    services: list[str]
    same: list[str]
    description: str
    observed: list[SuggestedFlow]


class FlaggedFlow(SuggestedFlow):
    kind: str = Field(description="env-crossing, crown-jewel, from-internet, from-unknown, override-deny, "
                      "unconfirmed (only the destination's agent reported it, of a source running an agent), "
                      "many-ports (more than 32 ports between one rule's ends: port gives the span); "
                      "skipped: to-outside, unlabeled, no-port, allowed-now")  # fmt: skip
    reason: str


class SuggestResponse(_Body):
    app: str
    env: str | None
    file: str = Field(description="the policy file name the suggestion is meant to be saved as")
    ruleset: str
    rows: int = Field(description="flow rows considered")
    rules: list[SuggestedRule]
    pinned: list[SuggestedFlow] = Field(description="flows already allowed, pinned by tests (include_allowed)")
    flagged: list[FlaggedFlow] = Field(
        description="look like lateral movement, or rest on one end's word: not proposed"
    )
    skipped: list[FlaggedFlow] = Field(description="no label-level rule can express them")
    yaml: str = Field(description="the policy file: the rules and the tests pinning every observed flow")
    partial: bool = Field(description="true: flows were left out to keep it bounded (left_out says which)")
    left_out: list[str] = Field(
        description="what was left out past 1,000 tests, per line how many flows and who reported them: the room "
        "is shared among the reporters (each agent's workload; flow logs per sending address, vpc:ADDRESS), each "
        "one's proposed flows before its pinned ones, so each one's flows seen least are left out (narrow it with "
        "min_flows or env)"
    )


class ModeResponse(_Body):
    workload_id: str
    mode: Mode | None
    audit_id: str


class QuarantineResponse(_Body):
    workload_id: str
    quarantined: bool
    audit_id: str


class BindLabelsResponse(_Body):
    workload_id: str
    label_grants: dict[str, str] = Field(description="every privileged value the workload is now granted")
    labels: dict[str, str] = Field(description="the labels in force after the binding (compute is queued)")
    held: bool = Field(description="a move into a privileged value this binding did not grant is still held")
    audit_id: str


class UnbindLabelsResponse(_Body):
    workload_id: str
    revoked: dict[str, str] = Field(description="the grants taken back, dimension → value")
    label_grants: dict[str, str] = Field(description="every privileged value the workload is still granted")
    labels: dict[str, str] = Field(
        description="the labels in force after the revocation (compute is queued): a revoked value the tags "
        "still ask for is held, its dimension unset"
    )
    held: bool = Field(description="a move into a privileged value is held (a revoked one among them)")
    audit_id: str


class AgentKeyResetResponse(_Body):
    workload_id: str
    agent_key_dropped: str | None = Field(description="the key id of the agent key unbound; null: none was bound")
    token_revoked: bool = Field(description="an active access token was revoked")
    pairing_keys_revoked: int = Field(description="pairing keys of the workload with uses left, now revoked")
    next_agent_key: str | None = Field(
        description="the fingerprint of the only key the next enrollment may bind; null: any"
    )
    audit_id: str


class PairingKeysRevokedResponse(_Body):
    workload_id: str
    pairing_keys_revoked: int = Field(description="pairing keys of the workload with uses left, now revoked")
    audit_id: str


class PairingKeyResponse(_Body):
    pairing_key: str = Field(description="shown once; only its SHA-256 is stored")
    workload_id: str
    uses: int
    expires_in: int
    audit_id: str


class OnPremWorkload(_Body):
    """One on-premise workload as an operator registers it."""

    id: str = Field(description="the workload's id (letters, digits, _ . : -); its agent enrolls as this id")
    ips: list[str] = Field(min_length=1, description="the workload's addresses")
    name: Text | None = None
    site: Text | None = Field(None, description="the data centre or site (a label may derive from it)")
    zone: Text | None = None
    tags: dict[Text, Text] = Field(default_factory=dict, description="attributes mapped to labels by the policy")
    labels: dict[Text, Text] = Field(default_factory=dict, description="labels given directly")

    @field_validator("id")
    @classmethod
    def _id(cls, wid: str) -> str:
        problem = valid_workload_id(wid)
        if problem:
            raise ValueError(problem)
        return wid

    @field_validator("ips")
    @classmethod
    def _ips(cls, ips: list[str]) -> list[str]:
        return [a for ip in ips for a in parse_ips(ip)]

    def workload(self) -> Workload:
        return Workload(
            id=self.id,
            ips=self.ips,
            name=self.name,
            site=self.site,
            zone=self.zone,
            tags=self.tags,
            labels=self.labels,
            cloud="onprem",
        )


class RegisterWorkloadRequest(OnPremWorkload, Reason):
    strict: bool = Field(
        False,
        description="refuse (400, nothing written) when the data has a label problem (a value the policy does not "
        "allow, a required label missing); by default registered all the same and answered under `problems`",
    )


class CmdbImportRequest(Reason):
    csv: str = Field(max_length=MAX_CMDB_BYTES, description="the CMDB export: CSV with a header row (id, ips, …)")
    source: Text = Field("cmdb.csv", max_length=512, description="the file's name, used in error locations")
    strict: bool = Field(
        False,
        description="refuse (400, nothing written) when the data has a label problem (a value the policy does not "
        "allow, a required label missing); by default registered all the same and answered under `problems`",
    )


class RegisterWorkloadResponse(_Body):
    workload_id: str
    created: bool
    audit_id: str
    held: dict[str, str] | None = Field(
        None,
        description="privileged label values (dimension → value) the tags set but the caller may not bind: held, "
        "the previous labels stay in force until a policy author binds them (less any privileged value when the "
        "registration gives a privileged workload a new address); absent when none",
    )
    operator_cleared: dict[str, str | bool] | None = Field(
        None,
        description="a deregistered id registered again: what an operator had set on its old host that this "
        'write cleared (`{"mode": "idle", "quarantined": true}`; the audit record names it too); absent when none',
    )
    problems: list[str] | None = Field(
        None,
        description="the active policy's label problems with this workload's data (registered all the same); "
        "absent when none",
    )


class CmdbImportResponse(_Body):
    imported: int
    created: int
    updated: int
    audit_id: str
    held: dict[str, dict[str, str]] | None = Field(
        None, description="workload id → the privileged values held for it (as for one registration); absent when none"
    )
    operator_cleared: dict[str, dict[str, str | bool]] | None = Field(
        None,
        description="workload id → what an operator had set on its old host that the import cleared (as for one "
        "registration); absent when none",
    )
    problems: dict[str, list[str]] | None = Field(
        None,
        description="workload id → the active policy's label problems with its row (imported all the same); "
        "absent when none",
    )


class DeregisterResponse(_Body):
    workload_id: str
    audit_id: str
