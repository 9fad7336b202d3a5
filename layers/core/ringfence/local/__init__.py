"""The control plane on one machine: :mod:`ringfence.local.wiring` (SQLite store, file publisher,
in-process compute worker) for ``ringfence serve`` on premise."""
