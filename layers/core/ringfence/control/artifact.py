"""The agent artifact as the stack hosts it: the wheel ``make agent-artifact`` builds, its
``.sha256`` and the installer, stored under ``agent/<name>`` in the bundle store and served
without a token by ``GET /v1/agent/{name}``.

The server that serves them is not what vouches for them: ``ringfence publish-agent`` prints the
wheel's digest and the installer's, hosts get both out of band (user data, SSM, the deploy's
output), check the installer with ``sha256sum -c`` before running it as root and pass the wheel's
to ``install.sh --artifact-sha256``, which refuses any other bytes. The ``.sha256`` served beside
the wheel is a convenience for comparing, never the check.

Every name is immutable: the wheel's version carries its source's digest (build_artifact.py),
the installer is ``install-<16 hex of its SHA-256>.sh``, and publishing refuses to put other bytes
under a name already published (:meth:`Publisher.put_once`), so a host pinned to an earlier build
still finds it after a newer one is published.
"""

from __future__ import annotations

import hashlib
import re
from dataclasses import dataclass
from pathlib import Path

from .publish import Publisher

PREFIX = "agent/"
# content-addressed: 16 hex of the installer's SHA-256
INSTALLER = re.compile(r"install-[0-9a-f]{16}\.sh")
# what publishes before the installer was pinned wrote: still served (never written now) so that
# launch templates made then keep installing what they did, until their user data is replaced
LEGACY_INSTALLER = "install.sh"
# PEP 440 release, pre, post and dev parts and a local label (build_artifact.py: the source's
# digest) of lower-case letters and digits: no path separators, no dots outside a version
WHEEL = re.compile(
    r"ringfence_agent-\d+(?:\.\d+)*(?:(?:a|b|rc)\d+)?(?:\.post\d+)?(?:\.dev\d+)?"
    r"(?:\+[a-z0-9]+(?:\.[a-z0-9]+)*)?-py3-none-any\.whl"
)
BINARY = "application/octet-stream"
TEXT = "text/plain; charset=utf-8"


class ArtifactError(ValueError):
    """No artifact to publish, or one whose ``.sha256`` names other bytes."""


def content_type(name: str) -> str | None:
    """What ``name`` is served as, or None when it is not a name of the artifact (a 404)."""
    if (
        INSTALLER.fullmatch(name)
        or name == LEGACY_INSTALLER
        or (name.endswith(".sha256") and WHEEL.fullmatch(name.removesuffix(".sha256")))
    ):
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
    installer: str  # install-<16 hex>.sh: the URL is <agent API>/v1/agent/<installer>
    installer_sha256: str  # what hosts check the installer against before running it (out of band)
    keys: tuple[str, ...]


def find_wheel(directory: Path) -> Path:
    """The one agent wheel in ``directory`` (as ``make agent-artifact`` leaves it)."""
    wheels = sorted(p for p in directory.glob("ringfence_agent-*.whl") if WHEEL.fullmatch(p.name))
    if not wheels:
        raise ArtifactError(f"no ringfence_agent-<version>-py3-none-any.whl in {directory} (make agent-artifact)")
    if len(wheels) > 1:
        raise ArtifactError(f"several agent wheels in {directory}: {', '.join(p.name for p in wheels)}; keep one")
    return wheels[0]


def installer_name(digest: str) -> str:
    return f"install-{digest[:16]}.sh"


def publish(publisher: Publisher, wheel: Path, installer: Path) -> Published:
    """Store the wheel, its ``.sha256`` (``sha256sum -c`` format) and the installer, each only
    where nothing else is (:class:`ringfence.control.publish.Conflict` otherwise)."""
    body = wheel.read_bytes()
    digest = hashlib.sha256(body).hexdigest()
    side = wheel.with_name(wheel.name + ".sha256")
    if side.exists() and side.read_text().split()[:1] != [digest]:
        raise ArtifactError(f"{side} does not name the digest of {wheel.name} ({digest}): rebuild")
    script = installer.read_bytes()
    script_digest = hashlib.sha256(script).hexdigest()
    script_name = installer_name(script_digest)
    # the wheel last: a name hosts can install from is published only once all of it is there
    publisher.put_once(key(script_name), script, TEXT)
    publisher.put_once(key(side.name), f"{digest}  {wheel.name}\n".encode(), TEXT)
    publisher.put_once(key(wheel.name), body, BINARY)
    return Published(
        wheel.name, digest, script_name, script_digest, (key(wheel.name), key(side.name), key(script_name))
    )
