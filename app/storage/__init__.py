"""SQL storage: samples, model registry (versions, weights, promotion history), retrain jobs."""

from app.storage.store import (
    IdempotencyConflict,
    IngestResult,
    JobRecord,
    Promotion,
    SampleSet,
    Store,
    UnknownVersion,
    VersionRecord,
    open_store,
)

__all__ = ["IdempotencyConflict", "IngestResult", "JobRecord", "Promotion", "SampleSet", "Store",
           "UnknownVersion", "VersionRecord", "open_store"]
