"""The run stores' errors, importable from here as before; they live in :mod:`taskwatch.engine.errors`."""

from ..errors import (
    DuplicateRunId,
    NotATaskwatchStore,
    SchemaInUse,
    SchemaTooNew,
    StoreBusy,
    StoreClosed,
    StoreDriverMissing,
    StoreError,
    StoreGaveUp,
    StoreUnavailable,
    UnknownStore,
)

__all__ = [
    "DuplicateRunId",
    "NotATaskwatchStore",
    "SchemaInUse",
    "SchemaTooNew",
    "StoreBusy",
    "StoreClosed",
    "StoreDriverMissing",
    "StoreError",
    "StoreGaveUp",
    "StoreUnavailable",
    "UnknownStore",
]
