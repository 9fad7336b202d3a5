"""Engine output → signed documents: the one place bundles and set deltas are rendered and signed.

Every publisher (the CLI, the demo, the AWS compute function, test labs) goes through here, so
what agents receive is produced one way.
"""

from __future__ import annotations

import ipaddress
from collections.abc import Mapping
from dataclasses import dataclass

from ringfence import bundle
from ringfence.addresses import format_prefix
from ringfence.engine import Engine, Update
from ringfence.staticlayout import Head


def signed_bundle(
    engine: Engine, workload_id: str, signer: bundle.Signer | None, *, expires_at: int | None = None
) -> bundle.Bundle:
    """The workload's bundle, signed when a signer is given (expiring at ``expires_at``, default
    ``bundle.DEFAULT_TTL`` from now)."""
    doc = bundle.Bundle.model_validate(engine.render(workload_id))
    return bundle.sign(doc, signer, expires_at=expires_at) if signer is not None else doc


def delta_documents(update: Update, signer: bundle.Signer | None) -> list[bundle.SetDelta]:
    """One document per changed set, shared by every agent whose bundle holds that set."""
    out = []
    for name, (from_version, added, removed) in sorted(update.set_deltas.items()):
        doc = bundle.SetDelta(
            set=name,
            from_version=from_version,
            to_version=update.revision,
            add=[format_prefix(p) for p in added],
            remove=[format_prefix(p) for p in removed],
        )
        out.append(bundle.sign(doc, signer) if signer is not None else doc)
    return out


@dataclass(slots=True)
class StaticRelease:
    """One offline compile laid out for a static source (unsigned; the caller signs)."""

    bundles: dict[str, bundle.Bundle]
    heads: dict[str, Head]
    deltas: list[bundle.SetDelta]


def static_release(
    fresh: Mapping[str, bundle.Bundle],
    previous: Mapping[str, bundle.Bundle],
    previous_heads: Mapping[str, Head],
    revision: int,
) -> StaticRelease:
    """``fresh`` bundles (all rendered at ``revision``) continued from the ``previous`` compile's.

    A set whose content did not change keeps its previous version; one that changed gets
    ``revision`` and a delta from its previous version. A workload whose own rules did not change
    keeps its rules version, so an unchanged bundle keeps its version and its bytes, and an agent
    holding it learns from the head that set deltas are enough.
    """
    # set name → (version, content; None when two bundles disagree on the content at that version)
    before: dict[str, tuple[int, frozenset[str] | None]] = {}
    for b in previous.values():
        for name, s in b.sets.items():
            entry = (s.version, frozenset((*s.v4, *s.v6)))
            old = before.get(name)
            # bundles of workloads gone from the inventory stay behind with older versions: the
            # newest version is what current agents hold
            if old is None or entry[0] > old[0]:
                before[name] = entry
            elif entry[0] == old[0] and entry[1] != old[1]:
                before[name] = (old[0], None)
    now: dict[str, frozenset[str]] = {}
    for b in fresh.values():
        for name, s in b.sets.items():
            now.setdefault(name, frozenset((*s.v4, *s.v6)))
    versions: dict[str, int] = {}
    deltas: list[bundle.SetDelta] = []
    for name, elements in sorted(now.items()):
        prev = before.get(name)
        if prev is not None and prev[1] == elements:
            versions[name] = prev[0]
            continue
        versions[name] = revision
        if prev is not None and prev[1] is not None and prev[0] < revision:
            deltas.append(
                bundle.SetDelta(
                    set=name,
                    from_version=prev[0],
                    to_version=revision,
                    add=_ordered(elements - prev[1]),
                    remove=_ordered(prev[1] - elements),
                )
            )
    bundles: dict[str, bundle.Bundle] = {}
    heads: dict[str, Head] = {}
    for wid, b in fresh.items():
        sets = {name: s.model_copy(update={"version": versions[name]}) for name, s in b.sets.items()}
        prev_b = previous.get(wid)
        if prev_b is not None and _rules(prev_b) == _rules(b):
            h = previous_heads.get(wid)
            rules_version = h.rules_version if h is not None and h.version == prev_b.version else prev_b.version
        else:
            rules_version = revision
        version = max([rules_version, *(s.version for s in sets.values())])
        bundles[wid] = b.model_copy(update={"version": version, "sets": sets})
        heads[wid] = Head(wid, version, rules_version, {name: s.version for name, s in sets.items()})
    return StaticRelease(bundles, heads, deltas)


def _rules(b: bundle.Bundle) -> dict[str, object]:
    """What only a whole bundle can change: everything but versions and set contents."""
    content = b.content()
    content["sets"] = sorted(content["sets"])
    return content


def _ordered(cidrs: frozenset[str]) -> list[str]:
    return sorted(cidrs, key=lambda c: (":" in c, ipaddress.ip_network(c)))
