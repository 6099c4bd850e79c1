"""What one retrain reads, as a stream: the data window, its rows in chunks, their roles.

A :class:`DataWindow` is fixed when the job starts: the champion's feature count and task,
the data watermark (largest id) and the retention floor (ids at or below it are out, see
:func:`retention_floor`). Rows come from the store in keyset-paginated chunks
(:meth:`app.storage.Store.iter_samples`), so no retrain ever holds more than a chunk of
samples; a sample's role (train / validation / holdout) still depends only on its id
(:mod:`app.core.splits`), so moving the window never turns a holdout row into training data.

Chunk sizes come from ``SKQK_RETRAIN_MEMORY_MB`` (:func:`block_rows`): the id space is cut
into fixed blocks of that many ids, which is also the unit of the feature cache.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta

import numpy as np
from sqlalchemy import select

from app.core.splits import mix
from app.settings import Settings
from app.storage import SampleSet, Store
from app.storage.schema import samples
from app.storage.store import as_utc

TRAIN, VAL, HOLDOUT = 0, 1, 2


@dataclass(frozen=True)
class DataWindow:
    n_features: int
    n_targets: int | None  # regression: targets per row; None: classification
    num_classes: int  # classification: labels outside [0, num_classes) are skipped
    max_id: int  # the data watermark of the job
    min_id: int  # the retention floor: ids ≤ min_id are not used (0: every row)
    modulo: int  # holdout_modulo

    def keep(self, rows: SampleSet) -> np.ndarray:
        """Rows of ``rows`` this window uses: inside the id window, with a usable label."""
        return self.keep_arrays(rows.ids, rows.y)

    def keep_arrays(self, ids: np.ndarray, y: np.ndarray) -> np.ndarray:
        inside = (ids > self.min_id) & (ids <= self.max_id)
        if self.n_targets is not None:
            return inside & np.isfinite(y).all(axis=1)
        return inside & (y >= 0) & (y < self.num_classes)

    def roles(self, ids: np.ndarray) -> np.ndarray:
        """uint8 role per id: TRAIN, VAL or HOLDOUT (the rule of app.core.splits)."""
        bucket = mix(np.asarray(ids, dtype=np.int64)) % np.uint64(self.modulo)
        return np.where(bucket == 0, HOLDOUT, np.where(bucket == 1, VAL, TRAIN)).astype(np.uint8)


def iter_window(store: Store, window: DataWindow, chunk_rows: int, after_id: int | None = None,
                max_id: int | None = None) -> Iterator[SampleSet]:
    """The window's rows in id order, chunk by chunk (each filtered by ``window.keep``)."""
    start = max(window.min_id, after_id or 0)
    stop = window.max_id if max_id is None else min(max_id, window.max_id)
    for chunk in store.iter_samples(window.n_features, after_id=start, max_id=stop,
                                    n_targets=window.n_targets, chunk_rows=chunk_rows):
        keep = window.keep(chunk)
        yield chunk if keep.all() else SampleSet(chunk.ids[keep], chunk.x[keep], chunk.y[keep])


def block_rows(settings: Settings, n_features: int, feature_dim: int = 256) -> int:
    """Ids per block (= most rows per chunk): a quarter of the memory budget for one block of
    samples and their features (a power of two, 1,024 to 1,048,576)."""
    per_row = 4 * (n_features + 2 * feature_dim + 16)
    rows = settings.retrain_memory_mb * (1 << 20) // 4 // per_row
    return int(min(1 << 20, max(1024, 1 << max(int(rows).bit_length() - 1, 0))))


def retention_floor(store: Store, settings: Settings, n_features: int, max_id: int,
                    n_targets: int | None = None, now: datetime | None = None) -> int:
    """The largest id a retrain leaves out under ``SKQK_RETENTION`` (0: none left out).

    ``last_n``: everything below the ``retention_n`` newest usable rows up to ``max_id``;
    ``last_days``: everything ingested before ``now - retention_days``.
    """
    if settings.retention == "all":
        return 0
    label = samples.c.label if n_targets is None else samples.c.targets
    if settings.retention == "last_n":
        query = (select(samples.c.id).where(samples.c.n_features == n_features, label.is_not(None),
                                            samples.c.quarantined_at.is_(None), samples.c.id <= max_id)
                 .order_by(samples.c.id.desc()).offset(settings.retention_n).limit(1))
        with store.engine.connect() as conn:
            floor = conn.execute(query).scalar()
        return int(floor or 0)
    cutoff = (now or datetime.now(UTC)) - timedelta(days=settings.retention_days)
    return first_id_at(store, cutoff, max_id) - 1


def first_id_at(store: Store, cutoff: datetime, max_id: int) -> int:
    """The smallest id stored at or after ``cutoff`` (``max_id + 1`` if none), by binary search
    on the primary key: ids grow with ingest time, so no index on ``created_at`` is needed and
    a window costs about log2(ids) point queries whatever the table size."""
    lo, hi = 1, max_id + 1

    def created(at_or_after: int) -> tuple[int, datetime] | None:
        with store.engine.connect() as conn:
            row = conn.execute(select(samples.c.id, samples.c.created_at).where(
                samples.c.id >= at_or_after, samples.c.id <= max_id).order_by(samples.c.id).limit(1)).first()
        return None if row is None else (int(row[0]), as_utc(row[1]))

    while lo < hi:  # invariant: the first row at or after hi is young (or there is none)
        mid = (lo + hi) // 2
        found = created(mid)
        if found is None or found[1] >= cutoff:
            hi = mid
        else:  # every id up to found is old
            lo = found[0] + 1
    first = created(lo)
    return first[0] if first is not None else max_id + 1
