"""The agent ↔ control-plane API contract: request and response bodies (see ``docs/agent-api.md``).

The server-side schema of every control plane (API Gateway functions, ``ringfence serve``). The
agent builds its bodies with :mod:`ringfence.agentwire` (plain dataclasses, no pydantic); tests
check that they validate against these models.
"""

from __future__ import annotations

import ipaddress
import logging
import time
from typing import Annotated, Literal

from pydantic import AfterValidator, BaseModel, ConfigDict, Field, field_validator, model_validator

from ringfence.agentwire import AGENT_VERSION_PATTERN, MAX_AGENT_VERSION
from ringfence.agentwire import API_PREFIX as API_PREFIX
from ringfence.agentwire import MAX_REPORT_BYTES as MAX_REPORT_BYTES
from ringfence.agentwire import MAX_REPORT_RECORDS as MAX_REPORT_RECORDS
from ringfence.bundlewire import BundleError, ed25519_pem_of_raw, ed25519_public_from_one_pem
from ringfence.cmdb import WORKLOAD_ID
from ringfence.enums import Mode

log = logging.getLogger(__name__)


class _Body(BaseModel):
    model_config = ConfigDict(extra="forbid")


class NonceResponse(_Body):
    nonce: str
    expires_in: int = Field(description="seconds the nonce stays valid; each nonce is single-use")


class EnrollRequest(_Body):
    method: Literal["aws-iid", "aws-sts", "azure-attested", "gcp-jwt", "pairing"]
    nonce: str = Field(description="from GET /v1/nonce; single use")
    workload_id: str | None = Field(
        None,
        description="required for pairing; derived from the proof otherwise. 1-128 of A-Z a-z 0-9 _ . : -, "
        "starting with a letter or digit (as every workload id: an EC2 instance id, an Azure vmId, a GCP "
        "instance id, a registered on-premise id)",
    )
    # aws-iid: the instance identity document and its PKCS7/RSA-SHA256 signature from IMDS;
    # gcp-jwt: the instance identity token (audience the control plane's, format=full)
    document: str | None = None
    document_signature: str | None = None
    # aws-sts: a presigned sts:GetCallerIdentity request the server replays
    sts_url: str | None = None
    sts_headers: dict[str, str] | None = None
    # pairing (on-premise): a key with a use limit and an expiry, issued by an operator
    pairing_key: str | None = None
    agent_key: str | None = Field(
        None,
        description="the agent's own Ed25519 public key (PEM); required for every method: the first enrollment "
        "binds it to the workload, and token refresh and re-enrollment are signatures by it",
    )
    agent_signature: str | None = Field(
        None, description="base64 Ed25519 signature by agent_key over the proof message (purpose enroll)"
    )

    @field_validator("workload_id")
    @classmethod
    def _workload_id(cls, v: str | None) -> str | None:
        """Refused (422) before anything reads or logs it: the caller is not authenticated yet, and
        the id is named in the refusal's log line (a newline in it would forge a line)."""
        if v is not None and not WORKLOAD_ID.fullmatch(v):
            raise ValueError("must be 1-128 of A-Z a-z 0-9 _ . : - and start with a letter or digit")
        return v

    @field_validator("agent_key")
    @classmethod
    def _one_key(cls, v: str | None) -> str | None:
        """One text per key from here on (the bound key, its id, the signature check all read it):
        exactly one Ed25519 ``PUBLIC KEY`` block, written back canonically."""
        if v is None:
            return None
        try:
            return ed25519_pem_of_raw(ed25519_public_from_one_pem(v.encode())).decode()
        except (BundleError, UnicodeEncodeError) as exc:
            raise ValueError(f"agent_key {exc}") from None


class EnrollResponse(_Body):
    workload_id: str
    token: str = Field(
        description="bearer access token; authorises this workload's endpoints only; the workload's one "
        "active token (an earlier one is revoked)"
    )
    expires_in: int = Field(description="seconds the token is valid; renew before with POST /v1/agents/{id}/token")
    public_key_pem: str = Field(description="the bundle signing key, for agents that did not pin one at install")


class TokenRequest(_Body):
    nonce: str | None = Field(
        None, description="from GET /v1/nonce; single use. Either nonce or time (with the current bearer token)"
    )
    time: int | None = Field(
        None,
        ge=0,
        lt=2**53,
        description="the agent's clock (epoch seconds), for a renewal without a nonce: the request carries the "
        "workload's current, still valid token as `Authorization: Bearer`; within 300 s of the server's clock",
    )
    signature: str = Field(
        description="base64 Ed25519 signature by the workload's bound agent key over the proof message: purpose "
        "token over the nonce, or refresh-by-token over the current token's SHA-256 and the time"
    )

    @model_validator(mode="after")
    def _one_proof(self) -> TokenRequest:
        if (self.nonce is None) == (self.time is None):
            raise ValueError("give either nonce or time (a renewal by the current token), not both")
        return self


class TokenResponse(_Body):
    workload_id: str
    token: str = Field(description="the new access token; the previous one is revoked")
    expires_in: int


class Heartbeat(_Body):
    applied_version: int | None = Field(
        ge=0,
        le=2**53,  # as MAX_COUNT: exact as a float and a DynamoDB number; a longer one is no version
        description="the bundle version the agent enforces (null: none yet); never above what was published",
    )
    mode: Mode | None
    healthy: bool = True
    message: str = Field("", max_length=1024)
    counters: dict[str, int] = Field(default_factory=dict)
    kernel_digest: str | None = Field(
        None,
        pattern=r"^[0-9a-f]{64}$",
        description="sha256 of what the kernel holds of the applied bundle, read back after applying "
        "(ringfence.enforced); compared with the published bundle's (GET /admin/findings)",
    )
    agent_version: str | None = Field(
        None,
        max_length=MAX_AGENT_VERSION,
        pattern=AGENT_VERSION_PATTERN,
        description="the agent's installed version, PEP 440 or semver (0.1.0+3f2a9c1b0d4e: the artifact's "
        "<release>+<source digest>); null or absent: unknown, or an agent older than the field. Shown per "
        "workload in GET /admin/findings (agents). A control plane older than the field refuses it (422 "
        "naming body.agent_version): the agent sends that heartbeat again without it",
    )


class HeartbeatResponse(_Body):
    latest_version: int | None = Field(description="the newest bundle version for this workload")


MAX_TIME = 4_102_444_800.0  # 2100-01-01T00:00Z: a report's times are epoch seconds below it
MAX_COUNT = 2**53  # packets, bytes and folded counts: exact as a float and in DynamoDB
MAX_SPAN = 86400.0  # a flow record's end is at most this long after its start (as a VPC Flow Log line's)
MAX_AHEAD = 300.0  # a record's time is at most this far ahead of the control plane's clock (the agent's skew)


def _address(v: str) -> str:
    """An IPv4 or IPv6 address (no zone index), in its one canonical spelling (``FD00::31`` and
    ``fd00:0:0:0:0:0:0:31`` are ``fd00::31``, as inventory addresses are written)."""
    if "%" in v:
        raise ValueError("an address with a zone index")
    return ipaddress.ip_address(v).compressed


Address = Annotated[str, Field(max_length=45, description="an IPv4 or IPv6 address"), AfterValidator(_address)]
Time = Annotated[float, Field(ge=0, le=MAX_TIME, allow_inf_nan=False, description="epoch seconds")]
Port = Annotated[int, Field(ge=0, le=65535)]
Count = Annotated[int, Field(ge=0, le=MAX_COUNT)]


class FlowRecord(_Body):
    start: Time
    end: Time
    src: Address
    dst: Address
    proto: Literal["tcp", "udp", "icmp", "icmpv6", "other"]
    sport: Port | None = None
    dport: Port | None = None
    packets: Count = 0
    bytes: Count = 0
    direction: Literal["inbound", "outbound"]

    @model_validator(mode="after")
    def _span(self) -> FlowRecord:
        if not self.start <= self.end <= self.start + MAX_SPAN:
            raise ValueError(f"end must be from start to {MAX_SPAN:.0f} s after it")
        return self


class DropEvent(_Body):
    time: Time
    direction: Literal["inbound", "outbound"]
    src: Address
    dst: Address
    proto: Literal["tcp", "udp", "icmp", "icmpv6", "other"]
    sport: Port | None = Field(
        None, description="source port; null without ports, or when folded drops came from several (retries)"
    )
    dport: Port | None = None
    rule_id: str | None = Field(
        None, max_length=256, description="the deny rule that matched; null for the default action"
    )
    action: Literal["drop", "would-drop"]
    count: int = Field(1, ge=1, le=MAX_COUNT, description="identical events folded together")


class ReportBatch(_Body):
    flows: list[FlowRecord] = Field(default_factory=list, max_length=MAX_REPORT_RECORDS)
    drops: list[DropEvent] = Field(default_factory=list, max_length=MAX_REPORT_RECORDS)
    dropped_records: int = Field(0, ge=0, description="records the agent discarded because its buffer was full")

    @model_validator(mode="after")
    def _clock(self) -> ReportBatch:
        """A record dated more than ``MAX_AHEAD`` s after this clock: the agent's clock runs
        ahead (its flows would be dated where they were not seen). The batch is refused naming
        the skew, so the agent logs it, rather than accepted and its records not taken."""
        times = [t for f in self.flows for t in (f.start, f.end)] + [d.time for d in self.drops]
        ahead = max(times, default=0.0) - time.time()
        if ahead > MAX_AHEAD:
            log.warning("a report batch's newest record is %.0f s ahead of this clock: refused", ahead)
            raise ValueError(
                f"the newest record is {ahead:.0f} s ahead of the control plane's clock (at most {MAX_AHEAD:.0f} s): "
                "the agent's clock runs fast; set it right (NTP), the batch is not kept"
            )
        return self


class ReportsResponse(_Body):
    accepted: int = Field(description="flow and drop records accepted")


class DeltasResponse(_Body):
    bundle_version: int = Field(description="the newest bundle version; fetch it if deltas cannot bridge")
    deltas: list[dict[str, object]] = Field(description="signed ringfence.delta/v2 documents, oldest first")


class WaitResponse(_Body):
    latest_version: int | None = Field(
        description="the newest bundle version for this workload (null: none published yet); newer than the "
        "version asked about, unless the wait timed out"
    )
    deltas: DeltasResponse | None = Field(
        None,
        description="with `deltas=true`, when a newer version exists and the deltas since `version` bridge to "
        "it: what `GET …/deltas?since=<version>` answers (the agent then needs no second request); beside a "
        "`bundle`, the deltas since that bundle",
    )
    bundle: str | None = Field(
        None,
        description="with `bundle=true`, when deltas do not bridge and the stored bundle is newer than `version`: "
        "the bundle document, byte for byte as `GET …/bundle` answers it, as a string",
    )
    etag: str | None = Field(None, description="the bundle's ETag (send it as If-None-Match later)")


class ErrorBody(_Body):
    error: str
    detail: str = ""
