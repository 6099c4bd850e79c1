"""What every aggregate of the store shares: the engine, the schema upgrade, and small helpers
(UTC times, JSON-safe values, hashes)."""

from __future__ import annotations

import hashlib
import math
from datetime import UTC, datetime
from typing import Any

import numpy as np
from sqlalchemy import Engine, insert
from sqlalchemy.exc import IntegrityError

from app.storage.connection import make_engine
from app.storage.guard import StoreTimeouts
from app.storage.migrate import upgrade_to_head
from app.storage.schema import LEASE_NAMES, active_model, leases


def utcnow() -> datetime:
    return datetime.now(UTC)


def as_utc(value: datetime | None) -> datetime | None:
    if value is None or value.tzinfo is not None:
        return value
    return value.replace(tzinfo=UTC)  # SQLite hands back naive datetimes


def clean_json(value: Any) -> Any:
    """JSON-safe copy: non-finite floats → None (Postgres json rejects NaN/Infinity)."""
    if isinstance(value, float):
        return value if math.isfinite(value) else None
    if isinstance(value, dict):
        return {str(k): clean_json(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [clean_json(v) for v in value]
    if isinstance(value, np.generic):
        return clean_json(value.item())
    return value


def sha256_hex(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


class StoreBase:
    """The engine and the schema; the aggregates (samples, registry, jobs) add their tables."""

    def __init__(self, url: str, engine: Engine | None = None, timeouts: StoreTimeouts | None = None) -> None:
        self.url = url
        self.timeouts = timeouts or StoreTimeouts.from_settings()  # call_s: what serving callers wait
        self.engine = engine or make_engine(url, self.timeouts)

    @property
    def backend(self) -> str:
        return self.engine.dialect.name

    def dispose(self) -> None:
        self.engine.dispose()

    # ---- schema --------------------------------------------------------------------------
    def create_schema(self) -> None:
        """Upgrade the schema to the newest revision, then insert the singleton rows.

        Safe to run from several processes: the upgrade is serialised by a lock (see
        app.storage.migrate) and the singleton inserts ignore rows that already exist.
        """

        upgrade_to_head(self.engine)
        self._insert_ignore(active_model, [{"id": 1, "version": None, "updated_at": None}])
        self._insert_ignore(leases, [{"name": n, "holder": None, "expires_at": None} for n in LEASE_NAMES])

    def _insert_ignore(self, table: Any, rows: list[dict[str, Any]]) -> None:
        for row in rows:
            try:
                with self.engine.begin() as conn:
                    conn.execute(insert(table).values(**row))
            except IntegrityError:
                pass

