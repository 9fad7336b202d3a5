"""Strings from outside (tag values, workload ids, audit reasons, version messages, a caller's
request) made safe for one line of a terminal or a log.

A newline in such a string forges a whole line of a listing or a log (an audit record, a
"provisioned by" log line); an escape sequence moves the cursor, hides text or writes the
clipboard (OSC 52). :func:`line` shows each such character visibly, as ``\\n`` or ``\\x1b``, so
the text stays readable and nothing in it acts. :class:`LogEscape` does the same to every record a
log handler writes; :func:`escape_logs` installs it.
"""

from __future__ import annotations

import json
import logging
import re
import traceback
from typing import Any

# C0, DEL, C1; the Unicode line and paragraph separators (a line break to many viewers); the bidi
# embeddings, overrides and isolates, which reorder what a terminal shows
UNSAFE = re.compile("[\x00-\x1f\x7f-\x9f\u2028\u2029\u202a-\u202e\u2066-\u2069]")
_NAMED = {"\n": "\\n", "\r": "\\r", "\t": "\\t"}


def _shown(m: re.Match[str]) -> str:
    c = m.group()
    return _NAMED.get(c) or (f"\\x{ord(c):02x}" if ord(c) < 0x100 else f"\\u{ord(c):04x}")


def line(text: object) -> str:
    """``text`` with every character that could break or drive a terminal line shown escaped."""
    return UNSAFE.sub(_shown, str(text))


def unsafe_char(text: str) -> str | None:
    """The first such character of ``text``, escaped, or None (for an error naming it)."""
    m = UNSAFE.search(text)
    return _shown(m) if m else None


def _traceback(exc: BaseException) -> str:
    """The traceback as logging writes it, each frame on its lines; what an exception says (its
    message, a note: any text) escaped whole, so that a newline in it cannot start a line."""
    out = []
    for chunk in traceback.TracebackException.from_exception(exc).format():
        if chunk.startswith("  File "):  # a frame: a file, a line number, the source line
            out.append("\n".join(line(x) for x in chunk.split("\n")))
        else:  # the blank lines around a chained exception's header stay
            body = chunk.strip("\n")
            lead, trail = len(chunk) - len(chunk.lstrip("\n")), len(chunk) - len(chunk.rstrip("\n"))
            out.append("\n" * lead + line(body) + "\n" * trail)
    return "".join(out).removesuffix("\n")


class LogEscape(logging.Filter):
    """Escapes the message of every record its handler writes, and what its exception says (a
    traceback's frames and a stack keep their line breaks, each line escaped). Never drops a
    record."""

    def filter(self, record: logging.LogRecord) -> bool:
        try:
            message = record.getMessage()
        except Exception:  # a bad format: logging reports it; leave the record as it is
            return True
        record.msg, record.args = line(message), None
        record.__dict__.pop("color_message", None)  # uvicorn's coloured copy of the raw message
        if record.exc_info and record.exc_info[1] is not None:
            record.exc_text = _traceback(record.exc_info[1])
        elif record.exc_text:
            record.exc_text = line(record.exc_text)
        if record.stack_info:
            record.stack_info = "\n".join(line(x) for x in record.stack_info.split("\n"))
        return True


def escape_logs() -> None:
    """:class:`LogEscape` on every handler configured now (the root's and every logger's), once."""
    loggers = [logging.getLogger(), *(x for x in logging.Logger.manager.loggerDict.values())]
    for lg in loggers:
        for h in getattr(lg, "handlers", ()):
            if not any(isinstance(f, LogEscape) for f in h.filters):
                h.addFilter(LogEscape())


def json_line(obj: Any) -> str:
    """One JSON log record with every character outside ASCII escaped (``\\u2028``, ``\\u0085``):
    the Lambda functions' Powertools loggers write JSON, which escapes C0 controls but, with its
    default ``ensure_ascii=False``, writes C1 controls and the line separators raw."""
    return json.dumps(obj, default=str, separators=(",", ":"), ensure_ascii=True)
