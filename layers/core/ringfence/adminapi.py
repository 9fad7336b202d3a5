"""The admin API's request bodies (server side, pydantic): what an operator sends to provision
policy, set modes, quarantine and release, and mint pairing keys. Every action is audited."""

from __future__ import annotations

from pydantic import BaseModel, ConfigDict, Field

from ringfence.enums import Mode


class _Body(BaseModel):
    model_config = ConfigDict(extra="forbid")


class Reason(_Body):
    reason: str = Field("", max_length=2048, description="why: kept in the audit log")


class ProvisionRequest(Reason):
    files: dict[str, str] = Field(description="policy files: name → YAML text", min_length=1)


class ModeRequest(Reason):
    mode: Mode | None = Field(description="the operator's mode for the workload; null: the policy's")


class PairingKeyRequest(Reason):
    workload_id: str | None = Field(None, description="the workload the key enrolls; null: any")
    uses: int = Field(1, ge=1, le=10_000, description="enrollments the key allows")
    ttl: int = Field(3600, ge=60, le=30 * 86400, description="seconds until the key expires")


class ProvisionResponse(_Body):
    version: int
    digest: str
    audit_id: str


class ModeResponse(_Body):
    workload_id: str
    mode: Mode | None
    audit_id: str


class QuarantineResponse(_Body):
    workload_id: str
    quarantined: bool
    audit_id: str


class PairingKeyResponse(_Body):
    pairing_key: str = Field(description="shown once; only its SHA-256 is stored")
    uses: int
    expires_in: int
    audit_id: str
