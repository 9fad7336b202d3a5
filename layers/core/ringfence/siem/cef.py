"""An OCSF event (:mod:`ringfence.siem.ocsf`) as one CEF line (ArcSight Common Event Format,
version 0): ``CEF:0|Ringfence|Ringfence|<version>|<type_uid>|<name>|<severity 0-10>|<extension>``.

Header fields escape ``\\`` and ``|``; extension values escape ``\\``, ``=`` and line breaks, as
the format requires; any other control character or Unicode line separator becomes a space, so
an event is always one line however its reader splits lines. The full OCSF event stays the authority: CEF carries the fields SIEMs index.
"""

from __future__ import annotations

import re
from typing import Any

from ringfence.siem.ocsf import PRODUCT

# OCSF severity_id (0 Unknown … 6 Fatal) → CEF severity (0-10)
_SEVERITY = {0: 0, 1: 1, 2: 3, 3: 5, 4: 7, 5: 9, 6: 10, 99: 5}


# every character a reader may take for a line break or that is not text: C0 and C1 controls
# (NUL, U+0085 NEL), DEL and the Unicode line and paragraph separators (str.splitlines() splits
# at \v, \f, \x1c-\x1e, U+0085, U+2028, U+2029 too)
_CONTROL = re.compile("[\x00-\x1f\x7f-\x9f\u2028\u2029]")


def _header(value: object) -> str:
    return _CONTROL.sub(" ", str(value).replace("\\", "\\\\").replace("|", "\\|"))


def _ext(value: object) -> str:
    text = str(value).replace("\\", "\\\\").replace("=", "\\=").replace("\r\n", "\\n")
    return _CONTROL.sub(_escape, text)


def _escape(m: re.Match[str]) -> str:
    c = m.group()
    return "\\n" if c == "\n" else "\\r" if c == "\r" else " "


def to_cef(event: dict[str, Any]) -> str:
    ext: dict[str, object] = {"rt": event["time"], "cat": event.get("class_name", ""), "msg": event.get("message", "")}
    md = event.get("metadata", {})
    if md.get("uid"):
        ext["externalId"] = md["uid"]
    src, dst = event.get("src_endpoint", {}), event.get("dst_endpoint", {})
    for key, ep, field in (("src", src, "ip"), ("spt", src, "port"), ("dst", dst, "ip"), ("dpt", dst, "port")):
        if ep.get(field) is not None:
            ext[key] = ep[field]
    if "connection_info" in event:
        ext["proto"] = event["connection_info"].get("protocol_name", "")
        ext["deviceDirection"] = 0 if event["connection_info"].get("direction_id") == 1 else 1
    if "action" in event:
        ext["act"] = event["action"]
    if "count" in event:
        ext["cnt"] = event["count"]
    # folded drops and suppression summaries: the first and last drop (ms since the epoch)
    for key, attr in (("start", "start_time"), ("end", "end_time")):
        if attr in event:
            ext[key] = event[attr]
    actor = event.get("actor", {}).get("user", {})
    if actor.get("name"):
        ext["suser"] = actor["name"]
    if "api" in event:
        ext["cs1Label"], ext["cs1"] = "operation", event["api"]["operation"]
    if event.get("resources"):
        ext["cs2Label"], ext["cs2"] = "target", event["resources"][0]["uid"]
    audit = event.get("unmapped", {}).get("audit")
    if audit:
        ext["cn1Label"], ext["cn1"] = "seq", audit["seq"]
        ext["cs3Label"], ext["cs3"] = "hash", audit["hash"]
    rf = event.get("unmapped", {}).get("ringfence", {})
    if rf.get("rule_id"):
        ext["cs4Label"], ext["cs4"] = "rule", rf["rule_id"]
    if "suppressed" in rf:  # a summary has no endpoints: the workload is named here
        ext["cs6Label"], ext["cs6"] = "workload", rf["workload_id"]
    if "finding_info" in event:
        ext["cs5Label"], ext["cs5"] = "finding", event["finding_info"]["title"]
    name = (
        event.get("finding_info", {}).get("title") or f"{event.get('class_name', '')}: {event.get('activity_name', '')}"
    )
    head = [
        "CEF:0",
        _header(PRODUCT["vendor_name"]),
        _header(PRODUCT["name"]),
        _header(PRODUCT["version"]),
        _header(event["type_uid"]),
        _header(name),
        str(_SEVERITY.get(int(event.get("severity_id", 0)), 5)),
    ]
    return "|".join(head) + "|" + " ".join(f"{k}={_ext(v)}" for k, v in ext.items())
