"""Verifying an EC2 instance identity document (IID) and its RSA-SHA256 signature.

AWS publishes one certificate per Region for the ``/rsa2048`` PKCS7 form and one for the
``/signature`` form (base64 RSA-SHA256 over the document bytes). We verify the latter with a
configured PEM certificate (``RINGFENCE_IID_CERT``): production uses the Region's "RSA"
certificate from the EC2 user guide (infra/examples/basic/README.md, step 2); tests use a
throwaway key pair.
"""

from __future__ import annotations

import base64
import contextlib
import functools
import http.client
import json
import re
import threading
import time
import urllib.error
import urllib.request
from collections.abc import Mapping
from dataclasses import dataclass
from datetime import datetime
from typing import TYPE_CHECKING, Any
from urllib.parse import parse_qsl, unquote, urlsplit
from xml.etree import ElementTree

from botocore.exceptions import ClientError
from cryptography import x509
from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import padding, rsa

from ringfence import agentapi
from ringfence.control import credentials
from ringfence.control.enroll import ProofError
from ringfence.events import UnservedAccount

from . import clients, ec2
from .ingest import observe_instances

if TYPE_CHECKING:
    from ringfence.control.agents import AgentApi


@dataclass(frozen=True)
class Identity:
    instance_id: str
    account: str
    region: str
    private_ip: str | None
    pending_time: str


def load_public_key(pem: bytes) -> rsa.RSAPublicKey:
    try:
        if b"CERTIFICATE" in pem:
            key: Any = x509.load_pem_x509_certificate(pem).public_key()
        else:
            key = serialization.load_pem_public_key(pem)
    except ValueError as exc:
        raise ValueError(f"IID verification certificate is not valid PEM: {exc}") from None
    if not isinstance(key, rsa.RSAPublicKey):
        raise ValueError("IID verification certificate must hold an RSA public key")
    return key


def verify_iid(document: str, signature_b64: str, public_key: rsa.RSAPublicKey) -> Identity:
    try:
        sig = base64.b64decode("".join(signature_b64.split()), validate=True)
    except ValueError:
        raise ProofError("document_signature is not base64") from None
    if len(sig) != public_key.key_size // 8:
        # the agent's iid_signature must be "signature": a PKCS7 (rsa2048/pkcs7) form is a DER blob
        raise ProofError(
            "document_signature is not the IMDS /signature form (base64 RSA-SHA256 of the document); "
            "set the agent's enroll.iid_signature to signature"
        )
    try:
        public_key.verify(sig, document.encode(), padding.PKCS1v15(), hashes.SHA256())
    except InvalidSignature:
        raise ProofError("instance identity document signature does not verify") from None
    try:
        doc = json.loads(document)
        return Identity(
            instance_id=str(doc["instanceId"]),
            account=str(doc["accountId"]),
            region=str(doc["region"]),
            private_ip=doc.get("privateIp"),
            pending_time=str(doc.get("pendingTime", "")),
        )
    except (ValueError, KeyError, TypeError) as exc:
        raise ProofError(f"instance identity document is missing a field: {exc}") from None


# --- aws-sts: a presigned sts:GetCallerIdentity the server replays (as Vault's aws iam method) -----

NONCE_HEADER = "x-ringfence-nonce"
# STS's host names, matched whole: the global endpoint and sts.<region>.amazonaws.com[.cn] (commercial,
# GovCloud, China). A prefix or pattern over the URL text also matched sts.s3.amazonaws.com (an S3
# bucket named "sts", anyone's to create).
_REGION = r"(?:[a-z]{2}(?:-gov)?-[a-z]+-[0-9])"
_STS_HOST = re.compile(rf"sts\.amazonaws\.com|sts\.{_REGION}\.amazonaws\.com|sts\.cn-[a-z]+-[0-9]\.amazonaws\.com\.cn")
_STS_NS = "{https://sts.amazonaws.com/doc/2011-06-15/}"
_ARN = re.compile(r"^arn:aws[a-z-]*:sts::(\d{12}):assumed-role/([^/]+)/(i-[0-9a-f]{8,17})$")
MAX_STS_ANSWER = 64 * 1024
# what a presigned GetCallerIdentity needs (botocore sends 4 headers, a session token the longest):
# the bounds refuse a request http.client cannot send, or one made to weigh on the replay
MAX_STS_URL = 2048
MAX_STS_HEADERS = 16
MAX_STS_HEADER_BYTES = 16 * 1024
_TOKEN = re.compile(r"[!#$%&'*+.^_`|~0-9A-Za-z-]+")  # an HTTP header name (RFC 9110 token)
_VISIBLE = re.compile(r"[\x20-\x7e]*")  # a header value: visible ASCII and spaces, no CR/LF
# the framing of the replayed GET is urllib's: a length, an encoding or an Expect of the caller's
# would leave STS waiting for a body until the timeout
_FRAMING = frozenset({"content-length", "transfer-encoding", "connection", "expect", "upgrade", "te"})
# the one Authorization SigV4 makes: the algorithm, then Credential, SignedHeaders and Signature
_SIGV4 = re.compile(
    r"AWS4-HMAC-SHA256 Credential=([A-Za-z0-9]{16,128})/([0-9]{8})/([a-z0-9-]{1,32})/([a-z0-9-]{1,32})/aws4_request,"
    r" ?SignedHeaders=([a-z0-9-]+(?:;[a-z0-9-]+)*), ?Signature=([0-9a-f]{64})"
)
# headers a SigV4 Authorization for this call must sign: the host (the STS endpoint the signature
# is for), its time and our nonce
MUST_SIGN = ("host", "x-amz-date", NONCE_HEADER)


@dataclass(frozen=True)
class StsIdentity:
    account: str
    role: str
    instance_id: str
    arn: str


def _origin(url: str) -> tuple[str, str, int]:
    """(scheme, host, port) of a URL, parsed; ValueError for anything with user info or no host."""
    parts = urlsplit(url)
    if parts.username is not None or parts.password is not None or not parts.hostname:
        raise ValueError(url)
    scheme = parts.scheme.lower()
    port = parts.port or (443 if scheme == "https" else 80)
    return scheme, parts.hostname.lower(), port


def sts_endpoint_allowed(url: str, allowed: list[str]) -> bool:
    """``url`` is on an STS endpoint this control plane accepts: with ``allowed`` (origins such as
    ``https://sts.eu-west-1.amazonaws.com``, or a test's loopback STS), exactly one of those;
    otherwise an AWS STS host name over https on 443. Compared parsed, never as text."""
    try:
        origin = _origin(url)
    except ValueError:
        return False
    if allowed:
        ok = set()
        for a in allowed:
            with contextlib.suppress(ValueError):
                ok.add(_origin(a))
        return origin in ok
    scheme, host, port = origin
    return scheme == "https" and port == 443 and _STS_HOST.fullmatch(host) is not None


def _check_headers(url: str, headers: dict[str, str]) -> dict[str, str]:
    """The caller's headers, each one sendable as given (``ProofError`` otherwise): a token name,
    a visible-ASCII value, a bounded count and size, no framing header, each name once (any
    case), a Host only the URL's. Returns them by lower-case name."""
    if len(headers) > MAX_STS_HEADERS:
        raise ProofError(f"sts_headers has more than {MAX_STS_HEADERS} headers")
    if sum(len(k) + len(v) for k, v in headers.items()) > MAX_STS_HEADER_BYTES:
        raise ProofError(f"sts_headers is larger than {MAX_STS_HEADER_BYTES} bytes")
    lower: dict[str, str] = {}
    for name, value in headers.items():
        if not _TOKEN.fullmatch(name):
            raise ProofError(f"sts_headers: {name[:64]!r} is not an HTTP header name")
        if not _VISIBLE.fullmatch(value):
            raise ProofError(f"sts_headers: the value of {name} is not visible ASCII on one line")
        key = name.lower()
        if key in lower:
            raise ProofError(f"sts_headers: {name} is given twice")
        if key in _FRAMING:
            raise ProofError(f"sts_headers: {name} is the replay's own to set")
        lower[key] = value
    if "host" in lower and lower["host"].lower() != urlsplit(url).netloc.lower():
        raise ProofError("sts_headers: Host is not the host of sts_url")
    return lower


def check_sts_request(url: str, headers: dict[str, str], nonce: str, allowed: list[str]) -> None:
    """Refuse anything but a GetCallerIdentity call to STS, sendable as given, whose SigV4
    Authorization header (the only signature: none in the query) signs our nonce header."""
    if len(url) > MAX_STS_URL or not url.isascii() or not url.isprintable() or " " in url:
        raise ProofError(f"sts_url is not a URL of at most {MAX_STS_URL} visible ASCII characters")
    if not sts_endpoint_allowed(url, allowed):
        raise ProofError("sts_url is not an STS endpoint this control plane accepts")
    parts = urlsplit(url)
    if parts.path not in ("", "/") or parts.fragment:
        raise ProofError("sts_url must be the STS endpoint's root with a query")
    query = parse_qsl(parts.query, keep_blank_values=True)
    names = [k for k, _ in query]
    # a query-string signature (X-Amz-Signature and its parameters) is a second signature over
    # other headers: which one STS honours would be its choice, not ours
    if any(k.lower().startswith("x-amz-") for k in names):
        raise ProofError("sts_url must not carry a query-string signature (X-Amz-*): sign the Authorization header")
    if [v for k, v in query if k == "Action"] != ["GetCallerIdentity"]:
        raise ProofError("sts_url must call GetCallerIdentity")
    if set(names) - {"Action", "Version"} or len(names) != len(set(names)):
        raise ProofError("sts_url may carry Action and Version only, each once")
    lower = _check_headers(url, headers)
    if lower.get(NONCE_HEADER) != nonce:
        raise ProofError(f"the {NONCE_HEADER} header must carry the server nonce")
    m = _SIGV4.fullmatch(lower.get("authorization", ""))
    if m is None:
        raise ProofError(
            "the Authorization header is not one SigV4 signature "
            "(AWS4-HMAC-SHA256 Credential=..., SignedHeaders=..., Signature=...)"
        )
    if m.group(4) != "sts":
        raise ProofError(f"the Authorization header is signed for {m.group(4)}, not sts")
    signed = m.group(5).split(";")
    missing = [h for h in MUST_SIGN if h not in signed]
    if missing:
        raise ProofError(f"the {', '.join(missing)} header(s) must be signed (SigV4 SignedHeaders)")


class _NoRedirect(urllib.request.HTTPRedirectHandler):
    """A redirect is an answer, never followed: STS does not redirect, so one is refused."""

    def redirect_request(self, *args: Any, **kwargs: Any) -> None:
        return None


_OPENER = urllib.request.build_opener(_NoRedirect, urllib.request.ProxyHandler({}))


def replay_sts(url: str, headers: dict[str, str], timeout: float = 5.0) -> StsIdentity:
    """Send the caller's presigned request to STS; the answer says who signed it."""
    req = urllib.request.Request(url, headers=headers, method="GET")  # noqa: S310 - URL checked by check_sts_request
    try:
        with _OPENER.open(req, timeout=timeout) as resp:
            if resp.status != 200:
                raise ProofError(f"STS answered HTTP {resp.status}")
            body = resp.read(MAX_STS_ANSWER + 1)
    except urllib.error.HTTPError as exc:
        raise ProofError(f"STS refused the signed request ({exc.code})") from None
    except ProofError:
        raise
    except OSError as exc:
        raise ProofError(f"STS could not be reached: {exc}") from None
    except (ValueError, http.client.HTTPException) as exc:
        # http.client's refusal of a URL or header it cannot send (InvalidURL, a CR/LF in a
        # value), or an answer that is not HTTP: the caller's proof, never a crash of the handler
        raise ProofError(f"the signed request could not be replayed: {type(exc).__name__}: {exc}") from None
    if len(body) > MAX_STS_ANSWER:
        raise ProofError("STS answered more than a GetCallerIdentity response")
    try:
        root = ElementTree.fromstring(body)  # noqa: S314 - bounded answer of an allow-listed STS endpoint
    except ElementTree.ParseError:
        raise ProofError("STS answered something that is not XML") from None
    # the ARN at its one place in the response, never the first element whose name ends in "Arn"
    el = root.find(f"{_STS_NS}GetCallerIdentityResult/{_STS_NS}Arn")
    if root.tag != f"{_STS_NS}GetCallerIdentityResponse" or el is None:
        raise ProofError("STS answered something that is not a GetCallerIdentity response")
    arn = (el.text or "").strip()
    m = _ARN.match(arn)
    if not m:
        raise ProofError(f"caller {arn!r} is not an EC2 instance-profile session (assumed-role/<role>/<instance-id>)")
    return StsIdentity(account=m.group(1), role=m.group(2), instance_id=m.group(3), arn=arn)


def instance_profile_roles(iam: Any, instance: dict[str, Any]) -> set[str]:
    """The role names of the instance profile attached to ``instance`` (DescribeInstances item)."""
    arn = str(instance.get("IamInstanceProfile", {}).get("Arn", ""))
    if ":instance-profile/" not in arn:
        return set()
    name = arn.rsplit("/", 1)[1]
    profile = iam.get_instance_profile(InstanceProfileName=name)["InstanceProfile"]
    return {str(r["RoleName"]) for r in profile.get("Roles", [])}


# Only EC2 names an assumed-role session after an instance (the instance it hands the role's
# credentials to); any other principal a role's trust policy admits chooses the session name
# (AssumeRole's RoleSessionName), an instance id included, and gets the same ARN byte for byte.
EC2_SERVICE = frozenset({"ec2.amazonaws.com", "ec2.amazonaws.com.cn"})  # .cn: older China-partition roles
_ASSUME = ("sts:assumerole", "sts:assumerolewithwebidentity", "sts:assumerolewithsaml")
ROLE_TRUST_TTL_S = 60.0
"""How long (s) an agent-API container keeps a role's trust-policy verdict: a change to a role's
trust policy decides the enrollments made at most this long after it."""


def _listed(v: Any) -> list[Any]:
    return v if isinstance(v, list) else [v]


def _action_matches(pattern: str, action: str) -> bool:
    """IAM's action match: case-insensitive, ``*`` any run and ``?`` any one character."""
    rx = "".join(".*" if c == "*" else "." if c == "?" else re.escape(c) for c in pattern.lower())
    return re.fullmatch(rx, action, re.DOTALL) is not None


def _ec2_alone(principal: Any) -> bool:
    if not isinstance(principal, dict) or set(principal) != {"Service"}:
        return False
    services = _listed(principal["Service"])
    return bool(services) and all(isinstance(s, str) and s in EC2_SERVICE for s in services)


def trust_admits_others(document: Any) -> str | None:
    """What in a role's trust policy (``AssumeRolePolicyDocument``: IAM's URL-encoded JSON, or as
    boto3 decodes it) may let a principal other than EC2 assume the role; None: EC2 alone may.
    Every Allow statement that grants an ``sts:AssumeRole*`` action must name exactly EC2's
    service principal; NotPrincipal and NotAction allows are refused unread, Deny statements
    only narrow. Conditions are not read: they narrow an allow, never widen it."""
    doc = document
    if isinstance(doc, str):
        try:
            doc = json.loads(unquote(doc))
        except ValueError:
            return "it is not JSON"
    statements = doc.get("Statement") if isinstance(doc, dict) else None
    if not isinstance(statements, (list, dict)):
        return "it has no statements"
    for st in _listed(statements):
        if not isinstance(st, dict):
            return "a statement is not an object"
        if st.get("Effect") == "Deny":
            continue
        if "NotPrincipal" in st:
            return "an Allow statement with NotPrincipal"
        if "NotAction" in st:
            return "an Allow statement with NotAction"
        actions = _listed(st.get("Action"))
        if not all(isinstance(a, str) for a in actions):
            return "an action is not a string"
        if not any(_action_matches(a, x) for a in actions for x in _ASSUME):
            continue  # sts:TagSession, sts:SetSourceIdentity: no session on their own
        if not _ec2_alone(st.get("Principal")):
            return f"{json.dumps(st.get('Principal'), sort_keys=True)} may assume it"
    return None


class RoleTrust:
    """Whether a role's sessions are named by EC2 alone, by its trust policy (``iam:GetRole``),
    each role's verdict kept for :data:`ROLE_TRUST_TTL_S` (a scale-out's enrollments share one
    read; IAM's API is rate-limited per account)."""

    def __init__(self) -> None:
        self._seen: dict[tuple[str, str], tuple[float, str | None]] = {}
        self._lock = threading.Lock()

    def why_not_ec2s(self, iam: Any, account: str, role: str) -> str | None:
        """Why sessions of ``role`` (in ``account``, read with ``iam``) are not EC2's, or None."""
        key = (account, role)
        now = _clock()
        with self._lock:
            seen = self._seen.get(key)
        if seen is not None and seen[0] > now:
            return seen[1]
        try:
            doc = iam.get_role(RoleName=role)["Role"].get("AssumeRolePolicyDocument")
        except ClientError as exc:
            if exc.response.get("Error", {}).get("Code") != "NoSuchEntity":
                raise
            raise ProofError(f"role {role} of account {account} does not exist") from None
        why = trust_admits_others(doc) if doc is not None else "IAM returned none"
        with self._lock:
            self._seen[key] = (now + ROLE_TRUST_TTL_S, why)
        return why


def _clock() -> float:
    return time.monotonic()


# --- the enrollers (ringfence.control.enroll.Enroller) --------------------------------------------


@functools.cache
def _iid_key(pem: str) -> rsa.RSAPublicKey:
    return load_public_key(pem.encode())


def _live_one(live: ec2.LiveInstances, account: str, region: str, instance_id: str) -> dict[str, Any] | None:
    try:
        return live.one(account, region, instance_id)
    except UnservedAccount as exc:  # never looked up with this account's credentials instead
        raise ProofError(str(exc)) from None


LAUNCH_SKEW_S = 300.0
"""How much earlier than the instance's LaunchTime a document's pendingTime may be and still be
this run's (the two are the same start, stamped by different parts of EC2)."""


def _from_an_earlier_run(ident: Identity, inst: Mapping[str, Any]) -> str | None:
    """Why the document is a copy from before the instance last started, or None. EC2 issues a new
    document (with a new pendingTime) at every start: one captured before a stop and start, or
    saved from an earlier run, names a start that is no longer the instance's LaunchTime."""
    launched = inst.get("LaunchTime")
    try:
        pending = datetime.fromisoformat(ident.pending_time)
    except ValueError:
        return None  # not said (a document of an older format): the address and state checks stand
    if not isinstance(launched, datetime) or pending.tzinfo is None or launched.tzinfo is None:
        return None
    if (launched - pending).total_seconds() > LAUNCH_SKEW_S:
        return (
            f"instance {ident.instance_id}'s identity document is from an earlier run (pendingTime "
            f"{ident.pending_time}, the instance started at {launched.isoformat()}): a copy, not the instance's own"
        )
    return None


def enroll_iid(api: AgentApi, req: agentapi.EnrollRequest, *, live: ec2.LiveInstances) -> str:
    """aws-iid: the instance identity document and its signature, bound to the agent's key.
    ``live``: the wiring's EC2 questions (concurrent enrollments share DescribeInstances calls)."""
    if not req.document or not req.document_signature:
        raise ProofError("aws-iid needs document and document_signature")
    ident = verify_iid(req.document, req.document_signature, _iid_key(api.w.cfg.iid_cert_pem))
    if api.w.cfg.allowed_accounts and ident.account not in api.w.cfg.allowed_accounts:
        raise ProofError(f"account {ident.account} is not enrolled with this control plane")
    if req.agent_key is None:
        raise ProofError("aws-iid needs agent_key and agent_signature (the agent's own key)")
    if not api.w.store.burn_nonce(req.nonce):
        raise ProofError("nonce is unknown, expired or already used")
    # the document is public to anything on the instance and may be captured: it names the
    # instance, the agent's key (signing this nonce) is what a second claimant lacks
    credentials.verify_proof(req.agent_key, req.agent_signature, "enroll", ident.instance_id, req.nonce)
    inst = _live_one(live, ident.account, ident.region, ident.instance_id)
    if inst is None or inst.get("State", {}).get("Name") not in ("pending", "running"):
        raise ProofError(f"instance {ident.instance_id} is not running")
    if ident.private_ip and ident.private_ip not in ec2.instance_ips(inst):
        raise ProofError(f"instance {ident.instance_id} does not have the document's address")
    stale = _from_an_earlier_run(ident, inst)
    if stale:
        raise ProofError(stale)
    api.bind_key(req, ident.instance_id)
    if api.w.enroll_records_instance and api.w.store.get(ident.instance_id) is None:
        # the instance as just described (the agent often enrolls before its launch is ingested)
        observe_instances(api.w, ident.account, ident.region, [ident.instance_id], described={ident.instance_id: inst})
        api.w.enqueue_compute([ident.instance_id])
    return ident.instance_id


def enroll_sts(
    api: AgentApi, req: agentapi.EnrollRequest, *, live: ec2.LiveInstances, trust: RoleTrust | None = None
) -> str:
    """aws-sts: a presigned GetCallerIdentity of the instance profile role, replayed. ``trust``:
    the wiring's cache of role trust verdicts (None: one for this call)."""
    if not req.sts_url or not req.sts_headers:
        raise ProofError("aws-sts needs sts_url and sts_headers")
    check_sts_request(req.sts_url, req.sts_headers, req.nonce, api.w.cfg.sts_endpoints)
    if not api.w.store.burn_nonce(req.nonce):
        raise ProofError("nonce is unknown, expired or already used")
    ident = replay_sts(req.sts_url, req.sts_headers)
    if api.w.cfg.allowed_accounts and ident.account not in api.w.cfg.allowed_accounts:
        raise ProofError(f"account {ident.account} is not enrolled with this control plane")
    rec = api.w.store.get(ident.instance_id)
    if rec is None or rec.workload.account != ident.account or not rec.active:
        raise ProofError(f"{ident.instance_id} is not a running instance of account {ident.account} in inventory")
    # the session name is the caller's choice: the role must be the one EC2 hands this instance
    region = rec.workload.region or ""
    inst = _live_one(live, ident.account, region, ident.instance_id)
    if inst is None or inst.get("State", {}).get("Name") != "running":
        raise ProofError(f"instance {ident.instance_id} is not running")
    iam = clients.assumed_client("iam", region, api.w.cfg.account_roles.get(ident.account))
    if ident.role not in instance_profile_roles(iam, inst):
        raise ProofError(f"role {ident.role} is not the instance profile role of {ident.instance_id}")
    # and the session name must be EC2's: any principal the role's trust policy admits (another
    # instance's role credentials, a user) names its session as it likes, i-<victim> included
    why = (trust or RoleTrust()).why_not_ec2s(iam, ident.account, ident.role)
    if why is not None:
        raise ProofError(
            f"role {ident.role} of account {ident.account}: its trust policy admits principals other than EC2 "
            f"({why}): sessions named after an instance are not proof"
        )
    # The instance role's credentials are readable by anything on the host that reaches the
    # metadata service (a local user, an SSRF): they prove the instance, not the agent. So the
    # first binding holds and a key is required, as for aws-iid (a token without one would revoke
    # the bound agent's); a lost key is reset by an onboarding operator.
    api.bind_key(req, ident.instance_id)
    return ident.instance_id
