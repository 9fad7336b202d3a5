"""Control-plane state: inventory, engine head, published-artifact index, agent auth, audit.

:mod:`ringfence.store.base` is the provider-neutral interface and records;
:mod:`ringfence.store.dynamodb` implements it on DynamoDB (the only module here that imports boto3),
:mod:`ringfence.store.sqlite` in one SQLite file (``ringfence serve`` on premise). Both are held to
one contract test (``tests/aws/test_store.py``). :func:`open_store` opens either from a spec.
"""

from ringfence.store.base import (
    AuditRecord,
    BundlePointer,
    ConflictError,
    DeltaPointer,
    EngineHead,
    InventoryRecord,
    Store,
)

__all__ = [
    "AuditRecord",
    "BundlePointer",
    "ConflictError",
    "DeltaPointer",
    "EngineHead",
    "InventoryRecord",
    "Store",
    "open_store",
]


def open_store(spec: str, *, read_only: bool = False) -> Store:
    """``sqlite:PATH`` (a file, created if missing; with ``read_only`` it must exist and is opened
    read-only: see :class:`~ringfence.store.sqlite.SqliteStore`) or ``dynamodb:INVENTORY,STATE,AUDIT``
    (table names; region and credentials as boto3 finds them)."""
    kind, sep, rest = spec.partition(":")
    if kind == "sqlite" and sep and rest:
        from ringfence.store.sqlite import SqliteStore

        return SqliteStore(rest, read_only=read_only)
    if kind == "dynamodb" and sep:
        tables = rest.split(",")
        if len(tables) == 3 and all(tables):
            from ringfence.store.dynamodb import DynamoStore

            return DynamoStore(*tables)
    raise ValueError(f"store {spec!r}: expected sqlite:PATH or dynamodb:INVENTORY,STATE,AUDIT")
