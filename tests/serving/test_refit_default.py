"""QK retrain cost follows the new data by default: above SKQK_RETRAIN_REFIT_MAX_ROWS training
rows the refit sees every new row plus an id-hashed, reweighted sample of the old ones (warm
start: the champion's readout); at or below it, the exact refit. The job result says which."""

from __future__ import annotations

import numpy as np
from sklearn.datasets import load_digits

from app.retrain.job import run_retrain_job
from app.retrain.qk_refit import budget_weights, refit_summary
from app.retrain.sample_stream import TRAIN, VAL
from app.settings import Settings
from app.storage import Store

DIGITS = load_digits()
X = (DIGITS.data / 16.0).astype(np.float32)


def test_the_budget_is_on_by_default() -> None:
    assert Settings.model_fields["retrain_refit_max_rows"].default == 200_000


def test_sample_keeps_every_new_row_and_reweights_the_old() -> None:
    ids = np.arange(1, 100_001, dtype=np.int64)
    roles = np.where(ids % 10 == 0, VAL, TRAIN)
    watermark = 95_000
    assert budget_weights(ids, roles, watermark, 0) is None  # 0: exact
    assert budget_weights(ids, roles, watermark, 90_000) is None  # 90,000 training rows: not above
    w = budget_weights(ids, roles, watermark, 20_000)
    assert w is not None and w.n_new == 4_500 and w.n_old == 85_500
    weights = w(ids[roles == TRAIN])
    new = ids[roles == TRAIN] > watermark
    assert (weights[new] == 1.0).all()
    old = weights[~new]
    kept = old > 0
    assert np.allclose(old[kept], 1.0 / w.p)
    # about max_rows - n_new old rows kept, their weights summing to about all old rows
    assert abs(int(kept.sum()) - (20_000 - 4_500)) < 500
    assert abs(float(old.sum()) - 85_500) / 85_500 < 0.03
    assert (w(ids[roles == TRAIN]) == weights).all()  # the same rows every time (id hash)
    summary = refit_summary(w, roles, 20_000)
    assert summary["kind"] == "sampled" and summary["new_rows"] == 4_500
    assert refit_summary(None, roles, 200_000)["kind"] == "exact"


def test_job_result_says_which_refit_ran(sqlite_store: Store, settings: Settings) -> None:
    sqlite_store.ingest(X[:40], DIGITS.target[:40])
    exact = run_retrain_job(sqlite_store, settings, _job(sqlite_store, "small"), "qk")
    assert exact["refit"]["kind"] == "exact"  # ~1,450 training rows: far below the default bound
    assert "<= SKQK_RETRAIN_REFIT_MAX_ROWS=200000" in exact["refit"]["reason"]
    sqlite_store.ingest(X[40:80], DIGITS.target[40:80])
    bounded = settings.model_copy(update={"retrain_refit_max_rows": 400})
    sampled = run_retrain_job(sqlite_store, bounded, _job(sqlite_store, "bounded"), "qk")
    refit = sampled["refit"]
    assert refit["kind"] == "sampled" and refit["train_rows"] > 400 and 0 < refit["old_fraction"] < 1
    assert 0 < refit["new_rows"] <= 40  # the rows added since the champion (training share)
    sqlite_store.ingest(X[80:90], DIGITS.target[80:90])
    full = run_retrain_job(sqlite_store, settings, _job(sqlite_store, "full"), "full")
    assert full["refit"] is None


def _job(store: Store, name: str) -> str:
    store.create_job(name, "qk", runner="test")
    return name
