"""HTTP plumbing shared by the agent and admin APIs."""

from __future__ import annotations

import hashlib
from dataclasses import dataclass, field
from typing import Any

from ringfence import agentapi

# --- agent API --------------------------------------------------------------------------------------


@dataclass
class Response:
    status: int
    body: Any = None
    headers: dict[str, str] = field(default_factory=dict)


def error(status: int, error: str, detail: str = "") -> Response:
    return Response(status, agentapi.ErrorBody(error=error, detail=detail).model_dump())


def secret_hash(secret: str) -> str:
    return hashlib.sha256(secret.encode()).hexdigest()
