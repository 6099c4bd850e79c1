"""The feature cache of QK retrains: a hit gives exactly the readout of recomputing; exact
invalidation (full retrain, activating another version, sample admin); streamed retrains."""

from __future__ import annotations

import uuid
from pathlib import Path

import numpy as np
import pytest
from sklearn.datasets import load_digits

from app.retrain.job import run_retrain_job
from app.settings import Settings
from app.storage import SampleSelection, Store
from tests.conftest import fast_settings
from tests.helpers.server import copy_store

DIGITS = load_digits()
X = (DIGITS.data / 16.0).astype(np.float32)


def _small_blocks(data_dir: Path, **overrides: object) -> Settings:
    """1 MiB budget: blocks of 1,024 ids, so the 1,797 digits rows span a full and a partial block."""
    return fast_settings(data_dir, retrain_memory_mb=1, **overrides)


def _retrain(store: Store, settings: Settings, mode: str = "qk") -> dict:
    job_id = f"job-{uuid.uuid4().hex[:12]}"
    store.create_job(job_id, mode, runner="test")
    return run_retrain_job(store, settings, job_id, mode)


def _cold_twin(store: Store, tmp_path: Path, name: str) -> tuple[Store, Settings]:
    """A copy of the store (same rows, versions, active pointer) with an empty feature cache."""
    with store.engine.connect() as conn:
        conn.exec_driver_sql("PRAGMA wal_checkpoint(TRUNCATE)")
    data_dir = Path(store.engine.url.database).parent
    twin_dir = copy_store(data_dir, tmp_path / name)
    settings = _small_blocks(twin_dir, feature_cache_dir=tmp_path / f"{name}-cache")
    return Store(settings.resolved_database_url), settings


def _same_candidate(store: Store, warm: dict, twin: Store, cold: dict) -> None:
    a = store.get_version(warm["candidate_version"], weights=False)
    b = twin.get_version(cold["candidate_version"], weights=False)
    assert a.estimator_sha256 == b.estimator_sha256  # bit-identical readout
    assert a.selector_sha256 == b.selector_sha256
    assert warm["candidate"] == cold["candidate"] and warm["champion"] == cold["champion"]
    assert warm["n_samples"] == cold["n_samples"]


def test_cache_hit_readout_equals_recomputed_readout(sqlite_store: Store, tmp_path: Path) -> None:
    settings = _small_blocks(tmp_path / "data")
    sqlite_store.ingest(X[:30], DIGITS.target[:30])
    first = _retrain(sqlite_store, settings)
    assert first["feature_cache"]["blocks_reused"] == 0  # cold: every row computed once
    sqlite_store.ingest(X[30:70], DIGITS.target[30:70])
    twin, twin_settings = _cold_twin(sqlite_store, tmp_path, "twin")
    warm = _retrain(sqlite_store, settings)
    cold = _retrain(twin, twin_settings)
    # warm: block 0 (ids 1-1024) read back, only the partial block with the new rows computed
    assert warm["feature_cache"]["blocks_reused"] == 1 and cold["feature_cache"]["blocks_reused"] == 0
    assert cold["feature_cache"]["rows_computed"] == warm["n_samples"]
    assert warm["feature_cache"]["rows_computed"] < warm["n_samples"] - 1000
    _same_candidate(sqlite_store, warm, twin, cold)
    twin.dispose()


def test_full_retrain_invalidates_and_an_older_version_gets_its_own(sqlite_store: Store,
                                                                    tmp_path: Path) -> None:
    settings = _small_blocks(tmp_path / "data", promotion_tolerance=1.0)  # every candidate promoted
    cache_dirs = lambda: sorted(p.name for p in settings.resolved_feature_cache_dir.iterdir())  # noqa: E731
    sqlite_store.ingest(X[:20], DIGITS.target[:20])
    qk = _retrain(sqlite_store, settings)
    assert qk["promoted"] and len(cache_dirs()) == 1
    full = _retrain(sqlite_store, settings, "full")
    assert full["promoted"] and full["feature_cache"] is None
    sqlite_store.ingest(X[20:40], DIGITS.target[20:40])
    after_full = _retrain(sqlite_store, settings)  # new selector: nothing of the old cache is used
    assert after_full["feature_cache"]["blocks_reused"] == 0
    assert after_full["feature_cache"]["rows_computed"] == after_full["n_samples"]
    assert len(cache_dirs()) == 2
    # roll back to the version the first cache belongs to: its complete block is valid again
    sqlite_store.activate(qk["candidate_version"], "test", "roll back")
    twin, twin_settings = _cold_twin(sqlite_store, tmp_path, "twin")
    warm = _retrain(sqlite_store, settings)
    cold = _retrain(twin, twin_settings)
    assert warm["feature_cache"]["blocks_reused"] == 1 and len(cache_dirs()) == 2
    _same_candidate(sqlite_store, warm, twin, cold)
    twin.dispose()


def test_quarantine_and_release_rebuild_exactly_the_blocks_they_touch(sqlite_store: Store,
                                                                     tmp_path: Path) -> None:
    settings = _small_blocks(tmp_path / "data")
    sqlite_store.ingest(X[:10], DIGITS.target[:10])
    _retrain(sqlite_store, settings)
    sqlite_store.quarantine_samples(SampleSelection(from_id=100, to_id=400), "test", "noise")
    sqlite_store.ingest(X[10:20], DIGITS.target[10:20])
    twin, twin_settings = _cold_twin(sqlite_store, tmp_path, "twin")
    warm, cold = _retrain(sqlite_store, settings), _retrain(twin, twin_settings)
    assert warm["feature_cache"]["blocks_reused"] == 0  # block 0 changed: rebuilt
    _same_candidate(sqlite_store, warm, twin, cold)
    twin.dispose()
    sqlite_store.release_samples(SampleSelection(from_id=100, to_id=400), "test", "false alarm")
    sqlite_store.ingest(X[20:30], DIGITS.target[20:30])
    released = _retrain(sqlite_store, settings)
    assert released["n_samples"] == warm["n_samples"] + 301 + 10
    sqlite_store.quarantine_samples(SampleSelection(from_id=1500, to_id=1500), "test", "one row")
    untouched = _retrain(sqlite_store, settings)  # block 0's ids are unchanged: kept as it is
    assert untouched["feature_cache"]["blocks_reused"] == 1


@pytest.mark.parametrize("mode", ["qk", "full"])
def test_retrain_streams_when_data_exceed_the_budget(sqlite_store: Store, tmp_path: Path, mode: str) -> None:
    """1 MiB cannot hold the data: the QK refit and the full retrain stream from cache / store."""
    settings = _small_blocks(tmp_path / "data")
    sqlite_store.ingest(X[:20], DIGITS.target[:20])
    result = _retrain(sqlite_store, settings, mode)
    assert result["mode"] == mode and result["streamed"] is True
    assert np.isfinite(result["candidate"]["holdout_acc"])
    assert result["candidate"]["holdout_acc"] > 0.8 and result["champion"]["holdout_acc"] > 0.8
    assert result["n_train"] + result["n_val"] + result["n_holdout"] == result["n_samples"]


def test_drift_on_rows_fetched_by_id_equals_drift_on_everything(sqlite_store: Store) -> None:
    """The job fetches only drift's sampled rows; the report is the one of the whole tensors."""
    import torch

    from app.core.drift import structural_drift
    from app.retrain.job import selector_drift
    from app.retrain.sample_stream import DataWindow
    from app.serving.models import load_model

    origin_watermark = sqlite_store.get_version(1, weights=False).data_watermark
    sqlite_store.ingest(np.clip(X[:400] + 0.3, 0, 1), DIGITS.target[:400])  # brighter: drifted
    model, record = load_model(sqlite_store, 1)
    rows = sqlite_store.load_samples(64)
    window = DataWindow(64, None, 10, int(rows.ids[-1]), 0, 10)
    streamed = selector_drift(sqlite_store, record, model, rows.ids, window)
    old = torch.from_numpy(rows.x[rows.ids <= origin_watermark])
    new = torch.from_numpy(rows.x[rows.ids > origin_watermark])
    whole = structural_drift(model.selector, old, new).to_dict()
    assert {k: streamed[k] for k in whole} == whole and streamed["n_new_samples"] == 400
