"""Tags → labels: mapping, normalisation, derivation and hygiene.

A bad tag value never becomes a new label. The dimension is left unset, the workload is
flagged, and the engine gives it the policy's ``unlabeled_mode``: bad metadata is visible
(``ringfence labels check``) and has a consequence.

Only tag keys under the policy's reserved prefix (``ringfence:`` by default) carry labels, and
they match exactly (case included), as IAM conditions on tag keys do: one guard on
``ringfence:*`` covers every key that can change a label. A workload whose move into a
privileged value is waiting for approval (:mod:`ringfence.governance`) carries
``held_labels``: those are its labels until the move is approved or undone.
"""

from __future__ import annotations

import difflib
import re
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field

from ringfence.model import Dimension, LabelsConfig, Workload

UNLABELED_KINDS = frozenset({"missing", "unknown", "ungranted"})
"""Problems that make a workload *unlabeled* (it gets ``defaults.unlabeled_mode``)."""


@dataclass(frozen=True, slots=True)
class Problem:
    kind: str  # missing | unknown | conflict | held (previous labels kept) | ungranted (held, none to keep)
    dimension: str
    message: str
    value: str | None = None
    suggestion: str | None = None


@dataclass(slots=True)
class Resolution:
    labels: dict[str, str]
    problems: list[Problem] = field(default_factory=list)

    @property
    def unlabeled(self) -> bool:
        """Hygiene failed: a required dimension is missing or a value is not allowed."""
        return any(p.kind in UNLABELED_KINDS for p in self.problems)


_SLUG = re.compile(r"[^a-z0-9_-]+")


def normalize(value: str, how: str) -> str:
    value = value.strip()
    if how == "none":
        return value
    value = value.lower()
    if how == "slug":
        value = _SLUG.sub("-", value).strip("-")
    return value


def any_account_taggers(patterns: Iterable[str]) -> list[str]:
    """The patterns among ``patterns`` that match an AWS role ARN of any account: a wildcard in or
    before the account field (``arn:aws:iam::*:role/x``, ``arn:*:role/x``), or, with fewer fields,
    anywhere (``*:role/x``, ``*@p.iam.gserviceaccount.com``: ``*`` matches ``:`` too, and a role
    name may hold ``@``). Each trusts a principal of that name created by any account's
    administrator, e.g. a member account's, to approve privileged values."""
    out = []
    for p in patterns:
        parts = p.split(":", 5)
        pinned_by = ":".join(parts[:5]) if len(parts) == 6 else p
        if any(c in pinned_by for c in "*?["):
            out.append(p)
    return out


class LabelMapper:
    """Applies one :class:`LabelsConfig` to workloads from any cloud."""

    def __init__(self, config: LabelsConfig | None = None) -> None:
        self.config = config or LabelsConfig()
        self.dimensions: dict[str, Dimension] = self.config.all_dimensions()
        self._allowed = {
            name: {normalize(v, d.normalize) for v in d.allowed} if d.allowed is not None else None
            for name, d in self.dimensions.items()
        }
        self._aliases = {
            name: {normalize(k, d.normalize): normalize(v, d.normalize) for k, v in d.aliases.items()}
            for name, d in self.dimensions.items()
        }
        self._derive_sources = tuple(sorted({d.derive.source for d in self.dimensions.values() if d.derive}))
        self.key_prefix = self.config.key_prefix
        self.keys: dict[str, tuple[str, ...]] = {
            name: tuple(d.keys) or (self.key_prefix + name,) for name, d in self.dimensions.items()
        }
        self._privileged = {
            name: frozenset(self.canonical_value(name, v) for v in d.privileged)
            for name, d in self.dimensions.items()
            if d.privileged
        }

    def inputs(self, workload: Workload) -> tuple[object, ...]:
        """Everything :meth:`resolve` reads from ``workload``: equal inputs resolve to equal labels."""
        held = workload.held_labels
        return (
            tuple(workload.labels.items()),
            tuple(workload.tags.items()),
            tuple(getattr(workload, source) for source in self._derive_sources),
            None if held is None else tuple(sorted(held.items())),
        )

    # --- governance ----------------------------------------------------------------------------

    @property
    def governed(self) -> bool:
        """Some dimension has privileged values."""
        return bool(self._privileged)

    def privileged_values(self, dim: str) -> frozenset[str]:
        return self._privileged.get(dim, frozenset())

    def is_privileged(self, dim: str, value: str | None) -> bool:
        return value is not None and value in self._privileged.get(dim, ())

    def label_keys(self) -> dict[str, str]:
        """Every tag key that carries a label → its dimension."""
        return {key: dim for dim, keys in self.keys.items() for key in keys}

    def allowed_values(self, dim: str) -> set[str] | None:
        return self._allowed.get(dim)

    def canonical_value(self, dim: str, raw: str) -> str:
        d = self.dimensions[dim]
        value = normalize(raw, d.normalize)
        return self._aliases[dim].get(value, value)

    def resolve(self, workload: Workload) -> Resolution:
        """The labels in force: the held ones while a privileged move waits, else :meth:`resolve_tags`."""
        if workload.held_labels is None:
            return self.resolve_tags(workload)
        return self._resolve_held(workload.held_labels)

    def _resolve_held(self, held: Mapping[str, str]) -> Resolution:
        labels: dict[str, str] = {}
        problems: list[Problem] = []
        for dim, raw in sorted(held.items()):
            if dim not in self.dimensions:
                continue  # the policy no longer has this dimension
            value = self.canonical_value(dim, raw)
            allowed = self._allowed[dim]
            if not value or (allowed is not None and value not in allowed):
                problems.append(Problem("unknown", dim, f"held {dim}={value!r} is not an allowed value", value=value))
                continue
            labels[dim] = value
        if not held:
            problems.append(
                Problem(
                    "ungranted",
                    "*",
                    "a move into a privileged label value waits for approval and there are no previous labels "
                    "to keep: unlabeled until approved",
                )
            )
        else:
            problems.append(
                Problem(
                    "held",
                    "*",
                    "a move into a privileged label value waits for approval: the previous labels stay in force",
                )
            )
            for dim, spec in self.dimensions.items():
                if spec.required and dim not in labels:
                    problems.append(Problem("missing", dim, f"required label {dim!r} is missing"))
        return Resolution(labels, problems)

    def _near(self, dim: str, workload: Workload) -> str:
        """A hint when a tag looks meant for ``dim`` but is not one of its keys (``role``, ``Role``…)."""
        keys = self.keys[dim]
        spellings = {dim, *(k.lower() for k in keys), *(k[len(self.key_prefix) :].lower() for k in keys)}
        near = sorted(k for k in workload.tags if k not in keys and k.lower() in spellings)
        return f" (tag {near[0]!r} carries no label: use {keys[0]!r})" if near else ""

    def resolve_tags(self, workload: Workload) -> Resolution:
        """Labels for ``workload`` from its direct labels, then tags, then derivation (holds ignored)."""
        labels: dict[str, str] = {}
        problems: list[Problem] = []
        for dim, spec in self.dimensions.items():
            candidates: list[tuple[str, str]] = []  # (source, raw value)
            if dim in workload.labels:
                candidates.append((f"label {dim}", workload.labels[dim]))
            for key in self.keys[dim]:
                raw = workload.tags.get(key)
                if raw is not None and raw.strip():
                    candidates.append((f"tag {key}", raw))
            if not candidates and spec.derive is not None:
                src = getattr(workload, spec.derive.source)
                if src:
                    mapped = spec.derive.map.get(src)
                    if mapped is not None or not spec.derive.only_mapped:
                        candidates.append((f"derived from {spec.derive.source}", mapped or src))
            # a value that normalises to nothing (" ", "---" under slug) is no value at all
            values = [(src, v) for src, raw in candidates if (v := self.canonical_value(dim, raw))]
            if not values:
                if spec.required:
                    problems.append(
                        Problem("missing", dim, f"required label {dim!r} is missing" + self._near(dim, workload))
                    )
                continue
            source, value = values[0]
            others = {v for _, v in values[1:] if v != value}
            if others:
                problems.append(
                    Problem(
                        "conflict",
                        dim,
                        f"{dim}: {source} says {value!r} but "
                        + ", ".join(f"{s} says {v!r}" for s, v in values[1:] if v != value)
                        + f"; using {value!r}",
                        value=value,
                    )
                )
            allowed = self._allowed[dim]
            if allowed is not None and value not in allowed:
                close = difflib.get_close_matches(value, sorted(allowed), n=1, cutoff=0.5)
                problems.append(
                    Problem(
                        "unknown",
                        dim,
                        f"{dim}={value!r} ({source}) is not an allowed value"
                        + (f"; did you mean {close[0]!r}?" if close else ""),
                        value=value,
                        suggestion=close[0] if close else None,
                    )
                )
                continue
            labels[dim] = value
        return Resolution(labels, problems)
