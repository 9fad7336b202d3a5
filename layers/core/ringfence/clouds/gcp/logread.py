"""One audit log entry read back from Cloud Logging (``POST /v2/entries:list``), by the log it was
written to, its ``insertId`` and its time: what a pushed entry claims is checked against the
entry Google wrote. Read only where an entry would approve a move into a privileged label value or
name a caller in a finding (:meth:`ringfence.clouds.gcp.ingest.GcpIngest.confirm`), or to find a
label change's first entry that went to another process: the API's read quota is low (60
``entries.list`` requests a minute per project by default), so ordinary events never come here.
"""

from __future__ import annotations

import re
from datetime import UTC, datetime, timedelta
from typing import Any

from google.api_core.exceptions import ServiceUnavailable, from_http_response

from .clients import RETRY, Endpoints

_ACTIVITY = re.compile(r"^projects/([a-z0-9][a-z0-9.:-]{0,99})/logs/cloudaudit\.googleapis\.com%2Factivity$")
WINDOW = timedelta(seconds=1)  # the read asks for entries this close to the claimed time
TIMEOUT = 10.0
PAGE = 50  # entries about one VM read in one request (:meth:`AuditLogReader.about_vm`)
# the compute methods that may write a VM's labels (:meth:`AuditLogReader.label_writes`; ``:`` is
# Logging's substring match: v1., beta. and the split call's entries alike)
WRITE_METHODS = ("compute.instances.setLabels", "compute.instances.update", "compute.instances.insert")
# calls that did not fail (as ingest's ``_entry_failed``: severity ERROR, or a status code other
# than 0; a missing status is OK, and ``NOT`` of a comparison with a missing field is true):
# failed calls, which anyone may make, changed nothing and must not fill the page
SUCCEEDED = 'severity!="ERROR" AND NOT protoPayload.status.code>0'


def activity_log_project(log_name: str | None) -> str | None:
    """The project id of a project's Admin Activity audit log name, else None."""
    m = _ACTIVITY.match(log_name or "")
    return m[1] if m else None


def quoted(value: str) -> str:
    """A string literal of the Logging query language (backslash and double quote escaped)."""
    return '"' + value.replace("\\", "\\\\").replace('"', '\\"') + '"'


def rfc3339(t: datetime) -> str:
    return t.astimezone(UTC).strftime("%Y-%m-%dT%H:%M:%S.%fZ")


class AuditLogReader:
    """Reads log entries back through the Logging API v2 (``entries:list``), with the endpoints'
    credentials (the identity needs ``roles/logging.viewer`` on the served projects)."""

    def __init__(self, endpoints: Endpoints) -> None:
        self.endpoints = endpoints
        self._session: Any = None

    @property
    def session(self) -> Any:
        if self._session is None:
            self._session = self.endpoints.logging_session()
        return self._session

    def find(self, project: str, log_name: str, insert_id: str, at: datetime) -> dict[str, Any] | None:
        """The entry ``insert_id`` of ``log_name`` (a log of ``project``) written within a second of
        ``at``, or None when Cloud Logging has no such entry. Throttling and 503 are retried (as the
        SDK clients' calls are); any other failure raises a ``GoogleAPICallError``."""
        doc = self._entries(project, log_name, f"insertId={quoted(insert_id)}", at - WINDOW, at, "desc")
        for entry in doc.get("entries") or []:
            if isinstance(entry, dict) and entry.get("insertId") == insert_id and entry.get("logName") == log_name:
                return entry
        return None

    def find_first(
        self, project: str, log_name: str, operation: str, last_insert_id: str, at: datetime, since: timedelta
    ) -> tuple[dict[str, Any], dict[str, Any]] | None:
        """The first entry (``operation.first``) of the long-running ``operation`` in ``log_name``,
        written at most ``since`` before ``at`` (its last entry's time), with the last entry
        ``last_insert_id`` (``operation.last``) as the same listing has it; None unless both are
        listed, so a pushed "last" entry Google did not write cannot spend the call's approval or
        finding before the genuine one arrives. For a last entry whose first reached another
        process: what the call set is in the first entry alone. The last entry as logged says when
        the call ended: the pushed one's timestamp is only what its publisher wrote (the window
        finds the genuine entry under a later pushed time too)."""
        doc = self._entries(project, log_name, f"operation.id={quoted(operation)}", at - since, at, "asc")
        first: dict[str, Any] | None = None
        last: dict[str, Any] | None = None
        for entry in doc.get("entries") or []:
            op = entry.get("operation") if isinstance(entry, dict) else None
            if not isinstance(op, dict) or op.get("id") != operation:
                continue
            if op.get("first") is True and first is None:
                first = dict(entry)
            if op.get("last") is True and entry.get("insertId") == last_insert_id and last is None:
                last = dict(entry)
        return (first, last) if first is not None and last is not None else None

    def about_vm(
        self, project: str, log_name: str, instance_id: str, *, compute: bool, tags: bool, since: datetime
    ) -> tuple[list[dict[str, Any]], bool]:
        """The entries of ``log_name`` about the VM ``instance_id`` written from ``since`` to now,
        oldest first (with ``compute``, its compute calls, by ``resource.labels.instance_id``; with
        ``tags``, its Resource Manager tag bindings, whose resource name holds the VM's id: as the
        binding's parent, ``…/instances/ID``, or in a binding's name, where the VM's full resource
        name is percent-encoded, ``…%2Finstances%2FID``, as a ``DeleteTagBinding`` names it), and
        whether that is all of them (one page each: the caller takes a longer listing as holding
        a change it cannot see)."""
        terms = []
        if compute:
            terms.append(f"resource.labels.instance_id={quoted(instance_id)}")
        if tags:
            terms.append(_bindings_of(instance_id))
        return self._pages(project, log_name, terms, since, datetime.now(UTC), "asc")

    def label_writes(
        self,
        project: str,
        log_name: str,
        instance_id: str,
        *,
        compute: bool,
        tags: bool,
        since: datetime,
        until: datetime,
    ) -> tuple[list[dict[str, Any]], bool]:
        """The entries of ``log_name`` of calls that may have written a label of the VM
        ``instance_id`` from ``since`` to ``until`` (and the second after it), newest first: with
        ``compute``, its ``setLabels``, ``instances.update`` and ``instances.insert`` calls; with
        ``tags``, its tag bindings (as :meth:`about_vm`). Only those methods, so that the nearest
        write before ``until`` is on the first page however many other calls (start, stop,
        setMetadata) the VM had; and whether that is all of them (one page each). Failed calls
        (:data:`SUCCEEDED`) are left out: however many of them anyone made, they take no place on
        the page."""
        terms = []
        if compute:
            methods = [f"protoPayload.methodName:{quoted(m)}" for m in WRITE_METHODS]
            terms.append(
                f"resource.labels.instance_id={quoted(instance_id)} AND ({' OR '.join(methods)}) AND {SUCCEEDED}"
            )
        if tags:
            terms.append(f"{_bindings_of(instance_id)} AND {SUCCEEDED}")
        return self._pages(project, log_name, terms, since, until, "desc")

    def _pages(
        self, project: str, log_name: str, terms: list[str], since: datetime, until: datetime, order: str
    ) -> tuple[list[dict[str, Any]], bool]:
        """One page of entries for each of ``terms``, merged in ``order`` of their timestamps, and
        whether that is all of them."""
        found: list[dict[str, Any]] = []
        complete = True
        for term in terms:
            doc = self._entries(project, log_name, term, since, until, order, page=PAGE)
            found += [e for e in doc.get("entries") or [] if isinstance(e, dict)]
            complete &= not doc.get("nextPageToken")
        found.sort(key=lambda e: str(e.get("timestamp", "")), reverse=order == "desc")
        return found, complete

    def _entries(
        self, project: str, log_name: str, term: str, since: datetime, until: datetime, order: str, page: int = 10
    ) -> dict[str, Any]:
        """One page of ``log_name``'s entries matching ``term``, written from ``since`` to a
        second after ``until``."""
        flt = " AND ".join(
            [
                f"logName={quoted(log_name)}",
                term,
                f"timestamp>={quoted(rfc3339(since))}",
                f"timestamp<={quoted(rfc3339(until + WINDOW))}",
            ]
        )
        body = {
            "resourceNames": [f"projects/{project}"],
            "filter": flt,
            "orderBy": f"timestamp {order}",
            "pageSize": page,
        }
        return RETRY(self._list)(body)

    def _list(self, body: dict[str, Any]) -> dict[str, Any]:
        import requests  # google-auth's transport (a google-api-core dependency)

        url = self.endpoints.logging_url + "/v2/entries:list"
        try:
            r = self.session.post(url, json=body, timeout=TIMEOUT)
        except requests.RequestException as exc:
            raise ServiceUnavailable(f"Cloud Logging entries:list: {exc}") from exc  # type: ignore[no-untyped-call]
        if r.status_code >= 400:
            raise from_http_response(r)  # type: ignore[no-untyped-call]
        doc = r.json()
        return doc if isinstance(doc, dict) else {}


def _bindings_of(instance_id: str) -> str:
    """The filter term of the VM's Resource Manager tag bindings: its id as the binding's parent
    (``…/instances/ID``) or percent-encoded in a binding's name (``…%2Finstances%2FID``)."""
    by_parent = f"protoPayload.resourceName:{quoted('/instances/' + instance_id)}"
    by_name = f"protoPayload.resourceName:{quoted('%2Finstances%2F' + instance_id)}"
    return f"({by_parent} OR {by_name})"
