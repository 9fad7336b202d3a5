"""The Ringfence in-VM agent: verifies bundles and programs the host firewall."""


def installed_version() -> str | None:
    """The installed artifact's version (``<release>+<source digest>``, build_artifact.py): which
    build this is after an upgrade; None when run from a checkout, not from the artifact."""
    from importlib import metadata

    try:
        return metadata.version("ringfence-agent")
    except metadata.PackageNotFoundError:
        return None
