"""The lab moved into the library (:mod:`ringfence.local.lab`), shared with ``ringfence demo``.
Kept as a re-export so that branches written against the old path keep working."""

from ringfence.local.lab import AGENT, PROBE, PY, Holder, Lab, prerequisites, sh, wait_until

__all__ = ["AGENT", "PROBE", "PY", "Holder", "Lab", "prerequisites", "sh", "wait_until"]
