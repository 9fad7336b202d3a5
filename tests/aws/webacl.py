"""The agent API's web ACL as the deployments ship it (template.yaml ``AgentApiWebAcl``, Terraform
``aws_wafv2_web_acl.agent``), and what it answers a request: WAF cannot run here, so its rules
are read from the two documents and judged, statement by statement, the way WAF evaluates them
(rules by priority; Count adds the rule's labels and goes on; a rate-based rule counts and acts on
the requests its scope-down matches, per address, once past its limit in its window). A statement
or field it does not know is an error, not a guess: a rule changed beyond these fails the tests
that use it until it is taught here.

:class:`WebAclStandIn` puts those answers in front of ``ringfence serve`` (an ASGI layer): what
the rules let through reaches the real routes, the rest is answered as WAF would."""

from __future__ import annotations

import collections
import re
import time
from dataclasses import dataclass, field
from typing import Any
from urllib.parse import unquote as url_decode

from tests.aws.test_static import ROOT, hcl, template


def cfn_web_acl() -> dict[str, Any]:
    """The SAM template's web ACL properties (``!Ref`` as ``{"Ref": …}``)."""
    return dict(template()["Resources"]["AgentApiWebAcl"]["Properties"])


_PLURAL = {"rule": "Rules", "text_transformation": "TextTransformations", "response_header": "ResponseHeaders"}
_PLURAL |= {"rule_label": "RuleLabels"}
_NAMES = {"cloudwatch_metrics_enabled": "CloudWatchMetricsEnabled"}


def _camel(key: str) -> str:
    return _NAMES.get(key) or "".join(p.capitalize() for p in key.split("_"))


def _from_hcl(block: dict[str, Any], in_list_statement: bool = False) -> dict[str, Any]:
    """One Terraform block (python-hcl2: nested blocks are lists of dicts) in CloudFormation's
    shape: repeated blocks become the plural list, single ones a mapping, an and/or statement's
    ``statement`` blocks its ``Statements``."""
    out: dict[str, Any] = {}
    for key, value in block.items():
        if key.startswith("__"):
            continue
        if not (isinstance(value, list) and value and all(isinstance(v, dict) for v in value)):
            out[_camel(key)] = value
        elif key == "statement" and in_list_statement:
            out["Statements"] = [_from_hcl(v) for v in value]
        elif key in _PLURAL:
            out[_PLURAL[key]] = [_from_hcl(v) for v in value]
        else:
            (only,) = value
            out[_camel(key)] = _from_hcl(only, key in ("and_statement", "or_statement"))
    return out


def tf_web_acl() -> dict[str, Any]:
    """The Terraform module's web ACL in CloudFormation's shape (:func:`_from_hcl`)."""
    api = hcl(ROOT / "infra/modules/ringfence/api.tf")
    resources = {(k, n): b for block in api["resource"] for k, v in block.items() for n, b in v.items()}
    return _from_hcl(resources[("aws_wafv2_web_acl", "agent")])


@dataclass(frozen=True)
class Request:
    ip: str
    method: str
    path: str  # as sent (percent-encoded), without the query
    headers: tuple[tuple[str, str], ...] = ()


def _field(req: Request, to_match: dict[str, Any]) -> str | None:
    ((kind, arg),) = to_match.items()
    if kind == "UriPath":
        return req.path
    if kind == "Method":
        return req.method
    if kind == "SingleHeader":  # WAF matches header names case-insensitively; none there: no match
        name = str(arg["Name"]).lower()
        return next((v for k, v in req.headers if k.lower() == name), None)
    raise NotImplementedError(f"field {kind}")


def _transformed(value: str, transformations: list[dict[str, Any]]) -> str:
    for t in sorted(transformations, key=lambda t: int(t["Priority"])):
        kind = t["Type"]
        if kind == "URL_DECODE":
            value = url_decode(value)
        elif kind == "LOWERCASE":
            value = value.lower()
        elif kind != "NONE":
            raise NotImplementedError(f"text transformation {kind}")
    return value


def matches(statement: dict[str, Any], req: Request, labels: set[str]) -> bool:
    ((kind, body),) = statement.items()
    if kind == "AndStatement":
        return all(matches(s, req, labels) for s in body["Statements"])
    if kind == "OrStatement":
        return any(matches(s, req, labels) for s in body["Statements"])
    if kind == "NotStatement":
        return not matches(body["Statement"], req, labels)
    if kind == "LabelMatchStatement":
        assert body["Scope"] == "LABEL", body
        return str(body["Key"]) in labels
    if kind in ("RegexMatchStatement", "ByteMatchStatement"):
        raw = _field(req, body["FieldToMatch"])
        if raw is None:
            return False
        value = _transformed(raw, body["TextTransformations"])
        if kind == "RegexMatchStatement":
            return re.search(body["RegexString"], value) is not None
        s, how = str(body["SearchString"]), body["PositionalConstraint"]
        if how == "EXACTLY":
            return value == s
        if how == "STARTS_WITH":
            return value.startswith(s)
        if how == "ENDS_WITH":
            return value.endswith(s)
        if how == "CONTAINS":
            return s in value
        raise NotImplementedError(f"positional constraint {how}")
    raise NotImplementedError(f"statement {kind}")


@dataclass
class WebAcl:
    """A web ACL's rules, judged; ``limit`` stands for every rate-based rule's (a parameter)."""

    acl: dict[str, Any]
    limit: int
    # (rule, address) → when the requests its rate rule counted came
    seen: dict[tuple[str, str], collections.deque[float]] = field(
        default_factory=lambda: collections.defaultdict(collections.deque)
    )

    def answer(self, req: Request, now: float | None = None) -> tuple[int, dict[str, str]] | None:
        """None: let through to the API; else WAF's answer (status, headers)."""
        now = time.monotonic() if now is None else now
        labels: set[str] = set()
        for rule in sorted(self.acl["Rules"], key=lambda r: int(r["Priority"])):
            statement = rule["Statement"]
            if "RateBasedStatement" in statement:
                rate = statement["RateBasedStatement"]
                assert rate["AggregateKeyType"] == "IP", rate
                scope = rate.get("ScopeDownStatement")
                if scope is not None and not matches(scope, req, labels):
                    continue  # neither counted nor acted on
                seen = self.seen[(rule["Name"], req.ip)]
                seen.append(now)
                while seen and seen[0] <= now - int(rate.get("EvaluationWindowSec", 300)):
                    seen.popleft()
                if len(seen) <= self.limit:
                    continue
            elif not matches(statement, req, labels):
                continue
            labels |= {str(lb["Name"]) for lb in rule.get("RuleLabels", [])}
            ((action, how),) = rule["Action"].items()
            if action == "Count":
                continue
            if action == "Allow":
                return None
            if action == "Block":
                custom = how.get("CustomResponse")
                if custom is None:
                    return 403, {}
                return int(custom["ResponseCode"]), {h["Name"]: h["Value"] for h in custom.get("ResponseHeaders", [])}
            raise NotImplementedError(f"action {action}")
        assert self.acl["DefaultAction"] == {"Allow": {}}, self.acl["DefaultAction"]
        return None


class WebAclStandIn:
    """An ASGI layer over ``ringfence serve``'s app answering what ``acl`` would (per client address)."""

    def __init__(self, app: Any, acl: WebAcl) -> None:
        self.app = app
        self.acl = acl
        self.answered: list[tuple[str, str, int]] = []  # (method, path, status) WAF answered itself

    async def __call__(self, scope: dict[str, Any], receive: Any, send: Any) -> None:
        if scope["type"] == "http":
            path = (scope.get("raw_path") or scope["path"].encode()).decode("latin-1")
            headers = tuple((k.decode("latin-1"), v.decode("latin-1")) for k, v in scope["headers"])
            answer = self.acl.answer(Request(scope["client"][0], scope["method"], path, headers))
            if answer is not None:
                status, extra = answer
                self.answered.append((scope["method"], path, status))
                hdrs = [(k.lower().encode(), v.encode()) for k, v in extra.items()] + [(b"content-length", b"0")]
                await send({"type": "http.response.start", "status": status, "headers": hdrs})
                await send({"type": "http.response.body", "body": b""})
                return
        await self.app(scope, receive, send)
