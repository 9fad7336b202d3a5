"""The bundle contract as the agent reads it: plain dataclasses, a strict JSON reader, canonical
bytes, Ed25519 verification and the acceptance rules — without pydantic.

The agent's resident memory is mostly what it imports; pydantic and ``cryptography`` cost ~20 MB
the agent does not need (Ed25519 signatures are checked with the OpenSSL the interpreter already
has loaded, see :class:`LibcryptoEd25519`). :mod:`ringfence.bundle` (pydantic) stays
the engine's and publishers' model and the source of the JSON Schema; it builds its canonical
bytes, verification and acceptance rules from this module, so the two cannot drift. The reader
refuses exactly what ``ringfence.bundle.load_bundle`` / ``load_delta`` refuse (strict types, no
extra fields, literals, UTF-8 only); ``tests/test_bundlewire.py`` holds the two to that over
golden files and thousands of mutated documents.
"""

from __future__ import annotations

import base64
import binascii
import ctypes
import functools
import hashlib
import itertools
import json
import os
import re
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any, Literal, Protocol, Self, TypeVar

from ringfence.enums import Mode
from ringfence.failsafewire import FAILSAFE_WIDEST as FAILSAFE_WIDEST
from ringfence.failsafewire import failsafe_total_problem as failsafe_total_problem
from ringfence.failsafewire import failsafe_width_problem as failsafe_width_problem

BUNDLE_FORMAT = "ringfence.bundle/v2"
DELTA_FORMAT = "ringfence.delta/v2"
# What a signature covers: a small manifest naming the document (format, key id, subject,
# versions, expiry) and the SHA-256 of its canonical bytes, so that a signer with a message limit
# (AWS KMS signs at most 4096 bytes) signs a bundle of any size. See docs/bundle.md.
MANIFEST_FORMAT = "ringfence.manifest/v2"
MAX_MANIFEST_BYTES = 4096

Proto = Literal["tcp", "udp", "icmp", "icmpv6", "any"]
RuleAction = Literal["allow", "deny", "override-deny"]
PROTOS: tuple[str, ...] = ("tcp", "udp", "icmp", "icmpv6", "any")
RULE_ACTIONS: tuple[str, ...] = ("allow", "deny", "override-deny")


class BundleError(ValueError):
    """A bundle or delta the agent must refuse: says what is wrong."""


# --- the documents -------------------------------------------------------------------------------
# Field names, defaults and required-ness mirror ringfence.bundle's models (a test compares them).


@dataclass(frozen=True, slots=True, kw_only=True)
class Signature:
    alg: Literal["ed25519"] = "ed25519"
    key_id: str
    value: str  # base64


@dataclass(frozen=True, slots=True, kw_only=True)
class ServiceMatch:
    proto: Proto
    ports: tuple[int, int] | None = None  # inclusive tcp/udp port range; None = all
    icmp_type: int | None = None  # None = every ICMP type


class _Service(Protocol):
    """A service match as either model has it (this module's dataclass or ringfence.bundle's)."""

    @property
    def proto(self) -> str: ...
    @property
    def ports(self) -> tuple[int, int] | None: ...
    @property
    def icmp_type(self) -> int | None: ...


Span = tuple[str, int, int]


def service_span(s: _Service) -> Span:
    """(protocol, low, high) a service covers: all ports are 0-65535, all ICMP types 0-255."""
    if s.proto in ("tcp", "udp"):
        lo, hi = s.ports if s.ports is not None else (0, 65535)
        return (s.proto, lo, hi)
    if s.proto in ("icmp", "icmpv6"):
        return (s.proto, s.icmp_type, s.icmp_type) if s.icmp_type is not None else (s.proto, 0, 255)
    return ("any", 0, 0)


_WHOLE_PROTOCOL: dict[str, tuple[int, int]] = {
    "tcp": (0, 65535),
    "udp": (0, 65535),
    "icmp": (0, 255),
    "icmpv6": (0, 255),
}


def span_whole(span: Span) -> bool:
    """True when a span covers its whole protocol: all ports, or all ICMP types."""
    return _WHOLE_PROTOCOL.get(span[0]) == span[1:]


def spans_groupable(spans: Iterable[Span]) -> bool:
    """True when one grouped rule may carry all these spans: those covering *part* of a protocol
    (a port range, an ICMP type) are identical or disjoint per protocol. Whole-protocol spans and
    ``any`` mix with anything: an agent keeps them in sets of their own (address . protocol,
    address), so each of its sets still holds disjoint (address, service) elements, which
    nftables' concatenated interval sets require; all members accept, so the union is right."""
    ordered = sorted({x for x in spans if x[0] != "any" and not span_whole(x)})
    return all(a[0] != b[0] or a[2] < b[1] for a, b in itertools.pairwise(ordered))


def services_groupable(services: Iterable[_Service]) -> bool:
    """:func:`spans_groupable` over the services' spans."""
    return spans_groupable(map(service_span, services))


GROUP_ERROR = "a grouped rule (members) is an allow rule with set null and no services of its own"
GROUP_SERVICES_ERROR = (
    "a grouped rule's member port ranges must be identical or disjoint per protocol "
    "(all ports, all ICMP types and 'any' mix freely)"
)


@dataclass(frozen=True, slots=True, kw_only=True)
class GroupMember:
    id: str  # policy rule id of this member
    set: str | None  # address set of the peer; None = any address
    services: list[ServiceMatch]


@dataclass(frozen=True, slots=True, kw_only=True)
class BundleRule:
    id: str  # policy rule id, reported with drops and flows (a group: its first member's)
    action: RuleAction
    set: str | None  # address set of the peer; None = any address (required, may be null; a group: null)
    services: list[ServiceMatch]  # a group: empty, its members carry the services
    # a grouped allow rule: each member's peers on that member's services, nothing across members
    members: list[GroupMember] | None = None

    def parts(self) -> list[GroupMember]:
        """The (id, set, services) this rule allows: its members, or itself."""
        if self.members is not None:
            return self.members
        return [GroupMember(id=self.id, set=self.set, services=self.services)]


@dataclass(frozen=True, slots=True, kw_only=True)
class AddressSetDoc:
    version: int  # revision at which this set's content last changed
    v4: list[str] = field(default_factory=list)  # canonical CIDR cover, sorted
    v6: list[str] = field(default_factory=list)


# The control-plane fail-safe admits this port only (HTTPS); an agent admits its api_url's port
CONTROL_PLANE_PORT = 443


@dataclass(frozen=True, slots=True, kw_only=True)
class FailsafeDoc:
    admin_cidrs: list[str] = field(default_factory=list)
    admin_ports: list[ServiceMatch] = field(default_factory=list)
    dns_resolvers: list[str] = field(default_factory=list)
    control_plane: list[str] = field(default_factory=list)


@dataclass(frozen=True, slots=True, kw_only=True)
class Bundle:
    """Everything one agent needs. Rules are ordered: override-deny, allow, deny; then the default."""

    format: Literal["ringfence.bundle/v2"] = "ringfence.bundle/v2"
    workload_id: str
    version: int
    policy_version: int
    mode: Mode
    quarantined: bool = False
    sets: dict[str, AddressSetDoc] = field(default_factory=dict)
    inbound: list[BundleRule] = field(default_factory=list)
    outbound: list[BundleRule] = field(default_factory=list)
    failsafes: FailsafeDoc = field(default_factory=FailsafeDoc)
    # unix seconds after which an agent refuses to apply this bundle (signed; None: unsigned draft)
    expires_at: int | None = None
    signature: Signature | None = None

    def content(self) -> dict[str, Any]:
        """What decides enforcement (no versions, expiry or signature): equal content ⇒ equal firewall."""
        doc = to_json(self)
        del doc["signature"], doc["version"], doc["expires_at"]
        for s in doc["sets"].values():
            s.pop("version")
        return doc


@dataclass(frozen=True, slots=True, kw_only=True)
class SetDelta:
    format: Literal["ringfence.delta/v2"] = "ringfence.delta/v2"
    set: str
    from_version: int
    to_version: int
    add: list[str] = field(default_factory=list)  # CIDR elements to add
    remove: list[str] = field(default_factory=list)  # CIDR elements to delete
    signature: Signature | None = None


Document = Bundle | SetDelta
D = TypeVar("D", Bundle, SetDelta)


# --- JSON form and canonical bytes ----------------------------------------------------------------


def _service_json(s: ServiceMatch) -> dict[str, Any]:
    return {"proto": s.proto, "ports": list(s.ports) if s.ports is not None else None, "icmp_type": s.icmp_type}


def _signature_json(s: Signature | None) -> dict[str, Any] | None:
    return None if s is None else {"alg": s.alg, "key_id": s.key_id, "value": s.value}


def to_json(doc: Document) -> dict[str, Any]:
    """The document as JSON data, every field present: what pydantic's ``model_dump(mode="json")``
    gives for the same document. Element lists are shared, not copied (they are large)."""
    if isinstance(doc, SetDelta):
        return {
            "format": doc.format,
            "set": doc.set,
            "from_version": doc.from_version,
            "to_version": doc.to_version,
            "add": doc.add,
            "remove": doc.remove,
            "signature": _signature_json(doc.signature),
        }
    fs = doc.failsafes
    return {
        "format": doc.format,
        "workload_id": doc.workload_id,
        "version": doc.version,
        "policy_version": doc.policy_version,
        "mode": doc.mode.value,
        "quarantined": doc.quarantined,
        "sets": {name: {"version": s.version, "v4": s.v4, "v6": s.v6} for name, s in doc.sets.items()},
        "inbound": [_rule_json(r) for r in doc.inbound],
        "outbound": [_rule_json(r) for r in doc.outbound],
        "failsafes": {
            "admin_cidrs": fs.admin_cidrs,
            "admin_ports": [_service_json(p) for p in fs.admin_ports],
            "dns_resolvers": fs.dns_resolvers,
            "control_plane": fs.control_plane,
        },
        "expires_at": doc.expires_at,
        "signature": _signature_json(doc.signature),
    }


def _rule_json(r: BundleRule | GroupMember) -> dict[str, Any]:
    out: dict[str, Any] = {"id": r.id, "set": r.set, "services": [_service_json(s) for s in r.services]}
    if isinstance(r, BundleRule):
        out["action"] = r.action
        if r.members is not None:  # absent on a plain rule: its encoding (and canonical bytes) predate groups
            out["members"] = [_rule_json(m) for m in r.members]
    return out


def canonical_message(format: str, body: dict[str, Any]) -> bytes:
    """The signed bytes of a document's JSON data without its signature: sorted-key compact JSON,
    prefixed by the format (a delta can never verify as a bundle). The one definition, used by
    this module and by :mod:`ringfence.bundle`."""
    text = json.dumps(body, sort_keys=True, separators=(",", ":"), ensure_ascii=False)
    return format.encode() + b"\n" + text.encode("utf-8")


def canonical_bytes(doc: Document) -> bytes:
    body = to_json(doc)
    del body["signature"]
    return canonical_message(doc.format, body)


def manifest_message(format: str, key_id: str, subject: dict[str, Any], canonical: bytes) -> bytes:
    """What a signature covers: the document's format, the signing key's id, the document's
    subject (a bundle: workload, version, expiry; a delta: set, from → to) and the SHA-256 of its
    canonical bytes — at most :data:`MAX_MANIFEST_BYTES`, so that a signer with a message limit
    (AWS KMS: 4096 bytes, RAW) can sign it. The one definition, used here and by
    :mod:`ringfence.bundle`."""
    body = {"format": format, "key_id": key_id, **subject, "sha256": hashlib.sha256(canonical).hexdigest()}
    msg = canonical_message(MANIFEST_FORMAT, body)
    if len(msg) > MAX_MANIFEST_BYTES:
        raise BundleError(f"signed manifest of {format} is {len(msg)} bytes, over {MAX_MANIFEST_BYTES} (id too long)")
    return msg


def manifest_subject(doc: Document) -> dict[str, Any]:
    """The fields a manifest names besides the digest: what the document is for and when."""
    if isinstance(doc, SetDelta):
        return {"set": doc.set, "from_version": doc.from_version, "to_version": doc.to_version}
    return {"workload_id": doc.workload_id, "version": doc.version, "expires_at": doc.expires_at}


def manifest(doc: Document, key_id: str) -> bytes:
    """The signed bytes of ``doc`` for the key ``key_id`` (see :func:`manifest_message`)."""
    return manifest_message(doc.format, key_id, manifest_subject(doc), canonical_bytes(doc))


def dumps(doc: Document) -> str:
    """Stable, human-diffable JSON (the on-disk and on-wire form, as ``ringfence.bundle.dumps``)."""
    return json.dumps(to_json(doc), indent=1, sort_keys=True) + "\n"


# --- the strict reader ----------------------------------------------------------------------------


class _Invalid(Exception):
    def __init__(self, loc: str, msg: str) -> None:
        super().__init__(f"{loc}: {msg}" if loc else msg)


def _at(loc: str, key: str | int) -> str:
    return f"{loc}.{key}" if loc else str(key)


def _object(raw: object, loc: str, known: frozenset[str], required: tuple[str, ...]) -> dict[str, Any]:
    if type(raw) is not dict:
        raise _Invalid(loc, "Input should be an object")
    for key in raw:
        if key not in known:
            raise _Invalid(_at(loc, key), "Extra inputs are not permitted")
    for key in required:
        if key not in raw:
            raise _Invalid(_at(loc, key), "Field required")
    return raw


def _str(raw: object, loc: str) -> str:
    if type(raw) is not str:
        raise _Invalid(loc, "Input should be a valid string")
    return raw


def _int(raw: object, loc: str) -> int:
    if type(raw) is not int:  # strict: no bool, no float, no numeric string
        raise _Invalid(loc, "Input should be a valid integer")
    return raw


def _opt_int(raw: object, loc: str) -> int | None:
    return None if raw is None else _int(raw, loc)


def _bool(raw: object, loc: str) -> bool:
    if type(raw) is not bool:
        raise _Invalid(loc, "Input should be a valid boolean")
    return raw


def _literal(raw: object, loc: str, allowed: tuple[str, ...]) -> Any:
    if type(raw) is not str or raw not in allowed:
        raise _Invalid(loc, "Input should be " + " or ".join(repr(a) for a in allowed))
    return raw


def _str_list(raw: object, loc: str) -> list[str]:
    if type(raw) is not list:
        raise _Invalid(loc, "Input should be a valid list")
    for i, x in enumerate(raw):
        if type(x) is not str:
            raise _Invalid(_at(loc, i), "Input should be a valid string")
    return raw


def _list(raw: object, loc: str, item: Callable[[object, str], Any]) -> list[Any]:
    if type(raw) is not list:
        raise _Invalid(loc, "Input should be a valid list")
    return [item(x, _at(loc, i)) for i, x in enumerate(raw)]


_SIGNATURE = frozenset({"alg", "key_id", "value"})
_SERVICE = frozenset({"proto", "ports", "icmp_type"})
_RULE = frozenset({"id", "action", "set", "services", "members"})
_MEMBER = frozenset({"id", "set", "services"})
_SET = frozenset({"version", "v4", "v6"})
_FAILSAFES = frozenset({"admin_cidrs", "admin_ports", "dns_resolvers", "control_plane"})
_BUNDLE = frozenset(
    {
        "format",
        "workload_id",
        "version",
        "policy_version",
        "mode",
        "quarantined",
        "sets",
        "inbound",
        "outbound",
        "failsafes",
        "expires_at",
        "signature",
    }
)
_DELTA = frozenset({"format", "set", "from_version", "to_version", "add", "remove", "signature"})
_MODES = tuple(m.value for m in Mode)


def _signature(raw: object, loc: str) -> Signature | None:
    if raw is None:
        return None
    d = _object(raw, loc, _SIGNATURE, ("key_id", "value"))
    if "alg" in d:
        _literal(d["alg"], _at(loc, "alg"), ("ed25519",))
    return Signature(key_id=_str(d["key_id"], _at(loc, "key_id")), value=_str(d["value"], _at(loc, "value")))


def _service(raw: object, loc: str) -> ServiceMatch:
    d = _object(raw, loc, _SERVICE, ("proto",))
    ports: tuple[int, int] | None = None
    if d.get("ports") is not None:
        p = d["ports"]
        if type(p) is not list:  # JSON has no tuples: pydantic reads a 2-array as tuple[int, int]
            raise _Invalid(_at(loc, "ports"), "Input should be a valid tuple")
        if len(p) < 2:
            raise _Invalid(_at(loc, f"ports.{len(p)}"), "Field required")
        if len(p) > 2:
            raise _Invalid(_at(loc, "ports"), "Tuple should have at most 2 items")
        ports = (_int(p[0], _at(loc, "ports.0")), _int(p[1], _at(loc, "ports.1")))
    return ServiceMatch(
        proto=_literal(d["proto"], _at(loc, "proto"), PROTOS),
        ports=ports,
        icmp_type=_opt_int(d.get("icmp_type"), _at(loc, "icmp_type")),
    )


def _member(raw: object, loc: str) -> GroupMember:
    d = _object(raw, loc, _MEMBER, ("id", "set", "services"))
    peer = d["set"]
    return GroupMember(
        id=_str(d["id"], _at(loc, "id")),
        set=None if peer is None else _str(peer, _at(loc, "set")),
        services=_list(d["services"], _at(loc, "services"), _service),
    )


def _rule(raw: object, loc: str) -> BundleRule:
    d = _object(raw, loc, _RULE, ("id", "action", "set", "services"))
    peer = d["set"]
    members: list[GroupMember] | None = None
    if d.get("members") is not None:
        members = _list(d["members"], _at(loc, "members"), _member)
        if len(members) < 2:
            raise _Invalid(
                _at(loc, "members"), f"List should have at least 2 items after validation, not {len(members)}"
            )
    rule = BundleRule(
        id=_str(d["id"], _at(loc, "id")),
        action=_literal(d["action"], _at(loc, "action"), RULE_ACTIONS),
        set=None if peer is None else _str(peer, _at(loc, "set")),
        services=_list(d["services"], _at(loc, "services"), _service),
        members=members,
    )
    if members is not None:
        if rule.action != "allow" or rule.set is not None or rule.services:
            raise _Invalid(loc, f"Value error, {GROUP_ERROR}")
        if not services_groupable(s for m in members for s in m.services):
            raise _Invalid(loc, f"Value error, {GROUP_SERVICES_ERROR}")
    return rule


def _address_set(raw: object, loc: str) -> AddressSetDoc:
    d = _object(raw, loc, _SET, ("version",))
    return AddressSetDoc(
        version=_int(d["version"], _at(loc, "version")),
        v4=_str_list(d["v4"], _at(loc, "v4")) if "v4" in d else [],
        v6=_str_list(d["v6"], _at(loc, "v6")) if "v6" in d else [],
    )


def _failsafes(raw: object, loc: str) -> FailsafeDoc:
    d = _object(raw, loc, _FAILSAFES, ())
    return FailsafeDoc(
        admin_cidrs=_str_list(d["admin_cidrs"], _at(loc, "admin_cidrs")) if "admin_cidrs" in d else [],
        admin_ports=_list(d["admin_ports"], _at(loc, "admin_ports"), _service) if "admin_ports" in d else [],
        dns_resolvers=_str_list(d["dns_resolvers"], _at(loc, "dns_resolvers")) if "dns_resolvers" in d else [],
        control_plane=_str_list(d["control_plane"], _at(loc, "control_plane")) if "control_plane" in d else [],
    )


def bundle_from_json(raw: object) -> Bundle:
    """A :class:`Bundle` from parsed JSON data; :class:`BundleError` names the first bad field."""
    try:
        d = _object(raw, "", _BUNDLE, ("workload_id", "version", "policy_version", "mode"))
        if "format" in d:
            _literal(d["format"], "format", (BUNDLE_FORMAT,))
        sets: dict[str, AddressSetDoc] = {}
        if "sets" in d:
            if type(d["sets"]) is not dict:
                raise _Invalid("sets", "Input should be a valid dictionary")
            sets = {name: _address_set(s, f"sets.{name}") for name, s in d["sets"].items()}
        return Bundle(
            workload_id=_str(d["workload_id"], "workload_id"),
            version=_int(d["version"], "version"),
            policy_version=_int(d["policy_version"], "policy_version"),
            mode=Mode(_literal(d["mode"], "mode", _MODES)),
            quarantined=_bool(d["quarantined"], "quarantined") if "quarantined" in d else False,
            sets=sets,
            inbound=_list(d["inbound"], "inbound", _rule) if "inbound" in d else [],
            outbound=_list(d["outbound"], "outbound", _rule) if "outbound" in d else [],
            failsafes=_failsafes(d["failsafes"], "failsafes") if "failsafes" in d else FailsafeDoc(),
            expires_at=_opt_int(d.get("expires_at"), "expires_at"),
            signature=_signature(d.get("signature"), "signature"),
        )
    except _Invalid as exc:
        raise BundleError(f"not a valid {BUNDLE_FORMAT} document: {exc}") from None


def delta_from_json(raw: object) -> SetDelta:
    """A :class:`SetDelta` from parsed JSON data; :class:`BundleError` names the first bad field."""
    try:
        d = _object(raw, "", _DELTA, ("set", "from_version", "to_version"))
        if "format" in d:
            _literal(d["format"], "format", (DELTA_FORMAT,))
        return SetDelta(
            set=_str(d["set"], "set"),
            from_version=_int(d["from_version"], "from_version"),
            to_version=_int(d["to_version"], "to_version"),
            add=_str_list(d["add"], "add") if "add" in d else [],
            remove=_str_list(d["remove"], "remove") if "remove" in d else [],
            signature=_signature(d.get("signature"), "signature"),
        )
    except _Invalid as exc:
        raise BundleError(f"not a valid {DELTA_FORMAT} document: {exc}") from None


# a \uD800-\uDFFF escape: the only way json.loads yields a lone surrogate from valid UTF-8 text
_SURROGATE_ESCAPE = re.compile(r"\\u[dD][89a-fA-F]")


def _parse(text: str | bytes, what: str) -> Any:
    """JSON as pydantic reads it: UTF-8 only (no BOM, no UTF-16), no lone surrogates."""
    try:
        if isinstance(text, bytes):
            text = text.decode("utf-8")
        else:
            text.encode("utf-8")  # a str holding a lone surrogate has no UTF-8 form
        data = json.loads(text)
        if _SURROGATE_ESCAPE.search(text):
            _check_strings(data)
    except (ValueError, RecursionError) as exc:  # UnicodeError and JSONDecodeError are ValueErrors
        raise BundleError(f"not a valid {what} document: invalid JSON: {exc}") from None
    return data


def _check_strings(data: object) -> None:
    if isinstance(data, str):
        data.encode("utf-8")
    elif isinstance(data, list):
        for x in data:
            _check_strings(x)
    elif isinstance(data, dict):
        for k, v in data.items():
            _check_strings(k)
            _check_strings(v)


def load_bundle(text: str | bytes) -> Bundle:
    return bundle_from_json(_parse(text, BUNDLE_FORMAT))


def load_delta(text: str | bytes) -> SetDelta:
    return delta_from_json(_parse(text, DELTA_FORMAT))


# --- keys and signatures --------------------------------------------------------------------------

# DER of an Ed25519 SubjectPublicKeyInfo before the 32 key bytes (RFC 8410): fixed, so the PEM is
# read without cryptography's serialization package (~3 MB of imports)
_ED25519_SPKI_PREFIX = bytes.fromhex("302a300506032b6570032100")
_PEM_PUBLIC = re.compile(rb"-----BEGIN PUBLIC KEY-----([A-Za-z0-9+/=\s]*)-----END PUBLIC KEY-----")
_PEM_ONE_PUBLIC = re.compile(rb"\s*-----BEGIN PUBLIC KEY-----([A-Za-z0-9+/=\s]*)-----END PUBLIC KEY-----\s*")


class Signer(Protocol):
    """Anything that signs: a local key file now, KMS in the cloud."""

    @property
    def key_id(self) -> str: ...

    def sign(self, message: bytes) -> bytes: ...


def key_id_of_raw(raw: bytes) -> str:
    """First 16 hex digits of SHA-256 over the raw 32-byte public key."""
    return fingerprint_of_raw(raw)[:16]


def fingerprint_of_raw(raw: bytes) -> str:
    """SHA-256 over the raw 32-byte public key, 64 hex digits: where a key is named so that only
    it may do something (an agent-key reset's next key), the whole digest, not the 64-bit id."""
    return hashlib.sha256(raw).hexdigest()


def ed25519_public_from_pem(data: bytes) -> bytes:
    """The raw 32-byte key of an Ed25519 public key in PEM (SubjectPublicKeyInfo)."""
    return ed25519_publics_from_pem(data)[0]


def ed25519_publics_from_pem(data: bytes) -> list[bytes]:
    """The raw 32-byte keys of every Ed25519 public key in PEM in ``data`` (a pinned key set: one
    or more ``PUBLIC KEY`` blocks); at least one, and every block must be an Ed25519 key."""
    out = []
    for m in _PEM_PUBLIC.finditer(data):
        try:
            der = base64.b64decode(b"".join(m.group(1).split()), validate=True)
        except binascii.Error:
            der = b""
        if len(der) != len(_ED25519_SPKI_PREFIX) + 32 or not der.startswith(_ED25519_SPKI_PREFIX):
            raise BundleError("pinned key must be an Ed25519 public key (PEM)")
        out.append(der[len(_ED25519_SPKI_PREFIX) :])
    if not out:
        raise BundleError("pinned key must be an Ed25519 public key (PEM)")
    return out


def ed25519_public_from_one_pem(data: bytes) -> bytes:
    """The raw key of an agent's Ed25519 public key: exactly one ``PUBLIC KEY`` block and nothing
    else (no second block, no RFC 1421 header line, no text around it). Strict because two readers
    of a looser text disagree on which key it holds (cryptography reads a block with a header
    line that a first-block reader skips): the key a signature is checked with must be the key
    that is bound and named."""
    m = _PEM_ONE_PUBLIC.fullmatch(data)
    try:
        der = base64.b64decode(b"".join(m.group(1).split()), validate=True) if m else b""
    except binascii.Error:
        der = b""
    if len(der) != len(_ED25519_SPKI_PREFIX) + 32 or not der.startswith(_ED25519_SPKI_PREFIX):
        raise BundleError("must be one Ed25519 public key in PEM (a PUBLIC KEY block and nothing else)")
    return der[len(_ED25519_SPKI_PREFIX) :]


def ed25519_raw_from_spki_der(der: bytes) -> bytes:
    """The raw key of an Ed25519 SubjectPublicKeyInfo in DER (what AWS KMS GetPublicKey returns)."""
    if len(der) != len(_ED25519_SPKI_PREFIX) + 32 or not der.startswith(_ED25519_SPKI_PREFIX):
        raise BundleError("not an Ed25519 public key (DER SubjectPublicKeyInfo)")
    return der[len(_ED25519_SPKI_PREFIX) :]


def ed25519_pem_of_raw(raw: bytes) -> bytes:
    """The PEM (SubjectPublicKeyInfo) of a raw Ed25519 public key: what agents pin."""
    b64 = base64.b64encode(_ED25519_SPKI_PREFIX + raw).decode()
    return f"-----BEGIN PUBLIC KEY-----\n{b64}\n-----END PUBLIC KEY-----\n".encode()


_NID_ED25519 = 1087  # EVP_PKEY_ED25519 in OpenSSL's obj_mac.h (stable since 1.1.1)


class LibcryptoEd25519:
    """Ed25519 verification by the libcrypto this process already has mapped (Python's hashlib
    and ssl link it). ``cryptography`` would map a second, statically linked OpenSSL — ~9 MB of
    resident memory in an agent whose target is 40 MB. The same OpenSSL code checks the
    signature either way; ``tests/test_bundlewire.py`` holds the two to the same verdicts."""

    def __init__(self, lib: ctypes.CDLL, raw: bytes) -> None:
        self._lib = lib
        pkey = lib.EVP_PKEY_new_raw_public_key(_NID_ED25519, None, raw, len(raw))
        if not pkey:
            lib.ERR_clear_error()
            raise ValueError("libcrypto refused the Ed25519 public key")
        self._pkey = pkey

    def __del__(self) -> None:
        pkey = getattr(self, "_pkey", None)
        if pkey:
            self._lib.EVP_PKEY_free(pkey)

    def verify(self, signature: bytes, message: bytes) -> bool:
        lib = self._lib
        ctx = lib.EVP_MD_CTX_new()
        if not ctx:
            raise MemoryError("EVP_MD_CTX_new failed")
        try:
            valid = bool(
                lib.EVP_DigestVerifyInit(ctx, None, None, None, self._pkey) == 1
                and lib.EVP_DigestVerify(ctx, signature, len(signature), message, len(message)) == 1
            )
        finally:
            lib.EVP_MD_CTX_free(ctx)
        if not valid:
            lib.ERR_clear_error()  # OpenSSL queues an error per failure: do not let them pile up
        return valid


@functools.cache
def loaded_libcrypto() -> ctypes.CDLL | None:
    """The libcrypto already in this process (Linux), with the prototypes used here; None when there
    is none, it lacks raw Ed25519 keys, or ``RINGFENCE_ED25519=cryptography`` asks for the fallback."""
    if os.environ.get("RINGFENCE_ED25519") == "cryptography":
        return None
    path = next((m for m in _mapped_files() if "/libcrypto.so" in m), None)
    if path is None:
        return None
    try:
        return _prototypes(ctypes.CDLL(path))
    except (OSError, AttributeError):  # unloadable, or older than OpenSSL 1.1.1
        return None


def _mapped_files() -> list[str]:
    import hashlib as _  # noqa: F401 - makes sure _hashlib (and with it libcrypto) is loaded

    try:
        maps = Path("/proc/self/maps").read_text()
    except OSError:
        return []
    return [parts[5] for line in maps.splitlines() if len(parts := line.split(maxsplit=5)) == 6]


def _prototypes(lib: ctypes.CDLL) -> ctypes.CDLL:
    ptr, size = ctypes.c_void_p, ctypes.c_size_t
    for name, restype, argtypes in (
        ("EVP_PKEY_new_raw_public_key", ptr, [ctypes.c_int, ptr, ctypes.c_char_p, size]),
        ("EVP_PKEY_free", None, [ptr]),
        ("EVP_MD_CTX_new", ptr, []),
        ("EVP_MD_CTX_free", None, [ptr]),
        ("EVP_DigestVerifyInit", ctypes.c_int, [ptr, ptr, ptr, ptr, ptr]),
        ("EVP_DigestVerify", ctypes.c_int, [ptr, ctypes.c_char_p, size, ctypes.c_char_p, size]),
        ("ERR_clear_error", None, []),
    ):
        fn = getattr(lib, name)
        fn.restype, fn.argtypes = restype, argtypes
    return lib


def ed25519_verifier(raw: bytes) -> Callable[[bytes, bytes], bool]:
    """``verify(signature, message) -> bool`` for one raw public key: libcrypto when this process
    has it, else ``cryptography`` (imported only then)."""
    lib = loaded_libcrypto()
    if lib is not None:
        try:
            return LibcryptoEd25519(lib, raw).verify
        except ValueError:
            pass  # e.g. a FIPS-only provider without Ed25519: cryptography brings its own
    return cryptography_ed25519(raw)


def cryptography_ed25519(raw: bytes) -> Callable[[bytes, bytes], bool]:
    from cryptography.exceptions import InvalidSignature
    from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PublicKey

    public = Ed25519PublicKey.from_public_bytes(raw)

    def verify(signature: bytes, message: bytes) -> bool:
        try:
            public.verify(signature, message)
        except InvalidSignature:
            return False
        return True

    return verify


def describe(doc: Document) -> str:
    return f"bundle for {doc.workload_id!r}" if isinstance(doc, Bundle) else f"delta for set {doc.set!r}"


class SignatureLike(Protocol):
    @property
    def alg(self) -> str: ...

    @property
    def key_id(self) -> str: ...

    @property
    def value(self) -> str: ...


class Verifier:
    """The pinned key set an agent trusts: key id → Ed25519 public key, minus revoked key ids.

    A document names the key that signed it (``signature.key_id``, also inside the signed
    manifest); an unknown or revoked key id is refused before any signature check. Rotation adds
    the new key to the set, the control plane switches, the old key id is revoked (docs/bundle.md).
    """

    def __init__(self, keys: bytes | Iterable[bytes], revoked: Iterable[str] = ()) -> None:
        raws = [keys] if isinstance(keys, bytes) else list(keys)
        if not raws:
            raise BundleError("the pinned key set is empty")
        self._keys = {key_id_of_raw(r): ed25519_verifier(r) for r in raws}
        self.revoked = frozenset(revoked)
        # every key revoked is a valid (if unusable) state: documents are refused, and the agent
        # keeps its boot posture rather than failing to start (a daemon that exits fails open)
        self.key_ids = tuple(k for k in self._keys if k not in self.revoked)
        self.key_id = (self.key_ids or tuple(self._keys))[0]  # the first usable key (for messages)

    @classmethod
    def from_pem(cls, data: bytes, revoked: Iterable[str] = ()) -> Self:
        return cls(ed25519_publics_from_pem(data), revoked)

    @classmethod
    def from_file(cls, path: Path, revoked: Iterable[str] = ()) -> Self:
        return cls.from_pem(path.read_bytes(), revoked)

    def verify(self, doc: Document) -> None:
        """Raise :class:`BundleError` unless ``doc`` carries a valid signature by a pinned, unrevoked key."""
        self.verify_signed(describe(doc), doc.signature, lambda key_id: manifest(doc, key_id))

    def verify_signed(self, what: str, signature: SignatureLike | None, message_for: Callable[[str], bytes]) -> None:
        """The signature rule itself, for documents in any representation: ``message_for(key_id)``
        gives the signed manifest for the key the signature names."""
        if signature is None:
            raise BundleError(f"{what} is not signed")
        kid = signature.key_id
        if kid in self.revoked:
            raise BundleError(f"{what} is signed by key {kid}, which is revoked")
        check = self._keys.get(kid)
        if check is None:
            raise BundleError(f"{what} is signed by key {kid}, not a pinned key ({', '.join(self.key_ids)})")
        if signature.alg != "ed25519":
            raise BundleError(f"{what}: signature algorithm {signature.alg!r} is not accepted (ed25519 only)")
        try:
            valid = check(base64.b64decode(signature.value, validate=True), message_for(kid))
        except ValueError:  # not base64
            valid = False
        if not valid:
            raise BundleError(f"{what}: signature does not verify (tampered or forged)")


def sign(doc: D, signer: Signer, *, expires_at: int | None = None) -> D:
    """``doc`` signed by ``signer``. A bundle gets ``expires_at`` (default: the one it carries,
    else :data:`DEFAULT_TTL` seconds from now)."""
    check_signer(signer)
    if isinstance(doc, Bundle):
        exp = expires_at if expires_at is not None else doc.expires_at
        doc = replace(doc, expires_at=exp if exp is not None else int(time.time()) + DEFAULT_TTL)
    raw = signer.sign(manifest(doc, signer.key_id))
    return replace(doc, signature=Signature(key_id=signer.key_id, value=base64.b64encode(raw).decode()))


DEFAULT_TTL = 7 * 86400  # a signed bundle's lifetime unless the publisher says otherwise


def check_signer(signer: Signer) -> None:
    """Agents verify Ed25519 only: a signer of another algorithm (e.g. an ECDSA KMS key) cannot
    sign bundles, whatever it can sign otherwise."""
    alg = getattr(signer, "alg", "ed25519")
    if alg != "ed25519":
        raise BundleError(f"signer {signer.key_id} signs {alg}: agents verify ed25519 signatures only")


def check_fresh(new: Bundle, now: float) -> None:
    """A bundle an agent may apply now: it carries an expiry and has not expired (a captured old
    bundle replayed later is refused; see docs/bundle.md, Expiry)."""
    if new.expires_at is None:
        raise BundleError("bundle carries no expiry (expires_at): refused")
    if new.expires_at <= now:
        raise BundleError(
            f"bundle expired at {_utc(new.expires_at)} (now {_utc(now)}): a stale or replayed bundle is refused"
        )


def _utc(t: float) -> str:
    return time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(t))


# --- acceptance ---------------------------------------------------------------------------------


def same_firewall(a: Bundle, b: Bundle) -> bool:
    """Equal enforcement content, whatever the element order (deltas append; bundles sort)."""
    ca, cb = a.content(), b.content()
    for c in (ca, cb):
        for s in c["sets"].values():
            s["v4"], s["v6"] = sorted(s["v4"]), sorted(s["v6"])
    return ca == cb


def check_acceptable(
    new: Bundle, workload_id: str, applied_revision: int | None, applied: Bundle | None = None
) -> None:
    """The agent's acceptance rules beyond the signature (shared so every agent applies the same).

    ``applied`` is what the agent enforces now (its bundle with deltas folded in). A bundle with
    the applied revision is only accepted when it enforces exactly the same thing: a different
    bundle reusing a version is a replay of an older policy or a control-plane fault.
    """
    if new.workload_id != workload_id:
        raise BundleError(f"bundle is for workload {new.workload_id!r}, this agent is {workload_id!r}")
    if applied_revision is not None and new.version < applied_revision:
        raise BundleError(
            f"bundle version {new.version} is older than the applied revision {applied_revision} (rollback refused)"
        )
    if (
        applied_revision is not None
        and applied is not None
        and new.version == applied_revision
        and not same_firewall(new, applied)
    ):
        raise BundleError(
            f"bundle version {new.version} equals the applied revision but its content differs (replay refused)"
        )
    for name, s in new.sets.items():
        if s.version > new.version:
            raise BundleError(f"set {name} claims version {s.version} newer than the bundle {new.version}")
    for rule in (*new.inbound, *new.outbound):
        for part in rule.parts():
            if part.set is not None and part.set not in new.sets:
                raise BundleError(f"rule {part.id} references undefined set {part.set}")
