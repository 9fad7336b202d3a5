"""The audit record: who did what to which target, when and why. Append-only, in every store.

Policy provisions and reverts, mode changes, quarantine and release, pairing keys: the local
version store writes these to ``audit.jsonl``, the AWS store to its audit table. ``principal``
is the IAM principal in AWS and the operator (``--author``, ``$RINGFENCE_ACTOR``, ``$USER``)
locally.
"""

from __future__ import annotations

import time
import uuid
from typing import Any

from pydantic import BaseModel, Field


class AuditRecord(BaseModel):
    id: str = Field(default_factory=lambda: uuid.uuid4().hex)
    time: float = Field(default_factory=time.time)
    principal: str
    action: str  # policy.provision | policy.revert | workload.mode | workload.quarantine | …
    target: str
    detail: dict[str, Any] = Field(default_factory=dict)
    reason: str = ""
