"""The SQL store: one object over a SQLAlchemy engine, composed of one mixin per aggregate.

- :mod:`app.storage.samples` — samples, ingest batches, sample administration;
- :mod:`app.storage.registry` — model versions, the active pointer, promotions;
- :mod:`app.storage.jobs` — retrain jobs and leases;
- :mod:`app.storage.base` — the engine and the schema upgrade; :mod:`app.storage.connection`
  builds the engine per backend.

Nothing SQLite-specific beyond connection pragmas, so the same code runs on
``postgresql+psycopg://…``. The store deals in bytes and numpy arrays; turning weights into
torch modules is the serving layer's job.
"""

from __future__ import annotations

from app.storage.base import StoreBase, as_utc, clean_json, sha256_hex, utcnow
from app.storage.connection import make_engine
from app.storage.jobs import (
    CANCEL_REQUESTED,
    FINISHED_JOB_STATUSES,
    UNFINISHED_JOB_STATUSES,
    JobRecord,
    JobRepository,
)
from app.storage.registry import Promotion, RegistryRepository, UnknownVersion, VersionRecord
from app.storage.samples import IdempotencyConflict, IngestResult, SampleRepository, SampleSet

__all__ = ["CANCEL_REQUESTED", "FINISHED_JOB_STATUSES", "UNFINISHED_JOB_STATUSES", "IdempotencyConflict",
           "IngestResult", "JobRecord", "Promotion", "SampleSet", "Store", "UnknownVersion", "VersionRecord",
           "as_utc", "clean_json", "make_engine", "open_store", "sha256_hex", "utcnow"]


class Store(SampleRepository, RegistryRepository, JobRepository, StoreBase):
    """Samples, model registry and jobs over one engine (see the modules above)."""


def open_store(url: str, create: bool = True) -> Store:
    store = Store(url)
    if create:
        store.create_schema()
    return store
