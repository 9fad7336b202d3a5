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
import json
import re
import urllib.error
import urllib.request
from collections.abc import Mapping
from dataclasses import dataclass
from datetime import datetime
from typing import TYPE_CHECKING, Any
from urllib.parse import parse_qs, urlsplit
from xml.etree import ElementTree

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


def check_sts_request(url: str, headers: dict[str, str], nonce: str, allowed: list[str]) -> None:
    """Refuse anything but a GetCallerIdentity call to STS that signs our nonce header."""
    if not sts_endpoint_allowed(url, allowed):
        raise ProofError("sts_url is not an STS endpoint this control plane accepts")
    parts = urlsplit(url)
    if parts.path not in ("", "/") or parts.fragment:
        raise ProofError("sts_url must be the STS endpoint's root with a query")
    query = parse_qs(parts.query)
    if query.get("Action") != ["GetCallerIdentity"]:
        raise ProofError("sts_url must call GetCallerIdentity")
    lower = {k.lower(): v for k, v in headers.items()}
    if lower.get(NONCE_HEADER) != nonce:
        raise ProofError(f"the {NONCE_HEADER} header must carry the server nonce")
    auth = lower.get("authorization", "")
    signed = auth.split("SignedHeaders=", 1)[1].split(",", 1)[0].split(";") if "SignedHeaders=" in auth else []
    if NONCE_HEADER not in signed:
        raise ProofError(f"the {NONCE_HEADER} header must be signed (SigV4 SignedHeaders)")


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
    except OSError as exc:
        raise ProofError(f"STS could not be reached: {exc}") from None
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


def enroll_sts(api: AgentApi, req: agentapi.EnrollRequest, *, live: ec2.LiveInstances) -> str:
    """aws-sts: a presigned GetCallerIdentity of the instance profile role, replayed."""
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
    # The instance role's credentials are readable by anything on the host that reaches the
    # metadata service (a local user, an SSRF): they prove the instance, not the agent. So the
    # first binding holds and a key is required, as for aws-iid (a token without one would revoke
    # the bound agent's); a lost key is reset by an onboarding operator.
    api.bind_key(req, ident.instance_id)
    return ident.instance_id
