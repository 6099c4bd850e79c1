"""Chunked (keyset-paginated) loading equals whole loading, on SQLite and a real PostgreSQL."""

from __future__ import annotations

import numpy as np
import pytest

from app.storage import SampleSelection, Store

ACTOR = "test:admin"


def _concat(chunks: list) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    return (np.concatenate([c.ids for c in chunks]), np.concatenate([c.x for c in chunks]),
            np.concatenate([c.y for c in chunks]))


def _mixed_store(store: Store) -> None:
    """Classification rows of 4 features in three batches, some quarantined, some of another
    width, and regression rows (2 targets, and 1 target: another model's) in between."""
    rng = np.random.default_rng(0)
    store.ingest(rng.standard_normal((23, 4)).astype(np.float32), rng.integers(0, 3, 23))
    store.ingest(rng.standard_normal((5, 6)).astype(np.float32), rng.integers(0, 3, 5))
    store.ingest(rng.standard_normal((9, 4)).astype(np.float32), targets=rng.standard_normal((9, 2)))
    store.ingest(rng.standard_normal((3, 4)).astype(np.float32), targets=rng.standard_normal(3))
    store.ingest(rng.standard_normal((17, 4)).astype(np.float32), rng.integers(0, 3, 17),
                 idempotency_key="later")
    store.quarantine_samples(SampleSelection(from_id=10, to_id=14), ACTOR, "noise")


@pytest.mark.parametrize("chunk_rows", [1, 7, 40, 1000])
def test_chunked_loading_equals_whole_loading(store: Store, chunk_rows: int) -> None:
    _mixed_store(store)
    for n_targets in (None, 2):
        whole = store.load_samples(4, n_targets=n_targets)
        chunks = list(store.iter_samples(4, n_targets=n_targets, chunk_rows=chunk_rows))
        assert all(0 < len(c) <= chunk_rows for c in chunks)
        ids, x, y = _concat(chunks)
        np.testing.assert_array_equal(ids, whole.ids)
        np.testing.assert_array_equal(x, whole.x)
        np.testing.assert_array_equal(y, whole.y)
        assert x.dtype == whole.x.dtype and y.dtype == whole.y.dtype
    # a window (after_id, max_id] is the same rows as filtering the whole load
    whole = store.load_samples(4)
    ids, x, _y = _concat(list(store.iter_samples(4, after_id=15, max_id=50, chunk_rows=chunk_rows)))
    inside = (whole.ids > 15) & (whole.ids <= 50)
    np.testing.assert_array_equal(ids, whole.ids[inside])
    np.testing.assert_array_equal(x, whole.x[inside])


def test_rows_by_id_and_ids_by_range(store: Store) -> None:
    _mixed_store(store)
    whole = store.load_samples(4)
    wanted = whole.ids[[0, 3, 17, -1]]
    picked = store.load_samples_by_ids(4, np.concatenate([wanted[::-1], [10, 24, 999]]))  # quarantined,
    np.testing.assert_array_equal(picked.ids, wanted)  # other width, absent: left out; sorted
    np.testing.assert_array_equal(picked.x, whole.x[[0, 3, 17, -1]])
    between = whole.ids[(whole.ids > 5) & (whole.ids <= 30)]
    np.testing.assert_array_equal(store.usable_ids_between(4, 5, 30), between)
    before = store.sample_audit_mark()
    store.release_samples(SampleSelection(from_id=10, to_id=10), ACTOR, "ok")
    assert store.sample_audit_mark() > before
