"""How wide a fail-safe prefix may be: the bound both sides of the wire enforce.

Apart from :mod:`ringfence.bundlewire` (which re-exports it) so that loading a policy, which
checks its fail-safes, does not import the bundle format's classes, hashing and signing (a
third of ``ringfence connectivity``'s import time). Standard library only: the agent ships it.
"""

from __future__ import annotations

# The widest prefix a fail-safe address list (``admin_cidrs``, ``control_plane``) may hold, per
# address family. A fail-safe is what no bundle can remove: "everything" would make every bundle
# moot, and so would halves or quarters of it (0.0.0.0/1 + 128.0.0.0/1), so the bound is a prefix
# length, not a list of forbidden values. /8 still takes 10.0.0.0/8; /32 an IPv6 allocation.
FAILSAFE_WIDEST = {4: 8, 6: 32}


def failsafe_width_problem(version: int, prefixlen: int) -> str | None:
    """Why a fail-safe prefix of this family and length is refused, or None."""
    widest = FAILSAFE_WIDEST[version]
    if prefixlen >= widest:
        return None
    what = "every address" if prefixlen == 0 else f"a /{prefixlen}"
    return (
        f"a fail-safe may not open {what}: IPv{version} fail-safe prefixes must be /{widest} or longer "
        "(a fail-safe is what no policy rule can remove)"
    )
