"""The agent bundle contract: format, canonical bytes, Ed25519 signatures, set deltas.

Documented in ``docs/bundle.md``; golden files under ``tests/golden/`` are shared by the engine's
and the agent's tests. These pydantic models are the engine's and publishers' view and the source
of the JSON Schema; the agent reads the same documents with :mod:`ringfence.bundlewire` (no
pydantic). Canonical bytes, signature checks, key ids and acceptance rules are defined there once
and used here.

Versions: every change the engine makes gets a new *revision* (a monotonic integer). A bundle's
``version`` is the revision it was rendered at; each set carries the revision it last changed
at. A :class:`SetDelta` moves one set from ``from_version`` to ``to_version``. An agent keeps
the highest revision it has applied and refuses anything older.
"""

from __future__ import annotations

import base64
import json
import time
from pathlib import Path
from typing import Any, Literal, TypeVar, overload

from cryptography.exceptions import UnsupportedAlgorithm
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey, Ed25519PublicKey
from pydantic import BaseModel, ConfigDict, Field, SerializerFunctionWrapHandler, model_serializer, model_validator

from ringfence import bundlewire as wire
from ringfence import durable
from ringfence.addresses import V4, format_prefix, parse_prefix
from ringfence.bundlewire import BUNDLE_FORMAT as BUNDLE_FORMAT
from ringfence.bundlewire import DEFAULT_TTL as DEFAULT_TTL
from ringfence.bundlewire import DELTA_FORMAT as DELTA_FORMAT
from ringfence.bundlewire import BundleError as BundleError
from ringfence.bundlewire import Signer as Signer
from ringfence.bundlewire import service_span as service_span
from ringfence.bundlewire import services_groupable as services_groupable
from ringfence.bundlewire import span_whole as span_whole
from ringfence.bundlewire import spans_groupable as spans_groupable
from ringfence.enums import Mode


class _Doc(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class Signature(_Doc):
    alg: Literal["ed25519"] = "ed25519"
    key_id: str
    value: str  # base64


class ServiceMatch(_Doc):
    proto: Literal["tcp", "udp", "icmp", "icmpv6", "any"]
    ports: tuple[int, int] | None = Field(None, description="inclusive tcp/udp port range; absent = all")
    icmp_type: int | None = Field(None, description="absent = every ICMP type")


class GroupMember(_Doc):
    id: str = Field(description="policy rule id of this member")
    set: str | None = Field(description="address set of the peer; null = any address")
    services: list[ServiceMatch]


class BundleRule(_Doc):
    id: str = Field(description="policy rule id, reported with drops and flows (a group: its first member's)")
    action: Literal["allow", "deny", "override-deny"]
    set: str | None = Field(description="address set of the peer; null = any address (a group: null)")
    services: list[ServiceMatch] = Field(description="a group: empty, its members carry the services")
    members: list[GroupMember] | None = Field(
        None,
        min_length=2,
        description="a grouped allow rule: allows each member's peers on that member's services, and nothing "
        "across members; absent on a plain rule",
    )

    @model_validator(mode="after")
    def _grouped_rule(self) -> BundleRule:
        if self.members is None:
            return self
        if self.action != "allow" or self.set is not None or self.services:
            raise ValueError(wire.GROUP_ERROR)
        if not services_groupable(s for m in self.members for s in m.services):
            raise ValueError(wire.GROUP_SERVICES_ERROR)
        return self

    @model_serializer(mode="wrap")
    def _omit_absent_members(self, handler: SerializerFunctionWrapHandler) -> dict[str, Any]:
        # a plain rule keeps exactly its pre-group encoding (and canonical bytes)
        out: dict[str, Any] = handler(self)
        if out.get("members", 0) is None:
            del out["members"]
        return out

    def parts(self) -> list[GroupMember]:
        """The (id, set, services) this rule allows: its members, or itself."""
        if self.members is not None:
            return self.members
        return [GroupMember(id=self.id, set=self.set, services=self.services)]


class AddressSetDoc(_Doc):
    version: int = Field(description="revision at which this set's content last changed")
    v4: list[str] = Field(default_factory=list, description="canonical CIDR cover, sorted")
    v6: list[str] = Field(default_factory=list)


class FailsafeDoc(_Doc):
    admin_cidrs: list[str] = Field(default_factory=list)
    admin_ports: list[ServiceMatch] = Field(default_factory=list)
    dns_resolvers: list[str] = Field(default_factory=list)
    control_plane: list[str] = Field(default_factory=list)


class Bundle(_Doc):
    """Everything one agent needs. Rules are ordered: override-deny, allow, deny; then the default."""

    format: Literal["ringfence.bundle/v2"] = "ringfence.bundle/v2"
    workload_id: str
    version: int
    policy_version: int
    mode: Mode
    quarantined: bool = False
    sets: dict[str, AddressSetDoc] = Field(default_factory=dict)
    inbound: list[BundleRule] = Field(default_factory=list)
    outbound: list[BundleRule] = Field(default_factory=list)
    failsafes: FailsafeDoc = Field(default_factory=FailsafeDoc)
    expires_at: int | None = Field(
        None, description="unix seconds after which agents refuse to apply this bundle (set when signed)"
    )
    signature: Signature | None = None

    def content(self) -> dict[str, Any]:
        """What decides enforcement (no versions, expiry or signature): equal content ⇒ equal firewall."""
        doc = self.model_dump(mode="json", exclude={"signature", "version", "expires_at"})
        for s in doc["sets"].values():
            s.pop("version")
        return doc


class SetDelta(_Doc):
    format: Literal["ringfence.delta/v2"] = "ringfence.delta/v2"
    set: str
    from_version: int
    to_version: int
    add: list[str] = Field(default_factory=list, description="CIDR elements to add")
    remove: list[str] = Field(default_factory=list, description="CIDR elements to delete")
    signature: Signature | None = None


Document = Bundle | SetDelta
D = TypeVar("D", Bundle, SetDelta)


def canonical_bytes(doc: Document) -> bytes:
    """The signed bytes: sorted-key compact JSON without the signature, prefixed by the format."""
    return wire.canonical_message(doc.format, doc.model_dump(mode="json", exclude={"signature"}))


@overload
def to_wire(doc: Bundle) -> wire.Bundle: ...
@overload
def to_wire(doc: SetDelta) -> wire.SetDelta: ...
def to_wire(doc: Document) -> wire.Document:
    """The same document as the agent's plain dataclasses (:mod:`ringfence.bundlewire`)."""
    data = doc.model_dump(mode="json")
    return wire.bundle_from_json(data) if isinstance(doc, Bundle) else wire.delta_from_json(data)


# --- keys --------------------------------------------------------------------------------------


def key_id_of(public: Ed25519PublicKey) -> str:
    return wire.key_id_of_raw(public.public_bytes(serialization.Encoding.Raw, serialization.PublicFormat.Raw))


class SigningKey:
    def __init__(self, private: Ed25519PrivateKey) -> None:
        self._private = private
        self._key_id = key_id_of(private.public_key())

    @classmethod
    def generate(cls) -> SigningKey:
        return cls(Ed25519PrivateKey.generate())

    @classmethod
    def from_pem(cls, data: bytes) -> SigningKey:
        key = serialization.load_pem_private_key(data, password=None)
        if not isinstance(key, Ed25519PrivateKey):
            raise BundleError("signing key must be an Ed25519 private key (PKCS#8 PEM)")
        return cls(key)

    @classmethod
    def from_file(cls, path: Path) -> SigningKey:
        """The key in ``path``; one that cannot be read, or holds no such key, is a
        :class:`BundleError` naming the path (never cryptography's message alone)."""
        try:
            data = path.read_bytes()
        except OSError as exc:
            raise BundleError(f"{path}: {exc.strerror}") from None
        return cls.from_pem_file(data, path)

    @classmethod
    def from_pem_file(cls, data: bytes, path: Path) -> SigningKey:
        """:meth:`from_pem` of ``data`` read from ``path``, its refusal naming the path."""
        if not data.strip():
            raise BundleError(f"{path}: an empty file ({len(data)} bytes), not a signing key")
        try:
            return cls.from_pem(data)
        except BundleError as exc:
            raise BundleError(f"{path}: {exc}") from None
        except (ValueError, TypeError, UnsupportedAlgorithm):  # malformed PEM, an encrypted key, another kind
            raise BundleError(f"{path}: not an unencrypted Ed25519 private key (PKCS#8 PEM)") from None

    @property
    def key_id(self) -> str:
        return self._key_id

    def sign(self, message: bytes) -> bytes:
        return self._private.sign(message)

    def private_pem(self) -> bytes:
        return self._private.private_bytes(
            serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
        )

    def public_pem(self) -> bytes:
        return self._private.public_key().public_bytes(
            serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo
        )

    def write(self, private_path: Path, public_path: Path) -> None:
        """Both files, each written whole or not at all (a temporary file, fsynced, renamed into
        place, the directory fsynced): a crash or power loss never leaves an empty or partial key.
        The public key first: a private key present is always one whose public key is written."""
        durable.replace(public_path, self.public_pem(), 0o644)
        durable.replace(private_path, self.private_pem(), 0o600)

    def write_at(self, dir_fd: int, private_name: str, public_name: str) -> None:
        """:meth:`write` into the directory open as ``dir_fd`` (``keygen --out``: the directory
        checked on that descriptor is the one written, never looked up by path again)."""
        durable.replace_at(dir_fd, public_name, self.public_pem(), 0o644)
        durable.replace_at(dir_fd, private_name, self.private_pem(), 0o600)

    def write_public(self, public_path: Path) -> None:
        """The public key alone, written whole or not at all as :meth:`write` writes it."""
        durable.replace(public_path, self.public_pem(), 0o644)


def manifest(doc: Document, key_id: str) -> bytes:
    """The signed bytes of ``doc`` for ``key_id``: :func:`ringfence.bundlewire.manifest_message`."""
    if isinstance(doc, Bundle):
        subject: dict[str, Any] = {"workload_id": doc.workload_id, "version": doc.version, "expires_at": doc.expires_at}
    else:
        subject = {"set": doc.set, "from_version": doc.from_version, "to_version": doc.to_version}
    return wire.manifest_message(doc.format, key_id, subject, canonical_bytes(doc))


class Verifier(wire.Verifier):
    """The pinned key set (see :class:`ringfence.bundlewire.Verifier`), also for pydantic documents."""

    def verify(self, doc: Document | wire.Document) -> None:
        if isinstance(doc, Bundle | SetDelta):
            what = f"bundle for {doc.workload_id!r}" if isinstance(doc, Bundle) else f"delta for set {doc.set!r}"
            self.verify_signed(what, doc.signature, lambda key_id: manifest(doc, key_id))
        else:
            super().verify(doc)


def sign(doc: D, signer: Signer, *, expires_at: int | None = None) -> D:
    """``doc`` signed by ``signer`` (only the compute side signs). A bundle gets ``expires_at``
    (default: the one it carries, else ``DEFAULT_TTL`` seconds from now)."""
    wire.check_signer(signer)
    if isinstance(doc, Bundle):
        exp = expires_at if expires_at is not None else doc.expires_at
        doc = doc.model_copy(update={"expires_at": exp if exp is not None else int(time.time()) + DEFAULT_TTL})
    raw = signer.sign(manifest(doc, signer.key_id))
    sig = Signature(key_id=signer.key_id, value=base64.b64encode(raw).decode())
    return doc.model_copy(update={"signature": sig})


def fold_deltas(doc: Bundle, deltas: list[SetDelta]) -> Bundle:
    """``doc`` with set deltas folded in (oldest first; each onto the set version it was cut
    from, others skipped): what an agent enforces after applying them, as an unsigned bundle at
    the newest version reached. For inspection and tests; agents fold their own
    (``ringfence_agent.core.effective_bundle``) after verifying each delta."""
    sets = dict(doc.sets)
    version = doc.version
    for d in deltas:
        s = sets.get(d.set)
        if s is None or s.version != d.from_version:
            continue
        elems = (set(s.v4) | set(s.v6)) - set(d.remove) | set(d.add)
        ordered = sorted(parse_prefix(e) for e in elems)
        sets[d.set] = AddressSetDoc(
            version=d.to_version,
            v4=[format_prefix(p) for p in ordered if p[0] == V4],
            v6=[format_prefix(p) for p in ordered if p[0] != V4],
        )
        version = max(version, d.to_version)
    return doc.model_copy(update={"sets": sets, "version": version, "signature": None})


def dumps(doc: Document) -> str:
    """Stable, human-diffable JSON (the on-disk and on-wire form)."""
    return json.dumps(doc.model_dump(mode="json", exclude_none=False), indent=1, sort_keys=True) + "\n"


def load_bundle(text: str | bytes) -> Bundle:
    # strict: "version": "1" is refused rather than coerced, so one document has one encoding
    try:
        return Bundle.model_validate_json(text, strict=True)
    except ValueError as exc:
        raise BundleError(f"not a valid {BUNDLE_FORMAT} document: {_first_error(exc)}") from None


def load_delta(text: str | bytes) -> SetDelta:
    try:
        return SetDelta.model_validate_json(text, strict=True)
    except ValueError as exc:
        raise BundleError(f"not a valid {DELTA_FORMAT} document: {_first_error(exc)}") from None


def _first_error(exc: ValueError) -> str:
    errors = getattr(exc, "errors", None)
    if callable(errors):
        first = errors()[0]
        return f"{'.'.join(str(p) for p in first['loc'])}: {first['msg']}"
    return str(exc)


def bundle_schema() -> dict[str, Any]:
    schema = Bundle.model_json_schema()
    schema["$schema"] = "https://json-schema.org/draft/2020-12/schema"
    schema["title"] = "Ringfence agent bundle"
    return schema


def delta_schema() -> dict[str, Any]:
    schema = SetDelta.model_json_schema()
    schema["$schema"] = "https://json-schema.org/draft/2020-12/schema"
    schema["title"] = "Ringfence set delta"
    return schema


def check_acceptable(
    new: Bundle, workload_id: str, applied_revision: int | None, applied: Bundle | None = None
) -> None:
    """:func:`ringfence.bundlewire.check_acceptable` (the agent's rules) for pydantic documents."""
    wire.check_acceptable(to_wire(new), workload_id, applied_revision, None if applied is None else to_wire(applied))
