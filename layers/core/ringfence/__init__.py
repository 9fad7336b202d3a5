"""Ringfence: tags → labels → label policy → per-workload firewall bundles.

Modules import downward only: model → labels/selectors → policy → engine → bundle →
flows/perimeter/events → store → clouds → cli/local.
"""

__version__ = "0.1.0"
