"""``ringfence serve`` as a control plane older than the heartbeat's ``agent_version`` field:
its heartbeat model without the field, unknown fields forbidden as in every release, so a
heartbeat carrying it is refused 422 naming ``body.agent_version`` as such a control plane
refuses it. Run as ``python oldcp.py <ringfence> serve ...`` (a :class:`Server` launcher)."""

from __future__ import annotations

import sys
from typing import Any, ClassVar

from pydantic import create_model

from ringfence import agentapi

_fields: dict[str, Any] = {
    name: (info.annotation, info) for name, info in agentapi.Heartbeat.model_fields.items() if name != "agent_version"
}
_Before: Any = create_model("Heartbeat", __base__=agentapi._Body, **_fields)


class Heartbeat(_Before):  # type: ignore[misc]
    agent_version: ClassVar[None] = None  # not a field: what this control plane's code reads of it


agentapi.Heartbeat = Heartbeat  # type: ignore[misc]  # read when serve builds its routes, after this

if __name__ == "__main__":
    from ringfence.cli import main

    sys.exit(main(sys.argv[2:]))
