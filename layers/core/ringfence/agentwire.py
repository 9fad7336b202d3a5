"""The agent's side of the agent API (``docs/agent-api.md``) without pydantic.

What the agent sends, as plain dataclasses whose JSON form is what :mod:`ringfence.agentapi`'s
models (the server-side schema, pydantic) validate — ``tests/test_agentwire.py`` checks every
body against them — and small readers for the answers the agent uses. The agent imports this
module and not :mod:`ringfence.agentapi`, to keep pydantic out of its memory.
"""

from __future__ import annotations

import hashlib
import json
import re
from dataclasses import asdict, dataclass, field
from typing import Any, Literal

from ringfence.enums import Mode

API_PREFIX = "/v1"
# Every route of the agent API the agent calls: name → (method, path below API_PREFIX, ``{id}``
# the workload id). The agent builds its requests from this table, and the contract test checks
# that each is routed by every control plane (template.yaml, infra/, ``ringfence serve``).
ROUTES: dict[str, tuple[str, str]] = {
    "nonce": ("GET", "/nonce"),
    "enroll": ("POST", "/enroll"),
    "token": ("POST", "/agents/{id}/token"),
    "bundle": ("GET", "/agents/{id}/bundle"),
    "deltas": ("GET", "/agents/{id}/deltas"),
    "wait": ("GET", "/agents/{id}/wait"),
    "heartbeat": ("POST", "/agents/{id}/heartbeat"),
    "reports": ("POST", "/agents/{id}/reports"),
    # the agent artifact (wheel, its .sha256, install.sh) as ``ringfence publish-agent`` stored it;
    # no token: hosts fetch it before they have one, and install.sh checks the digest it was given
    "artifact": ("GET", "/agent/{name}"),
}
MAX_REPORT_BYTES = 256 * 1024
MAX_REPORT_RECORDS = 2000

# The agent's version in a heartbeat: a PEP 440 or semver string (``0.1.0+3f2a9c1b0d4e``, the
# artifact's ``<release>+<source digest>``; ``1.2.3-rc.1+build.5``; ``1.0rc1``; ``2!1.0.post1``),
# at most MAX_AGENT_VERSION characters. Every repeated group starts with a separator, so no input
# backtracks more than polynomially (the agent checks with ``re``; pydantic with its linear engine).
AGENT_VERSION_PATTERN = (
    r"^v?[0-9]+(?:[.!][0-9]+)*[0-9A-Za-z]*(?:[-_.][0-9A-Za-z]+)*(?:\+[0-9A-Za-z]+(?:[-_.][0-9A-Za-z]+)*)?$"
)
MAX_AGENT_VERSION = 64


def agent_version_ok(v: str) -> bool:
    """Whether ``v`` is a version the agent API takes (AGENT_VERSION_PATTERN, MAX_AGENT_VERSION)."""
    return len(v) <= MAX_AGENT_VERSION and re.fullmatch(AGENT_VERSION_PATTERN, v) is not None


Direction = Literal["inbound", "outbound"]
ReportProto = Literal["tcp", "udp", "icmp", "icmpv6", "other"]


class ResponseError(ValueError):
    """An answer from the control plane that is not what the API promises."""


PROOF_FORMAT = "ringfence.agent-proof/v1"


def proof_message(purpose: str, workload_id: str, nonce: str) -> bytes:
    """What the agent signs with its own key (Ed25519) to enroll or to get a fresh token: bound to
    the purpose, the workload and the server's single-use nonce, so no signature is good twice."""
    return f"{PROOF_FORMAT}\n{purpose}\n{workload_id}\n{nonce}".encode()


# the purpose of a renewal without a server nonce: a token still valid, the agent key's signature
# over that token's SHA-256 and the agent's clock (token_proof_message)
REFRESH_BY_TOKEN = "refresh-by-token"  # noqa: S105 (a proof purpose, no secret)


def token_proof_message(workload_id: str, token: str, at: int) -> bytes:
    """What the agent signs to renew a token that is still valid without asking for a nonce:
    bound to the purpose, the workload, the current token (its SHA-256, hex) and the time (epoch
    seconds), so that it renews that token once and only near ``at``. The control plane checks
    the time against its clock and claims each proof once."""
    digest = hashlib.sha256(token.encode()).hexdigest()
    return f"{PROOF_FORMAT}\n{REFRESH_BY_TOKEN}\n{workload_id}\n{digest}\n{at}".encode()


def imds_nonce(server_nonce: str) -> str:
    """The nonce an Azure agent asks IMDS to put in its attested document for the server's nonce:
    IMDS takes at most 32 alphanumerics, a server nonce may hold ``-`` and ``_``; 32 hex digits of
    its SHA-256 bind the document to that one enrollment (azure-attested)."""
    return hashlib.sha256(server_nonce.encode()).hexdigest()[:32]


@dataclass(frozen=True, slots=True, kw_only=True)
class EnrollRequest:
    method: Literal["aws-iid", "aws-sts", "azure-attested", "gcp-jwt", "pairing"]
    nonce: str
    workload_id: str | None = None
    document: str | None = None
    document_signature: str | None = None
    sts_url: str | None = None
    sts_headers: dict[str, str] | None = None
    pairing_key: str | None = None
    agent_key: str | None = None  # the agent's Ed25519 public key (PEM), bound to the workload
    agent_signature: str | None = None  # base64 Ed25519 over proof_message("enroll", workload_id, nonce)

    def to_json(self) -> dict[str, Any]:
        return {k: v for k, v in asdict(self).items() if v is not None}


@dataclass(frozen=True, slots=True, kw_only=True)
class TokenRequest:
    signature: str  # base64 Ed25519 by the bound agent key over one of the two proofs below
    nonce: str | None = None  # proof_message("token", workload_id, nonce)
    # or, with the current token as the bearer: token_proof_message(workload_id, token, time)
    time: int | None = None

    def to_json(self) -> dict[str, Any]:
        return {k: v for k, v in asdict(self).items() if v is not None}


@dataclass(frozen=True, slots=True, kw_only=True)
class Heartbeat:
    applied_version: int | None
    mode: Mode | None
    healthy: bool = True
    message: str = ""  # at most 1,024 characters
    counters: dict[str, int] = field(default_factory=dict)
    # the enforced-policy digest of what the kernel holds (ringfence.enforced); None: cannot tell
    kernel_digest: str | None = None
    # the agent's installed version (AGENT_VERSION_PATTERN); None: unknown (run from a checkout)
    agent_version: str | None = None

    def to_json(self, *, with_agent_version: bool = True) -> dict[str, Any]:
        """``with_agent_version=False``: the body a control plane older than the field takes (it
        refuses unknown fields, 422)."""
        out: dict[str, Any] = {
            "applied_version": self.applied_version,
            "mode": None if self.mode is None else self.mode.value,
            "healthy": self.healthy,
            "message": self.message,
            "counters": self.counters,
        }
        if self.kernel_digest is not None:  # only when known: a control plane without drift checks accepts it
            out["kernel_digest"] = self.kernel_digest
        if with_agent_version and self.agent_version is not None:  # as kernel_digest: only when known
            out["agent_version"] = self.agent_version
        return out


@dataclass(frozen=True, slots=True, kw_only=True)
class FlowRecord:
    start: float
    end: float
    src: str
    dst: str
    proto: ReportProto
    sport: int | None = None
    dport: int | None = None
    packets: int = 0
    bytes: int = 0
    direction: Direction


@dataclass(frozen=True, slots=True, kw_only=True)
class DropEvent:
    time: float
    direction: Direction
    src: str
    dst: str
    proto: ReportProto
    sport: int | None = None
    dport: int | None = None
    rule_id: str | None = None  # the deny rule that matched; None for the default action
    action: Literal["drop", "would-drop"]
    count: int = 1  # identical events folded together (≥ 1)


@dataclass(frozen=True, slots=True, kw_only=True)
class ReportBatch:
    flows: list[FlowRecord] = field(default_factory=list)  # at most MAX_REPORT_RECORDS
    drops: list[DropEvent] = field(default_factory=list)  # at most MAX_REPORT_RECORDS
    dropped_records: int = 0  # records the agent discarded because its buffer was full

    def to_json(self) -> dict[str, Any]:
        return {
            "flows": [asdict(f) for f in self.flows],
            "drops": [asdict(d) for d in self.drops],
            "dropped_records": self.dropped_records,
        }

    def dumps(self) -> str:
        return json.dumps(self.to_json(), separators=(",", ":"))

    @classmethod
    def loads(cls, text: str) -> ReportBatch:
        """A batch the agent spooled itself; :class:`ResponseError` when the line is not one."""
        try:
            data = json.loads(text)
            return cls(
                flows=[FlowRecord(**f) for f in data.get("flows", [])],
                drops=[DropEvent(**d) for d in data.get("drops", [])],
                dropped_records=int(data.get("dropped_records", 0)),
            )
        except (ValueError, TypeError, AttributeError) as exc:
            raise ResponseError(f"not a report batch: {exc}") from None


_JSON_TYPES: dict[type, str] = {
    str: "a string",
    int: "an integer",
    bool: "a boolean",
    list: "a list",
    dict: "an object",
}


def read_response(body: bytes, what: str, **fields: type | tuple[type, None]) -> dict[str, Any]:
    """The JSON object of an answer, with ``fields`` present and of their type (``(int, None)``:
    an integer or null). Other fields are left alone: a newer control plane may add some."""
    try:
        data = json.loads(body)
    except ValueError as exc:
        raise ResponseError(f"{what}: not JSON: {exc}") from None
    if type(data) is not dict:
        raise ResponseError(f"{what}: expected a JSON object")
    for name, spec in fields.items():
        kind, nullable = (spec[0], True) if isinstance(spec, tuple) else (spec, False)
        if name not in data:
            raise ResponseError(f"{what}: {name} is missing")
        value = data[name]
        if not (type(value) is kind or (nullable and value is None)):
            raise ResponseError(f"{what}: {name} should be {_JSON_TYPES[kind]}{' or null' if nullable else ''}")
    return data
