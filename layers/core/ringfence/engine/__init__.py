"""The policy engine: label index, compile, incremental updates, explain."""

from ringfence.engine.compiler import Engine, Update, WorkloadState, set_name

__all__ = ["Engine", "Update", "WorkloadState", "set_name"]
