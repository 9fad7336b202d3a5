"""The policy engine: label index, compile, incremental updates, explain.

The compiler is imported when first asked for, so ``ringfence.engine.connectivity`` (the matrix
from an inventory) and ``ringfence.engine.explain`` load without it.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from ringfence.engine.compiler import Engine, Update, WorkloadState, set_name

__all__ = ["Engine", "Update", "WorkloadState", "set_name"]


def __getattr__(name: str) -> Any:
    if name in __all__:
        from ringfence.engine import compiler

        return getattr(compiler, name)
    raise AttributeError(f"module 'ringfence.engine' has no attribute {name!r}")
