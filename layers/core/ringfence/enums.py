"""Enforcement modes and rule actions: plain enums, importable without pydantic.

The agent imports the bundle contract, which needs :class:`Mode`; keeping these here (and not
in :mod:`ringfence.model` with every policy schema) keeps the agent's memory small.
"""

from __future__ import annotations

import enum


class Mode(enum.StrEnum):
    """Enforcement mode of a workload."""

    IDLE = "idle"  # firewall untouched
    OBSERVE = "observe"  # nothing blocked; would-be drops reported
    ENFORCE = "enforce"  # default deny in and out


class Action(enum.StrEnum):
    ALLOW = "allow"
    DENY = "deny"
    OVERRIDE_DENY = "override-deny"
