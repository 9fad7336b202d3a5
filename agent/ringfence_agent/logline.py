"""The agent's log line: UTC time, ``ringfence-agent:``, the message, on stderr (journald keeps it).
A module of its own so the sources can log without importing the daemon."""

from __future__ import annotations

import sys
import time


def log(msg: str) -> None:
    print(f"{time.strftime('%Y-%m-%dT%H:%M:%SZ', time.gmtime())} ringfence-agent: {msg}", file=sys.stderr, flush=True)
