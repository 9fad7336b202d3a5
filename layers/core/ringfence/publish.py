"""Engine output → signed documents: the one place bundles and set deltas are rendered and signed.

Every publisher (the CLI, the demo, the AWS compute function, test labs) goes through here, so
what agents receive is produced one way.
"""

from __future__ import annotations

from ringfence import bundle
from ringfence.addresses import format_prefix
from ringfence.engine import Engine, Update


def signed_bundle(engine: Engine, workload_id: str, signer: bundle.Signer | None) -> bundle.Bundle:
    doc = bundle.Bundle.model_validate(engine.render(workload_id))
    return bundle.sign(doc, signer) if signer is not None else doc


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
