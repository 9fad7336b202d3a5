"""The real ``ringfence serve --store sqlite:PATH`` and a real paired (dry-run) agent after the
documented key rotation (docs/bundle.md, keys and rotation: a new ``signing-key.pem`` put in place,
then started): ``signing-key.pub.pem``, the file the start-up log and the docs tell operators to
pin, is rewritten to the new key's public key. It kept the old one, and every agent paired
afterwards, pinning it, refused every bundle."""

from __future__ import annotations

import os
from collections.abc import Callable
from pathlib import Path

from ringfence.bundle import SigningKey
from tests.agentproc import AgentProcess
from tests.onprem.conftest import provision_estate
from tests.onprem.serveproc import Server
from tests.test_cli import rf


def test_a_rotated_key_is_the_public_key_agents_are_told_to_pin(
    server: Server, paired_agent: Callable[..., AgentProcess], tmp_path: Path
) -> None:
    provision_estate(server)
    state = server.db.parent
    key, pub = state / "signing-key.pem", state / "signing-key.pub.pem"
    old = pub.read_bytes()
    server.stop()

    # the documented rotation (docs/bundle.md, keys and rotation): a new key put in place, started
    rf("keygen", "--out", str(tmp_path / "new"))
    new_pub = (tmp_path / "new" / "bundle-signing.pub.pem").read_bytes()
    os.replace(tmp_path / "new" / "bundle-signing.pem", key)
    server.start()
    assert pub.read_bytes() == new_pub != old
    assert pub.stat().st_mode & 0o777 == 0o644
    assert f"rewrote {pub}" in server.log.read_text()
    assert SigningKey.from_file(key).public_pem() == new_pub

    # an agent paired now, pinning that file, enforces what the new key signs
    agent = paired_agent("dc1-db-1")
    agent.wait_for(lambda s: s.get("applied_revision"), 60, "the bundle signed by the new key")
    assert agent.status().get("last_rejected") is None, agent.status()

    # started again on the same key: the file is left as it is
    server.stop()
    before = pub.stat().st_mtime_ns
    server.start()
    assert pub.stat().st_mtime_ns == before

    # gone (a restore without it): written again
    server.stop()
    pub.unlink()
    server.start()
    assert pub.read_bytes() == new_pub
    assert f"wrote {pub}" in server.log.read_text()


def test_a_key_given_with_signing_key_is_the_public_key_agents_are_told_to_pin(
    server: Server, paired_agent: Callable[..., AgentProcess], tmp_path: Path
) -> None:
    """Moved from the state directory's own key to ``--signing-key PATH`` (the documented
    rotation, or the move to ``--user``): ``<state>/signing-key.pub.pem``, left by the earlier runs,
    held the old key's public key, and every agent paired from it refused every bundle."""
    provision_estate(server)
    state = server.db.parent
    pub = state / "signing-key.pub.pem"
    old = pub.read_bytes()
    server.stop()

    rf("keygen", "--out", str(tmp_path / "new"))
    given = tmp_path / "new" / "bundle-signing.pem"
    new_pub = (tmp_path / "new" / "bundle-signing.pub.pem").read_bytes()
    (state / "signing-key.pem").unlink()  # moved away, as docs/serve.md says for --user
    server.extra = ["--signing-key", str(given)]
    server.start()
    assert pub.read_bytes() == new_pub != old
    assert pub.stat().st_mode & 0o777 == 0o644
    assert f"rewrote {pub}: it now holds the public key of {given}" in server.log.read_text()

    agent = paired_agent("dc1-db-1")
    agent.wait_for(lambda s: s.get("applied_revision"), 60, "the bundle signed by the given key")
    assert agent.status().get("last_rejected") is None, agent.status()

    # started again on the same key: left as it is
    server.stop()
    before = pub.stat().st_mtime_ns
    server.start()
    assert pub.stat().st_mtime_ns == before
