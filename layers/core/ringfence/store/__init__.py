"""Control-plane state: inventory, engine head, published-artifact index, agent auth, audit.

:mod:`ringfence.store.base` is the provider-neutral interface and records;
:mod:`ringfence.store.dynamodb` implements it on DynamoDB (the only module here that imports boto3).
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
]
