"""The agent artifact as the stack hosts it: the wheel ``make agent-artifact`` builds, its
``.sha256`` and ``install.sh``, stored under ``agent/<name>`` in the bundle store and served
without a token by ``GET /v1/agent/{name}``.

The server that serves the wheel is not what vouches for it: ``ringfence publish-agent`` prints
the digest, and hosts get it out of band (user data, SSM, the deploy's output) and pass it to
``install.sh --artifact-sha256``, which refuses any other bytes. The ``.sha256`` served beside the
wheel is a convenience for comparing, never the check.
"""

from __future__ import annotations

import hashlib
import re
from dataclasses import dataclass
from pathlib import Path

from .publish import Publisher

PREFIX = "agent/"
INSTALLER = "install.sh"
# PEP 440 release, pre, post and dev parts only: no path separators, no dots outside a version
WHEEL = re.compile(r"ringfence_agent-\d+(?:\.\d+)*(?:(?:a|b|rc)\d+)?(?:\.post\d+)?(?:\.dev\d+)?-py3-none-any\.whl")
BINARY = "application/octet-stream"
TEXT = "text/plain; charset=utf-8"


class ArtifactError(ValueError):
    """No artifact to publish, or one whose ``.sha256`` names other bytes."""


def content_type(name: str) -> str | None:
    """What ``name`` is served as, or None when it is not a name of the artifact (a 404)."""
    if name == INSTALLER or (name.endswith(".sha256") and WHEEL.fullmatch(name.removesuffix(".sha256"))):
        return TEXT
    if WHEEL.fullmatch(name):
        return BINARY
    return None


def key(name: str) -> str:
    if content_type(name) is None:
        raise ArtifactError(f"{name!r} is not a name of the agent artifact")
    return PREFIX + name


@dataclass(frozen=True)
class Published:
    wheel: str  # the wheel's file name: the URL is <agent API>/v1/agent/<wheel>
    sha256: str  # what hosts pass to install.sh --artifact-sha256 (out of band)
    keys: tuple[str, ...]


def find_wheel(directory: Path) -> Path:
    """The one agent wheel in ``directory`` (as ``make agent-artifact`` leaves it)."""
    wheels = sorted(p for p in directory.glob("ringfence_agent-*.whl") if WHEEL.fullmatch(p.name))
    if not wheels:
        raise ArtifactError(f"no ringfence_agent-<version>-py3-none-any.whl in {directory} (make agent-artifact)")
    if len(wheels) > 1:
        raise ArtifactError(f"several agent wheels in {directory}: {', '.join(p.name for p in wheels)}; keep one")
    return wheels[0]


def publish(publisher: Publisher, wheel: Path, installer: Path) -> Published:
    """Store the wheel, its ``.sha256`` (``sha256sum -c`` format) and ``install.sh``."""
    body = wheel.read_bytes()
    digest = hashlib.sha256(body).hexdigest()
    side = wheel.with_name(wheel.name + ".sha256")
    if side.exists() and side.read_text().split()[:1] != [digest]:
        raise ArtifactError(f"{side} does not name the digest of {wheel.name} ({digest}): rebuild")
    publisher.put_bytes(key(wheel.name), body, BINARY)
    publisher.put_text(key(side.name), f"{digest}  {wheel.name}\n")
    publisher.put_text(key(INSTALLER), installer.read_text())
    return Published(wheel.name, digest, (key(wheel.name), key(side.name), key(INSTALLER)))
