"""Retention windows (all / last N / last T days): what a retrain uses, a holdout that stays
holdout as the window moves, and `skqk samples retain` archiving to Parquet and deleting."""

from __future__ import annotations

import subprocess
import sys
import uuid
from datetime import UTC, datetime, timedelta
from pathlib import Path

import numpy as np
import pytest
from sklearn.datasets import load_digits
from sqlalchemy import update

from app.core.splits import split_masks
from app.retrain.job import run_retrain_job
from app.retrain.sample_stream import retention_floor
from app.settings import Settings
from app.storage import Store
from app.storage.schema import samples
from tests.conftest import fast_settings
from tests.helpers.server import REPO, fast_env

DIGITS = load_digits()
X = (DIGITS.data / 16.0).astype(np.float32)


def _retrain(store: Store, settings: Settings) -> dict:
    job_id = f"job-{uuid.uuid4().hex[:12]}"
    store.create_job(job_id, "qk", runner="test")
    return run_retrain_job(store, settings, job_id, "qk")


def _age(store: Store, upto_id: int, days: float) -> None:
    with store.engine.begin() as conn:
        conn.execute(update(samples).where(samples.c.id <= upto_id)
                     .values(created_at=datetime.now(UTC) - timedelta(days=days)))


def test_retention_floor_of_each_window(served_store: Store, tmp_path: Path) -> None:
    ids = served_store.load_samples(64).ids
    top = int(ids[-1])
    everything = fast_settings(tmp_path)
    assert retention_floor(served_store, everything, 64, top) == 0
    last = fast_settings(tmp_path, retention="last_n", retention_n=500)
    floor = retention_floor(served_store, last, 64, top)
    assert int((ids > floor).sum()) == 500
    assert retention_floor(served_store, fast_settings(tmp_path, retention="last_n", retention_n=10**6), 64,
                           top) == 0
    _age(served_store, int(ids[299]), days=40)  # the first 300 rows are 40 days old
    days = fast_settings(tmp_path, retention="last_days", retention_days=30)
    assert retention_floor(served_store, days, 64, top) == int(ids[299])
    assert retention_floor(served_store, fast_settings(tmp_path, retention="last_days", retention_days=50),
                           64, top) == 0
    _age(served_store, top, days=40)  # everything is old: nothing in the window
    assert retention_floor(served_store, days, 64, top) == top


@pytest.mark.parametrize("window", [300, 900])
def test_a_window_trains_on_its_rows_and_the_holdout_stays_holdout(sqlite_store: Store, tmp_path: Path,
                                                                   window: int) -> None:
    settings = fast_settings(tmp_path / "data", retention="last_n", retention_n=window,
                             retrain_memory_mb=1)
    ids = sqlite_store.load_samples(64).ids
    first = _retrain(sqlite_store, settings)
    inside = ids[-window:]
    masks = split_masks(inside, settings.holdout_modulo)
    assert first["n_samples"] == window and first["retention_floor"] == int(ids[-window - 1])
    assert (first["n_holdout"], first["n_val"]) == (int(masks.holdout.sum()), int(masks.val.sum()))
    # the window moves on: rows that stay inside keep their role (a function of the id alone)
    new = sqlite_store.ingest(X[:200], DIGITS.target[:200]).batch_id
    assert new
    later_ids = sqlite_store.load_samples(64).ids[-window:]
    later = split_masks(later_ids, settings.holdout_modulo)
    second = _retrain(sqlite_store, settings)
    assert second["n_samples"] == window and second["n_holdout"] == int(later.holdout.sum())
    both = np.intersect1d(inside, later_ids)
    was = split_masks(both, settings.holdout_modulo).holdout
    assert was.sum() > 0 and np.array_equal(was, np.isin(both, later_ids[later.holdout]))


def test_retain_archives_to_parquet_and_deletes_audited(bootstrapped_dir: Path, tmp_path: Path) -> None:
    import pyarrow.parquet as pq

    store = Store(f"sqlite:///{bootstrapped_dir / 'skqk.db'}")
    before = store.load_samples(64)
    archive = tmp_path / "old.parquet"
    env = {**fast_env(bootstrapped_dir), "SKQK_RETENTION": "last_n", "SKQK_RETENTION_N": "1000"}
    done = subprocess.run([sys.executable, "-m", "app.cli", "samples", "retain", "--archive", str(archive),
                           "--delete", "--yes"], cwd=REPO, env=env, text=True, capture_output=True,
                          timeout=120, check=False)
    assert done.returncode == 0, done.stdout + done.stderr
    out = len(before) - 1000
    assert f"archived {out} samples" in done.stdout and f"delete: {out} samples" in done.stdout
    table = pq.read_table(archive)
    assert table.column("id").to_pylist() == before.ids[:out].tolist()
    stored = np.asarray(table.column("features").to_pylist(), dtype=np.float32)
    np.testing.assert_array_equal(stored, before.x[:out])  # bit for bit
    assert table.column("label").to_pylist() == before.y[:out].tolist()
    after = store.load_samples(64)
    np.testing.assert_array_equal(after.ids, before.ids[out:])
    entry = store.sample_audit(limit=1).entries[0]
    assert entry.action == "delete" and entry.affected == out and "retention last_n" in (entry.reason or "")
    assert entry.actor.startswith("cli:")
    again = subprocess.run([sys.executable, "-m", "app.cli", "samples", "retain", "--delete", "--yes"],
                           cwd=REPO, env=env, text=True, capture_output=True, timeout=120, check=False)
    assert again.returncode == 0 and "nothing outside the window" in again.stdout
    store.dispose()
