"""The lab's IMDSv2 stand-in (:class:`ringfence.local.imds.Imds`, the one the demo runs) for the
tests: each caller is told the identity of the instance at its address, its document built by the
embedded AWS from moto and signed with the tests' IID key."""

from __future__ import annotations

from collections.abc import Callable, Iterator
from contextlib import contextmanager

from ringfence.local.imds import Imds
from ringfence.local.lab import in_netns
from tests.aws.conftest import Env


@contextmanager
def running_imds(
    env: Env,
    instance_at: Callable[[str], str | None],
    host: str = "127.0.0.1",
    netns: str | None = None,
    port: int = 0,
) -> Iterator[str]:
    """The IMDS listening on ``host`` (``port``, a free one by default; inside ``netns`` when
    given): its base URL."""

    def make() -> Imds:
        return Imds(instance_at, env.aws.identity_document, env.iid.sign, host=host, port=port)

    if netns is None:
        imds = make()
    else:
        with in_netns(netns):  # the listening socket is created in the namespace and stays there
            imds = make()
    imds.start()
    try:
        yield f"http://{host}:{imds.server.server_address[1]}"
    finally:
        imds.stop()
