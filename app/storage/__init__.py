"""SQL storage: samples, model registry (versions, weights, promotion history), retrain jobs."""

from app.storage.sample_admin import (
    SampleActionOutcome,
    SampleAuditEntry,
    SampleAuditTrail,
    SampleListing,
    SampleSelection,
    SelectionError,
    StoredSample,
)
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

__all__ = ["IdempotencyConflict", "IngestResult", "JobRecord", "Promotion", "SampleActionOutcome",
           "SampleAuditEntry", "SampleAuditTrail", "SampleListing", "SampleSelection", "SampleSet",
           "SelectionError", "Store", "StoredSample", "UnknownVersion", "VersionRecord", "open_store"]
